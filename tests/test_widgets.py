"""Widget behaviour driven from Python: set a control, assert the view changed."""

import html
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from plotly.callbacks import Points

from kdviz import analyze
from kdviz.widgets import DistillLauncher, TokenInspector, TokenStrip, ToyKD
from kdviz.widgets.inspector import METRICS, PLACEHOLDER, token_detail_html
from kdviz.widgets.launcher import TrainingProgress, duration
from kdviz.widgets.strip import HIGHLIGHT_CSS, PINNED_CSS, PREVIEW_HINT
from kdviz.widgets.style import DIM_INK, contrast_ratio, readable_ink, token_colors
from test_train import RECORDS


@pytest.fixture(scope="module")
def table(pair):
    records = RECORDS[:3] + [{"prompt": "Note:", "response": " The teacher knows more than the student."}]
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
    assert [t["title"].split(": ")[1].split(" ")[0] for t in inspector.strip.tokens] == ["kl"] * 8


def test_selecting_a_token_shows_both_top_k_and_the_identity(inspector):
    inspector.strip.selected = 2
    row = page_rows(inspector).row(2, named=True)
    text = inspector.detail.value
    assert f"{row['kl']:.3f} = {row['tkd']:.3f} + {row['unc']:.3f}" in text
    assert "teacher top-k" in text and row["t_topk_tokens"][0].replace("<", "&lt;") in text
    assert f"teacher {row['t_rank']}" in text


def test_a_click_pins_the_panel_and_hovering_does_not_move_it(inspector):
    assert inspector.detail.value == PLACEHOLDER
    inspector.strip.selected = 2
    pinned = inspector.detail.value
    assert f"at position {page_rows(inspector)['position'][2]} " in pinned
    for hovered in (5, 1, -1):  # the browser reports the mouse crossing tokens, then leaving the strip
        inspector.strip.hovered = hovered
        assert inspector.detail.value == pinned


def test_changing_controls_keeps_the_pinned_token_while_it_is_shown(inspector):
    inspector.strip.selected = 3
    pinned = inspector.detail.value
    inspector.metric.value = "kl"
    inspector.threshold.value = inspector.threshold.max  # dims the token, which is still shown
    inspector.show.value = "hard"
    inspector.response_only.value = True
    assert inspector.strip.selected == 3 and inspector.detail.value == pinned and inspector.pinned == 3
    inspector.page.value = 1  # the token is gone from the strip: nothing stays pinned
    assert inspector.strip.selected == -1 and inspector.detail.value == PLACEHOLDER and inspector.pinned is None
    inspector.strip.selected = 0
    assert inspector.pinned == 8 and inspector.detail.value == token_detail_html(inspector.rows.row(8, named=True))
    inspector.doc.value = 1
    assert inspector.strip.selected == -1 and inspector.detail.value == PLACEHOLDER


def test_every_token_reads_at_4_5_to_1_with_hard_and_dimmed_tokens_marked(inspector):
    for metric in METRICS:
        inspector.metric.value = metric
        inspector.threshold.value = float(inspector.rows[metric].median())  # some tokens dimmed
        for token in inspector.strip.tokens:
            style = dict(part.strip().split(": ", 1) for part in token["style"].split(";") if part.strip())
            assert contrast_ratio(style["color"], style["background"]) >= 4.5, (metric, token)
            assert ("border-bottom" in style) == token["hard"]
            assert (style["color"] == DIM_INK) == token["dim"]
        assert any(t["dim"] for t in inspector.strip.tokens) and not all(t["dim"] for t in inspector.strip.tokens)


def test_contrast_follows_wcag_and_the_ink_flips_on_dark_backgrounds():
    assert contrast_ratio("#767676", "#ffffff") == 4.54 and contrast_ratio("#777777", "#ffffff") == 4.48
    dark = token_colors([i / 10 for i in range(11)], low=0, high=1, scale="Viridis")  # dark to light
    inks = [readable_ink(color) for color in dark]
    assert inks[0] == "#ffffff" and inks[-1] == "#000000"
    assert min(contrast_ratio(ink, color) for ink, color in zip(inks, dark)) >= 4.5


def test_the_legend_names_the_metric_and_its_colour_range(inspector):
    inspector.metric.value = "kl"
    values = inspector.rows["kl"]
    legend = inspector.legend.value
    assert "kl: KL(p || q)" in html.unescape(legend)
    assert f"{values.min():.3f}" in legend and f"{values.quantile(0.99):.3f}" in legend
    assert legend in inspector.static_html()


def test_prompt_tokens_are_labelled_prompt_and_left_out_of_worst_k(table):
    inspector = TokenInspector(table, page_size=500, doc_id=3)  # instruction data: prompt, then response
    kinds = [t["kind"] for t in inspector.strip.tokens]
    prompt = kinds.index("prompt")
    assert "easy" not in inspector.strip.tokens[prompt]["title"] and inspector.strip.tokens[prompt]["title"].endswith(
        "prompt")
    inspector.strip.selected = prompt
    assert "(prompt: context only, not a training target)" in inspector.detail.value
    assert "(easy)" not in inspector.detail.value
    inspector.worst_k.value = len(kinds)
    inspector.jump_to_worst()
    assert sorted(inspector.strip.highlighted) == [i for i, k in enumerate(kinds) if k != "prompt"]
    inspector.jump_to_worst(include_prompt=True)
    assert sorted(inspector.strip.highlighted) == list(range(len(kinds)))


def test_static_html_breaks_lines_inside_tokens_and_marks_the_pin():
    tokens = [{"text": "def", "style": "background: #ffffff; color: #000000;", "title": "t<1>"},
              {"text": "↵···x", "style": "background: #fdd49e; color: #000000;", "title": "t2"}]
    page = TokenStrip(tokens=tokens, selected=1, highlighted=[0]).static_html()
    assert "overflow-wrap: anywhere" in page and "max-width: 100%" in page
    assert f'<span style="{tokens[0]["style"]}{HIGHLIGHT_CSS}" title="t&lt;1&gt;">def</span><wbr>' in page
    assert f'<span style="{tokens[1]["style"]}{PINNED_CSS}" title="t2">↵<br>···x</span>' in page


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
    worst = inspector.rows.with_row_index("row").filter(pl.col("is_response")).sort("kl", descending=True)["row"][0]
    assert inspector.page.value == worst // 4
    assert worst - inspector.page.value * 4 in inspector.strip.highlighted
    assert inspector.strip.selected == worst - inspector.page.value * 4
    assert inspector.detail.value == token_detail_html(inspector.rows.row(worst, named=True))  # and pinned


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
    # the readout says which numbers are softened: the target probability at T next to the slider's
    assert "at temperature T = 3.00" in toy.readout.value and "3.00" in toy.figure.layout.title.text
    assert f"{r.p[0]:.4f} (slider {toy.teacher_target.value:.2f})" in toy.readout.value
    assert f"{1 - r.p[0]:.4f}" in toy.readout.value  # u is 1 - the softened p, not 1 - the slider


def test_launcher_controls_and_a_run_with_live_curves_and_progress(model_dirs, capfd):
    data = RECORDS * 2
    launcher = DistillLauncher(teachers=[str(model_dirs["teacher"])], student=str(model_dirs["student"]), data=data,
                               steps=3, eval_size=4, batch_size=4, device="cpu", eval_generate_examples=1,
                               eval_generate_tokens=2)
    launcher.loss.value = "fkl"
    assert launcher.lam.disabled and launcher.k.disabled and launcher.settings()["loss_params"] == {}
    launcher.loss.value = "atkd"
    launcher.lam.value = 0.4
    assert not launcher.lam.disabled and launcher.settings()["loss_params"] == {"lam": 0.4, "k": 0.5}
    capfd.readouterr()
    launcher.button.click()
    assert capfd.readouterr() == ("", "")  # nothing for JupyterLab's Log Console
    assert launcher.progress.bar.value == launcher.progress.bar.max == 3
    assert launcher.progress.bar.bar_style == "success" and "#1 atkd done: 3 steps" in launcher.progress.text.value
    assert len(launcher.results) == 1
    hard, easy = launcher.curves.data
    assert list(hard.x) == [1, 2, 3] and len(easy.y) == 3
    assert launcher.results[0].settings["loss_params"]["lam"] == 0.4
    table = launcher.table()
    assert table["loss"].to_list() == ["atkd"] and "<table>" in launcher.table_view.value
    assert launcher.comparison.runs == ["1_atkd"] and launcher.tokens_view.children  # the run, token by token
    assert sorted(launcher.results[0].trajectory["step"].unique()) == [0, 1, 2, 3]  # probes every max(1, 3 // 5)


def test_training_progress_shows_step_loss_and_time_left():
    clock = iter([100.0, 104.0, 110.0])
    progress = TrainingProgress(clock=lambda: next(clock))
    state = SimpleNamespace(global_step=0, max_steps=20)
    progress.on_train_begin(None, state, None)
    assert (progress.bar.max, progress.bar.value, progress.text.value) == (20, 0, "step 0/20")
    state.global_step = 2
    progress.on_step_end(None, state, None)  # 4 s for 2 steps: 36 s for the 18 left
    assert progress.bar.value == 2 and progress.text.value == "step 2/20 &middot; 36 s left"
    state.global_step = 5
    progress.on_log(None, state, None, logs={"loss": 2.34567})  # 10 s for 5 steps: 30 s for 15
    assert progress.text.value == "step 5/20 &middot; loss 2.346 &middot; 30 s left"
    assert [duration(s) for s in (0.4, 42, 185)] == ["<1 s", "42 s", "3 min 05 s"]


def test_a_failed_run_says_so_and_frees_the_button(model_dirs):
    launcher = DistillLauncher(teachers=["no-such-teacher-folder"], student=str(model_dirs["student"]), data=RECORDS,
                               steps=1)
    with pytest.raises(ValueError):
        launcher.run()
    assert launcher.progress.bar.bar_style == "danger" and "#1 atkd failed: ValueError" in launcher.progress.text.value
    assert not launcher.button.disabled and launcher.results == []


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the widget's JavaScript")
def test_token_strip_front_end_lays_out_lines_pins_and_previews(tmp_path):
    esm = tmp_path / "strip.mjs"
    esm.write_text(TokenStrip._esm)
    harness = Path(__file__).parent / "js" / "strip_harness.mjs"
    done = subprocess.run(["node", str(harness), str(esm)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # a newline inside a token breaks the line there; the indentation after it starts the next line
    assert seen["layout"] == [["def"], ["↵", "<br>", "···x"], ["y", "↵", "<br>"]]
    assert seen["wbr"] == 3 and seen["indices"] == ["0", "1", "2"]  # a break opportunity after every token
    assert seen["hint"] == PREVIEW_HINT
    assert PINNED_CSS in seen["pinnedStyle"][1] and PINNED_CSS not in seen["pinnedStyle"][0]
    assert seen["pinnedStyle"][1].startswith("background: blue;") and seen["sameSpans"]
    assert seen["marks"] == ["", "pinned", ""]
    assert seen["hoverPreview"] == "hover: def  \u2014  a"
    assert seen["afterLeave"] == "pinned: ↵···x  \u2014  b"  # leaving the strip shows the pin again
    assert HIGHLIGHT_CSS in seen["highlightStyle"]
    assert 0 < seen["scrollTop"] <= 500 and 500 + 20 <= seen["scrollTop"] + 100  # the pinned token is in view
    assert seen["rebuilt"] == {"count": 2, "scrollTop": 0, "fresh": True}
    assert seen["saved"] == [{"selected": 1, "hovered": -1}, {"selected": 1, "hovered": 0},
                             {"selected": 1, "hovered": -1}]
    assert seen["listenersLeft"] == 0
