"""One loss step (forward + backward on the student logits) per objective: fused vs plain.

Each measurement runs in a fresh process; peak extra memory is the high-water mark above
what the inputs already hold (on CPU from ru_maxrss, on CUDA from max_memory_allocated).
"official" is ATKD written the way the official code does it (softmaxes, gt/other masks,
masked_select copies); the target is fused ATKD <= 1/3 of its peak extra memory.
"NAME:linear" starts from hidden states [B, T, H] and LM-head weights [V, H] (student and
teacher) and never builds the logits; "NAME:head+plain" is the same step the usual way
(logits = hidden @ head.T, then the plain loss), so the pair shows what the fused-linear
path saves.

    python benchmarks/losses.py                          # [4, 1024, 32768] fp32 on this machine
    python benchmarks/losses.py --shape 1 8192 128256 --dtype bfloat16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from decompose import rss_bytes, run_worker, write_json  # noqa: E402  (benchmarks/decompose.py, same folder)

VARIANTS = ["official"] + [f"{name}:{path}" for name in
                           ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "dkd", "atkd") for path in ("plain", "fused")]
VARIANTS += [f"{name}:{path}" for name in ("fkl", "atkd") for path in ("head+plain", "linear")]
HIDDEN = 512


def make_inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    batch, seq, vocab = shape
    # made in place, in the target dtype: no transient copy inflates the baseline the peak is measured from
    student = torch.randn(batch, seq, vocab, generator=g, device=device, dtype=dtype).mul_(3).requires_grad_(True)
    teacher = torch.randn(batch, seq, vocab, generator=g, device=device, dtype=dtype).mul_(3)
    labels = torch.randint(vocab, (batch, seq), generator=g, device=device)
    return student, teacher, labels


def make_linear_inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    batch, seq, vocab = shape

    def randn(*size, grad=False):
        return torch.randn(*size, generator=g, device=device, dtype=dtype).div_(HIDDEN**0.25).requires_grad_(grad)

    labels = torch.randint(vocab, (batch, seq), generator=g, device=device)
    return randn(batch, seq, HIDDEN, grad=True), randn(vocab, HIDDEN, grad=True), randn(batch, seq, HIDDEN), \
        randn(vocab, HIDDEN), labels


def linear_step(variant: str):
    """(inputs maker, step) for the hidden-state variants."""
    from kdviz.losses import get_loss

    name, path = variant.split(":")
    fn = get_loss(name, fused=False)

    def run(s_hidden, s_head, t_hidden, t_head, labels):
        s_hidden.grad = s_head.grad = None
        if path == "linear":
            fn.linear(s_hidden, s_head, t_hidden, t_head, labels).loss.backward()
        else:
            fn(s_hidden @ s_head.T, t_hidden @ t_head.T, labels).backward()

    return run


def loss_function(variant: str):
    if variant == "official":
        from reference import official_style_atkd

        return official_style_atkd
    from kdviz.losses import get_loss

    name, path = variant.split(":")
    return get_loss(name, fused=path == "fused")


def step(fn, student, teacher, labels):
    student.grad = None
    fn(student, teacher, labels).backward()


def worker(variant, shape, dtype, device) -> dict:
    if variant.endswith(("linear", "head+plain")):
        inputs, run = make_linear_inputs(shape, dtype, device), linear_step(variant)
    else:
        inputs, fn = make_inputs(shape, dtype, device), loss_function(variant)

        def run(*tensors):
            step(fn, *tensors)
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = max(rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    start = time.perf_counter()
    run(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    first = time.perf_counter() - start
    start = time.perf_counter()
    run(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return {"peak_extra_bytes": max(0, peak), "seconds": min(first, time.perf_counter() - start)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 1024, 32768], metavar=("B", "T", "V"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help=f"any of {VARIANTS}")
    parser.add_argument("--out", default="benchmarks/results/losses.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, getattr(torch, args.dtype), args.device)))
        return
    results = {}
    logits_bytes = args.shape[0] * args.shape[1] * args.shape[2] * torch.finfo(getattr(torch, args.dtype)).bits // 8
    print(f"shape {args.shape} {args.dtype} on {args.device}; one logits tensor = {logits_bytes / 2**20:.0f} MiB")
    for variant in args.variants:
        try:
            results[variant] = run_worker(__file__, variant, ["--shape", *map(str, args.shape), "--dtype",
                                                              args.dtype, "--device", args.device])
        except RuntimeError as err:
            print(f"  {variant:<16} {err}")
            continue
        r = results[variant]
        print(f"  {variant:<16} {r['seconds'] * 1e3:9.1f} ms   peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB")
    summary = {"shape": args.shape, "dtype": args.dtype, "device": args.device, "logits_bytes": logits_bytes,
               "results": results}
    if "official" in results and "atkd:fused" in results:
        ratio = results["atkd:fused"]["peak_extra_bytes"] / max(1, results["official"]["peak_extra_bytes"])
        summary["atkd_fused_over_official_memory"] = ratio
        print(f"  fused ATKD peak extra / official-style: {ratio:.3f} (target <= 0.333)")
    for name in ("fkl", "atkd"):
        pair = results.get(f"{name}:linear"), results.get(f"{name}:head+plain")
        if all(pair):
            ratio = pair[0]["peak_extra_bytes"] / max(1, pair[1]["peak_extra_bytes"])
            summary[f"{name}_linear_over_head_plain_memory"] = ratio
            print(f"  {name} fused-linear peak extra / logits + plain loss: {ratio:.3f}")
    write_json(args.out, summary)


if __name__ == "__main__":
    main()
