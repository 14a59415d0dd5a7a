"""Distil a student from a teacher with several objectives, same seed and budget; print a table.

    python benchmarks/distill_table.py                       # zoo: fkl rkl atkd okd, 300 steps each
    python benchmarks/distill_table.py --seeds 0 1 2         # mean ± std over three seeds
    python benchmarks/distill_table.py --losses fkl atkd --steps 100 --teacher zoo:teacher-s
    python benchmarks/distill_table.py --real --seeds 0 1 2  # the real pair, teacher read from a top-k cache

--teacher-cache DIR (or --real, which makes one under benchmarks/results/ if it is missing) reads the
teacher from a cache for every objective but okd, whose adapter needs the live teacher.

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
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; 200 with --real)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and objective")
    parser.add_argument("--template", default="auto")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--teacher-cache", default=None, help="read the teacher from this cache (not for okd)")
    parser.add_argument("--real", action="store_true",
                        help="zoo:smollm2-135m -> zoo:smollm2-student on zoo:docstrings (chat, up to 512 tokens), "
                             "200 steps, the teacher from a top-64 cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.real:
        args.teacher, args.student, args.max_length = REAL_TEACHER, REAL_STUDENT, 512
        args.steps = args.steps or 200
        args.teacher_cache = args.teacher_cache or real_cache(args)
    args.steps = args.steps or 300
    args.out = args.out or f"benchmarks/results/distill{'_real' if args.real else ''}.json"

    from kdviz.train import distill

    rows = []
    for seed in args.seeds:
        for loss in args.losses:
            cached = args.teacher_cache and loss != "okd"
            result = distill(None if cached else args.teacher, args.student, args.data, loss=loss, steps=args.steps,
                             batch_size=args.batch_size, seed=seed, progress=False, template=args.template,
                             max_length=args.max_length, teacher_cache=args.teacher_cache if cached else None)
            rows.append({**result.row(), "seed": seed, "agreement_before": result.before.agreement,
                         "rouge_l_before": result.before.rouge_l, "teacher_from": "cache" if cached else "live"})
            print(f"seed {seed} {loss:>6}: eval loss {result.before.loss:.3f} -> {result.after.loss:.3f}  agreement "
                  f"{result.after.agreement:.3f}  ROUGE-L {result.after.rouge_l:.3f}  {result.train_seconds:.0f} s",
                  flush=True)
            # after every run, so an interrupted sweep keeps what it finished
            write_json(args.out, {"teacher": args.teacher, "student": args.student, "data": args.data,
                                  "steps": args.steps, "teacher_cache": args.teacher_cache,
                                  "max_length": args.max_length, "batch_size": args.batch_size, "seeds": args.seeds,
                                  "threads": torch.get_num_threads(),
                                  "machine": platform.processor() or platform.machine(), "runs": rows}, quiet=True)
    print(f"  written to {args.out}")
    print(markdown_table(pl.DataFrame(rows)))


REAL_TEACHER, REAL_STUDENT = "zoo:smollm2-135m", "zoo:smollm2-student"


def real_cache(args) -> str:
    """A top-64 cache of the real teacher on the data (made once, kept under benchmarks/results/)."""
    from kdviz.data import load_data
    from kdviz.pair import load_pair
    from kdviz.cache import build

    folder = Path("benchmarks/results/cache-smollm2-docstrings-k64")
    if not (folder / "meta.json").is_file():
        pair = load_pair(REAL_TEACHER, REAL_STUDENT, device="cpu")
        dataset = load_data(args.data, pair.tokenizer, max_length=args.max_length, template=args.template)
        build(pair.teacher, pair.tokenizer, dataset, folder, top_k=64, teacher_name=REAL_TEACHER,
              max_length=args.max_length)
    return str(folder)


def markdown_table(runs: pl.DataFrame) -> str:
    """Mean (and spread over seeds when there are several) per objective; the untrained student first."""
    def cell(values: pl.Series) -> str:
        return f"{values.mean():.3f}" + (f" ± {values.std():.3f}" if len(values) > 1 else "")

    lines = ["| objective | teacher | held-out loss | top-1 agreement | ROUGE-L | train time |",
             "|---|---|---:|---:|---:|---:|"]
    first = runs.filter(pl.col("loss") == runs["loss"][0])
    lines.append(f"| (student before) | | {cell(first['eval_loss_before'])} | {cell(first['agreement_before'])} | "
                 f"{cell(first['rouge_l_before'])} | |")
    for loss in runs["loss"].unique(maintain_order=True):
        sub = runs.filter(pl.col("loss") == loss)
        lines.append(f"| `{loss}` | {sub['teacher_from'][0]} | {cell(sub['eval_loss'])} | {cell(sub['agreement'])} | "
                     f"{cell(sub['rouge_l'])} | {sub['train_seconds'].mean():.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
