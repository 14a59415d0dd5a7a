"""`DistillTrainer`: a transformers Trainer whose loss is a kdviz objective against a frozen teacher.

Per step it asks the teacher (`kdviz.teachers`: a live model, a top-k cache, or OKD's online
teacher) for its side of each micro-batch without gradients, then calls the fused-linear loss
(`KDLoss.linear`), so the full [B, T, V] logits are never built. It logs the KD loss, its hard
and easy parts, the cross-entropy and the mean teacher uncertainty.

Results do not depend on the layout: once per optimizer step, `get_batch_samples` prepares the
teacher's side of every micro-batch of the step, counts the target tokens of the global batch
(all processes, all accumulation steps) and gathers their teacher uncertainty (one float per
token). Each micro-batch's loss is then its exact share of the global batch's loss: means divide
by the global count, and ATKD's hard/easy threshold and group sizes are the global batch's
(`atkd_split="global"`; `"micro_batch"` is the official code's per-micro-batch split). The
student's dropout is off unless `keep_dropout`.

Trainer hooks kdviz overrides (written against transformers 5.6 to 5.25; `tests/test_train.py`
checks they are still there with these signatures): `get_batch_samples(epoch_iterator,
num_batches, device)`, `compute_loss`, `training_step`, `create_optimizer`, `log`,
`_save_checkpoint(model, trial)`, `_load_from_checkpoint(resume_from_checkpoint, model)`,
`_issue_warnings_after_load(load_result)`, and the attributes `model_accepts_loss_kwargs` and
`loss_is_scaled_for_ga`.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

from kdviz.cache.format import TeacherCache
from kdviz.data import collate, example_key, pad_id
from kdviz.distributed import barrier, world_size
from kdviz.losses import TokenSplit
from kdviz.models import head_is_linear
from kdviz.pair import ModelPair
from kdviz.teachers import CachedTeacher, LiveTeacher, Teacher, TeacherSide
from kdviz.train.checkpoints import write_mark
from kdviz.maths.crossloss import LossAcross
from kdviz.train.aligned import AlignedTeacher, teacher_fields
from kdviz.train.config import DistillConfig, global_batch
from kdviz.train.evaluate import EvalResult, evaluate_student
from kdviz.train.okd import OnlineTeacher, load_adapter, save_adapter
from kdviz.train.onpolicy import Rollouts


# transformers < 5.19 has no Trainer.loss_is_scaled_for_ga: its training_step divides the loss by the step's number of
# micro-batches, which kdviz's loss already accounts for; compute_loss multiplies by that number to undo it.
UNDO_GA_DIVISION = not hasattr(Trainer, "loss_is_scaled_for_ga")


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of `model` to 0 (nn.Dropout modules and the attention layers' floats)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention reads a float
            module.attention_dropout = 0.0


@dataclass
class Prepared:
    """One micro-batch as `get_batch_samples` leaves it for `compute_loss`."""

    input_ids: Tensor  # [B, T], to check that compute_loss gets the batch prepared for it
    side: TeacherSide  # the teacher's side: uncertainty of the targets, hidden states or cached rows
    split: TokenSplit | None = None  # the split ATKD uses for this micro-batch (None for other objectives)


@dataclass
class Window:
    """What every micro-batch of one optimizer step shares."""

    num_items: int  # target tokens of the global batch: all processes, all micro-batches
    log_split: TokenSplit  # hard/easy split of the global batch for the logged parts
    world: int  # processes; DDP averages their gradients, so each one's loss is scaled by this


def gather_tokens(values: Tensor, micro_batches: int) -> tuple[Tensor, int]:
    """(every process's `values` [N_r] concatenated, micro-batches summed over processes); one process: as given."""
    world = world_size()
    if world == 1:
        return values, micro_batches
    sizes = [torch.zeros(2, dtype=torch.long, device=values.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(values), micro_batches], device=values.device))
    longest = max(int(size[0]) for size in sizes)
    padded = [torch.zeros(longest, dtype=values.dtype, device=values.device) for _ in range(world)]
    dist.all_gather(padded, F.pad(values, (0, longest - len(values))))
    return (torch.cat([part[: int(size[0])] for part, size in zip(padded, sizes)]),
            sum(int(size[1]) for size in sizes))


def untied_missing_keys(model, missing_keys) -> list[str]:
    """The keys of `missing_keys` that are really missing: not names of a parameter shared with another name."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    shared = {name for group in names.values() if len(group) > 1 for name in group}
    return [key for key in missing_keys if key not in shared]


def scaled_split(split: TokenSplit, micro_batches: int) -> TokenSplit:
    """A micro-batch's own split with its group sizes x `micro_batches`: its ATKD loss weighted 1 / micro_batches."""
    return TokenSplit(split.threshold, split.n_hard * micro_batches, split.n_easy * micro_batches)


class ExampleStream(torch.utils.data.Dataset):
    """The training examples as one stream, epoch after epoch (each shuffled with the seed and its number), cut
    to `length` items: read in order, optimizer step s takes items [s * G, (s + 1) * G) for a global batch of G.

    With the whole stream read in order, how the global batch is cut (processes x batch x accumulation: the
    Trainer's loader hands process p every P-th micro-batch) never changes which examples a step sees, for any
    number of examples: no last batch of an epoch is short or padded with repeats.
    """

    def __init__(self, dataset, *, length: int, seed: int):
        self.dataset, self.length, self.seed, self._orders = dataset, length, seed, {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        epoch, position = divmod(index, len(self.dataset))
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders[epoch] = torch.randperm(len(self.dataset), generator=generator).tolist()
        return self.dataset[self._orders[epoch][position]]


def batch_dict(examples, pad: int) -> dict[str, Tensor]:
    """The Trainer's batch: padded ids, mask, labels, each example's key (finds its rows in a teacher cache), and
    for examples across tokenizers the teacher's ids and the aligned groups."""
    batch = collate(examples, pad_id=pad)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
            "cache_key": torch.tensor([example_key(ex) for ex in examples]), **teacher_fields(examples)}


class DistillTrainer(Trainer):
    """A `Trainer` whose loss is a kdviz objective against a frozen teacher (see the module doc).

    >>> from kdviz import zoo
    >>> from kdviz.data import load_data
    >>> tokenizer = zoo.load_tokenizer()
    >>> data = load_data("zoo:docstrings", tokenizer, max_length=256, limit=8)
    >>> args = DistillConfig(output_dir="/tmp/kdviz-doctest", loss="atkd", max_steps=2,
    ...                      per_device_train_batch_size=4, disable_tqdm=True, use_cpu=True)
    >>> trainer = DistillTrainer(model=zoo.load("student")[0], teacher=zoo.load("teacher-s")[0], args=args,
    ...                          train_dataset=data, processing_class=tokenizer)
    >>> trainer.train().global_step  # doctest: +ELLIPSIS
    {...'train_loss'...}
    2
    """

    def __init__(self, *args, teacher=None, teacher_cache: TeacherCache | None = None, source: Teacher | None = None,
                 vocab_size: int | None = None, generation_context: int | None = None, **kwargs):
        if not isinstance(kwargs.get("args"), DistillConfig):
            raise ValueError("DistillTrainer needs args=DistillConfig(...) (it carries the loss settings).")
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None:
            raise ValueError("DistillTrainer needs processing_class=<the shared tokenizer> (for padding and ROUGE-L).")
        if sum(x is not None for x in (teacher, teacher_cache, source)) != 1:
            raise ValueError("DistillTrainer needs one of teacher=<a model>, teacher_cache=<a TeacherCache> or "
                             "source=<a kdviz.teachers.Teacher>.")
        pad = pad_id(tokenizer)
        kwargs.setdefault("data_collator", lambda examples: batch_dict(examples, pad))
        config, self.train_examples = kwargs["args"], kwargs.get("train_dataset")
        if kwargs.get("train_dataset") is not None and config.max_steps > 0:  # a stream of exactly the steps' batches
            kwargs["train_dataset"] = ExampleStream(kwargs["train_dataset"], length=config.max_steps * global_batch(config),
                                                    seed=config.seed)
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True  # each micro-batch's loss is already its share of the global batch
        if not self.args.keep_dropout:
            disable_dropout(self.model)
        self.vocab_size = vocab_size or len(tokenizer)
        self.kd = self.args.kd_loss()
        self.run_inputs: dict | None = None  # what the run was made from (see `run_inputs`), kept in checkpoints
        if source is None:
            source = CachedTeacher(teacher_cache) if teacher_cache is not None else LiveTeacher(
                teacher.to(self.args.device).eval().requires_grad_(False), vocab_size=self.vocab_size)
        self.source, self.adapter = self._online(source)
        self.teacher = self.source.module  # the teacher model (None when it is read from a top-k cache)
        self.rollouts = self._rollouts(pad, generation_context)
        self.use_linear = self._check_paths()
        self._pending: deque[Prepared] = deque()
        self._window: Window | None = None
        self._sums: dict[str, float] = {}  # logged parts summed over the micro-batches since the last log
        self._steps = 0  # optimizer steps (windows) since the last log

    def _get_train_sampler(self, *args, **kwargs):
        if isinstance(self.train_dataset, ExampleStream):  # already shuffled, epoch by epoch: read it in order
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    def _online(self, source: Teacher):
        """(the teacher as the loss sees it, OKD's adapter or None); checks that the data fits a cached teacher."""
        if isinstance(self.kd, LossAcross) != isinstance(source, AlignedTeacher):
            raise ValueError(f"loss={self.args.loss!r} does not fit the teacher {source.name}: uld and gold need a "
                             "teacher with its own tokenizer (source=kdviz.train.aligned.AlignedTeacher(...)), the "
                             "other losses a teacher that shares the student's.")
        if self.train_examples is not None:
            source.check_data(self.train_examples, self.processing_class, temperature=self.kd.params["temperature"])
        if self.args.loss != "okd":
            return source, None
        if source.module is None:
            raise ValueError("OKD adapts the teacher's final hidden state, which a top-k cache does not hold; run OKD "
                             "with the live teacher (--teacher instead of --teacher-cache).")
        online = OnlineTeacher(source, rank=self.args.okd_rank, pull=self.args.okd_pull, device=self.args.device)
        return online, online.adapter

    def _rollouts(self, pad: int, context: int | None) -> Rollouts | None:
        """On-policy / sequence-KD responses (None when the run trains on the data's responses only)."""
        args = self.args
        if not (args.on_policy > 0 or args.seq_kd):
            return None
        if self.teacher is None:
            raise ValueError("On-policy distillation and sequence KD train on newly generated responses, which only the "
                             "live teacher can score: a top-k teacher cache holds the teacher on the data's own tokens. "
                             "Give the teacher model (--teacher) instead of --teacher-cache.")
        template = getattr(self.train_examples, "template", None)
        return Rollouts(on_policy=args.on_policy, seq_kd=args.seq_kd, sampling=args.rollout_sampling(),
                        tokenizer=self.processing_class, template=template, context=context, pad=pad)

    def _check_paths(self) -> bool:
        """Whether the fused-linear path is used; ValueError when a teacher needs it and the models do not allow it."""
        probe = torch.arange(min(8, self.vocab_size), device=self.args.device)[None]
        linear_heads = all(head_is_linear(m, probe) for m in (self.model, self.teacher) if m is not None)
        if self.source.top_k is not None and not (linear_heads and self.args.fused_linear):
            raise ValueError("Distilling from a teacher cache needs a student whose LM head is a plain linear layer and "
                             "fused_linear=True; distil this student with the live teacher.")
        if self.adapter is not None and not linear_heads:
            raise ValueError("OKD adapts the teacher's final hidden state, so both models need a plain linear LM head "
                             "(no logit soft-capping or scaling); use another loss with these models.")
        return self.args.fused_linear and linear_heads

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.adapter is not None and not any(p is self.adapter.up.weight for g in optimizer.param_groups
                                                for p in g["params"]):
            optimizer.add_param_group({"params": list(self.adapter.parameters()), "weight_decay": 0.0,
                                       "lr": self.args.okd_learning_rate or self.args.learning_rate})
        return optimizer

    @contextmanager
    def _at_step(self):
        """ValueErrors (bad logits, no targets) say at which step they happened, and whether training diverged."""
        try:
            yield
        except ValueError as err:
            raise ValueError(f"Step {self.state.global_step}: {self._diverged() or err}") from err

    def _diverged(self) -> str | None:
        """What to say when the trained weights hold NaN or infinity (an update blew them up), else None."""
        trained = [*self.model.parameters(), *(self.adapter.parameters() if self.adapter is not None else ())]
        if all(bool(torch.isfinite(p).all()) for p in trained):
            return None
        okd = f", OKD adapter {self.args.okd_learning_rate}" if self.adapter is not None else ""
        return (f"training diverged: the {'student or OKD adapter' if okd else 'student'} weights are NaN or infinite "
                f"after {self.state.global_step} optimizer step(s) (learning rate {self.args.learning_rate}{okd}, "
                f"weight decay {self.args.weight_decay}). Lower the learning rate (CLI: --lr) and start again.")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.adapter is not None:  # a new optimizer step: the Trainer zeroes only the student's gradients
            self.adapter.zero_grad(set_to_none=True)
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = [self._prepare_inputs(batch) for batch in batches]
        if batches and self.rollouts is not None:
            batches = self._rollout(batches)
        if batches:
            self._prepare_window(batches)
        return batches, num_items

    def _rollout(self, batches: list[dict]) -> list[dict]:
        """The step's micro-batches with generated responses (see `kdviz.train.onpolicy`), and what it cost."""
        pad = pad_id(self.processing_class)
        batches = self.rollouts.rewrite(batches, step=self.state.global_step, seed=self.args.seed,
                                        student=self.accelerator.unwrap_model(self.model), teacher=self.teacher,
                                        collate=lambda examples: batch_dict(examples, pad))
        done, world = self.rollouts.history[-1], world_size()
        self._record(on_policy=float(done.writer == "student") / world, seq_kd=float(done.writer == "teacher") / world,
                     rollout_seconds=done.seconds / world, rollout_tokens=float(done.response_tokens),
                     rollout_responses=float(done.responses))
        return batches

    def _prepare_window(self, batches: list[dict]) -> None:
        """Prepare the teacher's side of every micro-batch of one optimizer step and fix the step's normalisation.

        Counts the target tokens of the global batch and gathers their teacher uncertainty across
        processes: means divide by the global count; ATKD's split and the logged hard/easy split
        use the global threshold (atkd_split='micro_batch': each micro-batch's own, its loss
        weighted 1 / the number of micro-batches of all processes).
        """
        with self._at_step():
            prepared = [Prepared(b["input_ids"], self.source.prepare(self.kd, b, linear=self.use_linear))
                        for b in batches]
        unc, micro_batches = gather_tokens(torch.cat([p.side.unc for p in prepared]), len(prepared))
        log_split = TokenSplit.over(unc, self.args.log_fraction)
        if self.kd.self_normalised:
            for p in prepared:
                p.split = log_split if self.args.atkd_split == "global" else scaled_split(
                    TokenSplit.over(p.side.unc, self.kd.params["k"]), micro_batches)
        self._window = Window(len(unc), log_split, world_size())
        self._pending = deque(prepared)
        self._steps += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        in_loop = bool(self._pending)  # prepared by get_batch_samples: called by the Trainer's training_step
        if not in_loop:  # called outside the training loop: this batch alone is the global batch
            self._prepare_window([inputs])
        prepared, window = self._pending.popleft(), self._window
        if not torch.equal(prepared.input_ids, inputs["input_ids"]):
            raise RuntimeError("DistillTrainer.compute_loss got another batch than get_batch_samples prepared for it; "
                               "call it with the micro-batches in the order get_batch_samples returned them.")
        with self._at_step():
            parts = self.source.loss(self.kd, model, prepared.side, inputs, linear=self.use_linear,
                                     ce_weight=self.args.ce_weight + self.kd.ce_weight, num_items=window.num_items,
                                     split=prepared.split)
        if not torch.isfinite(parts.kd) or not torch.isfinite(parts.ce):
            raise ValueError(f"Step {self.state.global_step}: " + (self._diverged() or (
                f"the loss is not finite (kd={float(parts.kd)}, ce={float(parts.ce)}). Check the teacher's outputs for "
                f"NaN/inf (fp16 overflow), or lower the learning rate (now {self.args.learning_rate}).")))
        hard, easy = parts.hard_easy(self.args.log_fraction, split=window.log_split)
        self._record(kd=float(parts.kd), kd_hard=hard, kd_easy=easy, ce=float(parts.ce),
                     unc=float(parts.unc.sum()) / window.num_items, **parts.logs)
        loss = parts.loss * window.world  # DDP averages the processes' gradients
        if UNDO_GA_DIVISION and in_loop:
            loss = loss * self.current_gradient_accumulation_steps
        return (loss, None) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.adapter is not None and world_size() > 1 and self.accelerator.sync_gradients:
            for parameter in self.adapter.parameters():  # the adapter is not DDP-wrapped: average its gradients here
                dist.all_reduce(parameter.grad)
                parameter.grad /= world_size()
        return loss

    def _record(self, **values: float) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._sums:
            logs.update(self._logged_parts())
        super().log(logs, start_time)

    def _logged_parts(self) -> dict[str, float]:
        """The recorded parts summed over micro-batches and processes, averaged over the steps since the last log."""
        keys = list(self._sums)
        totals = torch.tensor([self._sums[key] for key in keys], dtype=torch.float64, device=self.args.device)
        if world_size() > 1:
            dist.all_reduce(totals)  # Trainer.log runs on every process
        steps, self._steps = max(1, self._steps), 0
        self._sums.clear()
        return {key: float(total) / steps for key, total in zip(keys, totals)}

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
        barrier()  # every process has written its part (its RNG state)
        if self.args.should_save:
            if self.adapter is not None:
                save_adapter(self.adapter, folder)
            write_mark(folder, self.args, self.run_inputs)

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied LM head is not saved (safetensors keeps one copy), so the Trainer warns that it is
        # "missing" on every resume of a GPT-2 or Llama with tied embeddings; it is there, tied.
        missing = untied_missing_keys(self.accelerator.unwrap_model(self.model), load_result.missing_keys)
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.adapter is not None:
            load_adapter(self.adapter, Path(resume_from_checkpoint), device=self.args.device)

    def score(self, dataset) -> EvalResult:
        """`evaluate_student` on `dataset` with this trainer's models and evaluation settings."""
        student = self.accelerator.unwrap_model(self.model)
        across = getattr(self.source, "tokenizer", None)  # a teacher with its own tokenizer (AlignedTeacher)
        pair = ModelPair(self.teacher, student, self.processing_class, vocab_size=self.vocab_size, source=self.source,
                         teacher_tokenizer=across, vocabulary=getattr(self.source, "vocabulary", None) if across else None)
        return evaluate_student(pair, dataset, batch_size=self.args.per_device_eval_batch_size,
                                generate_examples=self.args.eval_generate_examples,
                                max_new_tokens=self.args.eval_generate_tokens)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("No eval_dataset: pass one to DistillTrainer or to evaluate().")
        result = self.score(dataset)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in asdict(result).items() if v is not None}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
