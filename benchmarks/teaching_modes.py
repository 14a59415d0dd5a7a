"""The paper's analyses for the real pair next to the zoo's, as a markdown table (the README's).

    python benchmarks/teaching_modes.py          # zoo:docstrings and zoo:topics, 64 records each
"""

from __future__ import annotations

import argparse

import polars as pl

from decompose import write_json

PAIRS = [("zoo:teacher-l", "zoo:student"), ("zoo:smollm2-135m", "zoo:smollm2-student")]
COLUMNS = {"mean_unc": "mean u", "mean_tkd": "TKD", "mean_dkd": "DKD", "mean_weighted_dkd": "u·DKD", "mean_kl": "KL",
           "kl_share": "KL share", "dkd_weight": "u-weight on DKD"}


def markdown(summary: pl.DataFrame, data: str) -> str:
    lines = [f"| {data} | group | tokens | " + " | ".join(COLUMNS.values()) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    for row in summary.iter_rows(named=True):
        cells = [f"{row[c]:.1%}" if c == "kl_share" else f"{row[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {row['teacher']} ({row['template']}) | {row['group']} | {row['tokens']:,} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from kdviz.studies import compare_pairs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["zoo:docstrings", "zoo:topics"])
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/teaching_modes.json")
    args = parser.parse_args()
    results = {}
    for data in args.data:
        comparison = compare_pairs(PAIRS, data, limit=args.limit)
        print(markdown(comparison.summary, data) + "\n")
        results[data] = comparison.summary.to_dicts()
    write_json(args.out, {"pairs": PAIRS, "limit": args.limit, "summaries": results})


if __name__ == "__main__":
    main()
