"""The paper's analyses as functions that return tables: the teacher ladder, teacher size vs student.

Notebooks 02 and 04 call these; each returns a polars DataFrame that the notebook shows and saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from kdviz import zoo
from kdviz.analysis import analyze
from kdviz.cache import TeacherCache, build
from kdviz.data import load_data
from kdviz.pair import load_pair
from kdviz.train import distill


@dataclass
class PairComparison:
    """The paper's analyses for several teacher/student pairs on the same data.

    `summary`: one row per (pair, group) with the analysis summary (`dkd_weight` is
    mean(u * DKD) / mean(DKD): how much of DKD plain KD keeps). `tokens`: one row per target
    token (pair, unc, tkd, dkd, kl, hard) for distributions.
    """

    summary: pl.DataFrame
    tokens: pl.DataFrame


def compare_pairs(pairs: list[tuple[str, str]], data, *, limit: int | None = None, k: float = 0.5,
                  template: str = "auto", device: str | None = None) -> PairComparison:
    """Analyse each (teacher, student) pair on `data` (same data, same k) and put the results side by side."""
    summaries, tokens = [], []
    for teacher, student in pairs:
        table = analyze(load_pair(teacher, student, device=device), data, k=k, limit=limit, template=template,
                        progress=False)
        label = pl.lit(f"{teacher} -> {student}")
        summaries.append(table.summary().table.with_columns(pair=label, teacher=pl.lit(teacher), student=pl.lit(student),
                                                            teacher_params=pl.lit(_parameters(teacher)),
                                                            template=pl.lit(table.meta.get("template"))))
        tokens.append(table.targets.select(pair=label, teacher=pl.lit(teacher), unc="unc", tkd="tkd", dkd="dkd",
                                           kl="kl", hard="hard"))
    first = ["pair", "teacher", "student", "teacher_params", "template"]
    return PairComparison(pl.concat(summaries).select(*first, pl.exclude(first)), pl.concat(tokens))


def ladder_summary(teachers: list[str], student: str, data, *, limit: int | None = None, k: float = 0.5,
                   device: str | None = None) -> pl.DataFrame:
    """One row per (teacher, group): the analysis summary of each teacher against the same student."""
    return compare_pairs([(t, student) for t in teachers], data, limit=limit, k=k, device=device).summary


def _parameters(name: str) -> int | None:
    if isinstance(name, str) and name.startswith(zoo.PREFIX):
        return zoo.manifest(name).get("parameters")
    return None


def teacher_size_study(teachers: list[str], student: str, data, *, losses=("fkl", "atkd"), steps: int = 50,
                       callbacks=None, cache_dir: str | Path | None = None, top_k: int = 64,
                       **distill_options) -> pl.DataFrame:
    """Distil the student from each teacher with each loss (same seed and budget); one row per run.

    With `cache_dir`, each teacher runs once: its top-k cache (`kdviz.teacher_cache`) is made
    there (or reused) and every loss but OKD reads the teacher from it.
    """
    rows = []
    for teacher in teachers:
        cache = None if cache_dir is None else teacher_cache_for(teacher, student, data, cache_dir, top_k=top_k,
                                                                 **distill_options)
        for loss in losses:
            cached = cache is not None and loss != "okd"
            result = distill(None if cached else teacher, student, data, loss=loss, steps=steps, callbacks=callbacks,
                             teacher_cache=cache if cached else None, **distill_options)
            rows.append({**result.row(), "teacher": teacher, "teacher_params": _parameters(teacher),
                         "teacher_agreement_before": result.before.agreement,
                         "teacher_from": "cache" if cached else "live"})
    return pl.DataFrame(rows)


def teacher_cache_for(teacher: str, student: str, data, folder: str | Path, *, top_k: int = 64, limit=None,
                      template: str = "auto", max_length: int | None = None, **_) -> Path:
    """A top-k cache of `teacher` on `data` in `folder` (tokenized for the pair), made once and reused."""
    pair = load_pair(teacher, student, device="cpu")
    context = pair.context(max_length)
    dataset = load_data(data, pair.tokenizer, max_length=context, limit=limit, template=template)
    path = Path(folder) / f"{teacher.replace(':', '-').replace('/', '-')}-{dataset.fingerprint[:8]}-k{top_k}"
    if not (path / "meta.json").is_file():
        build(pair.teacher, pair.tokenizer, dataset, path, top_k=top_k, teacher_name=teacher, max_length=context,
              progress=False)
    TeacherCache.open(path).check(dataset, pair.tokenizer)
    return path


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


ABLATIONS = ("fkl", "atkd", "kd-on-hard", "kd-on-easy", "tkd-alone", "dkd-alone", "tkd-on-easy", "tkd-on-hard")
# The paper's three analyses, as (question, first mode, second mode, what the paper found).
QUESTIONS = (
    ("KD on hard tokens only vs on easy tokens only", "kd-on-hard", "kd-on-easy", "hard tokens matter more"),
    ("TKD alone vs DKD alone (no u-weight)", "tkd-alone", "dkd-alone", "DKD contributes more"),
    ("TKD on easy tokens vs on hard tokens", "tkd-on-easy", "tkd-on-hard",
     "TKD on easy tokens over-fits (worse held-out); on hard tokens it helps"),
)


def teaching_mode_study(teacher: str, student: str, data, *, losses=ABLATIONS, seeds=(0, 1, 2), steps: int = 100,
                        cache_dir: str | Path, top_k: int | None = 64, probe_every: int | None = None, callbacks=None,
                        **distill_options) -> pl.DataFrame:
    """The paper's teaching-mode ablations (plus fkl and atkd), distilled from a top-k cache of `teacher` (or from
    the live teacher with `top_k=None`: no top-k approximation of DKD), each loss with each seed and the same
    budget; one row per run with the held-out metrics and the token outcomes (mean change in KL of the hard and
    of the easy probe tokens, shares learned and made worse)."""
    cache = None if top_k is None else teacher_cache_for(teacher, student, data, cache_dir, top_k=top_k,
                                                         **distill_options)
    rows = []
    for seed in seeds:
        for loss in losses:
            result = distill(None if cache else teacher, student, data, loss=loss, steps=steps, seed=seed,
                             teacher_cache=cache,
                             probe_every=probe_every or max(1, steps // 10), callbacks=callbacks, **distill_options)
            rows.append({**result.row(), "seed": seed, **token_outcomes(result)})
    return pl.DataFrame(rows)


def token_outcomes(result) -> dict:
    """A run's probe tokens: mean KL change on hard and easy tokens, shares learned and worse (see kdviz.compare)."""
    from kdviz.comparison import compare

    comparison = compare(result, labels=["run"])
    summary = {row["group"]: row for row in comparison.summary().iter_rows(named=True)}
    return {"kl_change_hard": summary["hard"]["change"], "kl_change_easy": summary["easy"]["change"],
            "learned": summary["all"]["learned"], "worse": summary["all"]["worse"],
            "probe_seconds": result.probe_seconds, "tolerance": comparison.tolerance}


def study_table(runs: pl.DataFrame) -> pl.DataFrame:
    """Mean and spread over seeds per loss, in the order the losses were run."""
    metrics = ["eval_loss", "agreement", "rouge_l", "kl_change_hard", "kl_change_easy", "learned", "worse",
               "train_seconds"]
    return runs.group_by("loss", maintain_order=True).agg(
        pl.len().alias("seeds"), *(pl.col(m).mean().alias(m) for m in metrics),
        *(pl.col(m).std().alias(f"{m}_std") for m in ("eval_loss", "agreement")))


def study_conclusion(runs: pl.DataFrame) -> str:
    """What the numbers say about each of the paper's three questions, computed from `runs` (never written ahead):
    which side has the lower held-out loss, by how much on average, and in how many seeds."""
    lines = []
    for question, first, second, paper in QUESTIONS:
        a, b = (runs.filter(pl.col("loss") == name).sort("seed") for name in (first, second))
        if a.is_empty() or b.is_empty():
            continue
        paired = a.select("seed", first=pl.col("eval_loss")).join(b.select("seed", second=pl.col("eval_loss")),
                                                                    on="seed")
        wins = int((paired["first"] < paired["second"]).sum())
        gap = float((paired["second"] - paired["first"]).mean())
        better = first if gap > 0 else second
        lines.append(f"{question}: {better} gives the lower held-out loss by {abs(gap):.3f} nats on average "
                     f"({first} lower in {wins} of {paired.height} seeds). The paper found: {paper}. "
                     f"Token outcomes: mean KL change on hard / easy probe tokens {a['kl_change_hard'].mean():+.4f} / "
                     f"{a['kl_change_easy'].mean():+.4f} ({first}) against {b['kl_change_hard'].mean():+.4f} / "
                     f"{b['kl_change_easy'].mean():+.4f} ({second}).")
    if {"fkl", "atkd"} <= set(runs["loss"]):
        fkl, atkd = (runs.filter(pl.col("loss") == name)["eval_loss"].mean() for name in ("fkl", "atkd"))
        lines.append(f"ATKD against plain KD (fkl): held-out loss {atkd:.3f} against {fkl:.3f} "
                     f"({'ATKD' if atkd < fkl else 'fkl'} lower).")
    return "\n".join(lines)
