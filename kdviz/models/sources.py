"""Load a model and its tokenizer from a zoo name, a local folder, a .gguf file or a Hugging Face hub id.

Every failure is a ValueError that names the model and says what to do: a path that does not
exist is not tried as a hub id for a minute, a folder that is not a model says what it holds,
a half-copied weight file says so.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from kdviz.files import expand
from kdviz.models.gguf import first_line, gguf_folder
from kdviz.zoo import registry

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_source(name: str) -> dict:
    """from_pretrained options for hub id `name`; ValueError at once when it cannot be had (no 50 s of retries)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    where = f"no such path: {Path(name).resolve()}"
    if constants.HF_HUB_OFFLINE or not _hub_reachable():
        if cached:
            return {"local_files_only": True}
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise ValueError(f"Model {name!r} is not a local folder ({where}) and, read as a Hugging Face hub id, is not "
                         f"in the local cache, and {reason}. Check the path, or download the model where there is "
                         "network and give its folder.")
    return {}


def model_folder(path: Path) -> Path:
    """`path` checked to be a model: a folder with config.json, or a .gguf file / a folder holding one
    (converted once to a plain safetensors copy in the cache). ValueError saying what it is instead."""
    if path.is_file():
        if path.suffix == ".gguf":
            return gguf_folder(path)
        raise ValueError(f"Model path {path} is a file; give the folder that holds config.json and the weights "
                         "(saved with save_pretrained), or a .gguf file.")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_folder(ggufs[0])
        if ggufs:
            raise ValueError(f"Folder {path} holds {len(ggufs)} GGUF files ({', '.join(p.name for p in ggufs)}); give "
                             "the one to load as the model path.")
        held = sorted(p.name for p in path.iterdir())[:8]
        raise ValueError(f"Folder {path} is not a model: it has no config.json (it holds {held or 'nothing'}). "
                         "Give a folder saved with save_pretrained, a .gguf file, a hub id, or a zoo name.")
    return path


def sources(name_or_path) -> tuple[str, str, dict]:
    """(model source, tokenizer source, from_pretrained options) for a zoo name, a local folder, a .gguf file or
    a hub id; ValueError when it is none of them."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"Expected a model name or path (str), got {type(name_or_path).__name__}; to use models "
                         "already in memory, build kdviz.ModelPair(teacher, student, tokenizer) directly.")
    name = str(name_or_path)
    if name.startswith(registry.PREFIX):
        folder = model_folder(registry.model_dir(name))
        return str(folder), str(registry.tokenizer_folder(folder)), {}
    path = expand(name)
    if path.exists():
        folder = str(model_folder(path))
        return folder, folder, {}
    if isinstance(name_or_path, os.PathLike) or not HUB_ID.match(name):
        raise ValueError(f"Model path {name} does not exist (looked for {path.resolve()}). Give a folder saved "
                         f"with save_pretrained, a hub id, or a zoo name ({', '.join(registry.names())}).")
    return name, name, _hub_source(name)


def _loading(name: str, what):
    """what(), with whatever a broken model raises turned into a ValueError that names it."""
    try:
        return what()
    except Exception as err:  # transformers, safetensors and tokenizers raise many types for a broken model
        raise ValueError(
            f"Could not load model {name!r}: {first_line(err)}. "
            "If a weight file was copied or downloaded only in part, copy it again. Give a folder saved with "
            f"save_pretrained, a hub id, or a zoo name ({', '.join(registry.names())})."
        ) from err


def load_model(name_or_path, *, device: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model in eval mode on `device`, tokenizer) from a `zoo:` name, a local folder, a .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM

    name = str(name_or_path)
    model_source, _, options = sources(name_or_path)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    model = _loading(name, lambda: AutoModelForCausalLM.from_pretrained(
        model_source, dtype=dtype, trust_remote_code=trust_remote_code, **options))
    return model.to(device).eval(), tokenizer


def load_tokenizer(name_or_path, *, trust_remote_code: bool = False):
    """The tokenizer of a model given by name (zoo, folder, .gguf, hub id), without loading its weights."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    _, source, options = sources(name_or_path)
    tokenizer = _loading(name, lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                                      **options))
    if len(tokenizer) < 2:  # transformers makes an empty tokenizer for a folder that has none
        raise ValueError(f"Model {name!r} has no tokenizer: {source} holds no tokenizer files (tokenizer.json, "
                         "tokenizer_config.json, vocab.json, ...). Save the tokenizer beside the weights "
                         "(tokenizer.save_pretrained(folder)), as kdviz distill does.")
    return tokenizer


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config, or None if it does not say."""
    return config_context(model.config)


def model_context(name_or_path) -> int | None:
    """The context of a model given by name (zoo, folder, .gguf, hub id) from its config alone."""
    from transformers import AutoConfig

    source, _, options = sources(name_or_path)
    return config_context(_loading(str(name_or_path), lambda: AutoConfig.from_pretrained(source, **options)))


def config_context(config) -> int | None:
    """The maximum sequence length a config states, or None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
