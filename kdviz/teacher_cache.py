"""Teacher top-k cache: run the teacher once, then distil and analyse from disk as often as you like.

Per target token the cache holds the teacher's top-k token ids and log-probabilities, the
log-probability of the target (also when it is not in the top-k) and the log-probability of
the tail (everything else), with the fingerprints of the teacher (every weight), the tokenizer, the data and
the template. Arrays are .npy files read memory-mapped; at k=64 with a vocabulary under
65,536 a token costs 2*64 (ids) + 4*64 (log-probs) + 4 + 4 = 392 bytes.

What is exact from a cache, what is not (DESIGN.md): u = 1 - p_y and TKD are exact at any k.
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

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kdviz.data import IGNORE_INDEX, TokenDataset, collate, pad_id
from kdviz.decompose import check_count, check_temperature
from kdviz.files import changed_file, expand, file_checksums, new_folder
from kdviz.losses import TopKRows, bucketed

PER_TOKEN = ("ids", "logprobs", "target_logp", "tail_logp")
ARRAYS = (*PER_TOKEN, "offsets", "keys")
FORMAT = 2  # 2: the tail's log-probability instead of the log-sum-exp
NEG_INF = float("-inf")


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, the special tokens and the chat template (what decides the ids)."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token,
                         getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()[:16]


def example_key(example) -> int:
    """A 63-bit hash of an example's ids and labels: finds its rows in a cache whatever the order or subset."""
    import xxhash

    return xxhash.xxh64(np.asarray(example.input_ids + [-1] + example.labels, dtype=np.int64).tobytes()).intdigest() >> 1


def target_rows(example) -> list[int]:
    """Positions p whose logits predict a target (labels[p + 1] != -100), in order."""
    return [p for p in range(len(example.labels) - 1) if example.labels[p + 1] != IGNORE_INDEX]


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
class CachedRows:
    """Cached teacher outputs for some target tokens, as tensors [N, k] and [N]."""

    ids: Tensor
    logprobs: Tensor
    target_logp: Tensor
    tail_logp: Tensor

    def to(self, device) -> "CachedRows":
        return CachedRows(*(t.to(device) for t in self.topk()))

    def topk(self) -> TopKRows:
        """The teacher as the losses read it."""
        return TopKRows(self.ids, self.logprobs, self.target_logp, self.tail_logp)


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
        if meta["data"] != dataset.fingerprint:
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

    def rows_for(self, examples) -> CachedRows:
        """The cached rows of these `Example`s (found by their ids and labels), concatenated in order."""
        return self.rows_for_keys([example_key(ex) for ex in examples])

    def rows_for_keys(self, keys: list[int]) -> CachedRows:
        """The cached rows of the examples with these `example_key`s, concatenated in order."""
        if not hasattr(self, "_index"):
            self._index = {int(key): i for i, key in enumerate(self.arrays["keys"])}
        missing = [key for key in keys if key not in self._index]
        if missing:
            raise ValueError(f"The teacher cache {self.folder} has no rows for {len(missing)} example(s) of this "
                             "batch; make the cache from the same data and options.")
        return self.rows([self._index[key] for key in keys])

    def rows(self, examples: list[int]) -> CachedRows:
        """The cached rows of these examples' target tokens, concatenated in the given order."""
        offsets = self.arrays["offsets"]
        spans = [np.arange(offsets[i], offsets[i + 1]) for i in examples]
        index = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        pick = lambda name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][index]))  # noqa: E731
        return CachedRows(pick("ids").long(), pick("logprobs"), pick("target_logp"), pick("tail_logp"))


def build(teacher, tokenizer, dataset: TokenDataset, out: str | os.PathLike, *, top_k: int = 64,
          temperature: float = 1.0, teacher_name: str = "", max_length: int | None = None, batch_tokens: int = 16384,
          progress: bool = True) -> TeacherCache:
    """Run `teacher` once over `dataset` and write its top-k cache to the folder `out` (renamed into place).

    `max_length`: the context `dataset` was tokenized for (recorded: a pair reading the cache
    tokenizes its data the same way)."""
    from kdviz.analyze import length_batches
    from kdviz.models import fingerprint, output_head

    check_count(top_k, "top_k", minimum=1)
    check_temperature(temperature)
    vocab = len(tokenizer)
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}.")
    counts = [len(target_rows(ex)) for ex in dataset]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total, device = int(offsets[-1]), next(teacher.parameters()).device
    head, bias = output_head(teacher, vocab)
    id_type = np.uint16 if vocab <= 65536 else np.int32
    meta = {"format": FORMAT, "teacher": teacher_name, "teacher_fingerprint": fingerprint(teacher),
            "tokenizer": tokenizer_fingerprint(tokenizer), "data": dataset.fingerprint,
            "data_description": dataset.description, "template": dataset.template, "examples": len(dataset),
            "tokens": total, "top_k": top_k, "temperature": float(temperature), "vocab_size": vocab,
            "max_length": max_length or max(len(ex.input_ids) for ex in dataset)}
    with new_folder(out, what="teacher cache") as stage:
        arrays = {"ids": np.lib.format.open_memmap(stage / "ids.npy", "w+", id_type, (total, top_k)),
                  "logprobs": np.lib.format.open_memmap(stage / "logprobs.npy", "w+", np.float32, (total, top_k)),
                  "target_logp": np.lib.format.open_memmap(stage / "target_logp.npy", "w+", np.float32, (total,)),
                  "tail_logp": np.lib.format.open_memmap(stage / "tail_logp.npy", "w+", np.float32, (total,))}
        np.save(stage / "offsets.npy", offsets)
        np.save(stage / "keys.npy", np.array([example_key(ex) for ex in dataset], dtype=np.int64))
        lengths = [len(ex.input_ids) for ex in dataset]
        bar = tqdm(total=sum(lengths), desc="teacher cache", unit="tok", unit_scale=True, disable=not progress)
        for batch in length_batches(lengths, batch_size=64, batch_tokens=batch_tokens):
            _cache_batch(teacher, tokenizer, dataset, batch, head, bias, temperature, arrays, offsets, device)
            bar.update(sum(lengths[i] for i in batch))
        bar.close()
        for array in arrays.values():
            array.flush()
        del arrays
        meta["bytes_per_token"] = sum((stage / f"{n}.npy").stat().st_size for n in PER_TOKEN) / max(1, total)
        meta["checksums"] = file_checksums(stage / f"{n}.npy" for n in ARRAYS)  # checked at every open
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return TeacherCache.open(out)


@torch.inference_mode()
def _cache_batch(teacher, tokenizer, dataset, batch, head, bias, temperature, arrays, offsets, device) -> None:
    from kdviz.models import last_hidden

    examples = [dataset[i] for i in batch]
    padded = collate(examples, pad_id=pad_id(tokenizer))
    hidden = last_hidden(teacher, padded.input_ids.to(device), padded.attention_mask.to(device))  # (B, L, H)
    for row, index in enumerate(batch):
        positions = target_rows(dataset[index])
        if not positions:
            continue
        targets = torch.tensor([dataset[index].input_ids[p + 1] for p in positions], device=device)
        logits = torch.nn.functional.linear(hidden[row, positions], head, bias).float() / temperature  # (n, V)
        rows = TopKRows.from_log_probs(torch.log_softmax(logits, -1), targets, arrays["ids"].shape[1])
        span = slice(int(offsets[index]), int(offsets[index + 1]))
        for name, values in zip(PER_TOKEN, rows):
            arrays[name][span] = values.cpu().numpy()


@torch.no_grad()
def decompose_cached(cached: CachedRows, student_hidden: Tensor, student_head: Tensor, labels: Tensor, *,
                     student_bias: Tensor | None = None, top_k: int = 0, chunk_rows: int | None = None):
    """`decompose` with the teacher read from a cache: `cached` holds the rows of the valid positions of
    `labels` [B, T] in row-major order. u, TKD, the target log-probs and everything of the student are
    exact; DKD, KL, reverse KL and the teacher's entropy are those of the bucketed distributions
    (lower bounds). The teacher's rank of a target outside its cached top-k is -1 (unknown)."""
    from kdviz.decompose import DEFAULT_CHUNK_ELEMENTS, _assemble, _chunk_stats, _HeadRows, _Workspace

    vocab = student_head.shape[0]
    valid = labels != IGNORE_INDEX
    rows = valid.reshape(-1).nonzero().squeeze(1)
    if len(rows) != len(cached.target_logp):
        raise ValueError(f"The cache gives {len(cached.target_logp)} target tokens for this batch, the labels "
                         f"{len(rows)}; the cache and the data do not match.")
    y_flat, student = labels.reshape(-1), _HeadRows(student_hidden, student_head, student_bias)
    cached = cached.to(labels.device)
    step = min(chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // vocab), max(1, len(rows)))
    full, small = _Workspace(step, vocab, labels.device), _Workspace(step, cached.ids.shape[1] + 2, labels.device)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(rows), step):
        span = slice(start, start + step)
        y = y_flat[rows[span]]
        logits = student.load(rows[span], full.take("s", len(y)))  # (C, V) fp32
        out = _student_side(logits, y, top_k)
        teacher = cached.topk()[span]
        ids, logprobs = teacher.ids, teacher.logprobs
        log_p_b, log_q_b = bucketed(out.pop("log_q"), teacher, y)
        buckets = _chunk_stats(small.take("z", len(y)).copy_(log_p_b), small.take("s", len(y)).copy_(log_q_b),
                               torch.zeros_like(y), 1.0, 0, small)
        out.update({k: buckets[k] for k in ("unc", "tkd", "dkd", "kl", "rkl", "t_entropy", "t_logp")})
        if top_k:
            hit = ids == y[:, None]
            out["t_rank"] = torch.where(hit.any(1), hit.float().argmax(1) + 1, -1)
            out["t_topk_ids"], out["t_topk_probs"] = ids[:, :top_k], logprobs[:, :top_k].float().exp()
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return _assemble(parts, rows, valid, top_k, device=labels.device)


def _student_side(logits: Tensor, y: Tensor, top_k: int) -> dict[str, Tensor]:
    """Exact student quantities of one chunk of fp32 logits [C, V] (and its log-probs for the buckets)."""
    log_q = torch.log_softmax(logits, -1)
    out = {"log_q": log_q, "s_logp": log_q.gather(1, y[:, None])[:, 0],
           "s_entropy": -torch.where(log_q > NEG_INF, log_q.exp() * log_q, 0.0).sum(1)}
    if top_k:
        out["s_rank"] = (logits > logits.gather(1, y[:, None])).sum(1) + 1
        top = log_q.topk(top_k, dim=1)
        out["s_topk_ids"], out["s_topk_probs"] = top.indices, top.values.exp()
    return out


@dataclass
class CachedPair:
    """A student and a teacher cache: what `kdviz.analyze` needs when the teacher is read from disk."""

    cache: TeacherCache
    student: torch.nn.Module
    tokenizer: object
    student_name: str = "student"

    def __post_init__(self):
        from kdviz.models import fingerprint

        self.vocab_size = self.cache.meta["vocab_size"]
        self.teacher_name = f"{self.cache.meta['teacher']} (top-{self.cache.top_k} cache {self.cache.folder})"
        self.fingerprint = f"{self.cache.meta['teacher_fingerprint']}-top{self.cache.top_k}-{fingerprint(self.student)}"

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def max_length(self) -> int:
        """The context the cache's data was tokenized for, or the student's if shorter."""
        from kdviz.models import context_length

        return min(context_length(self.student) or self.cache.meta["max_length"], self.cache.meta["max_length"])


def load_cached_pair(cache: str | os.PathLike, student: str | os.PathLike, *, device: str | None = None) -> CachedPair:
    """The student (any model name `load_pair` takes) and the opened cache; the tokenizers must match."""
    from kdviz.models import _load_one, default_dtype, resolve_device

    opened = TeacherCache.open(cache)
    device = resolve_device(device)
    model, tokenizer = _load_one(student, device=device, dtype=default_dtype(device), trust_remote_code=False)
    if opened.meta["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"The student {student} has another tokenizer than the teacher of the cache {opened.folder}; "
                         "token-level KD needs one shared tokenizer.")
    return CachedPair(opened, model.requires_grad_(False), tokenizer, str(student))
