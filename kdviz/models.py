"""Load a teacher/student pair that shares one tokenizer, and run both on the same batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from kdviz import zoo
from kdviz.files import cache_root, expand, file_digest, new_folder

# Texts both tokenizers must map to the same ids (code, prose, whitespace, non-ASCII).
PROBE_TEXTS = (
    "def forward(self, x):\n    return x @ self.weight.T  # (B, T, V)\n",
    "The teacher's distribution: p = softmax(z / tau), 100% in [0, 1].",
    "Grüße, 東京, café \t tabs\n\n  and  spaces",
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def resolve_device(device: str | None) -> str:
    """`device` checked against this machine (None: cuda when there is one, else cpu)."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r} but this machine has no CUDA GPU that torch can use "
                             f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch.")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device={device!r} but this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1}).")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available here; use 'cpu'.")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda'.")
    return str(parsed)


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


def _model_folder(path: Path) -> Path:
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


def _first_line(err: BaseException) -> str:
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
            f"Could not read {path} as a GGUF model: {_first_line(err)}. "
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


def _source(name_or_path) -> tuple[str, dict]:
    """(what to give from_pretrained, its options) for a local folder, a .gguf file or a hub id; ValueError if none."""
    name = str(name_or_path)
    path = expand(name)
    if path.exists():
        return str(_model_folder(path)), {}
    if isinstance(name_or_path, os.PathLike) or not HUB_ID.match(name):
        raise ValueError(f"Model path {name} does not exist (looked for {path.resolve()}). Give a folder saved "
                         f"with save_pretrained, a hub id, or a zoo name ({', '.join(zoo.names())}).")
    return name, _hub_source(name)


def _loading(name: str, what):
    """what(), with whatever a broken model raises turned into a ValueError that names it."""
    try:
        return what()
    except Exception as err:  # transformers, safetensors and tokenizers raise many types for a broken model
        raise ValueError(
            f"Could not load model {name!r}: {_first_line(err)}. "
            "If a weight file was copied or downloaded only in part, copy it again. Give a folder saved with "
            f"save_pretrained, a hub id, or a zoo name ({', '.join(zoo.names())})."
        ) from err


def _load_one(name_or_path, *, device: str, dtype: torch.dtype, trust_remote_code: bool):
    """(model, tokenizer) from a `zoo:` name, a local folder or a Hugging Face hub id."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(
            f"Expected a model name or path (str), got {type(name_or_path).__name__}; "
            "to use models already in memory, build ModelPair(teacher, student, tokenizer) directly."
        )
    name = str(name_or_path)
    if name.startswith(zoo.PREFIX):
        model, tokenizer = zoo.load(name, device=device, dtype=dtype)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, options = _source(name_or_path)
    loading = partial(_loading, name)
    tokenizer = loading(lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **options))
    if len(tokenizer) < 2:  # transformers makes an empty tokenizer for a folder that has none
        raise ValueError(f"Model {name!r} has no tokenizer: {source} holds no tokenizer files (tokenizer.json, "
                         "tokenizer_config.json, vocab.json, ...). Save the tokenizer beside the weights "
                         "(tokenizer.save_pretrained(folder)), as kdviz distill does.")
    model = loading(lambda: AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                                 trust_remote_code=trust_remote_code, **options))
    return model.to(device).eval(), tokenizer


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> int:
    """The shared vocabulary size; ValueError when the tokenizers map text to different ids."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    for text in PROBE_TEXTS:
        t_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        s_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if t_ids != s_ids:
            raise ValueError(
                f"The teacher and student tokenizers map the same text to different ids "
                f"(teacher vocab {len(t_vocab)}, student vocab {len(s_vocab)}): {text[:30]!r} -> "
                f"{t_ids[:8]} vs {s_ids[:8]}. Token-level KD compares distributions over one shared "
                "vocabulary, so both models must use the same tokenizer: pick a student from the "
                "teacher's family (e.g. Qwen2.5-7B -> Qwen2.5-0.5B) or retokenize and retrain one of them."
            )
    if t_vocab != s_vocab:
        only = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:5]
        raise ValueError(
            f"The teacher and student tokenizers have different vocabularies ({len(t_vocab)} vs "
            f"{len(s_vocab)} entries; first differences {only}). Token-level KD needs one shared "
            "vocabulary: use a teacher and student of the same tokenizer family."
        )
    return len(teacher_tokenizer)


def context_length(model) -> int | None:
    """The model's maximum sequence length from its config, or None if it does not say."""
    return config_context(model.config)


def model_context(name_or_path: str) -> int | None:
    """The context of a model given by name (zoo, folder, .gguf, hub id) from its config alone."""
    from transformers import AutoConfig

    if str(name_or_path).startswith(zoo.PREFIX):
        return config_context(AutoConfig.from_pretrained(zoo._model_dir(str(name_or_path))))
    source, options = _source(name_or_path)
    return config_context(_loading(str(name_or_path), lambda: AutoConfig.from_pretrained(source, **options)))


def model_tokenizer(name_or_path: str):
    """The tokenizer of a model given by name (zoo, folder, .gguf, hub id), without loading its weights."""
    name = str(name_or_path)
    if name.startswith(zoo.PREFIX):
        return zoo.load_tokenizer(model_dir=zoo._model_dir(name))
    from transformers import AutoTokenizer

    source, options = _source(name_or_path)
    return _loading(name, lambda: AutoTokenizer.from_pretrained(source, **options))


def config_context(config) -> int | None:
    """The maximum sequence length a config states, or None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, so left and right padding agree."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The hidden states the LM head reads [B, T, H], through the (possibly wrapped) model's own forward."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


def last_hidden(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Like `final_hidden` but through the base model only (no per-layer states kept); for inference."""
    base = model.base_model
    if base is not model:
        out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask))
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
    return final_hidden(model, input_ids, attention_mask)


def model_logits(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The model's own logits [B, T, V] (whatever its head does)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits


def output_head(model, vocab: int) -> tuple[Tensor, Tensor | None]:
    """The LM head's weight [V, H] and bias [V] (or None), cut to the shared vocabulary.

    A head sharded by FSDP2 is gathered whole first (its gradient averaged back onto the
    shards): cutting the sharded tensor would leave the gradient in another layout.
    """
    from kdviz.losses import gathered

    head = model.get_output_embeddings()
    weight, bias = gathered(head.weight), gathered(getattr(head, "bias", None))
    return weight[:vocab], None if bias is None else bias[:vocab]


def head_is_linear(model, input_ids: Tensor, hidden=final_hidden) -> bool:
    """Whether logits == output_embeddings(hidden(...)) (no soft-capping or scaling)."""
    mask, was_training = torch.ones_like(input_ids), model.training
    model.eval()  # no dropout between the two passes
    with torch.no_grad():
        states = hidden(model, input_ids, mask)
        logits = model_logits(model, input_ids, mask)
    model.train(was_training)
    return torch.allclose(model.get_output_embeddings()(states).float(), logits.float(), rtol=1e-3, atol=1e-3)


@dataclass
class ModelPair:
    """A frozen teacher and a student over one tokenizer; logits cut to the shared vocab."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int | None = None
    teacher_name: str = ""
    student_name: str = ""

    def __post_init__(self):
        if self.vocab_size is None:
            self.vocab_size = len(self.tokenizer)
        self.teacher_name = self.teacher_name or getattr(self.teacher.config, "name_or_path", "") or "teacher"
        self.student_name = self.student_name or getattr(self.student.config, "name_or_path", "") or "student"
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            rows = model.get_output_embeddings().weight.shape[0]
            if rows < self.vocab_size:
                raise ValueError(
                    f"The {role} has {rows} output rows but the tokenizer has {self.vocab_size} tokens; "
                    "its logits cannot cover the vocabulary. Use the tokenizer the model was trained with."
                )

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @cached_property
    def max_length(self) -> int | None:
        """The shorter context of the two models (None when neither config says)."""
        lengths = [n for n in (context_length(self.teacher), context_length(self.student)) if n]
        return min(lengths) if lengths else None

    @cached_property
    def fingerprint(self) -> str:
        return f"{fingerprint(self.teacher)}-{fingerprint(self.student)}"

    @cached_property
    def linear_heads(self) -> bool:
        """Whether both models' logits are a plain linear map of their last hidden state (see `states`)."""
        probe = torch.arange(min(8, self.vocab_size), device=self.device)[None]
        return all(head_is_linear(m, probe, last_hidden) for m in (self.teacher, self.student))

    def _check_length(self, input_ids: Tensor) -> None:
        if self.max_length and input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"Cannot run a sequence of {input_ids.shape[1]} tokens: the models' context is only "
                f"{self.max_length}. Window the text (kdviz.data does so for plain text) or shorten it."
            )

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(teacher, student) logits [B, T, V_shared] for a padded batch (either padding side)."""
        self._check_length(input_ids)
        teacher = model_logits(self.teacher, input_ids, attention_mask)[..., : self.vocab_size]
        student = model_logits(self.student, input_ids, attention_mask)[..., : self.vocab_size]
        return teacher, student

    @torch.inference_mode()
    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(teacher, student) last hidden states [B, T, H] (use with `output_head`; no logits are made)."""
        self._check_length(input_ids)
        return (last_hidden(self.teacher, input_ids, attention_mask),
                last_hidden(self.student, input_ids, attention_mask))


def load_pair(
    teacher: str | os.PathLike,
    student: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> ModelPair:
    """Load teacher and student (hub id, local folder or ``zoo:`` name) in eval mode.

    cuda with bf16 when there is a GPU, else cpu with fp32. The two tokenizers must map text
    to the same ids; padded vocab sizes that differ within a family (151936 vs 152064) are
    aligned to the shared tokenizer's vocabulary.

    >>> pair = load_pair("zoo:teacher-l", "zoo:student", device="cpu")
>>> pair.vocab_size, pair.max_length
(8192, 256)
    """
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    t_model, t_tok = _load_one(teacher, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    s_model, s_tok = _load_one(student, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    vocab = check_same_tokenizer(t_tok, s_tok)
    for model in (t_model, s_model):
        model.requires_grad_(False)
    return ModelPair(teacher=t_model, student=s_model, tokenizer=s_tok, vocab_size=vocab,
                     teacher_name=str(teacher), student_name=str(student))
