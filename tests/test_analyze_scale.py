"""Analysis at scale: length buckets, parts on disk, resume and processes change how work is cut, never the table.

Every comparison is for the three splits (per sequence, per batch, over the dataset): same
rows in the same order, same values to float rounding, same hard flags.
"""

import json
import os
import subprocess
import sys

import polars as pl
import pytest
import torch

from conftest import TEXTS
from kdviz import TokenTable, analyze
from kdviz.batching import length_batches, plan_parts
from kdviz.maths.decomposition import SCALAR_FIELDS

RECORDS = [{"prompt": f"Q{i}:" + " why" * (i % 5), "response": TEXTS[i % len(TEXTS)][: 20 + 7 * i]} for i in range(14)]
SPLITS = ["sequence", "batch", "dataset"]


def assert_same_table(a: pl.DataFrame, b: pl.DataFrame, *, same_source: bool = True):
    assert a.columns == b.columns
    for name in ("doc_id", "position", "token_id", "is_response", "hard", "token", *(["source"] * same_source)):
        assert a[name].to_list() == b[name].to_list(), name
    for name in (*SCALAR_FIELDS, "unc_threshold"):
        torch.testing.assert_close(a[name].to_torch(), b[name].to_torch(), rtol=1e-4, atol=1e-5, equal_nan=True)


GROUP = 3  # batch_size: for split="batch" the groups are GROUP consecutive examples, whatever the forward passes


@pytest.fixture(scope="module")
def reference(pair):
    """One example per forward pass (a budget of 1 token), one part: the plainest way to compute the table."""
    return {split: analyze(pair, RECORDS, split=split, k=0.3, batch_size=GROUP, batch_tokens=1, part_tokens=10**9,
                           cache=False, progress=False).df for split in SPLITS}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("layout", [dict(batch_tokens=64), dict(batch_tokens=10**6),
                                    dict(batch_tokens=40, padding_side="left")],
                         ids=["token-budget", "full-batches", "left-padding"])
def test_length_bucketed_batches_give_the_same_table(pair, reference, split, layout):
    table = analyze(pair, RECORDS, split=split, k=0.3, batch_size=GROUP, cache=False, progress=False, **layout)
    assert_same_table(table.df, reference[split])


@pytest.mark.parametrize("split", SPLITS)
def test_streamed_in_many_parts_equals_one_part(pair, reference, split, tmp_path):
    table = analyze(pair, RECORDS, split=split, k=0.3, batch_size=GROUP, part_tokens=30, cache_dir=tmp_path,
                    progress=False)
    assert_same_table(table.df, reference[split])
    lazy = TokenTable.load(next((tmp_path / "analyze").glob("*.parquet")), lazy=True)
    assert lazy._df is None and str(lazy.summary()) == str(table.summary())
    assert len(lazy) == table.df.height


def test_parts_and_batches_are_planned_by_length():
    assert [(p.start, p.end) for p in plan_parts([10, 10, 10, 10, 10], 25)] == [(0, 3), (3, 5)]
    assert sum(p.rows for p in plan_parts([10, 4, 7], 5)) == 9 + 3 + 6
    batches = length_batches([5, 50, 7, 48, 6], batch_size=2, batch_tokens=1000)
    assert batches == [[1, 3], [2, 4], [0]]  # longest first, similar lengths together
    assert length_batches([100, 10, 10], batch_size=8, batch_tokens=30) == [[0], [1, 2]]
    # padding at most doubles the work: a 2,866-token record once made four short ones pad to its length
    assert length_batches([2866, 893, 352, 256, 210], batch_size=8, batch_tokens=16384) == [[0], [1], [2, 3, 4]]


@pytest.mark.parametrize("split", SPLITS)
def test_an_interrupted_run_resumes_from_its_finished_parts_to_the_same_table(pair, reference, split, tmp_path,
                                                                             monkeypatch, capsys):
    module = sys.modules["kdviz.analysis.run"]  # (where analyze computes its parts)
    original, calls = module.part_frame, []

    def interrupted_after_two_parts(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "part_frame", interrupted_after_two_parts)
    with pytest.raises(KeyboardInterrupt):
        analyze(pair, RECORDS, split=split, k=0.3, batch_size=GROUP, part_tokens=40, cache_dir=tmp_path,
                progress=False)
    assert len(list((tmp_path / "analyze").glob("*.parts/part-*.parquet"))) == 2
    monkeypatch.setattr(module, "part_frame", original)
    resumed = analyze(pair, RECORDS, split=split, k=0.3, batch_size=GROUP, part_tokens=40, cache_dir=tmp_path,
                      progress=False)
    assert "reusing 2 of" in capsys.readouterr().err
    assert_same_table(resumed.df, reference[split])
    assert not list((tmp_path / "analyze").glob("*.parts"))  # the parts are removed once the table is whole


def test_the_soft_capped_fallback_gives_the_same_table(pair, reference, monkeypatch):
    monkeypatch.setattr(type(pair), "linear_heads", property(lambda self: False))
    monkeypatch.setattr("kdviz.teachers.decompose_hidden",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("hidden path used")))
    table = analyze(pair, RECORDS, split="dataset", k=0.3, batch_size=GROUP, cache=False, progress=False)
    assert_same_table(table.df, reference["dataset"])


SHARDED = """
import json, sys
import torch.distributed as dist
from kdviz import analyze, load_pair
from kdviz.distributed import world
records = json.loads(open(sys.argv[3]).read())
pair = load_pair(sys.argv[1], sys.argv[2], device="cpu")
for split in ("sequence", "batch", "dataset"):
    table = analyze(pair, records, split=split, k=0.3, batch_size=3, part_tokens=40, cache=False, progress=False,
                    out=f"{sys.argv[4]}/{split}.parquet")
    assert len(table) > 0
print(f"rank {world().rank} of {world().size}: {dist.is_initialized()}")
"""


def test_two_processes_under_torchrun_give_the_single_process_table(model_dirs, reference, tmp_path):
    records = tmp_path / "records.json"
    records.write_text(json.dumps(RECORDS))
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED)
    env = {**os.environ, "KDVIZ_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(model_dirs["teacher"]), str(model_dirs["student"]), str(records),
                           str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2: True" in done.stdout and "rank 1 of 2: True" in done.stdout
    for split in SPLITS:
        assert_same_table(TokenTable.load(tmp_path / f"{split}.parquet").df, reference[split])


def test_kdviz_analyze_under_torchrun_writes_one_table_from_two_ranks(model_dirs, reference, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "t.parquet"
    env = {**os.environ, "KDVIZ_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "kdviz", "analyze", "--teacher", str(model_dirs["teacher"]), "--student",
                           str(model_dirs["student"]), "--data", str(data), "--out", str(out), "--device", "cpu",
                           "--split", "batch", "--batch-size", str(GROUP), "--k", "0.3", "--part-tokens", "40"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("target tokens:") == 1  # only rank 0 prints the summary
    assert_same_table(TokenTable.load(out).df, reference["batch"], same_source=False)  # a file, not a list
