"""How a teacher cache stores its rows: `exact` (float32 log-probs) or `compact` (about 160 bytes a token at k=64).

Both keep, per target token, the teacher's top-k token ids (16 bits when the vocabulary has at
most 65,536 entries) and the target's log-probability in float32, so u = 1 - p_y is exact.

- **exact**: the top-k log-probs in float32 and the tail's log-probability (everything that is
  neither the target nor in the top-k): 2k + 4k + 8 bytes (392 at k=64).
- **compact**: the rest of the row is described by the *non-target* mass and its shape:
  ``rest_logp`` (float32) = log of everything that is not the target (the non-target top-k plus
  the tail), ``tail_share`` (float16) = log of the tail's share of it, ``target_rank`` (1 byte: where
  the target sits in the top-k, k when it is not there) and the sorted curve of the non-target
  top-k log-probs relative to the largest one, d_j = n_0 - n_j >= 0, kept at a few ranks
  (`knot_ranks`: every rank to 10, then every ~20 %, and the last) as one byte each on a log1p scale
  over [0, 40] nats, and interpolated linearly in log(1 + rank) between them. At k=64 this is
  128 (ids) + 4 + 4 + 2 + 1 + 20 = 159 bytes.

  Reading a compact row puts the target's exact log-probability in its slot and scales the decoded
  non-target entries so that target + top-k + tail sum to exactly what the float32 cache sums to:
  u, TKD and the bucket normalisation are those of the exact cache (to float32 rounding); only the
  shape of the non-target top-k is approximate, which moves DKD and KL by about 0.1 % per token
  on the real pair (benchmarks/teacher_cache.py measures it).

>>> import torch
>>> from kdviz.maths.topk import TopKRows
>>> _ = torch.manual_seed(0)
>>> log_p = torch.log_softmax(torch.randn(3, 500) * 3, -1)
>>> y = torch.tensor([0, 1, 2])
>>> rows = TopKRows.from_log_probs(log_p, y, 64)
>>> back = decode({k: v.numpy() for k, v in encode(rows, y, "compact").items()}, "compact", 64)
>>> bool(torch.equal(back.ids, rows.ids)), bool(torch.equal(back.target_logp, rows.target_logp))
(True, True)
>>> bool((back.logprobs.exp() - rows.logprobs.exp()).abs().sum(1).max() < 0.02)  # top-k probabilities, L1
True
>>> row_bytes("compact", 64, 49152), row_bytes("exact", 64, 49152)
(159, 392)
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from kdviz.maths.topk import TopKRows

ENCODINGS = ("compact", "exact")
CURVE_TOP = 40.0  # nats: offsets past this are kept as 40 (a share below e^-40 of the largest non-target entry)
CURVE_LEVELS = 255


def check_encoding(encoding: str) -> str:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}.")
    return encoding


def id_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.int32


def knot_ranks(k: int) -> list[int]:
    """Ranks of the non-target curve kept exactly (besides its last entry): 1..10, then about every 20 %, below k - 2."""
    ranks = list(range(1, min(10, k - 3) + 1))
    x = 10.0
    while True:
        x *= 1.2
        rank = round(x)
        if rank > k - 3:
            return ranks
        if rank > ranks[-1]:
            ranks.append(rank)


def layout(encoding: str, k: int, vocab_size: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The arrays of one part of a cache: name -> (dtype, shape of one row)."""
    ids = (np.dtype(id_dtype(vocab_size)), (k,))
    if check_encoding(encoding) == "exact":
        return {"ids": ids, "logprobs": (np.dtype(np.float32), (k,)), "target_logp": (np.dtype(np.float32), ()),
                "tail_logp": (np.dtype(np.float32), ())}
    return {"ids": ids, "target_logp": (np.dtype(np.float32), ()), "rest_logp": (np.dtype(np.float32), ()),
            "tail_share": (np.dtype(np.float16), ()),
            "target_rank": (np.dtype(np.uint8 if k < 256 else np.uint16), ()),
            "curve": (np.dtype(np.uint8), (len(knot_ranks(k)) + 1,))}


def row_bytes(encoding: str, k: int, vocab_size: int) -> int:
    """Bytes one target token takes in this encoding."""
    return sum(dtype.itemsize * math.prod(shape) for dtype, shape in layout(encoding, k, vocab_size).values())


def encode(rows: TopKRows, targets: Tensor, encoding: str) -> dict[str, Tensor]:
    """The arrays of `rows` (on their device; `targets`: the target id of each row) in `encoding`."""
    if check_encoding(encoding) == "exact":
        return {"ids": rows.ids, "logprobs": rows.logprobs.float(), "target_logp": rows.target_logp.float(),
                "tail_logp": rows.tail_logp.float()}
    hit = rows.ids == targets[:, None]
    return encode_compact(rows, hit)


def encode_compact(rows: TopKRows, hit: Tensor) -> dict[str, Tensor]:
    """`encode` to the compact form, with `hit` [N, k] marking the target's entry in each row's top-k (if any)."""
    n, k = rows.ids.shape
    lp, tail = rows.logprobs.double(), rows.tail_logp.double()
    has = hit.any(1)
    rank = torch.where(has, hit.int().argmax(1), k)
    nt = lp.gather(1, torch.argsort(hit.int(), dim=1, stable=True))  # the non-target entries first, in order
    last = (k - 1 - has.long()).clamp(min=0)  # the last non-target entry's index
    valid = torch.arange(k, device=lp.device)[None] <= last[:, None]
    valid &= ~(has & (k == 1))[:, None]  # k = 1 and the target is the top-1: no non-target entry
    top = torch.logsumexp(nt.masked_fill(~valid, -math.inf), 1)
    rest = torch.logaddexp(top, tail)
    share = torch.where(torch.isfinite(rest), tail - rest, torch.full_like(rest, -math.inf))
    offsets = (nt[:, :1] - nt).nan_to_num(nan=0.0, posinf=CURVE_TOP)
    kept = torch.cat([offsets[:, knot_ranks(k)], offsets.gather(1, last[:, None])], 1)
    scale = math.log1p(CURVE_TOP)
    curve = torch.round(torch.log1p(kept.clamp(0, CURVE_TOP)) / scale * CURVE_LEVELS)
    return {"ids": rows.ids, "target_logp": rows.target_logp.float(), "rest_logp": rest.float(),
            "tail_share": share.half(), "target_rank": rank.to(torch.int32), "curve": curve.to(torch.uint8)}


@lru_cache(maxsize=32)
def _interpolation(k: int, last: int) -> Tensor:
    """[kept values, k] weights giving the offsets d_0..d_{k-1} from the kept ones (linear in log(1 + rank))."""
    points = [*knot_ranks(k), last]
    weights = torch.zeros(len(points), k, dtype=torch.float64)
    for j in range(1, last + 1):
        if j in points[:-1] or j == last:
            weights[points.index(j) if j != last else len(points) - 1, j] = 1.0
            continue
        hi = next(i for i, p in enumerate(points) if p > j)
        lo_rank = points[hi - 1] if hi > 0 else 0
        t = (math.log1p(j) - math.log1p(lo_rank)) / (math.log1p(points[hi]) - math.log1p(lo_rank))
        weights[hi, j] = t
        if hi > 0:
            weights[hi - 1, j] = 1.0 - t
    return weights


def decode(arrays: dict[str, np.ndarray], encoding: str, k: int) -> TopKRows:
    """The `TopKRows` (CPU tensors) of the rows held in `arrays` (numpy, one part's rows)."""
    ids = torch.from_numpy(np.ascontiguousarray(arrays["ids"])).long()
    target = torch.from_numpy(np.ascontiguousarray(arrays["target_logp"])).float()
    if encoding == "exact":
        return TopKRows(ids, torch.from_numpy(np.ascontiguousarray(arrays["logprobs"])).float(), target,
                        torch.from_numpy(np.ascontiguousarray(arrays["tail_logp"])).float())
    rank = torch.from_numpy(arrays["target_rank"].astype(np.int64))
    rest = torch.from_numpy(np.ascontiguousarray(arrays["rest_logp"])).double()
    share = torch.from_numpy(arrays["tail_share"].astype(np.float64))
    kept = torch.expm1(torch.from_numpy(arrays["curve"].astype(np.float64)) / CURVE_LEVELS * math.log1p(CURVE_TOP))
    has = rank < k
    offsets = torch.where(has[:, None], kept @ _interpolation(k, max(k - 2, 0)), kept @ _interpolation(k, k - 1))
    columns = torch.arange(k)[None]
    valid = columns < (k - has.long())[:, None]
    values = (-offsets).masked_fill(~valid, -math.inf)
    top_mass = rest + torch.log1p(-share.exp())  # log of the non-target top-k's mass
    norm = torch.logsumexp(values, 1, keepdim=True)
    values = torch.where(valid, values - norm.nan_to_num(neginf=0.0) + top_mass[:, None], -math.inf)
    slots = columns + (columns >= rank[:, None]).long()
    slots = torch.where(slots >= k, rank[:, None].clamp(max=k - 1), slots)  # (the unused last column of a hit row)
    logprobs = torch.empty(len(ids), k, dtype=torch.float64).scatter_(1, slots, values)
    logprobs = torch.where(columns == rank[:, None], target.double()[:, None], logprobs)
    return TopKRows(ids, logprobs.float(), target, (rest + share).float())
