"""The paper's teaching-mode ablations on the real pair, from a top-k teacher cache; plus the probes' cost.

    python benchmarks/teaching_study.py                          # zoo:smollm2-135m -> zoo:smollm2-student, 3 seeds
    python benchmarks/teaching_study.py --seeds 0 --steps 20     # a quick look
    python benchmarks/teaching_study.py --seeds 0 --live         # the same without the top-k cache (exact DKD)

Each loss (fkl, atkd and the six ablations: kd-on-hard, kd-on-easy, tkd-alone, dkd-alone, tkd-on-easy,
tkd-on-hard) distils the student for the same steps, batch and learning rate with each seed, reading the
teacher from one top-64 cache (or the live teacher with --live), and probes the held-out examples every steps/10 steps. Writes
benchmarks/results/teaching_study.json (every run, the table by loss, the conclusion computed from the
numbers) and prints the table; the probes' share of each run's time is in the runs (probe_seconds /
train_seconds), with a probe's cost in training steps and the run length from which probes every steps/10 take
at most 10 % of it.

    python benchmarks/teaching_study.py --seeds 1 2 --add-to benchmarks/results/teaching_study_real.json ...

adds seeds to an earlier result (same settings, checked) and recomputes its table and conclusion.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import write_json

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from kdviz.studies import (
        ABLATIONS,
        study_conclusion,
        study_table,
        teaching_mode_study,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="zoo:smollm2-135m")
    parser.add_argument("--student", default="zoo:smollm2-student")
    parser.add_argument("--data", default="zoo:docstrings")
    parser.add_argument("--losses", nargs="+", default=list(ABLATIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--template", default="chat")
    parser.add_argument("--cache-dir", default=str(RESULTS / "caches"))
    parser.add_argument("--live", action="store_true",
                        help="distil from the live teacher instead of a top-64 cache (no top-k approximation of DKD)")
    parser.add_argument("--out", default=str(RESULTS / "teaching_study.json"))
    parser.add_argument("--add-to", help="an earlier result of this script with the same settings: its runs of "
                                         "other seeds are kept, the table and conclusion cover them all (to --out)")
    args = parser.parse_args()
    earlier = earlier_runs(args)
    runs = teaching_mode_study(args.teacher, args.student, args.data, losses=args.losses, seeds=args.seeds,
                               steps=args.steps, cache_dir=args.cache_dir, top_k=None if args.live else 64,
                               batch_size=args.batch_size,
                               learning_rate=args.learning_rate, limit=args.limit, max_length=args.max_length,
                               template=args.template, device="cpu", progress=False)
    import polars as pl

    if earlier is not None:
        runs = pl.concat([earlier.filter(~pl.col("seed").is_in(args.seeds)), runs], how="diagonal_relaxed")
    table, conclusion = study_table(runs), study_conclusion(runs)
    print(table)
    print(conclusion)
    shares = (runs["probe_seconds"] / runs["train_seconds"])
    print(f"probes' share of the run time: mean {shares.mean():.1%}, max {shares.max():.1%}")
    cost = probe_cost(runs)
    print(f"a probe costs {cost['probe_in_steps']:.2f} training steps (mean over runs); at --probe-every steps/10 "
          f"({cost['probes_per_run']} probes a run) the probes take at most 10 % of a run from "
          f"{cost['steps_for_10_percent']} steps on")
    settings = {**vars(args), "seeds": sorted(set(runs["seed"].to_list()))}
    write_json(Path(args.out), {"settings": settings, "runs": runs.to_dicts(), "table": table.to_dicts(),
                                "conclusion": conclusion, "probe_share_mean": float(shares.mean()),
                                "probe_share_max": float(shares.max()), "probe_cost": cost})


SAME = ("teacher", "student", "data", "losses", "steps", "batch_size", "learning_rate", "limit", "max_length",
        "template", "live")


def earlier_runs(args):
    """The runs of `--add-to`, after checking that they were made with the settings of this call."""
    if not args.add_to:
        return None
    import polars as pl

    earlier = json.loads(Path(args.add_to).read_text())
    there = earlier["settings"]
    differ = {k: (there.get(k), getattr(args, k)) for k in SAME if there.get(k) != getattr(args, k)}
    if differ:
        raise SystemExit(f"--add-to {args.add_to} was made with other settings ({differ}, as (there, here)); "
                         "run with the same ones, or write a new result")
    return pl.DataFrame(earlier["runs"])


def probe_cost(runs) -> dict:
    """A probe's time in training steps, and the steps from which probes every steps/10 are <= 10 % of a run.

    A run of S steps probes at 0, every max(1, S // 10) steps and at the end: 11 probes when 10 divides S. With a
    probe costing c steps, their share is 11 c / (S + 11 c), at most 10 % from S = 99 c on."""
    rows = []
    for run in runs.iter_rows(named=True):
        steps, every = run["steps"], max(1, run["steps"] // 10)
        probes = len(range(0, steps + 1, every)) + (steps % every != 0)
        step_seconds = (run["train_seconds"] - run["probe_seconds"]) / steps
        rows.append(run["probe_seconds"] / probes / step_seconds)
    c = sum(rows) / len(rows)
    return {"probe_in_steps": c, "probes_per_run": 11, "steps_for_10_percent": math.ceil(9 * 11 * c)}


if __name__ == "__main__":
    main()
