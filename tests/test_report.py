"""The HTML report: the uncertainty histogram spreads an uncertain teacher's tokens; the summary wraps."""

import html
import math

import polars as pl
import pytest

from kdviz import analyze
from kdviz.analysis import TokenTable
from kdviz.report import uncertainty_histogram, write_report
from test_train import RECORDS


def test_uncertainty_histogram_spreads_hard_tokens_near_u_1_over_shared_bins():
    hard_u = [0.99, 0.999, 0.9999, 0.99999]  # on a linear u axis all four sit in the last of 50 bins
    easy_u = [0.1, 0.5, 0.9]
    table = TokenTable(pl.DataFrame({
        "is_response": [True] * 7 + [False], "hard": [True] * 4 + [False] * 4,
        "t_logp": [math.log(1 - u) for u in hard_u + easy_u] + [0.0]}))
    fig = uncertainty_histogram(table)
    hard, easy = fig.data
    assert hard.name == "hard (4)" and easy.name == "easy (3)"  # prompt tokens left out
    assert hard.xbins == easy.xbins  # one set of bins for both groups
    start, size = hard.xbins.start, hard.xbins.size
    assert len({math.floor((x - start) / size) for x in hard.x}) == 4
    assert list(hard.x) == pytest.approx([math.log10(1 - u) for u in hard_u])
    ticks = dict(zip(fig.layout.xaxis.tickvals, fig.layout.xaxis.ticktext))
    assert {t: float(label) for t, label in ticks.items()} == pytest.approx({t: 1 - 10.0 ** t for t in ticks})


def test_report_summary_wraps_inside_its_box(pair, tmp_path):
    table = analyze(pair, RECORDS[:4], cache=False, progress=False)
    page = write_report(table, tmp_path / "report.html").read_text()
    assert "white-space:pre-wrap" in page and "overflow-wrap:anywhere" in page
    assert html.escape(str(table.summary()).splitlines()[0]) in page
