"""Making a teacher top-k cache: run the teacher once over the data and keep its top-k per target token."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from kdviz.cache.format import ARRAYS, FORMAT, PER_TOKEN, TeacherCache
from kdviz.checks import check_count, check_temperature
from kdviz.data import TokenDataset, collate, example_key, pad_id, target_positions
from kdviz.files import expand, file_checksums, new_folder, remove_stale_stages, seal, writer_lock
from kdviz.maths.topk import TopKRows
from kdviz.models import fingerprint, last_hidden, output_head, tokenizer_fingerprint
from kdviz.batching import length_batches


def build(teacher, tokenizer, dataset: TokenDataset, out: str | os.PathLike, *, top_k: int = 64,
          temperature: float = 1.0, teacher_name: str = "", max_length: int | None = None, batch_tokens: int = 16384,
          progress: bool = True) -> TeacherCache:
    """Run `teacher` once over `dataset` and write its top-k cache to the folder `out` (renamed into place).

    `max_length`: the context `dataset` was tokenized for (recorded: a pair reading the cache
    tokenizes its data the same way)."""
    check_count(top_k, "top_k", minimum=1)
    check_count(batch_tokens, "batch_tokens", minimum=1)
    check_temperature(temperature)
    vocab = len(tokenizer)
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}.")
    counts = [len(target_positions(ex)) for ex in dataset]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total, device = int(offsets[-1]), next(teacher.parameters()).device
    head, bias = output_head(teacher, vocab)
    id_type = np.uint16 if vocab <= 65536 else np.int32
    meta = {"format": FORMAT, "teacher": teacher_name, "teacher_fingerprint": fingerprint(teacher),
            "tokenizer": tokenizer_fingerprint(tokenizer), "data": dataset.fingerprint,
            "data_description": dataset.description, "template": dataset.template, "examples": len(dataset),
            "tokens": total, "top_k": top_k, "temperature": float(temperature), "vocab_size": vocab,
            "max_length": max_length or max(len(ex.input_ids) for ex in dataset)}
    with writer_lock(out, what="teacher cache"), new_folder(_fresh(out), what="teacher cache") as stage:
        arrays = {"ids": np.lib.format.open_memmap(stage / "ids.npy", "w+", id_type, (total, top_k)),
                  "logprobs": np.lib.format.open_memmap(stage / "logprobs.npy", "w+", np.float32, (total, top_k)),
                  "target_logp": np.lib.format.open_memmap(stage / "target_logp.npy", "w+", np.float32, (total,)),
                  "tail_logp": np.lib.format.open_memmap(stage / "tail_logp.npy", "w+", np.float32, (total,))}
        np.save(stage / "offsets.npy", offsets)
        np.save(stage / "keys.npy", np.array([example_key(ex) for ex in dataset], dtype=np.int64))
        lengths = [len(ex.input_ids) for ex in dataset]
        bar = tqdm(total=sum(lengths), desc="teacher cache", unit="tok", unit_scale=True, disable=not progress)
        for batch in length_batches(lengths, batch_size=64, batch_tokens=batch_tokens):
            _cache_batch(teacher, tokenizer, dataset, batch, head, bias, temperature, arrays, offsets, device)
            bar.update(sum(lengths[i] for i in batch))
        bar.close()
        for array in arrays.values():
            array.flush()
        del arrays
        meta["bytes_per_token"] = sum((stage / f"{n}.npy").stat().st_size for n in PER_TOKEN) / max(1, total)
        meta["checksums"] = file_checksums(stage / f"{n}.npy" for n in ARRAYS)  # checked at every open
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        seal(stage / "meta.json")  # the checksums cover the arrays; this covers meta.json itself
    return TeacherCache.open(out)


def _fresh(out) -> str | os.PathLike:
    """`out`, checked to be new, with what a killed earlier build left beside it removed (under the writer lock)."""
    if expand(out).exists():
        raise ValueError(f"{expand(out)} exists; give a new folder for the teacher cache (a cache is written whole, "
                         "never over another).")
    remove_stale_stages(out)
    return out


@torch.inference_mode()
def _cache_batch(teacher, tokenizer, dataset, batch, head, bias, temperature, arrays, offsets, device) -> None:
    examples = [dataset[i] for i in batch]
    padded = collate(examples, pad_id=pad_id(tokenizer))
    hidden = last_hidden(teacher, padded.input_ids.to(device), padded.attention_mask.to(device))  # (B, L, H)
    for row, index in enumerate(batch):
        positions = target_positions(dataset[index])
        if not positions:
            continue
        targets = torch.tensor([dataset[index].input_ids[p + 1] for p in positions], device=device)
        logits = torch.nn.functional.linear(hidden[row, positions], head, bias).float() / temperature  # (n, V)
        rows = TopKRows.from_log_probs(torch.log_softmax(logits, -1), targets, arrays["ids"].shape[1])
        span = slice(int(offsets[index]), int(offsets[index + 1]))
        for name, values in zip(PER_TOKEN, rows):
            arrays[name][span] = values.cpu().numpy()
