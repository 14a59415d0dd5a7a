"""kdviz.analyze against the bare forward passes, on a real pair and mixed-length instruction data.

The bare forward passes are done the best simple way: examples sorted by length, batched to
the same token budget, `teacher(ids).logits` and `student(ids).logits` under inference_mode,
nothing else. analyze does those forward passes (without the logits: it makes them chunk by
chunk from the hidden states), the per-token decomposition with top-5, and writes the parquet
table. Each measurement runs in a fresh process; peak memory is the process's peak RSS (CPU)
or max_memory_allocated (CUDA) above what the loaded models hold. Prints and writes JSON:

- time(analyze) / time(bare forward) on the mixed data (target <= 1.25), tokens per second;
- peak extra memory for one 8,192-token document, analyze vs the bare forward;
- peak extra memory of analyze on 10x more documents than the mixed data (the same records ten
  times, so only the amount of data changes; target: < 20 % more).

    python benchmarks/analyze.py                    # zoo:smollm2-135m and its 10-layer cut, CPU fp32
    python benchmarks/analyze.py --student zoo:smollm2-student
    python benchmarks/analyze.py --device cuda --dtype bfloat16 --documents 256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import rss_bytes, run_worker, write_json  # noqa: E402  (benchmarks/decompose.py)

TASKS = ("bare:mixed", "analyze:mixed", "analyze:mixed10", "bare:long", "analyze:long")
LONG_TOKENS = 8192
BATCH_TOKENS = 16384


def load(teacher: str, student: str, device: str, dtype: str):
    """The pair; student "cut:N" is the teacher's first N layers (with its final norm and head)."""
    from kdviz import load_pair
    from kdviz.pair import ModelPair

    if not student.startswith("cut:"):
        return load_pair(teacher, student, device=device, dtype=getattr(torch, dtype))
    from transformers import AutoModelForCausalLM

    pair = load_pair(teacher, teacher, device=device, dtype=getattr(torch, dtype))
    config = pair.teacher.config.__class__(**{**pair.teacher.config.to_dict(), "num_hidden_layers": int(student[4:])})
    cut = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    cut.load_state_dict(pair.teacher.state_dict(), strict=False)  # the layers past N are dropped
    return ModelPair(pair.teacher, cut.to(device).eval().requires_grad_(False), pair.tokenizer,
                     teacher_name=teacher, student_name=f"{teacher} first {student[4:]} layers")


def dataset(kind: str, pair, documents: int):
    from kdviz.data import from_texts, load_data

    if kind == "long":  # one document of LONG_TOKENS tokens: the Python reference's prose, run together
        import pydoc_data.topics

        text = "\n\n".join(pydoc_data.topics.topics.values())
        return from_texts([text], pair.tokenizer, max_length=LONG_TOKENS, limit=1)
    mixed = load_data("zoo:docstrings", pair.tokenizer, max_length=LONG_TOKENS, limit=documents, template="chat")
    if kind == "mixed10":  # the same records ten times: 10x the data with the same length distribution
        mixed.examples = mixed.examples * 10
    return mixed


@torch.inference_mode()
def bare_forward(pair, data) -> None:
    """The best simple way: sort by length, batch to the token budget, both models' logits."""
    from kdviz.batching import length_batches
    from kdviz.data import collate, pad_id

    lengths = [len(ex.input_ids) for ex in data]
    for batch in length_batches(lengths, batch_size=64, batch_tokens=BATCH_TOKENS):
        padded = collate([data[i] for i in batch], pad_id=pad_id(pair.tokenizer))
        ids, mask = padded.input_ids.to(pair.device), padded.attention_mask.to(pair.device)
        pair.teacher(input_ids=ids, attention_mask=mask).logits
        pair.student(input_ids=ids, attention_mask=mask).logits


def run_analysis(pair, data) -> None:
    from kdviz import analyze

    with tempfile.TemporaryDirectory() as folder:
        analyze(pair, data, batch_size=64, batch_tokens=BATCH_TOKENS, cache_dir=folder, progress=False, lazy=True)


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(task: str, args) -> dict:
    pair = load(args.teacher, args.student, args.device, args.dtype)
    kind = task.split(":")[1]
    data = dataset(kind, pair, args.documents)
    run = bare_forward if task.startswith("bare") else run_analysis
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = max(rss_bytes(), peak_bytes(args.device))
    started = time.perf_counter()
    run(pair, data)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": sum(len(ex.input_ids) for ex in data), "documents": len(data),
            "peak_extra_bytes": max(0, peak_bytes(args.device) - base), "peak_bytes": peak_bytes(args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="zoo:smollm2-135m")
    parser.add_argument("--student", default="cut:10", help="a model, or cut:N for the teacher's first N layers")
    parser.add_argument("--documents", type=int, default=32, help="mixed-length instruction records (default 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="measure only these")
    parser.add_argument("--repeats", type=int, default=1, help="run the tasks this many times, interleaved; "
                                                                "keep the best time and the highest peak")
    parser.add_argument("--out", default="benchmarks/results/analyze.json")
    parser.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    options = ["--teacher", args.teacher, "--student", args.student, "--documents", str(args.documents),
               "--device", args.device, "--dtype", args.dtype]
    results = {}
    for task in [t for _ in range(args.repeats) for t in args.tasks]:  # interleaved, so drift hits both alike
        r = run_worker(__file__, task, options)
        best = results.setdefault(task, r)
        best.update(seconds=min(best["seconds"], r["seconds"]), peak_extra_bytes=max(best["peak_extra_bytes"],
                                                                                       r["peak_extra_bytes"]))
        print(f"  {task:<16} {r['documents']:>5} docs {r['tokens']:>8,} tokens  {r['seconds']:8.1f} s  "
              f"{r['tokens'] / r['seconds']:8.0f} tok/s  peak extra {r['peak_extra_bytes'] / 2**20:8.0f} MiB")
    print(f"{args.teacher} -> {args.student}, {args.dtype} on {args.device} ({torch.get_num_threads()} threads)")
    summary, mixed = {}, results.get("analyze:mixed")
    if mixed and "bare:mixed" in results:
        summary["time_ratio"] = mixed["seconds"] / results["bare:mixed"]["seconds"]
        summary["analyze_tokens_per_second"] = mixed["tokens"] / mixed["seconds"]
        print(f"  time ratio analyze / bare forward: {summary['time_ratio']:.2f}  (target <= 1.25); analyze "
              f"{summary['analyze_tokens_per_second']:.0f} tokens/s")
    if {"analyze:long", "bare:long"} <= results.keys():
        summary["long_document_peak_extra_mib"] = {k: results[f"{k}:long"]["peak_extra_bytes"] / 2**20
                                                   for k in ("analyze", "bare")}
        print(f"  one {LONG_TOKENS}-token document, peak extra: analyze "
              f"{summary['long_document_peak_extra_mib']['analyze']:.0f} MiB, bare forward "
              f"{summary['long_document_peak_extra_mib']['bare']:.0f} MiB")
    if mixed and "analyze:mixed10" in results:
        summary["ten_times_documents_memory_growth"] = \
            results["analyze:mixed10"]["peak_extra_bytes"] / mixed["peak_extra_bytes"] - 1
        print(f"  10x the documents: analyze's peak extra grows by "
              f"{summary['ten_times_documents_memory_growth']:+.1%} (target < 20 %)")
    write_json(args.out, {"teacher": args.teacher, "student": args.student, "device": args.device, "dtype": args.dtype,
                          "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "tasks": results, **summary})


if __name__ == "__main__":
    main()
