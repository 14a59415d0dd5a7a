"""benchmarks/onpolicy_study.py: its conclusion follows the numbers (verdict, seeds paired, runs that got worse),
and --merge joins results of one set of settings only."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import polars as pl

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "onpolicy_study.py"


def study():
    spec = importlib.util.spec_from_file_location("onpolicy_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def runs(okd, jsd, before=4.4):
    """Three seeds of okd and jsd on-policy 0.5, okd's loss at seed s is okd[s]."""
    rows = []
    for seed in range(3):
        for config, loss in (("okd", okd[seed]), ("jsd on-policy 0.5", jsd[seed])):
            rows.append({"config": config, "seed": seed, "eval_loss": loss, "eval_loss_before": before,
                         "agreement": 0.3, "rouge_l": 0.1, "kl_own": 2.0, "rkl_own": 2.0 if config == "okd" else 1.5,
                         "run_seconds": 100.0 if config == "okd" else 80.0, "generation_share": 0.0})
    return pl.DataFrame(rows)


def test_the_conclusion_follows_the_numbers():
    module = study()
    better = runs(okd=[4.1, 4.2, 4.5], jsd=[4.3, 4.3, 4.3])
    sentence = module.conclusion(module.summary(better), better)
    assert "OKD matches or beats the best on-policy run" in sentence
    assert "taking 1.25x its time" in sentence
    assert "at or below jsd on-policy 0.5's in 2 of 3 seeds" in sentence
    assert "ended above the held-out loss before training: okd (1 of 3)" in sentence
    worse = runs(okd=[4.5, 4.5, 4.5], jsd=[4.3, 4.2, 4.1], before=4.6)
    sentence = module.conclusion(module.summary(worse), worse)
    assert "OKD does not match the best on-policy run" in sentence
    assert "in 0 of 3 seeds" in sentence and "Every run ended below" in sentence


def write(path, settings, frame):
    path.write_text(json.dumps({"settings": settings, "runs": frame.to_dicts()}))
    return str(path)


def test_merge_joins_seeds_run_apart_and_refuses_other_settings(tmp_path):
    settings = {"teacher": "t", "student": "s", "data": "d", "template": "chat", "steps": 40, "batch_size": 8,
                "learning_rate": 5e-4, "limit": 160, "max_length": 256, "max_new_tokens": 32}
    all_runs = runs(okd=[4.1, 4.2, 4.5], jsd=[4.3, 4.3, 4.3])
    parts = [write(tmp_path / f"seed{s}.json", {**settings, "seeds": [s]}, all_runs.filter(pl.col("seed") == s))
             for s in range(3)]
    out = tmp_path / "all.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--merge", *parts, "--out", str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    merged = json.loads(out.read_text())
    assert merged["settings"]["seeds"] == [0, 1, 2] and len(merged["runs"]) == 6
    okd = next(row for row in merged["table"] if row["config"] == "okd")
    assert abs(okd["eval_loss"] - 4.2666667) < 1e-6 and okd["seeds"] == 3
    assert "in 2 of 3 seeds" in merged["conclusion"]
    other = write(tmp_path / "other.json", {**settings, "steps": 20}, all_runs.filter(pl.col("seed") == 0))
    refused = subprocess.run([sys.executable, str(SCRIPT), "--merge", parts[1], other, "--out",
                              str(tmp_path / "x.json")], capture_output=True, text=True)
    assert refused.returncode != 0 and "'steps': (40, 20)" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "x.json").exists()
