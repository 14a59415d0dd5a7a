"""Distillation across tokenizers: training examples built for both tokenizers, and the teacher that scores them.

`aligned_dataset` turns the data into `CrossExample`s: the student's ids and labels are the training data (each
model reads a record in its own template, as `kdviz.analysis.crosstok` builds them), and each example carries the
teacher's ids for the same record and the aligned groups of the response (`kdviz.align`) as positions into both.
The end-of-response tokens form a zero-width group, left out as TRL GOLD skips EOS on both sides.

`AlignedTeacher` is the `kdviz.teachers.Teacher` of such a run: `prepare` runs the teacher on its own ids (no
gradient) and merges its distribution over each group; `loss` runs the student (full logits), merges its side and
computes `LossAcross` (ULD or GOLD's hybrid) per group; for cross-atkd, `prepare` keeps each group's
p(text) and the teacher's matched-vocabulary rows at one-to-one groups, and `loss` weighs the groups' TKD and
DKD as ATKD does, split on the global batch's group u. Each micro-batch's loss is its groups' sum over the global
batch's number of groups, so the step's loss is the mean over all its groups whatever the layout. Per text this is
TRL's `ULDLoss` (which averages each text's groups, then the texts); over a batch, texts weigh by their groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdviz.align import VocabularyMatch
from kdviz.analysis.crosstok import AlignedExample, aligned_examples
from kdviz.data import IGNORE_INDEX, Batch, Example, Source, TokenDataset, collate
from kdviz.losses import LossParts, TokenSplit
from kdviz.maths.crossloss import OBJECTIVES as CROSS_LOSSES
from kdviz.maths.crossloss import (LossAcross, atkd_contributions, cat_teachers, group_uncertainty, merged_losses,
                                   merged_side, per_text, student_terms, teacher_groups)
from kdviz.models import context_length, fingerprint, model_logits
from kdviz.teachers import TeacherSide

TEACHER_PAD = 0  # right padding the attention mask hides, never read: any id does


@dataclass(frozen=True)
class CrossExample(Example):
    """A student's training example plus the teacher's ids for the same record and the aligned target groups."""

    teacher_ids: list[int] = field(default_factory=list)
    groups: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (teacher, student) positions


def cross_example(example: AlignedExample) -> CrossExample:
    """The training example of one aligned text: the student's ids, labels on the text's tokens, the groups that
    have text and a token on each side, as positions into the teacher's and the student's ids."""
    t_before, s_before = len(example.teacher_before), len(example.student_before)
    tokens = example.alignment.student.ids
    groups = [([t_before + i for i in g.teacher], [s_before + i for i in g.student])
              for g in example.alignment.groups if g.teacher and g.student and g.byte_end > g.byte_start]
    return CrossExample(example.inputs("student"), [IGNORE_INDEX] * s_before + tokens, example.source,
                        teacher_ids=example.inputs("teacher"), groups=groups)


def aligned_dataset(pair, source: Source, *, template: str, max_length: int | None, limit: int | None,
                    truncate: bool) -> TokenDataset:
    """The data as `CrossExample`s for a pair across tokenizers (records and text as `kdviz.analyze` reads them)."""
    examples = aligned_examples(pair, source, template=template, max_length=max_length, limit=limit, truncate=truncate)
    return TokenDataset([cross_example(ex) for ex in examples], source.description,
                        template=template if source.records or source.zoo else None)


def teacher_fields(examples: list[Example]) -> dict:
    """The teacher's fields of a training batch of `CrossExample`s (its padded ids and mask, the groups); {} for
    examples of one tokenizer."""
    if not examples or not all(isinstance(ex, CrossExample) for ex in examples):
        return {}
    teacher = collate([Example(ex.teacher_ids, ex.teacher_ids, ex.source) for ex in examples], pad_id=TEACHER_PAD)
    return {"teacher_input_ids": teacher.input_ids, "teacher_attention_mask": teacher.attention_mask,
            "groups": [ex.groups for ex in examples]}


def check_pair_loss(pair, loss: str) -> None:
    """ValueError when the loss does not fit the pair: token-level losses need one tokenizer, uld, gold and
    cross-atkd two."""
    if pair.cross_tokenizer and loss not in CROSS_LOSSES:
        raise ValueError(
            f"--loss {loss} compares the teacher's and the student's distributions token by token over one "
            f"vocabulary, but {pair.teacher_name} and {pair.student_name} have different tokenizers "
            f"({pair.vocabulary.describe()}). Use --loss uld, gold or cross-atkd, which compare the models on groups "
            "of tokens aligned by bytes" + (" (cross-atkd is ATKD on those groups)." if loss == "atkd" else "."))
    if not pair.cross_tokenizer and loss in CROSS_LOSSES:
        raise ValueError(
            f"--loss {loss} distils across tokenizers (aligned groups, sorted probabilities), but {pair.teacher_name} "
            f"and {pair.student_name} share one tokenizer, where the token-level objectives compare the full "
            "distributions exactly. Use one of them (e.g. --loss fkl or atkd).")


def check_cross_run(loss: str, *, teacher_cache, probe_every: int | None) -> None:
    """ValueError for settings uld and gold do not support (checked before any model loads)."""
    if loss not in CROSS_LOSSES:
        return
    if teacher_cache is not None:
        raise ValueError(f"--loss {loss} runs the teacher on its own tokenization of each record; a top-k teacher "
                         "cache holds the teacher's rows on the student's tokens only. Give the teacher model "
                         "(--teacher) instead of --teacher-cache.")
    if probe_every is not None:
        raise ValueError(f"--probe-every analyses the student token by token against the teacher, which --loss {loss} "
                         "(a pair across tokenizers) does not support yet; run kdviz analyze on the saved student.")


class AlignedTeacher:
    """A live teacher with its own tokenizer: scores `CrossExample` batches on aligned groups (see the module doc)."""

    top_k = None

    def __init__(self, module: nn.Module, *, vocabulary: VocabularyMatch, name: str = "", tokenizer=None):
        self.module, self.vocabulary, self.vocab_size = module, vocabulary, vocabulary.teacher_size
        self.tokenizer = tokenizer  # the teacher's own (evaluation builds a pair across tokenizers with it)
        self.name = name or getattr(module.config, "name_or_path", "") or "teacher"

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.module)

    @property
    def context(self) -> int | None:
        return context_length(self.module)

    def check_data(self, dataset: TokenDataset, tokenizer, *, temperature: float) -> None:
        """ValueError unless every example carries the teacher's ids and the groups (`aligned_dataset`)."""
        if not all(isinstance(ex, CrossExample) for ex in dataset):
            raise ValueError("A teacher with another tokenizer needs training examples built for both tokenizers: "
                             "make them with kdviz.train.aligned.aligned_dataset(pair, source, ...).")

    def recorded(self) -> dict:
        return {"fused_linear": False, "teacher_vocabulary": self.vocabulary.teacher_size,
                "student_vocabulary": self.vocabulary.student_size, "vocabulary_share": self.vocabulary.share}

    def linear_with(self, student: nn.Module) -> bool:
        return False  # the loss merges full distributions per group

    def top1(self, batch: Batch, keys: list[int]) -> None:
        return None  # the teacher's ids mean other text than the student's: no token-level agreement

    @torch.no_grad()
    def prepare(self, kd: LossAcross, batch: dict, *, linear: bool) -> TeacherSide:
        """The teacher's merged distribution [P, V_t] of every group of the micro-batch (for cross-atkd, its
        p(text) and matched rows instead), and their u [P]."""
        ids = batch["teacher_input_ids"]
        logits = model_logits(self.module, ids, batch["teacher_attention_mask"])[..., : self.vocab_size]  # (B, T, V_t)
        if kd.objective == "cross-atkd":
            side = cat_teachers([teacher_groups(logits[b], ids[b], batch["input_ids"][b], groups,
                                                self.vocabulary.student_of_teacher, temperature=kd.teacher_temperature)
                                 for b, groups in enumerate(batch["groups"])])
            return TeacherSide(-torch.expm1(side.logp), groups=side)
        merged, unc = [], []
        for b, groups in enumerate(batch["groups"]):
            positions = [t for t, _ in groups]
            merged.append(merged_side(logits[b], ids[b], positions, temperature=kd.teacher_temperature,
                                      merge=kd.merge))
            unc.append(group_uncertainty(logits[b], ids[b], positions, temperature=kd.teacher_temperature))
        return TeacherSide(torch.cat(unc), merged=torch.cat(merged))

    def loss(self, kd: LossAcross, student: nn.Module, side: TeacherSide, batch: dict, *, linear: bool,
             ce_weight: float, num_items: int, split: TokenSplit | None) -> LossParts:
        """`kd` over the micro-batch's groups / `num_items` (the global batch's groups); ce is the student's
        cross-entropy on its target tokens, summed, over the same count."""
        ids, labels = batch["input_ids"], batch["labels"][:, 1:]
        logits = model_logits(student, ids, batch["attention_mask"])[..., : self.vocabulary.student_size]  # (B, T, V_s)
        if kd.objective == "cross-atkd":
            shares = self._atkd_shares(kd, logits, ids, side, batch["groups"], split)
        else:
            s_merged = torch.cat([merged_side(logits[b], ids[b], [s for _, s in groups], merge=kd.merge,
                                              temperature=kd.student_temperature)
                                  for b, groups in enumerate(batch["groups"])])  # (P, V_s)
            shares = merged_losses(side.merged, s_merged, loss=kd,
                                   student_of_teacher=self.vocabulary.student_of_teacher) / num_items  # (P,)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum") / num_items
        kd_loss = shares.sum()
        return LossParts(kd_loss + ce_weight * ce, kd_loss.detach(), ce.detach(), shares.detach(), side.unc)

    def _atkd_shares(self, kd: LossAcross, logits: Tensor, ids: Tensor, side: TeacherSide, groups: list,
                     split: TokenSplit | None) -> Tensor:
        """Each group's share of the cross-atkd loss [P] (weights from the global batch's `split`)."""
        terms = [student_terms(teacher, logits[b], ids[b], [s for _, s in groups[b]], self.vocabulary.student_of_teacher,
                               temperature=kd.student_temperature)
                 for b, teacher in enumerate(per_text(side.groups, [len(g) for g in groups]))]
        return atkd_contributions(torch.cat([t for t, _ in terms]), torch.cat([d for _, d in terms]), side.unc, kd,
                                  split)
