"""The teacher top-k cache on the real pair: its size, how much faster a fine-tune step is, what top-k loses.

- bytes per target token at k = 16, 64, 256;
- time per fine-tune step with the teacher read from the top-64 cache vs run live (same
  student, data, batch and seed; target: >= 3x faster on CPU);
- the error of KL and DKD from top-k 16 / 64 / 256 against the exact values (u and TKD are
  exact at any k: their largest error is printed too).

    python benchmarks/teacher_cache.py           # zoo:smollm2-135m -> zoo:smollm2-student, zoo:docstrings (chat)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import polars as pl

from decompose import write_json

KS = (16, 64, 256)


def main() -> None:
    from kdviz import analyze, load_pair
    from kdviz.data import load_data
    from kdviz.cache import build
    from kdviz.train import distill

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="zoo:smollm2-135m")
    parser.add_argument("--student", default="zoo:smollm2-student")
    parser.add_argument("--data", default="zoo:docstrings")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="fine-tune steps timed per setting (batch 8)")
    parser.add_argument("--out", default="benchmarks/results/teacher_cache.json")
    args = parser.parse_args()
    pair = load_pair(args.teacher, args.student, device="cpu")
    data = load_data(args.data, pair.tokenizer, max_length=args.max_length, limit=args.limit)
    exact = analyze(pair, data, cache=False, progress=False).df.filter(pl.col("is_response"))
    result = {"teacher": args.teacher, "student": args.student, "data": data.description, "tokens": exact.height,
              "template": data.template, "k": {}}
    with tempfile.TemporaryDirectory() as folder:
        for k in KS:
            cache = build(pair.teacher, pair.tokenizer, data, Path(folder) / f"k{k}", top_k=k,
                          teacher_name=args.teacher, max_length=args.max_length, progress=False)
            table = analyze(load_pair(None, args.student, teacher_cache=cache.folder, device="cpu"), data, cache=False,
                            progress=False).df
            errors = {}
            for name in ("kl", "dkd"):
                gap = exact[name] - table[name]  # >= 0: a lower bound
                errors[name] = {"mean_exact": exact[name].mean(), "mean_cached": table[name].mean(),
                                "relative_error_of_mean": gap.sum() / exact[name].sum(), "max_abs_error": gap.abs().max(),
                                "min_gap": gap.min()}
            errors["u_tkd_max_abs_error"] = max((exact[n] - table[n]).abs().max() for n in ("unc", "tkd"))
            result["k"][k] = {"bytes_per_token": cache.bytes_per_token, **errors}
            print(f"top-{k:<4} {cache.bytes_per_token:6.0f} B/token  KL {table['kl'].mean():.4f} vs exact "
                  f"{exact['kl'].mean():.4f} ({errors['kl']['relative_error_of_mean']:.1%} low)  DKD "
                  f"{table['dkd'].mean():.4f} vs {exact['dkd'].mean():.4f} "
                  f"({errors['dkd']['relative_error_of_mean']:.1%} low)  u, TKD max error "
                  f"{errors['u_tkd_max_abs_error']:.1e}", flush=True)
        common = dict(loss="fkl", steps=args.steps, batch_size=8, eval_size=4, limit=args.limit, device="cpu",
                      progress=False, max_length=args.max_length, eval_generate_examples=0)
        live = distill(args.teacher, args.student, args.data, **common)
        cached = distill(None, args.student, args.data, teacher_cache=str(Path(folder) / "k64"), **common)
    result["step_seconds"] = {"live": live.train_seconds / args.steps, "cache_k64": cached.train_seconds / args.steps}
    result["speedup"] = live.train_seconds / cached.train_seconds
    print(f"fine-tune step (fkl, batch 8): live teacher {result['step_seconds']['live']:.2f} s, from the top-64 cache "
          f"{result['step_seconds']['cache_k64']:.2f} s: {result['speedup']:.1f}x faster (target >= 3x)")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
