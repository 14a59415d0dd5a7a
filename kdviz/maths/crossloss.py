"""Distillation losses across tokenizers on aligned groups: ULD and GOLD's hybrid, as TRL's `ULDLoss` computes them,
and ATKD across tokenizers.

Per text, per group paired on both sides (groups from `kdviz.align`; merged distributions as in
`kdviz.maths.groups.merged_log_probs`):

    uld  = sum_j |sort(p~)_j - sort(q~)_j|                         sorted-probability L1, all ids
    gold = w * JSD_beta(p~_M, q~_M) + (1 - w) * uld over unmatched  M the string-matched ids, w = |M| / V_teacher
    cross-atkd: easy groups lam / n_easy * DKD_M, hard groups (1 - lam) / n_hard * (TKD + DKD_M)

For cross-atkd a group's u is 1 - p(group's text) under the teacher, hard = the top k of the global batch's
groups by u (ATKD's split, `kdviz.maths.split.atkd_weights`); TKD is the binary KL of [p_g, 1 - p_g] against the
student's [q_g, 1 - q_g] (exact across vocabularies); DKD_M is DKD over the string-matched vocabulary, both rows
renormalised there, at one-to-one groups whose target is a matched pair (other groups carry TKD only), as
`kdviz.maths.groups.group_stats` reports them in analysis.

where p~_M are the matched columns of the merged (unnormalised) distributions, their logs clamped at 1e-8 and
JSD_beta is GKD's generalized JSD, as TRL's `_compute_hybrid_uld_loss`. `LossAcross` holds TRL's GOLDConfig
defaults (merge "observed", beta 0.5, temperatures 1, adaptive w). TRL averages a text's groups, then the texts:
`text_means(...).mean()` is its loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from kdviz.checks import check_fraction
from kdviz.maths.groups import MERGES, binary_kl, group_log_probs, merged_log_probs, sorted_l1, token_log_probs
from kdviz.maths.logspace import tkd_dkd
from kdviz.maths.split import TokenSplit, atkd_weights

OBJECTIVES = ("uld", "gold", "cross-atkd")
LOG_FLOOR = 1e-8  # TRL clamps the matched probabilities before their log
ONLY = {"uld": ("lam", "k"), "gold": ("lam", "k"), "cross-atkd": ("merge", "beta", "matched_weight")}  # not theirs


@dataclass(frozen=True)
class LossAcross:
    """A loss across tokenizers: "uld" or "gold" (the hybrid) with TRL GOLDConfig's defaults, or "cross-atkd"
    (ATKD's defaults lam 0.2, k 0.5)."""

    objective: str = "uld"
    merge: str = "observed"  # GOLDConfig.uld_token_merge_strategy
    beta: float = 0.5  # GOLDConfig.beta: the JSD's mixture weight on the matched vocabulary
    matched_weight: float | None = None  # GOLDConfig.uld_hybrid_matched_weight; None: the matched share of V_teacher
    teacher_temperature: float = 1.0
    student_temperature: float = 1.0
    lam: float = 0.2  # cross-atkd: the easy groups' share of the loss
    k: float = 0.5  # cross-atkd: the fraction of groups that are hard

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
        if not 0 <= self.lam <= 1:
            raise ValueError(f"lam is the easy groups' share of the loss and must be in [0, 1], got {self.lam!r}.")
        check_fraction(self.k, "k (the fraction of hard groups)")

    @property
    def params(self) -> dict:
        """The objective's settings; "temperature" is the teacher's (its u and its side of the loss)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self)
                    if f.name != "objective" and f.name not in ONLY[self.objective]}
        return {**settings, "temperature": self.teacher_temperature}

    ce_weight = 0.0  # no cross-entropy term of its own (KDLoss's teaching modes have one)

    @property
    def self_normalised(self) -> bool:
        """cross-atkd weighs its groups by 1 / the hard and easy group counts; uld and gold by 1 / all groups."""
        return self.objective == "cross-atkd"


def loss_across(objective: str, **params) -> LossAcross:
    """`LossAcross(objective, **params)`, with a ValueError naming the allowed parameters for an unknown one."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}.")
    allowed = [f.name for f in fields(LossAcross) if f.name != "objective" and f.name not in ONLY[objective]]
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


class GroupTeacher(NamedTuple):
    """The teacher's side of cross-atkd for a set of groups (`teacher_groups`)."""

    logp: Tensor  # [P] log p(group's text)
    single: Tensor  # [P] bool: one token each side, the teacher's target string-matched to the student's target
    matched: Tensor  # [P1, M] the teacher's log-probs at the single groups, renormalised over the matched ids
    target: Tensor  # [P1] the target's column among the matched ids


def _predicting(logits: Tensor, temperature: float) -> Tensor:
    """Log-probs whose row t predicts token t (row 0, which nothing predicts, is a copy of row 1's input: unused)."""
    log_probs = (logits.float() / temperature).log_softmax(-1)
    return torch.cat([log_probs[:1], log_probs[:-1]])


def _matched_columns(student_of_teacher: Tensor) -> tuple[Tensor, Tensor]:
    t_cols = (student_of_teacher >= 0).nonzero().squeeze(1)  # (M,)
    return t_cols, student_of_teacher[t_cols]


def teacher_groups(logits: Tensor, ids: Tensor, student_ids: Tensor,
                   groups: Sequence[tuple[Sequence[int], Sequence[int]]], student_of_teacher: Tensor, *,
                   temperature: float) -> GroupTeacher:
    """The teacher's side of one text's groups: logits [T_t, V_t] of a plain forward over ids [T_t]; the student's
    ids [T_s]; (teacher positions, student positions) per group, every position >= 1."""
    device, student_of_teacher = ids.device, student_of_teacher.to(ids.device)
    log_probs = _predicting(logits, temperature)
    logp = group_log_probs(token_log_probs(log_probs, ids), [list(t) for t, _ in groups])
    one = [i for i, (t, s) in enumerate(groups) if len(t) == len(s) == 1]
    t_rows = torch.tensor([groups[i][0][0] for i in one], dtype=torch.long, device=device)
    s_rows = torch.tensor([groups[i][1][0] for i in one], dtype=torch.long, device=device)
    partner = student_of_teacher[ids[t_rows]]
    single = torch.zeros(len(groups), dtype=torch.bool, device=device)
    single[torch.tensor(one, dtype=torch.long, device=device)] = (partner >= 0) & (partner == student_ids[s_rows])
    rows = t_rows[single[torch.tensor(one, dtype=torch.long, device=device)]]
    t_cols, _ = _matched_columns(student_of_teacher)
    local = torch.full((len(student_of_teacher),), -1, dtype=torch.long, device=device)
    local[t_cols] = torch.arange(len(t_cols), device=device)  # teacher id -> its column among the matched ids
    matched = log_probs[rows][:, t_cols]
    return GroupTeacher(logp, single, matched - torch.logsumexp(matched, -1, keepdim=True), local[ids[rows]])


def cat_teachers(parts: Sequence[GroupTeacher]) -> GroupTeacher:
    """The teacher sides of several texts as one (groups in text order)."""
    return GroupTeacher(*(torch.cat(column) for column in zip(*parts)))


def per_text(teacher: GroupTeacher, sizes: Sequence[int]) -> list[GroupTeacher]:
    """`teacher` (several texts' groups, `cat_teachers`) cut back into texts of `sizes` groups."""
    out, start, row = [], 0, 0
    for size in sizes:
        singles = int(teacher.single[start : start + size].sum())
        out.append(GroupTeacher(teacher.logp[start : start + size], teacher.single[start : start + size],
                                teacher.matched[row : row + singles], teacher.target[row : row + singles]))
        start, row = start + size, row + singles
    return out


def student_terms(teacher: GroupTeacher, logits: Tensor, ids: Tensor, groups: Sequence[Sequence[int]],
                  student_of_teacher: Tensor, *, temperature: float) -> tuple[Tensor, Tensor]:
    """(TKD [P], DKD over the matched vocabulary [P], 0 away from single groups) of one text's groups, from the
    student's logits [T_s, V_s] over ids [T_s] (differentiable), its group positions and the teacher's side."""
    log_probs = _predicting(logits, temperature)
    s_logp = group_log_probs(token_log_probs(log_probs, ids), [list(g) for g in groups])
    _, s_cols = _matched_columns(student_of_teacher.to(ids.device))
    single = teacher.single.nonzero().squeeze(1)
    rows = torch.tensor([groups[i][0] for i in single.tolist()], dtype=torch.long, device=ids.device)
    matched = log_probs[rows][:, s_cols]
    _, dkd = tkd_dkd(teacher.matched, matched - torch.logsumexp(matched, -1, keepdim=True), teacher.target)
    return binary_kl(teacher.logp, s_logp), torch.zeros_like(s_logp).index_put((single,), dkd)


def atkd_contributions(tkd: Tensor, dkd: Tensor, unc: Tensor, loss: LossAcross, split: TokenSplit | None) -> Tensor:
    """Each group's share of the cross-atkd loss [P]: the ATKD weights (from u and `split`, the global batch's) on
    TKD and DKD."""
    weights = atkd_weights(unc, {"lam": loss.lam, "k": loss.k}, split=split)  # (P, 2)
    return weights[:, 0] * tkd + weights[:, 1] * dkd
