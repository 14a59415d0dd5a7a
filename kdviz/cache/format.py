"""The teacher top-k cache on disk: its parts and meta.json, opened and checked, rows read by example.

Per target token the cache holds the teacher's top-k token ids and log-probabilities, the
log-probability of the target (also when it is not in the top-k) and of the tail (everything
else), in one of two encodings (`kdviz.cache.encoding`): `exact` (float32, 392 bytes a token at
k=64) or `compact` (159 bytes at k=64; u and TKD as exact, DKD and KL about 0.1 % off per token).
meta.json records the fingerprints of the teacher (every weight), the tokenizer, the data and the
template, the parts and every file's checksum; meta.json.xxh3 seals meta.json itself.

Layout (format 3): ``keys.npy`` (one 63-bit key per example, `example_key`), ``offsets.npy`` (each
example's first row; rows are the target tokens in data order) and one folder per part of the
data, ``part-START-END/`` (examples START..END-1), holding its rows' arrays as .npy files read
memory-mapped. Caches of format 2 (kdviz before parts: the same arrays as `exact`, in the folder
itself) are read as one part.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdviz.cache.encoding import decode, layout
from kdviz.data import TokenDataset, example_key
from kdviz.files import changed_file, expand, seal_problem
from kdviz.maths.topk import TopKRows
from kdviz.models.hashing import tokenizer_fingerprint

FORMAT = 3  # 2: one set of arrays (exact); 3: parts, and the compact encoding
READABLE = (2, 3)
INDEX = ("offsets", "keys")

META_KEYS = {"teacher", "teacher_fingerprint", "tokenizer", "data", "data_description", "template", "examples",
             "tokens", "top_k", "temperature", "vocab_size", "max_length"}
SAMPLE_ROWS = 4096  # rows whose values `TeacherCache.open` checks


def part_name(start: int, end: int) -> str:
    """The folder of the part holding examples start..end-1."""
    return f"part-{start:010d}-{end:010d}"


@dataclass
class StoredPart:
    """One part of a cache: examples [start, end), rows [first_row, first_row + rows), its arrays memory-mapped."""

    prefix: str  # its arrays' folder relative to the cache ("" for a format 2 cache)
    start: int
    end: int
    first_row: int
    rows: int
    arrays: dict = field(default_factory=dict)


def cache_parts(meta: dict) -> list[StoredPart]:
    """The parts meta.json lists (one part in the folder itself for format 2), without their arrays."""
    if meta["format"] == 2:
        return [StoredPart("", 0, meta["examples"], 0, meta["tokens"])]
    parts, row = [], 0
    for entry in meta["parts"]:
        parts.append(StoredPart(f"{part_name(entry['start'], entry['end'])}/", entry["start"], entry["end"], row,
                                entry["rows"]))
        row += entry["rows"]
    return parts


def _shape_problem(part: StoredPart, meta: dict, encoding: str) -> str | None:
    k, legacy = meta["top_k"], meta["format"] == 2
    for name, (dtype, shape) in layout(encoding, k, meta["vocab_size"]).items():
        array, expected = part.arrays[name], (part.rows, *shape)
        if array.shape != expected:
            return (f"{part.prefix}{name}.npy has shape {array.shape}, but meta.json says {part.rows} target tokens "
                    f"of examples {part.start}..{part.end - 1} at top_k={k} (shape {expected})")
        if array.dtype != dtype and not (legacy and array.dtype.kind == dtype.kind):
            kind = "integers" if dtype.kind in "iu" else "floats"
            return f"{part.prefix}{name}.npy holds {array.dtype} values, not {kind if legacy else dtype}"
    return None


def _value_problem(part: StoredPart, meta: dict, encoding: str, sample: int) -> str | None:
    """What is wrong with a sample of a part's values (decoded), or None."""
    rows = np.unique(np.linspace(0, max(part.rows - 1, 0), min(part.rows, sample)).astype(np.int64))
    if not len(rows):
        return None
    arrays = {name: np.asarray(array[rows]) for name, array in part.arrays.items()}
    ids = arrays["ids"]
    if ids.min() < 0 or ids.max() >= meta["vocab_size"]:
        return f"{part.prefix}ids.npy holds token ids outside the vocabulary of {meta['vocab_size']}"
    if encoding == "compact":
        if (arrays["target_rank"] > meta["top_k"]).any() or (np.diff(arrays["curve"].astype(int), axis=1) < 0).any():
            return f"{part.prefix}target_rank.npy or curve.npy holds values no capture writes"
    decoded = decode(arrays, encoding, meta["top_k"])
    for name in ("logprobs", "target_logp", "tail_logp"):
        values = getattr(decoded, name)
        if torch.isnan(values).any() or (values > 1e-3).any():
            file = name if encoding == "exact" or name == "target_logp" else "rest_logp, tail_share or curve"
            return f"{part.prefix}{file}.npy holds values that are not log-probabilities (NaN or above 0)"
    if encoding == "exact" and (np.diff(arrays["logprobs"], axis=1) > 1e-6).any():
        return f"{part.prefix}logprobs.npy rows are not the top-k in order (largest first)"
    return None


def _read_meta(folder: Path) -> dict:
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
    if not isinstance(meta, dict) or meta.get("format") not in READABLE:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"The teacher cache {folder} has format {found}, this kdviz reads formats "
                         f"{', '.join(map(str, READABLE))}; make it again with `kdviz teacher-cache`.")
    missing = sorted(META_KEYS - set(meta) | ({"parts", "encoding"} - set(meta) if meta["format"] == 3 else set()))
    if missing:
        raise ValueError(f"The teacher cache's {folder / 'meta.json'} lacks {', '.join(missing)}: the cache is "
                         "damaged; make it again.")
    return meta


@dataclass
class TeacherCache:
    """A cache folder opened for reading (arrays memory-mapped)."""

    folder: Path
    meta: dict
    parts: list[StoredPart]
    offsets: np.ndarray
    keys: np.ndarray

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "TeacherCache":
        folder = expand(folder)
        meta = _read_meta(folder)
        encoding, parts = meta.get("encoding", "exact"), cache_parts(meta)
        try:
            index = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in INDEX}
            for part in parts:
                part.arrays = {name: np.load(folder / f"{part.prefix}{name}.npy", mmap_mode="r")
                               for name in layout(encoding, meta["top_k"], meta["vocab_size"])}
        except (OSError, ValueError) as err:
            raise ValueError(f"The teacher cache {folder} is damaged ({err}); make it again.") from None
        # (caches made before kdviz recorded checksums have none: their arrays get only the sampled checks)
        problem = changed_file(folder, meta.get("checksums") or {}, since="the cache was made") or \
            _index_problem(index, parts, meta)
        for part in parts:
            problem = problem or _shape_problem(part, meta, encoding) or \
                _value_problem(part, meta, encoding, max(16, SAMPLE_ROWS // len(parts)))
        if problem:
            raise ValueError(f"The teacher cache {folder} is damaged: {problem}. Make it again with "
                             "`kdviz teacher-cache`.")
        return cls(folder, meta, parts, index["offsets"], index["keys"])

    @property
    def top_k(self) -> int:
        return self.meta["top_k"]

    @property
    def encoding(self) -> str:
        return self.meta.get("encoding", "exact")

    @property
    def caveats(self) -> list[str]:
        """What is less exact in this cache than in one made by running the teacher (imported log-probs)."""
        return list(self.meta.get("caveats") or [])

    @property
    def bytes_per_token(self) -> float:
        total = sum(array.nbytes for part in self.parts for array in part.arrays.values())
        return total / max(1, self.meta["tokens"])

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
        index = self.key_index()
        return all(example_key(ex) in index for ex in examples)

    def key_index(self) -> dict[int, int]:
        """example_key -> the example's index in the cache."""
        if not hasattr(self, "_index"):
            self._index = {int(key): i for i, key in enumerate(self.keys)}
        return self._index

    def rows_for(self, examples) -> TopKRows:
        """The cached rows of these `Example`s (found by their ids and labels), concatenated in order."""
        return self.rows_for_keys([example_key(ex) for ex in examples])

    def rows_for_keys(self, keys: list[int]) -> TopKRows:
        """The cached rows of the examples with these `example_key`s, concatenated in order."""
        index = self.key_index()
        missing = [key for key in keys if key not in index]
        if missing:
            raise ValueError(f"The teacher cache {self.folder} has no rows for {len(missing)} example(s) of this "
                             "batch; make the cache from the same data and options.")
        return self.rows([index[key] for key in keys])

    def rows(self, examples: list[int]) -> TopKRows:
        """The cached rows of these examples' target tokens, concatenated in the given order."""
        offsets = self.offsets
        spans = [np.arange(offsets[i], offsets[i + 1]) for i in examples]
        index = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        return self.rows_at(index)

    def rows_at(self, index: np.ndarray) -> TopKRows:
        """The rows at these row numbers (of the whole cache), in the given order; each part's rows decoded once."""
        owner = np.searchsorted([part.first_row for part in self.parts], index, side="right") - 1
        pieces = []
        for p in (np.unique(owner) if len(index) else [0]):
            part, chosen = self.parts[p], np.nonzero(owner == p)[0]
            local = index[chosen] - part.first_row
            pieces.append((chosen, decode({name: array[local] for name, array in part.arrays.items()}, self.encoding,
                                          self.top_k)))
        if len(pieces) == 1:
            return pieces[0][1]
        order = torch.from_numpy(np.argsort(np.concatenate([chosen for chosen, _ in pieces]), kind="stable"))
        return TopKRows(*(torch.cat(columns)[order] for columns in zip(*(rows for _, rows in pieces))))


def _index_problem(index: dict, parts: list[StoredPart], meta: dict) -> str | None:
    tokens, examples = meta["tokens"], meta["examples"]
    for name, shape in (("offsets", (examples + 1,)), ("keys", (examples,))):
        if index[name].shape != shape or index[name].dtype.kind not in "iu":
            return (f"{name}.npy holds {index[name].dtype} of shape {index[name].shape}, but meta.json says "
                    f"{examples} examples (integers, shape {shape})")
    if tokens and int(index["offsets"][-1]) != tokens:
        return f"offsets.npy ends at {int(index['offsets'][-1])}, not at the {tokens} target tokens"
    if sum(part.rows for part in parts) != tokens:
        return f"the parts hold {sum(part.rows for part in parts)} rows, not the {tokens} target tokens"
    return None
