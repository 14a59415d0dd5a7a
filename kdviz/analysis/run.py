"""`analyze`: forward passes over a dataset -> one row per token (polars), with a hard/easy split.

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

import json
import os
import shutil
import sys
from pathlib import Path

from tqdm.auto import tqdm

from kdviz import distributed
from kdviz.analysis.crosstok import analyze_aligned
from kdviz.analysis.frames import Settings, TokenTexts, part_frame
from kdviz.analysis.grouptable import GroupTable
from kdviz.analysis.store import (cached_table, deliver, entry_key, entry_lock, merge, part_is_done, spare_folder,
                                  work_folder)
from kdviz.analysis.table import META_KEY, TABLE_FORMAT, TokenTable
from kdviz.batching import Part, plan_parts
from kdviz.checks import check_count, check_temperature
from kdviz.data import TokenDataset, check_template, load_data
from kdviz.files import check_distinct, check_writable, expand, cache_root, warn, write_with
from kdviz.generation import Sampling, generated_dataset
from kdviz.pair import ModelPair

SPLITS = ("sequence", "batch", "dataset")
DEFAULT_BATCH_TOKENS = 16384  # padded tokens per forward pass
DEFAULT_PART_TOKENS = 1 << 18  # tokens of data per part file (the unit of streaming and resuming)


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
    pair: ModelPair,
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
    generate: str | None = None,
    sampling: Sampling | None = None,
    **fields,
) -> TokenTable | GroupTable:
    """Run teacher and student over `data` and return a `TokenTable`, one row per predicted token.

    For a pair with different tokenizers (`pair.cross_tokenizer`) it returns a `GroupTable` instead, one row
    per aligned group of each response (`kdviz.analysis.crosstok`): the options apply as here, but nothing
    is cached, and generate, top_k columns and a teacher cache are not available there.

    Args:
        pair: from `kdviz.load_pair` (with `teacher_cache=` the teacher is read from a
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
        generate: "student" or "teacher": that model also writes responses to the data's prompts (`sampling`:
            how many, how long, temperature, top-p, seed); each prompt's data example is followed by its generated
            ones, whose tokens are the targets. The column `response_from` says who wrote a row's response (data,
            student, teacher) and `sample` which sample it is. Generations are kept in the cache, keyed on the
            model's weights, the prompts and the sampling settings. `exposure_bias(table)` compares them.
            Records may then hold a prompt only (no response field, or an empty one): those prompts get generated
            responses and no data row.
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
    if pair.cross_tokenizer:
        if generate is not None:
            raise ValueError(f"generate={generate!r} is not available for a pair with different tokenizers yet: "
                             "analysis across tokenizers aligns the data's own responses. Leave generate out.")
        return analyze_aligned(pair, data, k=k, split=split, batch_size=batch_size, batch_tokens=batch_tokens,
                               temperature=temperature, padding_side=padding_side, max_length=max_length,
                               limit=limit, template=template, out=out, progress=progress, **fields)
    _check_out(data, out)
    if top_k > pair.vocab_size:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {pair.vocab_size}.")
    here = distributed.init(pair.device)
    dataset = load_data(data, pair.tokenizer, max_length=pair.context(max_length), limit=limit, template=template,
                        need_response=generate is None, **fields)
    pair.source.check_data(dataset, pair.tokenizer, temperature=temperature)
    if generate is not None:
        sampling = sampling or Sampling()
        dataset = generated_dataset(pair, dataset, generate=generate, settings=sampling, max_length=max_length,
                                    cache_dir=expand(cache_dir) if cache_dir else None)
    top_k = _kept_top_k(top_k, pair.source.top_k)
    s = Settings(top_k, float(temperature), padding_side, batch_size, batch_tokens)
    part_key = entry_key(pair.fingerprint, dataset.fingerprint, top_k, float(temperature), TABLE_FORMAT)
    settings = {"k": k, "split": split, "top_k": top_k, "temperature": temperature,
                "batch_size": batch_size if split == "batch" else None}
    key = entry_key(part_key, settings)
    distributed.check_agree({"data": dataset.fingerprint, "models": pair.fingerprint, "settings": settings})
    meta = {**settings, "teacher": pair.teacher_name, "student": pair.student_name, "fingerprint": pair.fingerprint,
            "data": dataset.description, "data_fingerprint": dataset.fingerprint, "template": dataset.template,
            "format": TABLE_FORMAT, "generated_by": generate,
            "sampling": sampling.as_dict() if generate is not None else None}
    root = expand(cache_dir) / "analyze" if cache_dir else cache_root() / "analyze"
    entry = root / f"{key}.parquet"
    rows = [pair.source.table_rows(example) for example in dataset]
    with entry_lock(root, key, enabled=here.is_main):  # one run of this analysis at a time; rank 0 decides
        found = cached_table(entry, sum(rows), lazy=lazy) if cache and here.is_main else None
        if distributed.broadcast(found is not None):
            return deliver(found if here.is_main else TokenTable.load(entry, lazy=lazy), entry, out)
        return compute(pair, dataset, rows, root, key, part_key, s, here, cache=cache, entry=entry, out=out,
                       lazy=lazy, part_tokens=part_tokens, progress=progress,
                       options=dict(k=k, split=split, batch_size=batch_size, meta=meta))


def _check_out(data, out) -> None:
    """ValueError when `out` cannot be written or is the data file itself."""
    if out is None:
        return
    if isinstance(data, (str, os.PathLike)) and not str(data).startswith("zoo:") and "\n" not in str(data):
        check_distinct({"data": data, "out": out})
    check_writable(out, what="out file")


def _kept_top_k(top_k: int, teacher_top_k: int | None) -> int:
    """The top-k columns kept: at most what a cached teacher holds (a warning when cut)."""
    if teacher_top_k is None or top_k <= teacher_top_k:
        return top_k
    warn(f"top_k={top_k} is more than the teacher cache holds; the top-k columns keep its {teacher_top_k}.")
    return teacher_top_k


def compute(pair, dataset, rows, root, key, part_key, s, here, *, cache, entry, out, lazy, part_tokens, progress,
             options) -> TokenTable:
    """Analyse the parts not finished yet, merge them into the cache entry (or `out`) and open the table."""
    work, cacheable = work_folder(root, key, here)
    if not cache and here.is_main and work.exists():
        shutil.rmtree(work)  # recompute from scratch
    distributed.barrier()
    parts = plan_parts([len(ex.input_ids) for ex in dataset], part_tokens, rows)
    spare = spare_folder(out) if here.size == 1 and cacheable else None
    try:
        files = run_parts(pair, dataset, parts, work, part_key, s, here, spare=spare, progress=progress)
        distributed.barrier()
        final = entry if cacheable and cache else (expand(out) if out is not None else work / "table.parquet")
        if here.is_main:
            final = merge(files, final, out, work=work, seal=final == entry, **options)
        final = distributed.broadcast(final)
        table = deliver(TokenTable.load(final, lazy=lazy), final, out)  # eager tables are read in full here
    finally:
        if spare is not None:
            shutil.rmtree(spare, ignore_errors=True)
    distributed.barrier()
    if here.is_main and (final.parent != work or not lazy):
        shutil.rmtree(work, ignore_errors=True)
    return table


def run_parts(pair: ModelPair, dataset: TokenDataset, parts: list[Part], work: Path, key: str, s: Settings,
              here: distributed.World, *, spare: Path | None, progress: bool) -> list[Path]:
    """Compute this rank's parts that are not finished yet, each written to `work` as soon as it is done.

    If a part cannot be written there (a full disk) and `spare` is given, it and the rest go to
    `spare` instead (a warning). Returns every part's file, in order."""
    if here.is_main:  # one process checks the files there (and moves broken ones aside)
        for part in parts:
            part_is_done(work / part.name, part, key)
    distributed.barrier()
    done = [(work / p.name).is_file() for p in parts]
    mine = [p for i, p in enumerate(parts) if i % here.size == here.rank and not done[i]]
    tokens = lambda ps: sum(p.rows + (p.end - p.start) for p in ps)  # noqa: E731
    if any(done) and here.is_main:
        reused = [p for p, d in zip(parts, done) if d]
        print(f"analyze: reusing {len(reused)} of {len(parts)} finished parts ({tokens(reused):,} of "
              f"{tokens(parts):,} tokens) from an earlier run in {work}", file=sys.stderr)
    texts = TokenTexts(pair.tokenizer)
    bar = tqdm(total=tokens(mine), desc="analyze" if here.size == 1 else f"analyze rank {here.rank}", unit="tok",
               unit_scale=True, disable=not progress or not mine, position=here.rank)
    files, folder = {p.name: work / p.name for p in parts}, work
    for part in mine:
        df = part_frame(pair, dataset, part, s, texts, bar.update)
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


