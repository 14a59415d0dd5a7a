"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, stop."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from kdviz.distributed import world_size


class StopOnSignal(TrainerCallback):
    """On SIGINT or SIGTERM, finish the current optimizer step, save a checkpoint and stop training.

    The processes agree at each step's end (an all-reduce of the request), so all stop at the
    same step. A second signal interrupts at once (KeyboardInterrupt). Install the handlers
    around `trainer.train()` with `catching()`.
    """

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None

    def _request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def catching(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_step_end(self, args, state, control, **kwargs):
        requested = torch.tensor(float(self.requested), device=args.device)
        if world_size() > 1:
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        if requested.item() and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


