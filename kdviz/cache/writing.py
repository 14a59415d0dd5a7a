"""Writing a teacher cache part by part: resumable, shared between processes, sealed whole.

A capture (from the teacher, from imported log-probs, or converting another cache) cuts the data
into parts of about `part_tokens` target tokens (contiguous examples) and writes each part as soon
as it is done into ``OUT.partial/part-START-END/`` (its arrays, filled batch by batch through
memory maps, then renamed into place with a ``part.json`` listing their checksums), so memory stays
O(batch) and an interrupted capture continues from its finished parts: the same command again says
"reusing N of M parts" and gives the same cache, byte for byte. ``OUT.partial/plan.json`` records
what the parts are of; a capture with other settings refuses to mix its parts in.

Under torchrun / accelerate launch every rank scores every world_size-th part (a part's rows do not
depend on which rank made it, nor on how many there are); rank 0 holds the writer lock, checks the
finished parts before anyone starts, and at the end writes keys.npy, offsets.npy and meta.json (with
every file's checksum), seals meta.json and renames the folder to OUT.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from kdviz import distributed
from kdviz.batching import Part, plan_parts
from kdviz.cache.encoding import layout
from kdviz.cache.format import FORMAT, TeacherCache, part_name
from kdviz.files import (TEMP_MARK, changed_file, expand, file_checksums, new_folder, remove_stale_stages, seal, warn,
                         write_text, writer_lock)

DEFAULT_PART_TOKENS = 1 << 18  # target tokens per part (the unit of writing and resuming)
PLAN_KEYS = ("format", "encoding", "source", "teacher_fingerprint", "tokenizer", "data", "template", "top_k",
             "temperature", "vocab_size", "max_length", "part_tokens")


@dataclass
class Capture:
    """What a capture writes: the cache's meta.json (less its parts and checksums), each example's key and number
    of rows (target tokens), and the parts they are cut into."""

    out: Path
    meta: dict
    keys: np.ndarray
    counts: np.ndarray
    parts: list[Part]
    notes: Callable[[dict, int], list[str]] | None = None  # caveats in words from the parts' summed counts

    @classmethod
    def plan(cls, out, meta: dict, keys, counts, *, part_tokens: int) -> "Capture":
        counts = np.asarray(counts, dtype=np.int64)
        meta = {**meta, "format": FORMAT, "part_tokens": part_tokens, "examples": len(counts),
                "tokens": int(counts.sum())}
        parts = plan_parts([int(c) for c in counts], part_tokens, [int(c) for c in counts])
        return cls(expand(out), meta, np.asarray(keys, dtype=np.int64), counts, parts)

    @property
    def work(self) -> Path:
        return work_folder(self.out)

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @property
    def plan_record(self) -> dict:
        return {key: self.meta.get(key) for key in PLAN_KEYS}

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.plan_record, sort_keys=True).encode()).hexdigest()[:24]

    def layout(self) -> dict:
        return layout(self.meta["encoding"], self.meta["top_k"], self.meta["vocab_size"])


def work_folder(out) -> Path:
    """Where a capture into `out` keeps its finished parts until the cache is whole."""
    out = expand(out)
    return out.with_name(f"{out.name}.partial")


Fill = Callable[[Part, dict, Callable[[int], object]], "dict | None"]  # (part, its arrays, progress) -> counts


def run_capture(capture: Capture, fill: Fill, *, progress: bool = True, what: str = "teacher cache") -> TeacherCache:
    """Write `capture`'s parts not finished yet (`fill` fills one part's memory-mapped arrays), this rank's share of
    them, then (rank 0) seal the cache; every rank returns it opened."""
    here = distributed.world()
    with ExitStack() as stack:
        problem = None
        if here.is_main:
            try:
                stack.enter_context(writer_lock(capture.out, what=what))
                prepare(capture)
            except ValueError as err:
                problem = str(err)
        problem = distributed.broadcast(problem)
        if problem:
            raise distributed.SharedError(problem)
        done = [part_done(capture.work, part, capture.key) for part in capture.parts]
        if here.is_main and any(done):
            said = [p for p, d in zip(capture.parts, done) if d]
            print(f"teacher-cache: reusing {len(said)} of {len(capture.parts)} finished parts ({sum(p.rows for p in said):,}"
                  f" of {capture.meta['tokens']:,} target tokens) from an earlier run in {capture.work}",
                  file=sys.stderr)
        mine = [p for i, p in enumerate(capture.parts) if i % here.size == here.rank and not done[i]]
        bar = tqdm(total=sum(p.rows for p in mine), desc=what if here.size == 1 else f"{what} rank {here.rank}",
                   unit="tok", unit_scale=True, disable=not progress or not mine, position=here.rank)
        for part in mine:
            write_part(capture, part, lambda arrays, p=part: fill(p, arrays, bar.update))
        bar.close()
        distributed.barrier()
        if here.is_main:
            finish(capture)
        distributed.barrier()
    return TeacherCache.open(capture.out)


def prepare(capture: Capture) -> None:
    """(Rank 0, under the writer lock.) Refuse an existing OUT or parts of another capture; clean what a killed
    capture left (half-written parts); check the finished parts (a damaged one is removed and made again)."""
    out, work = capture.out, capture.work
    if out.exists():
        raise ValueError(f"{out} exists; give a new folder for the teacher cache (a cache is written whole, never over "
                         "another).")
    remove_stale_stages(out)
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    if plan_file.is_file():
        earlier = json.loads(plan_file.read_text())
        differ = [key for key in PLAN_KEYS if earlier.get(key) != capture.plan_record[key]]
        if differ:
            key = differ[0]
            raise ValueError(f"{work} holds the finished parts of another capture ({key} {earlier.get(key)!r}, this "
                             f"one {capture.plan_record[key]!r}). Run that command again to finish it, or remove "
                             f"{work} to start this one.")
    else:
        write_text(plan_file, json.dumps(capture.plan_record, indent=2) + "\n", what="capture plan")
    names = {part_name(p.start, p.end) for p in capture.parts}
    for path in sorted(work.iterdir()):
        if TEMP_MARK in path.name or (path.is_dir() and path.name not in names):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for part in capture.parts:
        folder = work / part_name(part.start, part.end)
        problem = part_problem(folder, part, capture.key) if folder.exists() else None
        if problem:
            warn(f"The finished part {folder} cannot be used ({problem}); making it again.")
            shutil.rmtree(folder)


def part_problem(folder: Path, part: Part, key: str) -> str | None:
    try:
        record = json.loads((folder / "part.json").read_text())
    except (OSError, ValueError) as err:
        return f"its part.json cannot be read: {err}"
    if record.get("key") != key or record.get("rows") != part.rows:
        return f"it holds {record.get('rows')} rows for key {record.get('key')}, expected {part.rows} for {key}"
    return changed_file(folder, record.get("checksums") or {}, since="it was written")


def part_done(work: Path, part: Part, key: str) -> bool:
    folder = work / part_name(part.start, part.end)
    return (folder / "part.json").is_file()


def write_part(capture: Capture, part: Part, fill: Callable[[dict], "dict | None"]) -> None:
    """Make one part: its arrays memory-mapped in a staging folder, filled, checksummed, renamed into place (with
    the counts `fill` returns, e.g. how many rows an import could only bound)."""
    name = part_name(part.start, part.end)
    with new_folder(capture.work / name, what=f"part {name} of the teacher cache") as stage:
        arrays = {array: np.lib.format.open_memmap(stage / f"{array}.npy", "w+", dtype, (part.rows, *shape))
                  for array, (dtype, shape) in capture.layout().items()}
        counts = fill(arrays) or {}
        for array in arrays.values():
            array.flush()
        del arrays
        record = {"key": capture.key, "start": part.start, "end": part.end, "rows": part.rows, "counts": counts,
                  "checksums": file_checksums(sorted(stage.glob("*.npy")))}
        (stage / "part.json").write_text(json.dumps(record, indent=2) + "\n")


def finish(capture: Capture) -> None:
    """(Rank 0.) Write the index and meta.json (every file's checksum) into the parts' folder, seal it, rename it."""
    work, checksums, counts = capture.work, {}, {}
    for part in capture.parts:
        name = part_name(part.start, part.end)
        problem = part_problem(work / name, part, capture.key) if (work / name).is_dir() else "it is missing"
        if problem:
            raise ValueError(f"The part {work / name} of the teacher cache is not usable ({problem}); run the same "
                             "command again to make it.")
        record = json.loads((work / name / "part.json").read_text())
        checksums.update({f"{name}/{file}": digest for file, digest in record["checksums"].items()})
        for key, value in (record.get("counts") or {}).items():
            counts[key] = counts.get(key, 0) + value
    np.save(work / "offsets.npy", capture.offsets)
    np.save(work / "keys.npy", capture.keys)
    checksums = {**file_checksums([work / "offsets.npy", work / "keys.npy"]), **checksums}
    row_bytes = sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in capture.layout().values())
    meta = {**capture.meta, "parts": [{"start": p.start, "end": p.end, "rows": p.rows} for p in capture.parts],
            "bytes_per_token": row_bytes, "checksums": checksums}
    if capture.notes is not None:
        meta.update(counts=counts, caveats=capture.notes(counts, capture.meta["tokens"]))
    (work / "plan.json").unlink(missing_ok=True)
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    seal(work / "meta.json")  # the checksums cover the arrays; this covers meta.json itself
    os.rename(work, capture.out)
