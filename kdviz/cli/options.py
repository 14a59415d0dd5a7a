"""Options several commands share, and small helpers to read them."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdviz.analysis import DEFAULT_BATCH_TOKENS, DEFAULT_PART_TOKENS
from kdviz.data import TEMPLATES

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


def command(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand with the shared epilog."""
    return commands.add_parser(name, help=help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_pair_options(parser: argparse.ArgumentParser, *, student_help: str, cache: bool = False) -> None:
    parser.add_argument("--teacher", required=not cache, help="teacher model: hub id, local folder, .gguf or zoo:NAME")
    if cache:
        parser.add_argument("--teacher-cache", default=None, metavar="DIR",
                            help="read the teacher from a top-k cache made by `kdviz teacher-cache` instead of "
                                 "running it (give --teacher or this)")
    parser.add_argument("--student", required=True, help=student_help)
    parser.add_argument("--data", required=True,
                        help="zoo:code, zoo:docstrings, zoo:topics, a .jsonl/.json/.parquet file of records, "
                             "or a text file/folder")


def add_data_options(parser: argparse.ArgumentParser) -> None:
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


def add_analysis_options(parser: argparse.ArgumentParser) -> None:
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


def fields(args) -> dict:
    return {"prompt_field": args.prompt_field, "response_field": args.response_field,
            "context_field": args.context_field}


def data_path(data: str) -> str | None:
    return None if data.startswith("zoo:") else data


def check_suffix(path: str, suffix: str, option: str) -> None:
    if not str(path).endswith(suffix):
        fixed = Path(path).with_name(Path(path).name.split(".")[0] + suffix)  # r.html.gz -> r.html
        raise ValueError(f"{option} {path!r} should end in {suffix} (it is written as {suffix[1:]}); "
                         f"e.g. {option} {fixed}.")


def parse_params(items: list[str]) -> dict:
    """--param NAME=VALUE items as a dict (numbers as floats)."""
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
