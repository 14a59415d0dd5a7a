"""Probes: the rows of step 0 and of the last step equal `kdviz analyze` of the initial and of the saved final
student (same teacher, probe data, template), with a live teacher and with a teacher cache."""

import polars as pl
import pytest
import torch

from kdviz import analyze, load_pair
from kdviz.cache import build
from kdviz.data import load_data
from kdviz.train import distill

RECORDS = [{"prompt": f"def f{i}(a, b):\n", "response": f"    return a + {i} * b\n"} for i in range(14)]
PROBES = RECORDS[:4]
NUMBERS = ("unc", "kl", "tkd", "dkd", "rkl", "t_logp", "s_logp")


def same_rows(probe: pl.DataFrame, table: pl.DataFrame) -> None:
    targets = table.filter(pl.col("is_response")).sort("doc_id", "position")
    probe = probe.sort("doc_id", "position")
    assert probe.select("doc_id", "position", "token_id", "hard").equals(
        targets.select("doc_id", "position", "token_id", "hard"))
    assert probe["s_rank"].equals(targets["s_rank"])
    for name in NUMBERS:
        torch.testing.assert_close(probe[name].to_torch(), targets[name].to_torch(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher_from", ["live", "cache"])
def test_first_and_last_probes_equal_the_analysis_of_the_initial_and_final_students(model_dirs, tmp_path,
                                                                                     teacher_from):
    teacher, student = str(model_dirs["teacher"]), str(model_dirs["student"])
    options = {}
    if teacher_from == "cache":
        pair = load_pair(teacher, student, device="cpu")
        cache = tmp_path / "cache"
        build(pair.teacher, pair.tokenizer, load_data(RECORDS, pair.tokenizer, max_length=64), cache,
              top_k=len(pair.tokenizer), max_length=64, progress=False)
        options = {"teacher_cache": cache}
    out = tmp_path / "run"
    result = distill(None if options else teacher, student, RECORDS, loss="fkl", steps=5, batch_size=4, eval_size=2,
                     device="cpu", progress=False, out_dir=out, probe_every=2, probe_data=PROBES,
                     learning_rate=5e-2, eval_generate_examples=0, **options)
    trajectory = pl.read_parquet(out / "trajectory.parquet")
    assert sorted(trajectory["step"].unique().to_list()) == [0, 2, 4, 5]
    assert trajectory.equals(result.trajectory) and 0 < result.probe_seconds < result.train_seconds
    analyse = dict(cache=False, progress=False, top_k=1, max_length=64)
    before = analyze(load_pair(None if options else teacher, student, device="cpu", **options), PROBES, **analyse)
    after = analyze(load_pair(None if options else teacher, out, device="cpu", **options), PROBES, **analyse)
    same_rows(trajectory.filter(pl.col("step") == 0), before.df)
    same_rows(trajectory.filter(pl.col("step") == 5), after.df)
    first, last = (trajectory.filter(pl.col("step") == s) for s in (0, 5))
    assert not torch.allclose(first["kl"].to_torch(), last["kl"].to_torch())  # the probes follow the student
    assert first["unc"].equals(last["unc"]) and first["hard"].equals(last["hard"])  # the teacher side is fixed


def test_probe_every_is_checked(model_dirs):
    with pytest.raises(ValueError, match="probe_every must be an integer >= 1, got 0"):
        distill(str(model_dirs["teacher"]), str(model_dirs["student"]), RECORDS, steps=2, probe_every=0)
