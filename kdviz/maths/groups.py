"""KD quantities per aligned group of a text tokenized by two tokenizers (groups from `kdviz.align`).

A group is the same bytes under both tokenizers, so its probability under a model is the
product of its tokens' conditionals (p_g = prod_i p(t_i | prefix)), exact on either side:

    u   = 1 - p_g                                   teacher uncertainty of the group
    TKD = KL([p_g, 1 - p_g] || [q_g, 1 - q_g])      exact across vocabularies
    KL, DKD over the string-matched vocabulary, at one-to-one groups only (one token each side):
        both distributions restricted to the matched ids and renormalised; the mass left out is
        reported as t_unmatched / s_unmatched (DKD needs the target itself matched)
    ULD = sum_j |sort(p~)_j - sort(q~)_j|           sorted-probability L1 (Boizard et al. 2024),
        p~ the group's merged distribution (TRL GOLD's merge), zero-padded to the larger vocabulary

Rows are aligned with tokens: row i of a side's log-probs is the distribution that predicted
its token i (the caller shifts). One text at a time; every result is [G], NaN where a
quantity does not apply (groups with no token on a side, DKD/KL away from one-to-one groups).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from kdviz.maths.logspace import kl, kl_terms, logsumexp_rows, tkd_dkd

MERGES = ("bayesian", "observed")


@dataclass
class GroupStats:
    """Per-group results of `group_stats`; every tensor is [G] float32."""

    unc: Tensor  # 1 - p_g, the teacher's uncertainty of the group's text
    tkd: Tensor  # binary KL of [p_g, 1 - p_g] against the student's [q_g, 1 - q_g]
    t_logp: Tensor  # log p_g
    s_logp: Tensor  # log q_g
    kl_matched: Tensor  # KL over the matched vocabulary (renormalised), one-to-one groups
    dkd_matched: Tensor  # DKD over the matched vocabulary, one-to-one groups whose target is matched
    t_unmatched: Tensor  # teacher mass outside the matched vocabulary, one-to-one groups
    s_unmatched: Tensor  # student mass outside the matched vocabulary, one-to-one groups
    uld: Tensor  # sorted-probability L1 of the merged distributions

    def as_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def log1mexp(log_p: Tensor) -> Tensor:
    """log(1 - p) from log p, accurate for p near 0 and near 1 (Maechler 2012); -inf at p = 1.

    Each branch sees only the inputs it answers for (the other's are replaced by -1): the branch torch.where does not
    pick still gets a gradient of zero times its own, which is NaN where that branch is infinite.
    """
    near_one = log_p > -0.6931471805599453
    return torch.where(near_one, torch.log(-torch.expm1(torch.where(near_one, log_p, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near_one, -1.0, log_p))))


def binary_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL([p, 1 - p] || [q, 1 - q]) from log p and log q (any shape)."""
    return kl_terms(log_p, log_q) + kl_terms(log1mexp(log_p), log1mexp(log_q))


def token_log_probs(log_probs: Tensor, ids: Tensor) -> Tensor:
    """log p of each token under the row that predicted it: [T, V], [T] -> [T].

    Where p > 1/2 it is log(1 - the other tokens' mass): a confident row's own entry carries an absolute rounding
    error (about 1e-6 in fp32) that would swamp u = 1 - p, while the other entries' sum keeps its relative precision
    (as `kdviz.decompose` takes u).
    """
    direct = log_probs.gather(1, ids[:, None]).squeeze(1)  # (T,)
    others = logsumexp_rows(log_probs.scatter(1, ids[:, None], float("-inf")))  # (T,) log(1 - p)
    confident = direct > -0.6931471805599453  # the branch not taken sees -1, so its gradient stays finite (log1mexp)
    return torch.where(confident, torch.log1p(-torch.where(confident, others, -1.0).exp()), direct)


def group_log_probs(token_logp: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """log of each group's probability, the sum of its tokens' log-probs: [T] -> [G] (NaN for an empty group)."""
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.long, device=token_logp.device)
    owner = torch.repeat_interleave(torch.arange(len(groups), device=token_logp.device), sizes)  # (T_grouped,)
    positions = torch.tensor([i for g in groups for i in g], dtype=torch.long, device=token_logp.device)
    out = torch.zeros(len(groups), dtype=token_logp.dtype, device=token_logp.device)
    out.index_add_(0, owner, token_logp[positions])
    return out.masked_fill(sizes == 0, float("nan"))


def merged_log_probs(log_probs: Tensor, token_logp: Tensor, groups: Sequence[Sequence[int]], *,
                     merge: str = "bayesian") -> Tensor:
    """Each group's distribution as TRL GOLD merges it: [T, V] -> [G, V] log-probs (unnormalised).

    "bayesian": the row of the group's last token times the probabilities of its earlier tokens (the chain rule);
    "observed": the row of its first token times the probabilities of its later tokens. Its mass is p(prefix of
    the group). A group with no token is all -inf.
    """
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}.")
    base = torch.tensor([(g[-1] if merge == "bayesian" else g[0]) if g else 0 for g in groups], dtype=torch.long,
                        device=log_probs.device)
    factor = group_log_probs(token_logp, groups) - token_logp[base]  # log prob of the other tokens
    empty = torch.tensor([not g for g in groups], device=log_probs.device)
    return (log_probs[base] + factor[:, None]).masked_fill(empty[:, None], float("-inf"))


def sorted_l1(log_p: Tensor, log_q: Tensor) -> Tensor:
    """ULD's distance per row: L1 between the probabilities sorted high to low, the shorter one zero-padded.

    [G, V_p], [G, V_q] -> [G].
    """
    p = log_p.exp().sort(dim=-1, descending=True).values
    q = log_q.exp().sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


class MatchedStats(NamedTuple):
    """KL and DKD over the matched vocabulary and the mass each side has outside it, per row [R]."""

    kl: Tensor
    dkd: Tensor  # NaN where the target pair is not matched
    t_unmatched: Tensor
    s_unmatched: Tensor


def matched_stats(t_log_probs: Tensor, s_log_probs: Tensor, t_targets: Tensor, s_targets: Tensor,
                  student_of_teacher: Tensor) -> MatchedStats:
    """Both distributions restricted to the matched vocabulary and renormalised: [R, V_t], [R, V_s] -> [R].

    `student_of_teacher` [V_t] is the student id of each teacher id (-1 where none, `VocabularyMatch`).
    """
    t_matched = (student_of_teacher >= 0).nonzero().squeeze(1)  # (M,)
    if not len(t_matched):  # nothing to compare: all the mass is unmatched
        nan = torch.full(t_targets.shape, float("nan"), dtype=t_log_probs.dtype, device=t_log_probs.device)
        return MatchedStats(nan, nan.clone(), torch.ones_like(nan), torch.ones_like(nan))
    s_matched = student_of_teacher[t_matched]  # (M,)
    log_p, log_q = t_log_probs[:, t_matched], s_log_probs[:, s_matched]  # (R, M)
    t_mass, s_mass = torch.logsumexp(log_p, -1), torch.logsumexp(log_q, -1)  # (R,) log of the matched mass
    log_p, log_q = log_p - t_mass[:, None], log_q - s_mass[:, None]
    local = torch.full((len(student_of_teacher),), -1, dtype=torch.long, device=t_matched.device)
    local[t_matched] = torch.arange(len(t_matched), device=t_matched.device)  # teacher id -> column of log_p
    y = local[t_targets]  # (R,)
    target_matched = (y >= 0) & (student_of_teacher[t_targets] == s_targets)
    _, dkd = tkd_dkd(log_p, log_q, y.clamp_min(0))
    return MatchedStats(kl(log_p, log_q), dkd.masked_fill(~target_matched, float("nan")), -torch.expm1(t_mass),
                        -torch.expm1(s_mass))


def group_stats(teacher_log_probs: Tensor, teacher_ids: Tensor, student_log_probs: Tensor, student_ids: Tensor,
                groups: Sequence[tuple[Sequence[int], Sequence[int]]], student_of_teacher: Tensor, *,
                merge: str = "bayesian") -> GroupStats:
    """Per-group u, TKD, matched-vocabulary KL/DKD and ULD of one text (see the module doc).

    teacher_log_probs [T_t, V_t] and student_log_probs [T_s, V_s] are log-softmax rows aligned with
    teacher_ids [T_t] and student_ids [T_s]; `groups` holds (teacher positions, student positions)
    per group (`kdviz.align.Alignment.groups` will do); `merge` is ULD's (TRL's "bayesian" uses rows
    aligned with tokens, as here).
    """
    t_groups, s_groups = [list(g[0]) for g in groups], [list(g[1]) for g in groups]
    t_token, s_token = token_log_probs(teacher_log_probs, teacher_ids), token_log_probs(student_log_probs, student_ids)
    t_logp, s_logp = group_log_probs(t_token, t_groups), group_log_probs(s_token, s_groups)
    nan = torch.full_like(t_logp, float("nan"))
    one_to_one = [i for i, (t, s) in enumerate(zip(t_groups, s_groups)) if len(t) == len(s) == 1]
    matched = [nan.clone() for _ in MatchedStats._fields]
    if one_to_one:
        t_rows = torch.tensor([t_groups[i][0] for i in one_to_one], dtype=torch.long, device=t_logp.device)
        s_rows = torch.tensor([s_groups[i][0] for i in one_to_one], dtype=torch.long, device=t_logp.device)
        found = matched_stats(teacher_log_probs[t_rows], student_log_probs[s_rows], teacher_ids[t_rows],
                              student_ids[s_rows], student_of_teacher)
        for out, values in zip(matched, found):
            out[one_to_one] = values
    uld = sorted_l1(merged_log_probs(teacher_log_probs, t_token, t_groups, merge=merge),
                    merged_log_probs(student_log_probs, s_token, s_groups, merge=merge))
    paired = torch.tensor([bool(t) and bool(s) for t, s in zip(t_groups, s_groups)], device=t_logp.device)
    return GroupStats(unc=-torch.expm1(t_logp), tkd=binary_kl(t_logp, s_logp), t_logp=t_logp, s_logp=s_logp,
                      kl_matched=matched[0], dkd_matched=matched[1], t_unmatched=matched[2], s_unmatched=matched[3],
                      uld=uld.masked_fill(~paired, float("nan")))
