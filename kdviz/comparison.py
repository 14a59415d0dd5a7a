"""Runs side by side, token by token: what each fine-tune did to each probe token.

`compare(run, ...)` reads each run's probes (`trajectory.parquet`, written by `kdviz distill
--probe-every N`) and joins them on the probe tokens: the KL before (step 0) and after (the last
probe) of every run, the change, and an outcome per token:

- learned: its KL fell by more than the tolerance;
- worse: its KL rose by more than the tolerance;
- unchanged: otherwise.

The tolerance (`tolerance=`, else chosen as 10 % of the median KL before, at least 1e-3 nats)
keeps rounding-size moves out of the counts; it is stated in every summary and report.
Summaries group the tokens by hard/easy (the teacher's split) and by decile of teacher uncertainty.

>>> import polars as pl
>>> rows = lambda step, kl: pl.DataFrame({"step": [step] * 2, "doc_id": [0, 0], "position": [1, 2],
...     "token_id": [5, 6], "token": ["a", "b"], "unc": [0.1, 0.9], "kl": kl, "tkd": kl, "dkd": [0.0, 0.0],
...     "hard": [False, True]})
>>> run = pl.concat([rows(0, [0.5, 1.0]), rows(10, [0.1, 1.4])])
>>> compare(run, labels=["fkl"]).tokens["outcome_fkl"].to_list()
['learned', 'worse']
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kdviz.analysis.table import META_KEY
from kdviz.files import expand, write_text

KEYS = ("doc_id", "position", "token_id")
OUTCOMES = ("learned", "unchanged", "worse")
MIN_TOLERANCE = 1e-3


@dataclass
class Comparison:
    """Per-token before/after of several runs on one probe set (see the module doc)."""

    tokens: pl.DataFrame  # one row per probe token: keys, token, unc, hard, u_decile, kl_before, kl/change/outcome per run
    trajectories: pl.DataFrame  # every run's probes, with a `run` column
    runs: list[str]
    tolerance: float

    def summary(self) -> pl.DataFrame:
        """One row per (run, group): tokens, learned / unchanged / worse shares and the mean KL change."""
        return pl.concat([self._grouped(run, pl.when(pl.col("hard")).then(pl.lit("hard")).otherwise(pl.lit("easy")))
                          .vstack(self._grouped(run, pl.lit("all"))) for run in self.runs])

    def by_decile(self) -> pl.DataFrame:
        """One row per (run, decile of teacher uncertainty): the same numbers as `summary`."""
        return pl.concat([self._grouped(run, pl.col("u_decile").cast(pl.String)) for run in self.runs])

    def _grouped(self, run: str, group: pl.Expr) -> pl.DataFrame:
        outcome = pl.col(f"outcome_{run}")
        return (self.tokens.group_by(group.alias("group"), maintain_order=True)
                .agg(pl.len().alias("tokens"), pl.col("kl_before").mean().alias("kl_before"),
                     pl.col(f"kl_{run}").mean().alias("kl_after"), pl.col(f"change_{run}").mean().alias("change"),
                     *((outcome == name).mean().alias(name) for name in OUTCOMES))
                .sort("group").with_columns(run=pl.lit(run), tolerance=pl.lit(self.tolerance))
                .select("run", "group", "tokens", "kl_before", "kl_after", "change", *OUTCOMES, "tolerance"))

    def worst(self, run: str, n: int = 20) -> pl.DataFrame:
        """The `n` tokens whose KL rose most in `run` (its regressions)."""
        return self.tokens.sort(f"change_{run}", descending=True).head(n).select(
            "doc_id", "position", "token", "unc", "hard", "kl_before", f"kl_{run}", f"change_{run}")

    def trajectory(self, doc_id: int, position: int) -> pl.DataFrame:
        """One token's KL, TKD and DKD at every probe step of every run."""
        rows = self.trajectories.filter((pl.col("doc_id") == doc_id) & (pl.col("position") == position))
        return rows.sort("run", "step").select(c for c in ("run", "step", "kl", "tkd", "dkd", "s_logp") if c in rows.columns)

    def __str__(self) -> str:
        lines = [f"{len(self.tokens)} probe tokens; a token is learned (worse) when its KL fell (rose) by more than "
                 f"{self.tolerance:.4f} nats", ""]
        head = f"{'run':<24}{'group':<7}{'tokens':>7}{'KL before':>10}{'after':>8}{'learned':>9}{'same':>7}{'worse':>7}"
        lines.append(head)
        for r in self.summary().iter_rows(named=True):
            lines.append(f"{r['run'][:23]:<24}{r['group']:<7}{r['tokens']:>7}{r['kl_before']:>10.4f}{r['kl_after']:>8.4f}"
                         f"{r['learned']:>9.1%}{r['unchanged']:>7.1%}{r['worse']:>7.1%}")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> Path:
        from kdviz.files import write_with

        meta = json.dumps({"runs": self.runs, "tolerance": self.tolerance})
        return write_with(path, lambda temp: self.tokens.write_parquet(temp, metadata={META_KEY: meta}),
                          what="comparison table")

    def report(self, path: str | os.PathLike) -> Path:
        """An offline HTML report: the summaries, the change by uncertainty decile, the worst regressions."""
        return write_text(path, report_html(self), what="comparison report")


def _read_run(run) -> tuple[str, pl.DataFrame]:
    """(label, probes) of a run folder, a trajectory.parquet, a `DistillResult` with probes, or a probes table."""
    if isinstance(run, pl.DataFrame):
        return "run", run
    trajectory = getattr(run, "trajectory", None)
    if trajectory is not None:
        return str(getattr(run, "loss", "run")), trajectory
    path = expand(run)
    file = path / "trajectory.parquet" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{path} holds no probes (trajectory.parquet); give run folders written by `kdviz distill "
                         "--probe-every N`.")
    return path.name if path.is_dir() else path.parent.name, pl.read_parquet(file)


def _labels(labels: list[str]) -> list[str]:
    """The labels, made unique and safe as column suffixes."""
    out = []
    for label in labels:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "run"
        while safe in out:
            safe += "'"
        out.append(safe)
    return out


def _ends(probes: pl.DataFrame, label: str) -> pl.DataFrame:
    """A run's first and last probes side by side, checked to be one probe set."""
    first, last = int(probes["step"].min()), int(probes["step"].max())
    if first != 0:
        raise ValueError(f"The probes of {label} start at step {first}, not 0: the KL before training is unknown.")
    start, end = (probes.filter(pl.col("step") == s) for s in (first, last))
    if start.height != end.height:
        raise ValueError(f"The probes of {label} hold {start.height} tokens at step 0 and {end.height} at step {last}.")
    return start.select(*KEYS, "token", "unc", "hard", kl_before="kl").join(
        end.select(*KEYS, pl.col("kl").alias(f"kl_{label}")), on=KEYS, how="inner")


def compare(*runs, labels: list[str] | None = None, tolerance: float | None = None) -> Comparison:
    """Compare runs (folders with trajectory.parquet, `DistillResult`s, or probe tables) token by token."""
    if not runs:
        raise ValueError("compare needs at least one run (a folder written by `kdviz distill --probe-every N`).")
    read = [_read_run(run) for run in runs]
    names = _labels(labels if labels is not None else [label for label, _ in read])
    if len(names) != len(read):
        raise ValueError(f"{len(names)} labels for {len(read)} runs; give one label per run.")
    tokens = None
    for name, (_, probes) in zip(names, read):
        ends = _ends(probes, name)
        if tokens is None:
            tokens = ends
            continue
        if ends.height != tokens.height or not ends.select(KEYS).sort(KEYS).equals(tokens.select(KEYS).sort(KEYS)):
            raise ValueError(f"The run {name} was probed on other tokens than {names[0]}: compare runs probed on the "
                             "same probe set (the same --probe-data, or the same data, --eval-size and --seed).")
        tokens = tokens.join(ends.select(*KEYS, f"kl_{name}"), on=KEYS, how="left", maintain_order="left")
    return _outcomes(tokens, read, names, tolerance)


def _outcomes(tokens: pl.DataFrame, read, names: list[str], tolerance: float | None) -> Comparison:
    if tolerance is None:
        tolerance = max(MIN_TOLERANCE, 0.1 * float(tokens["kl_before"].median() or 0.0))
    elif not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be a number >= 0 (nats), got {tolerance!r}.")
    for name in names:
        change = pl.col(f"kl_{name}") - pl.col("kl_before")
        tokens = tokens.with_columns(change.alias(f"change_{name}")).with_columns(
            pl.when(pl.col(f"change_{name}") < -tolerance).then(pl.lit("learned"))
            .when(pl.col(f"change_{name}") > tolerance).then(pl.lit("worse")).otherwise(pl.lit("unchanged"))
            .alias(f"outcome_{name}"))
    tokens = tokens.with_columns(u_decile=(pl.col("unc").rank("ordinal") * 10 // (tokens.height + 1)).cast(pl.Int32))
    trajectories = pl.concat([probes.with_columns(run=pl.lit(name)) for name, (_, probes) in zip(names, read)],
                             how="diagonal_relaxed")
    return Comparison(tokens.sort("doc_id", "position"), trajectories, names, float(tolerance))


def report_html(comparison: Comparison) -> str:
    """The comparison as one self-contained HTML page (plotly inlined: opens offline)."""
    import plotly.graph_objects as go

    deciles = comparison.by_decile()
    figure = go.Figure([go.Scatter(x=sub["group"].to_list(), y=sub["change"].to_list(), mode="lines+markers", name=run)
                        for run, sub in ((run, deciles.filter(pl.col("run") == run)) for run in comparison.runs)])
    figure.update_layout(title="Mean change in KL by decile of teacher uncertainty (0 = most certain)",
                         xaxis_title="u decile", yaxis_title="KL after - KL before (nats)")
    tables = "".join(f"<h3>Worst regressions: {html.escape(run)}</h3>{_table(comparison.worst(run, 15))}"
                     for run in comparison.runs)
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>kdviz: runs compared</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px}} pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>What each run did to each token</h1><pre>{html.escape(str(comparison))}</pre>
{figure.to_html(full_html=False, include_plotlyjs=True)}{tables}</body></html>"""


def _table(df: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in df.iter_rows())
    return f"<table><tr>{head}</tr>{rows}</table>"
