"""Checkpoints: which are complete, what run wrote them, whether they can be resumed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from kdviz.data import TokenDataset
from kdviz.files import TEMP_MARK, changed_file, expand, file_checksums, seal, seal_problem, write_text
from kdviz.train.config import DistillConfig, run_settings

CHECKPOINT_MARK = "kdviz_checkpoint.json"  # written last: a checkpoint folder with it is complete
EVAL_BEFORE = "eval_before.json"  # the evaluation before training, reused when a run resumes
LEFT_BY_A_START = (EVAL_BEFORE, ".kdviz-lock", "trajectory.parquet")  # what a run stopped before a checkpoint leaves


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
    """The checkpoint to continue (`resume`: True for the latest in `out_dir`, or a path), checked against `args`.

    A run killed after its last checkpoint (in the final evaluation or while saving) resumes too: it trains no
    more steps, evaluates and saves. Checkpoint folders a kill left half-written are removed."""
    if out_dir is None:
        raise ValueError("resume_from_checkpoint needs out_dir: the checkpoints are written there.")
    removed = remove_incomplete(out_dir)
    if resume is True:
        found = checkpoints(out_dir)
        if not found:
            half = f" ({', '.join(p.name for p in removed)} was half-written when the run was killed: removed)" \
                if removed else ""
            raise ValueError(f"No complete checkpoint in {expand(out_dir)} to resume from{half}. Run without --resume "
                             "to start (checkpoints are written every --save-steps steps and when a run is "
                             "interrupted).")
        path = found[-1]
    else:
        path = expand(resume)
        if not (path / CHECKPOINT_MARK).is_file():
            raise ValueError(f"{path} is not a complete kdviz checkpoint (no {CHECKPOINT_MARK}); give a "
                             f"checkpoint-N folder written by kdviz distill, or True for the latest in --out.")
    check_checkpoint(path, args)
    if checkpoint_step(path) >= args.max_steps and finished(out_dir):
        raise ValueError(f"The run in {expand(out_dir)} already finished its {args.max_steps} steps: its student and "
                         "metrics.json are there; there is nothing to resume. To train longer, start a new run with "
                         "more --steps in another --out.")
    return path


def check_checkpoint(path: Path, args: DistillConfig) -> None:
    """ValueError when checkpoint `path` is damaged or was written with other settings than `args`."""
    saved, now = _read_json(path / CHECKPOINT_MARK, "checkpoint mark"), run_settings(args)
    problem = seal_problem(path / CHECKPOINT_MARK) or changed_file(path, saved.get("files", {}), since="it was written")
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


def finished(out_dir: str | Path) -> bool:
    """Whether the run in `out_dir` saved its student and metrics.json (written last) and was not interrupted."""
    metrics = expand(out_dir) / "metrics.json"
    if not metrics.is_file():
        return False
    return not _read_json(metrics, "run metrics").get("interrupted", False)


def remove_incomplete(out_dir: str | Path) -> list[Path]:
    """Remove checkpoint folders without their mark (a kill while one was written); the removed folders. Called
    while the run holds the folder's lock, so no other run is writing them."""
    folder = expand(out_dir)
    half = [path for path in folder.glob("checkpoint-*") if path.is_dir() and not (path / CHECKPOINT_MARK).is_file()] \
        if folder.is_dir() else []
    for path in half:
        shutil.rmtree(path)
    return half


def check_fresh(out_dir: str | Path) -> None:
    """ValueError unless `out_dir` is new, empty, or holds only what a failed start of a run leaves (which is
    removed: half-written checkpoints, the stored evaluation before training)."""
    folder = expand(out_dir)
    found = checkpoints(folder) if folder.is_dir() else []
    if found:
        raise ValueError(f"{folder} holds checkpoints of an earlier run (latest {found[-1].name}); continue "
                         "it with --resume (resume_from_checkpoint=True), or choose another --out.")
    remove_incomplete(folder)
    held = sorted(p.name for p in folder.iterdir() if TEMP_MARK not in p.name and p.name not in LEFT_BY_A_START) \
        if folder.is_dir() else []
    if held:
        what = ("a finished run" if "metrics.json" in held else "a model" if "config.json" in held else
                "a teacher cache" if "meta.json" in held else "files")
        raise ValueError(f"--out {folder} already holds {what} ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}"
                         "); saving the student there would replace them. Give a new or empty folder as --out (a "
                         "teacher's, a student's or a cache's folder never is one).")


def write_mark(folder: Path, args: DistillConfig, inputs: dict | None) -> None:
    """Mark checkpoint `folder` complete: the run's settings and inputs, and the checksums of its files (last)."""
    files = file_checksums(path for path in sorted(folder.iterdir())  # about 1 s per GB
                           if path.is_file() and path.name != CHECKPOINT_MARK and TEMP_MARK not in path.name)
    mark = {**run_settings(args), "inputs": inputs, "files": files}
    write_text(folder / CHECKPOINT_MARK, json.dumps(mark, indent=2), what="checkpoint mark")
    seal(folder / CHECKPOINT_MARK)
