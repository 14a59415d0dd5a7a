"""The paper's teaching-mode ablations on the real pair, from a top-k teacher cache; plus the probes' cost.

    python benchmarks/teaching_study.py                          # zoo:smollm2-135m -> zoo:smollm2-student, 3 seeds
    python benchmarks/teaching_study.py --seeds 0 --steps 20     # a quick look
    python benchmarks/teaching_study.py --seeds 0 --live         # the same without the top-k cache (exact DKD)

Each loss (fkl, atkd and the six ablations: kd-on-hard, kd-on-easy, tkd-alone, dkd-alone, tkd-on-easy,
tkd-on-hard) distils the student for the same steps, batch and learning rate with each seed, reading the
teacher from one top-64 cache (or the live teacher with --live), and probes the held-out examples every steps/10 steps. Writes
benchmarks/results/teaching_study.json (every run, the table by loss, the conclusion computed from the
numbers) and prints the table; the probes' share of each run's time is in the runs (probe_seconds /
train_seconds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import write_json  # noqa: E402  (benchmarks/decompose.py, same folder)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    from kdviz.studies import ABLATIONS, study_conclusion, study_table, teaching_mode_study

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
    args = parser.parse_args()
    runs = teaching_mode_study(args.teacher, args.student, args.data, losses=args.losses, seeds=args.seeds,
                               steps=args.steps, cache_dir=args.cache_dir, top_k=None if args.live else 64,
                               batch_size=args.batch_size,
                               learning_rate=args.learning_rate, limit=args.limit, max_length=args.max_length,
                               template=args.template, device="cpu", progress=False)
    table, conclusion = study_table(runs), study_conclusion(runs)
    print(table)
    print(conclusion)
    shares = (runs["probe_seconds"] / runs["train_seconds"])
    print(f"probes' share of the run time: mean {shares.mean():.1%}, max {shares.max():.1%}")
    write_json(Path(args.out), {"settings": vars(args), "runs": runs.to_dicts(), "table": table.to_dicts(),
                                "conclusion": conclusion, "probe_share_mean": float(shares.mean()),
                                "probe_share_max": float(shares.max())})


if __name__ == "__main__":
    main()
