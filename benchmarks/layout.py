"""How far apart are tables computed with different layouts? (What "does not depend on batch size" means.)

Runs kdviz.analyze on a real pair with one example per forward pass (the reference), then
with length-bucketed batches to a token budget, with left padding, and in small parts, and
prints, per layout, the largest absolute difference of each per-token quantity and how many
hard flags differ. Differences come from float rounding in batched matrix products (padding
changes the shapes the kernels see); the printed figures are their size.

    python benchmarks/layout.py                      # zoo:smollm2-135m -> zoo:smollm2-student, CPU fp32
    python benchmarks/layout.py --teacher zoo:teacher-l --student zoo:student
"""

from __future__ import annotations

import argparse
import tempfile

import polars as pl
import torch

from decompose import write_json

LAYOUTS = {
    "bucketed, 16k-token batches": dict(batch_size=64, batch_tokens=16384),
    "bucketed, left padding": dict(batch_size=64, batch_tokens=16384, padding_side="left"),
    "4 sequences a batch, 2k-token parts": dict(batch_size=4, batch_tokens=10**9, part_tokens=2048),
}
QUANTITIES = ("unc", "tkd", "dkd", "kl", "rkl", "t_entropy", "s_entropy", "t_logp", "s_logp")


def main() -> None:
    from kdviz import analyze, load_pair

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="zoo:smollm2-135m")
    parser.add_argument("--student", default="zoo:smollm2-student")
    parser.add_argument("--data", default="zoo:docstrings")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/layout.json")
    args = parser.parse_args()
    pair = load_pair(args.teacher, args.student, device=args.device)

    def run(**layout) -> pl.DataFrame:
        with tempfile.TemporaryDirectory() as folder:
            return analyze(pair, args.data, limit=args.limit, split="dataset", cache_dir=folder, progress=False,
                           **layout).df

    reference = run(batch_size=1, batch_tokens=1)  # one example per forward pass, no padding
    print(f"{args.teacher} -> {args.student} on {args.data} (first {args.limit}), {reference.height:,} tokens, "
          f"{args.device}; largest |difference| to one example per forward pass:")
    results = {}
    for name, layout in LAYOUTS.items():
        table = run(**layout)
        assert table["token_id"].to_list() == reference["token_id"].to_list()
        diffs = {q: float((table[q] - reference[q]).abs().max()) for q in QUANTITIES}
        flips = int((table["hard"] != reference["hard"]).sum())
        results[name] = {"max_abs_difference": diffs, "hard_flags_differing": flips}
        print(f"  {name:<38} " + "  ".join(f"{q} {v:.1e}" for q, v in diffs.items() if q in ("unc", "kl", "dkd"))
              + f"  (all quantities <= {max(diffs.values()):.1e}); hard flags differing: {flips}")
    write_json(args.out, {"teacher": args.teacher, "student": args.student, "data": args.data, "limit": args.limit,
                          "device": args.device, "tokens": reference.height, "layouts": results})


if __name__ == "__main__":
    main()
