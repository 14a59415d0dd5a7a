"""`kdviz distill`: fine-tune the student from the teacher with a KD objective; Ctrl-C saves, --resume continues."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from kdviz import distributed
from kdviz.cli.options import add_data_options, add_pair_options, command, data_path, fields, parse_params
from kdviz.files import check_distinct
from kdviz.train import LOSSES, distill


def add_parser(commands) -> None:
    distill = command(commands, "distill", "fine-tune the student from the teacher with a KD objective")
    add_pair_options(distill, student_help="student model to fine-tune (another tokenizer: --loss uld, gold or cross-atkd)",
                     cache=True)
    distill.add_argument("--out", required=True, help="folder for the fine-tuned student (HF format) and metrics.json")
    distill.add_argument("--loss", default="atkd", help=f"{', '.join(LOSSES)} (default atkd), or a teaching mode: token sets all/hard/easy x parts "
                              "tkd/dkd/u*dkd/kl, weighted and summed, e.g. \"0.2*easy:dkd + 0.8*hard:tkd+dkd\" (= atkd), "
                              "\"hard:kl\", \"0.5*ce + all:kl\", or a named ablation: kd-on-hard, kd-on-easy, "
                              "tkd-alone, dkd-alone, tkd-on-easy, tkd-on-hard")
    distill.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    distill.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="objective parameter, repeatable: --param lam=0.2 --param k=0.5 --param base=rkl")
    distill.add_argument("--ce-weight", type=float, default=0.0, help="weight of the cross-entropy term (default 0)")
    distill.add_argument("--batch-size", type=int, default=8,
                         help="sequences per step and process (default 8); the global batch is this x processes x "
                              "--grad-accum, and the result depends only on the global batch")
    distill.add_argument("--grad-accum", type=int, default=1,
                         help="micro-batches accumulated per optimizer step (default 1)")
    distill.add_argument("--lr", type=float, default=5e-4, help="peak learning rate, cosine schedule (default 5e-4)")
    distill.add_argument("--eval-size", type=int, default=None,
                         help="examples held out for evaluation (default: a fifth of the data, at most 32)")
    distill.add_argument("--seed", type=int, default=0, help="seed for the split, the order and the init (default 0)")
    distill.add_argument("--atkd-split", choices=["global", "micro_batch"], default="global",
                         help="ATKD's hard/easy threshold over the whole global batch (default), or per micro-batch "
                              "as the official code (then the result changes with the batch layout)")
    distill.add_argument("--keep-dropout", action="store_true", help="keep the student's dropout (default: off)")
    distill.add_argument("--save-steps", type=int, default=None,
                         help="write a checkpoint into --out every N steps (default: only when interrupted)")
    distill.add_argument("--resume", action="store_true",
                         help="continue the latest checkpoint in --out (same settings; Ctrl-C saves one)")
    distill.add_argument("--probe-every", type=int, default=None, metavar="N",
                         help="analyse the student on a probe set at step 0, every N steps and at the end: "
                              "trajectory.parquet in --out, what the run did to each token (see `kdviz compare`)")
    distill.add_argument("--probe-data", default=None,
                         help="the probe set (default: the held-out examples); read with the same data options")
    rollout = distill.add_argument_group("on-policy distillation (responses the student or the teacher writes)")
    rollout.add_argument("--on-policy", type=float, default=0.0, metavar="LAMBDA",
                         help="each optimizer step trains on responses the student writes to its prompts with this "
                              "probability (GKD's lambda; 1 = always, default 0); needs --teacher, not a cache")
    rollout.add_argument("--seq-kd", action="store_true",
                         help="steps that are not on-policy train on responses the teacher writes (sequence-level KD)")
    rollout.add_argument("--max-new-tokens", type=int, default=64, help="longest generated response (default 64)")
    rollout.add_argument("--sample-temperature", type=float, default=1.0,
                         help="sampling temperature of the generated responses, 0 = greedy (default 1)")
    rollout.add_argument("--top-p", type=float, default=1.0, help="nucleus threshold of the generation (default 1: off)")
    add_data_options(distill)
    distill.add_argument("--device", default=None, help="cpu or cuda")


def run(args) -> None:
    check_distinct({"--data": data_path(args.data), "--out": args.out})
    if (args.teacher is None) == (args.teacher_cache is None):
        raise ValueError("Give the teacher as --teacher MODEL or --teacher-cache DIR (one of them).")
    result = distill(args.teacher, args.student, args.data, loss=args.loss, steps=args.steps, out_dir=args.out,
                     teacher_cache=args.teacher_cache, max_length=args.max_length,
                     eval_size=args.eval_size, limit=args.limit, batch_size=args.batch_size, learning_rate=args.lr,
                     seed=args.seed, device=args.device, loss_params=parse_params(args.param),
                     ce_weight=args.ce_weight, template=args.template, truncate=args.truncate,
                     gradient_accumulation_steps=args.grad_accum, atkd_split=args.atkd_split,
                     keep_dropout=args.keep_dropout, save_steps=args.save_steps,
                     resume_from_checkpoint=args.resume or None, probe_every=args.probe_every,
                     probe_data=args.probe_data, on_policy=args.on_policy, seq_kd=args.seq_kd,
                     rollout_max_new_tokens=args.max_new_tokens, rollout_temperature=args.sample_temperature,
                     rollout_top_p=args.top_p, **fields(args))
    if not distributed.world().is_main:
        if result.interrupted:
            raise SystemExit(130)
        return
    if result.interrupted:
        print(f"kdviz distill: interrupted at step {result.steps_done} of {args.steps}; saved {result.checkpoint} "
              f"and {Path(args.out) / 'metrics.json'} (marked interrupted). Continue with:\n  {_resume_command()}"
              f"{_launcher_note(result.settings)}", file=sys.stderr)
        raise SystemExit(130)
    shown = lambda value: "n/a" if value is None else f"{value:.3f}"  # noqa: E731
    rouge = {name: shown(r.rouge_l) for name, r in (("before", result.before), ("after", result.after))}
    start = result.settings["resumed_from_step"]
    done = f"steps {start + 1}-{args.steps} (resumed from checkpoint-{start})" if start else f"{args.steps} steps"
    print(f"\n{args.loss} on {result.settings['data']}: {done} in {result.train_seconds:.0f} s")
    print(f"{'':8}{'eval loss':>10}{'agreement':>11}{'ROUGE-L':>9}")
    for name, r in (("before", result.before), ("after", result.after)):
        print(f"{name:8}{r.loss:>10.3f}{shown(r.agreement):>11}{rouge[name]:>9}")
    if result.before.agreement is None:
        print("(agreement: n/a, the teacher's and the student's tokenizers differ, so their top tokens are not "
              "comparable id by id)")
    if result.settings.get("eval_references_by_teacher"):
        print(f"(held-out: {result.settings['eval_references_by_teacher']} of {result.settings['eval_examples']} "
              "prompts had no response; the scores above are against the teacher's greedy responses to them)")
    if "generation_seconds" in result.settings:
        s = result.settings
        share = s["generation_seconds"] / max(result.train_seconds, 1e-9)
        length = "n/a" if s["mean_response_tokens"] is None else f"{s['mean_response_tokens']:.1f}"
        print(f"Generation: {s['steps_by_writer']} steps by writer, {s['generation_seconds']:.0f} s ({share:.0%} of the "
              f"training time), mean response {length} tokens")
    if result.probe_seconds is not None:
        print(f"Probes: {Path(args.out).resolve() / 'trajectory.parquet'} ({result.probe_seconds:.0f} s, "
              f"{result.probe_seconds / max(result.train_seconds, 1e-9):.0%} of the training time)")
    print(f"\nStudent: {Path(args.out).resolve()}  Metrics: {Path(args.out).resolve() / 'metrics.json'}")


def _resume_command() -> str:
    """This process's `kdviz distill ...` command line with --resume."""
    words = sys.argv[sys.argv.index("distill"):] if "distill" in sys.argv else ["distill", "..."]
    return shlex.join(["kdviz", *words, *([] if "--resume" in words else ["--resume"])])


def _launcher_note(settings: dict) -> str:
    if settings["world_size"] == 1:
        return ""
    return (f"\n  launched as this run was (torchrun or accelerate launch), or with any processes x --batch-size x "
            f"--grad-accum = {settings['global_batch']}")
