"""The fused (chunked) losses: value and gradient one chunk of rows at a time.

`ChunkedLoss` works on full logits [N, V] but differentiates one chunk of rows at a time, so
its extra memory is the gradient buffer plus O(chunk x V). `ChunkedLinearLoss` takes hidden
states and LM-head weights and never builds more than one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdviz.maths.logspace import log_probs
from kdviz.maths.objectives import Objective
from kdviz.maths.split import teacher_uncertainty
from kdviz.maths.topk import TopKRows, bucketed

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MB of fp32)


def chunk_token_loss(objective: Objective, params: dict, s_rows: Tensor, t_rows, y: Tensor, rows) -> Tensor:
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


class ChunkedLoss(torch.autograd.Function):
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
                tokens = chunk_token_loss(objective, params, s_chunk, teacher.index_select(0, index[span]), y[span],
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


class ChunkedLinearLoss(torch.autograd.Function):
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
                kd = chunk_token_loss(objective, params, logits, t_logits, y[span],
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


class LinearRows:
    """Rows of `hidden @ weight.T + bias`, computed only when sliced (the teacher side, no grad)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        self.hidden, self.weight, self.bias, self.device = hidden.detach(), weight.detach(), bias, hidden.device

    def __getitem__(self, span: slice) -> Tensor:
        with torch.no_grad():
            return F.linear(self.hidden[span], self.weight, None if self.bias is None else self.bias.detach())



class RowView:
    """Rows `index` of a [N, V] tensor, gathered only when sliced (for streaming passes)."""

    def __init__(self, tensor: Tensor, index: Tensor):
        self.tensor, self.index, self.device = tensor, index, tensor.device

    def __getitem__(self, span: slice) -> Tensor:
        return self.tensor.index_select(0, self.index[span])


