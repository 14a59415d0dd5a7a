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
