"""Teaching modes (kdviz.maths.modes): ATKD spelled as a mode is ATKD exactly, plain KD spelled as a mode is
forward KL, and every mode is held against a plain per-token reference on the plain, fused, fused-linear and
teacher-cache paths, values and gradients."""

import pytest
import torch

from kdviz.losses import TokenSplit, TopKRows, get_loss
from kdviz.maths.modes import PRESETS, parse_mode
from reference import reference_stats

ATKD = "0.2*easy:dkd + 0.8*hard:tkd+dkd"


def make_batch(batch=3, seq=7, vocab=31, seed=3):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(batch, seq, vocab, generator=g) * 3).requires_grad_(True)
    teacher = torch.randn(batch, seq, vocab, generator=g) * 3
    labels = torch.randint(vocab, (batch, seq), generator=g)
    labels[0, :2] = -100
    return student, teacher, labels


def value_and_grad(loss, student, teacher, labels):
    s = student.detach().clone().requires_grad_(True)
    value = loss(s, teacher, labels)
    value.backward()
    return value.detach(), s.grad


def reference_mode(spec, student, teacher, labels, k=0.5):
    """Straight from the definition: each term's part averaged over its token set, weighted and summed."""
    stats = reference_stats(teacher.double(), student.double(), labels)
    valid = labels != -100
    unc, tkd, dkd, kl = (stats[name][valid] for name in ("unc", "tkd", "dkd", "kl"))
    hard = TokenSplit.over(unc.float(), k).hard(unc.float())
    sets = {"all": torch.ones_like(hard), "hard": hard, "easy": ~hard}
    parts = {"tkd": tkd, "dkd": dkd, "u*dkd": unc * dkd, "kl": kl}
    return sum(term.weight * parts[term.part][sets[term.tokens]].mean() for term in parse_mode(spec).terms)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_atkd_spelled_as_a_mode_is_atkd_exactly(fused):
    student, teacher, labels = make_batch()
    ours = value_and_grad(get_loss(ATKD, fused=fused, chunk_rows=4), student, teacher, labels)
    atkd = value_and_grad(get_loss("atkd", fused=fused, chunk_rows=4), student, teacher, labels)
    assert torch.equal(ours[0], atkd[0]) and torch.equal(ours[1], atkd[1])


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_plain_kd_spelled_as_a_mode_is_forward_kl(fused):
    student, teacher, labels = make_batch()
    ours = value_and_grad(get_loss("all:tkd + all:u*dkd", fused=fused), student, teacher, labels)
    fkl = value_and_grad(get_loss("fkl", fused=fused), student, teacher, labels)
    torch.testing.assert_close(ours[0], fkl[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], fkl[1], rtol=1e-4, atol=1e-7)


MODES = [*PRESETS, "all:kl", "0.3*hard:u*dkd + 0.7*easy:tkd+dkd", "2*all:dkd + 0.5*hard:kl"]


@pytest.mark.parametrize("spec", MODES)
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_every_mode_matches_its_definition_values_and_gradients(spec, fused):
    student, teacher, labels = make_batch(seed=11)
    value, grad = value_and_grad(get_loss(spec, fused=fused, chunk_rows=5), student, teacher, labels)
    ref_value, ref_grad = value_and_grad(lambda s, t, y: reference_mode(spec, s, t, y), student.double(),
                                         teacher.double(), labels)
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("spec", ["kd-on-hard", ATKD, "0.5*hard:tkd + easy:u*dkd"])
def test_modes_on_the_linear_and_cached_paths_equal_the_logits_path(spec):
    g = torch.Generator().manual_seed(5)
    vocab, width = 29, 6
    s_hidden = torch.randn(2, 6, width, generator=g, requires_grad=True)
    s_head = torch.randn(vocab, width, generator=g)
    t_hidden, t_head = torch.randn(2, 6, 8, generator=g), torch.randn(vocab, 8, generator=g)
    labels = torch.randint(vocab, (2, 6), generator=g)
    labels[1, :2] = -100
    loss = get_loss(spec, chunk_rows=3)
    on_logits = value_and_grad(lambda s, t, y: loss(s @ s_head.T, t, y), s_hidden, t_hidden @ t_head.T, labels)
    linear = value_and_grad(lambda s, t, y: loss.linear(s, s_head, t_hidden, t_head, y).loss, s_hidden, None, labels)
    log_p = torch.log_softmax((t_hidden @ t_head.T)[labels != -100], -1)
    rows = TopKRows.from_log_probs(log_p, labels[labels != -100], k=vocab)  # a cache that holds the vocabulary
    cached = value_and_grad(lambda s, t, y: loss.linear_cached(s, s_head, rows, y).loss, s_hidden, None, labels)
    for ours in (linear, cached):
        torch.testing.assert_close(ours[0], on_logits[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[1], on_logits[1], rtol=1e-3, atol=1e-6)


def test_spellings_parse_to_one_canonical_form_and_bad_ones_say_why():
    assert parse_mode("0.8 * hard : tkd + dkd + 0.2*easy:dkd").spec == "0.8*hard:tkd+dkd + 0.2*easy:dkd"
    assert parse_mode("0.5*ce + all:kl").ce == 0.5 and parse_mode("tkd-on-easy").spec == "1*easy:tkd"
    assert get_loss("kd-on-easy").name == "modes" and get_loss("0.5*ce + all:kl").ce_weight == 0.5
    for bad, says in (("medium:kl", "token set 'medium'"), ("all:ce", "part 'ce'"), ("-1*all:kl", "weight '-1' must be a finite number >= 0"),
                      ("0.5*ce", "has no KD term"), ("all:kl + oops", "cannot read 'oops'")):
        with pytest.raises(ValueError, match=says):
            get_loss(bad)
    with pytest.raises(ValueError, match="or a teaching mode such as"):
        get_loss("hardkl")
