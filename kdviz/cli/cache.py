"""`kdviz teacher-cache`: run the teacher once over the data and store its top-k per target token."""

from __future__ import annotations

from pathlib import Path

from kdviz.cache import build
from kdviz.checks import check_count, check_temperature
from kdviz.cli.options import add_data_options, command, data_path, fields
from kdviz.data import read_data, tokenize, usable_context
from kdviz.files import check_distinct, check_writable
from kdviz.models import (context_length, default_dtype, load_model, load_tokenizer, model_context, resolve_device,
                          tokenizer_fingerprint)


def add_parser(commands) -> None:
    cache = command(commands, "teacher-cache", "run the teacher once and store its top-k per target token")
    cache.add_argument("--teacher", required=True, help="teacher model: hub id, local folder, .gguf or zoo:NAME")
    cache.add_argument("--data", required=True, help="the data you will distil or analyse on (same options)")
    cache.add_argument("--student", default=None,
                       help="the student you will use (recommended: its tokenizer is checked before the teacher runs, "
                            "and its context can be shorter than the teacher's)")
    cache.add_argument("--out", required=True, help="folder for the cache (written whole, then renamed into place)")
    cache.add_argument("--top-k", type=int, default=64,
                       help="teacher tokens kept per target token (default 64: 392 bytes per token)")
    cache.add_argument("--temperature", type=float, default=1.0, help="teacher temperature (default 1)")
    cache.add_argument("--device", default=None, help="cpu or cuda")
    add_data_options(cache)


def run(args) -> None:
    check_count(args.top_k, "top_k", minimum=1)
    check_temperature(args.temperature)
    check_distinct({"--data": data_path(args.data), "--out": args.out})
    data = data_path(args.data)
    if data and Path(data).expanduser().is_dir() and Path(args.out).expanduser().resolve().is_relative_to(
            Path(data).expanduser().resolve()):
        raise ValueError(f"--out {args.out} is inside the --data folder {data}: the cache's files would be read as "
                         "data next time. Put the cache outside the data folder.")
    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} exists; give a new folder (a cache is written whole, never over another).")
    check_writable(Path(args.out).parent, what="folder for --out", folder=True)
    source = read_data(args.data, limit=args.limit, **fields(args))
    usable_context(None, args.max_length)  # --max-length checked before the teacher loads
    device = resolve_device(args.device)
    teacher, tokenizer = load_model(args.teacher, device=device, dtype=default_dtype(device))
    student_context = None
    if args.student:  # before the teacher's pass, not when the cache is used
        student_context = model_context(args.student)
        if tokenizer_fingerprint(load_tokenizer(args.student)) != tokenizer_fingerprint(tokenizer):
            raise ValueError(f"--student {args.student} has another tokenizer than --teacher {args.teacher} "
                             "(vocabulary, special tokens or chat template differ), so it could not read this cache; "
                             "token-level KD needs one shared tokenizer: pick a student of the teacher's family.")
    length = usable_context(min((n for n in (context_length(teacher), student_context) if n), default=None),
                            args.max_length)
    dataset = tokenize(source, tokenizer, max_length=length, limit=args.limit, template=args.template,
                       truncate=args.truncate)
    cache = build(teacher.requires_grad_(False), tokenizer, dataset, args.out, top_k=args.top_k,
                  temperature=args.temperature, teacher_name=args.teacher, max_length=length)
    meta = cache.meta
    print(f"Teacher cache of {args.teacher}: {meta['tokens']:,} target tokens of {meta['examples']} examples "
          f"({meta['data_description']}, template {meta['template']}), top-{meta['top_k']}, "
          f"{meta['bytes_per_token']:.0f} bytes per token: {Path(args.out).resolve()}")
    print(f"Use it with the same --data options (--template, --limit, ...): kdviz distill --teacher-cache {args.out} "
          f"--student S ... or kdviz analyze --teacher-cache {args.out} --student S ...")
