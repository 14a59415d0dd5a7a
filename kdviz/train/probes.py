"""Probes: what a fine-tune does to each token, step by step.

At step 0, every `every` optimizer steps and at the end, the current student is analysed against
the teacher on a fixed held-out probe set, with the same code as `kdviz.analyze` (the same rows,
to float rounding, as analysing the student saved at that step). Stacked, the probes are
`trajectory.parquet` in the run folder: one row per probe target token per probe step, with
`step`, `doc_id`, `position`, `token_id`, `token`, `unc`, `kl`, `tkd`, `dkd`, `rkl`, `s_logp`,
`s_rank`, `t_logp` and `hard` (teacher uncertainty in the top fraction k of its sequence's, as
`kdviz.analyze` splits per sequence). The teacher side does not change between probes; with a
teacher cache it is read from disk, so a probe costs one student forward over the probe set.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import torch
from transformers import TrainerCallback

from kdviz.analysis.frames import Settings, TokenTexts, part_frame
from kdviz.analysis.store import group_thresholds
from kdviz.analysis.table import META_KEY
from kdviz.batching import Part
from kdviz.data import TokenDataset
from kdviz.files import write_with
from kdviz.pair import ModelPair

TRAJECTORY = "trajectory.parquet"
COLUMNS = ("step", "doc_id", "position", "token_id", "token", "source", "unc", "kl", "tkd", "dkd", "rkl", "t_logp",
           "s_logp", "s_rank", "hard")


def probe_frame(pair: ModelPair, dataset: TokenDataset, *, step: int, k: float = 0.5, temperature: float = 1.0,
                top_k: int = 1, batch_size: int = 8, batch_tokens: int = 16384) -> pl.DataFrame:
    """The probe rows of `pair`'s student now: `kdviz.analyze`'s rows of the target tokens, hard split per sequence."""
    settings = Settings(top_k, float(temperature), "right", batch_size, batch_tokens)
    rows = part_frame(pair, dataset, Part(0, len(dataset), 0), settings, TokenTexts(pair.tokenizer), lambda _: None)
    targets = rows.filter(pl.col("is_response")).lazy()
    group, thresholds = group_thresholds(targets, k=k, split="sequence", batch_size=batch_size)
    hard = (targets.with_columns(group.alias("_group"))
            .join(thresholds.lazy(), on="_group", how="left", maintain_order="left")
            .with_columns(hard=pl.col("unc") >= pl.col("unc_threshold")).collect())
    return hard.with_columns(step=pl.lit(step, dtype=pl.Int64)).select(COLUMNS).sort("doc_id", "position")


class Probes(TrainerCallback):
    """Probe the student at step 0, every `every` optimizer steps and at the end; write `path` after each probe.

    Only the main process probes (the student's weights are the same on every process). A resumed
    run keeps the probes of the steps it had done and continues from there.
    """

    def __init__(self, pair: ModelPair, dataset: TokenDataset, *, every: int, path: Path | None, k: float,
                 temperature: float, description: str):
        self.pair, self.dataset, self.every, self.path = pair, dataset, every, path
        self.options = dict(k=k, temperature=temperature)
        self.meta = {"probe_data": description, "probe_fingerprint": dataset.fingerprint, "every": every, "k": k,
                     "temperature": temperature, "teacher": pair.teacher_name, "student": pair.student_name}
        self.frames: list[pl.DataFrame] = []
        self.seconds = 0.0  # spent probing (the probes' share of the run's time)

    @property
    def trajectory(self) -> pl.DataFrame | None:
        return pl.concat(self.frames) if self.frames else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.frames = []
        if state.global_step > 0 and self.path is not None and self.path.is_file():  # resumed: keep what was probed
            kept = pl.read_parquet(self.path).filter(pl.col("step") <= state.global_step)
            self.frames = [kept] if kept.height else []
        if state.global_step == 0 and args.process_index == 0:
            self._probe(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and args.process_index == 0:
            self._probe(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        probed = self.frames and int(self.frames[-1]["step"].max()) == state.global_step
        if not probed and args.process_index == 0:
            self._probe(model, state.global_step)

    def _probe(self, model, step: int) -> None:
        started = time.perf_counter()
        student = self.pair.student  # the model being trained (under DDP, the module inside the wrapper)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            self.frames.append(probe_frame(self.pair, self.dataset, step=step, **self.options))
        student.train(was_training)
        if self.path is not None:
            trajectory, meta = self.trajectory, json.dumps(self.meta)
            write_with(self.path, lambda temp: trajectory.write_parquet(temp, metadata={META_KEY: meta}),
                       what="trajectory")
        self.seconds += time.perf_counter() - started
