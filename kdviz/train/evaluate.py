"""Held-out evaluation of a student: loss, top-1 agreement with the teacher, ROUGE-L of greedy continuations."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdviz.data import IGNORE_INDEX, collate, example_key, pad_id
from kdviz.models import model_logits
from kdviz.pair import ModelPair


@dataclass
class EvalResult:
    """Held-out student loss, top-1 agreement with the teacher, ROUGE-L of greedy continuations."""

    loss: float
    agreement: float | None  # None across tokenizers (their ids are not comparable)
    rouge_l: float | None  # None when the data has no prompt/response examples
    tokens: int


def prompt_and_reference(example) -> tuple[list[int], list[int]] | None:
    """Split an instruction example at its first target: (prompt ids, response ids)."""
    targets = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    if not targets or targets[0] == 0:
        return None
    return example.input_ids[: targets[0]], [example.labels[i] for i in targets]


@torch.no_grad()
def rouge_l(student, tokenizer, examples, *, max_new_tokens: int) -> float | None:
    """Mean ROUGE-L F1 of the student's greedy continuations of the prompts against the responses."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    device = next(student.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    for example in examples:
        split = prompt_and_reference(example)
        if split is None:
            continue
        prompt, reference = split
        ids = torch.tensor([prompt], device=device)
        out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max(1, min(max_new_tokens, len(reference))), pad_token_id=pad)
        text = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
        scores.append(scorer.score(tokenizer.decode(reference, skip_special_tokens=True), text)["rougeL"].fmeasure)
    return sum(scores) / len(scores) if scores else None


def evaluate_student(pair: ModelPair, dataset, *, batch_size: int = 8, generate_examples: int = 16,
                     max_new_tokens: int = 48) -> EvalResult:
    """Score the pair's student on held-out examples (the teacher is the reference for agreement, which is None
    when the teacher's ids are not comparable with the student's)."""
    was_training = pair.student.training
    pair.student.eval()
    loss_sum, agree, count, compared = 0.0, 0, 0, True
    for start in range(0, len(dataset), batch_size):
        examples = list(dataset[start : start + batch_size])
        batch = collate(examples, pad_id=pad_id(pair.tokenizer))
        ids, mask = batch.input_ids.to(pair.device), batch.attention_mask.to(pair.device)
        labels = batch.labels[:, 1:].to(pair.device)
        valid = labels != IGNORE_INDEX
        with torch.no_grad():
            student = model_logits(pair.student, ids, mask)[:, :-1, : pair.vocab_size]  # t predicts label t + 1
        teacher_top1 = pair.source.top1(batch, [example_key(ex) for ex in examples])
        loss_sum += float(F.cross_entropy(student[valid].float(), labels[valid], reduction="sum"))
        if teacher_top1 is not None:
            agree += int((student[valid].argmax(-1) == teacher_top1.to(pair.device)).sum())
        compared = compared and teacher_top1 is not None
        count += int(valid.sum())
    examples = list(dataset)[:generate_examples]
    score = rouge_l(pair.student, pair.tokenizer, examples, max_new_tokens=max_new_tokens) if examples else None
    pair.student.train(was_training)
    return EvalResult(loss_sum / max(1, count), agree / max(1, count) if compared else None, score, count)


