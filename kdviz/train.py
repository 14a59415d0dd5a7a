"""Short distillation fine-tunes: `DistillConfig`, `DistillTrainer`, OKD's online adapter, `distill`.

`DistillTrainer` is a transformers `Trainer`, so accelerate, torchrun, DDP and FSDP work as
they do for any Trainer. Per step it runs the frozen teacher without gradients, takes both
models' final hidden states, and calls the fused-linear loss (`KDLoss.linear`), so the full
[B, T, V] logits are never built. It logs the KD loss, its hard and easy parts, the
cross-entropy and the mean teacher uncertainty.

OKD (kdviz's reading of Rao et al., arXiv 2409.12512; the paper's module details are not
public): the teacher stays frozen; a low-rank residual adapter on its final hidden state is
trained at the same steps on cross-entropy to the labels plus `okd_pull` x KL(adapted teacher
|| current student), and the student distils from the adapted teacher with `okd_base`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PrinterCallback, Trainer, TrainingArguments

from kdviz.data import IGNORE_INDEX, TokenDataset, collate, pad_id
from kdviz.decompose import check_count
from kdviz.files import check_writable, staged_folder, write_text
from kdviz.losses import OBJECTIVES, get_loss
from kdviz.models import ModelPair, final_hidden, head_is_linear, model_logits, output_head

LOSSES = (*OBJECTIVES, "okd")


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
    eval_generate_examples: int = field(default=16, metadata={
        "help": "Instruction examples whose greedy continuations are scored with ROUGE-L at evaluation (0: none)."})
    eval_generate_tokens: int = field(default=48, metadata={"help": "Most new tokens per greedy continuation."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kdviz batches carry their own fields."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (default: none)."})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}.")
        checks = [("ce_weight", self.ce_weight >= 0, ">= 0"), ("hard_fraction", 0 < self.hard_fraction <= 1, "in (0, 1]"),
                  ("okd_rank", self.okd_rank >= 1, ">= 1"), ("okd_pull", self.okd_pull >= 0, ">= 0"),
                  ("okd_base", self.okd_base in OBJECTIVES, f"one of {', '.join(OBJECTIVES)}"),
                  ("eval_generate_examples", self.eval_generate_examples >= 0, ">= 0"),
                  ("eval_generate_tokens", self.eval_generate_tokens >= 1, ">= 1")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)!r} is not allowed; it must be {allowed}.")
        self.kd_loss()  # validates loss_params (ValueError naming what is allowed)
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
        batch = collate(list(dataset[start : start + batch_size]), pad_id=pad_id(pair.tokenizer))
        teacher, student = pair.logits(batch.input_ids.to(pair.device), batch.attention_mask.to(pair.device))
        teacher, student = teacher[:, :-1], student[:, :-1]  # position t predicts label t + 1
        labels = batch.labels[:, 1:].to(pair.device)
        valid = labels != IGNORE_INDEX
        loss_sum += float(F.cross_entropy(student[valid].float(), labels[valid], reduction="sum"))
        agree += int((student[valid].argmax(-1) == teacher[valid].argmax(-1)).sum())
        count += int(valid.sum())
    examples = list(dataset)[:generate_examples]
    score = rouge_l(pair.student, pair.tokenizer, examples, max_new_tokens=max_new_tokens) if examples else None
    pair.student.train(was_training)
    return EvalResult(loss_sum / max(1, count), agree / max(1, count), score, count)


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

    def __init__(self, *args, teacher, vocab_size: int | None = None, **kwargs):
        if not isinstance(kwargs.get("args"), DistillConfig):
            raise ValueError("DistillTrainer needs args=DistillConfig(...) (it carries the loss settings).")
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None:
            raise ValueError("DistillTrainer needs processing_class=<the shared tokenizer> (for padding and ROUGE-L).")
        pad = pad_id(tokenizer)
        kwargs.setdefault("data_collator", lambda examples: _batch_dict(examples, pad))
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.vocab_size = vocab_size or len(tokenizer)
        self.kd = self.args.kd_loss()
        self.adapter = None
        if self.args.loss == "okd":
            self.adapter = OnlineAdapter(teacher.get_output_embeddings().weight.shape[1], self.args.okd_rank)
            self.adapter.to(self.args.device)
            self.pull = get_loss("rkl")  # with the adapter in the student's seat: KL(adapted || student)
        self._metrics: dict[str, list[float]] = {}
        probe = torch.arange(min(8, self.vocab_size), device=self.args.device)[None]
        linear_heads = all(head_is_linear(m, probe) for m in (self.model, self.teacher))
        if self.adapter is not None and not linear_heads:
            raise ValueError("OKD adapts the teacher's final hidden state, so both models need a plain linear LM head "
                             "(no logit soft-capping or scaling); use another loss with these models.")
        self.use_linear = self.args.fused_linear and linear_heads

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.adapter is not None and not any(p is self.adapter.up.weight for g in optimizer.param_groups
                                                for p in g["params"]):
            optimizer.add_param_group({"params": list(self.adapter.parameters()), "weight_decay": 0.0,
                                       "lr": self.args.okd_learning_rate or self.args.learning_rate})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"][:, 1:]
        try:
            if self.use_linear:
                parts, extra = self._linear_parts(model, ids, mask, labels)
            else:  # the models' own logits (soft-capped or scaled heads)
                with torch.no_grad():
                    t_logits = model_logits(self.teacher, ids, mask)[:, :-1, : self.vocab_size]
                s_logits = model_logits(model, ids, mask)[:, :-1, : self.vocab_size]  # position t predicts t + 1
                parts, extra = self.kd.parts(s_logits, t_logits, labels, ce_weight=self.args.ce_weight), 0.0
        except ValueError as err:
            raise ValueError(f"Step {self.state.global_step}: {err}") from err
        if not torch.isfinite(parts.kd) or not torch.isfinite(parts.ce):
            raise ValueError(
                f"Step {self.state.global_step}: the loss is not finite (kd={float(parts.kd)}, ce={float(parts.ce)}). "
                "Check the teacher's outputs for NaN/inf (fp16 overflow), or lower the learning rate "
                f"(now {self.args.learning_rate})."
            )
        hard, easy = parts.hard_easy(self.args.log_fraction)
        self._record(kd=float(parts.kd), kd_hard=hard, kd_easy=easy, ce=float(parts.ce), unc=float(parts.unc.mean()))
        loss = parts.loss + extra
        return (loss, None) if return_outputs else loss

    def _linear_parts(self, model, ids: Tensor, mask: Tensor, labels: Tensor):
        """(student LossParts, adapter loss or 0) from final hidden states and LM heads."""
        with torch.no_grad():
            t_hidden = final_hidden(self.teacher, ids, mask)[:, :-1]  # position t predicts label t + 1
        t_head, t_bias = output_head(self.teacher, self.vocab_size)
        s_hidden = final_hidden(model, ids, mask)[:, :-1]
        s_head, s_bias = output_head(self.accelerator.unwrap_model(model), self.vocab_size)
        extra = 0.0
        if self.adapter is not None:
            adapted = self.adapter(t_hidden.float()).to(t_hidden.dtype)
            pull = self.pull.linear(adapted, t_head, s_hidden.detach(), s_head.detach(), labels, ce_weight=1.0,
                                    kd_weight=self.args.okd_pull, student_bias=t_bias, teacher_bias=s_bias)
            self._record(adapter_ce=float(pull.ce), adapter_pull=float(pull.kd))
            extra, t_hidden = pull.loss, adapted.detach()
        parts = self.kd.linear(s_hidden, s_head, t_hidden, t_head, labels, ce_weight=self.args.ce_weight,
                               student_bias=s_bias, teacher_bias=t_bias)
        return parts, extra

    def _record(self, **values: float) -> None:
        for key, value in values.items():
            self._metrics.setdefault(key, []).append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._metrics:
            logs.update({key: sum(v) / len(v) for key, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)

    def score(self, dataset) -> EvalResult:
        """`evaluate_student` on `dataset` with this trainer's models and evaluation settings."""
        pair = ModelPair(self.teacher, self.accelerator.unwrap_model(self.model), self.processing_class,
                         vocab_size=self.vocab_size)
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


def _batch_dict(examples, pad: int) -> dict[str, Tensor]:
    batch = collate(examples, pad_id=pad)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}


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
    """What one fine-tune did: evaluation before and after, the log history, wall time."""

    loss: str
    teacher: str
    student: str
    steps: int
    before: EvalResult
    after: EvalResult
    history: list[dict]
    train_seconds: float
    settings: dict
    out_dir: str | None = None

    def row(self) -> dict:
        """One flat row for a comparison table."""
        return {"loss": self.loss, "teacher": self.teacher, "steps": self.steps,
                "eval_loss": self.after.loss, "agreement": self.after.agreement, "rouge_l": self.after.rouge_l,
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


def distill(teacher, student, data, *, loss: str = "atkd", steps: int = 300, out_dir: str | Path | None = None,
            eval_size: int | None = None, limit: int | None = None, batch_size: int = 8, learning_rate: float = 5e-4,
            seed: int = 0, device: str | None = None, callbacks=None, progress: bool = True, template: str = "auto",
            truncate: bool = False, prompt_field: str | None = None, response_field: str | None = None,
            context_field: str | None = None, **config) -> DistillResult:
    """Distil `student` from `teacher` on `data` for `steps` steps and evaluate before and after.

    teacher/student: hub id, local folder or zoo name; data: anything `kdviz.data.load_data`
    reads, with the same options (template, truncate, *_field, limit). `eval_size` examples
    (default: a fifth of the data, at most 32) are held out. Extra keyword arguments go to
    `DistillConfig` (e.g. loss_params={"lam": 0.2}, ce_weight=0.5, okd_rank=8). With `out_dir`
    the student is saved there in Hugging Face format with `metrics.json`, each file renamed
    into place.
    """
    from kdviz.data import check_template, read_data, tokenize
    from kdviz.models import load_pair, resolve_device

    check_count(steps, "steps", minimum=1)
    check_count(batch_size, "batch_size", minimum=1)
    check_template(template)
    if eval_size is not None:
        check_count(eval_size, "eval_size", minimum=1)
    device = resolve_device(device)
    args = DistillConfig(output_dir=str(out_dir or Path.cwd() / "kdviz-out" / "distill"), loss=loss, max_steps=steps,
                         per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
                         learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                         logging_steps=max(1, steps // 50), seed=seed, disable_tqdm=not progress,
                         use_cpu=device == "cpu", **config)  # settings checked before anything is loaded
    source = read_data(data, limit=limit, prompt_field=prompt_field, response_field=response_field,
                       context_field=context_field)
    if out_dir is not None:
        check_writable(out_dir, what="output folder", folder=True)
    torch.manual_seed(seed)
    pair = load_pair(teacher, student, device=device)
    pair.student.float().requires_grad_(True)
    dataset = tokenize(source, pair.tokenizer, max_length=pair.max_length or 1024, limit=limit, template=template,
                       truncate=truncate)
    train, evaluation = split_data(dataset, eval_size=eval_split_size(eval_size, len(dataset)), seed=seed)
    trainer = DistillTrainer(model=pair.student, teacher=pair.teacher, args=args, train_dataset=train,
                             eval_dataset=evaluation, processing_class=pair.tokenizer, vocab_size=pair.vocab_size,
                             callbacks=callbacks)
    if not progress:
        trainer.remove_callback(PrinterCallback)  # quiet: the log history is in the result
    before = trainer.score(evaluation)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = trainer.score(evaluation)
    settings = {"loss_params": trainer.kd.params, "ce_weight": args.ce_weight, "batch_size": batch_size,
                "learning_rate": learning_rate, "seed": seed, "train_examples": len(train),
                "eval_examples": len(evaluation), "data": dataset.description, "template": dataset.template,
                "fused_linear": trainer.use_linear}
    if loss == "okd":
        settings.update(okd_base=args.okd_base, okd_rank=args.okd_rank, okd_pull=args.okd_pull,
                        adapter_parameters=sum(p.numel() for p in trainer.adapter.parameters()))
    result = DistillResult(loss, str(teacher), str(student), steps, before, after, trainer.state.log_history,
                           seconds, settings, str(out_dir) if out_dir else None)
    if out_dir:
        pair.student.eval()
        with staged_folder(out_dir, what="output folder") as stage:
            trainer.save_model(str(stage))
            result.save(stage / "metrics.json")
    return result
