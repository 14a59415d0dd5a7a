"""Distillation losses across tokenizers on aligned groups: ULD and GOLD's hybrid, as TRL's `ULDLoss` computes them.

Per text, per group paired on both sides (groups from `kdviz.align`; merged distributions as in
`kdviz.maths.groups.merged_log_probs`):

    uld  = sum_j |sort(p~)_j - sort(q~)_j|                         sorted-probability L1, all ids
    gold = w * JSD_beta(p~_M, q~_M) + (1 - w) * uld over unmatched  M the string-matched ids, w = |M| / V_teacher

where p~_M are the matched columns of the merged (unnormalised) distributions, their logs clamped at 1e-8 and
JSD_beta is GKD's generalized JSD, as TRL's `_compute_hybrid_uld_loss`. `LossAcross` holds TRL's GOLDConfig
defaults (merge "observed", beta 0.5, temperatures 1, adaptive w). TRL averages a text's groups, then the texts:
`text_means(...).mean()` is its loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from kdviz.maths.groups import MERGES, group_log_probs, merged_log_probs, sorted_l1, token_log_probs

OBJECTIVES = ("uld", "gold")
LOG_FLOOR = 1e-8  # TRL clamps the matched probabilities before their log


@dataclass(frozen=True)
class LossAcross:
    """A loss across tokenizers with TRL GOLDConfig's defaults; `objective` is "uld" or "gold" (the hybrid)."""

    objective: str = "uld"
    merge: str = "observed"  # GOLDConfig.uld_token_merge_strategy
    beta: float = 0.5  # GOLDConfig.beta: the JSD's mixture weight on the matched vocabulary
    matched_weight: float | None = None  # GOLDConfig.uld_hybrid_matched_weight; None: the matched share of V_teacher
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}.")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta is the JSD's mixture weight and must be in [0, 1], got {self.beta!r}.")
        if self.matched_weight is not None and not 0 <= self.matched_weight <= 1:
            raise ValueError(f"matched_weight must be in [0, 1] (or None: the matched share), got {self.matched_weight!r}.")
        for name in ("teacher_temperature", "student_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}.")

    @property
    def params(self) -> dict:
        """The settings besides the objective; "temperature" is the teacher's (its u and its side of the loss)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "objective"}
        return {**settings, "temperature": self.teacher_temperature}

    ce_weight = 0.0  # no cross-entropy term of its own (KDLoss's teaching modes have one)
    self_normalised = False  # groups weigh alike: the loss is a mean over the global batch's groups


def loss_across(objective: str, **params) -> LossAcross:
    """`LossAcross(objective, **params)`, with a ValueError naming the allowed parameters for an unknown one."""
    allowed = [f.name for f in fields(LossAcross) if f.name != "objective"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for loss {objective!r}; allowed: {', '.join(allowed)}.")
    return LossAcross(objective, **params)


def generalized_jsd(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """GKD's JSD_beta per row, teacher p, student q (any non-negative masses): [R, V] -> [R].

    beta 0 is KL(p || q), beta 1 is KL(q || p); else beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.
    """
    def kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0:
        return kl_rows(log_p, log_q)
    if beta == 1:
        return kl_rows(log_q, log_p)
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                            log_q + torch.log1p(torch.tensor(-beta, dtype=log_q.dtype)))
    return beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)


def merged_side(logits: Tensor, ids: Tensor, groups: Sequence[Sequence[int]], *, temperature: float,
                merge: str) -> Tensor:
    """One side's merged distribution of each group: logits [T, V], ids [T] -> log-probs [P, V] (unnormalised).

    Row i of `logits` is the row the merge reads for token i (for "observed", the logits at the token's own
    position; for "bayesian", those that predict it).
    """
    log_probs = (logits.float() / temperature).log_softmax(-1)  # (T, V)
    return merged_log_probs(log_probs, token_log_probs(log_probs, ids), groups, merge=merge)


def merged_losses(t_merged: Tensor, s_merged: Tensor, *, loss: LossAcross,
                  student_of_teacher: Tensor | None = None) -> Tensor:
    """The loss of each group from both sides' merged distributions: [P, V_t], [P, V_s] -> [P].

    "gold" needs `student_of_teacher` [V_t] (`VocabularyMatch`).
    """
    if loss.objective == "uld":
        return sorted_l1(t_merged, s_merged)
    if student_of_teacher is None:
        raise ValueError("The gold loss compares the string-matched vocabulary: give student_of_teacher "
                         "(kdviz.align.match_vocabularies(teacher_tokenizer, student_tokenizer).student_of_teacher).")
    student_of_teacher = student_of_teacher.to(t_merged.device)
    t_matched = (student_of_teacher >= 0).nonzero().squeeze(1)  # (M,)
    s_matched = student_of_teacher[t_matched]
    floor = math.log(LOG_FLOOR)
    jsd = generalized_jsd(t_merged[:, t_matched].clamp_min(floor), s_merged[:, s_matched].clamp_min(floor), loss.beta)
    t_rest = torch.ones(t_merged.shape[-1], dtype=torch.bool, device=t_merged.device)
    s_rest = torch.ones(s_merged.shape[-1], dtype=torch.bool, device=s_merged.device)
    t_rest[t_matched], s_rest[s_matched] = False, False
    unmatched = sorted_l1(t_merged[:, t_rest], s_merged[:, s_rest])
    weight = loss.matched_weight if loss.matched_weight is not None else len(t_matched) / t_merged.shape[-1]
    return weight * jsd + (1 - weight) * unmatched


def group_losses(teacher_logits: Tensor, teacher_ids: Tensor, student_logits: Tensor, student_ids: Tensor,
                 groups: Sequence[tuple[Sequence[int], Sequence[int]]], *, loss: LossAcross,
                 student_of_teacher: Tensor | None = None) -> Tensor:
    """The loss of each group paired on both sides of one text: [P] (groups with no token on a side are left out).

    teacher_logits [T_t, V_t] and student_logits [T_s, V_s] are the rows the merge reads for each token (see
    `merged_side`), aligned with teacher_ids [T_t] and student_ids [T_s]. "gold" needs `student_of_teacher` [V_t].
    """
    paired = [(list(g[0]), list(g[1])) for g in groups if len(g[0]) and len(g[1])]
    t_merged = merged_side(teacher_logits, teacher_ids, [t for t, _ in paired], temperature=loss.teacher_temperature,
                           merge=loss.merge)
    s_merged = merged_side(student_logits, student_ids, [s for _, s in paired], temperature=loss.student_temperature,
                           merge=loss.merge)
    return merged_losses(t_merged, s_merged, loss=loss, student_of_teacher=student_of_teacher)


def group_uncertainty(logits: Tensor, ids: Tensor, groups: Sequence[Sequence[int]], *, temperature: float) -> Tensor:
    """u = 1 - p(group's text) of each group, p the product of its tokens' conditionals: [T, V], [T] -> [P].

    Here row t of `logits` predicts token t + 1 (a plain forward); every group's positions must be >= 1.
    """
    log_probs = (logits[:-1].float() / temperature).log_softmax(-1)  # (T-1, V): row t - 1 predicts token t
    token_logp = token_log_probs(log_probs, ids[1:])
    return -torch.expm1(group_log_probs(token_logp, [[i - 1 for i in g] for g in groups]))


def text_means(per_text: Sequence[Tensor]) -> Tensor:
    """Each text's mean group loss [N] (0 for a text with no paired group), TRL's reduction before its batch mean."""
    return torch.stack([losses.mean() if len(losses) else losses.sum() for losses in per_text])
