"""Losses across tokenizers equal TRL's ULDLoss (GOLDConfig defaults) on the same logits: ULD and GOLD's hybrid,
values and gradients, on the zoo's two tokenizers (SmolLM2's 49,152 tokens teaching the zoo GPT-2's 8,192)."""

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gold.gold_config import GOLDConfig  # noqa: E402
from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402

from kdviz.align import align_text, match_vocabularies  # noqa: E402
from kdviz.maths.crossloss import LossAcross, generalized_jsd, group_losses, text_means  # noqa: E402
from kdviz.models import load_tokenizer  # noqa: E402

TEXTS = ["    total = 1234 + len(items)  # café\n    return total\n", "x = f(a, b)\n"]
PROMPT = 3  # prompt tokens before each answer (their labels are -100)


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer("zoo:smollm2-student"), load_tokenizer("zoo:student")


def trl_batch(alignments, side: str, vocab: int, generator):
    """TRL's inputs for one side: logits [B, L, V], labels, ids and byte offsets of prompt + answer + EOS, right
    padded; the answers' tokens are those of `alignments`."""
    width = PROMPT + max(len(getattr(a, side).ids) for a in alignments) + 1
    logits = (torch.randn(len(alignments), width, vocab, generator=generator) * 2).requires_grad_()
    labels = torch.full((len(alignments), width), -100)
    ids, offsets = torch.zeros_like(labels), torch.zeros(len(alignments), width, 2, dtype=torch.long)
    for b, alignment in enumerate(alignments):
        tokens, size = getattr(alignment, side), len(alignment.text.encode())
        n = len(tokens.ids)
        ids[b, PROMPT : PROMPT + n + 1] = labels[b, PROMPT : PROMPT + n + 1] = torch.tensor(tokens.ids + [0])
        offsets[b, PROMPT : PROMPT + n + 1] = torch.tensor(tokens.offsets + [(size, size)])
    return logits, labels, ids, offsets


@pytest.mark.parametrize("objective", ["uld", "gold"])
def test_losses_equal_trls_uld_loss_values_and_gradients(tokenizers, objective):
    teacher_tok, student_tok = tokenizers
    alignments = [align_text(teacher_tok, student_tok, text) for text in TEXTS]
    generator = torch.Generator().manual_seed(0)
    t_logits, t_labels, t_ids, t_offsets = trl_batch(alignments, "teacher", len(teacher_tok), generator)
    s_logits, s_labels, s_ids, s_offsets = trl_batch(alignments, "student", len(student_tok), generator)
    config = GOLDConfig(output_dir="unused", use_uld_loss=True, uld_use_hybrid_loss=objective == "gold",
                        report_to=[], bf16=False)
    trl_loss = ULDLoss(config, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
    theirs = trl_loss(s_logits, t_logits, s_labels, t_labels, s_ids, t_ids, student_byte_offsets=s_offsets,
                      teacher_byte_offsets=t_offsets)
    their_grads = torch.autograd.grad(theirs, [s_logits, t_logits])

    match = match_vocabularies(teacher_tok, student_tok)
    per_text = []
    for b, alignment in enumerate(alignments):  # "observed": the logits at each token's own position
        n_t, n_s = len(alignment.teacher.ids), len(alignment.student.ids)
        per_text.append(group_losses(t_logits[b, PROMPT : PROMPT + n_t], torch.tensor(alignment.teacher.ids),
                                     s_logits[b, PROMPT : PROMPT + n_s], torch.tensor(alignment.student.ids),
                                     alignment.groups, loss=LossAcross(objective),
                                     student_of_teacher=match.student_of_teacher))
    ours = text_means(per_text).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for mine, trls in zip(torch.autograd.grad(ours, [s_logits, t_logits]), their_grads):
        torch.testing.assert_close(mine, trls, rtol=1e-4, atol=1e-8)


def test_generalized_jsd_ends_are_the_two_kls():
    generator = torch.Generator().manual_seed(1)
    log_p, log_q = (torch.randn(3, 7, generator=generator).log_softmax(-1) for _ in range(2))
    kl = lambda a, b: (a.exp() * (a - b)).sum(-1)  # noqa: E731
    torch.testing.assert_close(generalized_jsd(log_p, log_q, 0.0), kl(log_p, log_q))
    torch.testing.assert_close(generalized_jsd(log_p, log_q, 1.0), kl(log_q, log_p))
    assert (generalized_jsd(log_p, log_q, 0.5) <= torch.log(torch.tensor(2.0)) + 1e-6).all()


def test_bad_options():
    with pytest.raises(ValueError, match="objective must be one of"):
        LossAcross("fkl")
    with pytest.raises(ValueError, match="beta .* must be in"):
        LossAcross("gold", beta=2.0)
    with pytest.raises(ValueError, match="give student_of_teacher"):
        group_losses(torch.zeros(1, 4), torch.tensor([0]), torch.zeros(1, 4), torch.tensor([0]), [([0], [0])],
                     loss=LossAcross("gold"))
