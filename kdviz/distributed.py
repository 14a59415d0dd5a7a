"""More than one process: which rank this is, and waiting for the others.

kdviz runs on torch.distributed as launched by `torchrun --nproc_per_node N` or
`accelerate launch` (both set RANK, WORLD_SIZE and LOCAL_RANK); there is no scheduler of
kdviz's own. Analysis uses gloo on CPU and nccl on GPUs; training leaves it to the Trainer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BARRIER_TIMEOUT = timedelta(hours=6)  # rank 0 merges a large table while the others wait


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from torch.distributed if it is running, else from the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str | torch.device) -> World:
    """Join the process group the launcher set up (gloo on CPU, nccl on CUDA); a no-op for one process."""
    here = world()
    if here.size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return world()


def leave() -> None:
    """Leave the process group, joining its background threads, before the process exits (a process that exits
    with a live gloo group can abort at teardown: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def local_device(device: str) -> str:
    """cuda -> cuda:LOCAL_RANK when several processes share a node (each its own GPU)."""
    if device == "cuda" and world().size > 1:
        return f"cuda:{world().local_rank}"
    return device


def broadcast(value, *, source: int = 0):
    """`value` as rank `source` has it, on every rank (any picklable object)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def gathered(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor sharded by FSDP2 (a DTensor) gathered whole, its gradient averaged over the ranks; others as they are."""
    if tensor is None or not dist.is_available():
        return tensor
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


def world_size() -> int:
    """Processes in the running process group (1 when none is running)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SharedError(ValueError):
    """An error every process of a run reaches together (the same input refused on each): rank 0 alone says it."""


class RankMismatch(SharedError):
    """The processes of one run hold different data, settings or models."""


def check_agree(values: dict[str, object]) -> None:
    """RankMismatch on every rank when the processes disagree on any of `values` (data fingerprints, settings,
    model fingerprints): each one's hash is gathered, and the first that differs is named with the ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    import hashlib
    import json

    mine = {key: hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
            for key, value in values.items()}
    gathered_values: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered_values, mine)
    for key in values:
        seen = [ranks[key] for ranks in gathered_values]
        if len(set(seen)) > 1:
            differ = [rank for rank, value in enumerate(seen) if value != seen[0]]
            raise RankMismatch(f"The {dist.get_world_size()} processes of this run do not hold the same {key}: rank(s) "
                               f"{differ} differ from rank 0. Every process must read the same data (a file all of "
                               "them can read, the same on every node), with the same options and models.")


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` is this process losing its peers (another rank failed and left), not a failure of its own."""
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    text = str(err).lower()
    return bool(names & {"DistBackendError", "DistNetworkError"}) or (
        isinstance(err, RuntimeError) and any(word in text for word in ("gloo", "nccl", "connection closed",
                                                                       "connection reset", "broken pipe")))
