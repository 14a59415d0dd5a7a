"""Forward passes over a dataset -> one row per token (polars), with a hard/easy split.

Built to scale: examples are batched by length to a token budget (results in data order),
logits are made chunk by chunk from the final hidden states where the heads are plain linear
layers (no [B, T, V] tensor), and each part of the data (a contiguous range of examples,
about `part_tokens` tokens) is written to disk as a parquet file as soon as it is done, so
memory stays O(part) and an interrupted run continues from its finished parts. Under
`torchrun` / `accelerate launch` each rank analyses its share of the parts and rank 0
merges them and computes the hard/easy thresholds over all of them (a polars lazy scan).

>>> import kdviz
>>> pair = kdviz.load_pair("zoo:teacher-l", "zoo:student", device="cpu")
>>> table = kdviz.analyze(pair, "zoo:docstrings", limit=8, progress=False)
>>> table.summary().row("all")["tokens"] > 0
True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm

from kdviz import distributed
from kdviz.data import IGNORE_INDEX, TokenDataset, check_template, collate, load_data, pad_id
from kdviz.decompose import SCALAR_FIELDS, check_count, check_temperature, decompose, decompose_hidden
from kdviz.files import (TEMP_MARK, cache_root, check_distinct, check_writable, expand, file_digest, move_aside,
                         warn, write_text, write_with)
from kdviz.models import ModelPair, last_hidden, output_head
from kdviz.teacher_cache import CachedPair, decompose_cached

SPLITS = ("sequence", "batch", "dataset")
VISIBLE_WHITESPACE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})
DEFAULT_MAX_LENGTH = 1024  # when neither model's config states a context length
DEFAULT_BATCH_TOKENS = 16384  # padded tokens per forward pass
DEFAULT_PART_TOKENS = 1 << 18  # tokens of data per part file (the unit of streaming and resuming)
TABLE_FORMAT = 2  # bump when the columns change (part of the cache key)
META_KEY = "kdviz"


def visible(text: str) -> str:
    """A token's text with whitespace made visible (space ·, newline ↵, tab →)."""
    return text.translate(VISIBLE_WHITESPACE)


@dataclass
class Summary:
    """The paper's questions in numbers: one row per group (hard, easy, all)."""

    table: pl.DataFrame
    split: str
    k: float

    def row(self, group: str) -> dict:
        return self.table.filter(pl.col("group") == group).row(0, named=True)

    def to_dict(self) -> dict:
        return {row["group"]: row for row in self.table.iter_rows(named=True)}

    def __str__(self) -> str:
        hard, easy, both = self.row("hard"), self.row("easy"), self.row("all")
        lines = [
            f"{both['tokens']} target tokens: {hard['tokens']} hard, {easy['tokens']} easy "
            f"(k={self.k}, split per {self.split}; hard = teacher uncertainty >= the group's {1 - self.k:.2f} quantile)",
            "",
            f"{'group':<6}{'tokens':>8}{'unc':>8}{'TKD':>9}{'DKD':>9}{'u*DKD':>9}{'KL':>9}{'KL share':>10}{'u-weight':>10}",
        ]
        for r in (hard, easy, both):
            lines.append(
                f"{r['group']:<6}{r['tokens']:>8}{r['mean_unc']:>8.3f}{r['mean_tkd']:>9.4f}{r['mean_dkd']:>9.4f}"
                f"{r['mean_weighted_dkd']:>9.4f}{r['mean_kl']:>9.4f}{r['kl_share']:>10.1%}{r['dkd_weight']:>10.3f}"
            )
        lines += [
            "",
            f"Hard tokens carry {hard['kl_share']:.1%} of the total KL. Inside KL the u-weight keeps "
            f"{both['dkd_weight']:.1%} of DKD overall ({easy['dkd_weight']:.1%} on easy tokens, "
            f"{hard['dkd_weight']:.1%} on hard ones); TKD is {both['tkd_share']:.1%} of the KL.",
        ]
        return "\n".join(lines)


_GROUP_AGGREGATES = [
    pl.len().alias("tokens"),
    pl.col("unc").mean().alias("mean_unc"),
    pl.col("tkd").mean().alias("mean_tkd"),
    pl.col("dkd").mean().alias("mean_dkd"),
    (pl.col("unc") * pl.col("dkd")).mean().alias("mean_weighted_dkd"),
    pl.col("kl").mean().alias("mean_kl"),
    pl.col("kl").sum().alias("kl_sum"),
    (pl.col("unc") * pl.col("dkd")).sum().alias("weighted_dkd_sum"),
    pl.col("dkd").sum().alias("dkd_sum"),
    pl.col("tkd").sum().alias("tkd_sum"),
]


def _group_row(group: str, values: dict | None) -> dict:
    values = values or {"tokens": 0}
    get = lambda key: values.get(key) or 0.0  # noqa: E731  (means of an empty group are null)
    return {
        "group": group,
        "tokens": int(values["tokens"]),
        **{key: get(key) for key in ("mean_unc", "mean_tkd", "mean_dkd", "mean_weighted_dkd", "mean_kl", "kl_sum")},
        "dkd_weight": get("weighted_dkd_sum") / get("dkd_sum") if get("dkd_sum") > 0 else 0.0,
        "tkd_share": get("tkd_sum") / get("kl_sum") if get("kl_sum") > 0 else 0.0,
    }


class TokenTable:
    """One row per predicted token; `df` is the polars table, `meta` says how it was made.

    A table opened with ``TokenTable.load(path, lazy=True)`` holds a polars LazyFrame
    (`lazy`); `summary()` then aggregates without loading the rows, and `df` loads them.
    """

    def __init__(self, df: pl.DataFrame | pl.LazyFrame, meta: dict | None = None):
        self._df = df if isinstance(df, pl.DataFrame) else None
        self._lazy = df if isinstance(df, pl.LazyFrame) else None
        self.meta = dict(meta or {})

    @property
    def df(self) -> pl.DataFrame:
        if self._df is None:
            self._df = self._lazy.collect()
        return self._df

    @property
    def lazy(self) -> pl.LazyFrame:
        return self._df.lazy() if self._df is not None else self._lazy

    def __len__(self) -> int:
        if self._df is not None:
            return self._df.height
        return int(self._lazy.select(pl.len()).collect().item())

    def __repr__(self) -> str:
        body = self._df if self._df is not None else "(lazy: rows not loaded)"
        return f"TokenTable({len(self)} tokens, {self.meta.get('data', '?')})\n{body}"

    @property
    def targets(self) -> pl.DataFrame:
        """Rows that are targets (response tokens for instruction data, all tokens for text)."""
        return self.df.filter(pl.col("is_response"))

    def summary(self) -> Summary:
        targets = self.lazy.filter(pl.col("is_response")).with_columns(pl.col("unc", "tkd", "dkd", "kl")
                                                                        .cast(pl.Float64))
        groups = {row["hard"]: row for row in targets.group_by("hard").agg(_GROUP_AGGREGATES).collect()
                  .iter_rows(named=True)}
        rows = [_group_row("hard", groups.get(True)), _group_row("easy", groups.get(False)),
                _group_row("all", targets.select(_GROUP_AGGREGATES).collect().row(0, named=True))]
        total = rows[2]["kl_sum"]
        for row in rows:
            row["kl_share"] = row["kl_sum"] / total if total > 0 else 0.0
        return Summary(pl.DataFrame(rows), split=self.meta.get("split", "?"), k=self.meta.get("k", float("nan")))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table (with `meta`) as parquet, to a temporary file renamed into place."""
        meta = {**self.meta, "rows": len(self)}
        if self._df is not None:
            return write_with(path, lambda temp: self._df.write_parquet(temp, metadata={META_KEY: json.dumps(meta)}),
                              what="token table")
        return write_with(path, lambda temp: self._lazy.sink_parquet(temp, metadata={META_KEY: json.dumps(meta)}),
                          what="token table")

    @classmethod
    def load(cls, path: str | os.PathLike, *, lazy: bool = False) -> "TokenTable":
        """Read a table written by `save` or `analyze`; ValueError naming the file if it is broken or incomplete."""
        path = expand(path)
        if not path.is_file():
            raise ValueError(f"No token table at {path}; create one with kdviz.analyze(...).save(path).")
        try:
            meta = json.loads(pl.read_parquet_metadata(path).get(META_KEY, "{}"))
            frame = pl.scan_parquet(path)
            rows = int(frame.select(pl.len()).collect().item())
        except Exception as err:  # polars raises several error types for a damaged file
            raise ValueError(f"{path} is not a readable token table ({type(err).__name__}: {err}).") from None
        if "rows" in meta and meta["rows"] != rows:
            raise ValueError(f"{path} is incomplete: it holds {rows} rows of the {meta['rows']} it was written with.")
        table = cls(frame, meta)
        if not lazy:
            try:
                table.df
            except Exception as err:
                raise ValueError(f"{path} is not a readable token table ({type(err).__name__}: {err}).") from None
        return table


@dataclass(frozen=True)
class Part:
    """A contiguous range [start, end) of examples: computed, written and resumed as one file."""

    start: int
    end: int
    rows: int  # predicted tokens: one per position after the first of each example

    @property
    def name(self) -> str:
        return f"part-{self.start:010d}-{self.end:010d}.parquet"


def plan_parts(lengths: list[int], part_tokens: int, rows_per_example: list[int] | None = None) -> list[Part]:
    """Cut the examples (in data order) into parts of about `part_tokens` tokens (at least one example each).

    `rows_per_example`: table rows each example gives (default: one per position after the first)."""
    rows_per_example = rows_per_example or [length - 1 for length in lengths]
    parts, start, tokens, rows = [], 0, 0, 0
    for i, length in enumerate(lengths):
        tokens, rows = tokens + length, rows + rows_per_example[i]
        if tokens >= part_tokens or i == len(lengths) - 1:
            parts.append(Part(start, i + 1, rows))
            start, tokens, rows = i + 1, 0, 0
    return parts


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
class _Settings:
    top_k: int
    temperature: float
    padding_side: str
    batch_size: int
    batch_tokens: int


def _batch_frame(pair: ModelPair, examples, doc_ids: list[int], s: _Settings) -> pl.DataFrame:
    """Per-token columns for one padded batch (row order: batch row, then position)."""
    batch = collate(examples, pad_id=pad_id(pair.tokenizer), padding_side=s.padding_side)
    device = pair.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    real = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).bool()  # (B, L-1)
    targets = torch.where(real, batch.input_ids[:, 1:], IGNORE_INDEX)
    options = dict(temperature=s.temperature, top_k=s.top_k)
    if isinstance(pair, CachedPair):  # the teacher from disk: its target tokens only
        targets = torch.where(batch.labels[:, 1:] != IGNORE_INDEX, batch.input_ids[:, 1:], IGNORE_INDEX)
        with torch.inference_mode():
            s_hidden = last_hidden(pair.student, ids, mask)
        head, bias = output_head(pair.student, pair.vocab_size)
        stats = decompose_cached(pair.cache.rows(doc_ids), s_hidden[:, :-1], head, targets.to(device),
                                 student_bias=bias, top_k=s.top_k)
    elif pair.linear_heads:  # logits are made chunk by chunk inside decompose: no [B, L, V] tensor
        t_hidden, s_hidden = pair.hidden(ids, mask)
        (t_head, t_bias), (s_head, s_bias) = (output_head(m, pair.vocab_size) for m in (pair.teacher, pair.student))
        stats = decompose_hidden(t_hidden[:, :-1], t_head, s_hidden[:, :-1], s_head, targets.to(device),
                                 teacher_bias=t_bias, student_bias=s_bias, **options)
    else:  # soft-capped or scaled heads: the models' own logits
        teacher, student = pair.logits(ids, mask)
        stats = decompose(teacher[:, :-1], student[:, :-1], targets.to(device), **options)
    b_idx, t_idx = stats.valid.cpu().nonzero(as_tuple=True)
    columns = {
        "doc_id": torch.tensor(doc_ids)[b_idx].numpy(),
        "position": (t_idx + 1 - torch.tensor(batch.offsets)[b_idx]).numpy(),
        "token_id": targets[b_idx, t_idx].numpy(),
        "is_response": (batch.labels[:, 1:][b_idx, t_idx] != IGNORE_INDEX).numpy(),
    }
    for name, tensor in stats.as_dict().items():
        if name != "valid":
            columns[name] = tensor.cpu()[b_idx, t_idx].numpy()
    df = pl.DataFrame(columns)
    if isinstance(pair, CachedPair) and "t_rank" in df.columns:  # outside the cached top-k: unknown
        df = df.with_columns(t_rank=pl.when(pl.col("t_rank") > 0).then(pl.col("t_rank")))
    lists = [c for c in df.columns if c.endswith(("_topk_ids", "_topk_probs"))]
    return df.with_columns(pl.col(c).cast(pl.List(df.schema[c].inner)) for c in lists)


class _TokenTexts:
    """Decoded, visible token texts, decoded once per id over the whole run."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, {}

    def add_columns(self, df: pl.DataFrame, top_k: int) -> pl.DataFrame:
        ids = set(df["token_id"].unique().to_list())
        if top_k:
            ids |= set(df["t_topk_ids"].explode().unique().to_list()) | set(df["s_topk_ids"].explode().unique().to_list())
        self.texts.update({i: visible(self.tokenizer.decode([i])) for i in ids if i not in self.texts})
        texts = {i: self.texts[i] for i in ids}
        df = df.with_columns(token=pl.col("token_id").replace_strict(texts, return_dtype=pl.String))
        if top_k:
            df = df.with_columns(
                pl.col(f"{side}_topk_ids").list.eval(pl.element().replace_strict(texts, return_dtype=pl.String))
                .alias(f"{side}_topk_tokens") for side in ("t", "s"))
        return df


def _part_frame(pair: ModelPair, dataset: TokenDataset, part: Part, s: _Settings, texts: _TokenTexts,
                advance) -> pl.DataFrame:
    examples = dataset.examples[part.start : part.end]
    lengths = [len(ex.input_ids) for ex in examples]
    frames = []
    for batch in length_batches(lengths, batch_size=s.batch_size, batch_tokens=s.batch_tokens):
        frames.append(_batch_frame(pair, [examples[i] for i in batch], [part.start + i for i in batch], s))
        advance(sum(lengths[i] for i in batch))
    df = pl.concat(frames).sort("doc_id", "position")
    df = df.with_columns(pl.col(list(SCALAR_FIELDS)).cast(pl.Float32))
    sources = {part.start + i: ex.source for i, ex in enumerate(examples)}
    return texts.add_columns(df, s.top_k).with_columns(
        source=pl.col("doc_id").replace_strict(sources, return_dtype=pl.String))


def _part_is_done(path: Path, part: Part, key: str) -> bool:
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


def _thresholds(scan: pl.LazyFrame, *, k: float, split: str, batch_size: int) -> tuple[pl.Expr, pl.DataFrame]:
    """(group expression, threshold per group): the (1 - k) quantile (linear) of the group's response-token u."""
    group = {"sequence": pl.col("doc_id"), "batch": pl.col("doc_id") // batch_size, "dataset": pl.lit(0)}[split]
    thresholds = (scan.filter(pl.col("is_response")).group_by(group.alias("_group"))
                  .agg(pl.col("unc").quantile(1 - k, interpolation="linear").alias("unc_threshold")).collect())
    return group, thresholds


def merge_parts(files: list[Path], out: Path, *, k: float, split: str, batch_size: int, meta: dict) -> Path:
    """One table from the part files (in order) with the hard/easy split over all of them, written atomically."""
    scan = pl.scan_parquet(files)
    group, thresholds = _thresholds(scan, k=k, split=split, batch_size=batch_size)
    table = (scan.with_columns(group.alias("_group"))
             .join(thresholds.lazy(), on="_group", how="left", maintain_order="left")
             .with_columns(hard=(pl.col("is_response") & (pl.col("unc") >= pl.col("unc_threshold"))).fill_null(False))
             .drop("_group"))
    rows = int(scan.select(pl.len()).collect().item())
    return write_with(out, lambda temp: table.sink_parquet(temp, metadata={META_KEY: json.dumps({**meta, "rows": rows})}),
                      what="token table")


def _digest_path(entry: Path) -> Path:
    return entry.with_name(f"{entry.name}.xxh3")


def _seal(entry: Path) -> None:
    """Record the finished cache entry's checksum beside it (written last: an entry without one is incomplete)."""
    write_text(_digest_path(entry), file_digest(entry) + "\n", what="cache checksum")


def _cached_table(entry: Path, rows: int, *, lazy: bool) -> TokenTable | None:
    """The finished cache entry, or None; a damaged, incomplete or mismatched one is moved aside (a warning)."""
    if not entry.is_file():
        return None
    try:
        sealed = _digest_path(entry).read_text().strip() if _digest_path(entry).is_file() else None
        if sealed != file_digest(entry):  # any damaged byte, whether or not polars would notice it
            raise ValueError("its checksum does not match: the file is damaged or was not finished" if sealed else
                             "it has no checksum: it was not finished")
        table = TokenTable.load(entry, lazy=lazy)
        if len(table) != rows:
            raise ValueError(f"it holds {len(table)} rows, not the {rows} this data gives")
        return table
    except (ValueError, OSError) as err:
        move_aside(entry, str(err))
        _digest_path(entry).unlink(missing_ok=True)
        return None


@contextmanager
def _entry_lock(root: Path, key: str, *, enabled: bool):
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


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _work_folder(root: Path, key: str, here: distributed.World) -> tuple[Path, bool]:
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


def check_options(*, k, split, batch_size, batch_tokens, top_k, temperature, template, padding_side="right") -> None:
    """ValueError naming the first analysis option that is not allowed (run before any model is loaded)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k is the fraction of hard tokens and must be in (0, 1], got {k!r}.")
    check_count(batch_size, "batch_size", minimum=1)
    check_count(batch_tokens, "batch_tokens", minimum=1)
    check_count(top_k, "top_k", minimum=0)
    check_temperature(temperature)
    check_template(template)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")


def analyze(
    pair: ModelPair | CachedPair,
    data,
    *,
    k: float = 0.5,
    split: str = "sequence",
    batch_size: int = 8,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    top_k: int = 5,
    temperature: float = 1.0,
    padding_side: str = "right",
    max_length: int | None = None,
    limit: int | None = None,
    template: str = "auto",
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    lazy: bool = False,
    part_tokens: int = DEFAULT_PART_TOKENS,
    progress: bool = True,
    **fields,
) -> TokenTable:
    """Run teacher and student over `data` and return a `TokenTable`, one row per predicted token.

    Args:
        pair: from `kdviz.load_pair`, or `kdviz.teacher_cache.load_cached_pair` to read the teacher from a
            top-k cache (rows for the target tokens only; u and TKD exact, DKD and KL lower bounds).
        data: anything `kdviz.data.load_data` reads (zoo:code, a .jsonl file, texts, ...).
        k: fraction of target tokens marked hard (highest teacher uncertainty).
        split: where the hard/easy threshold is computed: per "sequence", per "batch" of
            `batch_size` consecutive examples (as in the official ATKD code), or over the whole "dataset".
        batch_size, batch_tokens: at most this many sequences and padded tokens per forward pass;
            examples are batched by length, the table stays in data order.
        top_k: top-k tokens of both models kept per row (0 to skip ranks and top-k).
        template: how prompt/response records are formatted ("auto", "chat", "alpaca", "plain").
        cache: reuse a finished result with the same models (every weight), data and settings,
            and resume an interrupted run from its finished parts. Entries live under
            `cache_dir` (default ``$KDVIZ_CACHE_DIR`` or ``~/.cache/kdviz``).
        out: also write the table there (parquet, renamed into place when complete).
        lazy: return a table backed by the file (for results larger than memory).
        fields: prompt_field / response_field / context_field / truncate for record data.

    Under torchrun / accelerate launch, each rank analyses its share and rank 0 merges; every
    rank returns the merged table. Results do not depend on batch_size, batch_tokens,
    padding_side, part_tokens or the number of processes (except split="batch", whose groups
    are batches of consecutive examples by definition). Prompt tokens of instruction data get
    rows with is_response=False; they are never hard and the summary leaves them out.
    """
    check_options(k=k, split=split, batch_size=batch_size, batch_tokens=batch_tokens, top_k=top_k,
                  temperature=temperature, template=template, padding_side=padding_side)
    check_count(part_tokens, "part_tokens", minimum=1)
    if out is not None:
        if isinstance(data, (str, os.PathLike)) and not str(data).startswith("zoo:") and "\n" not in str(data):
            check_distinct({"data": data, "out": out})
        check_writable(out, what="out file")
    if top_k > pair.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {pair.vocab_size}.")
    here = distributed.init(pair.device)
    if max_length is not None:
        check_count(max_length, "max_length", minimum=2)
    max_length = min(max_length or 10**9, pair.max_length or DEFAULT_MAX_LENGTH)  # never past the models' context
    dataset = load_data(data, pair.tokenizer, max_length=max_length, limit=limit, template=template, **fields)
    if isinstance(pair, CachedPair):
        pair.cache.check(dataset, pair.tokenizer, temperature=temperature)
        if top_k > pair.cache.top_k:
            warn(f"top_k={top_k} is more than the teacher cache holds; the top-k columns keep its "
                 f"{pair.cache.top_k}.")
            top_k = pair.cache.top_k
    s = _Settings(top_k, float(temperature), padding_side, batch_size, batch_tokens)
    part_key = _key(pair.fingerprint, dataset.fingerprint, top_k, float(temperature), TABLE_FORMAT)
    settings = {"k": k, "split": split, "top_k": top_k, "temperature": temperature,
                "batch_size": batch_size if split == "batch" else None}
    key = _key(part_key, settings)
    meta = {**settings, "teacher": pair.teacher_name, "student": pair.student_name, "fingerprint": pair.fingerprint,
            "data": dataset.description, "data_fingerprint": dataset.fingerprint, "template": dataset.template,
            "format": TABLE_FORMAT}
    root = expand(cache_dir) / "analyze" if cache_dir else cache_root() / "analyze"
    entry = root / f"{key}.parquet"
    rows = _table_rows(pair, dataset)
    with _entry_lock(root, key, enabled=cache and here.is_main):  # rank 0 decides; the others follow
        found = _cached_table(entry, sum(rows), lazy=lazy) if cache and here.is_main else None
        if distributed.broadcast(found is not None):
            return _deliver(found if here.is_main else TokenTable.load(entry, lazy=lazy), entry, out)
        return _compute(pair, dataset, rows, root, key, part_key, s, here, cache=cache, entry=entry, out=out,
                        lazy=lazy, part_tokens=part_tokens, progress=progress,
                        merge=dict(k=k, split=split, batch_size=batch_size, meta=meta))


def _table_rows(pair: ModelPair | CachedPair, dataset: TokenDataset) -> list[int]:
    """Rows each example gives: one per predicted position, or per target token when the teacher is cached."""
    if isinstance(pair, CachedPair):
        return [sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in dataset]
    return [len(ex.input_ids) - 1 for ex in dataset]


def _compute(pair, dataset, rows, root, key, part_key, s, here, *, cache, entry, out, lazy, part_tokens, progress,
             merge) -> TokenTable:
    """Analyse the parts not finished yet, merge them into the cache entry (or `out`) and open the table."""
    work, cacheable = _work_folder(root, key, here)
    if not cache and here.is_main and work.exists():
        shutil.rmtree(work)  # recompute from scratch
    distributed.barrier()
    parts = plan_parts([len(ex.input_ids) for ex in dataset], part_tokens, rows)
    spare = _spare_folder(out) if here.size == 1 and cacheable else None
    try:
        files = _run_parts(pair, dataset, parts, work, part_key, s, here, spare=spare, progress=progress)
        distributed.barrier()
        final = entry if cacheable and cache else (expand(out) if out is not None else work / "table.parquet")
        if here.is_main:
            final = _merge(files, final, out, work=work, seal=final == entry, **merge)
        final = distributed.broadcast(final)
        table = _deliver(TokenTable.load(final, lazy=lazy), final, out)  # eager tables are read in full here
    finally:
        if spare is not None:
            shutil.rmtree(spare, ignore_errors=True)
    distributed.barrier()
    if here.is_main and (final.parent != work or not lazy):
        shutil.rmtree(work, ignore_errors=True)
    return table


def _spare_folder(out) -> Path | None:
    """Where parts go if the cache's disk fills up mid-run (beside `out`; made only when needed)."""
    return None if out is None else expand(out).with_name(f"{expand(out).name}{TEMP_MARK}parts-{os.getpid()}")


def _merge(files: list[Path], final: Path, out, *, work: Path, seal: bool, **options) -> Path:
    """Merge into `final` (the cache entry: `seal` it); if that cannot be written, into `out` instead (a warning)."""
    try:
        merged = merge_parts(files, final, **options)
        if seal:
            _seal(merged)
        return merged
    except ValueError as err:
        if out is None or expand(out) == final:
            raise ValueError(f"{err} The finished parts in {work} are kept: run the same command again to finish "
                             "from them.") from None
        warn(f"{err} The table is written to {out} only.")
        return merge_parts(files, expand(out), **options)


def _run_parts(pair: ModelPair, dataset: TokenDataset, parts: list[Part], work: Path, key: str, s: _Settings,
               here: distributed.World, *, spare: Path | None, progress: bool) -> list[Path]:
    """Compute this rank's parts that are not finished yet, each written to `work` as soon as it is done.

    If a part cannot be written there (a full disk) and `spare` is given, it and the rest go to
    `spare` instead (a warning). Returns every part's file, in order."""
    if here.is_main:  # one process checks the files there (and moves broken ones aside)
        for part in parts:
            _part_is_done(work / part.name, part, key)
    distributed.barrier()
    done = [(work / p.name).is_file() for p in parts]
    mine = [p for i, p in enumerate(parts) if i % here.size == here.rank and not done[i]]
    tokens = lambda ps: sum(p.rows + (p.end - p.start) for p in ps)  # noqa: E731
    if any(done) and here.is_main:
        reused = [p for p, d in zip(parts, done) if d]
        print(f"analyze: reusing {len(reused)} of {len(parts)} finished parts ({tokens(reused):,} of "
              f"{tokens(parts):,} tokens) from an earlier run in {work}", file=sys.stderr)
    texts = _TokenTexts(pair.tokenizer)
    bar = tqdm(total=tokens(mine), desc="analyze" if here.size == 1 else f"analyze rank {here.rank}", unit="tok",
               unit_scale=True, disable=not progress or not mine, position=here.rank)
    files, folder = {p.name: work / p.name for p in parts}, work
    for part in mine:
        df = _part_frame(pair, dataset, part, s, texts, bar.update)
        part_meta = {"key": key, "start": part.start, "end": part.end, "rows": part.rows}
        write = lambda temp: df.write_parquet(temp, metadata={META_KEY: json.dumps(part_meta)})  # noqa: E731
        for _ in range(2):  # the cache folder, then the spare one
            try:
                files[part.name] = write_with(folder / part.name, write, what="part of the analysis")
                break
            except ValueError as err:
                if spare is None or folder == spare:
                    raise ValueError(f"{err} Finished parts in {work} are kept: run the same command again to "
                                     "continue from them.") from None
                warn(f"{err} The rest of this run's parts go to {spare} (removed at the end); the table is still "
                     "written to --out.")
                folder = spare
    bar.close()
    return [files[p.name] for p in parts]


def _deliver(table: TokenTable, path: Path, out: str | os.PathLike | None) -> TokenTable:
    """Copy the finished table file to `out` (atomically) unless it was written there already."""
    if out is not None and distributed.world().is_main and expand(out).resolve() != path.resolve():
        write_with(out, lambda temp: shutil.copyfile(path, temp), what="token table")
    return table
