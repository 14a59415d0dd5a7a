"""On-policy distillation (GKD's semantics): responses written by the student, or by the teacher (sequence KD).

Once per optimizer step, `Rollouts.rewrite` decides from the run's seed and the step number alone whether the
step is on-policy (probability `on_policy`, GKD's lambda; 1.0 = every step). If it is, every micro-batch's
prompts are continued by the student as it is at that step; otherwise, with `seq_kd`, by the teacher; otherwise
the data's responses are kept. The generated tokens become the targets, and the teacher scores them as usual.

Each (prompt, step) draws from its own generator, seeded from the run's seed, the step and the prompt's ids
(`kdviz.generation`), so a step writes the same responses whatever the processes, batch size or accumulation,
and a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import xxhash

from kdviz.data import IGNORE_INDEX, Example, TokenDataset, stop_ids
from kdviz.generation import Sampling, answered, generate_responses, prompt_of


@dataclass
class StepRollouts:
    """What one optimizer step's generation did (logged)."""

    writer: str  # "student", "teacher" or "data"
    seconds: float
    responses: int
    response_tokens: int


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of optimizer step `step` (the same on every process)."""
    return xxhash.xxh64(f"kdviz-rollout-{seed}-{step}".encode()).intdigest() >> 33


def step_writer(seed: int, step: int, on_policy: float, seq_kd: bool) -> str:
    """Who writes step `step`'s responses: the student with probability `on_policy`, else the teacher under
    sequence KD, else the data (a draw from the seed and the step, the same on every process)."""
    draw = torch.rand(1, generator=torch.Generator().manual_seed(step_seed(seed, step) ^ 0x5EED)).item()
    if draw < on_policy:
        return "student"
    return "teacher" if seq_kd else "data"


def examples_of(batch: dict) -> list[Example]:
    """The examples of a right-padded batch dict (input_ids, attention_mask, labels)."""
    lengths = batch["attention_mask"].sum(1).tolist()
    return [Example(ids[:n].tolist(), labels[:n].tolist(), "")
            for ids, labels, n in zip(batch["input_ids"], batch["labels"], lengths)]


class Rollouts:
    """Rewrites each optimizer step's micro-batches with generated responses (see the module doc)."""

    def __init__(self, *, on_policy: float, seq_kd: bool, sampling: Sampling, tokenizer, template: str | None,
                 context: int | None, pad: int):
        self.on_policy, self.seq_kd, self.sampling, self.context, self.pad = on_policy, seq_kd, sampling, context, pad
        self.stop = stop_ids(tokenizer, template or "plain")
        self.history: list[StepRollouts] = []

    @property
    def active(self) -> bool:
        return self.on_policy > 0 or self.seq_kd

    def rewrite(self, batches: list[dict], *, step: int, seed: int, student, teacher, collate) -> list[dict]:
        """The step's micro-batches with their responses written by the student or the teacher (or as they are)."""
        writer = step_writer(seed, step, self.on_policy, self.seq_kd)
        if writer == "data":
            self.history.append(StepRollouts("data", 0.0, 0, 0))
            return batches
        model = student if writer == "student" else teacher
        settings = replace(self.sampling, seed=step_seed(seed, step))
        started, written, tokens = time.perf_counter(), 0, 0
        out = []
        for batch in batches:
            examples = examples_of(batch)
            prompts = [prompt_of(ex) for ex in examples]
            responses = generate_responses(model, prompts, settings, stop_ids=self.stop, pad_id=self.pad,
                                           context=self.context)
            new = [answered(p, r[0], "", origin=writer) if r[0] else ex
                   for ex, p, r in zip(examples, prompts, responses)]  # no room left: the data's response
            written += sum(1 for r in responses if r[0])
            tokens += sum(len(r[0]) for r in responses)
            out.append({key: value.to(batch["input_ids"].device) for key, value in collate(new).items()})
        self.history.append(StepRollouts(writer, time.perf_counter() - started, written, tokens))
        return out

    def summary(self) -> dict:
        """Steps by writer, generation seconds and the mean response length (for metrics.json)."""
        generated = [h for h in self.history if h.writer != "data"]
        responses = sum(h.responses for h in generated)
        return {"steps_by_writer": {w: sum(h.writer == w for h in self.history) for w in ("student", "teacher", "data")},
                "generation_seconds": sum(h.seconds for h in generated),
                "mean_response_tokens": sum(h.response_tokens for h in generated) / responses if responses else None}


def writes_every_step(on_policy: float, seq_kd: bool) -> bool:
    """Whether every step's responses are generated (so the data may hold prompts only): the student always
    (on_policy 1), or the teacher whenever the student does not (sequence KD)."""
    return on_policy >= 1.0 or seq_kd


def teacher_references(teacher, dataset: TokenDataset, *, tokenizer, context: int | None, max_new_tokens: int,
                       pad: int) -> tuple[TokenDataset, int]:
    """(`dataset` where each prompt without a response has the teacher's greedy response as its targets, how many
    were written): the held-out references of prompt-only data, so that the held-out loss, agreement, ROUGE-L and
    probes have targets. Greedy decoding makes them the same on every process and on resume."""
    missing = [i for i, example in enumerate(dataset) if all(label == IGNORE_INDEX for label in example.labels)]
    if not missing or teacher is None:  # (a teacher cache is refused with on-policy training, with its reason)
        return dataset, 0
    responses = generate_responses(teacher, [dataset[i].input_ids for i in missing],
                                   Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
                                   stop_ids=stop_ids(tokenizer, dataset.template or "plain"), pad_id=pad,
                                   context=context)
    examples = list(dataset)
    for i, (response,) in zip(missing, responses):
        examples[i] = answered(examples[i].input_ids, response, examples[i].source, origin="teacher")
    return TokenDataset(examples, f"{dataset.description}, {len(missing)} references written by the teacher (greedy)",
                        template=dataset.template), len(missing)
