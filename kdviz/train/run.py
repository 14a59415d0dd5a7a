"""`distill`: load, split, train, evaluate before and after, save; interrupted runs resume."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import polars as pl
import torch
from transformers import PrinterCallback

from kdviz.checks import check_count
from kdviz.data import TokenDataset, check_template, load_data, pad_id, read_data, tokenize
from kdviz.distributed import barrier, broadcast, check_agree, world
from kdviz.files import check_writable, expand, staged_folder, write_text, writer_lock
from kdviz.models import resolve_device
from kdviz.pair import ModelPair, load_pair
from kdviz.teachers import Teacher
from kdviz.train.aligned import AlignedTeacher, aligned_dataset, check_cross_run, check_pair_loss
from kdviz.train.checkpoints import (EVAL_BEFORE, check_fresh, check_inputs, checkpoint_step, checkpoints,
                                     resume_point, run_inputs)
from kdviz.train.config import DistillConfig, run_settings
from kdviz.train.evaluate import EvalResult
from kdviz.train.onpolicy import teacher_references, writes_every_step
from kdviz.train.probes import TRAJECTORY, Probes
from kdviz.train.signals import StopOnSignal
from kdviz.train.trainer import DistillTrainer


def split_data(dataset: TokenDataset, *, eval_size: int, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
    """(train, eval): `eval_size` examples drawn with `seed`, the rest for training."""
    if not 0 < eval_size < len(dataset):
        raise ValueError(f"eval_size must be in [1, {len(dataset) - 1}] for {len(dataset)} examples, got {eval_size}.")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:eval_size])
    train = [ex for i, ex in enumerate(dataset) if i not in held]
    evaluation = [ex for i, ex in enumerate(dataset) if i in held]
    return (TokenDataset(train, f"{dataset.description} (train, {len(train)})", template=dataset.template),
            TokenDataset(evaluation, f"{dataset.description} (eval, {len(evaluation)})", template=dataset.template))


@dataclass
class DistillResult:
    """What one fine-tune did: evaluation before and after, the log history, wall time.

    An interrupted run (`interrupted`) has no `after`; `checkpoint` is where it can resume.
    """

    loss: str
    teacher: str
    student: str
    steps: int
    before: EvalResult
    after: EvalResult | None
    history: list[dict]
    train_seconds: float
    settings: dict
    out_dir: str | None = None
    steps_done: int | None = None
    interrupted: bool = False
    checkpoint: str | None = None
    probe_seconds: float | None = None  # time spent probing (None: no probes)
    trajectory: pl.DataFrame | None = field(default=None, repr=False)  # the probes (also trajectory.parquet in out_dir)

    def row(self) -> dict:
        """One flat row for a comparison table."""
        after = self.after  # None: interrupted
        return {"loss": self.loss, "teacher": self.teacher, "steps": self.steps,
                "eval_loss": after and after.loss, "agreement": after and after.agreement,
                "rouge_l": after and after.rouge_l,
                "eval_loss_before": self.before.loss, "train_seconds": self.train_seconds}

    def curves(self) -> list[dict]:
        """The training log rows (step, loss, kd, kd_hard, kd_easy, ce, unc, ...)."""
        return [entry for entry in self.history if "kd" in entry]

    def save(self, path: str | Path) -> Path:
        record = {key: value for key, value in asdict(self).items() if key != "trajectory"}
        return write_text(path, json.dumps(record, indent=2, default=str), what="run metrics")


def eval_split_size(requested: int | None, available: int) -> int:
    """How many examples to hold out: `requested`, or by default min(32, a fifth of the data)."""
    if available < 2:
        raise ValueError(f"Distillation needs at least 2 examples (one to train on, one to evaluate); the data gave "
                         f"{available}. Use more data (or a larger --limit).")
    if requested is None:
        return min(32, max(1, available // 5))
    check_count(requested, "eval_size", minimum=1)
    if requested >= available:
        raise ValueError(f"eval_size={requested} leaves nothing to train on: the data has {available} examples. "
                         f"Use an eval size of at most {available - 1} (a fifth of the data is the default).")
    return requested


def main_computes(trainer: DistillTrainer, compute):
    """`compute()` on the main process only (FSDP: on all, its forward needs every rank); its value on every process."""
    here = trainer.is_world_process_zero() or trainer.is_fsdp_enabled
    return broadcast(compute() if here else None)


def evaluation_before(trainer: DistillTrainer, evaluation, out_dir: str | Path | None, *, resumed: bool) -> EvalResult:
    """The held-out evaluation before training: stored in `out_dir` at the start, read back when a run resumes."""
    path = expand(out_dir) / EVAL_BEFORE if out_dir is not None else None
    if resumed and path is not None and path.is_file():
        return EvalResult(**json.loads(path.read_text()))
    before = main_computes(trainer, lambda: trainer.score(evaluation))
    if path is not None and trainer.is_world_process_zero():
        write_text(path, json.dumps(asdict(before), indent=2), what="evaluation before training")
    return before


def save_run(trainer: DistillTrainer, result: DistillResult, out_dir: str | Path) -> None:
    """The student (unless the run was interrupted: its checkpoint has it) and metrics.json, by the main process."""
    main = trainer.is_world_process_zero()
    with staged_folder(out_dir, what="output folder") if main else nullcontext() as stage:
        stage = broadcast(str(stage) if main else None)
        if not result.interrupted:
            trainer.save_model(stage)  # every process (FSDP gathers the weights); the main one writes
        if main:
            result.save(Path(stage) / "metrics.json")
    barrier()


def distill(teacher, student, data, *, loss: str = "atkd", steps: int = 300, out_dir: str | Path | None = None,
            eval_size: int | None = None, limit: int | None = None, batch_size: int = 8, learning_rate: float = 5e-4,
            seed: int = 0, device: str | None = None, callbacks=None, progress: bool = True, template: str = "auto",
            truncate: bool = False, prompt_field: str | None = None, response_field: str | None = None,
            context_field: str | None = None, save_steps: int | None = None,
            resume_from_checkpoint: bool | str | None = None, teacher_cache: str | Path | None = None,
            max_length: int | None = None, probe_every: int | None = None, probe_data=None,
            **config) -> DistillResult:
    """Distil `student` from `teacher` on `data` for `steps` steps and evaluate before and after.

    teacher/student: hub id, local folder, .gguf file or zoo name; data: anything
    `kdviz.data.load_data` reads, with the same options (template, truncate, *_field, limit,
    max_length: the context to use, at most the models'). `eval_size` examples (default: a fifth
    of the data, at most 32) are held out. Extra keyword arguments go to `DistillConfig` (e.g.
    loss_params={"lam": 0.2}, ce_weight=0.5, okd_rank=8, gradient_accumulation_steps=2).
    `batch_size` is per process. With `out_dir` the student is saved there in Hugging Face format
    with `metrics.json`, each file renamed into place, by the main process (which alone
    evaluates); Trainer checkpoints go there every `save_steps` steps, and on SIGINT or SIGTERM
    the run saves one at the end of the current step and returns a result marked `interrupted`.
    `resume_from_checkpoint`: True continues the latest checkpoint in `out_dir` (or give a
    checkpoint folder), with the evaluation before training stored at the start. `teacher_cache`:
    a folder made by `kdviz teacher-cache` (then `teacher` is None): the teacher is read from it
    instead of run (see `kdviz.cache`). `probe_every`: analyse the student on a probe set (the
    held-out examples, or `probe_data`) at step 0, every N steps and at the end
    (`kdviz.train.probes`; `result.trajectory`, and trajectory.parquet in `out_dir`).
    """
    check_count(steps, "steps", minimum=1)
    check_count(batch_size, "batch_size", minimum=1)
    check_template(template)
    for name, value in (("eval_size", eval_size), ("save_steps", save_steps), ("probe_every", probe_every)):
        if value is not None:
            check_count(value, name, minimum=1)
    device = resolve_device(device)
    scratch = None if out_dir else tempfile.mkdtemp(prefix="kdviz-distill-")  # the Trainer wants a folder; not cwd
    args = _config(str(out_dir or scratch), loss=loss, steps=steps, batch_size=batch_size,
                   learning_rate=learning_rate, seed=seed, device=device, save_steps=save_steps, progress=progress,
                   **config)  # settings checked before anything is loaded
    check_cross_run(loss, teacher_cache=teacher_cache, probe_every=probe_every)
    prompts_only = writes_every_step(args.on_policy, args.seq_kd)  # every step generates: records may be prompts
    source = read_data(data, limit=limit, prompt_field=prompt_field, response_field=response_field,
                       context_field=context_field, need_response=not prompts_only)
    if out_dir is not None:
        check_writable(out_dir, what="output folder", folder=True)
    owner = out_dir is not None and world().is_main  # one writer per folder: the main process holds the lock
    with writer_lock(out_dir, what="output folder", inside=True) if owner else nullcontext():
        checkpoint = _start_point(out_dir, resume_from_checkpoint, args)
        torch.manual_seed(seed)
        pair = load_pair(teacher, student, teacher_cache=teacher_cache, device=device)
        check_pair_loss(pair, loss)
        pair.student.float().requires_grad_(True)
        dataset, teacher_side = _training_data(pair, source, template=template, max_length=max_length, limit=limit,
                                               truncate=truncate, need_response=not prompts_only)
        train, evaluation = split_data(dataset, eval_size=eval_split_size(eval_size, len(dataset)), seed=seed)
        evaluation, references = teacher_references(pair.teacher, evaluation, tokenizer=pair.tokenizer,
                                                    context=pair.context(max_length), pad=pad_id(pair.tokenizer),
                                                    max_new_tokens=args.rollout_max_new_tokens)
        trainer = DistillTrainer(model=pair.student, source=teacher_side, args=args, train_dataset=train,
                                 eval_dataset=evaluation, processing_class=pair.tokenizer, vocab_size=pair.vocab_size,
                                 callbacks=callbacks, generation_context=pair.context(max_length))
        trainer.run_inputs = run_inputs(pair, train, evaluation)
        check_agree({**trainer.run_inputs, "settings": run_settings(args)})  # every process: same data and models
        if checkpoint is not None:
            check_inputs(checkpoint, trainer.run_inputs)
        if not progress:
            trainer.remove_callback(PrinterCallback)  # quiet: the log history is in the result
        probes = _probes(trainer, pair, evaluation, probe_data, probe_every, out_dir, limit=limit, template=template,
                         max_length=max_length) if probe_every else None
        result = _train(trainer, pair, dataset, out_dir, checkpoint)
        if references:
            result.settings.update(eval_references_by_teacher=references)
        if probes is not None:
            result.probe_seconds, result.trajectory = probes.seconds, probes.trajectory
            result.settings.update(probe_every=probe_every, probe_data=probes.meta["probe_data"])
        if out_dir:
            pair.student.eval()
            save_run(trainer, result, out_dir)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _training_data(pair: ModelPair, source, *, template: str, max_length: int | None, limit: int | None,
                   truncate: bool, need_response: bool = True) -> tuple[TokenDataset, Teacher]:
    """(the examples, the teacher the trainer asks): the student's tokenization and the pair's teacher, or for a
    pair across tokenizers examples built for both tokenizers and an `AlignedTeacher`. Without `need_response`
    (every step generates its responses) a record may be a prompt alone."""
    if not pair.cross_tokenizer:
        return tokenize(source, pair.tokenizer, max_length=pair.context(max_length), limit=limit, template=template,
                        truncate=truncate, need_response=need_response), pair.source
    dataset = aligned_dataset(pair, source, template=template, max_length=max_length, limit=limit, truncate=truncate)
    return dataset, AlignedTeacher(pair.teacher, vocabulary=pair.vocabulary, name=pair.teacher_name,
                                   tokenizer=pair.teacher_tokenizer)


def _start_point(out_dir, resume, args: DistillConfig):
    """The checkpoint to continue (`resume`), or None for a fresh start in a folder checked to be fresh."""
    if resume:
        return resume_point(out_dir, resume, args)
    if out_dir is not None:
        check_fresh(out_dir)
    return None


def _probes(trainer: DistillTrainer, pair: ModelPair, evaluation: TokenDataset, probe_data, every: int, out_dir, *,
            limit, template: str, max_length) -> Probes:
    """The probe callback, added to `trainer`: the held-out examples, or `probe_data` tokenized as the data is."""
    dataset = evaluation if probe_data is None else load_data(probe_data, pair.tokenizer, limit=limit, template=template,
                                                              max_length=pair.context(max_length))
    description = "the held-out examples" if probe_data is None else dataset.description
    probes = Probes(pair, dataset, every=every, path=expand(out_dir) / TRAJECTORY if out_dir else None,
                    k=trainer.args.log_fraction, temperature=trainer.kd.params["temperature"], description=description)
    trainer.add_callback(probes)
    return probes


def _config(output_dir: str, *, loss: str, steps: int, batch_size: int, learning_rate: float, seed: int,
            device: str, save_steps: int | None, progress: bool, **config) -> DistillConfig:
    """The Trainer's arguments for a distill run (cosine schedule, 5 % warm-up, about 50 log rows)."""
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    defaults = {"lr_scheduler_type": "cosine", "warmup_steps": max(1, steps // 20),
                "logging_steps": max(1, steps // 50), **saving}
    return DistillConfig(output_dir=output_dir, loss=loss, max_steps=steps, per_device_train_batch_size=batch_size,
                         per_device_eval_batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         disable_tqdm=not progress, use_cpu=device == "cpu", **{**defaults, **config})


def _train(trainer: DistillTrainer, pair: ModelPair, dataset: TokenDataset, out_dir, checkpoint) -> DistillResult:
    """Evaluate, train (Ctrl-C saves a checkpoint and stops when there is an `out_dir`), evaluate again."""
    evaluation = trainer.eval_dataset
    before = evaluation_before(trainer, evaluation, out_dir, resumed=checkpoint is not None)
    stopper = StopOnSignal()
    if out_dir is not None:  # with somewhere to save, Ctrl-C saves a checkpoint and stops
        trainer.add_callback(stopper)
    started = time.perf_counter()
    with stopper.catching() if out_dir is not None else nullcontext():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    barrier()  # the main process has marked the last checkpoint complete
    interrupted = stopper.stopped_at is not None
    after = None if interrupted else main_computes(trainer, lambda: trainer.score(evaluation))
    latest = (checkpoints(out_dir) or [None])[-1] if out_dir is not None else None
    args = trainer.args
    return DistillResult(args.loss, pair.teacher_name, pair.student_name, args.max_steps, before, after,
                         trainer.state.log_history, seconds, _settings(trainer, dataset, checkpoint),
                         str(out_dir) if out_dir else None, trainer.state.global_step, interrupted,
                         str(latest) if latest else None)


def _settings(trainer: DistillTrainer, dataset: TokenDataset, checkpoint) -> dict:
    """What metrics.json records about how the run was made."""
    args, run = trainer.args, run_settings(trainer.args)
    settings = {"loss_params": trainer.kd.params, "ce_weight": args.ce_weight,
                "batch_size": args.per_device_train_batch_size, "learning_rate": args.learning_rate,
                "seed": args.seed, "train_examples": len(trainer.train_examples),
                "eval_examples": len(trainer.eval_dataset), "data": dataset.description, "template": dataset.template,
                "fused_linear": trainer.use_linear, **run["layout"], "global_batch": run["global_batch"],
                "atkd_split": args.atkd_split, "keep_dropout": args.keep_dropout,
                "resumed_from_step": checkpoint_step(checkpoint) if checkpoint else None}
    if args.loss == "okd":
        settings.update(okd_base=args.okd_base, okd_rank=args.okd_rank, okd_pull=args.okd_pull,
                        adapter_parameters=sum(p.numel() for p in trainer.adapter.parameters()))
    if trainer.rollouts is not None:
        settings.update(on_policy=args.on_policy, seq_kd=args.seq_kd, rollout=args.rollout_sampling().as_dict(),
                        **trainer.rollouts.summary())
    return {**settings, **trainer.source.recorded()}
