"""Toy distributions for teaching: a target token plus a tail whose spread you choose.

>>> result = toy_kd(teacher_target=0.6, student_target=0.3)
>>> round(result.tkd + result.unc * result.dkd, 6) == round(result.kl, 6)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdviz.maths.decomposition import decompose


def toy_logits(*, target_prob: float, spread: float, vocab: int = 8) -> torch.Tensor:
    """Logits [V] whose softmax gives token 0 `target_prob` and the rest a tail decaying over `spread`.

    spread -> 0 puts all the rest on token 1; a large spread makes the rest uniform.
    """
    if not 0 < target_prob < 1:
        raise ValueError(f"target_prob must be in (0, 1), got {target_prob}.")
    if spread <= 0 or vocab < 3:
        raise ValueError(f"Need spread > 0 and vocab >= 3, got spread={spread}, vocab={vocab}.")
    tail = torch.softmax(-torch.arange(vocab - 1, dtype=torch.float64) / spread, 0) * (1 - target_prob)
    return torch.cat([torch.tensor([target_prob], dtype=torch.float64), tail]).log()


@dataclass(frozen=True)
class ToyResult:
    p: list[float]  # teacher probabilities at the temperature
    q: list[float]  # student probabilities
    unc: float
    tkd: float
    dkd: float
    kl: float


def toy_kd(*, teacher_target: float, student_target: float, teacher_spread: float = 1.0,
           student_spread: float = 3.0, temperature: float = 1.0, vocab: int = 8) -> ToyResult:
    """Teacher and student toy distributions (target = token 0) and their KL parts via `decompose`."""
    z = toy_logits(target_prob=teacher_target, spread=teacher_spread, vocab=vocab)
    s = toy_logits(target_prob=student_target, spread=student_spread, vocab=vocab)
    stats = decompose(z[None, None], s[None, None], torch.zeros(1, 1, dtype=torch.long), temperature=temperature)
    p = torch.softmax(z / temperature, 0).tolist()
    q = torch.softmax(s / temperature, 0).tolist()
    value = {name: float(getattr(stats, name)[0, 0]) for name in ("unc", "tkd", "dkd", "kl")}
    return ToyResult(p, q, **value)


def toy_sweep(*, student_target: float = 0.3, teacher_spread: float = 1.0, student_spread: float = 3.0,
              temperature: float = 1.0, points: int = 19):
    """TKD, u * DKD and KL as the teacher's target probability goes from 0.05 to 0.95 (a polars table)."""
    import polars as pl

    rows = []
    for i in range(points):
        target = 0.05 + 0.9 * i / (points - 1)
        r = toy_kd(teacher_target=target, student_target=student_target, teacher_spread=teacher_spread,
                   student_spread=student_spread, temperature=temperature)
        rows.append({"teacher_target": target, "unc": r.unc, "tkd": r.tkd, "dkd": r.dkd,
                     "weighted_dkd": r.unc * r.dkd, "kl": r.kl})
    return pl.DataFrame(rows)
