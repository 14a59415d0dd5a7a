"""OKD against student-generated output (SGO): off-policy, on-policy, OKD and ATKD, same steps, over seeds.

    python benchmarks/onpolicy_study.py                                 # the real pair, 3 seeds (hours on a CPU)
    python benchmarks/onpolicy_study.py --teacher zoo:teacher-l --student zoo:student --template auto \\
        --steps 60 --out benchmarks/results/onpolicy_study_zoo.json    # the zoo's pair
    python benchmarks/onpolicy_study.py --merge seed0.json seed1.json seed2.json --out all.json
                                        # seeds run apart (one process each), one table and conclusion

Runs (each through `kdviz.train.distill`, the same code as `kdviz distill`, same steps, batch, learning rate and
held-out split per seed): off-policy fkl and rkl; on-policy rkl and jsd (beta 0.5) with lambda 1 and 0.5
(`--on-policy`); OKD (its adapter on the live teacher, fkl base); ATKD. For each: held-out loss, agreement and
ROUGE-L of greedy responses against the references (kdviz's evaluation), the KL and reverse KL on responses the
trained student writes to the held-out prompts (`kdviz.analyze(..., generate="student")`: what on-policy
training targets), the generation's share of the training time, and the wall-clock time of the run.
Writes the runs, the table by configuration (mean and std over seeds) and a conclusion computed from them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose import write_json  # noqa: E402  (benchmarks/decompose.py, same folder)

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {  # name: distill options
    "fkl": {"loss": "fkl"},
    "rkl": {"loss": "rkl"},
    "rkl on-policy 1": {"loss": "rkl", "on_policy": 1.0},
    "rkl on-policy 0.5": {"loss": "rkl", "on_policy": 0.5},
    "jsd on-policy 1": {"loss": "jsd", "loss_params": {"beta": 0.5}, "on_policy": 1.0},
    "jsd on-policy 0.5": {"loss": "jsd", "loss_params": {"beta": 0.5}, "on_policy": 0.5},
    "okd": {"loss": "okd", "okd_base": "fkl"},
    "atkd": {"loss": "atkd"},
}


def one_run(name: str, seed: int, args, folder: Path) -> dict:
    import kdviz
    from kdviz.data import load_data
    from kdviz.generation import Sampling
    from kdviz.train import distill, split_data
    from kdviz.train.run import eval_split_size

    options = dict(CONFIGS[name])
    started = time.perf_counter()
    result = distill(args.teacher, args.student, args.data, steps=args.steps, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, seed=seed, limit=args.limit, max_length=args.max_length,
                     template=args.template, out_dir=folder, device="cpu", progress=False,
                     rollout_max_new_tokens=args.max_new_tokens, **options)
    seconds = time.perf_counter() - started
    pair = kdviz.load_pair(args.teacher, folder, device="cpu")
    data = load_data(args.data, pair.tokenizer, max_length=pair.context(args.max_length), limit=args.limit,
                     template=args.template)
    _, held_out = split_data(data, eval_size=eval_split_size(None, len(data)), seed=seed)
    table = kdviz.analyze(pair, held_out, generate="student", cache=False, progress=False,
                          sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=seed)).df
    own = table.filter((pl.col("response_from") == "student") & pl.col("is_response"))
    s = result.settings
    return {"config": name, "seed": seed, "eval_loss": result.after.loss, "agreement": result.after.agreement,
            "rouge_l": result.after.rouge_l, "eval_loss_before": result.before.loss,
            "kl_own": float(own["kl"].mean()), "rkl_own": float(own["rkl"].mean()), "run_seconds": seconds,
            "train_seconds": result.train_seconds,
            "generation_share": s.get("generation_seconds", 0.0) / max(result.train_seconds, 1e-9),
            "mean_response_tokens": s.get("mean_response_tokens")}


def summary(runs: pl.DataFrame) -> pl.DataFrame:
    metrics = ["eval_loss", "agreement", "rouge_l", "kl_own", "rkl_own", "run_seconds", "generation_share"]
    order = {name: i for i, name in enumerate(CONFIGS)}
    return (runs.group_by("config").agg([pl.col(m).mean().alias(m) for m in metrics]
                                        + [pl.col(m).std().alias(f"{m}_std") for m in ("eval_loss", "rkl_own")]
                                        + [pl.len().alias("seeds")])
            .with_columns(order=pl.col("config").replace_strict(order)).sort("order").drop("order"))


def conclusion(table: pl.DataFrame, runs: pl.DataFrame | None = None) -> str:
    """What the numbers say about "OKD matches SGO at a fraction of the time" (computed, not written in advance);
    with the runs, also how many seeds agree and which runs ended above the student before training."""
    rows = {r["config"]: r for r in table.iter_rows(named=True)}
    sgo = [r for name, r in rows.items() if "on-policy" in name]
    if "okd" not in rows or not sgo:
        return "Not enough runs for the comparison (OKD and at least one on-policy run are needed)."
    okd = rows["okd"]
    best = min(sgo, key=lambda r: r["eval_loss"])
    own = min(sgo, key=lambda r: r["rkl_own"])
    faster = best["run_seconds"] / okd["run_seconds"]
    verdict = "matches or beats" if okd["eval_loss"] <= best["eval_loss"] else "does not match"
    return (f"OKD {verdict} the best on-policy run on held-out loss ({okd['eval_loss']:.4f} against "
            f"{best['eval_loss']:.4f} for {best['config']}), taking {1 / faster:.2f}x its time "
            f"({okd['run_seconds']:.0f} s against {best['run_seconds']:.0f} s; generation was "
            f"{best['generation_share']:.0%} of that run's training time). On the student's own responses to held-out "
            f"prompts, OKD's reverse KL is {okd['rkl_own']:.4f}; the lowest among on-policy runs is "
            f"{own['rkl_own']:.4f} ({own['config']}), off-policy rkl {rows.get('rkl', {}).get('rkl_own', float('nan')):.4f}."
            + ("" if runs is None else by_seed(runs, best["config"])))


def by_seed(runs: pl.DataFrame, best: str) -> str:
    """Paired by seed: in how many seeds OKD's held-out loss is below the (on average) best on-policy run's, and
    which runs ended above the held-out loss before training."""
    wide = runs.pivot(on="config", index="seed", values="eval_loss").drop_nulls(["okd", best])
    seeds = wide.height
    wins = int((wide["okd"] <= wide[best]).sum())
    above = (runs.filter(pl.col("eval_loss") > pl.col("eval_loss_before")).group_by("config")
             .agg(pl.len().alias("n")).sort("config"))
    worse = ", ".join(f"{r['config']} ({r['n']} of {seeds})" for r in above.iter_rows(named=True))
    return (f" OKD's held-out loss is at or below {best}'s in {wins} of {seeds} seeds."
            + (f" Runs that ended above the held-out loss before training: {worse}." if worse else
               " Every run ended below the held-out loss before training."))


SAME = ("teacher", "student", "data", "template", "steps", "batch_size", "learning_rate", "limit", "max_length",
        "max_new_tokens")


def merged(paths: list[str]) -> tuple[dict, list[dict]]:
    """The runs of several results of this script (seeds run apart), after checking they share the settings."""
    import json

    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]["settings"]
    for path, result in zip(paths, results):
        differ = {k: (first.get(k), result["settings"].get(k)) for k in SAME
                  if result["settings"].get(k) != first.get(k)}
        if differ:
            raise SystemExit(f"--merge: {path} was made with other settings than {paths[0]} ({differ}); "
                             "merge results of one set of settings")
    runs = [run for result in results for run in result["runs"]]
    seeds = sorted({run["seed"] for run in runs})
    return {**first, "seeds": seeds, "merged_from": paths}, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="zoo:smollm2-135m")
    parser.add_argument("--student", default="zoo:smollm2-student")
    parser.add_argument("--data", default="zoo:docstrings")
    parser.add_argument("--template", default="chat")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default=str(RESULTS / "onpolicy_study.json"))
    parser.add_argument("--merge", nargs="+", metavar="RESULT",
                        help="no runs: merge results of this script made with the same settings (for example one "
                             "seed per process) into one table and conclusion, written to --out")
    args = parser.parse_args()
    if args.merge:
        settings, runs = merged(args.merge)
        report(*write_result(Path(args.out), {**settings, "out": args.out}, runs))
        return
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for name in args.configs:
                runs.append(one_run(name, seed, args, Path(scratch) / f"{name.replace(' ', '_')}-{seed}"))
                print(runs[-1], flush=True)
                written = write_result(Path(args.out), vars(args), runs)  # after every run: a cut study keeps them
    report(*written)


def write_result(path: Path, settings: dict, runs: list[dict]) -> tuple[pl.DataFrame, str]:
    """Write the runs, their table and conclusion to `path`; (the table, the conclusion)."""
    frame = pl.DataFrame(runs)
    table = summary(frame)
    sentence = conclusion(table, frame)
    write_json(path, {"settings": settings, "runs": runs, "table": table.to_dicts(), "conclusion": sentence},
               quiet=True)
    return table, sentence


def report(table: pl.DataFrame, sentence: str) -> None:
    with pl.Config(tbl_rows=20, tbl_cols=20, float_precision=4, tbl_width_chars=200):
        print(table)
    print(sentence)


if __name__ == "__main__":
    main()
