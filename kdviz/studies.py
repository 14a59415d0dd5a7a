"""The paper's analyses as functions that return tables: the teacher ladder, teacher size vs student.

Notebooks 02 and 04 call these; each returns a polars DataFrame that the notebook shows and saves.
"""

from __future__ import annotations

import polars as pl

from kdviz import zoo


def ladder_summary(teachers: list[str], student: str, data, *, limit: int | None = None, k: float = 0.5,
                   device: str | None = None) -> pl.DataFrame:
    """One row per (teacher, group): the analysis summary of each teacher against the same student.

    The `dkd_weight` column is mean(u * DKD) / mean(DKD): how much of DKD plain KD keeps.
    """
    from kdviz import analyze, load_pair

    frames = []
    for teacher in teachers:
        table = analyze(load_pair(teacher, student, device=device), data, k=k, limit=limit, progress=False)
        frames.append(table.summary().table.with_columns(teacher=pl.lit(teacher),
                                                         teacher_params=pl.lit(_parameters(teacher))))
    return pl.concat(frames).select("teacher", "teacher_params", pl.exclude("teacher", "teacher_params"))


def _parameters(name: str) -> int | None:
    if isinstance(name, str) and name.startswith(zoo.PREFIX):
        return zoo.manifest(name)["parameters"]
    return None


def teacher_size_study(teachers: list[str], student: str, data, *, losses=("fkl", "atkd"), steps: int = 50,
                       callbacks=None, **distill_options) -> pl.DataFrame:
    """Distil the student from each teacher with each loss (same seed and budget); one row per run."""
    from kdviz.train import distill

    rows = []
    for teacher in teachers:
        for loss in losses:
            result = distill(teacher, student, data, loss=loss, steps=steps, callbacks=callbacks, **distill_options)
            rows.append({**result.row(), "teacher_params": _parameters(teacher),
                         "teacher_agreement_before": result.before.agreement})
    return pl.DataFrame(rows)


def teacher_size_conclusion(runs: pl.DataFrame) -> str:
    """A plain-language reading of `teacher_size_study`'s table, computed from the numbers."""
    lines = []
    ordered = runs.sort("teacher_params")
    largest = ordered["teacher"][-1]
    for loss in ordered["loss"].unique(maintain_order=True):
        sub = ordered.filter(pl.col("loss") == loss)
        best = sub.sort("eval_loss").row(0, named=True)
        at_largest = sub.filter(pl.col("teacher") == largest)["eval_loss"][0]
        verdict = ("the largest teacher gave the best student" if best["teacher"] == largest else
                   f"a larger teacher did not give a better student: {best['teacher']} did best "
                   f"({best['eval_loss']:.3f} vs {at_largest:.3f} from {largest})")
        lines.append(f"With {loss}: {verdict}. Held-out loss by teacher: "
                     + ", ".join(f"{t} {v:.3f}" for t, v in zip(sub["teacher"], sub["eval_loss"])) + ".")
    if {"fkl", "atkd"} <= set(runs["loss"]):
        wide = runs.pivot(on="loss", index="teacher", values="eval_loss")
        better = wide.filter(pl.col("atkd") < pl.col("fkl"))["teacher"].to_list()
        lines.append(f"ATKD beat plain KD (fkl) on held-out loss with {len(better)} of {len(wide)} teachers"
                     + (f" ({', '.join(better)})." if better else "."))
    return "\n".join(lines)
