"""Tokenized examples: ids and labels (-100 where a token is not a target), and the context-length rule.

The model's logits at position t predict labels[t + 1]. `usable_context` is the one rule for how
long an example may be: the requested --max-length, never past the models' context.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kdviz.checks import check_count

IGNORE_INDEX = -100
DEFAULT_CONTEXT = 1024  # when neither model's config states a context length


def usable_context(models_context: int | None, requested: int | None = None) -> int:
    """The context examples are tokenized for: `requested` (--max-length) if given, never more than
    `models_context` (the shorter of the models', or DEFAULT_CONTEXT when their configs do not say).
    Every entry point uses this rule, and caches are keyed on its result through the token ids."""
    if requested is not None:
        check_count(requested, "max_length", minimum=2)
    return min(requested or 10**9, models_context or DEFAULT_CONTEXT)


@dataclass(frozen=True)
class Example:
    """One tokenized sequence; `labels[i]` is the target id of position i or -100."""

    input_ids: list[int]
    labels: list[int]
    source: str  # where it came from, e.g. "train.jsonl:12" or "notes.txt#window3"
    origin: str = "data"  # who wrote the response: "data", or "student" / "teacher" (generated)
    sample: int = 0  # which of a prompt's generated samples


@dataclass
class TokenDataset:
    """A list of tokenized examples plus a description of where they came from."""

    examples: list[Example]
    description: str
    template: str | None = None  # the template records were formatted with (None for text)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def __iter__(self):
        return iter(self.examples)

    @property
    def fingerprint(self) -> str:
        """Hash of every example's ids and labels (the cache key for the data)."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(np.asarray(ex.input_ids + [-1] + ex.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    @property
    def n_targets(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in ex.labels) for ex in self.examples)



def target_positions(example: Example) -> list[int]:
    """Positions p whose logits predict a target (labels[p + 1] != -100), in order."""
    return [p for p in range(len(example.labels) - 1) if example.labels[p + 1] != IGNORE_INDEX]


def example_key(example: Example) -> int:
    """A 63-bit hash of an example's ids and labels: finds its rows in a cache whatever the order or subset."""
    import xxhash

    return xxhash.xxh64(np.asarray(example.input_ids + [-1] + example.labels, dtype=np.int64).tobytes()).intdigest() >> 1


def nonempty(examples: list, what: str) -> list:
    if not examples:
        raise ValueError(f"{what} gave no examples (empty input); give at least one non-empty text or record.")
    return examples
