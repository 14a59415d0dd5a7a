"""The teacher top-k cache on the real pair: capture speed, size per format, what compact and top-k lose, training.

Sections (all by default; --sections picks some, results are merged into the one JSON file):

- capture: time of a capture (exact and compact, k=64) against bare teacher forward passes over
  the same length batches (the model's own logits, every position; target: capture <= 1.15x);
  bytes per target token of each format at k = 16, 64, 256 (V of the real pair) and as measured;
- compact: u, TKD, KL, DKD from the compact cache against the exact (float32) one, with the same
  student (targets: u and TKD within 1e-3, KL and DKD means within 0.5 %), per token too;
- train: 50 fine-tune steps (fkl, batch 8) from the compact cache and from the exact one: held-out
  loss, the weights' difference relative to the update, and time per step (target: compact no
  slower); for scale, the same run from an exact cache made with other batches (float32 rounding:
  the values differ in their last bits) and from one whose teacher logits were rounded to bf16 (the
  precision of vLLM's log-probs of a bf16 teacher, or of a bf16 capture's head);
- topk: what top-k loses against the exact (live) values at k = 16 / 64 / 256, and how much faster a
  fine-tune step is from the top-64 cache than with the live teacher (target >= 3x on CPU).

    python benchmarks/teacher_cache.py                          # zoo:smollm2-135m -> zoo:smollm2-student, zoo:docstrings
    python benchmarks/teacher_cache.py --sections capture,compact --limit 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from decompose import write_json

KS = (16, 64, 256)
SECTIONS = ("capture", "compact", "train", "topk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="zoo:smollm2-135m")
    parser.add_argument("--student", default="zoo:smollm2-student")
    parser.add_argument("--data", default="zoo:docstrings")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--train-steps", type=int, default=50, help="fine-tune steps of the train section")
    parser.add_argument("--steps", type=int, default=10, help="fine-tune steps timed by the topk section")
    parser.add_argument("--repeats", type=int, default=2, help="timings of the capture section: the best of this many")
    parser.add_argument("--out", default="benchmarks/results/teacher_cache.json")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; pick from {SECTIONS}")
    from kdviz import load_pair
    from kdviz.data import load_data

    pair = load_pair(args.teacher, args.student, device="cpu")
    data = load_data(args.data, pair.tokenizer, max_length=args.max_length, limit=args.limit)
    result = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    result.update({"teacher": args.teacher, "student": args.student, "data": data.description,
                   "template": data.template, "target_tokens": data.n_targets, "limit": args.limit,
                   "max_length": args.max_length})
    with tempfile.TemporaryDirectory() as folder:
        caches = Caches(pair, data, Path(folder), args)
        for section in sections:
            print(f"--- {section}", flush=True)
            result[section] = {"capture": capture, "compact": compact, "train": train, "topk": topk}[section](
                pair, data, caches, args)
            write_json(args.out, result, quiet=True)
    print(f"written to {args.out}")


class Caches:
    """The k=64 caches the sections share, made once (and timed) on first use."""

    def __init__(self, pair, data, folder: Path, args):
        self.pair, self.data, self.folder, self.args, self.made, self.seconds = pair, data, folder, args, {}, {}

    def get(self, name: str, **options):
        from kdviz.cache import build

        if name not in self.made:
            start = time.perf_counter()
            self.made[name] = build(self.pair.teacher, self.pair.tokenizer, self.data, self.folder / name,
                                    teacher_name=self.args.teacher, max_length=self.args.max_length, progress=False,
                                    **{"top_k": 64, **options})
            self.seconds[name] = time.perf_counter() - start
        return self.made[name]


def forward_seconds(pair, data, batch_tokens: int = 16384) -> float:
    """Bare teacher forward passes (the model's own logits at every position) over the capture's length batches."""
    import torch

    from kdviz.batching import length_batches
    from kdviz.data import collate, pad_id
    from kdviz.models import model_logits

    lengths = [len(ex.input_ids) for ex in data]
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_size=64, batch_tokens=batch_tokens):
            padded = collate([data[i] for i in batch], pad_id=pad_id(pair.tokenizer))
            model_logits(pair.teacher, padded.input_ids, padded.attention_mask)
    return time.perf_counter() - start


def capture(pair, data, caches: Caches, args) -> dict:
    from kdviz.cache import build
    from kdviz.cache.encoding import row_bytes

    times = {"forward": [], "exact": [], "compact": []}
    for repeat in range(args.repeats):  # interleaved: a busy machine slows all of them alike
        times["forward"].append(forward_seconds(pair, data))
        for encoding in ("exact", "compact"):
            start = time.perf_counter()
            cache = build(pair.teacher, pair.tokenizer, data, caches.folder / f"timed-{encoding}-{repeat}", top_k=64,
                          encoding=encoding, max_length=args.max_length, progress=False)
            times[encoding].append(time.perf_counter() - start)
            caches.made.setdefault(encoding, cache)
    best = {name: min(values) for name, values in times.items()}
    vocab = len(pair.tokenizer)
    out = {"seconds": times, "best_seconds": best, "target_tokens_per_second": {
        name: data.n_targets / seconds for name, seconds in best.items()},
        "ratio_to_forward": {name: best[name] / best["forward"] for name in ("exact", "compact")},
        "bytes_per_token": {encoding: {k: row_bytes(encoding, k, vocab) for k in KS} for encoding in ("exact", "compact")},
        "bytes_per_token_measured_k64": {name: caches.made[name].bytes_per_token for name in ("exact", "compact")},
        "vocab_size": vocab}
    print(f"capture of {data.n_targets:,} target tokens: bare forward {best['forward']:.1f} s, exact "
          f"{best['exact']:.1f} s ({out['ratio_to_forward']['exact']:.2f}x), compact {best['compact']:.1f} s "
          f"({out['ratio_to_forward']['compact']:.2f}x; target <= 1.15x)")
    for encoding, sizes in out["bytes_per_token"].items():
        print(f"  {encoding:8s} bytes per token: " + ", ".join(f"k={k}: {b}" for k, b in sizes.items()))
    return out


def tables(pair, data, caches, names, args) -> dict:
    from kdviz import analyze, load_pair

    return {name: analyze(load_pair(None, args.student, teacher_cache=caches.get(name, encoding=name).folder,
                                    device="cpu"), data, cache=False, progress=False).df for name in names}


def compact(pair, data, caches: Caches, args) -> dict:
    found = tables(pair, data, caches, ("exact", "compact"), args)
    exact, approx = found["exact"], found["compact"]
    out = {"tokens": exact.height}
    for name in ("unc", "tkd"):
        out[f"{name}_max_abs_error"] = float((exact[name] - approx[name]).abs().max())
    for name in ("kl", "dkd", "rkl"):
        gap = approx[name] - exact[name]
        relative = gap.abs() / exact[name].abs().clip(lower_bound=1e-2)
        out[name] = {"mean_exact": exact[name].mean(), "mean_compact": approx[name].mean(),
                     "relative_error_of_mean": gap.sum() / exact[name].sum(), "abs_error_mean": gap.abs().mean(),
                     "abs_error_p99": gap.abs().quantile(0.99), "abs_error_max": gap.abs().max(),
                     "relative_error_median": relative.median(), "relative_error_p99": relative.quantile(0.99)}
    print(f"compact vs exact cache (k=64, {exact.height:,} tokens): u max error {out['unc_max_abs_error']:.1e}, TKD "
          f"{out['tkd_max_abs_error']:.1e} (target 1e-3); KL mean {out['kl']['relative_error_of_mean']:+.3%}, DKD mean "
          f"{out['dkd']['relative_error_of_mean']:+.3%} (target 0.5 %); per token |KL error| median "
          f"{out['kl']['relative_error_median']:.2%}, p99 {out['kl']['relative_error_p99']:.2%}")
    return out


def train(pair, data, caches: Caches, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from kdviz.train import distill

    caches.get("exact", encoding="exact")
    caches.get("compact", encoding="compact")
    caches.get("exact-other-batches", encoding="exact", batch_tokens=1)  # one example per pass: other float sums
    with bf16_logits():
        caches.get("exact-bf16-logits", encoding="exact")
    common = dict(loss="fkl", steps=args.train_steps, batch_size=8, eval_size=max(1, min(8, args.limit // 5)),
                  limit=args.limit, device="cpu",
                  progress=False, max_length=args.max_length, eval_generate_examples=0)
    runs, weights = {}, {}
    for name in REFERENCES:
        runs[name] = distill(None, args.student, args.data, teacher_cache=str(caches.made[name].folder),
                             out_dir=caches.folder / f"run-{name}", **common)
        weights[name] = AutoModelForCausalLM.from_pretrained(caches.folder / f"run-{name}").state_dict()
    initial = pair.student.state_dict()

    def norm(tensors) -> float:
        return float(torch.sqrt(sum((t.float() ** 2).sum() for t in tensors)))

    update = norm([weights["exact"][k] - initial[k] for k in weights["exact"]])
    out = {"steps": args.train_steps, "update_norm": update}
    for name, run in runs.items():
        out[name] = {"eval_loss": run.after.loss, "eval_loss_before": run.before.loss,
                     "step_seconds": run.train_seconds / args.train_steps,
                     "weights_relative_difference": norm([weights[name][k] - weights["exact"][k] for k in initial])
                     / update}
    out["step_time_ratio_compact_to_exact"] = out["compact"]["step_seconds"] / out["exact"]["step_seconds"]
    out["read_ms_per_batch_of_8"] = {name: read_ms(caches.made[name]) for name in ("exact", "compact")}
    print(f"{args.train_steps} fine-tune steps (fkl, batch 8) from each cache against the exact one:")
    for name in REFERENCES:
        print(f"  {name:20s} held-out loss {out[name]['eval_loss']:.5f}, weights differ by "
              f"{out[name]['weights_relative_difference']:.2e} of the update, {out[name]['step_seconds']:.2f} s/step")
    print(f"  reading a batch of 8 examples' rows (what a distill step asks of the cache): "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in out["read_ms_per_batch_of_8"].items()))
    return out


def read_ms(cache, repeats: int = 50) -> float:
    """Milliseconds to read (and decode) the rows of 8 random examples, as `CachedTeacher.prepare` does."""
    import random

    keys, rng = [int(k) for k in cache.keys], random.Random(0)
    batches = [rng.sample(keys, min(8, len(keys))) for _ in range(repeats)]
    cache.rows_for_keys(batches[0])
    start = time.perf_counter()
    for batch in batches:
        cache.rows_for_keys(batch)
    return (time.perf_counter() - start) / repeats * 1000


REFERENCES = ("exact", "compact", "exact-other-batches", "exact-bf16-logits")


@contextmanager
def bf16_logits():
    """Captures in the block see the teacher's logits rounded to bf16, as vLLM's log-probs of a bf16 model are."""
    import kdviz.cache.capture as capture_module

    original = capture_module.top_rows
    capture_module.top_rows = lambda logits, targets, k: original(logits.bfloat16().float(), targets, k)
    try:
        yield
    finally:
        capture_module.top_rows = original


def topk(pair, data, caches: Caches, args) -> dict:
    from kdviz import analyze, load_pair
    from kdviz.train import distill

    exact = analyze(pair, data, cache=False, progress=False).df.filter(pl.col("is_response"))
    out = {"tokens": exact.height, "k": {}}
    for k in KS:
        cache = caches.get("exact" if k == 64 else f"exact-k{k}", encoding="exact", top_k=k)
        table = analyze(load_pair(None, args.student, teacher_cache=cache.folder, device="cpu"), data, cache=False,
                        progress=False).df
        errors = {}
        for name in ("kl", "dkd"):
            gap = exact[name] - table[name]  # >= 0: a lower bound
            errors[name] = {"mean_exact": exact[name].mean(), "mean_cached": table[name].mean(),
                            "relative_error_of_mean": gap.sum() / exact[name].sum(), "max_abs_error": gap.abs().max(),
                            "min_gap": gap.min()}
        errors["u_tkd_max_abs_error"] = max((exact[n] - table[n]).abs().max() for n in ("unc", "tkd"))
        out["k"][k] = {"bytes_per_token": cache.bytes_per_token, **errors}
        print(f"top-{k:<4} KL {table['kl'].mean():.4f} vs exact {exact['kl'].mean():.4f} "
              f"({errors['kl']['relative_error_of_mean']:.1%} low)  DKD {table['dkd'].mean():.4f} vs "
              f"{exact['dkd'].mean():.4f} ({errors['dkd']['relative_error_of_mean']:.1%} low)  u, TKD max error "
              f"{errors['u_tkd_max_abs_error']:.1e}", flush=True)
    common = dict(loss="fkl", steps=args.steps, batch_size=8, eval_size=4, limit=args.limit, device="cpu",
                  progress=False, max_length=args.max_length, eval_generate_examples=0)
    live = distill(args.teacher, args.student, args.data, **common)
    cached = distill(None, args.student, args.data, teacher_cache=str(caches.get("compact").folder), **common)
    out["step_seconds"] = {"live": live.train_seconds / args.steps, "cache_k64": cached.train_seconds / args.steps}
    out["speedup"] = live.train_seconds / cached.train_seconds
    print(f"fine-tune step (fkl, batch 8): live teacher {out['step_seconds']['live']:.2f} s, from the top-64 compact "
          f"cache {out['step_seconds']['cache_k64']:.2f} s: {out['speedup']:.1f}x faster (target >= 3x)")
    return out


if __name__ == "__main__":
    main()
