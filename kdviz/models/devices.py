"""Which device and dtype kdviz uses: cuda with bf16 when there is a GPU, else cpu with fp32."""

from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def resolve_device(device: str | None) -> str:
    """`device` checked against this machine (None: cuda when there is one, else cpu)."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r} but this machine has no CUDA GPU that torch can use "
                             f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch.")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device={device!r} but this machine has {count} GPU(s) (cuda:0 to cuda:{count - 1}).")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={device!r} but MPS is not available here; use 'cpu'.")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported; use 'cpu' or 'cuda'.")
    return str(parsed)
