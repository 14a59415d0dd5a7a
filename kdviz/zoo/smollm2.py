"""The real pair's student, `zoo:smollm2-student`, trained for `zoo:smollm2-135m` (SmolLM2-135M-Instruct).

The student is a small Llama (6 x 96, 5.3M parameters, 10.6 MB of fp16 weights) with the teacher's
49,152-token tokenizer, trained by kdviz (`kdviz zoo build --only smollm2-student`): its
embedding starts as the top 96 principal directions of the teacher's embedding, then it is
trained with cross-entropy on text every Python installation has: the train split of the
standard library's source, the Python reference's prose (`pydoc_data.topics`), and the
train split's docstring/body pairs and topics written in the teacher's chat template, so it
knows the chat format. Held-out loss is measured on held-out code windows.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdviz.corpus import Corpus, docstring_pairs, topic_is_heldout, topic_pairs
from kdviz.data import Record, format_record
from kdviz.files import staged_folder
from kdviz.models import load_model
from kdviz.zoo import ladder
from kdviz.zoo.registry import PREFIX, zoo_dir

TEACHER = "zoo:smollm2-135m"
STUDENT = "smollm2-student"


@dataclass(frozen=True)
class StudentSpec:
    hidden: int = 96
    layers: int = 6
    heads: int = 3
    kv_heads: int = 1
    intermediate: int = 256
    context: int = 256
    steps: int = 600
    batch_size: int = 12
    lr: float = 2e-3
    code_tokens: int = 3_000_000  # stdlib code in the training stream (the rest is prose and chat pairs)
    seed: int = 0


TINY_STUDENT = StudentSpec(hidden=32, layers=1, heads=1, kv_heads=1, intermediate=64, context=64, steps=4,
                           batch_size=4, code_tokens=20_000)


def _training_texts(tokenizer, spec: StudentSpec) -> list[str]:
    """Code (train split), prose (train topics) and chat-formatted pairs, as texts to stream."""
    import pydoc_data.topics

    corpus = Corpus.from_stdlib()
    code, tokens = [], 0
    for file in corpus.train:
        if tokens >= spec.code_tokens:
            break
        code.append(corpus.read(file))
        tokens += len(code[-1]) // 4
    prose = [text for name, text in sorted(pydoc_data.topics.topics.items()) if not topic_is_heldout(name)]
    pairs = docstring_pairs(code, [f"train{i}" for i in range(len(code))])[:4000] + topic_pairs(heldout=False)
    chats = []
    for pair in pairs:
        formatted = format_record(Record(pair["prompt"], pair["response"], "", pair["source"]), "chat", tokenizer)
        chats.append(formatted.prompt_text + formatted.response_text)
    return code + prose * 3 + chats


def _config(spec: StudentSpec, teacher_config, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=teacher_config.vocab_size, hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                       num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                       head_dim=spec.hidden // spec.heads, intermediate_size=spec.intermediate,
                       max_position_embeddings=teacher_config.max_position_embeddings, tie_word_embeddings=True,
                       rope_theta=getattr(teacher_config, "rope_theta", None) or 100000.0,
                       rms_norm_eps=teacher_config.rms_norm_eps, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def pca_embedding(teacher_embedding: torch.Tensor, width: int) -> torch.Tensor:
    """The teacher's token embeddings [V, H] projected on their top `width` principal directions, scaled to std 0.02."""
    centred = teacher_embedding.float() - teacher_embedding.float().mean(0)
    _, _, basis = torch.pca_lowrank(centred, q=width, center=False, niter=4)  # basis: (H, width)
    projected = centred @ basis
    return projected * (0.02 / projected.std())


def build_student(out_dir: str | Path | None = None, *, tiny: bool = False, device: str | None = None,
                  progress: bool = True) -> dict:
    """Train `zoo:smollm2-student` from the teacher's tokenizer and embedding; writes it with its manifest."""

    spec = TINY_STUDENT if tiny else StudentSpec()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher, tokenizer = load_model(TEACHER, device="cpu", dtype=torch.float32)
    texts = _training_texts(tokenizer, spec)
    stream = ladder.token_stream(texts, tokenizer)
    train = ladder.windows(stream, spec.context)
    heldout = ladder.windows(ladder.token_stream(Corpus.from_stdlib().texts("heldout"), tokenizer), spec.context)[:64]
    from transformers import LlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(_config(spec, teacher.config, tokenizer))
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(pca_embedding(teacher.get_input_embeddings().weight, spec.hidden))
    del teacher
    model_spec = ladder.ModelSpec(n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads, steps=spec.steps,
                               lr=spec.lr, batch_size=spec.batch_size, seed=spec.seed)
    started = time.perf_counter()
    model = ladder.train_model(model, train, model_spec, device=device, desc=STUDENT, progress=progress)
    seconds = time.perf_counter() - started
    manifest = {
        "name": PREFIX + STUDENT,
        "description": f"a {spec.layers} x {spec.hidden} Llama with SmolLM2's tokenizer, trained by kdviz with "
                       "cross-entropy on stdlib code, the Python reference's prose and chat-formatted pairs",
        "source": "trained by kdviz (kdviz zoo build --only smollm2-student)", "licence": "Apache-2.0",
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": spec.steps * spec.batch_size * spec.context,
        "heldout_loss": round(ladder.mean_loss(model, heldout.to(device)), 4),
        "settings": asdict(spec),
        "corpus": {"python": platform.python_version(), "train_tokens": int(train.numel()),
                   "eval_tokens": int(heldout.numel()), "texts": len(texts)},
        "environment": {"torch": torch.__version__, "device": device},
        "train_seconds": round(seconds, 1),
    }
    out = Path(out_dir) if out_dir else zoo_dir()
    with staged_folder(out / STUDENT, what="zoo model folder") as stage:  # each file renamed into place
        model.half().save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
