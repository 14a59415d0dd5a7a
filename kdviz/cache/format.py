"""The teacher top-k cache on disk: its arrays and meta.json, opened and checked, rows read by example.

Per target token the cache holds the teacher's top-k token ids and log-probabilities, the
log-probability of the target (also when it is not in the top-k) and the log-probability of
the tail (everything else), with the fingerprints of the teacher (every weight), the tokenizer, the data and
the template. Arrays are .npy files read memory-mapped; at k=64 with a vocabulary under
65,536 a token costs 2*64 (ids) + 4*64 (log-probs) + 4 + 4 = 392 bytes.

What is exact from a cache, what is not: u = 1 - p_y and TKD are exact at any k.
DKD and KL see the teacher's top-k entries and one tail bucket holding the rest of the
non-target mass, on both sides: p_tail summed by the teacher in log space when the cache is
made (where the tail needs it: 1 - p_y - sum(top-k p) cancels to 0 in float32 for a confident
teacher, which would make reverse KL infinite), q_tail from the live student. By the log-sum inequality the bucketed KL (and DKD) is a lower bound
of the true one, equal to it when k covers the vocabulary. A loss on the bucketed
distributions sends the tail bucket's gradient to the tail entries in proportion to q.

>>> import torch
>>> log_q = torch.log_softmax(torch.randn(2, 10), -1)
>>> log_p = torch.log_softmax(torch.randn(2, 10), -1)
>>> y = torch.tensor([3, 7])
>>> from kdviz.losses import TopKRows, bucketed
>>> p_b, q_b = bucketed(log_q, TopKRows.from_log_probs(log_p, y, k=10), y)
>>> kl = (p_b.exp() * (p_b - q_b)).nan_to_num().sum(-1)
>>> bool(torch.allclose(kl, (log_p.exp() * (log_p - log_q)).sum(-1), atol=1e-5))  # k = V: exact
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdviz.data import TokenDataset, example_key
from kdviz.files import changed_file, expand, seal_problem
from kdviz.maths.topk import TopKRows
from kdviz.models.hashing import tokenizer_fingerprint

PER_TOKEN = ("ids", "logprobs", "target_logp", "tail_logp")
ARRAYS = (*PER_TOKEN, "offsets", "keys")
FORMAT = 2  # 2: the tail's log-probability instead of the log-sum-exp


META_KEYS = {"teacher", "teacher_fingerprint", "tokenizer", "data", "data_description", "template", "examples",
             "tokens", "top_k", "temperature", "vocab_size", "max_length"}
SAMPLE_ROWS = 4096  # rows whose values `TeacherCache.open` checks


def _array_problem(arrays: dict, meta: dict) -> str | None:
    """What is wrong with a cache's arrays against its meta.json (shapes, types, a sample of values), or None."""
    tokens, k, examples = meta["tokens"], meta["top_k"], meta["examples"]
    expected = {"ids": (tokens, k), "logprobs": (tokens, k), "target_logp": (tokens,), "tail_logp": (tokens,),
                "offsets": (examples + 1,), "keys": (examples,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            return (f"{name}.npy has shape {arrays[name].shape}, but meta.json says {tokens} target tokens of "
                    f"{examples} examples at top_k={k} (shape {shape})")
    kinds = {"ids": "iu", "logprobs": "f", "target_logp": "f", "tail_logp": "f", "offsets": "iu", "keys": "iu"}
    for name, kind in kinds.items():
        if arrays[name].dtype.kind not in kind:
            return f"{name}.npy holds {arrays[name].dtype} values, not {'integers' if kind == 'iu' else 'floats'}"
    if tokens and int(arrays["offsets"][-1]) != tokens:
        return f"offsets.npy ends at {int(arrays['offsets'][-1])}, not at the {tokens} target tokens"
    rows = np.unique(np.linspace(0, max(tokens - 1, 0), min(tokens, SAMPLE_ROWS)).astype(np.int64))
    ids, logprobs = np.asarray(arrays["ids"][rows]), np.asarray(arrays["logprobs"][rows])
    if ids.size and (ids.min() < 0 or ids.max() >= meta["vocab_size"]):
        return f"ids.npy holds token ids outside the vocabulary of {meta['vocab_size']}"
    for name, values in (("logprobs", logprobs), ("target_logp", np.asarray(arrays["target_logp"][rows])),
                         ("tail_logp", np.asarray(arrays["tail_logp"][rows]))):
        if np.isnan(values).any() or (values > 1e-3).any():
            return f"{name}.npy holds values that are not log-probabilities (NaN or above 0)"
    if logprobs.size and (np.diff(logprobs, axis=1) > 1e-6).any():
        return "logprobs.npy rows are not the top-k in order (largest first)"
    return None


@dataclass
class TeacherCache:
    """A cache folder opened for reading (arrays memory-mapped)."""

    folder: Path
    meta: dict
    arrays: dict

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "TeacherCache":
        folder = expand(folder)
        if not (folder / "meta.json").is_file():
            raise ValueError(f"{folder} is not a teacher cache (no meta.json); make one with `kdviz teacher-cache "
                             "--teacher T --data D --out DIR`.")
        sealed = seal_problem(folder / "meta.json")
        if sealed:
            raise ValueError(f"The teacher cache {folder} is damaged: {sealed}. Make it again with `kdviz teacher-cache`.")
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"The teacher cache's {folder / 'meta.json'} cannot be read ({err}); the cache is "
                             "damaged: make it again with `kdviz teacher-cache`.") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"The teacher cache {folder} has format {found}, this kdviz reads format "
                             f"{FORMAT}; make it again with `kdviz teacher-cache`.")
        missing = sorted(META_KEYS - set(meta))
        if missing:
            raise ValueError(f"The teacher cache's {folder / 'meta.json'} lacks {', '.join(missing)}: the cache is "
                             "damaged; make it again.")
        try:
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError) as err:
            raise ValueError(f"The teacher cache {folder} is damaged ({err}); make it again.") from None
        # (caches made before kdviz recorded checksums have none: their arrays get only the sampled checks)
        problem = changed_file(folder, meta.get("checksums") or {}, since="the cache was made") or \
            _array_problem(arrays, meta)
        if problem:
            raise ValueError(f"The teacher cache {folder} is damaged: {problem}. Make it again with "
                             "`kdviz teacher-cache`.")
        return cls(folder, meta, arrays)

    @property
    def top_k(self) -> int:
        return self.meta["top_k"]

    @property
    def bytes_per_token(self) -> float:
        return sum(self.arrays[n].nbytes for n in PER_TOKEN) / max(1, len(self.arrays["target_logp"]))

    def check(self, dataset: TokenDataset, tokenizer, *, temperature: float = 1.0) -> None:
        """ValueError saying why this cache does not belong to `dataset` / `tokenizer` / `temperature`."""
        meta = self.meta
        if meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"The teacher cache {self.folder} was made with another tokenizer (fingerprint "
                             f"{meta['tokenizer']}, this one is {tokenizer_fingerprint(tokenizer)}); the student must "
                             "share the teacher's tokenizer. Make the cache with this pair's teacher.")
        if meta["data"] != dataset.fingerprint and not self.holds(dataset):
            template = (f" with template {meta['template']!r} (this data: {dataset.template!r})"
                        if meta["template"] != dataset.template else "")
            raise ValueError(f"The teacher cache {self.folder} holds other data: {meta['examples']} examples of "
                             f"{meta['data_description']!r}{template}; this data is {len(dataset)} examples of "
                             f"{dataset.description!r} (the cache's were tokenized for a context of "
                             f"{meta['max_length']} tokens). Make the cache from the same --data, --template, "
                             "--limit, --max-length and field options.")
        if float(temperature) != meta["temperature"]:
            raise ValueError(f"The teacher cache {self.folder} holds the teacher at temperature {meta['temperature']}, "
                             f"not {temperature}; a top-k cache cannot be re-tempered. Make one at this temperature.")

    def holds(self, examples) -> bool:
        """Whether the cache has rows for every one of `examples` (found by their ids and labels)."""
        index = self._key_index()
        return all(example_key(ex) in index for ex in examples)

    def _key_index(self) -> dict[int, int]:
        if not hasattr(self, "_index"):
            self._index = {int(key): i for i, key in enumerate(self.arrays["keys"])}
        return self._index

    def rows_for(self, examples) -> TopKRows:
        """The cached rows of these `Example`s (found by their ids and labels), concatenated in order."""
        return self.rows_for_keys([example_key(ex) for ex in examples])

    def rows_for_keys(self, keys: list[int]) -> TopKRows:
        """The cached rows of the examples with these `example_key`s, concatenated in order."""
        index = self._key_index()
        missing = [key for key in keys if key not in index]
        if missing:
            raise ValueError(f"The teacher cache {self.folder} has no rows for {len(missing)} example(s) of this "
                             "batch; make the cache from the same data and options.")
        return self.rows([index[key] for key in keys])

    def rows(self, examples: list[int]) -> TopKRows:
        """The cached rows of these examples' target tokens, concatenated in the given order."""
        offsets = self.arrays["offsets"]
        spans = [np.arange(offsets[i], offsets[i + 1]) for i in examples]
        index = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        pick = lambda name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][index]))  # noqa: E731
        return TopKRows(pick("ids").long(), pick("logprobs"), pick("target_logp"), pick("tail_logp"))
