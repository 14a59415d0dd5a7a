"""Teacher caches from elsewhere: top-k log-probs another tool wrote (vLLM's prompt_logprobs), and re-encoding.

`from_logprobs` reads a parquet file (or a folder of them, or a Hugging Face `datasets` folder made by
``save_to_disk``) with one row per example, in the data's order, and these columns:

- ``input_ids``: list[int], the example's token ids, as kdviz tokenizes the data for the student
  (checked: every example must match, position for position; a longer row is fine when the data
  was cut to a shorter context, as a causal model's log-probs of a prefix do not depend on what follows);
- ``topk_ids``: list[list[int]], per position t the teacher's top-k token ids for token t given the
  tokens before it (vLLM's convention: entry 0 is empty or null, entry t scores input_ids[t]);
- ``topk_logprobs``: list[list[float]], their log-probabilities, largest first;
- ``target_logprobs`` (optional): list[float], per position t the log-probability of input_ids[t].

Only the positions kdviz trains on (the response tokens of instruction data) are read. The
log-probs must be a valid top-k of a distribution: <= 0, sorted, distinct ids inside the
vocabulary, and their probabilities summing to at most 1 (+1e-4); anything else is refused with
the example and position. The tail (everything outside the top-k and the target) is then
1 - sum(top-k) - p_y, known to about 1e-6 from float32 inputs (below that it is kept at 1e-6).
Without ``target_logprobs``, a target outside the top-k has p_y <= min(p_k, 1 - sum(top-k)): the
cache keeps that bound, so u there is a lower bound and TKD is inexact; meta.json lists such caveats
(`TeacherCache.caveats`) and `kdviz teacher-cache` prints them.

`convert` re-encodes an exact cache (format 2 or 3) into the compact form (or re-parts it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import polars as pl
import torch

from kdviz.batching import Part
from kdviz.cache.encoding import check_encoding, encode, encode_compact
from kdviz.cache.format import TeacherCache
from kdviz.cache.writing import DEFAULT_PART_TOKENS, Capture, run_capture
from kdviz.checks import check_count, check_temperature
from kdviz.data import TokenDataset, example_key, target_positions
from kdviz.files import expand
from kdviz.maths.topk import TopKRows
from kdviz.models.hashing import tokenizer_fingerprint

COLUMNS = ("input_ids", "topk_ids", "topk_logprobs")
TARGET_COLUMN = "target_logprobs"
SUM_SLACK = 1e-4  # how far above 1 the top-k probabilities may sum (float rounding of the producing tool)
TAIL_FLOOR = 1e-6  # the tail's probability below which 1 - sum(top-k) - p_y is rounding noise


class LogprobFile:
    """Rows of a parquet file, a folder of parquet files or a `datasets` folder, read a range at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = expand(path)
        self.files, self.kind = _logprob_files(self.path)
        if self.kind == "parquet":
            try:
                scan = pl.scan_parquet(self.files)
                self.columns, self.rows = scan.collect_schema().names(), int(scan.select(pl.len()).collect().item())
            except (OSError, pl.exceptions.PolarsError) as err:
                raise ValueError(f"{self.path} cannot be read as parquet ({type(err).__name__}: {err}).") from None
        else:
            self.dataset = _load_from_disk(self.path)
            self.columns, self.rows = list(self.dataset.column_names), self.dataset.num_rows
        missing = [c for c in COLUMNS if c not in self.columns]
        if missing:
            raise ValueError(f"{self.path} lacks the column(s) {', '.join(missing)} (it has {', '.join(self.columns)})."
                             " A log-probs file holds input_ids, topk_ids and topk_logprobs (and optionally "
                             "target_logprobs) per example: see docs/teacher-cache.md.")

    @property
    def identity(self) -> str:
        """The input's files (names, sizes, times): a capture's parts are not reused for another input."""
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]

    def read(self, start: int, end: int) -> pl.DataFrame:
        """Rows [start, end) with the columns kdviz reads."""
        columns = [c for c in (*COLUMNS, TARGET_COLUMN) if c in self.columns]
        if self.kind == "parquet":
            return pl.scan_parquet(self.files).select(columns).slice(start, end - start).collect()
        table = self.dataset.select_columns(columns).with_format("arrow")[start:end]
        return pl.from_arrow(table)


def _load_from_disk(path: Path):
    try:
        from datasets import load_from_disk
    except ImportError:
        raise ValueError(f"{path} is a datasets folder; reading it needs the datasets package (pip install "
                         "'kdviz[datasets]'), or write the log-probs as parquet.") from None
    return load_from_disk(str(path))


def _logprob_files(path: Path) -> tuple[list[Path], str]:
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"--from-logprobs {path} is not a .parquet file; give a parquet file, a folder of them or "
                             "a datasets folder (save_to_disk).")
        return [path], "parquet"
    if not path.is_dir():
        raise ValueError(f"--from-logprobs {path} does not exist.")
    if (path / "dataset_dict.json").is_file():
        raise ValueError(f"{path} holds several splits (a DatasetDict); give the folder of one split, e.g. "
                         f"{path / 'train'}.")
    arrow = sorted(path.glob("*.arrow"))
    if arrow:
        return arrow, "datasets"
    parquet = sorted(path.glob("*.parquet"))
    if not parquet:
        raise ValueError(f"{path} holds no .parquet or .arrow files of log-probs.")
    return parquet, "parquet"


def from_logprobs(file: str | os.PathLike, tokenizer, dataset: TokenDataset, out: str | os.PathLike, *,
                  top_k: int | None = None, temperature: float = 1.0, teacher_name: str = "",
                  max_length: int | None = None, encoding: str = "compact", part_tokens: int = DEFAULT_PART_TOKENS,
                  progress: bool = True) -> TeacherCache:
    """A teacher cache of `dataset` from the top-k log-probs in `file` (see the module doc for its layout).

    `tokenizer`: the student's (the file's ids are checked against its tokenization of `dataset`).
    `top_k`: how many of each position's entries to keep (default: as many as the file holds at its
    first target position). `temperature`: the one the file's log-probs were made at (recorded)."""
    check_encoding(encoding)
    check_temperature(temperature)
    check_count(part_tokens, "part_tokens", minimum=1)
    source = LogprobFile(file)
    if source.rows < len(dataset):
        raise ValueError(f"{source.path} has {source.rows} rows, the data {len(dataset)} examples ({dataset.description})"
                         "; the file needs one row per example, in the data's order.")
    k = top_k or _first_k(source, dataset)
    check_count(k, "top_k", minimum=1)
    vocab = len(tokenizer)
    if k > vocab:
        raise ValueError(f"top_k={k} exceeds the vocabulary size {vocab}.")
    meta = {"source": f"logprobs:{source.identity}", "encoding": encoding,
            "teacher": teacher_name or f"log-probs from {source.path.name}",
            "teacher_fingerprint": f"logprobs-{source.identity}", "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": dataset.fingerprint, "data_description": dataset.description, "template": dataset.template,
            "top_k": k, "temperature": float(temperature), "vocab_size": vocab, "imported_from": str(source.path),
            "max_length": max_length or max(len(ex.input_ids) for ex in dataset)}
    capture = Capture.plan(out, meta, [example_key(ex) for ex in dataset],
                           [len(target_positions(ex)) for ex in dataset], part_tokens=part_tokens)
    capture.notes = import_caveats
    return run_capture(capture, Importer(source, dataset, k, vocab, encoding).fill, progress=progress)


def _first_k(source: LogprobFile, dataset: TokenDataset) -> int:
    for start in range(0, len(dataset), 16):
        frame = source.read(start, min(start + 16, len(dataset)))
        for row, example in zip(frame.iter_rows(named=True), dataset.examples[start:start + 16]):
            entries = row["topk_ids"]
            if entries is not None and not (isinstance(entries, list) and all(
                    e is None or isinstance(e, list) for e in entries)):
                raise ValueError(f"{source.path}: topk_ids holds {type(entries).__name__} values, not lists (one list "
                                 "of top-k token ids per position): see docs/teacher-cache.md for the layout.")
            for p in target_positions(example):
                if entries and p + 1 < len(entries) and entries[p + 1]:
                    return len(entries[p + 1])
    raise ValueError(f"{source.path} holds no top-k entries at the data's target positions.")


def import_caveats(counts: dict, tokens: int) -> list[str]:
    """What an imported cache holds less exactly than one made by running the teacher, in words."""
    notes = []
    if counts.get("targets_bounded"):
        notes.append(f"{counts['targets_bounded']:,} of {tokens:,} target tokens are outside the top-k and the file "
                     "gives no target log-prob (target_logprobs): there p_y is kept at its upper bound min(p_k, "
                     "1 - sum(top-k)), so u is a lower bound and TKD, DKD and KL are inexact")
    if counts.get("tails_floored"):
        notes.append(f"on {counts['tails_floored']:,} of {tokens:,} target tokens the tail (1 - sum(top-k) - p_y) is "
                     f"below what float32 log-probs resolve and is kept at {TAIL_FLOOR:g}: the tail bucket there "
                     "(reverse KL most) is inexact")
    return notes


class Importer:
    """Fills a part's arrays from the rows of a log-probs file, checking them against the data."""

    CHUNK_ROWS = 16384  # target tokens read from the file at a time

    def __init__(self, source: LogprobFile, dataset: TokenDataset, k: int, vocab: int, encoding: str):
        self.source, self.dataset, self.k, self.vocab, self.encoding = source, dataset, k, vocab, encoding

    def fill(self, part: Part, arrays: dict, update) -> dict:
        counts = {"targets_bounded": 0, "tails_floored": 0}
        row, start = 0, part.start
        while start < part.end:
            end, rows = start, 0
            while end < part.end and (end == start or rows + len(target_positions(self.dataset[end])) <= self.CHUNK_ROWS):
                rows += len(target_positions(self.dataset[end]))
                end += 1
            top, hit, chunk_counts = self.rows(start, end)
            values = encode_compact(top, hit) if self.encoding == "compact" else encode(top, None, "exact")
            for name, array in values.items():
                arrays[name][row:row + rows] = array.numpy()
            counts = {key: counts[key] + chunk_counts[key] for key in counts}
            row, start = row + rows, end
            update(rows)
        return counts

    def rows(self, start: int, end: int) -> tuple[TopKRows, torch.Tensor, dict]:
        """The rows of examples [start, end): (TopKRows, the target's entry in each top-k, caveat counts)."""
        try:
            frame = self.source.read(start, end)
            where, targets = self.positions(frame, start, end)
            ids, logprobs, given = self.entries(frame, where)
        except (OSError, pl.exceptions.PolarsError) as err:
            raise ValueError(f"{self.source.path}: rows {start}..{end - 1} do not have the layout of a log-probs file "
                             f"(input_ids: list of ints, topk_ids: list of lists of ints, topk_logprobs: list of lists "
                             f"of floats, target_logprobs: list of floats): {type(err).__name__}: {err}") from None
        check_rows(ids, logprobs, given, targets, self.vocab, self.describe(where))
        return derive(ids, logprobs, given, targets, full=self.k >= self.vocab)

    def positions(self, frame: pl.DataFrame, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """(where: [N, 3] example, position, index into the exploded positions; the target ids [N])."""
        lengths = frame["input_ids"].list.len().fill_null(0).to_numpy().astype(np.int64)
        for name in ("topk_ids", "topk_logprobs"):
            other = frame[name].list.len().cast(pl.Int64).fill_null(-1).to_numpy()
            if (other != lengths).any():
                i = int(np.nonzero(other != lengths)[0][0])
                raise ValueError(f"{self.source.path}: row {start + i} has {lengths[i]} input_ids but {other[i]} "
                                 f"{name} entries; there must be one (possibly empty) entry per position.")
        flat = frame["input_ids"].explode().to_numpy()
        first = np.concatenate([[0], np.cumsum(lengths)])
        where, targets = [], []
        for i, example in enumerate(self.dataset.examples[start:end]):
            mine, theirs = np.asarray(example.input_ids), flat[first[i]:first[i + 1]]
            self.check_tokens(start + i, example, mine, theirs)
            positions = np.asarray(target_positions(example), dtype=np.int64) + 1
            where.append(np.stack([np.full(len(positions), start + i), positions, first[i] + positions], 1))
            targets.append(mine[positions])
        return np.concatenate(where).astype(np.int64), np.concatenate(targets).astype(np.int64)

    def check_tokens(self, index: int, example, mine: np.ndarray, theirs: np.ndarray) -> None:
        n = min(len(mine), len(theirs))
        differ = np.nonzero(mine[:n] != theirs[:n])[0]
        if len(differ):
            j = int(differ[0])
            raise ValueError(f"{self.source.path}: row {index} (example {example.source}) is not the student's "
                             f"tokenization of the data: at position {j} the file has token {int(theirs[j])}, the data "
                             f"{int(mine[j])}. The file must hold the data's token ids as kdviz tokenizes them for "
                             "this student (same --data, --template, --limit and --max-length, in the same order).")
        if len(theirs) < len(mine):
            raise ValueError(f"{self.source.path}: row {index} (example {example.source}) has {len(theirs)} tokens in the "
                             f"file, {len(mine)} in the data: the file's example is cut short (its context was "
                             "shorter?); make it from the same --max-length.")

    def entries(self, frame: pl.DataFrame, where: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The top-k ids [N, k], log-probs [N, k] and given target log-probs [N] (NaN where not given)."""
        index = pl.Series(where[:, 2])
        ids = frame["topk_ids"].explode().gather(index)
        sizes = ids.list.len().fill_null(0).to_numpy()
        if (sizes < self.k).any():
            i = int(np.nonzero(sizes < self.k)[0][0])
            raise ValueError(f"{self.source.path}: row {where[i, 0]}, position {where[i, 1]} has {sizes[i]} top-k "
                             f"entries, fewer than top_k={self.k}; give a smaller --top-k or a file with more.")
        logprobs = frame["topk_logprobs"].explode().gather(index).list.head(self.k).explode()
        given = (frame[TARGET_COLUMN].explode().gather(index).cast(pl.Float64).fill_null(math.nan).to_numpy()
                 if TARGET_COLUMN in frame.columns else np.full(len(where), math.nan))
        return (ids.list.head(self.k).explode().to_numpy().astype(np.int64).reshape(-1, self.k),
                logprobs.cast(pl.Float64).fill_null(math.nan).to_numpy().reshape(-1, self.k), given)

    def describe(self, where: np.ndarray):
        def at(row: int) -> str:
            example = int(where[row, 0])
            return (f"{self.source.path}: row {example} (example {self.dataset[example].source}), position "
                    f"{int(where[row, 1])}")
        return at


def check_rows(ids: np.ndarray, logprobs: np.ndarray, given: np.ndarray, targets: np.ndarray, vocab: int, at) -> None:
    """ValueError naming the first row (`at(row)`: its example and position) that is not a valid top-k."""
    problems = [
        ((ids < 0) | (ids >= vocab)).any(1), f"a top-k token id outside the vocabulary of {vocab}",
        (np.diff(np.sort(ids, 1), axis=1) == 0).any(1), "the same token id twice in its top-k",
        np.isnan(logprobs).any(1) | (logprobs > SUM_SLACK).any(1), "a log-prob that is NaN or above 0",
        (np.diff(logprobs, axis=1) > 1e-6).any(1), "top-k log-probs not in order (largest first)",
        np.exp(logprobs).sum(1) > 1 + SUM_SLACK, "top-k probabilities summing to more than 1",
        given > SUM_SLACK, "a target log-prob above 0",
    ]
    hit = ids == targets[:, None]
    entry = np.where(hit.any(1), np.where(hit, logprobs, 0.0).sum(1), math.nan)
    problems += [np.abs(entry - given) > 1e-3, "a target log-prob that differs from the target's own top-k entry"]
    for bad, reason in zip(problems[::2], problems[1::2]):
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            shown = f" (ids {ids[row][:8].tolist()}..., log-probs {np.round(logprobs[row][:4], 4).tolist()}...)"
            raise ValueError(f"{at(row)} has {reason}{shown}; the file is not a valid top-k of a distribution.")


def derive(ids: np.ndarray, logprobs: np.ndarray, given: np.ndarray, targets: np.ndarray, *, full: bool
           ) -> tuple[TopKRows, torch.Tensor, dict]:
    """The cache's rows from checked top-k entries: the target's log-prob (from its entry, the file, or its upper
    bound), the tail's (1 - sum - p_y, floored), the target's entries, and how many rows needed bound or floor."""
    hit = ids == targets[:, None]
    has = hit.any(1)
    total = np.exp(logprobs).sum(1)
    bounded = ~has & np.isnan(given)
    bound = np.log(np.minimum(np.exp(logprobs[:, -1]), np.maximum(1 - total, TAIL_FLOOR)))
    target = np.where(has, np.where(hit, logprobs, 0.0).sum(1), np.where(bounded, bound, given))
    tail = 1 - total - np.where(has, 0.0, np.exp(target))
    floored = (tail < TAIL_FLOOR) & ~full
    tail_logp = np.full(len(ids), -math.inf) if full else np.log(np.maximum(tail, TAIL_FLOOR))
    rows = TopKRows(torch.tensor(ids), torch.tensor(logprobs).float(), torch.tensor(target).float(),
                    torch.tensor(tail_logp).float())
    return rows, torch.from_numpy(hit), {"targets_bounded": int(bounded.sum()), "tails_floored": int(floored.sum())}


def convert(source: str | os.PathLike, out: str | os.PathLike, *, encoding: str = "compact",
            part_tokens: int = DEFAULT_PART_TOKENS, progress: bool = True) -> TeacherCache:
    """Write the exact cache `source` (format 2 or 3) again as a format 3 cache in `encoding` at `out`."""
    check_encoding(encoding)
    check_count(part_tokens, "part_tokens", minimum=1)
    old = TeacherCache.open(source)
    if old.encoding != "exact":
        raise ValueError(f"The teacher cache {old.folder} is {old.encoding}; only an exact cache can be converted (a "
                         "compact one cannot be made exact again: make it from the teacher).")
    kept = ("source", "teacher", "teacher_fingerprint", "tokenizer", "data", "data_description", "template", "top_k",
            "temperature", "vocab_size", "max_length", "imported_from", "counts", "caveats")
    meta = {**{key: old.meta[key] for key in kept if key in old.meta}, "encoding": encoding,
            "source": f"{old.meta.get('source', 'teacher')}, converted", "converted_from": str(old.folder)}
    capture = Capture.plan(out, meta, np.asarray(old.keys), np.diff(np.asarray(old.offsets)), part_tokens=part_tokens)

    def fill(part: Part, arrays: dict, update) -> None:
        first = int(old.offsets[part.start])
        for lo in range(part.start, part.end, 256):
            hi = min(lo + 256, part.end)
            rows = old.rows(list(range(lo, hi)))
            equal = rows.logprobs == rows.target_logp[:, None]  # (the target's entry: its log-prob, bit for bit)
            hit = equal & (equal.cumsum(1) == 1)
            values = encode_compact(rows, hit) if encoding == "compact" else encode(rows, None, "exact")
            span = slice(int(old.offsets[lo]) - first, int(old.offsets[hi]) - first)
            for name, array in values.items():
                arrays[name][span] = array.numpy()
            update(span.stop - span.start)

    return run_capture(capture, fill, progress=progress)
