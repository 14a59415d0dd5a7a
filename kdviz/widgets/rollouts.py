"""Rollout viewer: a prompt's data response and the responses a model wrote, one above the other, token by token.

Renders a table from `kdviz.analyze(..., generate="student")`; it computes nothing but colours. Each response
is a strip coloured by a metric (reverse KL by default: where the student's own text leaves the teacher's
support); a click on a token pins the teacher's and the student's top-k alternatives there.
"""

from __future__ import annotations

import html

import ipywidgets as w
import polars as pl

from kdviz.analysis.exposure import PROMPT
from kdviz.analysis.table import TokenTable
from kdviz.widgets.inspector import strip_token, token_detail_html, with_metrics
from kdviz.widgets.strip import TokenStrip
from kdviz.widgets.style import WIDE, legend_html, token_colors

METRICS = {
    "rkl": "reverse KL(q || p): the student's mass where the teacher has little",
    "kl": "KL(p || q)",
    "unc": "teacher uncertainty u = 1 - p_y",
    "tkd": "TKD (target part of the KL)",
    "dkd": "DKD (diversity part, before the u weight)",
    "logp_gap": "teacher minus student log-prob of the target",
}
PLACEHOLDER = "<i>Click a token of any response to pin the teacher's and the student's alternatives there.</i>"


def prompt_column(df: pl.DataFrame) -> pl.DataFrame:
    """The table with `prompt`: the data example a row's response answers (generated rows' source less #writerK)."""
    return df.with_columns(prompt=PROMPT)


def response_label(rows: pl.DataFrame) -> str:
    writer, sample = rows["response_from"][0], rows["sample"][0]
    return "the data's response" if writer == "data" else f"{writer} sample {sample}"


class RolloutViewer:
    """Pick a prompt and a metric: its data response and every generated sample as strips; click a token.

    >>> import polars as pl
    >>> row = lambda doc, source, writer, kl: {"doc_id": doc, "position": 3, "token_id": 7, "token": "x",
    ...     "is_response": True, "hard": False, "unc": 0.5, "tkd": 0.1, "dkd": 0.2, "kl": kl, "rkl": kl,
    ...     "t_logp": -1.0, "s_logp": -2.0, "t_rank": 1, "s_rank": 2, "source": source, "response_from": writer,
    ...     "sample": 0}
    >>> view = RolloutViewer(pl.DataFrame([row(0, "d:0", "data", 0.1), row(1, "d:0#student0", "student", 2.0)]))
    >>> [label.value for label in view.labels]
    ['<b>the data&#x27;s response</b>', '<b>student sample 0</b>']
    >>> view.strips[1].selected = 0
    >>> "position 3" in view.detail.value
    True
    """

    def __init__(self, table: TokenTable | pl.DataFrame, *, metric: str = "rkl", prompt: str | None = None):
        df = table.df if isinstance(table, TokenTable) else table
        if "response_from" not in df.columns:
            raise ValueError("This table has no generated responses: make it with kdviz.analyze(..., "
                             "generate='student') (CLI: kdviz analyze --generate student).")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}.")
        self.df = prompt_column(with_metrics(df)).filter(pl.col("is_response"))
        prompts = self.df["prompt"].unique(maintain_order=True).to_list()
        self.prompt = w.Dropdown(options=prompts, value=prompt or prompts[0], description="prompt", style=WIDE)
        self.metric = w.Dropdown(options=[(f"{m}: {text}", m) for m, text in METRICS.items()], value=metric,
                                 description="colour by", style=WIDE)
        self.legend, self.detail, self.responses = w.HTML(), w.HTML(PLACEHOLDER), w.VBox()
        self.detail.add_class("kdviz-rollout-detail")
        self.responses.add_class("kdviz-rollouts")
        self.labels: list[w.HTML] = []
        self.strips: list[TokenStrip] = []
        self.prompt.observe(lambda _: self._draw(), "value")
        self.metric.observe(lambda _: self._draw(), "value")
        self._draw()

    def _span(self, metric: str) -> tuple[float, float]:
        values = self.df[metric]
        return float(values.quantile(0.01) or 0.0), max(float(values.quantile(0.99) or 0.0), 1e-6)

    def _draw(self) -> None:
        metric, (low, high) = self.metric.value, self._span(self.metric.value)
        rows = self.df.filter(pl.col("prompt") == self.prompt.value).sort("doc_id", "position")
        self.legend.value = legend_html(METRICS[metric], low=low, high=high)
        self.labels, self.strips, self._rows = [], [], []
        for _, response in rows.group_by("doc_id", maintain_order=True):
            colors = token_colors(response[metric].to_list(), low=low, high=high)
            strip = TokenStrip(tokens=[strip_token(row, metric, color=color, dim=False)
                                       for row, color in zip(response.iter_rows(named=True), colors)])
            strip.observe(lambda change, i=len(self.strips): self.show_token(i, change["new"]), "selected")
            self.labels.append(w.HTML(f"<b>{html.escape(response_label(response))}</b>"))
            self.strips.append(strip)
            self._rows.append(response)
        self.responses.children = [part for pair in zip(self.labels, self.strips) for part in pair]
        self.detail.value = PLACEHOLDER

    def show_token(self, response: int, index: int) -> None:
        """Pin token `index` of response `response` (what a click does)."""
        rows = self._rows[response]
        if 0 <= index < len(rows):
            label = html.escape(response_label(rows))
            self.detail.value = f"<i>{label}</i><br>" + token_detail_html(rows.row(index, named=True))

    def widget(self) -> w.Widget:
        return w.VBox([w.HBox([self.prompt, self.metric]), self.legend, w.HBox([self.responses, self.detail])])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())

    def static_html(self) -> str:
        """The legend and every response of the prompt as self-contained HTML (executed notebooks)."""
        return self.legend.value + "".join(label.value + strip.static_html()
                                           for label, strip in zip(self.labels, self.strips))
