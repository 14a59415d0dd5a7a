"""Every interruption point of a distillation run leaves a state that `--resume` or a plain rerun finishes, to the
same student as an uninterrupted run; and two writers never share one output folder.

Each case runs `distill` in a child process that kills itself (SIGKILL: no clean-up at all) at one point: before a
checkpoint, in the middle of one (its files written, its completion mark not), right after one, during the final
evaluation, and while the student and metrics.json are being saved.
"""

import json
import subprocess
import sys

import polars as pl
import pytest
from safetensors.torch import load_file

RECORDS = [{"prompt": f"def f{i}(a, b):\n", "response": f"    return a + {i} * b\n"} for i in range(12)]
CHILD = r"""
import json, os, signal, sys
import kdviz.train.run as run
import kdviz.train.trainer as trainer
from kdviz.train import distill

point, teacher, student, data, out, resume = sys.argv[1:7]
calls = {"n": 0}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def counted(original, when, after=False):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == when and not after:
            die()
        result = original(*args, **kwargs)
        if calls["n"] == when and after:
            die()
        return result
    return wrapper

if point == "before-checkpoint":
    trainer.Trainer._save_checkpoint = counted(trainer.Trainer._save_checkpoint, 2)
elif point == "during-checkpoint":
    trainer.write_mark = counted(trainer.write_mark, 1)
elif point == "after-checkpoint":
    trainer.write_mark = counted(trainer.write_mark, 2, after=True)
elif point == "final-evaluation":
    trainer.evaluate_student = counted(trainer.evaluate_student, 2)
elif point == "saving":
    run.DistillResult.save = counted(run.DistillResult.save, 1)
distill(teacher, student, data, loss="atkd", steps=6, save_steps=2, batch_size=4, eval_size=4, device="cpu",
        progress=False, out_dir=out, resume_from_checkpoint=resume == "resume" or None, eval_generate_examples=1,
        eval_generate_tokens=4, learning_rate=1e-2, probe_every=2)
"""
POINTS = ["before-checkpoint", "during-checkpoint", "after-checkpoint", "final-evaluation", "saving"]


def run_child(point, model_dirs, data, out, resume=False):
    return subprocess.run([sys.executable, "-c", CHILD, point, str(model_dirs["teacher"]), str(model_dirs["student"]),
                           str(data), str(out), "resume" if resume else "fresh"], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def uninterrupted(model_dirs, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run_child("none", model_dirs, data, out)
    assert done.returncode == 0, done.stderr
    return load_file(out / "model.safetensors"), pl.read_parquet(out / "trajectory.parquet")


@pytest.mark.parametrize("point", POINTS)
def test_a_run_killed_at_any_point_is_finished_by_resume_or_a_plain_rerun(point, model_dirs, data, uninterrupted,
                                                                          tmp_path):
    out = tmp_path / "run"
    killed = run_child(point, model_dirs, data, out)
    assert killed.returncode == -9, f"the run was not killed at {point}: {killed.stderr[-2000:]}"
    assert not (out / "metrics.json").is_file()
    resumed = run_child("none", model_dirs, data, out, resume=True)
    if point == "during-checkpoint":  # the only checkpoint was half-written: --resume says so, a plain rerun works
        assert resumed.returncode != 0 and "half-written when the run was killed: removed" in resumed.stderr
        resumed = run_child("none", model_dirs, data, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert not metrics["interrupted"] and metrics["steps_done"] == 6 and metrics["after"] is not None
    finished, weights = load_file(out / "model.safetensors"), uninterrupted[0]
    assert finished.keys() == weights.keys()
    for name, tensor in weights.items():
        assert finished[name].equal(tensor), f"{name} differs from the uninterrupted run's after {point}"
    trajectory = pl.read_parquet(out / "trajectory.parquet")  # the probes: the steps done, then the resumed ones
    assert trajectory.equals(uninterrupted[1]), f"the trajectory differs from the uninterrupted run's after {point}"
    again = run_child("none", model_dirs, data, out, resume=True)
    assert again.returncode != 0 and "already finished its 6 steps" in again.stderr


def test_two_runs_into_one_folder_refuse_the_second_with_the_name_of_the_first(model_dirs, data, tmp_path):
    from kdviz.files import writer_lock
    from kdviz.train import distill

    out = tmp_path / "run"
    out.mkdir()
    with writer_lock(out, what="output folder", inside=True):  # the first run, still going
        with pytest.raises(ValueError, match=r"Another kdviz run is writing the output folder .*run \(pid \d+, `"):
            distill(model_dirs["teacher"], model_dirs["student"], data, loss="fkl", steps=1, batch_size=4, eval_size=4,
                    device="cpu", progress=False, out_dir=out)
    assert not (out / ".kdviz-lock").exists() and list(out.iterdir()) == []


def test_two_teacher_cache_builds_into_one_folder_refuse_the_second(pair, tmp_path):
    from kdviz.cache import build
    from kdviz.data import load_data
    from kdviz.files import TEMP_MARK, writer_lock

    data = load_data(RECORDS, pair.tokenizer, max_length=64)
    out = tmp_path / "cache"
    stale = tmp_path / f"cache{TEMP_MARK}deadbeef"  # what a killed build left
    stale.mkdir()
    (stale / "ids.npy").write_bytes(b"half")
    with writer_lock(out, what="teacher cache"):
        with pytest.raises(ValueError, match="Another kdviz run is writing the teacher cache"):
            build(pair.teacher, pair.tokenizer, data, out, top_k=4, progress=False)
    build(pair.teacher, pair.tokenizer, data, out, top_k=4, progress=False)
    assert not stale.exists() and (out / "meta.json").is_file()
    with pytest.raises(ValueError, match="exists; give a new folder"):
        build(pair.teacher, pair.tokenizer, data, out, top_k=4, progress=False)
