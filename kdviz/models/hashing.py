"""Fingerprints: what decides a model's outputs (config and every weight) or a tokenizer's ids, hashed."""

from __future__ import annotations

import hashlib
import json

import torch

CONFIG_KEYS_NOT_HASHED = ("_name_or_path", "_commit_hash", "transformers_version", "name_or_path")


def fingerprint(model) -> str:
    """A hash of a model's config (not where it was loaded from) and of every byte of every parameter.

    Any change to any weight changes it. xxh3 over the raw bytes: about 0.4 s per GB on one
    CPU core (plus the copy off the GPU), so about 2 s for a 1B-parameter model in fp32.
    """
    import xxhash

    config = {k: v for k, v in model.config.to_dict().items() if k not in CONFIG_KEYS_NOT_HASHED}
    h = xxhash.xxh3_128(json.dumps(config, sort_keys=True, default=str).encode())
    seen = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen:  # tied weights are hashed once
            continue
        seen.add(key)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        h.update(memoryview(data.numpy()))
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the vocabulary, the special tokens and the chat template (what decides the ids)."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token,
                         getattr(tokenizer, "chat_template", None)], default=str).encode())
    return h.hexdigest()[:16]
