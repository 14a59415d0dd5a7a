"""KD objectives: one per-token function each, a registry, and a chunked (fused) path.

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

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from kdviz.decompose import MAX_TEMPERATURE, MIN_TEMPERATURE, check_count

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MB of fp32)


NEG_INF = float("-inf")


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a * (log a - log b) elementwise: 0 where a = 0 (a -inf log-prob), with finite gradients there."""
    present = log_a > NEG_INF
    return log_a.exp() * torch.where(present, log_a - log_b, 0.0)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probabilities [R, V] (entries of probability 0 are exact)."""
    return _kl_terms(log_a, log_b).sum(-1)


def _mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b); -inf where both are 0, with finite gradients there."""
    both = (log_a == NEG_INF) & (log_b == NEG_INF)
    mixed = torch.logaddexp(torch.where(both, 0.0, log_a + math.log(weight_a)),
                            torch.where(both, 0.0, log_b + math.log1p(-weight_a)))
    return mixed.masked_fill(both, NEG_INF)


def _logsumexp(x: Tensor) -> Tensor:
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
    log_not_p = _logsumexp(log_p.masked_fill(target, NEG_INF))  # log(1 - p_y)
    log_not_q = _logsumexp(log_q.masked_fill(target, NEG_INF))
    tkd = _kl_terms(log_py, log_qy) + _kl_terms(log_not_p, log_not_q)
    log_p_rest = log_p.masked_fill(target, NEG_INF) - log_not_p.masked_fill(log_not_p == NEG_INF, 0.0)[:, None]
    log_q_rest = log_q - log_not_q.masked_fill(log_not_q == NEG_INF, 0.0)[:, None]  # log p^, q^ off the target
    return tkd, _kl(log_p_rest, log_q_rest)


def fkl(log_q, log_p, y, rows, params):
    return _kl(log_p, log_q)


def rkl(log_q, log_p, y, rows, params):
    return _kl(log_q, log_p)


def jsd(log_q, log_p, y, rows, params):
    """Generalized JSD as in TRL's GKDTrainer: beta 0 = forward KL, beta 1 = reverse KL."""
    beta = params["beta"]
    if beta == 0:
        return _kl(log_p, log_q)
    if beta == 1:
        return _kl(log_q, log_p)
    log_m = _mixture(log_p, log_q, beta)  # beta * p + (1 - beta) * q
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def tvd(log_q, log_p, y, rows, params):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skl(log_q, log_p, y, rows, params):
    """Skew forward KL (DistiLLM): KL(p || alpha p + (1 - alpha) q)."""
    return _kl(log_p, _mixture(log_p, log_q, params["alpha"]))


def srkl(log_q, log_p, y, rows, params):
    """Skew reverse KL (DistiLLM): KL(q || alpha q + (1 - alpha) p)."""
    return _kl(log_q, _mixture(log_q, log_p, params["alpha"]))


def dkd(log_q, log_p, y, rows, params):
    """Decoupled KD (Zhao et al.): (alpha * TKD + beta * DKD) * temperature^2."""
    tkd, diversity = tkd_dkd(log_p, log_q, y)
    return (params["alpha"] * tkd + params["beta"] * diversity) * params["temperature"] ** 2


def atkd(log_q, log_p, y, rows, params):
    """ATKD token contribution: easy -> lam/n_easy * DKD, hard -> (1-lam)/n_hard * (TKD + DKD).

    `rows` carries the per-row weights from `atkd_weights`; with base="rkl" the KL arguments
    are swapped in both terms (the split stays on the teacher's uncertainty).
    """
    tkd, diversity = tkd_dkd(log_q, log_p, y) if params["base"] == "rkl" else tkd_dkd(log_p, log_q, y)
    return rows[:, 0] * tkd + rows[:, 1] * diversity


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


@dataclass(frozen=True)
class Objective:
    token_loss: Callable  # (log_q, log_p, y, rows, params) -> [R]
    defaults: dict
    doc: str
    checks: dict = field(default_factory=dict)  # param -> (predicate, allowed text)
    self_normalised: bool = False  # token losses already carry 1/group-size weights


def _number(predicate: Callable[[float], bool], allowed: str) -> tuple[Callable[[object], bool], str]:
    """A parameter check: a real number (not a string or bool) for which `predicate` holds."""
    def check(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and predicate(value)
    return check, allowed


_UNIT = _number(lambda v: 0 <= v <= 1, "a number in [0, 1]")
_OPEN_UNIT = _number(lambda v: 0 < v < 1, "a number in (0, 1)")
_TEMPERATURE = _number(lambda v: MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
                    f"a number in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
_NON_NEGATIVE = _number(lambda v: v >= 0, "a number >= 0")

OBJECTIVES: dict[str, Objective] = {
    "fkl": Objective(fkl, {"temperature": 1.0}, "forward KL(p || q)", {"temperature": _TEMPERATURE}),
    "rkl": Objective(rkl, {"temperature": 1.0}, "reverse KL(q || p) (MiniLLM)", {"temperature": _TEMPERATURE}),
    "jsd": Objective(jsd, {"beta": 0.5, "temperature": 1.0}, "generalized JSD (GKD; beta 0 = fkl, 1 = rkl)",
                     {"beta": _UNIT, "temperature": _TEMPERATURE}),
    "tvd": Objective(tvd, {"temperature": 1.0}, "total variation distance", {"temperature": _TEMPERATURE}),
    "skl": Objective(skl, {"alpha": 0.1, "temperature": 1.0}, "skew forward KL (DistiLLM)",
                     {"alpha": _OPEN_UNIT, "temperature": _TEMPERATURE}),
    "srkl": Objective(srkl, {"alpha": 0.1, "temperature": 1.0}, "skew reverse KL (DistiLLM)",
                      {"alpha": _OPEN_UNIT, "temperature": _TEMPERATURE}),
    "dkd": Objective(dkd, {"alpha": 1.0, "beta": 8.0, "temperature": 1.0}, "decoupled KD (alpha*TKD + beta*DKD)",
                     {"alpha": _NON_NEGATIVE, "beta": _NON_NEGATIVE, "temperature": _TEMPERATURE}),
    "atkd": Objective(atkd, {"lam": 0.2, "k": 0.5, "base": "fkl", "temperature": 1.0},
                      "ATKD: lam*mean_easy(DKD) + (1-lam)*mean_hard(TKD+DKD)",
                      {"lam": _UNIT, "k": _number(lambda v: 0 < v <= 1, "a number in (0, 1]"),
                       "base": (lambda v: v in ("fkl", "rkl"), "'fkl' or 'rkl'"), "temperature": _TEMPERATURE},
                      self_normalised=True),
}
REDUCTIONS = ("mean", "sum", "none")


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

    def uncertainty(self) -> Tensor:
        """u = 1 - p_y [N], exact."""
        return -torch.expm1(self.target_logp.float())


def _tail_mask(log_p: Tensor, ids: Tensor, y: Tensor) -> Tensor:
    return torch.ones_like(log_p, dtype=torch.bool).scatter_(1, ids, False).scatter_(1, y[:, None], False)


def tail_log_prob(log_p: Tensor, ids: Tensor, y: Tensor) -> Tensor:
    """log of the probability outside the target and the top-k `ids`, from the full `log_p` [N, V]: [N].

    Summed in log space, so it stays exact where 1 - p_y - sum(top-k p) cancels to 0 or below in
    float32 (a confident teacher), which would make the tail's probability 0 and reverse KL infinite."""
    return _logsumexp(log_p.float().masked_fill(~_tail_mask(log_p, ids, y), NEG_INF))


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
    tail = _tail_mask(log_q, ids, y)
    log_q_tail = _logsumexp(log_q.masked_fill(~tail, NEG_INF))  # -inf (with a finite gradient) when empty
    log_p_tail = teacher.tail_logp.float().masked_fill(~tail.any(1), NEG_INF)
    log_p_b = torch.cat([teacher.target_logp.float()[:, None], log_p_top, log_p_tail[:, None]], 1)
    log_q_b = torch.cat([log_q.gather(1, y[:, None]), log_q_top, log_q_tail[:, None]], 1)
    return log_p_b, log_q_b


def _chunk_token_loss(objective: Objective, params: dict, s_rows: Tensor, t_rows, y: Tensor, rows) -> Tensor:
    """Per-token losses of one chunk; `t_rows` is the teacher's logits [C, V] or cached `TopKRows`."""
    tau = params["temperature"]
    log_q = log_probs(s_rows, tau, "student")
    if isinstance(t_rows, TopKRows):  # the cache holds the teacher at this temperature already
        log_p, log_q = bucketed(log_q, t_rows, y)
        return objective.token_loss(log_q, log_p, torch.zeros_like(y), rows, params)  # the target is bucket 0
    return objective.token_loss(log_q, log_probs(t_rows, tau, "teacher"), y, rows, params)


def check_finite(per_token: Tensor, objective: Objective) -> Tensor:
    """`per_token` unchanged if every value is finite; otherwise ValueError (its gradient would be NaN).

    With NaN and +inf logits refused by `log_probs`, an infinite value means a KL term whose
    second distribution gives probability 0 (a -inf logit) where the first gives some: truly
    infinite, and no step can be taken on it. One host sync per loss call.
    """
    bad = ~torch.isfinite(per_token)
    if bool(bad.any()):
        raise ValueError(
            f"The {objective.doc} loss is infinite at {int(bad.sum())} of {len(per_token)} target tokens: one model "
            "gives probability 0 (a -inf logit) to vocabulary entries the other gives probability to (for forward "
            "KL the student, for reverse KL the teacher), and its gradient would be NaN. Mask the same entries in "
            "both models' logits, or use a loss that stays finite there (tvd, jsd with 0 < beta < 1, skl, srkl)."
        )
    return per_token


class _ChunkedLoss(torch.autograd.Function):
    """Per-token losses [N] of rows `index` of the flat logits; gradients made in the forward.

    Each chunk of rows is gathered, differentiated and dropped, so nothing [B*T, V] is built
    but the gradient itself. Every token loss depends only on its own student row (ATKD's
    split weights are constants from the teacher), so backward scales row t of the stored
    gradient by d(out)/d(token_t).
    """

    @staticmethod
    def forward(ctx, student, teacher, index, y, rows, objective, params, chunk):
        grad = torch.zeros_like(student)  # (B*T, V), zero on ignored rows
        per_token = torch.empty(len(y), dtype=torch.float32, device=student.device)
        for start in range(0, len(y), chunk):
            span = slice(start, start + chunk)
            s_chunk = student.index_select(0, index[span]).detach().requires_grad_(True)
            with torch.enable_grad():
                tokens = _chunk_token_loss(objective, params, s_chunk, teacher.index_select(0, index[span]), y[span],
                                           None if rows is None else rows[span])
                (chunk_grad,) = torch.autograd.grad(tokens.sum(), s_chunk)
            grad.index_copy_(0, index[span], chunk_grad)
            per_token[span] = tokens.detach()
        check_finite(per_token, objective)
        ctx.save_for_backward(grad, index)
        ctx.used = False
        return per_token

    @staticmethod
    def backward(ctx, grad_per_token):
        if ctx.used:
            raise RuntimeError("A fused kdviz loss can be backpropagated once (its gradient buffer is scaled in "
                               "place); compute the loss again, or use fused=False for a second backward.")
        ctx.used = True
        grad, index = ctx.saved_tensors
        scale = torch.zeros(len(grad), dtype=grad.dtype, device=grad.device)
        scale[index] = grad_per_token.to(grad.dtype)
        return grad.mul_(scale[:, None]), None, None, None, None, None, None, None  # in place: no second [B*T, V]


class _ChunkedLinearLoss(torch.autograd.Function):
    """Scalar KD (+ weighted CE) loss from hidden states and LM-head weights, chunk by chunk.

    Logits exist for one chunk of rows at a time (C x V); the gradients w.r.t. the hidden rows
    [N, H], the head weight [V, H] and bias are accumulated in the forward. Returns the scalar
    and, not differentiable, each row's KD contribution, CE and teacher uncertainty.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, y, rows, kd_weights, ce_weights, known_unc, objective, params,
                chunk):
        n = len(y)
        needs = ctx.needs_input_grad[:3]
        grads = [torch.zeros_like(t, dtype=torch.float32) if t is not None and need else None
                 for t, need in zip((hidden, weight, bias), needs)]
        kd_tokens, ce_tokens = (torch.empty(n, device=hidden.device) for _ in range(2))
        unc = torch.empty(n, device=hidden.device) if known_unc is None else known_unc.clone()
        total = torch.zeros((), device=hidden.device)
        for start in range(0, n, chunk):
            span = slice(start, start + chunk)
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip((hidden[span], weight, bias), needs)]
            t_logits = teacher[span]  # (C, V), no grad
            with torch.enable_grad():
                logits = F.linear(*leaves)  # (C, V)
                kd = _chunk_token_loss(objective, params, logits, t_logits, y[span],
                                       None if rows is None else rows[span])
                ce = F.cross_entropy(logits.float(), y[span], reduction="none")
                chunk_total = (kd * kd_weights[span]).sum() + (ce * ce_weights[span]).sum()
                wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
                chunk_grads = iter(torch.autograd.grad(chunk_total, wanted)) if wanted else iter(())
            for i, leaf in enumerate(leaves):
                if grads[i] is None:
                    continue
                if i == 0:
                    grads[0][span] = next(chunk_grads)
                else:
                    grads[i] += next(chunk_grads)
            total += chunk_total.detach()
            kd_tokens[span], ce_tokens[span] = kd.detach(), ce.detach()
            if known_unc is None:  # ATKD computed it already for its split
                unc[span] = teacher_uncertainty(t_logits, y[span], params["temperature"], len(t_logits))
        check_finite(kd_tokens, objective)
        ctx.grads = grads
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        ctx.mark_non_differentiable(kd_tokens, ce_tokens, unc)
        return total, kd_tokens, ce_tokens, unc

    @staticmethod
    def backward(ctx, grad_total, *unused):
        out = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None, None, None, None)


class _LinearRows:
    """Rows of `hidden @ weight.T + bias`, computed only when sliced (the teacher side, no grad)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        self.hidden, self.weight, self.bias, self.device = hidden.detach(), weight.detach(), bias, hidden.device

    def __getitem__(self, span: slice) -> Tensor:
        with torch.no_grad():
            return F.linear(self.hidden[span], self.weight, None if self.bias is None else self.bias.detach())


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
            rows = atkd_weights(teacher_unc, self.params, split=split)
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
            rows, weights, unc = self._rows_and_weights(_RowView(teacher, index), y, chunk, **options)
            tokens = _ChunkedLoss.apply(student, teacher, index, y, rows, self.objective, self.params, chunk)
        else:
            student, teacher = student[index], teacher[index]
            rows, weights, unc = self._rows_and_weights(teacher, y, len(y), **options)
            tokens = check_finite(_chunk_token_loss(self.objective, self.params, student, teacher, y, rows),
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
        return self._linear(student_hidden, student_head, _LinearRows(t_hidden, teacher_head, teacher_bias), labels,
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
        total, kd_tokens, ce_tokens, unc = _ChunkedLinearLoss.apply(
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
            rows = _RowView(teacher.detach().reshape(-1, vocab), index)
        else:
            rows = _LinearRows(teacher.detach().reshape(-1, teacher.shape[-1]).index_select(0, index), teacher_head,
                               teacher_bias)
        return teacher_uncertainty(rows, y, self.params["temperature"], self._chunk(vocab))


def gathered(tensor: Tensor | None) -> Tensor | None:
    """A tensor sharded by FSDP2 (a DTensor) gathered whole, its gradient averaged over the ranks; others as they are."""
    if tensor is None or not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


class _RowView:
    """Rows `index` of a [N, V] tensor, gathered only when sliced (for streaming passes)."""

    def __init__(self, tensor: Tensor, index: Tensor):
        self.tensor, self.index, self.device = tensor, index, tensor.device

    def __getitem__(self, span: slice) -> Tensor:
        return self.tensor.index_select(0, self.index[span])


def _plain_number(value):
    """numpy scalars as the Python numbers they are (np.float32(0.2) -> 0.2); anything else unchanged."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, (int, float)):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def get_loss(name: str, *, reduction: str = "mean", fused: bool = True, ignore_index: int = -100,
             chunk_rows: int | None = None, **params) -> KDLoss:
    """The objective `name` with its parameters; see `OBJECTIVES` for names and defaults.

    reduction: "mean" over valid tokens ("atkd" always uses its own group means), "sum", or
    "none" for per-token contributions [B, T] (0 at ignored positions).
    """
    if not isinstance(name, str) or name not in OBJECTIVES:
        listed = ", ".join(f"{n} ({o.doc})" for n, o in OBJECTIVES.items())
        raise ValueError(f"Unknown loss {name!r}. Available: {listed}.")
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
