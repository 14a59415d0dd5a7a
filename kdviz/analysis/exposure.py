"""Exposure bias: the same prompts' data responses against responses the student (or teacher) wrote itself.

A table from `analyze(..., generate="student")` holds, per prompt, the data's response and the generated
ones. `exposure_bias` keeps the prompts that have both (all prompts, generated responses alone, when the
data held prompts only) and compares the teacher's uncertainty, the KL and
the reverse KL on each kind of response, overall and along the response (by token index bins), which is
where a student's own continuation leaves the teacher's support.

>>> import polars as pl
>>> rows = pl.DataFrame({"doc_id": [0, 0, 1, 1], "position": [3, 4, 3, 4], "is_response": [True] * 4,
...     "source": ["d:0", "d:0", "d:0#student0", "d:0#student0"], "response_from": ["data", "data", "student", "student"],
...     "unc": [0.2, 0.4, 0.6, 0.8], "kl": [1.0, 1.0, 2.0, 4.0], "rkl": [0.5, 0.5, 1.0, 1.0], "tkd": [0.1] * 4,
...     "dkd": [1.0] * 4})
>>> exposure_bias(rows).overall["kl"].to_list()
[1.0, 3.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from kdviz.analysis.table import TokenTable

EDGES = (0, 8, 16, 32, 64, 128, 256)  # token index within the response: bins [0, 8), [8, 16), ...
METRICS = ("unc", "kl", "rkl", "tkd", "dkd")
# the data example a row's response answers: a generated row's source less its "#studentK" / "#teacherK"
PROMPT = pl.col("source").str.replace(r"#(student|teacher)\d+$", "")


@dataclass(frozen=True)
class ExposureBias:
    """`overall`: one row per response kind (data, student, teacher); `along`: one per kind and index bin."""

    overall: pl.DataFrame
    along: pl.DataFrame
    prompts: int

    def __str__(self) -> str:
        paired = "data" in self.overall["response_from"].to_list()
        which = ("prompts with both a data response and a generated one" if paired else
                 "prompts (no data responses to compare with: the generated responses alone)")
        with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, float_precision=4,
                       tbl_rows=100, tbl_cols=-1, tbl_width_chars=200):
            return (f"Exposure bias over {self.prompts} {which}\n"
                    f"{self.overall}\nalong the response (token index within it)\n{self.along}")


def _bin_label(edges: tuple[int, ...]) -> pl.Expr:
    index = pl.col("index")
    expr = pl.lit(f">={edges[-1]}")
    for low, high in reversed(list(zip(edges, edges[1:]))):
        expr = pl.when(index < high).then(pl.lit(f"{low}-{high - 1}")).otherwise(expr)
    return expr


def exposure_bias(table: TokenTable | pl.DataFrame, *, edges: tuple[int, ...] = EDGES) -> ExposureBias:
    """Teacher u, KL, reverse KL (and TKD, DKD) on data and generated responses of the same prompts."""
    frame = table.lazy if isinstance(table, TokenTable) else table.lazy()
    if "response_from" not in frame.collect_schema().names():
        raise ValueError("This table has no generated responses (no response_from column): make it with "
                         "kdviz.analyze(..., generate='student') or kdviz analyze --generate student.")
    rows = (frame.filter(pl.col("is_response"))
            .with_columns(prompt=PROMPT,
                          index=pl.col("position") - pl.col("position").min().over("doc_id")))
    kinds = rows.group_by("prompt").agg(pl.col("response_from").n_unique().alias("kinds"),
                                        (pl.col("response_from") == "data").any().alias("has_data"))
    both = kinds.filter(pl.col("has_data") & (pl.col("kinds") > 1)).select("prompt")
    if both.select(pl.len()).collect().item() == 0:  # prompt-only data: the generated responses alone
        both = kinds.select("prompt")
    rows = rows.join(both, on="prompt", how="semi")
    means = [pl.col(m).cast(pl.Float64).mean().alias(m) for m in METRICS]
    overall = (rows.group_by("response_from").agg(pl.col("doc_id").n_unique().alias("responses"),
                                                 pl.len().alias("tokens"), *means,
                                                 (pl.col("unc") > 0.5).mean().alias("share_u_above_half"))
               .sort("response_from").collect())
    along = (rows.with_columns(bin=_bin_label(edges), low=pl.col("index").clip(upper_bound=edges[-1]))
             .group_by("response_from", "bin").agg(pl.col("low").min(), pl.len().alias("tokens"), *means)
             .sort("response_from", "low").drop("low").collect())
    return ExposureBias(overall, along, both.select(pl.len()).collect().item())
