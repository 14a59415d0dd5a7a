"""`kdviz compare RUN [RUN ...]`: what each fine-tune did to each probe token, side by side."""

from __future__ import annotations

from kdviz.cli.options import check_suffix, command
from kdviz.comparison import compare
from kdviz.files import check_distinct, check_writable


def add_parser(commands) -> None:
    parser = command(commands, "compare", "runs side by side, token by token (from their --probe-every probes)")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by kdviz distill --probe-every N")
    parser.add_argument("--labels", nargs="+", default=None, help="a name for each run (default: its folder's name)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="nats a token's KL must fall (rise) to count as learned (worse); default: 10%% of the "
                             "median KL before, at least 0.001")
    parser.add_argument("--out", default=None, help="write the per-token table here (.parquet)")
    parser.add_argument("--report", default=None, help="write an offline HTML report here (.html)")


def run(args) -> None:
    for path, suffix, option in ((args.out, ".parquet", "--out"), (args.report, ".html", "--report")):
        if path:
            check_suffix(path, suffix, option)
            check_writable(path, what=f"{option} file")
    check_distinct({"--out": args.out, "--report": args.report})
    comparison = compare(*args.runs, labels=args.labels, tolerance=args.tolerance)
    print(comparison)
    if args.out:
        print(f"\nPer-token table: {comparison.save(args.out)}")
    if args.report:
        print(f"Report: {comparison.report(args.report)}")
