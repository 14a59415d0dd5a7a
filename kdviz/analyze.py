"""Forward passes over a dataset -> one row per token (polars), with a hard/easy split.

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
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
from tqdm.auto import tqdm

from kdviz.data import IGNORE_INDEX, TokenDataset, collate, load_data, pad_id
from kdviz.decompose import SCALAR_FIELDS, decompose
from kdviz.models import ModelPair

SPLITS = ("sequence", "batch", "dataset")
VISIBLE_WHITESPACE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})
DEFAULT_MAX_LENGTH = 1024  # when neither model's config states a context length


def visible(text: str) -> str:
    """A token's text with whitespace made visible (space ·, newline ↵, tab →)."""
    return text.translate(VISIBLE_WHITESPACE)


def cache_root() -> Path:
    """``$KDVIZ_CACHE_DIR`` or ``~/.cache/kdviz``."""
    return Path(os.environ.get("KDVIZ_CACHE_DIR") or Path.home() / ".cache" / "kdviz")


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


def _group_stats(df: pl.DataFrame, group: str) -> dict:
    total_kl = df["kl"].sum()
    weighted = df["unc"] * df["dkd"]
    return {
        "group": group,
        "tokens": df.height,
        "mean_unc": df["unc"].mean() or 0.0,
        "mean_tkd": df["tkd"].mean() or 0.0,
        "mean_dkd": df["dkd"].mean() or 0.0,
        "mean_weighted_dkd": weighted.mean() or 0.0,
        "mean_kl": df["kl"].mean() or 0.0,
        "kl_sum": total_kl,
        "dkd_weight": weighted.sum() / df["dkd"].sum() if df["dkd"].sum() > 0 else 0.0,
        "tkd_share": df["tkd"].sum() / total_kl if total_kl > 0 else 0.0,
    }


@dataclass
class TokenTable:
    """One row per predicted token; `df` is the polars table, `meta` says how it was made."""

    df: pl.DataFrame
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.df.height

    def __repr__(self) -> str:
        return f"TokenTable({self.df.height} tokens, {self.meta.get('data', '?')})\n{self.df}"

    @property
    def targets(self) -> pl.DataFrame:
        """Rows that are targets (response tokens for instruction data, all tokens for text)."""
        return self.df.filter(pl.col("is_response"))

    def summary(self) -> Summary:
        targets = self.targets
        rows = [
            _group_stats(targets.filter(pl.col("hard")), "hard"),
            _group_stats(targets.filter(~pl.col("hard")), "easy"),
            _group_stats(targets, "all"),
        ]
        total = rows[2]["kl_sum"]
        for row in rows:
            row["kl_share"] = row["kl_sum"] / total if total > 0 else 0.0
        return Summary(pl.DataFrame(rows), split=self.meta.get("split", "?"), k=self.meta.get("k", float("nan")))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.df.write_parquet(path, metadata={"kdviz": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenTable":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"No token table at {path}; create one with kdviz.analyze(...).save(path).")
        meta = json.loads(pl.read_parquet_metadata(path).get("kdviz", "{}"))
        return cls(pl.read_parquet(path), meta)


def _batch_rows(pair: ModelPair, examples, first_doc: int, *, padding_side: str, top_k: int, temperature: float) -> dict:
    """Per-token columns (as lists / tensors) for one batch of examples."""
    batch = collate(examples, pad_id=pad_id(pair.tokenizer), padding_side=padding_side)
    device = pair.device
    teacher, student = pair.logits(batch.input_ids.to(device), batch.attention_mask.to(device))
    real = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).bool()  # (B, L-1)
    targets = torch.where(real, batch.input_ids[:, 1:], IGNORE_INDEX)
    stats = decompose(teacher[:, :-1], student[:, :-1], targets.to(device), temperature=temperature, top_k=top_k)
    b_idx, t_idx = stats.valid.cpu().nonzero(as_tuple=True)
    offsets = torch.tensor(batch.offsets)
    columns = {
        "doc_id": (b_idx + first_doc).tolist(),
        "position": (t_idx + 1 - offsets[b_idx]).tolist(),
        "token_id": targets[b_idx, t_idx].tolist(),
        "is_response": (batch.labels[:, 1:][b_idx, t_idx] != IGNORE_INDEX).tolist(),
    }
    for name, tensor in stats.as_dict().items():
        if name == "valid":
            continue
        columns[name] = tensor.cpu()[b_idx, t_idx].tolist()
    return columns


def _token_texts(tokenizer, ids) -> dict[int, str]:
    return {i: visible(tokenizer.decode([i])) for i in ids}


def _hard_flag(df: pl.DataFrame, *, k: float, split: str, batch_size: int) -> pl.DataFrame:
    """hard = response token with unc >= the (1 - k) quantile (linear) of its group's response tokens."""
    group = {"sequence": pl.col("doc_id"), "batch": pl.col("doc_id") // batch_size, "dataset": pl.lit(0)}[split]
    response_unc = pl.when(pl.col("is_response")).then(pl.col("unc"))
    threshold = response_unc.quantile(1 - k, interpolation="linear").over(group)
    return df.with_columns(
        hard=(pl.col("is_response") & (pl.col("unc") >= threshold)).fill_null(False),
        unc_threshold=threshold,
    )


def _cache_key(pair: ModelPair, dataset: TokenDataset, settings: dict) -> str:
    from kdviz import __version__

    payload = json.dumps({"pair": pair.fingerprint, "data": dataset.fingerprint, "settings": settings,
                          "kdviz": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def analyze(
    pair: ModelPair,
    data,
    *,
    k: float = 0.5,
    split: str = "sequence",
    batch_size: int = 8,
    top_k: int = 5,
    temperature: float = 1.0,
    padding_side: str = "right",
    max_length: int | None = None,
    limit: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    **fields,
) -> TokenTable:
    """Run teacher and student over `data` and return a `TokenTable`, one row per predicted token.

    Args:
        pair: from `kdviz.load_pair`.
        data: anything `kdviz.data.load_data` reads (zoo:code, a .jsonl file, texts, ...).
        k: fraction of target tokens marked hard (highest teacher uncertainty).
        split: where the hard/easy threshold is computed: per "sequence", per "batch" of
            `batch_size` examples (as in the official ATKD code), or over the whole "dataset".
        top_k: top-k tokens of both models kept per row (0 to skip ranks and top-k).
        cache: reuse a previous result with the same model fingerprints, data and settings.
        fields: prompt_field / response_field / context_field / truncate for record data.

    Results do not depend on batch_size or padding_side (except split="batch", whose groups
    are batches by definition). Prompt tokens of instruction data get rows with
    is_response=False; they are never hard and the summary leaves them out.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not 0 < k <= 1:
        raise ValueError(f"k is the fraction of hard tokens and must be in (0, 1], got {k}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    max_length = max_length or pair.max_length or DEFAULT_MAX_LENGTH
    dataset = load_data(data, pair.tokenizer, max_length=max_length, limit=limit, **fields)
    settings = {"k": k, "split": split, "top_k": top_k, "temperature": temperature,
                "batch_size": batch_size if split == "batch" else None}
    cache_path = Path(cache_dir or cache_root()) / "analyze" / f"{_cache_key(pair, dataset, settings)}.parquet"
    if cache and cache_path.is_file():
        return TokenTable.load(cache_path)

    columns: dict[str, list] = {}
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc="analyze", unit="batch", disable=not progress or len(starts) < 2):
        rows = _batch_rows(pair, dataset.examples[start : start + batch_size], start,
                           padding_side=padding_side, top_k=top_k, temperature=temperature)
        for name, values in rows.items():
            columns.setdefault(name, []).extend(values)
    df = pl.DataFrame(columns).with_columns(pl.col(list(SCALAR_FIELDS)).cast(pl.Float32))
    df = _hard_flag(df, k=k, split=split, batch_size=batch_size)
    df = _add_token_text(df, pair.tokenizer, top_k)
    df = df.with_columns(source=pl.Series([dataset.examples[i].source for i in df["doc_id"]]))
    meta = {**settings, "teacher": pair.teacher_name, "student": pair.student_name,
            "fingerprint": pair.fingerprint, "data": dataset.description, "data_fingerprint": dataset.fingerprint}
    table = TokenTable(df, meta)
    if cache:
        table.save(cache_path)
    return table


def _add_token_text(df: pl.DataFrame, tokenizer, top_k: int) -> pl.DataFrame:
    ids = set(df["token_id"].to_list())
    if top_k:
        ids |= set(df["t_topk_ids"].explode().to_list()) | set(df["s_topk_ids"].explode().to_list())
    texts = _token_texts(tokenizer, sorted(ids))
    df = df.with_columns(token=pl.col("token_id").replace_strict(texts, return_dtype=pl.String))
    if top_k:
        df = df.with_columns(
            t_topk_tokens=pl.col("t_topk_ids").list.eval(pl.element().replace_strict(texts, return_dtype=pl.String)),
            s_topk_tokens=pl.col("s_topk_ids").list.eval(pl.element().replace_strict(texts, return_dtype=pl.String)),
        )
    return df
