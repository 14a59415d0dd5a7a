"""The token table: one row per predicted token (polars), its summary by hard/easy group, saving and loading."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kdviz.files import expand, write_with

VISIBLE_WHITESPACE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})
TABLE_FORMAT = 3  # bump when the columns change (part of the cache key); 3: response_from, sample
META_KEY = "kdviz"
TABLE_COLUMNS = {"doc_id", "position", "token_id", "is_response", "unc", "tkd", "dkd", "kl", "hard"}


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
        missing = sorted(TABLE_COLUMNS - set(frame.collect_schema().names()))
        if missing:
            raise ValueError(f"{path} is a parquet file but not a kdviz token table: it lacks the columns {missing} "
                             "(a token table is written by kdviz analyze --out or TokenTable.save).")
        if "rows" in meta and meta["rows"] != rows:
            raise ValueError(f"{path} is incomplete: it holds {rows} rows of the {meta['rows']} it was written with.")
        table = cls(frame, meta)
        if not lazy:
            try:
                table.df
            except Exception as err:
                raise ValueError(f"{path} is not a readable token table ({type(err).__name__}: {err}).") from None
        return table


