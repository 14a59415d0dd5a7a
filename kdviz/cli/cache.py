"""`kdviz teacher-cache`: run the teacher once and store its top-k per target token (or import or convert one)."""

from __future__ import annotations

from pathlib import Path

from kdviz import distributed
from kdviz.cache import build
from kdviz.cache.encoding import ENCODINGS
from kdviz.cache.importing import convert, from_logprobs
from kdviz.cache.writing import DEFAULT_PART_TOKENS, work_folder
from kdviz.checks import check_count, check_temperature
from kdviz.cli.options import add_data_options, command, data_path, fields
from kdviz.data import read_data, tokenize, usable_context
from kdviz.files import check_distinct, check_writable
from kdviz.models import (context_length, default_dtype, load_model, load_tokenizer, model_context, resolve_device,
                          tokenizer_fingerprint)


def add_parser(commands) -> None:
    cache = command(commands, "teacher-cache", "run the teacher once and store its top-k per target token")
    source = cache.add_mutually_exclusive_group(required=True)
    source.add_argument("--teacher", help="teacher model: hub id, local folder, .gguf or zoo:NAME")
    source.add_argument("--from-logprobs", metavar="FILE",
                        help="make the cache from top-k log-probs another tool wrote (a parquet file or folder, or a "
                             "datasets folder: input_ids, topk_ids, topk_logprobs[, target_logprobs] per example, as "
                             "vLLM's prompt_logprobs gives them; see docs/teacher-cache.md); needs --student")
    source.add_argument("--convert", metavar="CACHE", help="write this exact cache (also of an older kdviz) again "
                                                           "in --encoding (default compact) at --out")
    cache.add_argument("--data", help="the data you will distil or analyse on (same options; not with --convert)")
    cache.add_argument("--student", default=None,
                       help="the student you will use (recommended: its tokenizer is checked before the teacher runs, "
                            "and its context can be shorter than the teacher's)")
    cache.add_argument("--out", required=True, help="folder for the cache (written whole, then renamed into place)")
    cache.add_argument("--top-k", type=int, default=None,
                       help="teacher tokens kept per target token (default 64; with --from-logprobs: the file's)")
    cache.add_argument("--encoding", choices=ENCODINGS, default="compact",
                       help="compact (default: 159 bytes a token at k=64, u and TKD as exact, DKD and KL ~0.1%% off per "
                            "token) or exact (float32 log-probs: 392 bytes at k=64)")
    cache.add_argument("--temperature", type=float, default=1.0,
                       help="teacher temperature (default 1; with --from-logprobs: the one the file was made at)")
    cache.add_argument("--part-tokens", type=int, default=DEFAULT_PART_TOKENS,
                       help=f"target tokens per part written as the run goes, the unit of resuming and of sharing "
                            f"between processes (default {DEFAULT_PART_TOKENS})")
    cache.add_argument("--batch-tokens", type=int, default=16384, help="most padded tokens per forward pass")
    cache.add_argument("--device", default=None, help="cpu or cuda")
    add_data_options(cache)


def run(args) -> None:
    if args.top_k is not None:
        check_count(args.top_k, "top_k", minimum=1)
    check_temperature(args.temperature)
    check_count(args.part_tokens, "part_tokens", minimum=1)
    check_count(args.batch_tokens, "batch_tokens", minimum=1)
    if args.convert:
        if args.data:
            raise ValueError("--convert re-encodes a cache as it is; leave --data (and the data options) out.")
        check_distinct({"--convert": args.convert, "--out": args.out})
        _check_out(args.out)
        done = convert(args.convert, args.out, encoding=args.encoding, part_tokens=args.part_tokens)
        return _report(done, f"the cache {args.convert}", args.out)
    if not args.data:
        raise ValueError("Give the data the cache is of: --data (zoo:NAME, a file or a folder).")
    if args.from_logprobs and not args.student:
        raise ValueError("--from-logprobs needs --student: the file's token ids are checked against the student's "
                         "tokenization of --data.")
    check_distinct({"--data": data_path(args.data), "--out": args.out, "--from-logprobs": args.from_logprobs})
    data = data_path(args.data)
    if data and Path(data).expanduser().is_dir() and Path(args.out).expanduser().resolve().is_relative_to(
            Path(data).expanduser().resolve()):
        raise ValueError(f"--out {args.out} is inside the --data folder {data}: the cache's files would be read as "
                         "data next time. Put the cache outside the data folder.")
    _check_out(args.out)
    source = read_data(args.data, limit=args.limit, **fields(args))
    usable_context(None, args.max_length)  # --max-length checked before the teacher loads
    if args.from_logprobs:
        return _import(args, source)
    device = distributed.local_device(resolve_device(args.device))
    teacher, tokenizer = load_model(args.teacher, device=device, dtype=default_dtype(device))
    length = usable_context(min((n for n in (context_length(teacher), _student_context(args, tokenizer)) if n),
                                default=None), args.max_length)
    dataset = tokenize(source, tokenizer, max_length=length, limit=args.limit, template=args.template,
                       truncate=args.truncate)
    cache = build(teacher.requires_grad_(False), tokenizer, dataset, args.out, top_k=args.top_k or 64,
                  temperature=args.temperature, teacher_name=args.teacher, max_length=length,
                  batch_tokens=args.batch_tokens, part_tokens=args.part_tokens, encoding=args.encoding)
    _report(cache, args.teacher, args.out)


def _check_out(out) -> None:
    if Path(out).expanduser().exists():
        raise ValueError(f"--out {out} exists; give a new folder (a cache is written whole, never over another).")
    check_writable(work_folder(out).parent, what="folder for --out", folder=True)


def _student_context(args, tokenizer) -> int | None:
    """The student's context, its tokenizer checked against the teacher's before the teacher's pass."""
    if not args.student:
        return None
    if tokenizer_fingerprint(load_tokenizer(args.student)) != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"--student {args.student} has another tokenizer than --teacher {args.teacher} "
                         "(vocabulary, special tokens or chat template differ), so it could not read this cache; "
                         "token-level KD needs one shared tokenizer: pick a student of the teacher's family.")
    return model_context(args.student)


def _import(args, source) -> None:
    tokenizer = load_tokenizer(args.student)
    length = usable_context(model_context(args.student), args.max_length)
    dataset = tokenize(source, tokenizer, max_length=length, limit=args.limit, template=args.template,
                       truncate=args.truncate)
    cache = from_logprobs(args.from_logprobs, tokenizer, dataset, args.out, top_k=args.top_k,
                          temperature=args.temperature, max_length=length, encoding=args.encoding,
                          part_tokens=args.part_tokens)
    _report(cache, f"the log-probs in {args.from_logprobs}", args.out)


def _report(cache, made_from: str, out) -> None:
    if not distributed.world().is_main:
        return
    meta = cache.meta
    print(f"Teacher cache of {made_from}: {meta['tokens']:,} target tokens of {meta['examples']} examples "
          f"({meta['data_description']}, template {meta['template']}), top-{meta['top_k']}, {cache.encoding}, "
          f"{meta['bytes_per_token']:.0f} bytes per token, {len(cache.parts)} part(s): {Path(out).resolve()}")
    for caveat in cache.caveats:
        print(f"Note: {caveat}.")
    print(f"Use it with the same --data options (--template, --limit, ...): kdviz distill --teacher-cache {out} "
          f"--student S ... or kdviz analyze --teacher-cache {out} --student S ...")
