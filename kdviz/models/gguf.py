"""GGUF model files: dequantised once into a plain safetensors folder in kdviz's cache."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from kdviz.files import cache_root, file_digest, new_folder


def first_line(err: BaseException) -> str:
    """An error's type and the first line of its message (for one-line messages)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300].rstrip('.') if text else '(no message)'}"


def gguf_folder(path: Path, *, force: bool = False) -> Path:
    """The plain safetensors copy of GGUF model `path`, converted on first use into the cache."""
    folder = cache_root() / "gguf" / f"{path.stem}-{file_digest(path)}"
    if force and folder.exists():
        shutil.rmtree(folder)
    if not (folder / "config.json").is_file():
        with new_folder(folder, what="converted model folder") as stage:
            convert_gguf(path, stage)
    return folder


def convert_gguf(path: Path, out: Path) -> Path:
    """Dequantise GGUF model `path` (any architecture transformers reads from GGUF) into a plain fp32
    Hugging Face folder `out` (safetensors + tokenizer with its chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"kdviz: converting {path.name} from GGUF to safetensors (once; about 20 s per 100M "
          "parameters on 2 cores)", file=sys.stderr)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # transformers raises ValueError, KeyError, RuntimeError... for unsupported files
        raise ValueError(
            f"Could not read {path} as a GGUF model: {first_line(err)}. "
            "transformers reads GGUF files of the architectures it supports (llama, mistral, qwen2, gemma, "
            "gpt2, phi3, ...); check the file is complete, or convert it to a Hugging Face folder."
        ) from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain model that saves and trains
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
