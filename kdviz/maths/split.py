"""ATKD's hard/easy split of tokens by teacher uncertainty, and the per-token weights it gives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdviz.maths.logspace import log_probs


def teacher_uncertainty(teacher_rows: Tensor, y: Tensor, temperature: float, chunk: int) -> Tensor:
    """u = 1 - p_y per row [R] (no grad), streamed over `chunk` rows at a time."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(y), chunk):
            log_p = log_probs(teacher_rows[start : start + chunk], temperature, "teacher")  # (C, V)
            parts.append(-torch.expm1(log_p.gather(1, y[start : start + chunk, None]).squeeze(1)))
    return torch.cat(parts)


@dataclass(frozen=True)
class TokenSplit:
    """ATKD's hard/easy split decided over a set of tokens: hard = u >= threshold; group sizes n_hard, n_easy.

    `TokenSplit.over(u, k)` is the official split of the tokens u. Made over a whole batch
    (every micro-batch and process) and passed to `KDLoss.linear`/`parts` for each part, it
    gives every part the batch's threshold and group sizes.

    >>> split = TokenSplit.over(torch.tensor([0.1, 0.9, 0.5, 0.7]), 0.5)
    >>> split.hard(torch.tensor([0.6, 0.2])).tolist(), split.n_hard, split.n_easy
    ([True, False], 2, 2)
    """

    threshold: float
    n_hard: int
    n_easy: int

    @classmethod
    def over(cls, unc: Tensor, k: float) -> "TokenSplit":
        threshold = float(torch.quantile(unc.double(), 1 - k).to(unc.dtype))  # linear interpolation, as official
        n_hard = int((unc >= threshold).sum())
        return cls(threshold, n_hard, len(unc) - n_hard)

    def hard(self, unc: Tensor) -> Tensor:
        return unc >= self.threshold


def hard_mask(unc: Tensor, k: float) -> Tensor:
    """The official ATKD split: hard = u >= torch.quantile(u, 1 - k) over the given tokens."""
    return TokenSplit.over(unc, k).hard(unc)


def atkd_weights(unc: Tensor, params, *, split: TokenSplit | None = None) -> Tensor:
    """[N, 2] weights (on TKD, on DKD) per valid token, as the official ATKD code splits a batch.

    With `split`, its threshold and group sizes are used instead of those of these tokens.
    """
    split = split or TokenSplit.over(unc, params["k"])
    hard = split.hard(unc)
    n_hard, n_easy = split.n_hard, split.n_easy
    lam = params["lam"]
    w_hard = (1 - lam) / n_hard if n_hard else 0.0
    w_easy = lam / n_easy if n_easy else 0.0
    on_tkd = torch.where(hard, w_hard, 0.0)
    on_dkd = torch.where(hard, w_hard, w_easy)
    return torch.stack([on_tkd, on_dkd], dim=1)


