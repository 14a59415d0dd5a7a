"""The teacher cache at scale: parts, resume after a kill, two processes, the compact encoding, imported log-probs.

Every comparison is array for array (the checksums meta.json records cover every byte), or for the
compact encoding against the exact cache of the same teacher with the bounds the docs promise.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from conftest import TEXTS
from kdviz import analyze, load_pair
from kdviz.cache import TeacherCache, build
from kdviz.cache.importing import convert, from_logprobs
from kdviz.cli import main
from kdviz.data import load_data, target_positions
from kdviz.files import seal

RECORDS = [{"prompt": f"Q{i}:" + " why" * (i % 5), "response": TEXTS[i % len(TEXTS)][: 20 + 7 * i]} for i in range(14)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KDVIZ_STRICT_TESTS": "0"}


@pytest.fixture(scope="module")
def data(pair):
    return load_data(RECORDS, pair.tokenizer, max_length=64)


@pytest.fixture(scope="module")
def exact16(pair, data, tmp_path_factory):
    return build(pair.teacher, pair.tokenizer, data, tmp_path_factory.mktemp("exact") / "k16", top_k=16,
                 encoding="exact", part_tokens=40, progress=False)


def same_arrays(a: TeacherCache, b: TeacherCache) -> None:
    """The two caches hold the same bytes in every array (and the same parts)."""
    assert a.meta["checksums"] == b.meta["checksums"]
    assert [(p.start, p.end, p.rows) for p in a.parts] == [(p.start, p.end, p.rows) for p in b.parts]
    for part_a, part_b in zip(a.parts, b.parts):
        for name in part_a.arrays:
            assert np.array_equal(part_a.arrays[name], part_b.arrays[name]), name


def test_parts_hold_the_rows_of_one_whole_capture(pair, data, exact16, tmp_path):
    whole = build(pair.teacher, pair.tokenizer, data, tmp_path / "one", top_k=16, encoding="exact",
                  part_tokens=10**9, progress=False)
    assert len(whole.parts) == 1 and len(exact16.parts) > 3
    for examples in (list(range(len(data))), [5, 0, 13, 7, 7, 2]):  # (any order, across parts)
        a, b = whole.rows(examples), exact16.rows(examples)
        assert torch.equal(a.ids, b.ids)  # the values to float rounding: other batches, other kernels' sums
        for x, y in zip(a[1:], b[1:]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert exact16.meta["tokens"] == data.n_targets == sum(p.rows for p in exact16.parts)


CHILD = """
import os, signal, sys, json
from kdviz import load_pair
from kdviz.data import load_data
import kdviz.cache.capture as capture
teacher, student, records, out, kill_at = sys.argv[1:6]
pair = load_pair(teacher, student, device="cpu")
data = load_data(json.loads(open(records).read()), pair.tokenizer, max_length=64)
calls, score = [0], capture.Scorer.score
def dying(self, *args):
    calls[0] += 1
    if calls[0] == int(kill_at):  # mid-capture: some parts written, one half written
        os.kill(os.getpid(), signal.SIGKILL)
    return score(self, *args)
capture.Scorer.score = dying
capture.build(pair.teacher, pair.tokenizer, data, out, top_k=8, part_tokens=40, batch_tokens=48, progress=False)
print("built")
"""


def run_child(model_dirs, tmp_path, out, kill_at):
    records, script = tmp_path / "records.json", tmp_path / "child.py"
    records.write_text(json.dumps(RECORDS))
    script.write_text(CHILD)
    return subprocess.run([sys.executable, str(script), str(model_dirs["teacher"]), str(model_dirs["student"]),
                           str(records), str(out), str(kill_at)], capture_output=True, text=True, timeout=600, env=ENV)


def test_a_capture_killed_midway_resumes_to_the_uninterrupted_cache(model_dirs, tmp_path):
    killed = run_child(model_dirs, tmp_path, tmp_path / "resumed", kill_at=6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    work = tmp_path / "resumed.partial"
    finished = sorted(p.name for p in work.iterdir() if p.name.startswith("part-") and ".kdviz-tmp-" not in p.name)
    assert finished and any(".kdviz-tmp-" in p.name for p in work.iterdir())  # one part was half written
    again = run_child(model_dirs, tmp_path, tmp_path / "resumed", kill_at=0)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"reusing {len(finished)} of " in again.stderr
    whole = run_child(model_dirs, tmp_path, tmp_path / "whole", kill_at=0)
    assert whole.returncode == 0 and "reusing" not in whole.stderr
    resumed, uninterrupted = TeacherCache.open(tmp_path / "resumed"), TeacherCache.open(tmp_path / "whole")
    assert len(resumed.parts) > len(finished)
    same_arrays(resumed, uninterrupted)
    assert not work.exists() and not list(tmp_path.glob("*.kdviz-tmp-*"))


def test_two_processes_under_torchrun_write_the_single_process_cache(model_dirs, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    common = ["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--student", str(model_dirs["student"]),
              "--data", str(data), "--top-k", "8", "--part-tokens", "40", "--batch-tokens", "48", "--device", "cpu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kdviz", *common, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Teacher cache of") == 1  # rank 0 reports
    one = subprocess.run([sys.executable, "-m", "kdviz", *common, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=600, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = TeacherCache.open(tmp_path / "two"), TeacherCache.open(tmp_path / "one")
    assert len(a.parts) >= 4
    same_arrays(a, b)


def test_an_interrupted_capture_refuses_other_settings_and_resumes_with_its_own(pair, data, tmp_path, monkeypatch,
                                                                                capsys):
    module = sys.modules["kdviz.cache.capture"]
    score, calls = module.Scorer.score, []

    def interrupted(self, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return score(self, *args)

    monkeypatch.setattr(module.Scorer, "score", interrupted)
    options = dict(part_tokens=40, batch_tokens=48, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build(pair.teacher, pair.tokenizer, data, tmp_path / "c", top_k=8, **options)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"c.partial holds the finished parts of another capture \(top_k 8, this one 4\)"
                                         r". Run that command again to finish it, or remove"):
        build(pair.teacher, pair.tokenizer, data, tmp_path / "c", top_k=4, **options)
    resumed = build(pair.teacher, pair.tokenizer, data, tmp_path / "c", top_k=8, **options)
    assert "teacher-cache: reusing " in capsys.readouterr().err
    same_arrays(resumed, build(pair.teacher, pair.tokenizer, data, tmp_path / "d", top_k=8, **options))


# The compact encoding ------------------------------------------------------------------------------------------

def test_compact_rows_keep_u_and_tkd_and_move_kl_and_dkd_by_less_than_half_a_percent(pair, data, exact16, tmp_path):
    compact = build(pair.teacher, pair.tokenizer, data, tmp_path / "c16", top_k=16, part_tokens=40, progress=False)
    assert (compact.bytes_per_token, exact16.bytes_per_token) == (55, 104)  # k = 16: 32 + 11 + 12 against 32 + 72
    student = pair.student_name
    tables = [analyze(load_pair(None, student, teacher_cache=c.folder, device="cpu"), data, cache=False,
                      progress=False).df for c in (exact16, compact)]
    exact, approx = tables
    for name in ("unc", "tkd"):
        assert float((exact[name] - approx[name]).abs().max()) < 1e-3, name
    for name in ("kl", "dkd"):
        assert abs(approx[name].sum() - exact[name].sum()) < 0.005 * exact[name].sum(), name
        assert float(((approx[name] - exact[name]).abs() / exact[name].clip(lower_bound=1e-2)).quantile(0.9)) < 0.02
    rows_exact, rows_compact = exact16.rows(list(range(len(data)))), compact.rows(list(range(len(data))))
    assert torch.equal(rows_exact.ids, rows_compact.ids) and torch.equal(rows_exact.target_logp, rows_compact.target_logp)
    sums = [torch.logsumexp(torch.cat([r.logprobs, r.tail_logp[:, None]], 1), 1) for r in (rows_exact, rows_compact)]
    y = torch.cat([torch.tensor(ex.input_ids)[torch.tensor(target_positions(ex)) + 1] for ex in data])
    in_top = (rows_exact.ids == y[:, None]).any(1)  # (where the target is outside the top-k its mass is added)
    torch.testing.assert_close(sums[1][in_top], sums[0][in_top], atol=1e-5, rtol=0)


def test_a_format_2_cache_is_read_and_converts_to_the_compact_cache_the_teacher_makes(pair, data, exact16, tmp_path,
                                                                                     capsys):
    old = tmp_path / "old"  # as kdviz wrote it before parts: whole arrays in the folder itself, format 2
    old.mkdir()
    for name in exact16.parts[0].arrays:
        np.save(old / f"{name}.npy", np.concatenate([np.asarray(p.arrays[name]) for p in exact16.parts]))
    for name in ("offsets", "keys"):
        shutil.copy(exact16.folder / f"{name}.npy", old)
    meta = {k: v for k, v in exact16.meta.items() if k not in ("parts", "encoding", "part_tokens", "source")}
    meta.update(format=2, checksums=None)
    (old / "meta.json").write_text(json.dumps(meta))
    seal(old / "meta.json")
    legacy = TeacherCache.open(old)
    assert legacy.encoding == "exact" and len(legacy.parts) == 1
    for a, b in zip(legacy.rows([3, 1, 12]), exact16.rows([3, 1, 12])):
        assert torch.equal(a, b)
    assert main(["teacher-cache", "--convert", str(old), "--out", str(tmp_path / "new"), "--part-tokens", "40"]) == 0
    assert "compact, 55 bytes per token" in capsys.readouterr().out
    native = build(pair.teacher, pair.tokenizer, data, tmp_path / "native", top_k=16, part_tokens=40, progress=False)
    same_arrays(TeacherCache.open(tmp_path / "new"), native)  # (the same rows, encoded by the same code)
    assert main(["teacher-cache", "--convert", str(native.folder), "--out", str(tmp_path / "again")]) == 2
    assert "only an exact cache can be converted" in capsys.readouterr().err


# Log-probs from elsewhere ---------------------------------------------------------------------------------------

def logprobs_frame(pair, data, k, *, target=True):
    """What benchmarks/vllm_logprobs.py writes, made here with the tiny teacher: per example its ids, and per
    position t the top-k of the teacher's distribution over token t (entry 0 empty) and log p(token t)."""
    rows = []
    for example in data:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            log_p = torch.log_softmax(pair.teacher(ids).logits[0].float(), -1)  # position t - 1 scores token t
        top = log_p[:-1].topk(k, dim=1)
        row = {"input_ids": example.input_ids, "topk_ids": [[]] + top.indices.tolist(),
               "topk_logprobs": [[]] + top.values.tolist()}
        if target:
            row["target_logprobs"] = [None] + log_p[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist()
        rows.append(row)
    return pl.DataFrame(rows, schema_overrides={"topk_logprobs": pl.List(pl.List(pl.Float32)),
                                                **({"target_logprobs": pl.List(pl.Float32)} if target else {})})


def test_imported_log_probs_equal_the_native_cache_of_the_same_teacher(pair, data, exact16, tmp_path):
    file = tmp_path / "logprobs.parquet"
    logprobs_frame(pair, data, 16).write_parquet(file)
    imported = from_logprobs(file, pair.tokenizer, data, tmp_path / "imported", encoding="exact", part_tokens=40,
                             progress=False)
    assert imported.top_k == 16 and imported.caveats == []
    everything = list(range(len(data)))
    native, mine = exact16.rows(everything), imported.rows(everything)
    assert torch.equal(native.ids, mine.ids)
    for name in ("logprobs", "target_logp", "tail_logp"):
        torch.testing.assert_close(getattr(mine, name), getattr(native, name), rtol=1e-5, atol=1e-5)
    tables = [analyze(load_pair(None, pair.student_name, teacher_cache=c.folder, device="cpu"), data, cache=False,
                      progress=False).df for c in (exact16, imported)]
    for name in ("unc", "tkd", "dkd", "kl", "rkl"):
        torch.testing.assert_close(tables[1][name].to_torch(), tables[0][name].to_torch(), rtol=1e-4, atol=1e-5)
    if pytest.importorskip("datasets"):
        import datasets

        folder = tmp_path / "dataset"
        datasets.Dataset.from_polars(logprobs_frame(pair, data, 16)).save_to_disk(str(folder))
        compact = from_logprobs(folder, pair.tokenizer, data, tmp_path / "from-dataset", part_tokens=40, progress=False)
        native_compact = build(pair.teacher, pair.tokenizer, data, tmp_path / "nc", top_k=16, part_tokens=40,
                               progress=False)
        for a, b in zip(compact.rows(everything), native_compact.rows(everything)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_without_target_log_probs_the_cache_says_what_is_a_bound(pair, data, exact16, tmp_path, capsys):
    file = tmp_path / "no-target.parquet"
    logprobs_frame(pair, data, 16, target=False).write_parquet(file)
    cache = from_logprobs(file, pair.tokenizer, data, tmp_path / "c", encoding="exact", progress=False)
    everything = list(range(len(data)))
    native, mine = exact16.rows(everything), cache.rows(everything)
    outside = ~(native.ids == torch.cat([torch.tensor(ex.input_ids)[torch.tensor(target_positions(ex)) + 1]
                                         for ex in data])[:, None]).any(1)
    assert 0 < int(outside.sum()) < len(outside)
    assert torch.all(mine.target_logp[outside] >= native.target_logp[outside])  # p_y bounded above: u below
    torch.testing.assert_close(mine.target_logp[~outside], native.target_logp[~outside])
    (caveat,) = cache.caveats
    assert f"{int(outside.sum())} of {len(outside)} target tokens are outside the top-k" in caveat
    assert "u is a lower bound and TKD, DKD and KL are inexact" in caveat
    from kdviz.files import KdvizWarning

    with pytest.warns(KdvizWarning, match="outside the top-k and the file gives no target log-prob"):
        cached = load_pair(None, pair.student_name, teacher_cache=cache.folder, device="cpu")
    assert cached.source.recorded()["cache_caveats"] == [caveat]


@pytest.mark.parametrize("change,message", [
    (lambda r: r["input_ids"].__setitem__(5, (r["input_ids"][5] + 1) % 300),
     r"row 2 \(example list:3\) is not the student's tokenization of the data: at position 5 the file has token"),
    (lambda r: r["topk_logprobs"][-1].reverse(), r"row 2 \(example list:3\), position \d+ has top-k log-probs not in order"),
    (lambda r: r["topk_logprobs"][-1].__setitem__(0, 0.5), r"position \d+ has a log-prob that is NaN or above 0"),
    (lambda r: r["topk_logprobs"][-1].__setitem__(slice(None), [math.log(0.2)] * 8),
     r"position \d+ has top-k probabilities summing to more than 1"),
    (lambda r: r["topk_ids"][-1].__setitem__(1, r["topk_ids"][-1][0]), r"has the same token id twice"),
    (lambda r: r["topk_ids"][-1].__setitem__(1, 999), r"a top-k token id outside the vocabulary of 300"),
])
def test_log_probs_that_are_not_the_datas_valid_top_k_are_refused_with_the_place(pair, data, tmp_path, change,
                                                                               message):
    rows = logprobs_frame(pair, data, 8).to_dicts()
    change(rows[2])
    file = tmp_path / "bad.parquet"
    pl.DataFrame(rows, schema_overrides={"topk_logprobs": pl.List(pl.List(pl.Float64))}).write_parquet(file)
    with pytest.raises(ValueError, match=message):
        from_logprobs(file, pair.tokenizer, data, tmp_path / "c", part_tokens=40, progress=False)
    assert not (tmp_path / "c").exists()


def test_the_cli_imports_log_probs_and_refuses_bad_input_without_a_traceback(pair, model_dirs, data, tmp_path, capsys):
    records = tmp_path / "d.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    file = tmp_path / "lp.parquet"
    logprobs_frame(pair, data, 8).write_parquet(file)
    common = ["teacher-cache", "--from-logprobs", str(file), "--data", str(records)]
    assert main([*common, "--out", str(tmp_path / "c")]) == 2
    assert "--from-logprobs needs --student" in capsys.readouterr().err
    assert main([*common, "--student", str(model_dirs["student"]), "--max-length", "64", "--out",
                 str(tmp_path / "c")]) == 0
    assert "Teacher cache of the log-probs in" in capsys.readouterr().out
    assert main([*common, "--student", str(model_dirs["student"]), "--max-length", "64", "--limit", "20", "--out",
                 str(tmp_path / "d")]) == 0  # (the file has 14 rows, --limit keeps the 14 examples)
    pl.DataFrame({"input_ids": [[1, 2]]}).write_parquet(tmp_path / "thin.parquet")
    assert main(["teacher-cache", "--from-logprobs", str(tmp_path / "thin.parquet"), "--data", str(records),
                 "--student", str(model_dirs["student"]), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "lacks the column(s) topk_ids, topk_logprobs" in err and "Traceback" not in err
    for value, message in ((7, "has 1 rows, the data 14 examples"), (7, "topk_ids holds int values, not lists"),
                           ("ab", "topk_ids holds str values, not lists")):
        rows = 1 if "rows" in message else 14
        pl.DataFrame({"input_ids": [[1, 2]] * rows, "topk_ids": [value] * rows, "topk_logprobs": [[0.0]] * rows}
                     ).write_parquet(tmp_path / "odd.parquet")
        assert main(["teacher-cache", "--from-logprobs", str(tmp_path / "odd.parquet"), "--data", str(records),
                     "--student", str(model_dirs["student"]), "--out", str(tmp_path / "e")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit):  # one source only (argparse)
        main(["teacher-cache", "--teacher", str(model_dirs["teacher"]), "--from-logprobs", str(file), "--data",
              str(records), "--out", str(tmp_path / "f")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_vllm_script_turns_prompt_logprobs_into_a_file_the_import_reads(pair, data, exact16, tmp_path):
    """benchmarks/vllm_logprobs.py's conversion, fed what vLLM's prompt_logprobs holds: per token a dict id ->
    Logprob(logprob, rank) with the top-k and the actual token (an extra entry when it ranks past k), unordered."""
    import importlib.util
    from collections import namedtuple
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "vllm_logprobs.py"
    spec = importlib.util.spec_from_file_location("vllm_logprobs", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    Logprob = namedtuple("Logprob", "logprob rank decoded_token")
    rows = []
    for example in data:
        ids = torch.tensor([example.input_ids])
        with torch.no_grad():
            log_p = torch.log_softmax(pair.teacher(ids).logits[0].float(), -1)
        prompt_logprobs = [None]
        for t in range(1, len(example.input_ids)):
            ranks = torch.argsort(torch.argsort(log_p[t - 1], descending=True)) + 1
            chosen = set(log_p[t - 1].topk(16).indices.tolist()) | {example.input_ids[t]}
            prompt_logprobs.append({tid: Logprob(float(log_p[t - 1, tid]), int(ranks[tid]), None)
                                    for tid in sorted(chosen, reverse=True)})
        rows.append(script.example_row(example, prompt_logprobs, 16, {p + 1 for p in target_positions(example)}))
    folder = tmp_path / "logprobs"
    folder.mkdir()
    script.write_rows(rows[:5], folder / "part-00000.parquet")
    script.write_rows(rows[5:], folder / "part-00001.parquet")
    imported = from_logprobs(folder, pair.tokenizer, data, tmp_path / "c", encoding="exact", progress=False)
    native, mine = exact16.rows(list(range(len(data)))), imported.rows(list(range(len(data))))
    assert torch.equal(native.ids, mine.ids) and imported.caveats == []
    for name in ("logprobs", "target_logp", "tail_logp"):
        torch.testing.assert_close(getattr(mine, name), getattr(native, name), rtol=1e-5, atol=1e-5)
