"""Log-space building blocks of the KD objectives: KL terms, mixtures, log-sum-exp, TKD/DKD.

Every function takes fp32 log-probabilities [R, V]; an entry of probability 0 (a -inf log-prob)
contributes exactly 0, with finite gradients, so masked vocabulary entries are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


def kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a * (log a - log b) elementwise: 0 where a = 0 (a -inf log-prob), with finite gradients there."""
    present = log_a > NEG_INF
    return log_a.exp() * torch.where(present, log_a - log_b, 0.0)


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probabilities [R, V] (entries of probability 0 are exact)."""
    return kl_terms(log_a, log_b).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b); -inf where both are 0, with finite gradients there."""
    both = (log_a == NEG_INF) & (log_b == NEG_INF)
    mixed = torch.logaddexp(torch.where(both, 0.0, log_a + math.log(weight_a)),
                            torch.where(both, 0.0, log_b + math.log1p(-weight_a)))
    return mixed.masked_fill(both, NEG_INF)


def logsumexp_rows(x: Tensor) -> Tensor:
    """logsumexp over the last dim; -inf for a row of all -inf, with finite gradients there."""
    empty = (x == NEG_INF).all(-1, keepdim=True)
    return torch.logsumexp(x.masked_fill(empty, 0.0), -1).masked_fill(empty.squeeze(-1), NEG_INF)


def log_probs(rows: Tensor, temperature: float, who: str) -> Tensor:
    """log_softmax(rows / temperature) in fp32 [R, V]; ValueError for NaN, +inf or a row of all -inf."""
    x = rows.float() / temperature
    lse = torch.logsumexp(x, -1, keepdim=True)  # (R, 1); NaN or +inf if any entry is, -inf if all are -inf
    if not bool(torch.isfinite(lse).all()):
        raise ValueError(
            f"{who} logits contain NaN or +inf (or a row of all -inf) at {int((~torch.isfinite(lse)).sum())} "
            f"of {len(lse)} rows{'' if temperature == 1 else f' after dividing by temperature={temperature}'}; "
            "-inf for a masked token is fine, NaN and +inf are not. Check the model's forward pass (fp16 overflow "
            "is a common cause: try bf16 or fp32)."
        )
    return x - lse


def tkd_dkd(log_p: Tensor, log_q: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(TKD, DKD) per row of KL(p || q) = TKD + (1 - p_y) * DKD, from log-probabilities [R, V].

    Everything stays in log space and entries of probability 0 (-inf) contribute exactly 0,
    with finite gradients; a row whose non-target entries are all 0 has DKD = 0.
    """
    target = F.one_hot(y, log_p.shape[-1]).bool()  # (R, V)
    log_py, log_qy = log_p.gather(1, y[:, None]).squeeze(1), log_q.gather(1, y[:, None]).squeeze(1)
    log_not_p = logsumexp_rows(log_p.masked_fill(target, NEG_INF))  # log(1 - p_y)
    log_not_q = logsumexp_rows(log_q.masked_fill(target, NEG_INF))
    tkd = kl_terms(log_py, log_qy) + kl_terms(log_not_p, log_not_q)
    log_p_rest = log_p.masked_fill(target, NEG_INF) - log_not_p.masked_fill(log_not_p == NEG_INF, 0.0)[:, None]
    log_q_rest = log_q - log_not_q.masked_fill(log_not_q == NEG_INF, 0.0)[:, None]  # log p^, q^ off the target
    return tkd, kl(log_p_rest, log_q_rest)

