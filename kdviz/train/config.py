"""`DistillConfig`: the Trainer's arguments plus the distillation settings, validated where they are read."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from kdviz.checks import check_choice, check_count, check_fraction, check_non_negative, check_positive, is_real
from kdviz.generation import Sampling
from kdviz.losses import OBJECTIVES, get_loss
from kdviz.maths.crossloss import OBJECTIVES as CROSS_LOSSES
from kdviz.maths.crossloss import loss_across
from kdviz.maths.modes import PRESETS, is_mode

LOSSES = (*(name for name in OBJECTIVES if name != "modes"), "okd", *CROSS_LOSSES)
ATKD_SPLITS = ("global", "micro_batch")


@dataclass
class DistillConfig(TrainingArguments):
    """Training arguments plus the distillation settings (all validated in `__post_init__`)."""

    loss: str = field(default="atkd", metadata={
        "help": f"KD objective: one of {', '.join(LOSSES)}. {', '.join(CROSS_LOSSES)} distil across tokenizers "
                "(kdviz.maths.crossloss: ULD and GOLD with TRL's defaults, ATKD on aligned groups) and need training "
                "examples built for both tokenizers."})
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
    on_policy: float = field(default=0.0, metadata={
        "help": "On-policy distillation (GKD's lambda, in [0, 1]): each optimizer step trains on responses the student "
                "writes to the step's prompts with this probability (1.0: every step). Needs the live teacher."})
    seq_kd: bool = field(default=False, metadata={
        "help": "Sequence-level KD: steps that are not on-policy train on responses the teacher writes (GKD's seq_kd)."})
    rollout_max_new_tokens: int = field(default=64, metadata={"help": "Most tokens of a generated training response."})
    rollout_temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature of generated training responses (0: greedy; 1: the model's own distribution)."})
    rollout_top_p: float = field(default=1.0, metadata={"help": "Nucleus threshold of generated training responses."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "kdviz batches carry their own fields."})
    report_to: str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpoint strategy (default: none)."})
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={
        "help": "DDP: search the autograd graph for unused parameters every step. Off by default: every student "
                "parameter takes part in the KD loss (the head through the fused-linear path), and the search "
                "costs a graph traversal per step. Turn it on for a student whose forward leaves parameters out."})

    def __post_init__(self):
        if self.loss not in LOSSES and not is_mode(self.loss):
            raise ValueError(f"Unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}, or a teaching mode such "
                             f"as '0.2*easy:dkd + 0.8*hard:tkd+dkd' or one of {', '.join(PRESETS)}.")
        self._check_ranges()
        try:
            self.kd_loss()  # validates loss_params (ValueError naming what is allowed)
        except ValueError as err:
            if self.loss != "okd":
                raise
            raise ValueError(f"loss='okd' distils with okd_base={self.okd_base!r}, so its parameters are that "
                             f"loss's: {err}") from None
        super().__post_init__()

    def _check_ranges(self) -> None:
        """ValueError naming the first setting out of its range (NaN and infinities included)."""
        name = lambda field_name: f"DistillConfig.{field_name}"  # noqa: E731
        check_non_negative(self.ce_weight, name("ce_weight"))
        check_fraction(self.hard_fraction, name("hard_fraction"))
        check_count(self.okd_rank, name("okd_rank"), minimum=1)
        check_non_negative(self.okd_pull, name("okd_pull"))
        check_choice(self.okd_base, name("okd_base"), tuple(OBJECTIVES))
        check_choice(self.atkd_split, name("atkd_split"), ATKD_SPLITS)
        check_count(self.gradient_accumulation_steps, name("gradient_accumulation_steps"), minimum=1)
        check_count(self.eval_generate_examples, name("eval_generate_examples"), minimum=0)
        check_count(self.eval_generate_tokens, name("eval_generate_tokens"), minimum=1)
        if not is_real(self.on_policy) or not 0 <= self.on_policy <= 1:
            raise ValueError(f"{name('on_policy')} is the probability of an on-policy step and must be in [0, 1], got "
                             f"{self.on_policy!r} (CLI: --on-policy).")
        self.rollout_sampling()  # range-checks the rollout_* settings
        if self.loss in CROSS_LOSSES and (self.on_policy > 0 or self.seq_kd):
            raise ValueError(f"loss={self.loss!r} compares the teacher and the student on both tokenizations of each "
                             "response, which generated responses (on_policy, seq_kd) do not have yet; train on the "
                             "data's responses (on_policy=0, seq_kd=False).")
        check_positive(self.learning_rate, "The learning rate", hint="(CLI: --lr)")
        if self.okd_learning_rate is not None:
            check_positive(self.okd_learning_rate, name("okd_learning_rate"), hint="(or None: the learning rate)")
        check_non_negative(self.weight_decay, name("weight_decay"))
        check_non_negative(self.max_grad_norm, name("max_grad_norm"))
        if not (isinstance(self.warmup_steps, (int, float)) and not isinstance(self.warmup_steps, bool)
                and self.warmup_steps >= 0):
            raise ValueError(f"{name('warmup_steps')} must be a number >= 0, got {self.warmup_steps!r}.")
        if self.max_steps > 0 and isinstance(self.warmup_steps, int) and self.warmup_steps > self.max_steps:
            raise ValueError(f"{name('warmup_steps')}={self.warmup_steps} is more than the run's {self.max_steps} steps: "
                             "the learning rate would never reach its peak. Use at most the number of steps.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"The seed must be an integer in [0, 2**32), got {self.seed!r} (CLI: --seed).")

    def kd_loss(self):
        """The configured objective (for OKD, its base objective; for uld, gold and cross-atkd, a `LossAcross`)."""
        if self.loss in CROSS_LOSSES:
            return loss_across(self.loss, **self.loss_params)
        return get_loss(self.okd_base if self.loss == "okd" else self.loss, **self.loss_params)

    def rollout_sampling(self) -> Sampling:
        """How on-policy and sequence-KD responses are sampled (the seed is set per step)."""
        return Sampling(max_new_tokens=self.rollout_max_new_tokens, temperature=self.rollout_temperature,
                        top_p=self.rollout_top_p, batch_size=max(1, self.per_device_train_batch_size))

    @property
    def log_fraction(self) -> float:
        """Fraction of hard tokens in the logged split (ATKD's own k when the loss is ATKD)."""
        return self.kd_loss().params.get("k", self.hard_fraction)



def global_batch(args: DistillConfig) -> int:
    """Examples per optimizer step: processes x per-device batch x accumulation steps."""
    return args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps


def run_settings(args: DistillConfig) -> dict:
    """What decides a run's result (a resumed run must match them) and how its global batch is cut."""
    settings = {"loss": args.loss, "loss_params": args.kd_loss().params, "ce_weight": args.ce_weight,
                "steps": args.max_steps, "learning_rate": args.learning_rate, "seed": args.seed,
                "global_batch": global_batch(args),
                "atkd_split": args.atkd_split, "keep_dropout": args.keep_dropout}
    if args.on_policy > 0 or args.seq_kd:
        settings.update(on_policy=args.on_policy, seq_kd=args.seq_kd, rollout=args.rollout_sampling().as_dict())
    if args.loss == "okd":
        settings.update(okd_base=args.okd_base, okd_rank=args.okd_rank, okd_pull=args.okd_pull,
                        okd_learning_rate=args.okd_learning_rate)
    layout = {"world_size": args.world_size, "per_device_batch": args.per_device_train_batch_size,
              "grad_accum": args.gradient_accumulation_steps}
    return {**settings, "layout": layout}


