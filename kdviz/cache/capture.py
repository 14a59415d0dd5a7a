"""Making a teacher top-k cache: run the teacher once over the data and keep its top-k per target token.

The data is cut into parts of about `part_tokens` target tokens, each scored in batches of similar
length (`length_batches`, at most `batch_tokens` padded tokens) and written as it finishes
(`kdviz.cache.writing`): memory stays O(batch), an interrupted capture resumes from its finished
parts to the same cache, and under torchrun / accelerate launch each rank scores its share.
The teacher's head is applied to the target positions only, in chunks of rows (no [B, T, V] tensor).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from kdviz import distributed
from kdviz.batching import Part, length_batches
from kdviz.cache.encoding import check_encoding, encode
from kdviz.cache.format import TeacherCache
from kdviz.cache.writing import DEFAULT_PART_TOKENS, Capture, run_capture
from kdviz.checks import check_count, check_temperature
from kdviz.data import TokenDataset, collate, example_key, pad_id, target_positions
from kdviz.maths.logspace import logsumexp_rows
from kdviz.maths.topk import TopKRows
from kdviz.models import fingerprint, last_hidden, output_head, tokenizer_fingerprint

CHUNK_ELEMENTS = 1 << 25  # logits per chunk of rows (128 MB of fp32)


def build(teacher, tokenizer, dataset: TokenDataset, out: str | os.PathLike, *, top_k: int = 64,
          temperature: float = 1.0, teacher_name: str = "", max_length: int | None = None, batch_tokens: int = 16384,
          part_tokens: int = DEFAULT_PART_TOKENS, encoding: str = "compact", progress: bool = True) -> TeacherCache:
    """Run `teacher` once over `dataset` and write its top-k cache to the folder `out` (renamed into place when whole).

    `max_length`: the context `dataset` was tokenized for (recorded: a pair reading the cache
    tokenizes its data the same way). `encoding`: "compact" (159 bytes a token at k=64) or "exact"
    (float32, 392 bytes). Parts of about `part_tokens` target tokens are written as they finish; the
    same call after an interruption reuses them. Under torchrun each rank scores its share of the parts."""
    check_count(top_k, "top_k", minimum=1)
    check_count(batch_tokens, "batch_tokens", minimum=1)
    check_count(part_tokens, "part_tokens", minimum=1)
    check_temperature(temperature)
    check_encoding(encoding)
    vocab = len(tokenizer)
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}.")
    device = next(teacher.parameters()).device
    distributed.init(device)
    meta = {"source": "teacher", "encoding": encoding, "teacher": teacher_name, "teacher_fingerprint": fingerprint(teacher),
            "tokenizer": tokenizer_fingerprint(tokenizer), "data": dataset.fingerprint,
            "data_description": dataset.description, "template": dataset.template, "top_k": top_k,
            "temperature": float(temperature), "vocab_size": vocab,
            "max_length": max_length or max(len(ex.input_ids) for ex in dataset)}
    distributed.check_agree({"data": dataset.fingerprint, "teacher": meta["teacher_fingerprint"],
                             "settings": [top_k, float(temperature), encoding, part_tokens]})
    capture = Capture.plan(out, meta, [example_key(ex) for ex in dataset],
                           [len(target_positions(ex)) for ex in dataset], part_tokens=part_tokens)
    scorer = Scorer(teacher, tokenizer, dataset, float(temperature), top_k, encoding, batch_tokens)
    return run_capture(capture, scorer.fill, progress=progress)


class Scorer:
    """Fills a part's arrays with the teacher's rows of its examples' target tokens."""

    def __init__(self, teacher, tokenizer, dataset, temperature, top_k, encoding, batch_tokens):
        self.teacher, self.dataset, self.pad = teacher, dataset, pad_id(tokenizer)
        self.head, self.bias = output_head(teacher, len(tokenizer))
        self.temperature, self.top_k, self.encoding, self.batch_tokens = temperature, top_k, encoding, batch_tokens
        self.chunk = max(1, CHUNK_ELEMENTS // len(tokenizer))

    def fill(self, part: Part, arrays: dict, update) -> None:
        examples = [self.dataset[i] for i in range(part.start, part.end)]
        positions = [target_positions(ex) for ex in examples]
        first = np.concatenate([[0], np.cumsum([len(p) for p in positions])]).astype(np.int64)
        for batch in length_batches([len(ex.input_ids) for ex in examples], batch_size=64,
                                    batch_tokens=self.batch_tokens):
            rows = np.concatenate([np.arange(first[i], first[i + 1]) for i in batch])
            if len(rows):
                self.score(examples, positions, batch, rows, arrays)
            update(len(rows))

    @torch.inference_mode()
    def score(self, examples, positions, batch, rows, arrays) -> None:
        padded = collate([examples[i] for i in batch], pad_id=self.pad)
        device = self.head.device
        hidden = last_hidden(self.teacher, padded.input_ids.to(device), padded.attention_mask.to(device))  # (B, L, H)
        where = [(row, p) for row, i in enumerate(batch) for p in positions[i]]
        batch_index = torch.tensor([row for row, _ in where], device=device)
        position = torch.tensor([p for _, p in where], device=device)
        targets = padded.input_ids.to(device)[batch_index, position + 1]
        for start in range(0, len(where), self.chunk):
            span = slice(start, start + self.chunk)
            logits = torch.nn.functional.linear(hidden[batch_index[span], position[span]], self.head, self.bias)
            top = top_rows(logits.float() / self.temperature, targets[span], self.top_k)
            for name, values in encode(top, targets[span], self.encoding).items():
                arrays[name][rows[span]] = values.cpu().numpy()


def top_rows(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TopKRows:
    """The cache's rows from fp32 logits [N, V] (consumed: overwritten in place): top-k ids and log-probs, the
    target's log-prob and the tail's (everything else, summed in log space)."""
    lse = torch.logsumexp(logits, 1, keepdim=True)
    top = logits.topk(k, dim=1)
    target = logits.gather(1, targets[:, None])
    logits.scatter_(1, top.indices, -math.inf).scatter_(1, targets[:, None], -math.inf)
    tail = logsumexp_rows(logits)
    return TopKRows(top.indices, top.values - lse, (target - lse)[:, 0], tail - lse[:, 0])
