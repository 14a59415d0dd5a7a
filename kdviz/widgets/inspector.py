"""Token inspector: a text as coloured tokens, each token's teacher/student top-k and KL parts.

Renders a `kdviz.TokenTable`; it computes nothing but colours and filters.
"""

from __future__ import annotations

import html
import math

import ipywidgets as w
import plotly.graph_objects as go
import polars as pl

from kdviz.analysis.table import TokenTable
from kdviz.widgets.style import DIM_INK, WIDE, hard_css, legend_html, readable_ink, token_colors
from kdviz.widgets.strip import TokenStrip

METRICS = {
    "unc": "teacher uncertainty u = 1 - p_y",
    "tkd": "TKD (target part of the KL)",
    "dkd": "DKD (diversity part, before the u weight)",
    "kl": "KL(p || q)",
    "logp_gap": "teacher minus student log-prob of the target",
}
PLACEHOLDER = "<i>Click a token to pin its details here; hovering shows a quick look above the text.</i>"
TOKEN_KINDS = {"hard": "hard", "easy": "easy", "prompt": "prompt: context only, not a training target"}


def with_metrics(df: pl.DataFrame) -> pl.DataFrame:
    """The table plus the derived `logp_gap` column (teacher minus student log-prob of the target)."""
    return df.with_columns(logp_gap=pl.col("t_logp") - pl.col("s_logp"))


def token_kind(row: dict) -> str:
    """The token's role: "prompt" (context only, never a training target), "hard" or "easy"."""
    return "hard" if row["hard"] else "easy" if row["is_response"] else "prompt"


def token_style(background: str, *, hard: bool, prompt: bool, dim: bool) -> str:
    """Inline CSS of one token: its background, a text colour that reads on it, the hard underline."""
    ink = DIM_INK if dim else readable_ink(background)
    return (f"background: {'#ffffff' if dim else background}; color: {ink}; padding: 1px 0; cursor: pointer;"
            + (hard_css(ink) if hard else "") + ("font-style: italic;" if prompt else ""))


def strip_token(row: dict, metric: str, *, color: str, dim: bool) -> dict:
    """One token of the strip: its text, inline style and tooltip."""
    kind = token_kind(row)
    return {"text": row["token"], "color": color, "hard": row["hard"], "dim": dim, "kind": kind,
            "style": token_style(color, hard=row["hard"], prompt=kind == "prompt", dim=dim),
            "title": f"position {row['position']}: {metric} {row[metric]:.3f}, u {row['unc']:.3f}, rank t/s "
                     f"{row['t_rank']}/{row['s_rank']}, {kind}"}


class TokenInspector:
    """Widgets over one table: pick a document and a metric, page, filter, click a token to pin it.

    >>> from kdviz import TokenTable
    >>> import polars as pl
    >>> inspector = TokenInspector(TokenTable(pl.DataFrame({
    ...     "doc_id": [0, 0], "position": [1, 2], "token": ["a", "b"], "is_response": [True, True],
    ...     "unc": [0.2, 0.9], "tkd": [0.1, 0.5], "dkd": [0.3, 0.2], "kl": [0.16, 0.68], "t_logp": [-0.2, -2.3],
    ...     "s_logp": [-0.5, -1.0], "t_rank": [1, 4], "s_rank": [2, 1], "hard": [False, True]}), {}))
    >>> inspector.strip.selected = 1
    >>> "0.680" in inspector.detail.value
    True
    """

    def __init__(self, table: TokenTable, *, metric: str = "unc", page_size: int = 200, doc_id: int | None = None):
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
        self.df = with_metrics(table.df)
        docs = self.df.select("doc_id", *(["source"] if "source" in self.df.columns else [])).unique("doc_id",
                                                                                                   maintain_order=True)
        labels = [(f"{d} {s}" if s else str(d), d) for d, s in zip(docs["doc_id"], docs.get_column("source")
                  if "source" in docs.columns else [""] * len(docs))]
        self.doc = w.Dropdown(options=labels, value=labels[0][1] if doc_id is None else doc_id, description="text",
                              style=WIDE, layout={"width": "320px"})
        self.metric = w.Dropdown(options=[(f"{k}: {v}", k) for k, v in METRICS.items()], value=metric,
                                 description="colour by", style=WIDE, layout={"width": "460px"})
        self.show = w.ToggleButtons(options=["all", "hard", "easy"], value="all", description="show",
                                    style={**WIDE, "button_width": "64px"})
        self.response_only = w.Checkbox(value=False, description="response tokens only", style=WIDE)
        self.threshold = w.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="threshold",
                                       continuous_update=False, style=WIDE)
        self.page = w.IntSlider(value=0, min=0, max=0, description="page", continuous_update=False, style=WIDE)
        self.page_size = page_size
        self.worst_k = w.BoundedIntText(value=10, min=1, max=1000, description="worst k", style=WIDE,
                                        layout={"width": "140px"})
        self.jump = w.Button(description="jump to the worst k", icon="arrow-down", layout={"width": "auto"},
                             tooltip="outline the k response tokens with the largest value of the metric")
        self.legend = w.HTML()
        self.strip = TokenStrip()
        self.detail = w.HTML(PLACEHOLDER, layout={"width": "460px", "min_height": "300px", "padding": "0 12px 0 0"})
        self.detail.add_class("kdviz-detail")
        self.scatter = go.FigureWidget(go.Scatter(mode="markers", marker=dict(size=6)),
                                       layout=dict(height=320, dragmode="select", margin=dict(t=30, l=50, r=10, b=40),
                                                   title="uncertainty vs DKD (select to highlight)",
                                                   xaxis_title="teacher uncertainty u", yaxis_title="DKD"))
        self.scatter.data[0].on_selection(self._on_scatter_selection)
        self.pinned: int | None = None  # row of self.rows whose details the panel shows
        for control in (self.show, self.response_only, self.threshold):
            control.observe(lambda _: self._draw_strip(), "value")
        self.metric.observe(lambda _: self._reset_threshold(), "value")
        self.doc.observe(lambda _: self._load_doc(), "value")
        self.page.observe(lambda _: self._draw_strip(), "value")
        self.jump.on_click(lambda _: self.jump_to_worst())
        self.strip.observe(lambda change: self._on_click(change["new"]), "selected")
        self._load_doc()

    # state ------------------------------------------------------------------------------------
    def _load_doc(self) -> None:
        self.rows = self.df.filter(pl.col("doc_id") == self.doc.value).sort("position")
        self.pinned = None
        self.page.max = max(0, (len(self.rows) - 1) // self.page_size)
        self.page.value = 0
        self.strip.highlighted = []
        self._reset_threshold()
        with self.scatter.batch_update():
            trace = self.scatter.data[0]
            trace.x, trace.y = self.rows["unc"].to_list(), self.rows["dkd"].to_list()
            trace.text = self.rows["token"].to_list()
            trace.marker.color = [{"hard": "#d62728", "easy": "#1f77b4", "prompt": "#9e9e9e"}[token_kind(r)]
                                  for r in self.rows.iter_rows(named=True)]
            trace.selectedpoints = None

    def _reset_threshold(self) -> None:
        """Span the threshold slider over this text's range of the metric and start at its minimum."""
        values = self.rows[self.metric.value]
        low, high = float(values.min() or 0), float(values.max() or 0)
        moves = self.threshold.value != low
        with self.threshold.hold_trait_notifications():
            self.threshold.min, self.threshold.max = -1e9, 1e9  # widen first so min <= max at every step
            self.threshold.min, self.threshold.max = low, max(high, low + 1e-6)
            self.threshold.value = low
        if not moves:  # a moved value redraws through its observer
            self._draw_strip()

    @property
    def _start(self) -> int:
        return self.page.value * self.page_size

    def _page_rows(self) -> pl.DataFrame:
        return self.rows.slice(self._start, self.page_size)

    def _dimmed(self, rows: pl.DataFrame) -> list[bool]:
        keep = pl.col(self.metric.value) >= self.threshold.value
        if self.show.value != "all":
            keep = keep & (pl.col("hard") == (self.show.value == "hard"))
        if self.response_only.value:
            keep = keep & pl.col("is_response")
        return (~rows.select(keep.alias("keep"))["keep"]).to_list()

    def _draw_strip(self) -> None:
        metric = self.metric.value
        values = self.rows[metric]
        low, high = float(values.min() or 0), float(values.quantile(0.99) or 1)
        rows = self._page_rows()
        colors = token_colors(rows[metric].to_list(), low=low, high=high)
        self.strip.tokens = [strip_token(row, metric, color=color, dim=dim)
                             for row, color, dim in zip(rows.iter_rows(named=True), colors, self._dimmed(rows))]
        self.legend.value = legend_html(f"{metric}: {METRICS[metric]}", low=low, high=high)
        self._pin(self.pinned)

    # interactions ------------------------------------------------------------------------------
    def _pin(self, row: int | None) -> None:
        """Pin `row` (of this text) in the strip and the panel, or clear both when it is not on this page."""
        shown = row is not None and self._start <= row < self._start + len(self.strip.tokens)
        self.pinned = row if shown else None
        self.strip.selected = row - self._start if shown else -1
        self.detail.value = token_detail_html(self.rows.row(row, named=True)) if shown else PLACEHOLDER

    def _on_click(self, index: int) -> None:
        if index >= 0 and self._start + index != self.pinned:
            self._pin(self._start + index)

    def jump_to_worst(self, *, include_prompt: bool = False) -> None:
        """Outline the `worst_k` tokens of the text by the metric, go to the worst one's page and pin it.

        Prompt tokens are context, not targets, so they are left out unless `include_prompt`.
        """
        metric = self.metric.value
        candidates = self.rows.with_row_index("row")
        if not include_prompt:
            candidates = candidates.filter(pl.col("is_response"))
        order = candidates.sort(metric, descending=True).head(self.worst_k.value)["row"].to_list()
        if not order:
            return
        self.pinned = order[0]
        self.page.value = order[0] // self.page_size
        self.strip.highlighted = [r - self._start for r in order if self._start <= r < self._start + self.page_size]
        self._pin(order[0])

    def _on_scatter_selection(self, trace, points, selector) -> None:
        self.highlight_rows(points.point_inds)

    def highlight_rows(self, rows: list[int]) -> None:
        """Highlight these rows of the current text in the strip (the scatter selection calls this)."""
        if rows:
            self.page.value = min(rows) // self.page_size
        self.strip.highlighted = [r - self._start for r in rows if self._start <= r < self._start + self.page_size]

    # display ------------------------------------------------------------------------------------
    def widget(self) -> w.Widget:
        controls = w.VBox([w.HBox([self.doc, self.metric]), w.HBox([self.show, self.response_only]),
                           w.HBox([self.threshold, self.page]), w.HBox([self.worst_k, self.jump])])
        return w.VBox([controls, self.legend, self.strip, w.HBox([self.detail, self.scatter])])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())

    def static_html(self) -> str:
        """The legend and the current page of the strip as self-contained HTML (executed notebooks, reports)."""
        return self.legend.value + self.strip.static_html()


def token_detail_html(row: dict) -> str:
    """Teacher and student side by side for one token, with KL = TKD + u * DKD spelled out."""
    u, tkd, dkd, kl = row["unc"], row["tkd"], row["dkd"], row["kl"]
    head = (f"<b>{html.escape(row['token'])}</b> at position {row['position']} "
            f"({TOKEN_KINDS[token_kind(row)]})<br>"
            f"KL = TKD + u &middot; DKD<br>"
            f"{kl:.3f} = {tkd:.3f} + {u:.3f} &middot; {dkd:.3f} (= {tkd + u * dkd:.3f})<br>")
    target = (f"target rank / prob: teacher {row['t_rank']} / {math.exp(row['t_logp']):.3f}, "
              f"student {row['s_rank']} / {math.exp(row['s_logp']):.3f}<br>")
    table = ""
    if row.get("t_topk_tokens") is not None:
        lines = "".join(
            f"<tr><td>{html.escape(tt)}</td><td>{tp:.3f}</td><td>{html.escape(st)}</td><td>{sp:.3f}</td></tr>"
            for tt, tp, st, sp in zip(row["t_topk_tokens"], row["t_topk_probs"], row["s_topk_tokens"],
                                      row["s_topk_probs"]))
        table = ('<table style="border-spacing:12px 0; margin-left:-12px"><tr><th>teacher top-k</th><th>p</th>'
                 f"<th>student top-k</th><th>q</th></tr>{lines}</table>")
    return f'<div style="line-height:1.6">{head}{target}{table}</div>'
