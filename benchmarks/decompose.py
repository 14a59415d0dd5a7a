"""Speed and memory of kdviz.decompose against the memory-bound floor.

The floor is one logsumexp pass over each logits tensor (teacher and student). Prints the
ratio time(decompose) / time(floor) (target <= 3) and the peak extra memory of each, each
measured in a fresh process, and writes everything to JSON.

    python benchmarks/decompose.py                 # BT=4096, V=32768, fp32, on this machine
    python benchmarks/decompose.py --rows 512 --vocab 4096 --out /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_worker(script: str, task: str, options: list[str]) -> dict:
    """Run `script --worker task OPTIONS` in a fresh process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, script, "--worker", task, *options], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {task} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_json(path: str, result: dict, *, quiet: bool = False) -> None:
    """Write `result` to `path` by rename (an interrupted benchmark never leaves half a file)."""
    from kdviz.files import write_with

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda temp: temp.write_text(json.dumps(result, indent=2) + "\n"), what="benchmark result")
    if not quiet:
        print(f"  written to {path}")


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(0)
    teacher = torch.randn(1, rows, vocab, generator=g, device=device).mul_(3).to(dtype)
    student = torch.randn(1, rows, vocab, generator=g, device=device).mul_(3).to(dtype)
    labels = torch.randint(vocab, (1, rows), generator=g, device=device)
    return teacher, student, labels


def run_floor(teacher, student, labels):
    return torch.logsumexp(teacher.float() if teacher.dtype != torch.float32 else teacher, -1), \
        torch.logsumexp(student.float() if student.dtype != torch.float32 else student, -1)


def run_decompose(teacher, student, labels):
    from kdviz import decompose

    return decompose(teacher, student, labels)


TASKS = {"floor": run_floor, "decompose": run_decompose}


def worker(task: str, rows: int, vocab: int, dtype: str, device: str) -> dict:
    """Peak extra memory of one call, in this (fresh) process."""
    inputs = make_inputs(rows, vocab, getattr(torch, dtype), device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        TASKS[task](*inputs)
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - before}
    before = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    TASKS[task](*inputs)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_extra_bytes": max(0, peak_after - max(before, peak_before))}


def time_task(task: str, inputs, device: str, repeats: int) -> float:
    TASKS[task](*inputs)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        TASKS[task](*inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096, help="B*T rows (default 4096)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size (default 32768)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/decompose.json")
    parser.add_argument("--worker", choices=list(TASKS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.vocab, args.dtype, args.device)))
        return

    options = ["--rows", str(args.rows), "--vocab", str(args.vocab), "--dtype", args.dtype, "--device", args.device]
    memory = {task: run_worker(__file__, task, options)["peak_extra_bytes"] for task in TASKS}
    inputs = make_inputs(args.rows, args.vocab, getattr(torch, args.dtype), args.device)
    seconds = {task: time_task(task, inputs, args.device, args.repeats) for task in TASKS}
    one_tensor = args.rows * args.vocab * inputs[0].element_size()
    result = {
        "rows": args.rows,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds": seconds,
        "time_ratio": seconds["decompose"] / seconds["floor"],
        "peak_extra_bytes": memory,
        "logits_tensor_bytes": one_tensor,
        "peak_extra_in_logits_tensors": memory["decompose"] / one_tensor,
    }
    print(f"BT={args.rows} V={args.vocab} {args.dtype} on {args.device} ({result['threads']} threads)")
    print(f"  floor (logsumexp of both):  {seconds['floor'] * 1e3:8.1f} ms   peak extra {memory['floor'] / 2**20:8.1f} MiB")
    print(f"  decompose:                  {seconds['decompose'] * 1e3:8.1f} ms   peak extra {memory['decompose'] / 2**20:8.1f} MiB")
    print(f"  time ratio decompose/floor: {result['time_ratio']:.2f}  (target <= 3)")
    print(f"  decompose peak extra = {result['peak_extra_in_logits_tensors']:.3f} x one [BT, V] logits tensor")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
