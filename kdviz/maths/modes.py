"""Teaching modes: which tokens a KD loss applies to, and which parts of the KL it uses.

A mode is a weighted sum of terms, each a token set and parts of KL(p || q) = TKD + u * DKD:

    0.2*easy:dkd + 0.8*hard:tkd+dkd        ATKD (lam 0.2, k 0.5): exactly kdviz's `atkd`
    all:tkd + all:u*dkd                    plain KD, i.e. `fkl` (KL = TKD + u * DKD)
    hard:kl                                KD on the hard tokens only
    0.5*ce + all:kl                        plus the student's cross-entropy on the data

Token sets: `all`, `hard`, `easy` (hard = teacher uncertainty u >= the (1 - k) quantile of the
batch, as ATKD splits). Parts: `tkd`, `dkd` (unweighted), `u*dkd`, `kl`. Each term is averaged
over its own token count (over the global batch in training), so `hard:kl` is the mean KL of the
hard tokens. A weight is written `W*` before the set (default 1); `ce` is the cross-entropy term.

>>> parse_mode("0.2*easy:dkd + 0.8*hard:tkd+dkd").spec
'0.2*easy:dkd + 0.8*hard:tkd+dkd'
>>> parse_mode("kd-on-hard").spec
'1*hard:kl'
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from kdviz.maths.split import TokenSplit

TOKEN_SETS = ("all", "hard", "easy")
PARTS = ("tkd", "dkd", "u*dkd", "kl")
# The paper's three analyses, named (ATKD, section "Rethinking KD for autoregressive LMs").
PRESETS = {
    "kd-on-hard": "hard:kl",  # 1: KD on the hard tokens only ...
    "kd-on-easy": "easy:kl",  # ... against KD on the easy tokens only
    "tkd-alone": "all:tkd",  # 2: TKD alone ...
    "dkd-alone": "all:dkd",  # ... against DKD alone, neither weighted by u
    "tkd-on-easy": "easy:tkd",  # 3: TKD on the easy tokens ...
    "tkd-on-hard": "hard:tkd",  # ... against TKD on the hard tokens
}
_TERM = re.compile(r"^(?:(?P<weight>[0-9.eE+-]+)\s*\*\s*)?(?P<set>[a-z]+)\s*:\s*(?P<part>[a-z*]+)$")
_WEIGHTED = re.compile(r"^(?:(?P<weight>[0-9.eE+-]+)\s*\*\s*)?(?P<name>[a-z]+)$")


class Term(NamedTuple):
    weight: float
    tokens: str  # all, hard, easy
    part: str  # tkd, dkd, u*dkd, kl


class Mode(NamedTuple):
    """A parsed teaching mode: its KD terms and the weight of the cross-entropy on the data."""

    terms: tuple[Term, ...]
    ce: float = 0.0

    @property
    def spec(self) -> str:
        """The canonical spelling (terms of one token set and weight joined with '+')."""
        groups: list[tuple[float, str, list[str]]] = []
        for term in self.terms:
            if groups and groups[-1][:2] == (term.weight, term.tokens):
                groups[-1][2].append(term.part)
            else:
                groups.append((term.weight, term.tokens, [term.part]))
        text = [f"{_number(w)}*{tokens}:{'+'.join(parts)}" for w, tokens, parts in groups]
        return " + ".join(([f"{_number(self.ce)}*ce"] if self.ce else []) + text)


def _number(value: float) -> str:
    return f"{value:g}"


def is_mode(name) -> bool:
    """Whether `name` spells a teaching mode (a preset name, or terms with a token set and ':')."""
    return isinstance(name, str) and (name in PRESETS or ":" in name or "*" in name)


@lru_cache(maxsize=256)
def parse_mode(text: str) -> Mode:
    """The `Mode` `text` spells; ValueError saying what is wrong and what is allowed."""
    text = PRESETS.get(text.strip(), text)
    terms, ce = [], 0.0
    for piece in (p.strip() for p in text.split("+")):
        term, weighted = _TERM.match(piece), _WEIGHTED.match(piece)
        if term:
            weight = _weight(term["weight"], text)
            if term["set"] not in TOKEN_SETS:
                raise ValueError(f"Teaching mode {text!r}: token set {term['set']!r} is not one of {TOKEN_SETS}.")
            terms.append(Term(weight, term["set"], _part(term["part"], text)))
        elif weighted and weighted["name"] == "ce":
            ce += _weight(weighted["weight"], text)
        elif terms and piece in PARTS:  # "hard:tkd+dkd": another part of the term before
            terms.append(terms[-1]._replace(part=piece))
        else:
            raise ValueError(f"Teaching mode {text!r}: cannot read {piece!r}. Write terms like '0.2*easy:dkd + "
                             f"0.8*hard:tkd+dkd' (token sets {', '.join(TOKEN_SETS)}; parts {', '.join(PARTS)}; "
                             f"'W*ce' for cross-entropy), or a name: {', '.join(PRESETS)}.")
    if not terms:
        raise ValueError(f"Teaching mode {text!r} has no KD term; add one, e.g. 'all:kl'.")
    return Mode(tuple(terms), ce)


def _weight(text: str | None, spec: str) -> float:
    if text is None:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"Teaching mode {spec!r}: weight {text!r} must be a finite number >= 0.")
    return value


def _part(text: str, spec: str) -> str:
    if text not in PARTS:
        raise ValueError(f"Teaching mode {spec!r}: part {text!r} is not one of {', '.join(PARTS)}.")
    return text


def mode_weights(unc: Tensor, params: dict, *, split: TokenSplit | None = None) -> Tensor:
    """[N, 2] weights (on TKD, on DKD) per token so that sum(w_tkd * TKD + w_dkd * DKD) is the mode's loss.

    Each term adds weight / (its set's token count) on its set's tokens: to TKD for `tkd`, to DKD
    for `dkd`, u times that to DKD for `u*dkd`, and both (KL = TKD + u * DKD) for `kl`. With
    `split`, its threshold and group sizes (of the global batch) are used.
    """
    split = split or TokenSplit.over(unc, params["k"])
    hard = split.hard(unc)
    masks = {"all": torch.ones_like(hard), "hard": hard, "easy": ~hard}
    counts = {"all": split.n_hard + split.n_easy, "hard": split.n_hard, "easy": split.n_easy}
    on_tkd, on_dkd = torch.zeros_like(unc), torch.zeros_like(unc)
    for term in parse_mode(params["spec"]).terms:
        if not counts[term.tokens]:
            continue
        share = torch.where(masks[term.tokens], term.weight / counts[term.tokens], 0.0)
        if term.part in ("tkd", "kl"):
            on_tkd = on_tkd + share
        if term.part == "dkd":
            on_dkd = on_dkd + share
        if term.part in ("u*dkd", "kl"):
            on_dkd = on_dkd + share * unc
    return torch.stack([on_tkd, on_dkd], dim=1)
