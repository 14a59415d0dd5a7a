"""Per-token KD quantities: teacher uncertainty and the TKD/DKD decomposition of the KL.

Per position, with teacher logits z, student logits s, target y and temperature tau:

    p = softmax(z / tau), q = softmax(s / tau)
    u   = 1 - p_y                                  teacher uncertainty
    TKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y])     target-oriented part
    DKD = KL(p^ || q^),  p^_i = p_i / (1 - p_y)    diversity part (i != y)
    KL(p || q) = TKD + u * DKD                     exact

Everything is computed in log space from two log-sum-exps per model (one over the whole
vocabulary, one with column y removed), in fp32 whatever the input dtype, one chunk of rows
at a time, so the extra memory is O(chunk x V) and never several [B, T, V] copies.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from kdviz.checks import check_count, check_temperature
from kdviz.maths.topk import TopKRows, bucketed

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # rows per chunk = this / V (8 MB of fp32 per tensor)


@dataclass
class TokenStats:
    """Per-token results of `decompose`; every tensor is [B, T] (top-k ones [B, T, k]).

    Positions where `valid` is False (label == ignore_index) hold 0 (ranks -1, top-k ids -1).
    """

    unc: Tensor  # 1 - p_y, teacher uncertainty
    tkd: Tensor  # binary KL on the target
    dkd: Tensor  # KL between non-target distributions
    kl: Tensor  # KL(p || q) = tkd + unc * dkd
    rkl: Tensor  # KL(q || p)
    t_entropy: Tensor  # H(p)
    s_entropy: Tensor  # H(q)
    t_logp: Tensor  # log p_y
    s_logp: Tensor  # log q_y
    valid: Tensor  # bool, label != ignore_index
    t_rank: Tensor | None = None  # 1 = the model's top choice; int64
    s_rank: Tensor | None = None
    t_topk_ids: Tensor | None = None  # [B, T, k] int64
    t_topk_probs: Tensor | None = None  # [B, T, k]
    s_topk_ids: Tensor | None = None
    s_topk_probs: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        """The tensors that are present, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


SCALAR_FIELDS = ("unc", "tkd", "dkd", "kl", "rkl", "t_entropy", "s_entropy", "t_logp", "s_logp")


def _check_inputs(teacher_logits: Tensor, student_logits: Tensor, labels: Tensor):
    if teacher_logits.dim() != 3 or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and student_logits {tuple(student_logits.shape)} "
            "must both be [B, T, V] with the same shape. If the vocab sizes differ, load the pair with "
            "kdviz.load_pair, which aligns both to the shared tokenizer's vocabulary."
        )
    _check_labels(labels, teacher_logits.shape[:2])


def _check_labels(labels: Tensor, shape) -> None:
    if labels.shape != shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must be [B, T] = {tuple(shape)}; "
            "shift before calling (logits[:, :-1] predict labels[:, 1:])."
        )


def _check_targets(y: Tensor, vocab: int, ignore_index: int) -> None:
    if y.numel() and (y.min() < 0 or y.max() >= vocab):
        bad = y[(y < 0) | (y >= vocab)][0].item()
        raise ValueError(
            f"label {bad} is outside the vocabulary [0, {vocab}) and is not ignore_index={ignore_index}; "
            "check that labels come from the same tokenizer as the logits."
        )


class _Workspace:
    """Reusable fp32 [rows, V] buffers: one allocation per decompose call, not per chunk."""

    def __init__(self, rows: int, vocab: int, device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self.buffers: dict[str, Tensor] = {}

    def take(self, name: str, rows: int) -> Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.rows, self.vocab, dtype=torch.float32, device=self.device)
        return self.buffers[name][:rows]


class _LogitRows:
    """Rows of [B, T, V] logits, copied as fp32 into a workspace buffer."""

    def __init__(self, logits: Tensor):
        self.flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V), a view

    def load(self, index: Tensor, out: Tensor) -> Tensor:
        if self.flat.dtype == torch.float32:
            return torch.index_select(self.flat, 0, index, out=out)
        return out.copy_(self.flat.index_select(0, index))


class _HeadRows:
    """Logit rows made on demand from final hidden states [B, T, H] and an LM head [V, H] (+ bias [V])."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        self.flat, self.weight, self.bias = hidden.reshape(-1, hidden.shape[-1]), weight, bias

    def load(self, index: Tensor, out: Tensor) -> Tensor:
        rows = self.flat.index_select(0, index)  # (C, H)
        if rows.dtype == torch.float32 and self.weight.dtype == torch.float32:
            torch.matmul(rows, self.weight.T, out=out)  # (C, V)
            return out if self.bias is None else out.add_(self.bias)
        return out.copy_(torch.nn.functional.linear(rows, self.weight, self.bias))  # the model's dtype, as it would


def _log_parts(x: Tensor, target: Tensor, temperature: float, name: str, rest: Tensor):
    """Split one chunk's fp32 logits `x` [R, V] around the target; overwrites `x` and `rest`.

    Returns (log_rest, rest, log_py, log_not_y): log_rest [R, V] = log p^ (-inf at column y),
    rest = p^ (0 at y), log_py = log p_y and log_not_y = log(1 - p_y), both [R].
    One exp per element: p^ reuses the exponentials of the log-sum-exp. A -inf logit is an
    entry of probability 0 (exact); a row whose every non-target logit is -inf has p_y = 1.
    """
    if temperature != 1.0:
        x.div_(temperature)
    x_y = x.gather(1, target[:, None]).squeeze(1)  # (R,)
    x.scatter_(1, target[:, None], float("-inf"))
    row_max = x.amax(dim=1, keepdim=True)  # (R, 1), max over the non-target columns; NaN if any is NaN
    _check_finite(torch.maximum(row_max.squeeze(1), x_y), name, temperature)
    empty = row_max == float("-inf")  # every non-target logit is -inf
    if bool((empty.squeeze(1) & (x_y == float("-inf"))).any()):
        raise ValueError(f"{name} logits are -inf for every token at some positions; no distribution is left. "
                         "Check the logits processor or vocabulary mask.")
    shift = row_max.masked_fill(empty, 0.0)
    x.sub_(shift)
    torch.exp(x, out=rest)  # (R, V), unnormalised p^
    total = rest.sum(dim=1, keepdim=True)  # (R, 1), >= 1 unless the row is empty
    log_total = total.log()
    rest.div_(total.masked_fill(empty, 1.0))
    x.sub_(log_total.masked_fill(empty, 0.0))  # log p^
    gap = (shift + log_total).squeeze(1) - x_y  # lse_not_y - z_y = log((1 - p_y) / p_y), (R,)
    # log p_y = -log(1 + e^gap), log(1 - p_y) = -log(1 + e^-gap): exact even when p_y ~ 1
    return x, rest, -torch.nn.functional.softplus(gap), -torch.nn.functional.softplus(-gap)


def _check_finite(row_max: Tensor, name: str, temperature: float) -> None:
    """ValueError when a row holds NaN or +inf (seen in its max: amax propagates NaN)."""
    bad = torch.isnan(row_max) | (row_max == float("inf"))
    if bool(bad.any()):
        cause = (f" after dividing by temperature={temperature}" if temperature != 1.0 else "")
        raise ValueError(
            f"{name} logits contain NaN or +inf{cause} at {int(bad.sum())} of {len(bad)} positions of a chunk; "
            "-inf (a masked token) is fine, NaN and +inf are not. Check the model's forward pass (fp16 overflow "
            "is a common cause: try bf16 or fp32)."
        )


def _rank(logits: Tensor, target: Tensor) -> Tensor:
    target_logit = logits.gather(1, target[:, None])
    return (logits > target_logit).sum(dim=1) + 1


def _rowdot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Row-wise dot product (R,); mul into a reused buffer + sum beats einsum/bmm on CPU."""
    return torch.mul(a, b, out=scratch).sum(dim=1)


def _weighted(log_w: Tensor, value: Tensor) -> Tensor:
    """exp(log_w) * value, with 0 where the weight is exactly 0 (0 * log 0 = 0)."""
    return torch.where(log_w > float("-inf"), log_w.exp() * value, 0.0)


def _masked_rowdot(weights: Tensor, values: Tensor) -> Tensor:
    """Row sums of weights * values over the entries whose weight is > 0 (0 * inf and 0 * NaN count as 0)."""
    return torch.where(weights > 0, weights * values, 0.0).sum(dim=1)


def _binary_kl(log_a: Tensor, log_1ma: Tensor, log_b: Tensor, log_1mb: Tensor) -> Tensor:
    """KL([a, 1-a] || [b, 1-b]) from log-probabilities."""
    return _weighted(log_a, log_a - log_b) + _weighted(log_1ma, log_1ma - log_1mb)


def _binary_entropy(log_a: Tensor, log_1ma: Tensor) -> Tensor:
    return -(_weighted(log_a, log_a) + _weighted(log_1ma, log_1ma))


def _topk_probs(ids: Tensor, y: Tensor, log_rest: Tensor, log_py: Tensor, log_not_y: Tensor) -> Tensor:
    """Probabilities of token `ids` [R, k]: p_i = p^_i * (1 - p_y) off the target, p_y on it."""
    log_probs = log_rest.gather(1, ids) + log_not_y[:, None]
    return torch.where(ids == y[:, None], log_py[:, None], log_probs).exp()


def _chunk_stats(z: Tensor, s: Tensor, y: Tensor, temperature: float, top_k: int, ws: _Workspace) -> dict[str, Tensor]:
    """All per-token quantities for fp32 rows z, s [R, V] (workspace buffers, overwritten), targets y [R]."""
    out = {}
    rows = len(y)
    if top_k:  # ranks and top-k ids do not change with a positive temperature
        out["t_rank"], out["s_rank"] = _rank(z, y), _rank(s, y)
        t_ids, s_ids = z.topk(top_k, dim=1).indices, s.topk(top_k, dim=1).indices
    log_p_rest, p_rest, t_logp, t_log_unc = _log_parts(z, y, temperature, "teacher", ws.take("p", rows))
    log_q_rest, q_rest, s_logp, s_log_unc = _log_parts(s, y, temperature, "student", ws.take("q", rows))
    if top_k:
        out.update(
            t_topk_ids=t_ids,
            s_topk_ids=s_ids,
            t_topk_probs=_topk_probs(t_ids, y, log_p_rest, t_logp, t_log_unc),
            s_topk_probs=_topk_probs(s_ids, y, log_q_rest, s_logp, s_log_unc),
        )
    zero_at_y = torch.zeros_like(y, dtype=log_p_rest.dtype)[:, None]
    log_p_rest.scatter_(1, y[:, None], zero_at_y)  # finite everywhere now
    log_q_rest.scatter_(1, y[:, None], zero_at_y)
    log_ratio = torch.sub(log_p_rest, log_q_rest, out=ws.take("ratio", rows))  # (R, V), 0 at y
    scratch = ws.take("scratch", rows)
    unc, s_unc = t_log_unc.exp(), s_log_unc.exp()
    tkd = _binary_kl(t_logp, t_log_unc, s_logp, s_log_unc)
    reverse_tkd = _binary_kl(s_logp, s_log_unc, t_logp, t_log_unc)
    dots = torch.stack([_rowdot(p_rest, log_ratio, scratch), _rowdot(q_rest, log_ratio, scratch),
                        _rowdot(p_rest, log_p_rest, scratch), _rowdot(q_rest, log_q_rest, scratch)])  # (4, R)
    masked = torch.isnan(dots).any(dim=0).nonzero().squeeze(1)  # rows with -inf logits: 0 * inf
    if len(masked):
        p, q, ratio = p_rest[masked], q_rest[masked], log_ratio[masked]
        dots[:, masked] = torch.stack([_masked_rowdot(p, ratio), _masked_rowdot(q, ratio),
                                       _masked_rowdot(p, log_p_rest[masked]), _masked_rowdot(q, log_q_rest[masked])])
    dkd, reverse_dkd = dots[0], -dots[1]
    out.update(
        unc=unc,
        tkd=tkd,
        dkd=dkd,
        kl=tkd + unc * dkd,
        rkl=reverse_tkd + s_unc * reverse_dkd,
        t_entropy=_binary_entropy(t_logp, t_log_unc) - unc * dots[2],
        s_entropy=_binary_entropy(s_logp, s_log_unc) - s_unc * dots[3],
        t_logp=t_logp,
        s_logp=s_logp,
    )
    return out


@torch.no_grad()
def decompose(
    teacher_logits: Tensor,
    student_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    top_k: int = 0,
    chunk_rows: int | None = None,
) -> TokenStats:
    """Per-token uncertainty, TKD, DKD, KL, reverse KL, entropies and target log-probs.

    Args:
        teacher_logits, student_logits: [B, T, V], already aligned with `labels` (the
            caller shifts: logits at t predict labels at t). Any float dtype; math is fp32.
        labels: [B, T] target ids; `ignore_index` marks positions to skip.
        top_k: when > 0, also the target's rank and the top-k ids/probs of both models.
        chunk_rows: rows per streaming chunk (default: about 2M logits per chunk).

    A -inf logit is a token of probability 0 (exact); NaN or +inf is a ValueError.
    Not differentiable (analysis only); training losses live in `kdviz.losses`.

    >>> import torch
    >>> z, s = torch.randn(1, 3, 10), torch.randn(1, 3, 10)
    >>> st = decompose(z, s, torch.tensor([[1, 2, -100]]))
    >>> bool(torch.allclose(st.kl, st.tkd + st.unc * st.dkd))
    True
    """
    _check_inputs(teacher_logits, student_logits, labels)
    return _decompose_rows(_LogitRows(teacher_logits), _LogitRows(student_logits), labels, teacher_logits.shape[-1],
                           temperature=temperature, ignore_index=ignore_index, top_k=top_k, chunk_rows=chunk_rows)


@torch.no_grad()
def decompose_hidden(
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    student_hidden: Tensor,
    student_head: Tensor,
    labels: Tensor,
    *,
    teacher_bias: Tensor | None = None,
    student_bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    top_k: int = 0,
    chunk_rows: int | None = None,
) -> TokenStats:
    """`decompose` from final hidden states [B, T, H] and LM-head weights [V, H]: no [B, T, V] logits.

    Each chunk of rows gets its logits (C x V) from `hidden @ head.T + bias`, in the models'
    dtype as their own forward would, then fp32 for the math. Teacher and student may have
    different hidden sizes; the heads must have the same V rows (the shared vocabulary).
    """
    vocab = teacher_head.shape[0]
    if student_head.shape[0] != vocab or teacher_hidden.shape[:2] != student_hidden.shape[:2] \
            or teacher_hidden.shape[-1] != teacher_head.shape[1] or student_hidden.shape[-1] != student_head.shape[1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)}, teacher_head {tuple(teacher_head.shape)}, student_hidden "
            f"{tuple(student_hidden.shape)} and student_head {tuple(student_head.shape)} must be [B, T, H_t], "
            "[V, H_t], [B, T, H_s] and [V, H_s]."
        )
    _check_labels(labels, teacher_hidden.shape[:2])
    return _decompose_rows(_HeadRows(teacher_hidden, teacher_head, teacher_bias),
                           _HeadRows(student_hidden, student_head, student_bias), labels, vocab,
                           temperature=temperature, ignore_index=ignore_index, top_k=top_k, chunk_rows=chunk_rows)


def _decompose_rows(teacher, student, labels: Tensor, vocab: int, *, temperature: float, ignore_index: int,
                    top_k: int, chunk_rows: int | None) -> TokenStats:
    """The streaming loop shared by `decompose` and `decompose_hidden`."""
    check_temperature(temperature)
    check_count(top_k, "top_k", minimum=0)
    if chunk_rows is not None:
        check_count(chunk_rows, "chunk_rows", minimum=1)
    if top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}.")
    valid = labels != ignore_index  # (B, T)
    rows = valid.reshape(-1).nonzero().squeeze(1)  # (N,)
    y_flat = labels.reshape(-1)
    _check_targets(y_flat[rows], vocab, ignore_index)
    step = min(chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // vocab), max(1, len(rows)))
    ws = _Workspace(step, vocab, labels.device)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(rows), step):
        idx = rows[start : start + step]
        z, s = teacher.load(idx, ws.take("z", len(idx))), student.load(idx, ws.take("s", len(idx)))
        stats = _chunk_stats(z, s, y_flat[idx], temperature, top_k, ws)
        for key, value in stats.items():
            parts.setdefault(key, []).append(value)
    return _assemble(parts, rows, valid, top_k, device=labels.device)


def _assemble(parts: dict[str, list[Tensor]], rows: Tensor, valid: Tensor, top_k: int, device) -> TokenStats:
    """Scatter per-valid-row results back to [B, T] (0 / -1 where not valid)."""
    shape = valid.shape
    result = {}
    for key in SCALAR_FIELDS:
        full = torch.zeros(shape.numel(), dtype=torch.float32, device=device)
        if parts:
            full[rows] = torch.cat(parts[key])
        result[key] = full.view(shape)
    if top_k:
        for key in ("t_rank", "s_rank"):
            full = torch.full((shape.numel(),), -1, dtype=torch.long, device=device)
            if parts:
                full[rows] = torch.cat(parts[key])
            result[key] = full.view(shape)
        for key in ("t_topk_ids", "s_topk_ids", "t_topk_probs", "s_topk_probs"):
            is_ids = key.endswith("ids")
            full = torch.full((shape.numel(), top_k), -1 if is_ids else 0, device=device,
                              dtype=torch.long if is_ids else torch.float32)
            if parts:
                full[rows] = torch.cat(parts[key])
            result[key] = full.view(*shape, top_k)
    return TokenStats(valid=valid, **result)


@torch.no_grad()
def decompose_topk(teacher: TopKRows, student_hidden: Tensor, student_head: Tensor, labels: Tensor, *,
                   student_bias: Tensor | None = None, temperature: float = 1.0, ignore_index: int = -100,
                   top_k: int = 0, chunk_rows: int | None = None) -> TokenStats:
    """`decompose` with the teacher given as top-k rows (read from a teacher cache).

    `teacher` holds one row per valid position of `labels` [B, T], in row-major order; the student
    is given as final hidden states [B, T, H] and its LM head [V, H]. u, TKD, the target log-probs
    and everything of the student are exact; DKD, KL, reverse KL and the teacher's entropy are
    those of the bucketed distributions [target, top-k, tail] (lower bounds, exact when k covers
    the vocabulary). The teacher's rank of a target outside its top-k is -1 (unknown).
    `temperature`: the one the teacher's rows were made at; the student is tempered to match.
    """
    check_temperature(temperature)
    vocab = student_head.shape[0]
    valid = labels != ignore_index
    rows = valid.reshape(-1).nonzero().squeeze(1)
    if len(rows) != len(teacher.target_logp):
        raise ValueError(f"The teacher cache gives {len(teacher.target_logp)} target tokens for this batch, the labels "
                         f"{len(rows)}; the cache and the data do not match.")
    y_flat, student = labels.reshape(-1), _HeadRows(student_hidden, student_head, student_bias)
    _check_targets(y_flat[rows], vocab, ignore_index)
    teacher = teacher.to(labels.device)
    step = min(chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // vocab), max(1, len(rows)))
    full, small = _Workspace(step, vocab, labels.device), _Workspace(step, teacher.ids.shape[1] + 2, labels.device)
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(rows), step):
        span = slice(start, start + step)
        y = y_flat[rows[span]]
        logits = student.load(rows[span], full.take("s", len(y)))  # (C, V) fp32
        if temperature != 1.0:
            logits.div_(temperature)
        out = _student_side(logits, y, top_k)
        chunk = teacher[span]
        log_p_b, log_q_b = bucketed(out.pop("log_q"), chunk, y)  # (C, k + 2) each
        buckets = _chunk_stats(small.take("z", len(y)).copy_(log_p_b), small.take("s", len(y)).copy_(log_q_b),
                               torch.zeros_like(y), 1.0, 0, small)
        out.update({k: buckets[k] for k in ("unc", "tkd", "dkd", "kl", "rkl", "t_entropy", "t_logp")})
        if top_k:
            hit = chunk.ids == y[:, None]
            out["t_rank"] = torch.where(hit.any(1), hit.float().argmax(1) + 1, -1)
            out["t_topk_ids"], out["t_topk_probs"] = chunk.ids[:, :top_k], chunk.logprobs[:, :top_k].float().exp()
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return _assemble(parts, rows, valid, top_k, device=labels.device)


def _student_side(logits: Tensor, y: Tensor, top_k: int) -> dict[str, Tensor]:
    """Exact student quantities of one chunk of fp32 logits [C, V] (and its log-probs for the buckets)."""
    log_q = torch.log_softmax(logits, -1)
    out = {"log_q": log_q, "s_logp": log_q.gather(1, y[:, None])[:, 0],
           "s_entropy": -torch.where(log_q > float("-inf"), log_q.exp() * log_q, 0.0).sum(1)}
    if top_k:
        out["s_rank"] = (logits > logits.gather(1, y[:, None])).sum(1) + 1
        top = log_q.topk(top_k, dim=1)
        out["s_topk_ids"], out["s_topk_probs"] = top.indices, top.values.exp()
    return out
