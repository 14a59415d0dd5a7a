"""`kdviz demo` (analyse the real pair, or the zoo, and write a report) and `kdviz notebooks` (copy the notebooks)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import polars as pl

from kdviz.analysis import TokenTable, analyze
from kdviz.checks import check_count
from kdviz.files import check_writable
from kdviz.pair import load_pair
from kdviz.report import write_report
from kdviz.zoo import registry

DEMO_TEACHER, DEMO_STUDENT = "zoo:teacher-l", "zoo:student"
REAL_TEACHER, REAL_STUDENT = "zoo:smollm2-135m", "zoo:smollm2-student"
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"  # shipped inside the package


def add_parsers(commands) -> None:
    demo = commands.add_parser("demo", help="analyze the real pair (zoo:smollm2-135m -> zoo:smollm2-student) or "
                                            "the embedded zoo and write an HTML report")
    demo.add_argument("--out", default="kdviz-out", help="output folder (default ./kdviz-out)")
    demo.add_argument("--limit", type=int, default=None,
                      help="examples per dataset (default: 16 with the real pair, about 12k tokens, under a minute on 2 "
                           "CPU cores; 48 with the zoo)")
    demo.add_argument("--device", default=None, help="cpu or cuda")
    demo.add_argument("--teacher", default=None, help="another teacher (default: the real pair when fetched)")
    demo.add_argument("--student", default=DEMO_STUDENT, help="the student for --teacher (default zoo:student)")
    notebooks = commands.add_parser("notebooks", help="copy kdviz's notebooks into a folder of yours")
    notebooks.add_argument("--out", default="kdviz-notebooks", help="where (default ./kdviz-notebooks)")


def demo_pair() -> tuple[str, str, dict[str, int]]:
    """(teacher, student, {dataset: examples}) of `kdviz demo`: the real pair when it is fetched, else the zoo."""
    short = REAL_TEACHER.removeprefix(registry.PREFIX)
    if registry.fetched_manifest(short) or registry.gguf_file(short):
        return REAL_TEACHER, REAL_STUDENT, {"zoo:topics": 16, "zoo:docstrings": 16}
    return DEMO_TEACHER, DEMO_STUDENT, {"zoo:docstrings": 48, "zoo:code": 48}


def run_demo(args) -> None:
    if args.limit is not None:
        check_count(args.limit, "--limit", minimum=1)
    check_writable(args.out, what="--out folder", folder=True)  # before a minute of work, not after
    started = time.perf_counter()
    teacher, student, datasets = (args.teacher, args.student, {"zoo:docstrings": 48, "zoo:code": 48}) \
        if args.teacher else demo_pair()
    datasets = {data: args.limit or limit for data, limit in datasets.items()}
    pair = load_pair(teacher, student, device=args.device)
    tables = []
    for data, limit in datasets.items():
        print(f"Analyzing {teacher} -> {student} on {data} (first {limit} examples)")
        table = analyze(pair, data, limit=limit)
        tables.append(table.df.with_columns(dataset=pl.lit(data), doc_id=pl.col("doc_id") + len(tables) * 100_000))
    described = " + ".join(f"{data} (first {limit})" for data, limit in datasets.items())
    combined = TokenTable(pl.concat(tables), {**table.meta, "data": described})
    out = Path(args.out)
    parquet = combined.save(out / "demo_tokens.parquet")
    report = write_report(combined, out / "demo_report.html")
    print()
    print(combined.summary())
    print(f"\nDone in {time.perf_counter() - started:.0f} s.")
    print(f"Report:      {report.resolve()}  (open it in a browser; it works offline)")
    print(f"Token table: {parquet.resolve()}  (kdviz.TokenTable.load(path))")
    print("Explore:     kdviz notebooks --out my-notebooks && jupyter lab my-notebooks/01_token_inspector.ipynb  "
          "(or kdviz.widgets.TokenInspector(kdviz.TokenTable.load(path)) in any notebook)")


def run_notebooks(args) -> None:
    out = check_writable(args.out, what="--out folder", folder=True)
    if any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give another --out (kdviz never overwrites your notebooks).")
    shutil.copytree(NOTEBOOKS, out, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
                    dirs_exist_ok=True)
    print(f"Copied {len(list(out.glob('*.ipynb')))} notebooks to {out.resolve()}. Open them with: "
          f"jupyter lab {out / '01_token_inspector.ipynb'}")
