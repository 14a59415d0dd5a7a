"""A teacher given by its top-k: ids and log-probs, the target's and the tail's log-probability.

What is exact: u = 1 - p_y and TKD at any k. DKD and KL see the teacher's top-k entries and one
tail bucket holding the rest of the non-target mass, on both sides (`bucketed`); by the log-sum
inequality the bucketed KL is a lower bound of the true one, equal to it when k covers the
vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kdviz.maths.logspace import NEG_INF, logsumexp_rows


class TopKRows(NamedTuple):
    """A teacher read from a top-k cache, one row per target token: top-k ids and log-probs [N, k],
    log p_y [N] and log p_tail [N], the log-probability of everything that is neither the target nor
    in the top-k (-inf when nothing is left)."""

    ids: Tensor
    logprobs: Tensor
    target_logp: Tensor
    tail_logp: Tensor

    @classmethod
    def from_log_probs(cls, log_p: Tensor, y: Tensor, k: int) -> "TopKRows":
        """The rows a cache of top-`k` holds for the teacher log-probabilities `log_p` [N, V] and targets `y` [N]."""
        top = log_p.topk(k, dim=1)
        return cls(top.indices, top.values, log_p.gather(1, y[:, None])[:, 0], tail_log_prob(log_p, top.indices, y))

    def __getitem__(self, span):
        if isinstance(span, slice):
            return TopKRows(*(t[span] for t in self))
        return tuple.__getitem__(self, span)

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def to(self, device) -> "TopKRows":
        return TopKRows(*(t.to(device) for t in self))

    def uncertainty(self) -> Tensor:
        """u = 1 - p_y [N], exact."""
        return -torch.expm1(self.target_logp.float())


def tail_mask(log_p: Tensor, ids: Tensor, y: Tensor) -> Tensor:
    return torch.ones_like(log_p, dtype=torch.bool).scatter_(1, ids, False).scatter_(1, y[:, None], False)


def tail_log_prob(log_p: Tensor, ids: Tensor, y: Tensor) -> Tensor:
    """log of the probability outside the target and the top-k `ids`, from the full `log_p` [N, V]: [N].

    Summed in log space, so it stays exact where 1 - p_y - sum(top-k p) cancels to 0 or below in
    float32 (a confident teacher), which would make the tail's probability 0 and reverse KL infinite."""
    return logsumexp_rows(log_p.float().masked_fill(~tail_mask(log_p, ids, y), NEG_INF))


def bucketed(log_q: Tensor, teacher: TopKRows, y: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probabilities over [target, top-k ids, tail] per row: [R, k + 2] each.

    log_q [R, V]: the student's full log-probabilities (keeps its gradient); `teacher`: the cached
    rows; y [R]: the targets. A top-k entry equal to the target gets probability 0 on both sides
    (it is column 0 already). The tail is everything else: p_tail from the cache, q_tail =
    logsumexp of log q over the tail entries (its gradient spreads over them in proportion to q);
    -inf when the tail is empty. KL over these buckets is a lower bound of the full KL (log-sum
    inequality), equal to it when the top-k covers the vocabulary.
    """
    ids = teacher.ids
    is_target = ids == y[:, None]  # (R, k)
    log_p_top = teacher.logprobs.float().masked_fill(is_target, NEG_INF)
    log_q_top = log_q.gather(1, ids).masked_fill(is_target, NEG_INF)
    tail = tail_mask(log_q, ids, y)
    log_q_tail = logsumexp_rows(log_q.masked_fill(~tail, NEG_INF))  # -inf (with a finite gradient) when empty
    log_p_tail = teacher.tail_logp.float().masked_fill(~tail.any(1), NEG_INF)
    log_p_b = torch.cat([teacher.target_logp.float()[:, None], log_p_top, log_p_tail[:, None]], 1)
    log_q_b = torch.cat([log_q.gather(1, y[:, None]), log_q_top, log_q_tail[:, None]], 1)
    return log_p_b, log_q_b


