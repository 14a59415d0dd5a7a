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
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from kdviz.maths.groups import MERGES, merged_log_probs, sorted_l1, token_log_probs

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


def group_losses(teacher_logits: Tensor, teacher_ids: Tensor, student_logits: Tensor, student_ids: Tensor,
                 groups: Sequence[tuple[Sequence[int], Sequence[int]]], *, loss: LossAcross,
                 student_of_teacher: Tensor | None = None) -> Tensor:
    """The loss of each group paired on both sides of one text: [P] (groups with no token on a side are left out).

    teacher_logits [T_t, V_t] and student_logits [T_s, V_s] are the rows the merge reads for each token (for
    "observed", the logits at the token's own position; for "bayesian", those that predict it), aligned with
    teacher_ids [T_t] and student_ids [T_s]. "gold" needs `student_of_teacher` [V_t] (`VocabularyMatch`).
    """
    paired = [(list(g[0]), list(g[1])) for g in groups if len(g[0]) and len(g[1])]
    t_log = (teacher_logits.float() / loss.teacher_temperature).log_softmax(-1)  # (T_t, V_t)
    s_log = (student_logits.float() / loss.student_temperature).log_softmax(-1)  # (T_s, V_s)
    t_merged = merged_log_probs(t_log, token_log_probs(t_log, teacher_ids), [t for t, _ in paired], merge=loss.merge)
    s_merged = merged_log_probs(s_log, token_log_probs(s_log, student_ids), [s for _, s in paired], merge=loss.merge)
    if loss.objective == "uld":
        return sorted_l1(t_merged, s_merged)
    if student_of_teacher is None:
        raise ValueError("The gold loss compares the string-matched vocabulary: give student_of_teacher "
                         "(kdviz.align.match_vocabularies(teacher_tokenizer, student_tokenizer).student_of_teacher).")
    t_matched = (student_of_teacher >= 0).nonzero().squeeze(1)  # (M,)
    s_matched = student_of_teacher[t_matched]
    floor = math.log(LOG_FLOOR)
    jsd = generalized_jsd(t_merged[:, t_matched].clamp_min(floor), s_merged[:, s_matched].clamp_min(floor), loss.beta)
    t_rest = torch.ones(t_merged.shape[-1], dtype=torch.bool)
    s_rest = torch.ones(s_merged.shape[-1], dtype=torch.bool)
    t_rest[t_matched], s_rest[s_matched] = False, False
    unmatched = sorted_l1(t_merged[:, t_rest.to(t_merged.device)], s_merged[:, s_rest.to(s_merged.device)])
    weight = loss.matched_weight if loss.matched_weight is not None else len(t_matched) / t_merged.shape[-1]
    return weight * jsd + (1 - weight) * unmatched


def text_means(per_text: Sequence[Tensor]) -> Tensor:
    """Each text's mean group loss [N] (0 for a text with no paired group), TRL's reduction before its batch mean."""
    return torch.stack([losses.mean() if len(losses) else losses.sum() for losses in per_text])
