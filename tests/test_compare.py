"""Runs side by side: per-token before/after, outcomes by a stated tolerance, summaries, the CLI and the widget."""

import json

import polars as pl
import pytest

import kdviz
from kdviz.cli import main
from kdviz.train import distill
from kdviz.widgets import RunComparison

RECORDS = [{"prompt": f"def f{i}(a, b):\n", "response": f"    return a + {i} * b\n"} for i in range(12)]


@pytest.fixture(scope="module")
def runs(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for loss in ("fkl", "kd-on-hard"):
        distill(str(model_dirs["teacher"]), str(model_dirs["student"]), RECORDS, loss=loss, steps=4, batch_size=4,
                eval_size=3, device="cpu", progress=False, out_dir=root / loss.replace("-", "_"), probe_every=2,
                learning_rate=2e-2, eval_generate_examples=0)
    return [root / "fkl", root / "kd_on_hard"]


def test_each_token_is_compared_before_and_after_every_run(runs):
    comparison = kdviz.compare(*runs, tolerance=0.002)
    assert comparison.runs == ["fkl", "kd_on_hard"]
    tokens, first = comparison.tokens, pl.read_parquet(runs[0] / "trajectory.parquet")
    assert tokens.height == first.filter(pl.col("step") == 0).height
    for run, folder in zip(comparison.runs, runs):
        probes = pl.read_parquet(folder / "trajectory.parquet")
        last = probes.filter(pl.col("step") == probes["step"].max()).sort("doc_id", "position")
        assert tokens[f"kl_{run}"].to_list() == last["kl"].to_list()
        change = tokens[f"change_{run}"]
        assert (change - (tokens[f"kl_{run}"] - tokens["kl_before"])).abs().max() < 1e-7
        outcome = tokens[f"outcome_{run}"]
        assert ((outcome == "learned") == (change < -0.002)).all() and ((outcome == "worse") == (change > 0.002)).all()
    summary = comparison.summary()
    assert set(summary["group"]) == {"hard", "easy", "all"}
    assert ((summary["learned"] + summary["unchanged"] + summary["worse"]) - 1).abs().max() < 1e-9
    assert set(comparison.by_decile()["group"].cast(pl.Int32)) <= set(range(10))
    worst = comparison.worst("fkl", 3)
    assert worst["change_fkl"].to_list() == sorted(tokens["change_fkl"].to_list(), reverse=True)[:3]


def test_the_default_tolerance_is_stated_and_other_probe_sets_are_refused(runs, tmp_path):
    comparison = kdviz.compare(*runs)
    assert comparison.tolerance == max(1e-3, 0.1 * comparison.tokens["kl_before"].median())
    assert f"by more than {comparison.tolerance:.4f} nats" in str(comparison)
    other = pl.read_parquet(runs[1] / "trajectory.parquet").filter(pl.col("doc_id") != 0)
    with pytest.raises(ValueError, match="was probed on other tokens"):
        kdviz.compare(runs[0], other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no probes"):
        kdviz.compare(tmp_path / "empty")


def test_the_cli_prints_the_summary_and_writes_the_table_and_a_report(runs, tmp_path, capsys):
    out, report = tmp_path / "tokens.parquet", tmp_path / "report.html"
    assert main(["compare", *map(str, runs), "--labels", "fkl", "hard", "--out", str(out), "--report",
                 str(report)]) == 0
    printed = capsys.readouterr().out
    assert "learned" in printed and "fkl" in printed and "hard" in printed
    assert {"kl_fkl", "change_hard", "outcome_hard"} <= set(pl.read_parquet(out).columns)
    assert "Worst regressions: hard" in report.read_text() and report.stat().st_size > 1_000_000  # plotly inlined
    assert main(["compare", str(runs[0]), "--out", str(tmp_path / "x.csv")]) == 2


def test_the_widget_colours_by_change_and_plots_a_clicked_tokens_trajectory(runs):
    view = RunComparison(kdviz.compare(*runs, labels=["fkl", "hard"]))
    assert len(view.strip.tokens) == view.rows.height and "KL" in view.strip.tokens[0]["title"]
    view.strip.selected = 2
    names = [trace.name for trace in view.trajectory.data]
    assert names == ["fkl KL", "fkl TKD", "fkl DKD", "hard KL", "hard TKD", "hard DKD"]
    assert list(view.trajectory.data[0].x) == [0, 2, 4]
    view.run.value = "hard"
    assert "under hard" in view.worst.value and "blue: learned" in view.legend.value
    assert json.dumps(view.static_html())  # renders without the front end
