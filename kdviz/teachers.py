"""The teacher's side of every computation, behind one interface with two kinds: a live model, a top-k cache.

Analysis (`kdviz.analyze`), evaluation and training (`kdviz.train`) ask a `Teacher` for what they
need and never ask which kind it is:

- `table_rows(example)` and `analysis_targets(batch)`: which positions get a row (a live teacher
  scores every position; a cache holds the target tokens only);
- `decompose(student, batch, keys, ...)`: the per-token statistics against a student;
- `top1(batch, keys)`: the teacher's top choice at each target (agreement at evaluation), or None
  where the teacher's ids cannot be compared with the student's (`kdviz.train.aligned`);
- `prepare(...)` and `loss(...)`: one training micro-batch, teacher side first (no gradient),
  then the student's loss against it.

A live teacher gives exact values. A cached one gives u, TKD and the student's side exactly and
DKD, KL and their gradients over the buckets [target, top-k, tail] (lower bounds, exact when k
covers the vocabulary; see `kdviz.maths.topk`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch
from torch import Tensor, nn

from kdviz.cache.format import TeacherCache
from kdviz.data import IGNORE_INDEX, Batch, Example, TokenDataset, target_positions
from kdviz.files import warn
from kdviz.losses import KDLoss, LossParts, TokenSplit
from kdviz.maths.crossloss import GroupTeacher
from kdviz.maths.decomposition import TokenStats, decompose, decompose_hidden, decompose_topk
from kdviz.maths.topk import TopKRows
from kdviz.models import context_length, final_hidden, fingerprint, head_is_linear, last_hidden, model_logits, \
    output_head, tokenizer_fingerprint


@dataclass
class TeacherSide:
    """The teacher's side of one training micro-batch, computed without gradients before the student's pass."""

    unc: Tensor  # [N] teacher uncertainty of the targets, in row-major order
    hidden: Tensor | None = None  # [B, T-1, H_t] final hidden states (a live teacher on the fused-linear path)
    rows: TopKRows | None = None  # the targets' top-k rows (a cached teacher)
    merged: Tensor | None = None  # [P, V_t] merged log-probs of the aligned groups (a teacher across tokenizers)
    groups: GroupTeacher | None = None  # the aligned groups' p(text) and matched rows (cross-atkd)


class Teacher(Protocol):
    """What the pipeline asks of a teacher (see the module doc); `LiveTeacher` and `CachedTeacher` implement it."""

    name: str
    vocab_size: int
    top_k: int | None  # None: full distributions; k: a top-k cache
    module: nn.Module | None  # the live model, when there is one

    @property
    def fingerprint(self) -> str: ...

    @property
    def context(self) -> int | None: ...

    def check_data(self, dataset: TokenDataset, tokenizer, *, temperature: float) -> None: ...

    def recorded(self) -> dict: ...

    def linear_with(self, student: nn.Module) -> bool: ...

    def table_rows(self, example: Example) -> int: ...

    def analysis_targets(self, batch: Batch) -> Tensor: ...

    def decompose(self, student: nn.Module, batch: Batch, keys: list[int], *, linear: bool, temperature: float,
                  top_k: int) -> TokenStats: ...

    def top1(self, batch: Batch, keys: list[int]) -> Tensor | None: ...

    def prepare(self, kd: KDLoss, batch: dict, *, linear: bool) -> TeacherSide: ...

    def loss(self, kd: KDLoss, student: nn.Module, side: TeacherSide, batch: dict, *, linear: bool,
             ce_weight: float, num_items: int, split: TokenSplit | None) -> LossParts: ...


def _device_batch(batch: Batch, device) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels of the predicted positions [B, L-1]) on `device`."""
    return batch.input_ids.to(device), batch.attention_mask.to(device), batch.labels[:, 1:].to(device)


def _probe(vocab_size: int, device) -> Tensor:
    return torch.arange(min(8, vocab_size), device=device)[None]


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def student_head(student: nn.Module, vocab_size: int) -> tuple[Tensor, Tensor | None]:
    """The (unwrapped) student's LM head cut to the shared vocabulary."""
    return output_head(getattr(student, "module", student), vocab_size)


class LiveTeacher:
    """A teacher model run on every batch: exact values on every position."""

    top_k = None

    def __init__(self, module: nn.Module, *, vocab_size: int, name: str = ""):
        self.module, self.vocab_size = module, vocab_size
        self.name = name or getattr(module.config, "name_or_path", "") or "teacher"

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.module)

    @property
    def context(self) -> int | None:
        return context_length(self.module)

    def check_data(self, dataset: TokenDataset, tokenizer, *, temperature: float) -> None:
        """A live teacher scores any data."""

    def recorded(self) -> dict:
        """What a run's metrics.json records about the teacher besides its name."""
        return {}

    def linear_with(self, student: nn.Module) -> bool:
        """Whether both models' logits are a plain linear map of their last hidden state (the fused paths)."""
        probe = _probe(self.vocab_size, _device(student))
        return all(head_is_linear(m, probe, last_hidden) for m in (self.module, student))

    def table_rows(self, example: Example) -> int:
        return len(example.input_ids) - 1

    def analysis_targets(self, batch: Batch) -> Tensor:
        real = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).bool()  # (B, L-1)
        return torch.where(real, batch.input_ids[:, 1:], IGNORE_INDEX)

    @torch.inference_mode()
    def decompose(self, student: nn.Module, batch: Batch, keys: list[int], *, linear: bool, temperature: float,
                  top_k: int) -> TokenStats:
        device = _device(student)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        targets = self.analysis_targets(batch).to(device)
        options = dict(temperature=temperature, top_k=top_k)
        if linear:  # logits are made chunk by chunk inside decompose: no [B, L, V] tensor
            (t_head, t_bias), (s_head, s_bias) = (output_head(m, self.vocab_size) for m in (self.module, student))
            t_hidden, s_hidden = last_hidden(self.module, ids, mask), last_hidden(student, ids, mask)
            return decompose_hidden(t_hidden[:, :-1], t_head, s_hidden[:, :-1], s_head, targets,
                                    teacher_bias=t_bias, student_bias=s_bias, **options)
        teacher = model_logits(self.module, ids, mask)[:, :-1, : self.vocab_size]  # soft-capped or scaled heads
        return decompose(teacher, model_logits(student, ids, mask)[:, :-1, : self.vocab_size], targets, **options)

    @torch.inference_mode()
    def top1(self, batch: Batch, keys: list[int]) -> Tensor:
        ids, mask, labels = _device_batch(batch, _device(self.module))
        logits = model_logits(self.module, ids, mask)[:, :-1, : self.vocab_size]
        return logits[labels != IGNORE_INDEX].argmax(-1)

    def hidden(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Final hidden states [B, T-1, H] of the positions that predict (position t predicts label t + 1)."""
        return final_hidden(self.module, ids, mask)[:, :-1]

    @torch.no_grad()
    def prepare(self, kd: KDLoss, batch: dict, *, linear: bool) -> TeacherSide:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        if linear:
            hidden = self.hidden(ids, mask)
            head, bias = output_head(self.module, self.vocab_size)
            return TeacherSide(kd.uncertainty(hidden, labels, teacher_head=head, teacher_bias=bias), hidden=hidden)
        logits = model_logits(self.module, ids, mask)[:, :-1, : self.vocab_size]  # not kept: [B, T, V] per batch
        return TeacherSide(kd.uncertainty(logits, labels))

    def loss(self, kd: KDLoss, student: nn.Module, side: TeacherSide, batch: dict, *, linear: bool,
             ce_weight: float, num_items: int, split: TokenSplit | None) -> LossParts:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        options = dict(ce_weight=ce_weight, num_items=num_items, split=split, teacher_unc=side.unc)
        if linear:
            t_head, t_bias = output_head(self.module, self.vocab_size)
            s_head, s_bias = student_head(student, self.vocab_size)
            s_hidden = final_hidden(student, ids, mask)[:, :-1]
            return kd.linear(s_hidden, s_head, side.hidden, t_head, labels, student_bias=s_bias, teacher_bias=t_bias,
                             **options)
        with torch.no_grad():
            t_logits = model_logits(self.module, ids, mask)[:, :-1, : self.vocab_size]
        s_logits = model_logits(student, ids, mask)[:, :-1, : self.vocab_size]  # position t predicts t + 1
        return kd.parts(s_logits, t_logits, labels, **options)


class CachedTeacher:
    """A teacher read from a top-k cache (`kdviz teacher-cache`): rows for the target tokens only."""

    module = None

    def __init__(self, cache: TeacherCache):
        self.cache = cache
        self.vocab_size = cache.meta["vocab_size"]
        self.top_k = cache.top_k
        self.name = f"{cache.meta['teacher']} (top-{cache.top_k} cache {cache.folder})"
        for caveat in cache.caveats:  # (a cache made from imported log-probs may hold bounds, not values)
            warn(f"The teacher cache {cache.folder}: {caveat}.")

    @property
    def fingerprint(self) -> str:
        return f"{self.cache.meta['teacher_fingerprint']}-top{self.cache.top_k}"

    @property
    def context(self) -> int | None:
        """The context the cache's data was tokenized for."""
        return self.cache.meta["max_length"]

    def check_tokenizer(self, tokenizer, student_name: str) -> None:
        if self.cache.meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"The student {student_name} has another tokenizer than the teacher of the cache "
                             f"{self.cache.folder}; token-level KD needs one shared tokenizer.")

    def check_data(self, dataset: TokenDataset, tokenizer, *, temperature: float) -> None:
        self.cache.check(dataset, tokenizer, temperature=temperature)

    def recorded(self) -> dict:
        return {"teacher_cache": str(self.cache.folder), "cache_top_k": self.top_k, "cache_encoding": self.cache.encoding,
                **({"cache_caveats": self.cache.caveats} if self.cache.caveats else {})}

    def linear_with(self, student: nn.Module) -> bool:
        return head_is_linear(student, _probe(self.vocab_size, _device(student)), last_hidden)

    def table_rows(self, example: Example) -> int:
        return len(target_positions(example))

    def analysis_targets(self, batch: Batch) -> Tensor:
        return torch.where(batch.labels[:, 1:] != IGNORE_INDEX, batch.input_ids[:, 1:], IGNORE_INDEX)

    @torch.inference_mode()
    def decompose(self, student: nn.Module, batch: Batch, keys: list[int], *, linear: bool, temperature: float,
                  top_k: int) -> TokenStats:
        device = _device(student)
        s_hidden = last_hidden(student, batch.input_ids.to(device), batch.attention_mask.to(device))
        head, bias = output_head(student, self.vocab_size)
        return decompose_topk(self.cache.rows_for_keys(keys), s_hidden[:, :-1], head,
                              self.analysis_targets(batch).to(device), student_bias=bias, temperature=temperature,
                              top_k=top_k)

    def top1(self, batch: Batch, keys: list[int]) -> Tensor:
        return self.cache.rows_for_keys(keys).ids[:, 0]

    def prepare(self, kd: KDLoss, batch: dict, *, linear: bool) -> TeacherSide:
        rows = self.cache.rows_for_keys(batch["cache_key"].tolist()).to(batch["input_ids"].device)
        return TeacherSide(rows.uncertainty(), rows=rows)

    def loss(self, kd: KDLoss, student: nn.Module, side: TeacherSide, batch: dict, *, linear: bool,
             ce_weight: float, num_items: int, split: TokenSplit | None) -> LossParts:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        s_hidden = final_hidden(student, ids, mask)[:, :-1]  # position t predicts label t + 1
        s_head, s_bias = student_head(student, self.vocab_size)
        return kd.linear_cached(s_hidden, s_head, side.rows, labels, ce_weight=ce_weight, student_bias=s_bias,
                                num_items=num_items, split=split)
