"""The zoo's GPT-2 ladder: a tokenizer and four models trained by kdviz on the standard library's source.

`zoo:student` and three teachers (`zoo:teacher-s`, `zoo:teacher-m`, `zoo:teacher-l`) share one
byte-level BPE tokenizer. The weights ship inside the package with a manifest each; `build`
reproduces them from scratch (`kdviz zoo build`), `build(..., tiny=True)` makes a micro zoo in
seconds for tests.
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
from kdviz.zoo.registry import PREFIX, zoo_dir

EOS = "<|endoftext|>"


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


def build(out_dir: str | os.PathLike | None = None, *, tiny: bool = False, names: list[str] | None = None,
          device: str | None = None, progress: bool = True) -> dict[str, dict]:
    """Train the tokenizer and the ladder from scratch into `out_dir` (default: the shipped zoo); the manifests."""
    spec = TINY if tiny else FULL
    names = list(spec.models) if names is None else names
    unknown = [n for n in names if n not in spec.models]
    if unknown:
        raise ValueError(f"Unknown zoo model(s) {unknown}; the ladder has {list(spec.models)}.")
    out = Path(out_dir) if out_dir else zoo_dir()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, train, heldout, corpus_info = _ladder_data(spec)
    with staged_folder(out / "tokenizer", what="zoo tokenizer folder") as stage:
        tokenizer.save_pretrained(stage)
    manifests = {}
    for name in tqdm(names, desc="zoo", disable=not progress):
        model, manifests[name] = _train_rung(name, spec, tokenizer, train, heldout, corpus_info, device)
        with staged_folder(out / name, what="zoo model folder") as stage:  # each file renamed into place
            model.half().save_pretrained(stage, safe_serialization=True)
            (stage / "manifest.json").write_text(json.dumps(manifests[name], indent=2) + "\n")
    return manifests


def _ladder_data(spec: ZooSpec):
    """(tokenizer trained on the train split, train windows [N, T], held-out windows, what the corpus was)."""
    corpus = Corpus.from_stdlib()
    train_files = corpus.train[: spec.train_files] if spec.train_files else corpus.train
    train_texts = [corpus.read(f) for f in train_files]
    tokenizer = train_tokenizer(train_texts, spec.vocab_size)
    train = windows(token_stream(train_texts, tokenizer), spec.context)
    heldout = windows(token_stream(corpus.texts("heldout"), tokenizer), spec.context)[: spec.eval_windows]
    corpus_info = {"python": platform.python_version(), "file_list_hash": corpus.file_list_hash,
                   "content_hash": corpus.content_hash, "train_files": len(train_files),
                   "heldout_files": len(corpus.heldout), "train_tokens": int(train.numel()),
                   "eval_tokens": int(heldout.numel())}
    return tokenizer, train, heldout, corpus_info


def _train_rung(name: str, spec: ZooSpec, tokenizer, train, heldout, corpus_info: dict, device: str):
    """(trained model, its manifest) of ladder model `name`."""
    from transformers import GPT2LMHeadModel

    model_spec = spec.models[name]
    torch.manual_seed(model_spec.seed)
    started = time.perf_counter()
    model = GPT2LMHeadModel(gpt2_config(model_spec, len(tokenizer), spec.context, tokenizer))
    model = train_model(model, train, model_spec, device=device, desc=name)
    return model, asdict(Manifest(
        name=PREFIX + name, parameters=sum(p.numel() for p in model.parameters()),
        tokens_seen=model_spec.steps * model_spec.batch_size * spec.context,
        heldout_loss=round(mean_loss(model, heldout), 4),
        settings={**asdict(model_spec), "context": spec.context, "vocab_size": len(tokenizer)},
        corpus=corpus_info, environment={"torch": torch.__version__, "device": device},
        train_seconds=round(time.perf_counter() - started, 1)))
