"""Per-group KD quantities across tokenizers: they reduce to the per-token decomposition when both sides are one
tokenizer, the teacher's u of a one-to-one group is 1 - p from a plain forward, ULD equals TRL's ULDLoss."""

import math
import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gold.gold_config import GOLDConfig  # noqa: E402
from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402

from kdviz import decompose  # noqa: E402
from kdviz.align import align_text, match_vocabularies  # noqa: E402
from kdviz.maths.groups import binary_kl, group_stats, log1mexp, merged_log_probs, token_log_probs  # noqa: E402
from kdviz.models import load_model, load_tokenizer  # noqa: E402

TEXT = "    total = 1234 + len(items)  # café: naïve\n    return total\n"
PROMPT = "def count(items):\n"


@pytest.fixture(scope="module")
def zoo_pair():
    """(teacher, student) models and tokenizers: the zoo's SmolLM2-shaped student (49,152 tokens) teaches the
    zoo's GPT-2 student (8,192 tokens)."""
    teacher = load_model("zoo:smollm2-student", device="cpu", dtype=torch.float32)
    student = load_model("zoo:student", device="cpu", dtype=torch.float32)
    return SimpleNamespace(teacher=teacher[0], t_tok=teacher[1], student=student[0], s_tok=student[1])


def text_rows(model, tokenizer, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [P + T, V] of PROMPT + the text's ids, log-softmax rows [T, V] that predict the text's tokens).

    The rows are fp64: an fp32 log-softmax of logits in the tens rounds each entry by about 1e-6, which moves
    u = 1 - p by up to 2e-5 of itself (`kdviz.decompose` works from the logits and does not lose this).
    """
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0].float()
    return logits, logits[len(prompt) - 1 : -1].double().log_softmax(-1)


def random_rows(generator, tokens: int, vocab: int) -> torch.Tensor:
    return (torch.randn(tokens, vocab, generator=generator) * 3).log_softmax(-1)


def test_with_one_tokenizer_the_groups_are_the_tokens_and_the_decomposition_is_recovered():
    generator = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(7, 50, generator=generator) * 3, torch.randn(7, 50, generator=generator)
    ids = torch.randint(0, 50, (7,), generator=generator)
    groups = [([i], [i]) for i in range(7)]
    stats = group_stats(t_logits.log_softmax(-1), ids, s_logits.log_softmax(-1), ids, groups, torch.arange(50))
    plain = decompose(t_logits[None], s_logits[None], ids[None])
    for ours, theirs in (("unc", "unc"), ("tkd", "tkd"), ("kl_matched", "kl"), ("dkd_matched", "dkd"),
                         ("t_logp", "t_logp"), ("s_logp", "s_logp")):
        torch.testing.assert_close(getattr(stats, ours), getattr(plain, theirs)[0], rtol=1e-5, atol=1e-6)
    assert stats.t_unmatched.abs().max() < 1e-6 and stats.s_unmatched.abs().max() < 1e-6


def test_the_teachers_u_of_a_one_to_one_group_is_one_minus_p_from_a_plain_forward(zoo_pair):
    alignment = align_text(zoo_pair.t_tok, zoo_pair.s_tok, TEXT)
    t_ids, s_ids = torch.tensor(alignment.teacher.ids), torch.tensor(alignment.student.ids)
    t_logits, t_rows = text_rows(zoo_pair.teacher, zoo_pair.t_tok, alignment.teacher.ids)
    _, s_rows = text_rows(zoo_pair.student, zoo_pair.s_tok, alignment.student.ids)
    match = match_vocabularies(zoo_pair.t_tok, zoo_pair.s_tok)
    stats = group_stats(t_rows, t_ids, s_rows, s_ids, alignment.groups, match.student_of_teacher)
    start = len(t_logits) - len(t_ids)  # the text's first token
    plain = decompose(t_logits[None, :-1], t_logits[None, :-1], torch.tensor([zoo_pair.t_tok(
        PROMPT, add_special_tokens=False)["input_ids"] + alignment.teacher.ids])[:, 1:])
    same = [i for i, g in enumerate(alignment.groups) if g.kind == "same"]
    assert len(same) >= 5 and len(same) < len(alignment.groups)  # the text also has merged groups
    positions = [alignment.groups[i].teacher[0] + start - 1 for i in same]
    torch.testing.assert_close(stats.unc[same], plain.unc[0, positions].double(), rtol=1e-5, atol=1e-7)
    for i, group in enumerate(alignment.groups):  # a merged group's probability is the product of its tokens'
        expected = sum(token_log_probs(t_rows, t_ids)[group.teacher])
        torch.testing.assert_close(stats.t_logp[i], expected)
    kinds = [g.kind for g in alignment.groups]
    assert all(torch.isnan(stats.kl_matched[i]) == (kind not in ("same", "different")) for i, kind in enumerate(kinds))
    assert (stats.t_unmatched[same] > 0).all() and (stats.t_unmatched[same] < 1).all()
    torch.testing.assert_close(stats.tkd, binary_kl(stats.t_logp, stats.s_logp))
    assert not torch.isnan(stats.uld).any() and (stats.uld >= 0).all() and (stats.uld <= 2).all()


def test_the_unmatched_mass_is_what_the_matched_ids_leave(zoo_pair):
    match = match_vocabularies(zoo_pair.t_tok, zoo_pair.s_tok)
    generator = torch.Generator().manual_seed(1)
    t_rows, s_rows = random_rows(generator, 1, 49152), random_rows(generator, 1, 8192)
    t_id, s_id = match.teacher_ids[100:101], match.student_ids[100:101]
    stats = group_stats(t_rows, t_id, s_rows, s_id, [([0], [0])], match.student_of_teacher)
    torch.testing.assert_close(stats.t_unmatched, 1 - t_rows[0, match.teacher_ids].exp().sum()[None])
    torch.testing.assert_close(stats.s_unmatched, 1 - s_rows[0, match.student_ids].exp().sum()[None])
    p = t_rows[0, match.teacher_ids].softmax(-1)  # the matched vocabulary, renormalised
    q = s_rows[0, match.student_ids].softmax(-1)
    torch.testing.assert_close(stats.kl_matched, (p * (p / q).log()).sum()[None], rtol=1e-4, atol=1e-6)


def trl_uld(merge: str, t_logits, s_logits, t_ids, s_ids, t_offsets, s_offsets, prompt: int, content: int):
    """TRL's ULDLoss (GOLDConfig defaults but the merge) on one sample: prompt tokens, then the answer, then EOS."""
    config = GOLDConfig(output_dir="unused", use_uld_loss=True, uld_token_merge_strategy=merge, report_to=[],
                        bf16=False)
    loss = ULDLoss(config)
    inputs = []
    for logits, ids, offsets in ((s_logits, s_ids, s_offsets), (t_logits, t_ids, t_offsets)):
        full = torch.cat([torch.zeros(prompt, dtype=torch.long), ids, torch.zeros(1, dtype=torch.long)])
        labels = torch.cat([torch.full((prompt,), -100), ids, torch.zeros(1, dtype=torch.long)])
        spans = torch.tensor([[0, 0]] * prompt + offsets + [[content, content]])
        inputs.append((logits[None], labels[None], full[None], spans[None]))
    (s_l, s_lab, s_in, s_off), (t_l, t_lab, t_in, t_off) = inputs
    return loss(s_l, t_l, s_lab, t_lab, s_in, t_in, student_byte_offsets=s_off, teacher_byte_offsets=t_off)


@pytest.mark.parametrize("merge", ["bayesian", "observed"])
def test_uld_equals_trls_uld_loss(zoo_pair, merge):
    """TRL's "bayesian" merge reads the rows that predict each token (as kdviz does); its default, "observed", the
    rows at the tokens' own positions (each predicts the next token): the same sums on those rows."""
    alignment = align_text(zoo_pair.t_tok, zoo_pair.s_tok, TEXT)
    t_ids, s_ids = torch.tensor(alignment.teacher.ids), torch.tensor(alignment.student.ids)
    generator, prompt = torch.Generator().manual_seed(2), 3
    t_logits = torch.randn(prompt + len(t_ids) + 1, 49152, generator=generator) * 2
    s_logits = torch.randn(prompt + len(s_ids) + 1, 8192, generator=generator) * 2
    shift = 1 if merge == "bayesian" else 0
    t_rows = t_logits[prompt - shift : prompt - shift + len(t_ids)].log_softmax(-1)
    s_rows = s_logits[prompt - shift : prompt - shift + len(s_ids)].log_softmax(-1)
    ours = group_stats(t_rows, t_ids, s_rows, s_ids, alignment.groups, torch.full((49152,), -1), merge=merge).uld
    theirs = trl_uld(merge, t_logits, s_logits, t_ids, s_ids, alignment.teacher.offsets, alignment.student.offsets,
                     prompt, len(TEXT.encode()))
    torch.testing.assert_close(ours.mean(), theirs, rtol=1e-5, atol=1e-6)


def test_merged_distributions_hold_the_probability_of_the_groups_prefix():
    generator = torch.Generator().manual_seed(3)
    rows, ids = random_rows(generator, 4, 30), torch.tensor([3, 7, 1, 9])
    token = token_log_probs(rows, ids)
    groups = [[0, 1, 2], [3], []]
    bayes, observed = merged_log_probs(rows, token, groups), merged_log_probs(rows, token, groups, merge="observed")
    torch.testing.assert_close(bayes[0].exp().sum(), (token[0] + token[1]).exp())
    torch.testing.assert_close(observed[0].exp().sum(), (token[1] + token[2]).exp())
    torch.testing.assert_close(bayes[1], rows[3])
    assert (bayes[2] == float("-inf")).all()
    with pytest.raises(ValueError, match="merge must be one of"):
        merged_log_probs(rows, token, groups, merge="first")


def test_log_probs_near_zero_and_one_have_finite_gradients():
    """A token the student all but rules out (p ~ 1e-30) or is sure of: no NaN in the gradient (found by a fine-tune
    of the GPT-2 teacher into the SmolLM2 student, which diverged at its first step)."""
    logits = torch.tensor([[0.0, 80.0, -80.0], [40.0, 0.0, 0.0]], requires_grad=True)
    ids = torch.tensor([2, 0])  # p ~ e^-160 (the others' mass rounds to exactly 1), and p ~ 1 - 2e-17
    token = token_log_probs(logits.log_softmax(-1), ids)
    reference = logits.double().log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(token.double(), reference, rtol=1e-6, atol=1e-6)
    log_p = token.detach().clone().requires_grad_(True)
    (token.sum() + binary_kl(torch.tensor([-1e-3, -5.0]), log_p).sum() + log1mexp(log_p).sum()).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(log_p.grad).all()
    torch.testing.assert_close(log1mexp(torch.tensor([-1e-9, -50.0], dtype=torch.float64)),
                               torch.tensor([math.log(1e-9), -math.exp(-50.0)], dtype=torch.float64), rtol=1e-6, atol=0)
