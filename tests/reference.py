"""Plain float64 reference formulas, written straight from the definitions (no chunking)."""

import math

import torch


def reference_stats(teacher_logits, student_logits, labels, temperature=1.0):
    """Dict of [B, T] float64 tensors: unc, tkd, dkd, kl, rkl, entropies, target log-probs."""
    z = teacher_logits.double() / temperature
    s = student_logits.double() / temperature
    y = labels.clamp(min=0)[..., None]
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(s, -1)
    p, q = log_p.exp(), log_q.exp()
    p_y = p.gather(-1, y).squeeze(-1)
    not_y = torch.ones_like(p, dtype=torch.bool).scatter(-1, y, False)
    # non-target distributions, from log-softmax over the other columns
    log_p_hat = torch.log_softmax(z.masked_fill(~not_y, float("-inf")), -1)
    log_q_hat = torch.log_softmax(s.masked_fill(~not_y, float("-inf")), -1)
    p_hat = log_p_hat.exp()
    dkd = torch.where(not_y, p_hat * (log_p_hat - log_q_hat), 0.0).sum(-1)
    log_1mp = torch.logsumexp(z.masked_fill(~not_y, float("-inf")), -1) - torch.logsumexp(z, -1)
    log_1mq = torch.logsumexp(s.masked_fill(~not_y, float("-inf")), -1) - torch.logsumexp(s, -1)
    tkd = p_y * (log_p.gather(-1, y).squeeze(-1) - log_q.gather(-1, y).squeeze(-1))
    tkd = tkd + torch.where(log_1mp > -torch.inf, log_1mp.exp() * (log_1mp - log_1mq), 0.0)
    kl = (p * (log_p - log_q)).sum(-1)
    rkl = (q * (log_q - log_p)).sum(-1)
    return {
        "unc": 1 - p_y,
        "tkd": tkd,
        "dkd": dkd,
        "kl": kl,
        "rkl": rkl,
        "t_entropy": -(p * log_p).nansum(-1),
        "s_entropy": -(q * log_q).nansum(-1),
        "t_logp": log_p.gather(-1, y).squeeze(-1),
        "s_logp": log_q.gather(-1, y).squeeze(-1),
    }


def _kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _mix(log_a, log_b, weight_a):
    """log(weight_a * a + (1 - weight_a) * b)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log(1 - weight_a))


def reference_token_loss(name, student_logits, teacher_logits, labels, params):
    """Per-token loss [N] over valid tokens, from float64 log-probabilities, straight from the definitions."""
    valid = labels != -100
    temperature = params.get("temperature", 1.0)
    log_p = torch.log_softmax(teacher_logits[valid].double() / temperature, -1)
    log_q = torch.log_softmax(student_logits[valid].double() / temperature, -1)
    if name == "fkl":
        return _kl(log_p, log_q)
    if name == "rkl":
        return _kl(log_q, log_p)
    if name == "jsd":
        beta = params["beta"]
        log_m = _mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    if name == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if name == "skl":
        return _kl(log_p, _mix(log_p, log_q, params["alpha"]))
    if name == "srkl":
        return _kl(log_q, _mix(log_q, log_p, params["alpha"]))
    if name == "dkd":
        stats = reference_stats(teacher_logits, student_logits, labels, params["temperature"])
        return (params["alpha"] * stats["tkd"] + params["beta"] * stats["dkd"])[valid] * params["temperature"] ** 2
    raise KeyError(name)


def official_style_atkd(student_logits, teacher_logits, labels, lam=0.2, k=0.5, base="fkl"):
    """ATKD the way the official code computes it: softmaxes, gt/other masks, masked_select copies."""
    mask = (labels != -100)[..., None]
    vocab = student_logits.shape[-1]
    s = torch.masked_select(student_logits, mask).view(-1, vocab)
    t = torch.masked_select(teacher_logits, mask).view(-1, vocab)
    y = torch.masked_select(labels, mask[..., 0])
    gt_mask = torch.nn.functional.one_hot(y, vocab).to(s.dtype)
    other_mask = 1 - gt_mask
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    p_gt, q_gt = (p * gt_mask).sum(-1), (q * gt_mask).sum(-1)
    p_other, q_other = (p * other_mask).sum(-1), (q * other_mask).sum(-1)
    unc = 1 - p_gt.detach()
    hard = unc >= torch.quantile(unc, 1 - k)
    log_p_hat = torch.log_softmax(t - 1000.0 * gt_mask, -1)
    log_q_hat = torch.log_softmax(s - 1000.0 * gt_mask, -1)
    if base == "fkl":
        tkd = p_gt * (p_gt / q_gt).log() + p_other * (p_other / q_other).log()
        dkd = (log_p_hat.exp() * (log_p_hat - log_q_hat)).sum(-1)
    else:
        tkd = q_gt * (q_gt / p_gt).log() + q_other * (q_other / p_other).log()
        dkd = (log_q_hat.exp() * (log_q_hat - log_p_hat)).sum(-1)
    easy_part = dkd[~hard].mean() if (~hard).any() else dkd.sum() * 0
    return lam * easy_part + (1 - lam) * (tkd + dkd)[hard].mean()
