import zlib

import pytest
import torch

from kdviz.losses import OBJECTIVES, TokenSplit, get_loss, tkd_dkd
from reference import official_style_atkd, reference_token_loss

PARAMS = {
    "fkl": {"temperature": 1.0},
    "rkl": {"temperature": 2.0},
    "jsd": {"beta": 0.3, "temperature": 1.0},
    "tvd": {"temperature": 1.0},
    "skl": {"alpha": 0.1, "temperature": 1.0},
    "srkl": {"alpha": 0.1, "temperature": 1.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 2.0},
}


def make_batch(batch=3, seq=6, vocab=37, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, seq, vocab, generator=g) * scale).requires_grad_(True)
    teacher = torch.randn(batch, seq, vocab, generator=g) * scale
    labels = torch.randint(vocab, (batch, seq), generator=g)
    labels[0, :2] = -100
    return student, teacher, labels


def grad_of(loss_fn, student, teacher, labels):
    s = student.detach().clone().requires_grad_(True)
    value = loss_fn(s, teacher, labels)
    value.backward()
    return value.detach(), s.grad


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_objective_matches_reference_value_and_gradient(name, fused):
    student, teacher, labels = make_batch(seed=zlib.crc32(name.encode()) % 1000)  # the same inputs in every process
    ours = get_loss(name, fused=fused, chunk_rows=4, **PARAMS[name])
    value, grad = grad_of(ours, student, teacher, labels)

    def reference(s, t, y):
        return reference_token_loss(name, s, t, y, PARAMS[name]).mean()

    ref_value, ref_grad = grad_of(reference, student.double(), teacher.double(), labels)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("base", ["fkl", "rkl"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("lam,k", [(0.2, 0.5), (0.5, 0.3), (0.0, 1.0)])
def test_atkd_matches_official_formula(base, fused, lam, k):
    student, teacher, labels = make_batch(batch=4, seq=9, vocab=53, seed=7)
    ours = get_loss("atkd", lam=lam, k=k, base=base, fused=fused, chunk_rows=5)
    value, grad = grad_of(ours, student, teacher, labels)
    ref_value, ref_grad = grad_of(lambda s, t, y: official_style_atkd(s, t, y, lam=lam, k=k, base=base),
                                  student.double(), teacher.double(), labels)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-7)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    student, teacher, labels = make_batch(seed=3)
    for beta, other in ((0.0, "fkl"), (1.0, "rkl")):
        a = get_loss("jsd", beta=beta)(student, teacher, labels)
        b = get_loss(other)(student, teacher, labels)
        torch.testing.assert_close(a, b)


def test_tkd_dkd_identity_and_finite_gradients():
    student, teacher, labels = make_batch(seed=4)
    valid = labels != -100
    log_q = torch.log_softmax(student[valid], -1)
    log_p = torch.log_softmax(teacher[valid] * 10, -1)  # very peaked teacher
    tkd, dkd = tkd_dkd(log_p, log_q, labels[valid])
    unc = 1 - log_p.gather(1, labels[valid][:, None]).squeeze(1).exp()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(tkd + unc * dkd, kl, rtol=1e-4, atol=1e-6)
    (tkd.sum() + dkd.sum()).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(reduction):
    student, teacher, labels = make_batch(seed=5)
    mean = get_loss("fkl")(student, teacher, labels)
    other = get_loss("fkl", reduction=reduction)(student, teacher, labels)
    n_valid = (labels != -100).sum()
    if reduction == "sum":
        torch.testing.assert_close(other, mean * n_valid)
    else:
        assert other.shape == labels.shape and (other[labels == -100] == 0).all()
        torch.testing.assert_close(other.sum() / n_valid, mean)


def test_bf16_student_logits_get_bf16_gradients():
    student, teacher, labels = make_batch(seed=6)
    s = student.detach().bfloat16().requires_grad_(True)
    loss = get_loss("atkd")(s, teacher.bfloat16(), labels)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()


def test_unknown_name_lists_what_is_allowed():
    with pytest.raises(ValueError, match="Unknown loss 'kld'. Available: fkl .*atkd"):
        get_loss("kld")


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("atkd", {"base": "jsd"}, "base='jsd' is not allowed; use 'fkl' or 'rkl'"),
        ("atkd", {"lam": 1.5}, r"lam=1.5 is not allowed; use a number in \[0, 1\]"),
        ("jsd", {"alpha": 0.1}, r"no parameter\(s\) \['alpha'\]; it takes"),
        ("skl", {"alpha": 1.0}, r"alpha=1.0 is not allowed; use a number in \(0, 1\)"),
        ("fkl", {"temperature": 0}, "temperature=0 is not allowed"),
    ],
)
def test_bad_parameters_say_what_is_allowed(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_loss(name, **params)


def test_bad_inputs():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match="matching shapes"):
        get_loss("fkl")(student, teacher[..., :-1], labels)
    with pytest.raises(ValueError, match="No valid target"):
        get_loss("fkl")(student, teacher, torch.full_like(labels, -100))


def test_every_registered_objective_is_tested():
    assert set(OBJECTIVES) == set(PARAMS) | {"atkd", "modes"}  # (teaching modes: tests/test_modes.py)


def make_hidden(batch=3, seq=7, vocab=41, h_student=5, h_teacher=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(batch, seq, h_student, generator=g, dtype=torch.float64) * 2
    student_head = torch.randn(vocab, h_student, generator=g, dtype=torch.float64)
    student_bias = torch.randn(vocab, generator=g, dtype=torch.float64)
    teacher_hidden = torch.randn(batch, seq, h_teacher, generator=g, dtype=torch.float64) * 2
    teacher_head = torch.randn(vocab, h_teacher, generator=g, dtype=torch.float64)
    labels = torch.randint(vocab, (batch, seq), generator=g)
    labels[1, :3] = -100
    return student_hidden, student_head, student_bias, teacher_hidden, teacher_head, labels


@pytest.mark.parametrize("name,params", [("fkl", {}), ("rkl", {"temperature": 2.0}), ("jsd", {"beta": 0.3}),
                                         ("atkd", {}), ("atkd", {"base": "rkl", "lam": 0.4}), ("dkd", {})])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_path_matches_plain_autograd_on_full_logits(name, params, with_bias):
    s_hidden, s_head, s_bias, t_hidden, t_head, labels = make_hidden(seed=len(name))
    ce_weight = 0.5

    def leaves():
        return [t.clone().requires_grad_(True) for t in (s_hidden, s_head, s_bias)]

    ours_in = leaves()
    parts = get_loss(name, chunk_rows=4, **params).linear(
        ours_in[0], ours_in[1], t_hidden, t_head, labels, ce_weight=ce_weight,
        student_bias=ours_in[2] if with_bias else None)
    parts.loss.backward()

    ref_in = leaves()
    logits = torch.nn.functional.linear(ref_in[0], ref_in[1], ref_in[2] if with_bias else None)
    t_logits = torch.nn.functional.linear(t_hidden, t_head)
    kd = get_loss(name, fused=False, **params)(logits, t_logits, labels)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    (kd + ce_weight * ce).backward()

    torch.testing.assert_close(parts.loss.double(), (kd + ce_weight * ce).detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.kd.double(), kd.detach().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.ce.double(), ce.detach().double(), rtol=1e-5, atol=1e-6)
    for ours, ref in zip(ours_in[: 3 if with_bias else 2], ref_in):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)
    assert ours_in[2].grad is None or with_bias


def test_linear_path_matches_the_logits_path_parts():
    s_hidden, s_head, _, t_hidden, t_head, labels = make_hidden(seed=3)
    loss_fn = get_loss("atkd", chunk_rows=3)
    linear = loss_fn.linear(s_hidden, s_head, t_hidden, t_head, labels, ce_weight=1.0)
    logits = s_hidden @ s_head.T
    full = loss_fn.parts(logits, t_hidden @ t_head.T, labels, ce_weight=1.0)
    for field in ("loss", "kd", "ce", "contributions", "unc"):
        torch.testing.assert_close(getattr(linear, field).double(), getattr(full, field).double().detach())
    valid = labels != -100
    unc = 1 - torch.softmax(t_hidden @ t_head.T, -1)[valid].gather(1, labels[valid][:, None]).squeeze(1)
    torch.testing.assert_close(linear.unc.double(), unc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["fkl", "atkd"])
def test_hard_and_easy_parts_add_up_to_the_kd_loss(name):
    student, teacher, labels = make_batch(seed=11)
    parts = get_loss(name).parts(student, teacher, labels)
    hard, easy = parts.hard_easy(0.5)
    assert hard + easy == pytest.approx(float(parts.kd), rel=1e-5)
    assert hard > 0 and easy >= 0
    if name == "atkd":  # the easy group carries DKD only, with weight lam / n_easy
        valid = labels != -100
        tkd, dkd = tkd_dkd(torch.log_softmax(teacher[valid], -1), torch.log_softmax(student[valid].detach(), -1),
                           labels[valid])
        from kdviz.losses import hard_mask
        easy_mask = ~hard_mask(parts.unc, 0.5)
        assert easy == pytest.approx(float(0.2 * dkd[easy_mask].mean()), rel=1e-4)


def test_linear_path_rejects_per_token_reduction_and_bad_shapes():
    s_hidden, s_head, _, t_hidden, t_head, labels = make_hidden()
    with pytest.raises(ValueError, match="reduction"):
        get_loss("fkl", reduction="none").linear(s_hidden, s_head, t_hidden, t_head, labels)
    with pytest.raises(ValueError, match="teacher_head"):
        get_loss("fkl").linear(s_hidden, s_head, t_hidden, t_head[:-1], labels)


def test_fused_loss_refuses_a_second_backward_instead_of_a_wrong_gradient():
    student, teacher, labels = make_batch(seed=5)
    loss = get_loss("fkl")(student, teacher, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


MASKED = -1e4  # in float64 exp(-1e4) is exactly 0: the plain reference sees the same zero-probability entries


def with_masks(student, teacher, labels, *, teacher_only=True):
    """-inf logits: a few entries masked in both models (a vocabulary mask) and some in the teacher only."""
    student, teacher = student.detach().clone(), teacher.clone()
    off_target = [(b, t, (int(labels[b, t].clamp(min=0)) + d) % student.shape[-1])
                  for b in range(student.shape[0]) for t in range(student.shape[1]) for d in (1, 2, 5)]
    for i, (b, t, v) in enumerate(off_target):
        teacher[b, t, v] = float("-inf")
        if i % 3 or not teacher_only:
            student[b, t, v] = float("-inf")
    return student.requires_grad_(True), teacher, labels


@pytest.mark.parametrize("path", ["plain", "fused", "linear"])
@pytest.mark.parametrize("name, masked", [("rkl", "teacher"), ("fkl", "student"), ("atkd", "student"),
                                          ("dkd", "student")])
def test_an_infinite_loss_is_refused_not_returned_with_nan_gradients(name, masked, path):
    """KL(a || b) is infinite where b = 0 < a: the loss says so instead of giving inf and a NaN gradient."""
    student, teacher, labels = make_batch(seed=11)
    student = student.detach().clone()
    b, t, v = 1, 2, (int(labels[1, 2]) + 1) % student.shape[-1]  # a target token, one vocabulary entry off
    (teacher if masked == "teacher" else student)[b, t, v] = float("-inf")
    loss = get_loss(name, fused=path != "plain", chunk_rows=4)
    if path == "linear":  # the same mask as an LM-head bias of -inf at entry v, on every row
        vocab, hidden = student.shape[-1], torch.randn(*labels.shape, 6)
        bias = torch.zeros(vocab).index_fill(0, torch.tensor([v]), float("-inf"))
        zero = torch.zeros(vocab)
        with pytest.raises(ValueError, match=r"infinite at \d+ of \d+ target tokens.*Mask the same entries"):
            loss.linear(hidden.requires_grad_(True), torch.randn(vocab, 6), hidden, torch.randn(vocab, 6), labels,
                        student_bias=bias if masked == "student" else zero,
                        teacher_bias=bias if masked == "teacher" else zero)
        return
    with pytest.raises(ValueError, match=r"infinite at 1 of \d+ target tokens.*Mask the same entries"):
        loss(student.requires_grad_(True), teacher, labels)


@pytest.mark.parametrize("name", [*PARAMS, "atkd", "atkd-rkl"])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_negative_infinite_logits_are_exact_in_every_loss(name, fused):
    reverse = name.endswith("rkl") and name != "srkl"  # p = 0 where q > 0 makes KL(q || p) infinite
    student, teacher, labels = with_masks(*make_batch(seed=11), teacher_only=not reverse)
    if name.startswith("atkd"):
        base = "rkl" if name.endswith("rkl") else "fkl"
        ours = get_loss("atkd", base=base, fused=fused, chunk_rows=4)

        def reference(s, t, y):
            return official_style_atkd(s, t, y, base=base)
    else:
        ours = get_loss(name, fused=fused, chunk_rows=4, **PARAMS[name])

        def reference(s, t, y):
            return reference_token_loss(name, s, t, y, PARAMS[name]).mean()
    value, grad = grad_of(ours, student, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    finite_s = student.detach().double().nan_to_num(neginf=MASKED)
    ref_value, ref_grad = grad_of(reference, finite_s, teacher.double().nan_to_num(neginf=MASKED), labels)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-6)
    assert (grad[torch.isinf(student)] == 0).all()  # a token the student cannot produce gets no gradient


@pytest.mark.parametrize("name", ["fkl", "jsd", "atkd"])
def test_negative_infinite_bias_in_the_linear_path(name):
    torch.manual_seed(0)
    s_hidden, t_hidden = torch.randn(2, 5, 6, requires_grad=True), torch.randn(2, 5, 7)
    s_head, t_head = torch.randn(19, 6, requires_grad=True), torch.randn(19, 7)
    s_bias, t_bias = torch.zeros(19, requires_grad=True), torch.zeros(19)
    labels = torch.randint(3, 19, (2, 5))
    masked_bias = torch.zeros(19).index_fill(0, torch.tensor([0, 1]), float("-inf"))  # tokens 0 and 1 are masked
    loss_fn = get_loss(name, chunk_rows=3)
    parts = loss_fn.linear(s_hidden, s_head, t_hidden, t_head, labels, student_bias=s_bias + masked_bias,
                           teacher_bias=t_bias + masked_bias)
    parts.loss.backward()
    grads = [t.grad.clone() for t in (s_hidden, s_head, s_bias)]
    logits = (s_hidden @ s_head.T + s_bias + masked_bias, t_hidden @ t_head.T + masked_bias)
    for t in (s_hidden, s_head, s_bias):
        t.grad = None
    plain = get_loss(name, fused=False)(logits[0], logits[1], labels)
    plain.backward()
    torch.testing.assert_close(parts.loss, plain, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(grads, (s_hidden.grad, s_head.grad, s_bias.grad)):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert (grads[1][:2] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "plus-inf"])
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("path", ["plain", "fused", "linear"])
@pytest.mark.parametrize("name", ["fkl", "atkd", "jsd"])
def test_nan_or_plus_inf_logits_are_refused(bad, side, path, name):
    student, teacher, labels = make_batch(seed=12)
    loss_fn = get_loss(name, fused=path == "fused", chunk_rows=4)
    if path == "linear":
        hidden, head = torch.randn(3, 6, 4), torch.randn(37, 4, requires_grad=True)
        bias = torch.zeros(37).index_fill(0, torch.tensor([3]), bad)
        student_bias, teacher_bias = (bias, None) if side == "student" else (None, bias)
        call = lambda: loss_fn.linear(hidden, head, hidden, head.detach(), labels, student_bias=student_bias,  # noqa: E731
                                      teacher_bias=teacher_bias)
    else:
        target = student if side == "student" else teacher
        with torch.no_grad():
            target[1, 2, 3] = bad
        call = lambda: loss_fn(student, teacher, labels)  # noqa: E731
    with pytest.raises(ValueError, match=f"{side} logits contain NaN or \\+inf"):
        call()


@pytest.mark.parametrize("options,message", [
    ({"name": "atkd", "lam": "0.2"}, r"lam='0.2' is not allowed; use a number in \[0, 1\] \(got a str\)"),
    ({"name": "atkd", "k": True}, "k=True is not allowed"),
    ({"name": "fkl", "chunk_rows": -1}, "chunk_rows must be an integer >= 1, got -1"),
    ({"name": "fkl", "chunk_rows": 0}, "chunk_rows must be an integer >= 1"),
    ({"name": "fkl", "temperature": 1e-39}, r"temperature=1e-39 is not allowed"),
    ({"name": "dkd", "beta": float("nan")}, "beta=nan is not allowed"),
    ({"name": "fkl", "ignore_index": "x"}, "ignore_index must be an integer"),
])
def test_loss_parameters_are_type_and_range_checked(options, message):
    options = dict(options)
    with pytest.raises(ValueError, match=message):
        get_loss(options.pop("name"), **options)


def test_token_split_is_the_official_quantile_split():
    unc = torch.rand(101, generator=torch.Generator().manual_seed(0))
    for k in (0.5, 0.3, 0.77, 1.0):
        split = TokenSplit.over(unc, k)
        official = unc >= torch.quantile(unc.double(), 1 - k).float()
        assert torch.equal(split.hard(unc), official)
        assert (split.n_hard, split.n_easy) == (int(official.sum()), int((~official).sum()))


def test_uncertainty_from_logits_or_hidden_states_is_one_minus_the_target_probability():
    _, _, _, t_hidden, t_head, labels = make_hidden(seed=4)
    bias = torch.randn(t_head.shape[0], dtype=torch.float64)
    logits = t_hidden @ t_head.T + bias
    valid = labels != -100
    expected = 1 - torch.softmax(logits, -1)[valid].gather(1, labels[valid][:, None]).squeeze(1)
    loss_fn = get_loss("atkd", chunk_rows=4)
    torch.testing.assert_close(loss_fn.uncertainty(logits, labels).double(), expected, rtol=1e-5, atol=1e-6)
    from_hidden = loss_fn.uncertainty(t_hidden, labels, teacher_head=t_head, teacher_bias=bias)
    torch.testing.assert_close(from_hidden.double(), expected, rtol=1e-5, atol=1e-6)


MICRO_BATCHES = (slice(0, 3), slice(3, 5))  # rows of a batch of 5, cut as gradient accumulation or two processes would


@pytest.mark.parametrize("name,params", [("fkl", {}), ("jsd", {"beta": 0.3}), ("atkd", {"lam": 0.3}),
                                         ("atkd", {"base": "rkl", "k": 0.3})])
@pytest.mark.parametrize("path", ["linear", "logits"])
def test_micro_batch_losses_add_up_to_the_whole_batch_with_its_count_and_split(name, params, path):
    s_hidden, s_head, _, t_hidden, t_head, labels = make_hidden(batch=5, seed=7)
    labels[3, :6] = -100  # the micro-batches hold different numbers of targets
    t_logits = t_hidden @ t_head.T
    loss_fn = get_loss(name, chunk_rows=3, **params)

    def leaves():
        return [t.clone().requires_grad_(True) for t in (s_hidden, s_head)]

    ref_hidden, ref_head = leaves()  # the plain loss of the whole batch, plain autograd
    logits = ref_hidden @ ref_head.T
    reference = get_loss(name, fused=False, **params)(logits, t_logits, labels) + 0.5 * torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    reference.backward()

    unc = loss_fn.uncertainty(t_hidden, labels, teacher_head=t_head)  # as the trainer gathers it over the batch
    whole = dict(num_items=len(unc), split=TokenSplit.over(unc, loss_fn.params.get("k", 0.5)))
    ours_hidden, ours_head = leaves()
    naive, total = 0.0, 0.0
    for rows in MICRO_BATCHES:
        if path == "linear":
            part_unc = loss_fn.uncertainty(t_hidden[rows], labels[rows], teacher_head=t_head)
            call = lambda **options: loss_fn.linear(ours_hidden[rows], ours_head, t_hidden[rows], t_head,  # noqa: E731
                                                    labels[rows], ce_weight=0.5, **options)
            parts = call(**whole, teacher_unc=part_unc)
        else:
            call = lambda **options: loss_fn.parts(ours_hidden[rows] @ ours_head.T, t_logits[rows],  # noqa: E731
                                                   labels[rows], ce_weight=0.5, **options)
            parts = call(**whole)
        total = total + parts.loss
        naive += float(call().loss.detach()) / len(MICRO_BATCHES)  # each micro-batch a mean of its own
    total.backward()
    torch.testing.assert_close(total.double(), reference.detach().double(), rtol=1e-5, atol=1e-6)
    for ours, ref in ((ours_hidden, ref_hidden), (ours_head, ref_head)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-6)
    reference = float(reference.detach())
    assert abs(naive - reference) > 1e-3 * abs(reference)  # the cut matters without the count and the split
