"""KD objectives: one per-token function each, and a registry with defaults and parameter checks.

Each objective maps (log_q, log_p, y, rows, params) to a per-token loss [R]: log_q the student's
and log_p the teacher's fp32 log-probabilities [R, V], y the targets [R], `rows` per-row weights
(ATKD's hard/easy weights, else None). `kdviz.losses.get_loss` configures one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kdviz.checks import MAX_TEMPERATURE, MIN_TEMPERATURE, is_real
from kdviz.maths.logspace import kl, log_mixture, tkd_dkd
from kdviz.maths.modes import mode_weights, parse_mode
from kdviz.maths.split import atkd_weights


def fkl(log_q, log_p, y, rows, params):
    return kl(log_p, log_q)


def rkl(log_q, log_p, y, rows, params):
    return kl(log_q, log_p)


def jsd(log_q, log_p, y, rows, params):
    """Generalized JSD as in TRL's GKDTrainer: beta 0 = forward KL, beta 1 = reverse KL."""
    beta = params["beta"]
    if beta == 0:
        return kl(log_p, log_q)
    if beta == 1:
        return kl(log_q, log_p)
    log_m = log_mixture(log_p, log_q, beta)  # beta * p + (1 - beta) * q
    return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)


def tvd(log_q, log_p, y, rows, params):
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def skl(log_q, log_p, y, rows, params):
    """Skew forward KL (DistiLLM): KL(p || alpha p + (1 - alpha) q)."""
    return kl(log_p, log_mixture(log_p, log_q, params["alpha"]))


def srkl(log_q, log_p, y, rows, params):
    """Skew reverse KL (DistiLLM): KL(q || alpha q + (1 - alpha) p)."""
    return kl(log_q, log_mixture(log_q, log_p, params["alpha"]))


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


def teaching_mode(log_q, log_p, y, rows, params):
    """A teaching mode's token contribution: rows[:, 0] * TKD + rows[:, 1] * DKD (weights from `mode_weights`)."""
    tkd, diversity = tkd_dkd(log_p, log_q, y)
    return rows[:, 0] * tkd + rows[:, 1] * diversity


@dataclass(frozen=True)
class Objective:
    token_loss: Callable  # (log_q, log_p, y, rows, params) -> [R]
    defaults: dict
    doc: str
    checks: dict = field(default_factory=dict)  # param -> (predicate, allowed text)
    row_weights: Callable | None = None  # (u, params, split=) -> [N, 2] per-token weights on (TKD, DKD)

    @property
    def self_normalised(self) -> bool:
        """Whether the token losses carry their own 1/group-size weights (ATKD, teaching modes)."""
        return self.row_weights is not None


def _number(predicate: Callable[[float], bool], allowed: str) -> tuple[Callable[[object], bool], str]:
    """A parameter check: a real number (not a string or bool) for which `predicate` holds."""
    def check(value) -> bool:
        return is_real(value) and predicate(value)
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
                      row_weights=atkd_weights),
    "modes": Objective(teaching_mode, {"spec": "all:kl", "k": 0.5, "temperature": 1.0},
                       "a teaching mode: token sets (all, hard, easy) x parts (tkd, dkd, u*dkd, kl), see kdviz.maths.modes",
                       {"spec": (lambda v: isinstance(v, str) and _parses(v), "a teaching mode, e.g. 'hard:kl'"),
                        "k": _number(lambda v: 0 < v <= 1, "a number in (0, 1]"), "temperature": _TEMPERATURE},
                       row_weights=mode_weights),
}


def _parses(spec: str) -> bool:
    parse_mode(spec)  # ValueError saying what is wrong
    return True
REDUCTIONS = ("mean", "sum", "none")
