"""The group table of a pair across tokenizers: one row per aligned group (polars), its summary, saving and loading.

A group is the same bytes under both tokenizers (`kdviz.align`); `kind` says how each side cut them. Groups that
are not one-to-one are where the alignment breaks: `text_class` says what their text is (digits, whitespace and
indentation, punctuation, non-ASCII, an end-of-response token, other).

>>> text_class("  \\n    "), text_class(" 1234"), text_class("):"), text_class("café"), text_class("")
('whitespace', 'digits', 'punctuation', 'non-ASCII', 'end token')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kdviz.files import expand, write_with

META_KEY = "kdviz"
GROUP_TABLE_COLUMNS = {"doc_id", "byte_start", "byte_end", "text", "kind", "text_class", "unc", "tkd", "kl", "dkd",
                       "t_unmatched", "s_unmatched", "uld", "hard"}
ONE_TO_ONE = ("same", "different")
# In this order: the first that applies names a group's text.
TEXT_CLASSES = ("end token", "non-ASCII", "digits", "whitespace", "punctuation", "other")


def text_class(text: str) -> str:
    """What a group's text is made of (the first of TEXT_CLASSES that applies): "end token" (no bytes: EOS or the
    end of a chat turn), "non-ASCII", "digits", "whitespace" (only whitespace, or a newline, tab or two spaces in
    it: indentation), "punctuation" (a character that is not a letter, digit or space), "other" (words)."""
    if not text:
        return "end token"
    if not text.isascii():
        return "non-ASCII"
    if any(char.isdigit() for char in text):
        return "digits"
    if text.isspace() or any(mark in text for mark in ("\n", "\t", "  ")):
        return "whitespace"
    return "punctuation" if any(not char.isalnum() and not char.isspace() for char in text) else "other"


def _means(*names: str) -> list[pl.Expr]:
    return [pl.col(name).mean().alias(f"mean_{name}") for name in names]


@dataclass
class AlignmentSummary:
    """How well the pair's tokenizers align on the data, and the KD quantities by group kind and hard/easy.

    `kinds`: per kind, groups, share and mean u, TKD, KL, DKD, ULD and teacher mass off the matched vocabulary.
    `breaks`: per text class, the groups that are not one-to-one (where alignment breaks) and a few of their texts.
    `hardness`: hard, easy, all groups with their means. `matched_mass`: the teacher's mean probability mass on
    string-matched tokens at one-to-one groups; `vocabulary_share`: the share of its vocabulary that matches.
    """

    kinds: pl.DataFrame
    breaks: pl.DataFrame
    hardness: pl.DataFrame
    groups: int
    one_to_one: float
    matched_mass: float
    vocabulary_share: float | None
    k: float
    split: str

    def to_dict(self) -> dict:
        return {"groups": self.groups, "one_to_one": self.one_to_one, "matched_mass": self.matched_mass,
                "vocabulary_share": self.vocabulary_share, "kinds": self.kinds.to_dicts(),
                "breaks": self.breaks.to_dicts(), "hardness": self.hardness.to_dicts()}

    def __str__(self) -> str:
        share = f"{self.vocabulary_share:.1%}" if self.vocabulary_share is not None else "?"
        lines = [f"{self.groups} aligned groups: {self.one_to_one:.1%} one-to-one. The teacher puts {self.matched_mass:.1%} "
                 f"of its probability on string-matched tokens at one-to-one groups ({share} of its vocabulary "
                 "matches the student's).", "",
                 f"{'kind':<19}{'groups':>8}{'share':>8}{'unc':>8}{'TKD':>9}{'KL':>9}{'DKD':>9}{'ULD':>8}{'unmatched':>11}"]
        for r in self.kinds.iter_rows(named=True):
            cells = [_cell(r[f"mean_{name}"], width) for name, width in
                     (("unc", 8), ("tkd", 9), ("kl", 9), ("dkd", 9), ("uld", 8), ("t_unmatched", 11))]
            lines.append(f"{r['kind']:<19}{r['groups']:>8}{r['share']:>8.1%}{''.join(cells)}")
        broken = int(self.breaks["groups"].sum()) if self.breaks.height else 0
        lines += ["", f"Where alignment breaks ({broken} groups not one-to-one):"]
        for r in self.breaks.iter_rows(named=True):
            lines.append(f"  {r['text_class']:<12}{r['groups']:>6} ({r['share']:.1%})  e.g. "
                         + ", ".join(repr(t) for t in r["examples"]))
        lines += ["", f"{'group':<6}{'groups':>8}{'unc':>8}{'TKD':>9}{'KL':>9}{'ULD':>8}{'one-to-one':>12}"
                  f"   (hard = group u >= the {1 - self.k:.2f} quantile per {self.split})"]
        for r in self.hardness.iter_rows(named=True):
            lines.append(f"{r['group']:<6}{r['groups']:>8}{_cell(r['mean_unc'], 8)}{_cell(r['mean_tkd'], 9)}"
                         f"{_cell(r['mean_kl'], 9)}{_cell(r['mean_uld'], 8)}{r['one_to_one']:>12.1%}")
        return "\n".join(lines)


def _cell(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"


def summarize(df: pl.DataFrame, meta: dict) -> AlignmentSummary:
    """The `AlignmentSummary` of a group table's rows."""
    stats = _means("unc", "tkd", "kl", "dkd", "uld", "t_unmatched")
    kinds = (df.group_by("kind").agg(pl.len().alias("groups"), *stats)
             .with_columns(share=pl.col("groups") / max(df.height, 1)).sort("groups", descending=True))
    broken = df.filter(~pl.col("kind").is_in(ONE_TO_ONE))
    breaks = (broken.group_by("text_class").agg(pl.len().alias("groups"),
                                                pl.col("text").unique(maintain_order=True).head(4).alias("examples"))
              .with_columns(share=pl.col("groups") / max(broken.height, 1)).sort("groups", descending=True))
    one_to_one = pl.col("kind").is_in(ONE_TO_ONE).mean().alias("one_to_one")
    parts = {"hard": df.filter(pl.col("hard")), "easy": df.filter(~pl.col("hard")), "all": df}
    hardness = pl.concat([part.select(pl.lit(name).alias("group"), pl.len().alias("groups"),
                                      *_means("unc", "tkd", "kl", "uld"), one_to_one.fill_null(0.0))
                          for name, part in parts.items()], how="vertical_relaxed")
    matched = df.filter(pl.col("kind").is_in(ONE_TO_ONE))["t_unmatched"].mean()
    return AlignmentSummary(kinds, breaks, hardness, df.height, float(hardness["one_to_one"][-1]),
                            1 - matched if matched is not None else float("nan"), meta.get("vocabulary_share"),
                            meta.get("k", float("nan")), meta.get("split", "?"))


class GroupTable:
    """One row per aligned group of a pair across tokenizers; `df` is the polars table, `meta` how it was made."""

    def __init__(self, df: pl.DataFrame, meta: dict | None = None):
        self.df, self.meta = df, dict(meta or {})

    def __len__(self) -> int:
        return self.df.height

    def __repr__(self) -> str:
        return f"GroupTable({len(self)} groups, {self.meta.get('data', '?')})\n{self.df}"

    def summary(self) -> AlignmentSummary:
        return summarize(self.df, self.meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table (with `meta`) as parquet, to a temporary file renamed into place."""
        meta = json.dumps({**self.meta, "rows": len(self)})
        return write_with(path, lambda temp: self.df.write_parquet(temp, metadata={META_KEY: meta}), what="group table")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GroupTable":
        """Read a table written by `save`; ValueError naming the file if it is not one."""
        path = expand(path)
        try:
            meta = json.loads(pl.read_parquet_metadata(path).get(META_KEY, "{}"))
            df = pl.read_parquet(path)
        except Exception as err:  # polars raises several error types for a missing or damaged file
            raise ValueError(f"{path} is not a readable group table ({type(err).__name__}: {err}).") from None
        missing = sorted(GROUP_TABLE_COLUMNS - set(df.columns))
        if missing:
            raise ValueError(f"{path} is a parquet file but not a kdviz group table: it lacks the columns {missing} "
                             "(a group table is written by kdviz analyze on a pair with different tokenizers).")
        return cls(df, meta)
