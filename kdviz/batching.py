"""How work over a dataset is cut: batches of similar length to a token budget, and parts to write as they finish.

>>> length_batches([5, 100, 6, 90], batch_size=8, batch_tokens=1000)
[[1, 3], [2, 0]]
>>> [(p.start, p.end) for p in plan_parts([5, 100, 6, 90], part_tokens=100)]
[(0, 2), (2, 4)]
"""

from __future__ import annotations

from dataclasses import dataclass


def length_batches(lengths: list[int], *, batch_size: int, batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length: at most `batch_size` sequences and `batch_tokens`
    padded tokens each (a longer sequence goes alone), none shorter than half the batch's longest (so
    padding at most doubles the work). Longest first, ties in data order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        longest = lengths[batches[-1][0]] if batches else 0
        if (batches and len(batches[-1]) < batch_size and longest * (len(batches[-1]) + 1) <= batch_tokens
                and 2 * lengths[i] >= longest):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@dataclass(frozen=True)
class Part:
    """A contiguous range [start, end) of examples: computed, written and resumed as one file."""

    start: int
    end: int
    rows: int  # rows of output it gives (e.g. predicted tokens)

    @property
    def name(self) -> str:
        return f"part-{self.start:010d}-{self.end:010d}.parquet"


def plan_parts(lengths: list[int], part_tokens: int, rows_per_example: list[int] | None = None) -> list[Part]:
    """Cut the examples (in data order) into parts of about `part_tokens` tokens (at least one example each).

    `rows_per_example`: rows each example gives (default: one per position after the first)."""
    rows_per_example = rows_per_example or [length - 1 for length in lengths]
    parts, start, tokens, rows = [], 0, 0, 0
    for i, length in enumerate(lengths):
        tokens, rows = tokens + length, rows + rows_per_example[i]
        if tokens >= part_tokens or i == len(lengths) - 1:
            parts.append(Part(start, i + 1, rows))
            start, tokens, rows = i + 1, 0, 0
    return parts
