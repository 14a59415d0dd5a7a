"""Short distillation fine-tunes: `DistillConfig`, `DistillTrainer`, OKD's online adapter, `distill`.

`DistillTrainer` is a transformers `Trainer` (launch it with torchrun or accelerate for DDP).
Per step it runs the frozen teacher without gradients, takes both models' final hidden
states, and calls the fused-linear loss (`KDLoss.linear`), so the full [B, T, V] logits are
never built. It logs the KD loss, its hard and easy parts, the cross-entropy and the mean
teacher uncertainty.

Results do not depend on the layout (DESIGN.md): once per optimizer step, `get_batch_samples`
runs the teacher on every micro-batch of the step, counts the target tokens of the global
batch (all processes, all accumulation steps) and gathers their teacher uncertainty (one float
per token). Each micro-batch's loss is then its exact share of the global batch's loss: means
divide by the global count, and ATKD's hard/easy threshold and group sizes are the global
batch's (`atkd_split="global"`; `"micro_batch"` is the official code's per-micro-batch split).
The student's dropout is off unless `keep_dropout`.

OKD (kdviz's reading of Rao et al., arXiv 2409.12512; the paper's module details are not
public): the teacher stays frozen; a low-rank residual adapter on its final hidden state is
trained at the same steps on cross-entropy to the labels plus `okd_pull` x KL(adapted teacher
|| current student), and the student distils from the adapted teacher with `okd_base`.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from kdviz.data import IGNORE_INDEX, TokenDataset, collate, pad_id
from kdviz.decompose import check_count
from kdviz.distributed import barrier, broadcast
from kdviz.files import (TEMP_MARK, changed_file, check_writable, expand, file_checksums, staged_folder, write_text,
                         write_with)
from kdviz.teacher_cache import CachedPair, TeacherCache, example_key
from kdviz.losses import OBJECTIVES, TokenSplit, TopKRows, get_loss
from kdviz.models import ModelPair, final_hidden, head_is_linear, model_logits, output_head

LOSSES = (*OBJECTIVES, "okd")
ATKD_SPLITS = ("global", "micro_batch")
CHECKPOINT_MARK = "kdviz_checkpoint.json"  # written last: a checkpoint folder with it is complete
ADAPTER_WEIGHTS = "okd_adapter.safetensors"
EVAL_BEFORE = "eval_before.json"  # the evaluation before training, reused when a run resumes


@dataclass
class DistillConfig(TrainingArguments):
    """Training arguments plus the distillation settings (all validated in `__post_init__`)."""

    loss: str = field(default="atkd", metadata={"help": f"KD objective: one of {', '.join(LOSSES)}."})
    loss_params: dict = field(default_factory=dict, metadata={
        "help": "Parameters of the objective, e.g. {'lam': 0.2, 'k': 0.5} for atkd (see kdviz.losses.OBJECTIVES)."})
    ce_weight: float = field(default=0.0, metadata={
        "help": "Weight of the student's cross-entropy on the labels, added to the KD loss (>= 0)."})
    hard_fraction: float = field(default=0.5, metadata={
        "help": "Fraction of tokens counted as hard when the KD loss is logged as hard and easy parts, in (0, 1]. "
                "ATKD uses its own k for the loss itself."})
    fused_linear: bool = field(default=True, metadata={
        "help": "Compute the loss from hidden states and LM-head weights without building the logits. Falls back "
                "to full logits for models whose head is not a plain linear layer (e.g. logit soft-capping)."})
    okd_base: str = field(default="fkl", metadata={"help": "OKD: the objective the student distils with."})
    okd_rank: int = field(default=8, metadata={"help": "OKD: rank of the teacher's online adapter (>= 1)."})
    okd_pull: float = field(default=1.0, metadata={
        "help": "OKD: weight of KL(adapted teacher || student) in the adapter's loss (>= 0)."})
    okd_learning_rate: float | None = field(default=None, metadata={
        "help": "OKD: the adapter's learning rate (default: learning_rate)."})
    atkd_split: str = field(default="global", metadata={
        "help": "ATKD: where the hard/easy threshold and group sizes come from. 'global': the whole global batch "
                "(every process and accumulation step), so the result does not depend on how the batch is cut. "
                "'micro_batch': each micro-batch on its own, as the official ATKD code; the loss is then the mean "
                "of the micro-batches' losses and changes with batch size, processes and accumulation."})
    keep_dropout: bool = field(default=False, metadata={
        "help": "Keep the student's dropout while distilling. Off by default (as TRL's disable_dropout), so runs "
                "are reproducible and layouts comparable."})
    eval_generate_examples: int = field(default=16, metadata={
        "help": "Instruction examples whose greedy continuations are scored with ROUGE-L at evaluation (0: none)."})
    eval_generate_tokens: int = field(default=48, metadata={"help": "Most new tokens per greedy continuation."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kdviz batches carry their own fields."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (default: none)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP: search the autograd graph for unused parameters every step. Off by default: every student "
                "parameter takes part in the KD loss (the head through the fused-linear path), and the search "
                "costs a graph traversal per step. Turn it on for a student whose forward leaves parameters out."})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}.")
        checks = [("ce_weight", self.ce_weight >= 0, ">= 0"), ("hard_fraction", 0 < self.hard_fraction <= 1, "in (0, 1]"),
                  ("okd_rank", self.okd_rank >= 1, ">= 1"), ("okd_pull", self.okd_pull >= 0, ">= 0"),
                  ("okd_base", self.okd_base in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
                  ("atkd_split", self.atkd_split in ATKD_SPLITS, f"one of {', '.join(map(repr, ATKD_SPLITS))}"),
                  ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1"),
                  ("eval_generate_examples", self.eval_generate_examples >= 0, ">= 0"),
                  ("eval_generate_tokens", self.eval_generate_tokens >= 1, ">= 1")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)!r} is not allowed; it must be {allowed}.")
        try:
            self.kd_loss()  # validates loss_params (ValueError naming what is allowed)
        except ValueError as err:
            if self.loss != "okd":
                raise
            raise ValueError(f"loss='okd' distils with okd_base={self.okd_base!r}, so its parameters are that "
                             f"loss's: {err}") from None
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"The learning rate must be a number > 0, got {self.learning_rate!r} (CLI: --lr).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"The seed must be an integer in [0, 2**32), got {self.seed!r} (CLI: --seed).")
        super().__post_init__()

    def kd_loss(self):
        """The configured objective (for OKD, its base objective)."""
        return get_loss(self.okd_base if self.loss == "okd" else self.loss, **self.loss_params)

    @property
    def log_fraction(self) -> float:
        """Fraction of hard tokens in the logged split (ATKD's own k when the loss is ATKD)."""
        return self.kd_loss().params.get("k", self.hard_fraction)


class OnlineAdapter(nn.Module):
    """h + up(down(h)): a low-rank residual on the teacher's final hidden state (starts as identity)."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden + self.up(self.down(hidden))  # (B, T, H)


@dataclass
class EvalResult:
    """Held-out student loss, top-1 agreement with the teacher, ROUGE-L of greedy continuations."""

    loss: float
    agreement: float
    rouge_l: float | None  # None when the data has no prompt/response examples
    tokens: int


def _prompt_and_reference(example) -> tuple[list[int], list[int]] | None:
    """Split an instruction example at its first target: (prompt ids, response ids)."""
    targets = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    if not targets or targets[0] == 0:
        return None
    return example.input_ids[: targets[0]], [example.labels[i] for i in targets]


@torch.no_grad()
def rouge_l(student, tokenizer, examples, *, max_new_tokens: int) -> float | None:
    """Mean ROUGE-L F1 of the student's greedy continuations of the prompts against the responses."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    device = next(student.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    for example in examples:
        split = _prompt_and_reference(example)
        if split is None:
            continue
        prompt, reference = split
        ids = torch.tensor([prompt], device=device)
        out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max(1, min(max_new_tokens, len(reference))), pad_token_id=pad)
        text = tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
        scores.append(scorer.score(tokenizer.decode(reference, skip_special_tokens=True), text)["rougeL"].fmeasure)
    return sum(scores) / len(scores) if scores else None


def evaluate_student(pair: ModelPair, dataset, *, batch_size: int = 8, generate_examples: int = 16,
                     max_new_tokens: int = 48) -> EvalResult:
    """Score the pair's student on held-out examples (the teacher is the reference for agreement)."""
    was_training = pair.student.training
    pair.student.eval()
    loss_sum, agree, count = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        examples = list(dataset[start : start + batch_size])
        batch = collate(examples, pad_id=pad_id(pair.tokenizer))
        ids, mask = batch.input_ids.to(pair.device), batch.attention_mask.to(pair.device)
        labels = batch.labels[:, 1:].to(pair.device)
        valid = labels != IGNORE_INDEX
        if isinstance(pair, CachedPair):  # the teacher's top-1 of every target, from its cache
            with torch.no_grad():
                student = model_logits(pair.student, ids, mask)[:, :-1, : pair.vocab_size]
            teacher_top1 = pair.cache.rows_for(examples).ids[:, 0].to(pair.device)
        else:
            teacher, student = pair.logits(ids, mask)
            teacher, student = teacher[:, :-1], student[:, :-1]  # position t predicts label t + 1
            teacher_top1 = teacher[valid].argmax(-1)
        loss_sum += float(F.cross_entropy(student[valid].float(), labels[valid], reduction="sum"))
        agree += int((student[valid].argmax(-1) == teacher_top1).sum())
        count += int(valid.sum())
    examples = list(dataset)[:generate_examples]
    score = rouge_l(pair.student, pair.tokenizer, examples, max_new_tokens=max_new_tokens) if examples else None
    pair.student.train(was_training)
    return EvalResult(loss_sum / max(1, count), agree / max(1, count), score, count)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability of `model` to 0 (nn.Dropout modules and the attention layers' floats)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style attention reads a float
            module.attention_dropout = 0.0


@dataclass
class _Prepared:
    """One micro-batch as `get_batch_samples` leaves it for `compute_loss`."""

    input_ids: Tensor  # [B, T], to check that compute_loss gets the batch prepared for it
    teacher_hidden: Tensor | None  # [B, T-1, H_t] teacher's final hidden states (before OKD's adapter); None: logits path
    unc: Tensor  # [N] (adapted) teacher uncertainty of the targets
    split: TokenSplit | None = None  # the split ATKD uses for this micro-batch (None for other objectives)
    cached: TopKRows | None = None  # the teacher read from a top-k cache (then teacher_hidden is None)


@dataclass
class _Window:
    """What every micro-batch of one optimizer step shares."""

    num_items: int  # target tokens of the global batch: all processes, all micro-batches
    log_split: TokenSplit  # hard/easy split of the global batch for the logged parts
    world: int  # processes; DDP averages their gradients, so each one's loss is scaled by this


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_tokens(values: Tensor, micro_batches: int) -> tuple[Tensor, int]:
    """(every process's `values` [N_r] concatenated, micro-batches summed over processes); one process: as given."""
    world = _world_size()
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

    def __init__(self, *args, teacher=None, teacher_cache: TeacherCache | None = None, vocab_size: int | None = None,
                 **kwargs):
        if not isinstance(kwargs.get("args"), DistillConfig):
            raise ValueError("DistillTrainer needs args=DistillConfig(...) (it carries the loss settings).")
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None:
            raise ValueError("DistillTrainer needs processing_class=<the shared tokenizer> (for padding and ROUGE-L).")
        pad = pad_id(tokenizer)
        kwargs.setdefault("data_collator", lambda examples: _batch_dict(examples, pad))
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True  # each micro-batch's loss is already its share of the global batch
        if not self.args.keep_dropout:
            disable_dropout(self.model)
        if (teacher is None) == (teacher_cache is None):
            raise ValueError("DistillTrainer needs teacher=<a model> or teacher_cache=<a TeacherCache> (one of them).")
        self.teacher = None if teacher is None else teacher.to(self.args.device).eval().requires_grad_(False)
        self.cache = teacher_cache
        self.run_inputs: dict | None = None  # what the run was made from (see `run_inputs`), kept in checkpoints
        self.vocab_size = vocab_size or len(tokenizer)
        self.kd = self.args.kd_loss()
        if teacher_cache is not None:
            self._check_cache(teacher_cache)
        self.adapter = None
        if self.args.loss == "okd":
            self.adapter = OnlineAdapter(teacher.get_output_embeddings().weight.shape[1], self.args.okd_rank)
            self.adapter.to(self.args.device)
            for parameter in self.adapter.parameters() if _world_size() > 1 else ():
                dist.broadcast(parameter.data, 0)  # every process starts from rank 0's adapter, as DDP does
            self.pull = get_loss("rkl")  # with the adapter in the student's seat: KL(adapted || student)
        self._pending: deque[_Prepared] = deque()
        self._window: _Window | None = None
        self._sums: dict[str, float] = {}  # logged parts summed over the micro-batches since the last log
        self._steps = 0  # optimizer steps (windows) since the last log
        probe = torch.arange(min(8, self.vocab_size), device=self.args.device)[None]
        linear_heads = all(head_is_linear(m, probe) for m in (self.model, self.teacher) if m is not None)
        if self.cache is not None and not (linear_heads and self.args.fused_linear):
            raise ValueError("Distilling from a teacher cache needs a student whose LM head is a plain linear layer and "
                             "fused_linear=True; distil this student with the live teacher.")
        if self.adapter is not None and not linear_heads:
            raise ValueError("OKD adapts the teacher's final hidden state, so both models need a plain linear LM head "
                             "(no logit soft-capping or scaling); use another loss with these models.")
        self.use_linear = self.args.fused_linear and linear_heads

    def _check_cache(self, cache: TeacherCache) -> None:
        if self.args.loss == "okd":
            raise ValueError("OKD adapts the teacher's final hidden state, which a top-k cache does not hold; run OKD "
                             "with the live teacher (--teacher instead of --teacher-cache).")
        if float(self.kd.params["temperature"]) != cache.meta["temperature"]:
            raise ValueError(f"The teacher cache {cache.folder} holds the teacher at temperature "
                             f"{cache.meta['temperature']}, the loss uses {self.kd.params['temperature']}; make a cache "
                             "at the loss's temperature.")

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.adapter is not None and not any(p is self.adapter.up.weight for g in optimizer.param_groups
                                                for p in g["params"]):
            optimizer.add_param_group({"params": list(self.adapter.parameters()), "weight_decay": 0.0,
                                       "lr": self.args.okd_learning_rate or self.args.learning_rate})
        return optimizer

    @contextmanager
    def _at_step(self):
        """ValueErrors (bad logits, no targets) say at which step they happened."""
        try:
            yield
        except ValueError as err:
            raise ValueError(f"Step {self.state.global_step}: {err}") from err

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.adapter is not None:  # a new optimizer step: the Trainer zeroes only the student's gradients
            self.adapter.zero_grad(set_to_none=True)
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        batches = [self._prepare_inputs(batch) for batch in batches]
        if batches:
            self._prepare_window(batches)
        return batches, num_items

    def _prepare_window(self, batches: list[dict]) -> None:
        """Run the teacher on every micro-batch of one optimizer step and fix the step's normalisation.

        Counts the target tokens of the global batch and gathers their teacher uncertainty across
        processes: means divide by the global count; ATKD's split and the logged hard/easy split
        use the global threshold (atkd_split='micro_batch': each micro-batch's own, its loss
        weighted 1 / the number of micro-batches of all processes).
        """
        with self._at_step():
            prepared = [self._teacher_side(batch) for batch in batches]
        unc, micro_batches = gather_tokens(torch.cat([p.unc for p in prepared]), len(prepared))
        log_split = TokenSplit.over(unc, self.args.log_fraction)
        if self.kd.objective.self_normalised:
            for p in prepared:
                p.split = log_split if self.args.atkd_split == "global" else _scaled_split(
                    TokenSplit.over(p.unc, self.kd.params["k"]), micro_batches)
        self._window = _Window(len(unc), log_split, _world_size())
        self._pending = deque(prepared)
        self._steps += 1

    @torch.no_grad()
    def _teacher_side(self, batch: dict) -> _Prepared:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        if self.cache is not None:  # the teacher from disk: its rows for these examples, in batch order
            cached = self.cache.rows_for_keys(batch["cache_key"].tolist()).topk()
            cached = TopKRows(*(t.to(ids.device) for t in cached))
            return _Prepared(ids, None, cached.uncertainty(), cached=cached)
        if self.use_linear:
            hidden = final_hidden(self.teacher, ids, mask)[:, :-1]  # position t predicts label t + 1
            head, bias = output_head(self.teacher, self.vocab_size)
            scored = hidden if self.adapter is None else self._adapted(hidden)
            return _Prepared(ids, hidden, self.kd.uncertainty(scored, labels, teacher_head=head, teacher_bias=bias))
        logits = model_logits(self.teacher, ids, mask)[:, :-1, : self.vocab_size]  # not kept: [B, T, V] per micro-batch
        return _Prepared(ids, None, self.kd.uncertainty(logits, labels))

    def _adapted(self, hidden: Tensor) -> Tensor:
        return self.adapter(hidden.float()).to(hidden.dtype)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._pending:  # called outside the training loop: this batch alone is the global batch
            self._prepare_window([inputs])
        prepared = self._pending.popleft()
        if not torch.equal(prepared.input_ids, inputs["input_ids"]):
            raise RuntimeError("DistillTrainer.compute_loss got another batch than get_batch_samples prepared for it; "
                               "call it with the micro-batches in the order get_batch_samples returned them.")
        window = self._window
        options = dict(num_items=window.num_items, split=prepared.split, teacher_unc=prepared.unc)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"][:, 1:]
        with self._at_step():
            if prepared.cached is not None:
                s_hidden = final_hidden(model, ids, mask)[:, :-1]  # position t predicts label t + 1
                s_head, s_bias = output_head(self.accelerator.unwrap_model(model), self.vocab_size)
                parts, extra = self.kd.linear_cached(s_hidden, s_head, prepared.cached, labels,
                                                     ce_weight=self.args.ce_weight, student_bias=s_bias,
                                                     num_items=options["num_items"], split=options["split"]), 0.0
            elif self.use_linear:
                parts, extra = self._linear_parts(model, ids, mask, labels, prepared.teacher_hidden, options)
            else:  # the models' own logits (soft-capped or scaled heads)
                with torch.no_grad():
                    t_logits = model_logits(self.teacher, ids, mask)[:, :-1, : self.vocab_size]
                s_logits = model_logits(model, ids, mask)[:, :-1, : self.vocab_size]  # position t predicts t + 1
                parts, extra = self.kd.parts(s_logits, t_logits, labels, ce_weight=self.args.ce_weight, **options), 0.0
        if not torch.isfinite(parts.kd) or not torch.isfinite(parts.ce):
            raise ValueError(
                f"Step {self.state.global_step}: the loss is not finite (kd={float(parts.kd)}, ce={float(parts.ce)}). "
                "Check the teacher's outputs for NaN/inf (fp16 overflow), or lower the learning rate "
                f"(now {self.args.learning_rate})."
            )
        hard, easy = parts.hard_easy(self.args.log_fraction, split=window.log_split)
        self._record(kd=float(parts.kd), kd_hard=hard, kd_easy=easy, ce=float(parts.ce),
                     unc=float(parts.unc.sum()) / window.num_items)
        loss = (parts.loss + extra) * window.world  # DDP averages the processes' gradients
        return (loss, None) if return_outputs else loss

    def _linear_parts(self, model, ids: Tensor, mask: Tensor, labels: Tensor, t_hidden: Tensor, options: dict):
        """(student LossParts, adapter loss or 0) from final hidden states and LM heads."""
        t_head, t_bias = output_head(self.teacher, self.vocab_size)
        s_hidden = final_hidden(model, ids, mask)[:, :-1]
        s_head, s_bias = output_head(self.accelerator.unwrap_model(model), self.vocab_size)
        extra = 0.0
        if self.adapter is not None:
            adapted = self._adapted(t_hidden)
            pull = self.pull.linear(adapted, t_head, s_hidden.detach(), s_head.detach(), labels, ce_weight=1.0,
                                    kd_weight=self.args.okd_pull, student_bias=t_bias, teacher_bias=s_bias,
                                    num_items=options["num_items"])
            self._record(adapter_ce=float(pull.ce), adapter_pull=float(pull.kd))
            extra, t_hidden = pull.loss, adapted.detach()
        parts = self.kd.linear(s_hidden, s_head, t_hidden, t_head, labels, ce_weight=self.args.ce_weight,
                               student_bias=s_bias, teacher_bias=t_bias, **options)
        return parts, extra

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.adapter is not None and _world_size() > 1 and self.accelerator.sync_gradients:
            for parameter in self.adapter.parameters():  # the adapter is not DDP-wrapped: average its gradients here
                dist.all_reduce(parameter.grad)
                parameter.grad /= _world_size()
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
        if _world_size() > 1:
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
                from safetensors.torch import save_file

                weights = {key: value.contiguous() for key, value in self.adapter.state_dict().items()}
                write_with(folder / ADAPTER_WEIGHTS, lambda temp: save_file(weights, str(temp)), what="OKD adapter")
            files = file_checksums(path for path in sorted(folder.iterdir())  # about 1 s per GB
                                   if path.is_file() and path.name != CHECKPOINT_MARK and TEMP_MARK not in path.name)
            mark = {**run_settings(self.args), "inputs": self.run_inputs, "files": files}
            write_text(folder / CHECKPOINT_MARK, json.dumps(mark, indent=2), what="checkpoint mark")

    def _issue_warnings_after_load(self, load_result) -> None:
        # A tied LM head is not saved (safetensors keeps one copy), so the Trainer warns that it is
        # "missing" on every resume of a GPT-2 or Llama with tied embeddings; it is there, tied.
        missing = untied_missing_keys(self.accelerator.unwrap_model(self.model), load_result.missing_keys)
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.adapter is not None:
            from safetensors.torch import load_file

            path = Path(resume_from_checkpoint) / ADAPTER_WEIGHTS
            if not path.is_file():
                raise ValueError(f"The checkpoint {resume_from_checkpoint} has no OKD adapter ({ADAPTER_WEIGHTS}): it "
                                 "was not written by an OKD run. Resume with the loss it was written with.")
            self.adapter.load_state_dict(load_file(str(path), device=str(self.args.device)))

    def score(self, dataset) -> EvalResult:
        """`evaluate_student` on `dataset` with this trainer's models and evaluation settings."""
        student = self.accelerator.unwrap_model(self.model)
        pair = CachedPair(self.cache, student, self.processing_class) if self.cache is not None else ModelPair(
            self.teacher, student, self.processing_class, vocab_size=self.vocab_size)
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


def _scaled_split(split: TokenSplit, micro_batches: int) -> TokenSplit:
    """A micro-batch's own split with its group sizes x `micro_batches`: its ATKD loss weighted 1 / micro_batches."""
    return TokenSplit(split.threshold, split.n_hard * micro_batches, split.n_easy * micro_batches)


def run_settings(args: DistillConfig) -> dict:
    """What decides a run's result (a resumed run must match them) and how its global batch is cut."""
    settings = {"loss": args.loss, "loss_params": args.kd_loss().params, "ce_weight": args.ce_weight,
                "steps": args.max_steps, "learning_rate": args.learning_rate, "seed": args.seed,
                "global_batch": args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps,
                "atkd_split": args.atkd_split, "keep_dropout": args.keep_dropout}
    if args.loss == "okd":
        settings.update(okd_base=args.okd_base, okd_rank=args.okd_rank, okd_pull=args.okd_pull,
                        okd_learning_rate=args.okd_learning_rate)
    layout = {"world_size": args.world_size, "per_device_batch": args.per_device_train_batch_size,
              "grad_accum": args.gradient_accumulation_steps}
    return {**settings, "layout": layout}


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
        if _world_size() > 1:
            dist.all_reduce(requested, op=dist.ReduceOp.MAX)
        if requested.item() and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def _batch_dict(examples, pad: int) -> dict[str, Tensor]:
    batch = collate(examples, pad_id=pad)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
            "cache_key": torch.tensor([example_key(ex) for ex in examples])}  # finds the rows of a teacher cache


def split_data(dataset: TokenDataset, *, eval_size: int, seed: int = 0) -> tuple[TokenDataset, TokenDataset]:
    """(train, eval): `eval_size` examples drawn with `seed`, the rest for training."""
    if not 0 < eval_size < len(dataset):
        raise ValueError(f"eval_size must be in [1, {len(dataset) - 1}] for {len(dataset)} examples, got {eval_size}.")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:eval_size])
    train = [ex for i, ex in enumerate(dataset) if i not in held]
    evaluation = [ex for i, ex in enumerate(dataset) if i in held]
    return (TokenDataset(train, f"{dataset.description} (train, {len(train)})"),
            TokenDataset(evaluation, f"{dataset.description} (eval, {len(evaluation)})"))


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
        return write_text(path, json.dumps(asdict(self), indent=2, default=str), what="run metrics")


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


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `out_dir` (written by `DistillTrainer`), oldest step first."""
    found = [(int(m.group(1)), path) for path in expand(out_dir).glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", path.name)) and (path / CHECKPOINT_MARK).is_file()]
    return [path for _, path in sorted(found)]


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"The {what} {path} cannot be read ({error}): it is damaged. Delete its checkpoint folder "
                         f"{path.parent} and resume from an earlier one, or start anew in another --out.") from None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a Trainer checkpoint was written at."""
    state = _read_json(checkpoint / "trainer_state.json", "Trainer state")
    if not isinstance(state.get("global_step"), int):
        raise ValueError(f"The Trainer state {checkpoint / 'trainer_state.json'} has no step (global_step): it is "
                         f"damaged. Delete {checkpoint} and resume from an earlier checkpoint, or start anew.")
    return state["global_step"]


def run_inputs(pair, train: TokenDataset, evaluation: TokenDataset) -> dict:
    """What a run is made from: the models (or cache) by their weights, the training and held-out examples by
    their token ids (so data, limit, template, max length and eval size are all in it)."""
    return {"teacher and student": {"names": [pair.teacher_name, pair.student_name], "fingerprint": pair.fingerprint},
            "training examples": {"names": [train.description], "fingerprint": train.fingerprint},
            "held-out examples": {"names": [evaluation.description], "fingerprint": evaluation.fingerprint}}


def check_inputs(checkpoint: Path, inputs: dict) -> None:
    """ValueError unless the checkpoint was written by a run made from the same `inputs` (see `run_inputs`)."""
    saved = _read_json(checkpoint / CHECKPOINT_MARK, "checkpoint mark").get("inputs")
    if saved is None:  # written by DistillTrainer used directly, which does not know them
        return
    differ = [f"{what}: {', '.join(saved[what]['names'])} there, {', '.join(now['names'])} here"
              if saved[what]["names"] != now["names"] else f"{what}: same names, other contents"
              for what, now in inputs.items() if saved.get(what, {}).get("fingerprint") != now["fingerprint"]]
    if differ:
        raise ValueError(f"The checkpoint {checkpoint} was written by a run made from other inputs ({'; '.join(differ)}"
                         "). Resume with the --teacher (or --teacher-cache), --student, --data, --limit, --eval-size, "
                         "--template and --max-length it was started with, or start anew in another --out.")


def resume_point(out_dir: str | Path | None, resume: bool | str, args: DistillConfig) -> Path:
    """The checkpoint to continue (`resume`: True for the latest in `out_dir`, or a path), checked against `args`."""
    if out_dir is None:
        raise ValueError("resume_from_checkpoint needs out_dir: the checkpoints are written there.")
    if resume is True:
        found = checkpoints(out_dir)
        if not found:
            raise ValueError(f"No checkpoint in {expand(out_dir)} to resume from. Run without --resume to start "
                             "(checkpoints are written every --save-steps steps and when a run is interrupted).")
        path = found[-1]
    else:
        path = expand(resume)
        if not (path / CHECKPOINT_MARK).is_file():
            raise ValueError(f"{path} is not a complete kdviz checkpoint (no {CHECKPOINT_MARK}); give a "
                             f"checkpoint-N folder written by kdviz distill, or True for the latest in --out.")
    saved, now = _read_json(path / CHECKPOINT_MARK, "checkpoint mark"), run_settings(args)
    problem = changed_file(path, saved.get("files", {}), since="it was written")
    if problem:
        earlier = [p.name for p in checkpoints(path.parent) if p != path]
        raise ValueError(f"The checkpoint {path} is damaged: {problem}. Delete {path} and resume "
                         f"again{' (from ' + earlier[-1] + ')' if earlier else ''}, or start anew in another --out.")
    differ = [f"{key}={saved.get(key)!r} there, {now[key]!r} here" for key in now
              if key != "layout" and saved.get(key) != now[key]]
    if differ:
        raise ValueError(f"The checkpoint {path} was written with other settings ({'; '.join(differ)}). Resume with "
                         "the settings it was written with (the global batch = processes x batch size x accumulation "
                         "may be cut differently), or start anew in another --out.")
    if checkpoint_step(path) >= args.max_steps:
        raise ValueError(f"The run in {path.parent} already finished its {args.max_steps} steps ({path.name}); there "
                         "is nothing to resume. Its student and metrics.json are there; to train longer, start a new "
                         "run with more --steps in another --out.")
    return path


def _check_fresh(out_dir: str | Path) -> None:
    """ValueError unless `out_dir` is new, empty, or holds only what a failed start of a run leaves."""
    folder = expand(out_dir)
    found = checkpoints(folder) if folder.is_dir() else []
    if found:
        raise ValueError(f"{folder} holds checkpoints of an earlier run (latest {found[-1].name}); continue "
                         "it with --resume (resume_from_checkpoint=True), or choose another --out.")
    held = sorted(p.name for p in folder.iterdir() if TEMP_MARK not in p.name and p.name != EVAL_BEFORE) \
        if folder.is_dir() else []
    if held:
        what = ("a finished run" if "metrics.json" in held else "a model" if "config.json" in held else
                "a teacher cache" if "meta.json" in held else "files")
        raise ValueError(f"--out {folder} already holds {what} ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}"
                         "); saving the student there would replace them. Give a new or empty folder as --out (a "
                         "teacher's, a student's or a cache's folder never is one).")


def _main_computes(trainer: DistillTrainer, compute):
    """`compute()` on the main process only (FSDP: on all, its forward needs every rank); its value on every process."""
    here = trainer.is_world_process_zero() or trainer.is_fsdp_enabled
    return broadcast(compute() if here else None)


def _evaluation_before(trainer: DistillTrainer, evaluation, out_dir: str | Path | None, *, resumed: bool) -> EvalResult:
    """The held-out evaluation before training: stored in `out_dir` at the start, read back when a run resumes."""
    path = expand(out_dir) / EVAL_BEFORE if out_dir is not None else None
    if resumed and path is not None and path.is_file():
        return EvalResult(**json.loads(path.read_text()))
    before = _main_computes(trainer, lambda: trainer.score(evaluation))
    if path is not None and trainer.is_world_process_zero():
        write_text(path, json.dumps(asdict(before), indent=2), what="evaluation before training")
    return before


def _save_run(trainer: DistillTrainer, result: DistillResult, out_dir: str | Path) -> None:
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
            max_length: int | None = None, **config) -> DistillResult:
    """Distil `student` from `teacher` on `data` for `steps` steps and evaluate before and after.

    teacher/student: hub id, local folder or zoo name; data: anything `kdviz.data.load_data`
    reads, with the same options (template, truncate, *_field, limit, max_length: the context
    to use, at most the models'). `eval_size` examples
    (default: a fifth of the data, at most 32) are held out. Extra keyword arguments go to
    `DistillConfig` (e.g. loss_params={"lam": 0.2}, ce_weight=0.5, okd_rank=8,
    gradient_accumulation_steps=2). `batch_size` is per process. With `out_dir` the student
    is saved there in Hugging Face format with `metrics.json`, each file renamed into place,
    by the main process (which alone evaluates); Trainer checkpoints go there every
    `save_steps` steps, and on SIGINT or SIGTERM the run saves one at the end of the current
    step and returns a result marked `interrupted`. `resume_from_checkpoint`: True continues
    the latest checkpoint in `out_dir` (or give a checkpoint folder), with the evaluation
    before training stored at the start. `teacher_cache`: a folder made by `kdviz teacher-cache`
    (then `teacher` is None): the teacher is read from it instead of run (see kdviz.teacher_cache).
    """
    from kdviz.data import check_template, read_data, tokenize
    from kdviz.models import load_pair, resolve_device

    check_count(steps, "steps", minimum=1)
    if max_length is not None:
        check_count(max_length, "max_length", minimum=2)
    check_count(batch_size, "batch_size", minimum=1)
    check_template(template)
    for name, value in (("eval_size", eval_size), ("save_steps", save_steps)):
        if value is not None:
            check_count(value, name, minimum=1)
    device = resolve_device(device)
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    scratch = None if out_dir else tempfile.mkdtemp(prefix="kdviz-distill-")  # the Trainer wants a folder; not cwd
    args = DistillConfig(output_dir=str(out_dir or scratch), loss=loss, max_steps=steps,
                         per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
                         learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                         logging_steps=max(1, steps // 50), seed=seed, disable_tqdm=not progress,
                         use_cpu=device == "cpu", **saving, **config)  # settings checked before anything is loaded
    checkpoint = resume_point(out_dir, resume_from_checkpoint, args) if resume_from_checkpoint else None
    source = read_data(data, limit=limit, prompt_field=prompt_field, response_field=response_field,
                       context_field=context_field)
    if out_dir is not None:
        check_writable(out_dir, what="output folder", folder=True)
        if checkpoint is None:
            _check_fresh(out_dir)
    if (teacher is None) == (teacher_cache is None):
        raise ValueError("Give the teacher as a model (teacher=) or as a top-k cache (teacher_cache=), one of them.")
    torch.manual_seed(seed)
    if teacher_cache is not None:
        from kdviz.teacher_cache import load_cached_pair

        pair = load_cached_pair(teacher_cache, student, device=device)
    else:
        pair = load_pair(teacher, student, device=device)
    pair.student.float().requires_grad_(True)
    context = min(pair.max_length or 1024, max_length or 10**9)
    dataset = tokenize(source, pair.tokenizer, max_length=context, limit=limit, template=template, truncate=truncate)
    if teacher_cache is not None:
        pair.cache.check(dataset, pair.tokenizer, temperature=args.kd_loss().params["temperature"])
    train, evaluation = split_data(dataset, eval_size=eval_split_size(eval_size, len(dataset)), seed=seed)
    inputs = run_inputs(pair, train, evaluation)
    if checkpoint is not None:
        check_inputs(checkpoint, inputs)
    trainer = DistillTrainer(model=pair.student, teacher=getattr(pair, "teacher", None),
                             teacher_cache=getattr(pair, "cache", None), args=args, train_dataset=train,
                             eval_dataset=evaluation, processing_class=pair.tokenizer, vocab_size=pair.vocab_size,
                             callbacks=callbacks)
    trainer.run_inputs = inputs
    if not progress:
        trainer.remove_callback(PrinterCallback)  # quiet: the log history is in the result
    before = _evaluation_before(trainer, evaluation, out_dir, resumed=checkpoint is not None)
    stopper = StopOnSignal()
    if out_dir is not None:  # with somewhere to save, Ctrl-C saves a checkpoint and stops
        trainer.add_callback(stopper)
    started = time.perf_counter()
    with stopper.catching() if out_dir is not None else nullcontext():
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    barrier()  # the main process has marked the last checkpoint complete
    interrupted = stopper.stopped_at is not None
    after = None if interrupted else _main_computes(trainer, lambda: trainer.score(evaluation))
    run = run_settings(args)
    settings = {"loss_params": trainer.kd.params, "ce_weight": args.ce_weight, "batch_size": batch_size,
                "learning_rate": learning_rate, "seed": seed, "train_examples": len(train),
                "eval_examples": len(evaluation), "data": dataset.description, "template": dataset.template,
                "fused_linear": trainer.use_linear, **run["layout"], "global_batch": run["global_batch"],
                "atkd_split": args.atkd_split, "keep_dropout": args.keep_dropout,
                "resumed_from_step": checkpoint_step(checkpoint) if checkpoint else None}
    if loss == "okd":
        settings.update(okd_base=args.okd_base, okd_rank=args.okd_rank, okd_pull=args.okd_pull,
                        adapter_parameters=sum(p.numel() for p in trainer.adapter.parameters()))
    latest = (checkpoints(out_dir) or [None])[-1] if out_dir is not None else None
    if teacher_cache is not None:
        settings.update(teacher_cache=str(pair.cache.folder), cache_top_k=pair.cache.top_k)
    result = DistillResult(loss, pair.teacher_name if teacher is None else str(teacher), str(student), steps, before,
                           after, trainer.state.log_history,
                           seconds, settings, str(out_dir) if out_dir else None, trainer.state.global_step,
                           interrupted, str(latest) if latest else None)
    if out_dir:
        pair.student.eval()
        _save_run(trainer, result, out_dir)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return result
