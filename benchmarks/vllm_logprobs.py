"""Score the data with a teacher in vLLM and write its top-k prompt log-probs for `kdviz teacher-cache --from-logprobs`.

For a GPU machine with vLLM and kdviz installed (it cannot run without one):

    python benchmarks/vllm_logprobs.py --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2.5-0.5B-Instruct \\
        --data train.jsonl --max-length 2048 --top-k 64 --out logprobs/
    kdviz teacher-cache --from-logprobs logprobs/ --student Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl \\
        --max-length 2048 --out teacher-cache/

The data is tokenized by kdviz for the student, exactly as the second command will (give both the
same --data, --template, --limit and --max-length), and vLLM scores those token ids (TokensPrompt),
so the file's ids are the student's tokenization. With ``SamplingParams(prompt_logprobs=k)`` vLLM
returns, per prompt, a list with one entry per token: None for the first, then for token t a dict
token id -> Logprob(logprob, rank, decoded_token) holding the k most likely tokens at t and the
actual token (k or k + 1 entries). vLLM caps k at the engine's ``max_logprobs`` (20 by default),
hence ``LLM(..., max_logprobs=k)``. Its log-probs are those of the raw model (``logprobs_mode``
"raw_logprobs", the default: before temperature or penalties): the cache is at temperature 1.

Written as one parquet file per chunk of examples (``part-00000.parquet``, ...; a chunk already
written is skipped when the script is run again), one row per example:

- ``input_ids``: list[int];
- ``topk_ids`` / ``topk_logprobs``: list[list[int]] / list[list[float]], per position t the top-k of
  the teacher's distribution over token t, largest first (empty at t = 0 and, unless
  --all-positions, at positions kdviz does not train on: the prompt of instruction data);
- ``target_logprobs``: list[float], per position t the log-prob of input_ids[t] (null at t = 0).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="a model vLLM can load (hub id or folder)")
    parser.add_argument("--student", required=True, help="the student: its tokenizer tokenizes the data")
    parser.add_argument("--data", required=True, help="as for kdviz: zoo:NAME, a .jsonl/.json/.parquet file, a folder")
    parser.add_argument("--template", default="auto")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None, help="context (default: the student's)")
    parser.add_argument("--truncate", action="store_true")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="examples per parquet file")
    parser.add_argument("--all-positions", action="store_true", help="keep the top-k of prompt positions too")
    parser.add_argument("--dtype", default="auto", help="vLLM dtype of the teacher (auto: its config's)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--out", required=True, help="folder for the parquet files")
    args = parser.parse_args()

    from kdviz.data import read_data, target_positions, tokenize, usable_context
    from kdviz.models import load_tokenizer, model_context

    tokenizer = load_tokenizer(args.student)
    length = usable_context(model_context(args.student), args.max_length)  # the rule `--from-logprobs` uses
    dataset = tokenize(read_data(args.data, limit=args.limit), tokenizer, max_length=length, limit=args.limit,
                       template=args.template, truncate=args.truncate)
    print(f"{len(dataset)} examples, {dataset.n_targets:,} target tokens ({dataset.description}, template "
          f"{dataset.template}, context {length})")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.teacher, max_logprobs=args.top_k, max_model_len=length, dtype=args.dtype,
              tensor_parallel_size=args.tensor_parallel_size, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=1, prompt_logprobs=args.top_k, detokenize=False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, len(dataset), args.chunk)):
        file = out / f"part-{number:05d}.parquet"
        if file.exists():
            continue
        examples = dataset.examples[start:start + args.chunk]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ex.input_ids) for ex in examples], params)
        rows = [example_row(ex, output.prompt_logprobs, args.top_k,
                            None if args.all_positions else {p + 1 for p in target_positions(ex)})
                for ex, output in zip(examples, outputs)]
        write_rows(rows, file)
        print(f"{file}: examples {start}..{start + len(examples) - 1}")


def example_row(example, prompt_logprobs, k: int, keep: set[int] | None) -> dict:
    """One example's row from vLLM's prompt_logprobs (a list with None first, then dicts token id -> Logprob)."""
    topk_ids, topk_logprobs, target = [[]], [[]], [None]
    for t in range(1, len(example.input_ids)):
        entry = prompt_logprobs[t]
        token = example.input_ids[t]
        target.append(float(entry[token].logprob))
        if keep is not None and t not in keep:
            topk_ids.append([])
            topk_logprobs.append([])
            continue
        ranked = sorted(entry.items(), key=lambda item: (item[1].rank or 0, -item[1].logprob))
        ranked = [(tid, lp) for tid, lp in ranked if lp.rank is None or lp.rank <= k][:k]  # (the actual token may
        topk_ids.append([int(tid) for tid, _ in ranked])  # be an extra entry ranked past k)
        topk_logprobs.append([float(lp.logprob) for _, lp in ranked])
    return {"input_ids": list(example.input_ids), "topk_ids": topk_ids, "topk_logprobs": topk_logprobs,
            "target_logprobs": target}


def write_rows(rows: list[dict], file: Path) -> None:
    import polars as pl

    schema = {"input_ids": pl.List(pl.Int64), "topk_ids": pl.List(pl.List(pl.Int64)),
              "topk_logprobs": pl.List(pl.List(pl.Float32)), "target_logprobs": pl.List(pl.Float32)}
    temp = file.with_name(file.name + ".tmp")
    pl.DataFrame(rows, schema=schema).write_parquet(temp)
    temp.rename(file)  # a chunk is there whole or not at all


if __name__ == "__main__":
    main()
