"""Widget behaviour driven from Python: set a control, assert the view changed."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from plotly.callbacks import Points

from kdviz import analyze
from kdviz.widgets import DistillLauncher, TokenInspector, ToyKD
from test_train import RECORDS


@pytest.fixture(scope="module")
def table(pair):
    records = RECORDS[:3] + [{"prompt": "Note:", "response": " The teacher knows more than the student." * 3}]
    return analyze(pair, records, top_k=3, cache=False, progress=False)


@pytest.fixture
def inspector(table):
    return TokenInspector(table, page_size=8)


def page_rows(inspector):
    return inspector._page_rows()


def test_metric_recolours_the_strip(inspector):
    before = [t["color"] for t in inspector.strip.tokens]
    inspector.metric.value = "kl"
    assert [t["color"] for t in inspector.strip.tokens] != before
    assert all(t["title"].startswith("kl ") for t in inspector.strip.tokens)


def test_selecting_a_token_shows_both_top_k_and_the_identity(inspector):
    inspector.strip.selected = 2
    row = page_rows(inspector).row(2, named=True)
    text = inspector.detail.value
    assert f"{row['kl']:.3f} = {row['tkd']:.3f} + {row['unc']:.3f}" in text
    assert "teacher top-k" in text and row["t_topk_tokens"][0].replace("<", "&lt;") in text
    assert f"teacher {row['t_rank']}" in text


def test_filters_dim_the_tokens_they_hide(inspector):
    inspector.show.value = "hard"
    assert [t["dim"] for t in inspector.strip.tokens] == [not h for h in page_rows(inspector)["hard"]]
    inspector.show.value = "all"
    inspector.threshold.value = float(page_rows(inspector)["unc"].median())
    assert [t["dim"] for t in inspector.strip.tokens] == [u < inspector.threshold.value
                                                          for u in page_rows(inspector)["unc"]]


def test_threshold_follows_the_metric_so_negative_values_are_not_hidden(inspector):
    inspector.metric.value = "logp_gap"  # teacher minus student log-prob: often negative
    assert inspector.threshold.min == pytest.approx(float(inspector.rows["logp_gap"].min()), abs=1e-6)
    assert inspector.threshold.value == inspector.threshold.min
    assert not any(t["dim"] for t in inspector.strip.tokens)


def test_response_only_dims_prompt_tokens(table):
    inspector = TokenInspector(table, page_size=500)
    inspector.response_only.value = True
    flags = page_rows(inspector)["is_response"].to_list()
    assert not all(flags)  # instruction data: the prompt is shown too
    assert [t["dim"] for t in inspector.strip.tokens] == [not f for f in flags]


def test_paging_and_jump_to_the_worst_tokens(table):
    inspector = TokenInspector(table, page_size=4)
    inspector.doc.value = 3  # the long record
    assert inspector.page.max == (len(inspector.rows) - 1) // 4 > 1
    inspector.page.value = 1
    assert [t["text"] for t in inspector.strip.tokens] == inspector.rows["token"][4:8].to_list()
    inspector.metric.value = "kl"
    inspector.worst_k.value = 3
    inspector.jump.click()
    worst = inspector.rows.with_row_index("row").sort("kl", descending=True)["row"][0]
    assert inspector.page.value == worst // 4
    assert worst - inspector.page.value * 4 in inspector.strip.highlighted
    assert inspector.strip.selected == worst - inspector.page.value * 4


def test_scatter_selection_highlights_tokens_in_the_strip(inspector):
    trace = inspector.scatter.data[0]
    assert list(trace.x) == inspector.rows["unc"].to_list()
    trace._dispatch_on_selection(Points(point_inds=[1, 3], xs=[], ys=[], trace_name="", trace_index=0), None)
    assert inspector.strip.highlighted == [1, 3]


def test_changing_the_text_reloads_strip_and_scatter(inspector, table):
    inspector.doc.value = 1
    rows = table.df.filter(table.df["doc_id"] == 1).sort("position")
    assert [t["text"] for t in inspector.strip.tokens] == rows["token"][:8].to_list()
    assert list(inspector.scatter.data[0].y) == rows["dkd"].to_list()
    assert "<span" in inspector.static_html()


def test_unknown_metric_is_refused(table):
    with pytest.raises(ValueError, match="choose one of unc, tkd"):
        TokenInspector(table, metric="entropy")


def test_toy_sliders_move_the_bars_and_the_readout():
    toy = ToyKD()
    kl_before = toy.result.kl
    toy.student_target.value = toy.teacher_target.value
    toy.student_spread.value = toy.teacher_spread.value
    assert kl_before > 0.01 and toy.result.kl == pytest.approx(0.0, abs=1e-6)
    toy.temperature.value = 3.0
    assert list(toy.figure.data[0].y) == pytest.approx(toy.result.p)
    assert toy.figure.data[0].y[0] < toy.teacher_target.value  # temperature flattens the teacher
    r = toy.result
    assert f"{r.kl:.4f}" in toy.readout.value
    assert r.tkd + r.unc * r.dkd == pytest.approx(r.kl, abs=1e-6)


def test_launcher_controls_and_a_run_with_live_curves(model_dirs):
    data = RECORDS * 2
    launcher = DistillLauncher(teachers=[str(model_dirs["teacher"])], student=str(model_dirs["student"]), data=data,
                               steps=3, eval_size=4, batch_size=4, device="cpu", eval_generate_examples=1,
                               eval_generate_tokens=2)
    launcher.loss.value = "fkl"
    assert launcher.lam.disabled and launcher.k.disabled and launcher.settings()["loss_params"] == {}
    launcher.loss.value = "atkd"
    launcher.lam.value = 0.4
    assert not launcher.lam.disabled and launcher.settings()["loss_params"] == {"lam": 0.4, "k": 0.5}
    launcher.button.click()
    assert len(launcher.results) == 1
    hard, easy = launcher.curves.data
    assert list(hard.x) == [1, 2, 3] and len(easy.y) == 3
    assert launcher.results[0].settings["loss_params"]["lam"] == 0.4
    table = launcher.table()
    assert table["loss"].to_list() == ["atkd"] and "<table>" in launcher.table_view.value


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the widget's JavaScript")
def test_token_strip_front_end_reports_clicks_and_hovers(tmp_path):
    from kdviz.widgets.strip import TokenStrip

    esm = tmp_path / "strip.mjs"
    esm.write_text(TokenStrip._esm)
    harness = Path(__file__).parent / "js" / "strip_harness.mjs"
    done = subprocess.run(["node", str(harness), str(esm)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["texts"] == ["def", "·f↵"] and seen["breaks"] == 1  # a line break after a newline token
    assert seen["hardBorder"] and seen["dimOpacity"] == "0.35" and seen["outlined"] == [False, True]
    assert seen["saved"] == [{"selected": 1, "hovered": -1}, {"selected": 1, "hovered": 0}]
    assert seen["selectedShadow"] == [False, True]
