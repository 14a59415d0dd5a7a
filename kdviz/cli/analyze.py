"""`kdviz analyze`: per-token uncertainty and TKD/DKD of a pair over a dataset -> a parquet table (+ a report).

A pair with different tokenizers gives a table of aligned groups instead (`kdviz.analysis.crosstok`)."""

from __future__ import annotations

from kdviz import distributed
from kdviz.analysis import GroupTable, analyze, check_options, exposure_bias
from kdviz.cli.options import (add_analysis_options, add_data_options, add_pair_options, check_suffix, command,
                               data_path, fields)
from kdviz.data import read_data
from kdviz.files import check_distinct, check_writable
from kdviz.generation import SOURCES, Sampling
from kdviz.models import resolve_device
from kdviz.pair import load_pair
from kdviz.report import write_group_report, write_report


def add_parser(commands) -> None:
    parser = command(commands, "analyze", "per-token uncertainty and TKD/DKD of a teacher/student pair")
    add_pair_options(parser, student_help="student model (with another tokenizer than the teacher's, the table has one row per "
                      "aligned group)", cache=True)
    parser.add_argument("--out", required=True, help="where to write the token table (.parquet)")
    parser.add_argument("--report", default=None, help="also write an offline HTML report here (.html)")
    add_data_options(parser)
    add_analysis_options(parser)
    group = parser.add_argument_group("generated responses (student-generated output)")
    group.add_argument("--generate", choices=SOURCES, default=None,
                       help="this model also writes responses to the data's prompts; both are analysed (the table's "
                            "response_from column) and an exposure-bias summary compares them")
    group.add_argument("--max-new-tokens", type=int, default=64, help="longest generated response (default 64)")
    group.add_argument("--sample-temperature", type=float, default=1.0,
                       help="sampling temperature of the generation, 0 = greedy (default 1)")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    group.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt (default 1)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (the same responses on any batch size)")


def run(args) -> None:
    check_options(k=args.k, split=args.split, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                  top_k=args.top_k, temperature=args.temperature, template=args.template)
    check_distinct({"--data": data_path(args.data), "--out": args.out, "--report": args.report})
    check_suffix(args.out, ".parquet", "--out")
    if args.report:
        check_suffix(args.report, ".html", "--report")
    for path, what in ((args.out, "--out file"), (args.report, "--report file")):
        if path:
            check_writable(path, what=what)
    if (args.teacher is None) == (args.teacher_cache is None):
        raise ValueError("Give the teacher as --teacher MODEL or --teacher-cache DIR (one of them).")
    sampling = None
    if args.generate is not None:
        if args.teacher_cache is not None:
            raise ValueError("--generate needs the live teacher to score the generated responses; a --teacher-cache "
                             "holds the teacher on the data's own tokens only. Give --teacher MODEL.")
        sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.sample_temperature, top_p=args.top_p,
                            samples_per_prompt=args.samples_per_prompt, seed=args.seed, batch_size=args.batch_size)
    # data checked before any model loads; prompt-only records need a model to write their responses
    source = read_data(args.data, limit=args.limit, need_response=args.generate is None, **fields(args))
    device = distributed.local_device(resolve_device(args.device))
    pair = load_pair(args.teacher, args.student, teacher_cache=args.teacher_cache, device=device)
    table = analyze(pair, source, k=args.k, split=args.split, batch_size=args.batch_size,
                    batch_tokens=args.batch_tokens, top_k=args.top_k, temperature=args.temperature, limit=args.limit,
                    template=args.template, truncate=args.truncate, cache=not args.no_cache, out=args.out,
                    max_length=args.max_length, part_tokens=args.part_tokens, lazy=True, generate=args.generate,
                    sampling=sampling)
    if not distributed.world().is_main:
        return
    if isinstance(table, GroupTable):
        return print_groups(table, args)
    print(table.summary())
    if args.generate is not None:
        print(f"\n{exposure_bias(table)}")
    if pair.source.top_k is not None:
        print(f"\nThe teacher was read from a top-{pair.source.top_k} cache: u and TKD are exact; DKD and KL use the "
              "top-k plus one tail bucket, a lower bound of the true values. Rows are the target tokens only.")
    print(f"\nToken table ({len(table):,} rows): {args.out}")
    if args.report:
        print(f"Report: {write_report(table, args.report)}")


def print_groups(table: GroupTable, args) -> None:
    """The summary of a pair across tokenizers, where its table went, and its report."""
    print(table.summary())
    print(f"\nGroup table ({len(table):,} aligned groups of {table.meta['examples']} examples): {args.out}")
    if args.report:
        print(f"Report (summary and the groups with the largest TKD): {write_group_report(table, args.report)}")
