"""Distillation across tokenizers, offline: alignment statistics and fine-tunes next to a same-tokenizer baseline.

    python benchmarks/cross_tokenizer_study.py                       # both directions, 3 seeds (about an hour, CPU)
    python benchmarks/cross_tokenizer_study.py --directions down --seeds 0 --steps 10   # a quick look

Two directions, each a student taught by a teacher with another tokenizer and, as the baseline, by a teacher with
its own tokenizer:

- down: zoo:smollm2-135m (SmolLM2's 49,152 tokens) -> zoo:student (the zoo's GPT-2, 8,192 tokens); baseline
  zoo:teacher-l (GPT-2, 8,192 tokens) -> zoo:student;
- up: zoo:teacher-l -> zoo:smollm2-student (SmolLM2's tokenizer); baseline zoo:smollm2-135m -> zoo:smollm2-student.

Alignment statistics (`kdviz.analyze` of each cross pair on zoo:docstrings and zoo:topics): the share of groups
that are one-to-one, the teacher's mass on string-matched tokens, where alignment breaks. Fine-tunes
(`kdviz.train.distill`, the code of `kdviz distill`; same steps, batch and learning rate per seed): uld, gold and
cross-atkd across tokenizers, fkl and atkd with the baseline teacher. Each trained student is scored here on one
common held-out set, the data's last `--heldout` records in the student's tokenization and template (none of them
among the first `--limit` that training reads): its cross-entropy on their responses, against the initial
student's on the same tokens. (A run's own held-out split is not common: a pair across tokenizers skips records
that do not fit either model's context, so its split holds other records; those figures are kept as
`run_eval_loss`.) Also ROUGE-L of greedy continuations on the run's split and the wall-clock time. The conclusion
is computed from the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import write_json  # benchmarks/decompose.py, same folder

RESULTS = Path(__file__).resolve().parent / "results"
DIRECTIONS = {  # name: (cross teacher, baseline teacher, student)
    "down": ("zoo:smollm2-135m", "zoo:teacher-l", "zoo:student"),
    "up": ("zoo:teacher-l", "zoo:smollm2-135m", "zoo:smollm2-student"),
}
CROSS = ("uld", "gold", "cross-atkd")
BASELINE = ("fkl", "atkd")
DATASETS = ("zoo:docstrings", "zoo:topics")


def alignment(direction: str, args) -> list[dict]:
    import kdviz

    teacher, _, student = DIRECTIONS[direction]
    pair = kdviz.load_pair(teacher, student, device="cpu")
    out = []
    for data in DATASETS:
        summary = kdviz.analyze(pair, data, limit=args.align_limit, max_length=args.max_length, truncate=True,
                                progress=False).summary()
        broken = {r["text_class"]: r["groups"] for r in summary.breaks.iter_rows(named=True)}
        out.append({"direction": direction, "teacher": teacher, "student": student, "data": data,
                    "groups": summary.groups, "one_to_one": summary.one_to_one, "matched_mass": summary.matched_mass,
                    "vocabulary_share": summary.vocabulary_share, "breaks": broken})
        print(f"{direction} {data}:\n{summary}\n", flush=True)
    return out


def one_run(direction: str, loss: str, seed: int, args, folder: Path) -> dict:
    from kdviz.train import distill

    cross_teacher, baseline_teacher, student = DIRECTIONS[direction]
    teacher = cross_teacher if loss in CROSS else baseline_teacher
    started = time.perf_counter()
    result = distill(teacher, student, args.data, loss=loss, steps=args.steps, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, seed=seed, limit=args.limit, max_length=args.max_length,
                     truncate=True, out_dir=folder, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    return {"direction": direction, "loss": loss, "teacher": teacher, "student": student, "seed": seed,
            "across_tokenizers": loss in CROSS, "eval_loss": heldout_loss(folder, student, args),
            "eval_loss_before": initial_loss(student, args),
            "run_eval_loss": result.after.loss, "run_eval_loss_before": result.before.loss,
            "rouge_l": result.after.rouge_l, "rouge_l_before": result.before.rouge_l,
            "run_seconds": seconds, "train_seconds": result.train_seconds}


_HELDOUT: dict = {}  # student name: (tokenizer, the held-out examples)
_BEFORE: dict = {}  # student name: the initial student's held-out loss


def initial_loss(student: str, args) -> float:
    if student not in _BEFORE:
        _BEFORE[student] = heldout_loss(student, student, args)
    return _BEFORE[student]


def heldout_loss(model_name, student: str, args) -> float:
    """Cross-entropy of a student (a zoo name or a saved run folder) on the responses of the data's last
    `args.heldout` records, tokenized by the student's tokenizer in its template (the same tokens for every run)."""
    import torch
    import torch.nn.functional as F

    from kdviz.data import IGNORE_INDEX, collate, load_data, pad_id
    from kdviz.models import load_model, load_tokenizer, model_logits

    if student not in _HELDOUT:
        tokenizer = load_tokenizer(student)
        data = load_data(args.data, tokenizer, max_length=args.max_length, truncate=True)
        if len(data) < args.limit + args.heldout:
            raise SystemExit(f"{args.data} has {len(data)} examples; --limit {args.limit} and --heldout {args.heldout} "
                             "need more. Lower them.")
        _HELDOUT[student] = (tokenizer, list(data)[-args.heldout:])
    tokenizer, examples = _HELDOUT[student]
    model = load_model(str(model_name), device="cpu", dtype=torch.float32)[0].eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), 8):
        batch = collate(examples[start : start + 8], pad_id=pad_id(tokenizer))
        labels = batch.labels[:, 1:]
        valid = labels != IGNORE_INDEX
        with torch.no_grad():
            logits = model_logits(model, batch.input_ids, batch.attention_mask)[:, :-1, : len(tokenizer)]
        total += float(F.cross_entropy(logits[valid].float(), labels[valid], reduction="sum"))
        count += int(valid.sum())
    return total / count


def summary(runs: pl.DataFrame) -> pl.DataFrame:
    order = {name: i for i, name in enumerate(CROSS + BASELINE)}
    return (runs.group_by("direction", "loss", "teacher", "student")
            .agg(pl.col("eval_loss").mean(), pl.col("eval_loss").std().alias("eval_loss_std"),
                 pl.col("eval_loss_before").mean(), pl.col("rouge_l").mean(), pl.col("run_seconds").mean(),
                 pl.len().alias("seeds"))
            .with_columns(order=pl.col("loss").replace_strict(order)).sort("direction", "order").drop("order"))


def listed(frame: pl.DataFrame, before: float) -> str:
    """'loss held-out CE (change)' per row, lowest first."""
    return ", ".join(f"{r['loss']} {r['eval_loss']:.4f} ({r['eval_loss'] - before:+.4f})"
                     for r in frame.sort("eval_loss").iter_rows(named=True))


def conclusion(table: pl.DataFrame, runs: pl.DataFrame) -> str:
    """Per direction: each loss's change of the held-out CE, and the best cross-tokenizer loss against the best
    same-tokenizer one, on average and seed by seed (computed from the numbers, not written ahead)."""
    lines = []
    for direction in table["direction"].unique(maintain_order=True).to_list():
        rows = table.filter(pl.col("direction") == direction)
        cross, same = rows.filter(pl.col("loss").is_in(CROSS)), rows.filter(pl.col("loss").is_in(BASELINE))
        if not cross.height or not same.height:
            lines.append(f"{direction}: not enough runs (a cross-tokenizer loss and a baseline are needed).")
            continue
        best_cross, best_same = cross.sort("eval_loss").row(0, named=True), same.sort("eval_loss").row(0, named=True)
        before = best_cross["eval_loss_before"]


        pairs = (runs.filter((pl.col("direction") == direction) & (pl.col("loss") == best_cross["loss"]))
                 .join(runs.filter((pl.col("direction") == direction) & (pl.col("loss") == best_same["loss"])),
                       on="seed", suffix="_same"))
        wins = int((pairs["eval_loss"] < pairs["eval_loss_same"]).sum())
        cross_gain, same_gain = before - best_cross["eval_loss"], before - best_same["eval_loss"]
        if same_gain > 0 and cross_gain > 0:
            verdict = f"recovers {cross_gain / same_gain:.0%} of the best baseline's improvement"
        elif same_gain > 0:
            verdict = "does not improve on the initial student, while the best baseline does"
        else:
            verdict = ("ends " + ("below" if best_cross["eval_loss"] < best_same["eval_loss"] else "above")
                       + " the best baseline, and no run of either kind improved on the initial student")
        lines.append(
            f"{direction} ({best_cross['teacher']} -> {best_cross['student']} across tokenizers; baseline "
            f"{best_same['teacher']}): held-out CE {before:.4f} before. Across tokenizers: {listed(cross, before)}. "
            f"Baseline: {listed(same, before)}. The best cross-tokenizer loss, {best_cross['loss']}, {verdict}; it is lower "
            f"than {best_same['loss']} in {wins} of {pairs.height} seeds.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=list(DIRECTIONS))
    parser.add_argument("--losses", nargs="+", default=list(CROSS + BASELINE), choices=list(CROSS + BASELINE))
    parser.add_argument("--data", default="zoo:docstrings")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--heldout", type=int, default=64, help="the data's last N records: the common held-out set")
    parser.add_argument("--align-limit", type=int, default=32, help="records per dataset for the alignment statistics")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--skip-alignment", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "cross_tokenizer_study.json"))
    parser.add_argument("--recompute", action="store_true",
                        help="no runs: the table and conclusion again from the runs already in --out")
    args = parser.parse_args()
    if args.recompute:
        written = json.loads(Path(args.out).read_text())
        report(Path(args.out), written["settings"], written["alignment"], written["runs"], show=True)
        return
    aligned = [] if args.skip_alignment else [row for d in args.directions for row in alignment(d, args)]
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for direction in args.directions:
                for loss in args.losses:
                    runs.append(one_run(direction, loss, seed, args, Path(scratch) / f"{direction}-{loss}-{seed}"))
                    print(runs[-1], flush=True)
                    report(Path(args.out), vars(args), aligned, runs, show=False)
    report(Path(args.out), vars(args), aligned, runs, show=True)


def report(out: Path, settings: dict, aligned: list, runs: list[dict], *, show: bool) -> None:
    """Write the runs, their table and the conclusion to `out` (and print the last two when `show`)."""
    frame = pl.DataFrame(runs)
    table = summary(frame)
    text = conclusion(table, frame)
    write_json(out, {"settings": settings, "alignment": aligned, "runs": runs, "table": table.to_dicts(),
                     "conclusion": text}, quiet=True)
    if show:
        with pl.Config(tbl_rows=40, tbl_cols=20, float_precision=4, tbl_width_chars=200):
            print(table)
        print(text)


if __name__ == "__main__":
    main()
