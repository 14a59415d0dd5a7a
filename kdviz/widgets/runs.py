"""Runs compared in a notebook: a token strip coloured by the change in KL, each token's trajectory, regressions.

Renders a `kdviz.Comparison`; it computes nothing but colours. Blue tokens were learned (their KL
fell), red ones got worse; a click on a token plots its KL, TKD and DKD at every probe step of
every run.
"""

from __future__ import annotations

import ipywidgets as w
import plotly.graph_objects as go
import polars as pl

from kdviz.comparison import Comparison
from kdviz.widgets.style import WIDE, hard_css, legend_html, readable_ink, token_colors
from kdviz.widgets.strip import TokenStrip
from kdviz.widgets.tables import html_table

# ColorBrewer's RdBu, light ends: blue = KL fell (learned), white = unchanged, red = KL rose (worse).
DIVERGING = [[0.0, "rgb(67, 147, 195)"], [0.25, "rgb(146, 197, 222)"], [0.5, "#ffffff"],
             [0.75, "rgb(244, 165, 130)"], [1.0, "rgb(214, 96, 77)"]]
PARTS = {"kl": "solid", "tkd": "dash", "dkd": "dot"}


def change_token(row: dict, run: str, color: str) -> dict:
    """One token of the strip: coloured by its change in KL under `run`, hard tokens underlined."""
    ink = readable_ink(color)
    style = f"background: {color}; color: {ink}; padding: 1px 0; cursor: pointer;" + (hard_css(ink) if row["hard"]
                                                                                     else "")
    return {"text": row["token"], "style": style, "hard": row["hard"],
            "title": f"position {row['position']}: KL {row['kl_before']:.3f} -> {row[f'kl_{run}']:.3f} "
                     f"({row[f'change_{run}']:+.3f}, {row[f'outcome_{run}']}), u {row['unc']:.3f}"}


class RunComparison:
    """Widgets over a comparison: pick a text and a run; the strip shows the change in KL; click a token.

    >>> import polars as pl, kdviz
    >>> rows = lambda step, kl: pl.DataFrame({"step": [step] * 2, "doc_id": [0, 0], "position": [1, 2],
    ...     "token_id": [5, 6], "token": ["a", "b"], "unc": [0.1, 0.9], "kl": kl, "tkd": kl, "dkd": [0.0, 0.0],
    ...     "hard": [False, True]})
    >>> view = RunComparison(kdviz.compare(pl.concat([rows(0, [0.5, 1.0]), rows(4, [0.1, 1.4])]), labels=["fkl"]))
    >>> view.strip.selected = 1
    >>> [trace.name for trace in view.trajectory.data]
    ['fkl KL', 'fkl TKD', 'fkl DKD']
    """

    def __init__(self, comparison: Comparison, *, run: str | None = None, doc_id: int | None = None):
        self.comparison = comparison
        docs = comparison.tokens["doc_id"].unique(maintain_order=True).to_list()
        self.doc = w.Dropdown(options=docs, value=docs[0] if doc_id is None else doc_id, description="text",
                              style=WIDE)
        self.run = w.Dropdown(options=comparison.runs, value=run or comparison.runs[0],
                              description="colour by the change in KL of", style=WIDE)
        self.legend, self.worst = w.HTML(), w.HTML()
        self.strip = TokenStrip()
        self.trajectory = go.FigureWidget(layout=dict(height=320, margin=dict(t=40, l=50, r=10, b=40),
                                                      title="click a token: its KL, TKD and DKD at every probe",
                                                      xaxis_title="optimizer step", yaxis_title="nats"))
        self.doc.observe(lambda _: self._draw(), "value")
        self.run.observe(lambda _: self._draw(), "value")
        self.strip.observe(lambda change: self.show_token(change["new"]), "selected")
        self._draw()

    def _draw(self) -> None:
        run = self.run.value
        self.rows = self.comparison.tokens.filter(pl.col("doc_id") == self.doc.value).sort("position")
        changes = self.comparison.tokens[f"change_{run}"].abs()
        span = max(float(changes.quantile(0.99) or 0.0), 1e-6)
        colors = token_colors(self.rows[f"change_{run}"].to_list(), low=-span, high=span, scale=DIVERGING)
        self.strip.tokens = [change_token(row, run, color) for row, color in zip(self.rows.iter_rows(named=True),
                                                                                 colors)]
        self.legend.value = legend_html(f"change in KL under {run} (blue: learned, red: worse; tolerance "
                                        f"{self.comparison.tolerance:.4f} nats)", low=-span, high=span,
                                        scale=DIVERGING)
        self.worst.value = f"<b>Worst regressions under {run}</b>" + html_table(self.comparison.worst(run, 10))

    def show_token(self, index: int) -> None:
        """Plot the trajectory of token `index` of the strip (what a click does)."""
        if index < 0 or index >= len(self.rows):
            return
        row = self.rows.row(index, named=True)
        steps = self.comparison.trajectory(row["doc_id"], row["position"])
        with self.trajectory.batch_update():
            self.trajectory.data = []
            for run in self.comparison.runs:
                sub = steps.filter(pl.col("run") == run)
                for part, dash in PARTS.items():
                    self.trajectory.add_scatter(x=sub["step"].to_list(), y=sub[part].to_list(), mode="lines+markers",
                                                name=f"{run} {part.upper()}", line=dict(dash=dash))
            self.trajectory.layout.title = f"{row['token']!r} at position {row['position']} (u {row['unc']:.3f})"

    def widget(self) -> w.Widget:
        return w.VBox([w.HBox([self.doc, self.run]), self.legend, self.strip, self.trajectory, self.worst])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())

    def static_html(self) -> str:
        """The legend, the strip and the regressions as self-contained HTML (executed notebooks)."""
        return self.legend.value + self.strip.static_html() + self.worst.value
