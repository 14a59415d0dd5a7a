"""KD losses: configure an objective (`get_loss`) and compute it on logits, hidden states or a teacher cache.

>>> import torch
>>> loss_fn = get_loss("atkd", lam=0.2, k=0.5)
>>> student, teacher = torch.randn(2, 5, 11, requires_grad=True), torch.randn(2, 5, 11)
>>> loss = loss_fn(student, teacher, torch.randint(11, (2, 5)))
>>> loss.backward()

Every objective works on fp32 log-probabilities [R, V] of the valid rows (label !=
ignore_index). The chunked path (`fused=True`, the default) computes value and gradient one
chunk of rows at a time inside a custom autograd function, so its extra memory is the
gradient buffer plus O(chunk x V), instead of several [B, T, V] intermediates.
`KDLoss.linear` goes further: it takes hidden states and LM-head weights and never builds the
full logits; `KDLoss.parts` and `KDLoss.linear` return `LossParts` (KD and CE parts, each
token's share, teacher uncertainty) for training logs.

One call may see only part of a batch (a micro-batch of gradient accumulation, one process's
share): `num_items=` (the batch's target count) and `split=` (a `TokenSplit` made over the
whole batch) make each part's loss its exact share of the whole batch's loss, so the parts
add up to the loss of the batch in one piece.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdviz.checks import check_count
from kdviz.distributed import gathered
from kdviz.maths.chunked import (DEFAULT_CHUNK_ELEMENTS, ChunkedLinearLoss, ChunkedLoss, LinearRows, RowView,
                                 check_finite, chunk_token_loss)
from kdviz.maths.logspace import tkd_dkd
from kdviz.maths.objectives import OBJECTIVES, REDUCTIONS, Objective
from kdviz.maths.modes import PRESETS, is_mode, parse_mode
from kdviz.maths.split import TokenSplit, hard_mask, teacher_uncertainty
from kdviz.maths.topk import TopKRows, bucketed, tail_log_prob

__all__ = ["OBJECTIVES", "KDLoss", "LossParts", "Objective", "TokenSplit", "TopKRows", "bucketed", "get_loss",
           "hard_mask", "tail_log_prob", "tkd_dkd"]


@dataclass
class LossParts:
    """One step's loss and what it is made of; every field but `loss` is detached.

    loss = kd + ce_weight * ce. `contributions` [N] is each valid token's share of `kd` (it sums
    to `kd`), `unc` [N] its teacher uncertainty, so `hard_easy(k)` splits the KD loss into the
    parts carried by hard and by easy tokens.
    """

    loss: Tensor
    kd: Tensor
    ce: Tensor
    contributions: Tensor
    unc: Tensor
    logs: dict[str, float] = field(default_factory=dict)  # more numbers to log (e.g. OKD's adapter loss)

    def hard_easy(self, k: float, *, split: TokenSplit | None = None) -> tuple[float, float]:
        """(hard part, easy part) of `kd`, hard = u >= quantile(u, 1 - k) as in ATKD (or `split`'s threshold)."""
        hard = (split or TokenSplit.over(self.unc, k)).hard(self.unc)
        return float(self.contributions[hard].sum()), float(self.contributions[~hard].sum())


@dataclass
class KDLoss:
    """A configured objective: `loss(student_logits, teacher_logits, labels) -> scalar`."""

    name: str
    params: dict
    reduction: str = "mean"
    ignore_index: int = -100
    fused: bool = True
    chunk_rows: int | None = None

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.name]

    @property
    def self_normalised(self) -> bool:
        """Whether the token losses carry their own 1/group-size weights (ATKD, teaching modes)."""
        return self.objective.self_normalised

    @property
    def ce_weight(self) -> float:
        """The cross-entropy weight the objective itself asks for (a teaching mode's `W*ce` term), else 0."""
        return parse_mode(self.params["spec"]).ce if self.name == "modes" else 0.0

    def _rows_and_weights(self, teacher: Tensor, y: Tensor, chunk: int, *, num_items: int | None = None,
                          split: TokenSplit | None = None,
                          teacher_unc: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """(ATKD row weights or None, per-token weights, teacher uncertainty if known or computed).

        Means divide by `num_items` (default: these tokens' count); ATKD uses `split` (default:
        the split of these tokens).
        """
        if self.objective.self_normalised:
            if teacher_unc is None:
                teacher_unc = teacher_uncertainty(teacher, y, self.params["temperature"], chunk)
            rows = self.objective.row_weights(teacher_unc, self.params, split=split)
            return rows, torch.ones(len(y), device=teacher.device), teacher_unc
        scale = 1.0 / max(1, num_items or len(y)) if self.reduction == "mean" else 1.0
        return None, torch.full((len(y),), scale, device=teacher.device), teacher_unc

    def _targets(self, labels: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
        """(valid mask [B, T], flat row index [N], target ids [N]) with the labels checked."""
        valid = labels != self.ignore_index
        index = valid.reshape(-1).nonzero().squeeze(1)  # (N,) rows that are targets
        y = labels.reshape(-1)[index]
        if len(y) == 0:
            raise ValueError("No valid target in the batch (every label is ignore_index); nothing to distil.")
        if ((y < 0) | (y >= vocab)).any():
            raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={self.ignore_index}.")
        return valid, index, y

    def _chunk(self, vocab: int) -> int:
        return self.chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // vocab)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        valid, weighted, _ = self._weighted_tokens(student_logits, teacher_logits, labels)
        if self.reduction == "none":
            return torch.zeros(labels.shape, dtype=weighted.dtype, device=weighted.device).masked_scatter(valid, weighted)
        return weighted.sum()

    def _weighted_tokens(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
                         num_items: int | None = None, split: TokenSplit | None = None,
                         teacher_unc: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(valid mask [B, T], each target's weighted loss [N], teacher uncertainty [N] or None)."""
        if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != labels.shape:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)}, teacher_logits {tuple(teacher_logits.shape)} and "
                f"labels {tuple(labels.shape)} must be [..., V], [..., V] and [...] with matching shapes."
            )
        vocab = student_logits.shape[-1]
        valid, index, y = self._targets(labels, vocab)
        student = student_logits.reshape(-1, vocab)  # (B*T, V) views, no copy
        teacher = teacher_logits.detach().reshape(-1, vocab)
        chunk = self._chunk(vocab)
        options = dict(num_items=num_items, split=split, teacher_unc=teacher_unc)
        if self.fused:
            rows, weights, unc = self._rows_and_weights(RowView(teacher, index), y, chunk, **options)
            tokens = ChunkedLoss.apply(student, teacher, index, y, rows, self.objective, self.params, chunk)
        else:
            student, teacher = student[index], teacher[index]
            rows, weights, unc = self._rows_and_weights(teacher, y, len(y), **options)
            tokens = check_finite(chunk_token_loss(self.objective, self.params, student, teacher, y, rows),
                                  self.objective)
        return valid, tokens * weights, unc

    def linear(self, student_hidden: Tensor, student_head: Tensor, teacher_hidden: Tensor, teacher_head: Tensor,
               labels: Tensor, *, ce_weight: float = 0.0, kd_weight: float = 1.0,
               student_bias: Tensor | None = None, teacher_bias: Tensor | None = None, num_items: int | None = None,
               split: TokenSplit | None = None, teacher_unc: Tensor | None = None) -> LossParts:
        """The loss from hidden states [B, T, H] and LM-head weights [V, H], never building [B, T, V].

        Student and teacher may have different hidden sizes; the heads must have the same V
        rows (slice them to the shared vocabulary first). loss = kd_weight * kd + ce_weight * ce,
        ce being the student's mean cross-entropy on the targets. Gradients flow to the student's
        hidden states, head weight and bias; the teacher side is constant.

        For part of a larger batch: means (of the KD loss and of the cross-entropy) divide by
        `num_items`, the larger batch's target count, and ATKD uses `split`, made over the larger
        batch (default for both: this call's tokens alone). `teacher_unc` [N]: the teacher
        uncertainty of the targets if already computed (`uncertainty`), saving a pass.
        A head sharded by FSDP2 (a DTensor) is gathered for the chunk loop, and its gradient is
        averaged over the ranks onto the shards, as FSDP does for every other parameter.
        """
        student_head, student_bias, teacher_head, teacher_bias = map(
            gathered, (student_head, student_bias, teacher_head, teacher_bias))
        vocab = student_head.shape[0]
        if teacher_head.shape[0] != vocab or student_hidden.shape[:-1] != labels.shape \
                or teacher_hidden.shape[:-1] != labels.shape:
            raise ValueError(
                f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)}, labels "
                f"{tuple(labels.shape)}, student_head {tuple(student_head.shape)} and teacher_head "
                f"{tuple(teacher_head.shape)} must be [..., H_s], [..., H_t], [...], [V, H_s] and [V, H_t]."
            )
        _, index, _ = self._targets(labels, vocab)
        t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, index)
        return self._linear(student_hidden, student_head, LinearRows(t_hidden, teacher_head, teacher_bias), labels,
                            ce_weight=ce_weight, kd_weight=kd_weight, student_bias=student_bias, num_items=num_items,
                            split=split, teacher_unc=teacher_unc)

    def linear_cached(self, student_hidden: Tensor, student_head: Tensor, teacher: TopKRows, labels: Tensor, *,
                      ce_weight: float = 0.0, kd_weight: float = 1.0, student_bias: Tensor | None = None,
                      num_items: int | None = None, split: TokenSplit | None = None) -> LossParts:
        """`linear` with the teacher read from a top-k cache: `teacher` holds one row per target of `labels`
        (row-major order). The objective is taken over the buckets [target, top-k, tail] (see `bucketed`):
        exact when k covers the vocabulary; TKD and the ATKD split (u = 1 - p_y) are exact at any k.
        The cache holds the teacher at one temperature, which must be this objective's."""
        student_head, student_bias = gathered(student_head), gathered(student_bias)
        if student_hidden.shape[:-1] != labels.shape:
            raise ValueError(f"student_hidden {tuple(student_hidden.shape)} must be [..., H] over labels "
                             f"{tuple(labels.shape)}.")
        return self._linear(student_hidden, student_head, teacher, labels, ce_weight=ce_weight, kd_weight=kd_weight,
                            student_bias=student_bias, num_items=num_items, split=split,
                            teacher_unc=teacher.uncertainty())

    def _linear(self, student_hidden: Tensor, student_head: Tensor, teacher, labels: Tensor, *, ce_weight: float,
                kd_weight: float, student_bias: Tensor | None, num_items: int | None, split: TokenSplit | None,
                teacher_unc: Tensor | None) -> LossParts:
        """The chunk loop shared by `linear` and `linear_cached`; `teacher` gives each chunk's rows when sliced."""
        if self.reduction == "none":
            raise ValueError("The linear path returns a scalar; use reduction 'mean' or 'sum' (or the logits path).")
        vocab = student_head.shape[0]
        _, index, y = self._targets(labels, vocab)
        if isinstance(teacher, TopKRows) and len(teacher.target_logp) != len(y):
            raise ValueError(f"The cached teacher has {len(teacher.target_logp)} rows for {len(y)} targets; the cache "
                             "and the batch do not match.")
        hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, index)  # (N, H_s)
        chunk = self._chunk(vocab)
        rows, weights, known_unc = self._rows_and_weights(teacher, y, chunk, num_items=num_items, split=split,
                                                          teacher_unc=teacher_unc)
        count = num_items or len(y)
        ce_weights = torch.full((len(y),), ce_weight / count, device=hidden.device)
        total, kd_tokens, ce_tokens, unc = ChunkedLinearLoss.apply(
            hidden, student_head, student_bias, teacher, y, rows, weights * kd_weight, ce_weights, known_unc,
            self.objective, self.params, chunk)
        contributions = kd_tokens * weights
        return LossParts(total, contributions.sum(), ce_tokens.sum() / count, contributions, unc)

    def parts(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, ce_weight: float = 0.0,
              num_items: int | None = None, split: TokenSplit | None = None,
              teacher_unc: Tensor | None = None) -> LossParts:
        """Like `linear`, from full logits [B, T, V] (for models whose head is not a plain linear)."""
        valid, contributions, unc = self._weighted_tokens(student_logits, teacher_logits, labels, num_items=num_items,
                                                          split=split, teacher_unc=teacher_unc)
        kd = contributions.sum()
        ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=self.ignore_index, reduction="sum") / (num_items or len(contributions))
        if unc is None:
            unc = self.uncertainty(teacher_logits, labels)
        return LossParts(kd + ce_weight * ce, kd.detach(), ce.detach(), contributions.detach(), unc)

    def uncertainty(self, teacher: Tensor, labels: Tensor, *, teacher_head: Tensor | None = None,
                    teacher_bias: Tensor | None = None) -> Tensor:
        """Teacher uncertainty u = 1 - p_y [N] of the targets, in the order `linear` and `parts` see them.

        `teacher`: logits [B, T, V], or hidden states [B, T, H] with `teacher_head` [V, H] (and
        `teacher_bias`), streamed a chunk of rows at a time.
        """
        teacher_head, teacher_bias = gathered(teacher_head), gathered(teacher_bias)
        vocab = teacher.shape[-1] if teacher_head is None else teacher_head.shape[0]
        _, index, y = self._targets(labels, vocab)
        if teacher_head is None:
            rows = RowView(teacher.detach().reshape(-1, vocab), index)
        else:
            rows = LinearRows(teacher.detach().reshape(-1, teacher.shape[-1]).index_select(0, index), teacher_head,
                               teacher_bias)
        return teacher_uncertainty(rows, y, self.params["temperature"], self._chunk(vocab))



def _plain_number(value):
    """numpy scalars as the Python numbers they are (np.float32(0.2) -> 0.2); anything else unchanged."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, (int, float)):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def get_loss(name: str, *, reduction: str = "mean", fused: bool = True, ignore_index: int = -100,
             chunk_rows: int | None = None, **params) -> KDLoss:
    """The objective `name` with its parameters; see `OBJECTIVES` for names and defaults.

    reduction: "mean" over valid tokens ("atkd" and teaching modes use their own group means), "sum",
    or "none" for per-token contributions [B, T] (0 at ignored positions). `name` may spell a
    teaching mode (`kdviz.maths.modes`: "0.2*easy:dkd + 0.8*hard:tkd+dkd", "kd-on-hard", ...).
    """
    if is_mode(name):
        name, params = "modes", {**params, "spec": parse_mode(name).spec}
    if not isinstance(name, str) or name not in OBJECTIVES:
        listed = ", ".join(f"{n} ({o.doc})" for n, o in OBJECTIVES.items() if n != "modes")
        raise ValueError(f"Unknown loss {name!r}. Available: {listed}; or a teaching mode such as '0.2*easy:dkd + "
                         f"0.8*hard:tkd+dkd' or one of {', '.join(PRESETS)}.")
    objective = OBJECTIVES[name]
    unknown = sorted(set(params) - set(objective.defaults))
    if unknown:
        raise ValueError(f"Loss {name!r} has no parameter(s) {unknown}; it takes {objective.defaults}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if chunk_rows is not None:
        check_count(chunk_rows, "chunk_rows", minimum=1)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an integer, got {ignore_index!r}.")
    if not isinstance(fused, bool):
        raise ValueError(f"fused must be True or False, got {fused!r}.")
    merged = {**objective.defaults, **{key: _plain_number(value) for key, value in params.items()}}
    for key, (ok, allowed) in objective.checks.items():
        if not ok(merged[key]):
            value = merged[key]
            raise ValueError(f"Loss {name!r}: {key}={value!r} is not allowed; use {allowed} "
                             f"(got a {type(value).__name__}).")
    return KDLoss(name, merged, reduction=reduction, fused=fused, ignore_index=ignore_index, chunk_rows=chunk_rows)
