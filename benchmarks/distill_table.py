"""Distil zoo:student from a zoo teacher with several objectives, same seed and budget; print a table.

    python benchmarks/distill_table.py                       # fkl rkl atkd okd, 300 steps each
    python benchmarks/distill_table.py --losses fkl atkd --steps 100 --teacher zoo:teacher-s

Each run goes through `kdviz.train.distill` (the same code as `kdviz distill`). Writes
benchmarks/results/distill.json and prints a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/distill.json")
    args = parser.parse_args()

    from kdviz.train import distill

    rows, before = [], None
    for loss in args.losses:
        result = distill(args.teacher, args.student, args.data, loss=loss, steps=args.steps,
                         batch_size=args.batch_size, seed=args.seed, progress=False)
        before = before or result.before
        rows.append(result.row())
        print(f"{loss:>6}: eval loss {result.after.loss:.3f}  agreement {result.after.agreement:.3f}  "
              f"ROUGE-L {result.after.rouge_l:.3f}  {result.train_seconds:.0f} s", flush=True)
    write_json(args.out, {"teacher": args.teacher, "student": args.student, "data": args.data, "steps": args.steps,
                          "batch_size": args.batch_size, "seed": args.seed, "threads": torch.get_num_threads(),
                          "machine": platform.processor() or platform.machine(), "before": before.__dict__,
                          "runs": rows})
    print(f"\n| objective | held-out loss | top-1 agreement | ROUGE-L | train time |")
    print("|---|---|---|---|---|")
    print(f"| (before) | {before.loss:.3f} | {before.agreement:.3f} | {before.rouge_l:.3f} | |")
    for row in rows:
        print(f"| {row['loss']} | {row['eval_loss']:.3f} | {row['agreement']:.3f} | {row['rouge_l']:.3f} | "
              f"{row['train_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
