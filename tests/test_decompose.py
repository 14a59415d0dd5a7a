import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdviz import decompose
from kdviz.maths.decomposition import SCALAR_FIELDS
from reference import reference_stats


def make_logits(batch, seq, vocab, *, scale=1.0, peak=0.0, seed=0):
    """Random teacher/student logits and labels; `peak` adds to the teacher's target logit."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, seq, vocab, generator=g) * scale
    student = torch.randn(batch, seq, vocab, generator=g) * scale
    labels = torch.randint(vocab, (batch, seq), generator=g)
    teacher.scatter_add_(2, labels[..., None], torch.full((batch, seq, 1), peak))
    labels[0, 0] = -100
    labels[-1, -1] = -100
    return teacher, student, labels


def assert_matches_reference(stats, ref, valid, rtol=1e-3, atol=1e-6):
    for name in SCALAR_FIELDS:
        ours = getattr(stats, name)[valid].double()
        torch.testing.assert_close(ours, ref[name][valid], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "scale,peak",
    [(0.01, 0.0), (1.0, 0.0), (4.0, 0.0), (1.0, 30.0), (1.0, 120.0), (8.0, 40.0)],
    ids=["flat", "normal", "wide", "peaked", "very-peaked", "wide-peaked"],
)
def test_matches_float64_reference(scale, peak):
    teacher, student, labels = make_logits(3, 7, 257, scale=scale, peak=peak)
    stats = decompose(teacher, student, labels)
    valid = labels != -100
    assert torch.equal(stats.valid, valid)
    assert_matches_reference(stats, reference_stats(teacher, student, labels), valid)


@pytest.mark.parametrize("peak", [0.0, 30.0])
def test_kl_identity_against_direct_kl(peak):
    """KL computed directly in float64 equals our TKD + u * DKD."""
    teacher, student, labels = make_logits(2, 9, 101, scale=3.0, peak=peak, seed=3)
    stats = decompose(teacher, student, labels)
    ref = reference_stats(teacher, student, labels)
    valid = stats.valid
    identity = (stats.tkd + stats.unc * stats.dkd).double()
    torch.testing.assert_close(identity[valid], ref["kl"][valid], rtol=1e-4, atol=1e-7)
    ref_identity = ref["tkd"] + ref["unc"] * ref["dkd"]
    torch.testing.assert_close(ref_identity[valid], ref["kl"][valid], rtol=1e-9, atol=1e-12)


def test_temperature_matches_reference():
    teacher, student, labels = make_logits(2, 5, 64, scale=3.0, seed=1)
    stats = decompose(teacher, student, labels, temperature=2.5)
    assert_matches_reference(stats, reference_stats(teacher, student, labels, temperature=2.5), labels != -100)


def test_ignored_positions_are_zero_and_do_not_affect_others():
    teacher, student, labels = make_logits(2, 6, 50, seed=2)
    full = decompose(teacher, student, labels)
    masked_labels = labels.clone()
    masked_labels[1, 2] = -100
    masked = decompose(teacher, student, masked_labels)
    assert masked.kl[1, 2] == 0 and not masked.valid[1, 2]
    keep = masked_labels != -100
    torch.testing.assert_close(masked.kl[keep], full.kl[keep], rtol=0, atol=0)


def test_custom_ignore_index():
    teacher, student, labels = make_logits(1, 5, 30, seed=4)
    labels[0, 0] = 7
    stats = decompose(teacher, student, torch.where(labels == -100, 0, labels), ignore_index=7)
    assert not stats.valid[0, 0]


def test_bf16_input_is_computed_in_fp32():
    teacher, student, labels = make_logits(2, 8, 300, scale=2.0, seed=5)
    teacher, student = teacher.bfloat16(), student.bfloat16()
    stats = decompose(teacher, student, labels)
    assert stats.kl.dtype == torch.float32
    assert_matches_reference(stats, reference_stats(teacher.float(), student.float(), labels), labels != -100)


def test_chunking_does_not_change_results():
    teacher, student, labels = make_logits(3, 11, 80, seed=6)
    whole = decompose(teacher, student, labels, top_k=3)
    chunked = decompose(teacher, student, labels, top_k=3, chunk_rows=4)
    for name, tensor in whole.as_dict().items():
        torch.testing.assert_close(getattr(chunked, name), tensor)


def test_inputs_are_not_modified():
    teacher, student, labels = make_logits(2, 4, 40, seed=7)
    before = teacher.clone(), student.clone()
    decompose(teacher, student, labels, temperature=2.0, top_k=2)
    assert torch.equal(teacher, before[0]) and torch.equal(student, before[1])


def test_ranks_and_topk_match_reference():
    teacher, student, labels = make_logits(2, 6, 40, scale=2.0, seed=8)
    stats = decompose(teacher, student, labels, top_k=4, temperature=1.5)
    valid = labels != -100
    for prefix, logits in (("t", teacher), ("s", student)):
        probs = torch.softmax(logits.double() / 1.5, -1)
        values, ids = probs.topk(4, dim=-1)
        assert torch.equal(getattr(stats, f"{prefix}_topk_ids")[valid], ids[valid])
        torch.testing.assert_close(getattr(stats, f"{prefix}_topk_probs")[valid].double(), values[valid], rtol=1e-4, atol=1e-7)
        target_prob = probs.gather(-1, labels.clamp(min=0)[..., None])
        rank = (probs > target_prob).sum(-1) + 1
        assert torch.equal(getattr(stats, f"{prefix}_rank")[valid], rank[valid])
    assert (stats.t_rank[~valid] == -1).all()


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(2, 64),
    scale=st.floats(0.0, 20.0),
    peak=st.floats(0.0, 60.0),
    temperature=st.floats(0.25, 4.0),
    seed=st.integers(0, 10_000),
)
def test_properties_on_random_logits(vocab, scale, peak, temperature, seed):
    teacher, student, labels = make_logits(2, 3, vocab, scale=scale, peak=peak, seed=seed)
    stats = decompose(teacher, student, labels, temperature=temperature)
    v = stats.valid
    assert ((stats.unc[v] >= 0) & (stats.unc[v] <= 1)).all()
    for name in ("tkd", "dkd", "kl", "rkl", "t_entropy", "s_entropy"):
        assert (getattr(stats, name)[v] >= -1e-6).all(), name
    assert (stats.t_logp[v] <= 1e-6).all()
    ref_kl = reference_stats(teacher, student, labels, temperature)["kl"]
    torch.testing.assert_close((stats.tkd + stats.unc * stats.dkd)[v].double(), ref_kl[v], rtol=1e-3, atol=1e-5)


def test_identical_models_give_zero_divergences():
    teacher, _, labels = make_logits(2, 5, 33, scale=3.0)
    stats = decompose(teacher, teacher.clone(), labels)
    for name in ("tkd", "dkd", "kl", "rkl"):
        assert getattr(stats, name).abs().max() < 1e-5


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda t, s, y: (t[..., :-1], s, y), "same shape"),
        (lambda t, s, y: (t, s, y[:, :-1]), "shift before calling"),
        (lambda t, s, y: (t, s, y.masked_fill(y == y[0, 1], 999)), "outside the vocabulary"),
        (lambda t, s, y: (t.index_fill(1, torch.tensor([2]), float("nan")), s, y), "teacher logits contain NaN or"),
        (lambda t, s, y: (t, s.index_fill(1, torch.tensor([3]), float("nan")), y), "student logits contain NaN or"),
        (lambda t, s, y: (t.index_put((torch.tensor([1]), torch.tensor([2]), torch.tensor([4])),
                                      torch.tensor(float("inf"))), s, y), "teacher logits contain NaN or \\+inf"),
        (lambda t, s, y: (t, s.index_put((torch.tensor([0]), torch.tensor([1]), torch.tensor([0])),
                                         torch.tensor(float("nan"))), y), "student logits contain NaN"),
        (lambda t, s, y: (t.index_fill(1, torch.tensor([2]), float("-inf")), s, y), "-inf for every token"),
    ],
    ids=["vocab-mismatch", "label-shape", "label-range", "teacher-nan", "student-nan", "teacher-one-inf",
         "student-one-nan", "teacher-all-masked"],
)
def test_bad_input_gets_clear_error(change, message):
    teacher, student, labels = make_logits(2, 5, 20, seed=9)
    with pytest.raises(ValueError, match=message):
        decompose(*change(teacher, student, labels))


def test_bad_options_get_clear_errors():
    teacher, student, labels = make_logits(1, 3, 10)
    with pytest.raises(ValueError, match="temperature must be a number in"):
        decompose(teacher, student, labels, temperature=0)
    with pytest.raises(ValueError, match="top_k=11 exceeds"):
        decompose(teacher, student, labels, top_k=11)


def test_all_positions_ignored_gives_empty_valid():
    teacher, student, labels = make_logits(1, 3, 10)
    stats = decompose(teacher, student, torch.full_like(labels, -100))
    assert not stats.valid.any() and stats.kl.abs().sum() == 0


def reference_with_masks(teacher, student, labels):
    """KL, DKD, reverse KL and teacher entropy in float64, 0 * log 0 = 0 (p = 0 where a logit is -inf)."""
    z, s = teacher.double(), student.double()
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(s, -1)
    p, q = log_p.exp(), log_q.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    rkl = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)
    entropy = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
    target = torch.nn.functional.one_hot(labels, z.shape[-1]).bool()
    p_rest = torch.where(target, 0.0, p) / (1 - p.gather(-1, labels[..., None]))
    q_rest = torch.where(target, 0.0, q) / (1 - q.gather(-1, labels[..., None]))
    dkd = torch.where(p_rest > 0, p_rest * (p_rest.log() - q_rest.log()), 0.0).sum(-1)
    return {"kl": kl, "rkl": rkl, "t_entropy": entropy, "dkd": dkd, "unc": 1 - p.gather(-1, labels[..., None])[..., 0]}


@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
def test_negative_infinite_logits_are_entries_of_probability_zero(chunk_rows):
    teacher, student, _ = make_logits(3, 6, 40, scale=3.0, seed=4)
    labels = torch.randint(20, 40, (3, 6), generator=torch.Generator().manual_seed(4))  # masks sit below 20
    neg = float("-inf")
    teacher[0, 0, 5] = student[0, 0, 5] = neg  # one entry masked in both (a shared vocabulary mask)
    teacher[0, 1, :20] = student[0, 1, :20] = neg  # half the vocabulary masked
    teacher[1, 2, 7] = neg  # masked in the teacher only: KL finite, reverse KL infinite
    student[2, 3, 11] = neg  # masked in the student only (where p = 0): KL finite
    teacher[2, 3, 11] = neg
    stats = decompose(teacher, student, labels, chunk_rows=chunk_rows)
    expected = reference_with_masks(teacher, student, labels)
    for name in ("kl", "dkd", "t_entropy", "unc"):
        got = getattr(stats, name).double()
        assert torch.isfinite(got).all(), name
        assert torch.allclose(got, expected[name], rtol=1e-4, atol=1e-4), name
    assert torch.isinf(stats.rkl[1, 2]) and torch.isinf(expected["rkl"][1, 2])
    finite = torch.isfinite(expected["rkl"])
    assert torch.allclose(stats.rkl.double()[finite], expected["rkl"][finite], rtol=1e-4, atol=1e-4)
    assert torch.allclose(stats.kl, stats.tkd + stats.unc * stats.dkd, rtol=1e-4, atol=1e-5)


def test_every_non_target_masked_means_the_teacher_is_certain():
    teacher, student, labels = make_logits(1, 2, 10, seed=5)
    labels[0, 0] = 3
    teacher[0, 0] = float("-inf")
    teacher[0, 0, labels[0, 0]] = 1.0
    stats = decompose(teacher, student, labels)
    log_q = torch.log_softmax(student[0, 0].double(), -1)[labels[0, 0]]
    assert stats.unc[0, 0] == 0 and stats.dkd[0, 0] == 0
    assert float(stats.kl[0, 0]) == pytest.approx(float(-log_q), rel=1e-5)


@pytest.mark.parametrize("options,message", [
    ({"top_k": -1}, "top_k must be an integer >= 0, got -1"),
    ({"chunk_rows": 0}, "chunk_rows must be an integer >= 1"),
    ({"chunk_rows": -1}, "chunk_rows must be an integer >= 1"),
    ({"temperature": 1e-39}, r"temperature must be a number in \[0.001, 1000\], got 1e-39"),
    ({"temperature": float("nan")}, "temperature must be a number"),
    ({"temperature": "2"}, "temperature must be a number"),
])
def test_bad_options_are_refused(options, message):
    teacher, student, labels = make_logits(1, 3, 10, seed=6)
    with pytest.raises(ValueError, match=message):
        decompose(teacher, student, labels, **options)
