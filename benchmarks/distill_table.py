"""Distil zoo:student from a zoo teacher with several objectives, same seed and budget; print a table.

    python benchmarks/distill_table.py                       # fkl rkl atkd okd, 300 steps each
    python benchmarks/distill_table.py --seeds 0 1 2         # mean ± std over three seeds
    python benchmarks/distill_table.py --losses fkl atkd --steps 100 --teacher zoo:teacher-s

Each run goes through `kdviz.train.distill` (the same code as `kdviz distill`). Writes
benchmarks/results/distill.json and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import write_json  # noqa: E402  (benchmarks/decompose.py, same folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="+", default=["fkl", "rkl", "atkd", "okd"])
    parser.add_argument("--teacher", default="zoo:teacher-l")
    parser.add_argument("--student", default="zoo:student")
    parser.add_argument("--data", default="zoo:docstrings")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and objective")
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    args = parser.parse_args()

    from kdviz.train import distill

    rows = []
    for seed in args.seeds:
        for loss in args.losses:
            result = distill(args.teacher, args.student, args.data, loss=loss, steps=args.steps,
                             batch_size=args.batch_size, seed=seed, progress=False)
            rows.append({**result.row(), "seed": seed, "agreement_before": result.before.agreement,
                         "rouge_l_before": result.before.rouge_l})
            print(f"seed {seed} {loss:>6}: eval loss {result.before.loss:.3f} -> {result.after.loss:.3f}  agreement "
                  f"{result.after.agreement:.3f}  ROUGE-L {result.after.rouge_l:.3f}  {result.train_seconds:.0f} s",
                  flush=True)
    runs = pl.DataFrame(rows)
    write_json(args.out, {"teacher": args.teacher, "student": args.student, "data": args.data, "steps": args.steps,
                          "batch_size": args.batch_size, "seeds": args.seeds, "threads": torch.get_num_threads(),
                          "machine": platform.processor() or platform.machine(), "runs": rows})
    print(markdown_table(runs))


def markdown_table(runs: pl.DataFrame) -> str:
    """Mean (and spread over seeds when there are several) per objective; the untrained student first."""
    def cell(values: pl.Series) -> str:
        return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")

    lines = ["| objective | held-out loss | top-1 agreement | ROUGE-L | train time |", "|---|---:|---:|---:|---:|"]
    first = runs.filter(pl.col("loss") == runs["loss"][0])
    lines.append(f"| (student before) | {cell(first['eval_loss_before'])} | {cell(first['agreement_before'])} | "
                 f"{cell(first['rouge_l_before'])} | |")
    for loss in runs["loss"].unique(maintain_order=True):
        sub = runs.filter(pl.col("loss") == loss)
        lines.append(f"| `{loss}` | {cell(sub['eval_loss'])} | {cell(sub['agreement'])} | {cell(sub['rouge_l'])} | "
                     f"{sub['train_seconds'].mean():.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
