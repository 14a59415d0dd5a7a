"""Plain float64 reference formulas, written straight from the definitions (no chunking)."""

import torch


def reference_stats(teacher_logits, student_logits, labels, temperature=1.0):
    """Dict of [B, T] float64 tensors: unc, tkd, dkd, kl, rkl, entropies, target log-probs."""
    z = teacher_logits.double() / temperature
    s = student_logits.double() / temperature
    y = labels.clamp(min=0)[..., None]
    log_p, log_q = torch.log_softmax(z, -1), torch.log_softmax(s, -1)
    p, q = log_p.exp(), log_q.exp()
    p_y, q_y = p.gather(-1, y).squeeze(-1), q.gather(-1, y).squeeze(-1)
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
