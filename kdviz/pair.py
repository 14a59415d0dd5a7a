"""A teacher and a student: `load_pair` loads them, `ModelPair` holds them.

The teacher is a live model or a top-k cache (`teacher_cache=`); either way `pair.source` (a
`kdviz.teachers.Teacher`) is what analysis, evaluation and training ask for the teacher's side.
Models with different tokenizers load as a cross-tokenizer pair (`pair.teacher_tokenizer`,
`pair.vocabulary`): their tokens are aligned by bytes (`kdviz.align`), never compared id by id.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from kdviz.align import VocabularyMatch, match_vocabularies
from kdviz.cache.format import TeacherCache
from kdviz.data import usable_context
from kdviz.models import context_length, default_dtype, fingerprint, last_hidden, load_model, model_logits, \
    resolve_device
from kdviz.teachers import CachedTeacher, LiveTeacher, Teacher

# Texts both tokenizers must map to the same ids (code, prose, whitespace, non-ASCII).
PROBE_TEXTS = (
    "def forward(self, x):\n    return x @ self.weight.T  # (B, T, V)\n",
    "The teacher's distribution: p = softmax(z / tau), 100% in [0, 1].",
    "Grüße, 東京, café \t tabs\n\n  and  spaces",
)


def tokenizer_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    """Why the two tokenizers are not one (a sentence for an error message), or None when they map text alike."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    for text in PROBE_TEXTS:
        t_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        s_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if t_ids != s_ids:
            return (f"The teacher and student tokenizers map the same text to different ids "
                    f"(teacher vocab {len(t_vocab)}, student vocab {len(s_vocab)}): {text[:30]!r} -> "
                    f"{t_ids[:8]} vs {s_ids[:8]}. Token-level KD compares distributions over one shared "
                    "vocabulary, so both models must use the same tokenizer: pick a student from the "
                    "teacher's family (e.g. Qwen2.5-7B -> Qwen2.5-0.5B) or retokenize and retrain one of them.")
    if t_vocab != s_vocab:
        only = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:5]
        return (f"The teacher and student tokenizers have different vocabularies ({len(t_vocab)} vs "
                f"{len(s_vocab)} entries; first differences {only}). Token-level KD needs one shared "
                "vocabulary: use a teacher and student of the same tokenizer family.")
    return None


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> int:
    """The shared vocabulary size; ValueError when the tokenizers map text to different ids."""
    difference = tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if difference:
        raise ValueError(difference)
    return len(teacher_tokenizer)


@dataclass
class ModelPair:
    """A frozen teacher and a student; logits cut to the shared vocab.

    `teacher` is the teacher model (None when it is read from a top-k cache); `source` is the
    teacher as the pipeline sees it (a live model or a cache, `kdviz.teachers`). `tokenizer` is
    the student's, and the teacher's too unless `teacher_tokenizer` is given: then the pair is
    across tokenizers, `vocab_size` is the student's and `vocabulary` matches the two vocabularies.
    """

    teacher: torch.nn.Module | None
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int | None = None
    teacher_name: str = ""
    student_name: str = ""
    source: Teacher | None = field(default=None, repr=False)
    teacher_tokenizer: object | None = field(default=None, repr=False)
    vocabulary: VocabularyMatch | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.vocab_size is None:
            self.vocab_size = len(self.tokenizer)
        if self.cross_tokenizer and self.teacher is None:
            raise ValueError("A pair across tokenizers needs the teacher model: a top-k cache holds ids of the "
                             "teacher's tokenizer, which the student's cannot read.")
        if self.cross_tokenizer and self.vocabulary is None:
            self.vocabulary = match_vocabularies(self.teacher_tokenizer, self.tokenizer)
        teacher_vocab = len(self.teacher_tokenizer) if self.cross_tokenizer else self.vocab_size
        if self.source is None:
            if self.teacher is None:
                raise ValueError("ModelPair needs a teacher model, or source= a kdviz.teachers.CachedTeacher.")
            self.source = LiveTeacher(self.teacher, vocab_size=teacher_vocab, name=self.teacher_name)
        self.teacher_name = self.teacher_name or self.source.name
        self.student_name = self.student_name or getattr(self.student.config, "name_or_path", "") or "student"
        sides = (("teacher", self.teacher, teacher_vocab), ("student", self.student, self.vocab_size))
        for role, model, vocab in sides:
            rows = model.get_output_embeddings().weight.shape[0] if model is not None else vocab
            if rows < vocab:
                raise ValueError(
                    f"The {role} has {rows} output rows but the tokenizer has {vocab} tokens; "
                    "its logits cannot cover the vocabulary. Use the tokenizer the model was trained with."
                )

    @property
    def cross_tokenizer(self) -> bool:
        """Whether teacher and student have different tokenizers (their ids mean different text)."""
        return self.teacher_tokenizer is not None

    def check_shared_tokenizer(self, what: str) -> None:
        """ValueError when `what` (an analysis or objective that compares the models id by id) meets a pair across
        tokenizers."""
        if self.cross_tokenizer:
            raise ValueError(
                f"{what} compares the teacher's and the student's distributions token by token over one vocabulary, "
                f"but {self.teacher_name} and {self.student_name} have different tokenizers "
                f"({self.vocabulary.describe()}). Use a teacher and student of one tokenizer family; kdviz.align "
                "aligns this pair's tokens by bytes.")

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @cached_property
    def max_length(self) -> int | None:
        """The shorter context of the teacher (or its cache's data) and the student (None when neither says)."""
        lengths = [n for n in (self.source.context, context_length(self.student)) if n]
        return min(lengths) if lengths else None

    def context(self, max_length: int | None = None) -> int:
        """The context examples are tokenized for: `max_length` if given, never past the models' (the one rule)."""
        return usable_context(self.max_length, max_length)

    @cached_property
    def fingerprint(self) -> str:
        return f"{self.source.fingerprint}-{fingerprint(self.student)}"

    @cached_property
    def linear_heads(self) -> bool:
        """Whether the fused-linear paths apply: both heads are plain linear maps of the last hidden state."""
        return self.source.linear_with(self.student)

    def _check_batch(self, input_ids: Tensor) -> None:
        """ValueError when one batch of ids cannot go to both models: other tokenizers, or past the context."""
        self.check_shared_tokenizer("Running both models on one batch of ids")
        if self.max_length and input_ids.shape[1] > self.max_length:
            raise ValueError(
                f"Cannot run a sequence of {input_ids.shape[1]} tokens: the models' context is only "
                f"{self.max_length}. Window the text (kdviz.data does so for plain text) or shorten it."
            )

    def _live_teacher(self) -> torch.nn.Module:
        if self.teacher is None:
            raise ValueError(f"This pair's teacher is read from a top-k cache ({self.teacher_name}); there is no "
                             "teacher model to run. Load the pair with the teacher model for its logits.")
        return self.teacher

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(teacher, student) logits [B, T, V_shared] for a padded batch (either padding side)."""
        self._check_batch(input_ids)
        teacher = model_logits(self._live_teacher(), input_ids, attention_mask)[..., : self.vocab_size]
        student = model_logits(self.student, input_ids, attention_mask)[..., : self.vocab_size]
        return teacher, student

    @torch.inference_mode()
    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(teacher, student) last hidden states [B, T, H] (use with `output_head`; no logits are made)."""
        self._check_batch(input_ids)
        return (last_hidden(self._live_teacher(), input_ids, attention_mask),
                last_hidden(self.student, input_ids, attention_mask))


def load_pair(
    teacher: str | os.PathLike | None,
    student: str | os.PathLike,
    *,
    teacher_cache: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> ModelPair:
    """Load teacher and student (hub id, local folder, .gguf file or ``zoo:`` name) in eval mode.

    cuda with bf16 when there is a GPU, else cpu with fp32. Padded vocab sizes that differ
    within a family (151936 vs 152064) are aligned to the shared tokenizer's vocabulary. Models
    whose tokenizers map text to different ids load as a pair across tokenizers (it says so on
    stderr, with both vocabulary sizes and the share of the teacher's vocabulary that the
    student's matches; see `ModelPair`). With `teacher_cache` (a folder made by `kdviz
    teacher-cache`) and teacher=None, the teacher is read from the cache instead of run.

    >>> pair = load_pair("zoo:teacher-l", "zoo:student", device="cpu")
    >>> pair.vocab_size, pair.max_length
    (8192, 256)
    """
    if (teacher is None) == (teacher_cache is None):
        raise ValueError("Give the teacher as a model (teacher=, CLI --teacher) or as a top-k cache (teacher_cache=, "
                         "CLI --teacher-cache), one of them.")
    device = resolve_device(device)
    if dtype is not None and not isinstance(dtype, torch.dtype) or dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, torch.float16), got "
                         f"{dtype!r}.")
    dtype = dtype or default_dtype(device)
    if teacher_cache is not None:
        source = CachedTeacher(TeacherCache.open(teacher_cache))  # checked before the student loads
        s_model, s_tok = load_model(student, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        source.check_tokenizer(s_tok, str(student))
        return ModelPair(None, s_model.requires_grad_(False), s_tok, vocab_size=source.vocab_size,
                         teacher_name=source.name, student_name=str(student), source=source)
    t_model, t_tok = load_model(teacher, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    s_model, s_tok = load_model(student, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    for model in (t_model, s_model):
        model.requires_grad_(False)
    if tokenizer_difference(t_tok, s_tok) is None:
        return ModelPair(teacher=t_model, student=s_model, tokenizer=s_tok, vocab_size=len(t_tok),
                         teacher_name=str(teacher), student_name=str(student))
    vocabulary = match_vocabularies(t_tok, s_tok)
    print(f"kdviz: {teacher} and {student} have different tokenizers: {vocabulary.describe()}. Their tokens are "
          "aligned by bytes (kdviz.align).", file=sys.stderr)
    return ModelPair(teacher=t_model, student=s_model, tokenizer=s_tok, teacher_name=str(teacher),
                     student_name=str(student), teacher_tokenizer=t_tok, vocabulary=vocabulary)
