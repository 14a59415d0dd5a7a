"""Padding examples into one batch, on either side."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdviz.data.examples import IGNORE_INDEX, Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 on padding and non-targets
    lengths: list[int]
    offsets: list[int]  # column where each example starts (non-zero with left padding)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 when it has none (padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(examples: list[Example], *, pad_id: int, padding_side: str = "right") -> Batch:
    """Pad examples to one [B, L] batch on the given side."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    offsets = []
    for row, ex in enumerate(examples):
        start = width - len(ex.input_ids) if padding_side == "left" else 0
        span = slice(start, start + len(ex.input_ids))
        ids[row, span] = torch.tensor(ex.input_ids)
        labels[row, span] = torch.tensor(ex.labels)
        mask[row, span] = 1
        offsets.append(start)
    return Batch(ids, mask, labels, [len(ex.input_ids) for ex in examples], offsets)
