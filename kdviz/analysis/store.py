"""Where analysis results live: cache entries (sealed with a checksum, locked while made), parts, merging.

A finished table is one parquet file in the cache, keyed on the models' fingerprints, the data's
token ids and the settings, with its xxh3 beside it (written last: an entry without one is
incomplete). Parts are written as they finish, and merged with the hard/easy thresholds computed
over all of them by a polars lazy scan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from kdviz import distributed
from kdviz.analysis.table import META_KEY, TokenTable
from kdviz.batching import Part
from kdviz.files import TEMP_MARK, check_writable, expand, file_digest, move_aside, warn, write_text, write_with


def part_is_done(path: Path, part: Part, key: str) -> bool:
    """Whether `path` is a finished part of this run (any other file there is moved aside)."""
    if not path.is_file():
        return False
    try:
        meta = json.loads(pl.read_parquet_metadata(path).get(META_KEY, "{}"))
        rows = pl.read_parquet(path).height  # every page decoded: a damaged part is found here, not in the merge
    except Exception as err:
        move_aside(path, f"{type(err).__name__}: {err}")
        return False
    if meta.get("key") != key or rows != part.rows:
        move_aside(path, f"it holds {rows} rows for key {meta.get('key')}, expected {part.rows} for {key}")
        return False
    return True


def group_thresholds(scan: pl.LazyFrame, *, k: float, split: str, batch_size: int) -> tuple[pl.Expr, pl.DataFrame]:
    """(group expression, threshold per group): the (1 - k) quantile (linear) of the group's response-token u."""
    group = {"sequence": pl.col("doc_id"), "batch": pl.col("doc_id") // batch_size, "dataset": pl.lit(0)}[split]
    thresholds = (scan.filter(pl.col("is_response")).group_by(group.alias("_group"))
                  .agg(pl.col("unc").quantile(1 - k, interpolation="linear").alias("unc_threshold")).collect())
    return group, thresholds


def merge_parts(files: list[Path], out: Path, *, k: float, split: str, batch_size: int, meta: dict) -> Path:
    """One table from the part files (in order) with the hard/easy split over all of them, written atomically."""
    scan = pl.scan_parquet(files)
    group, thresholds = group_thresholds(scan, k=k, split=split, batch_size=batch_size)
    table = (scan.with_columns(group.alias("_group"))
             .join(thresholds.lazy(), on="_group", how="left", maintain_order="left")
             .with_columns(hard=(pl.col("is_response") & (pl.col("unc") >= pl.col("unc_threshold"))).fill_null(False))
             .drop("_group"))
    rows = int(scan.select(pl.len()).collect().item())
    return write_with(out, lambda temp: table.sink_parquet(temp, metadata={META_KEY: json.dumps({**meta, "rows": rows})}),
                      what="token table")


def digest_path(entry: Path) -> Path:
    return entry.with_name(f"{entry.name}.xxh3")


def seal_entry(entry: Path) -> None:
    """Record the finished cache entry's checksum beside it (written last: an entry without one is incomplete)."""
    write_text(digest_path(entry), file_digest(entry) + "\n", what="cache checksum")


def cached_table(entry: Path, rows: int, *, lazy: bool) -> TokenTable | None:
    """The finished cache entry, or None; a damaged, incomplete or mismatched one is moved aside (a warning)."""
    if not entry.is_file():
        return None
    try:
        sealed = digest_path(entry).read_text().strip() if digest_path(entry).is_file() else None
        if sealed != file_digest(entry):  # any damaged byte, whether or not polars would notice it
            raise ValueError("its checksum does not match: the file is damaged or was not finished" if sealed else
                             "it has no checksum: it was not finished")
        table = TokenTable.load(entry, lazy=lazy)
        if len(table) != rows:
            raise ValueError(f"it holds {len(table)} rows, not the {rows} this data gives")
        return table
    except (ValueError, OSError) as err:
        move_aside(entry, str(err))
        digest_path(entry).unlink(missing_ok=True)
        return None


@contextmanager
def entry_lock(root: Path, key: str, *, enabled: bool):
    """Hold `root/key.lock` while this process looks up or computes the entry: a second run of the same
    analysis waits for the first and reuses its result. No lock where the cache cannot be written."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        enabled = False
    if enabled:
        try:
            root.mkdir(parents=True, exist_ok=True)
            handle = open(root / f"{key}.lock", "a")
        except OSError:
            enabled = False
    if not enabled:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"analyze: another run is computing this same table ({root / key}.*); waiting for it to finish "
                  "to reuse its result", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # the lock goes with the file's closing


def entry_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def work_folder(root: Path, key: str, here: distributed.World) -> tuple[Path, bool]:
    """(folder for this run's parts, whether results can be cached there)."""
    try:
        check_writable(root, what="cache folder", folder=True)
    except ValueError as err:
        if here.size > 1:
            raise ValueError(f"{err} Several processes need one writable folder they all see: set KDVIZ_CACHE_DIR "
                             "(or cache_dir=) to a shared folder.") from None
        warn(f"{err} Analysing without a cache; the result is still returned and written to --out.")
        return Path(tempfile.mkdtemp(prefix="kdviz-analyze-")), False
    return root / f"{key}.parts", True



def spare_folder(out) -> Path | None:
    """Where parts go if the cache's disk fills up mid-run (beside `out`; made only when needed)."""
    return None if out is None else expand(out).with_name(f"{expand(out).name}{TEMP_MARK}parts-{os.getpid()}")


def merge(files: list[Path], final: Path, out, *, work: Path, seal: bool, **options) -> Path:
    """Merge into `final` (the cache entry: `seal` it); if that cannot be written, into `out` instead (a warning)."""
    try:
        merged = merge_parts(files, final, **options)
        if seal:
            seal_entry(merged)
        return merged
    except ValueError as err:
        if out is None or expand(out) == final:
            raise ValueError(f"{err} The finished parts in {work} are kept: run the same command again to finish "
                             "from them.") from None
        warn(f"{err} The table is written to {out} only.")
        return merge_parts(files, expand(out), **options)



def deliver(table: TokenTable, path: Path, out: str | os.PathLike | None) -> TokenTable:
    """Copy the finished table file to `out` (atomically) unless it was written there already."""
    if out is not None and distributed.world().is_main and expand(out).resolve() != path.resolve():
        write_with(out, lambda temp: shutil.copyfile(path, temp), what="token table")
    return table
