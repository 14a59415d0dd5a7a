"""Token inspector: a text as coloured tokens, each token's teacher/student top-k and KL parts.

Renders a `kdviz.TokenTable`; it computes nothing but colours and filters.
"""

from __future__ import annotations

import html
import math

import ipywidgets as w
import plotly.graph_objects as go
import polars as pl
from plotly.colors import sample_colorscale

from kdviz.analyze import TokenTable
from kdviz.widgets.strip import TokenStrip

METRICS = {
    "unc": "teacher uncertainty u = 1 - p_y",
    "tkd": "TKD (target part of the KL)",
    "dkd": "DKD (diversity part, before the u weight)",
    "kl": "KL(p || q)",
    "logp_gap": "teacher minus student log-prob of the target",
}
DIM = "transparent"


def with_metrics(df: pl.DataFrame) -> pl.DataFrame:
    """The table plus the derived `logp_gap` column (teacher minus student log-prob of the target)."""
    return df.with_columns(logp_gap=pl.col("t_logp") - pl.col("s_logp"))


def token_colors(values: list[float], *, low: float, high: float, scale: str = "Reds") -> list[str]:
    span = max(high - low, 1e-9)
    return sample_colorscale(scale, [min(1.0, max(0.0, (v - low) / span)) for v in values])


class TokenInspector:
    """Widgets over one table: pick a document and a metric, page, filter, click a token.

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
        self.doc = w.Dropdown(options=labels, value=labels[0][1] if doc_id is None else doc_id, description="text")
        self.metric = w.Dropdown(options=[(f"{k}: {v}", k) for k, v in METRICS.items()], value=metric,
                                 description="colour by")
        self.show = w.ToggleButtons(options=["all", "hard", "easy"], value="all", description="show")
        self.response_only = w.Checkbox(value=False, description="response tokens only")
        self.threshold = w.FloatSlider(value=0.0, min=0.0, max=1.0, step=0.01, description="threshold",
                                       continuous_update=False)
        self.page = w.IntSlider(value=0, min=0, max=0, description="page", continuous_update=False)
        self.page_size = page_size
        self.worst_k = w.BoundedIntText(value=10, min=1, max=1000, description="worst k")
        self.jump = w.Button(description="jump to the worst k", icon="arrow-down")
        self.strip = TokenStrip()
        self.detail = w.HTML()
        self.scatter = go.FigureWidget(go.Scatter(mode="markers", marker=dict(size=6)),
                                       layout=dict(height=320, dragmode="select", margin=dict(t=30, l=50, r=10, b=40),
                                                   title="uncertainty vs DKD (select to highlight)",
                                                   xaxis_title="teacher uncertainty u", yaxis_title="DKD"))
        self.scatter.data[0].on_selection(self._on_scatter_selection)
        for control in (self.show, self.response_only, self.threshold):
            control.observe(lambda _: self._draw_strip(), "value")
        self.metric.observe(lambda _: self._reset_threshold(), "value")
        self.doc.observe(lambda _: self._load_doc(), "value")
        self.page.observe(lambda _: self._draw_strip(), "value")
        self.jump.on_click(lambda _: self.jump_to_worst())
        self.strip.observe(lambda change: self._show_token(change["new"]), ["selected", "hovered"])
        self._load_doc()

    # state ------------------------------------------------------------------------------------
    def _load_doc(self) -> None:
        self.rows = self.df.filter(pl.col("doc_id") == self.doc.value).sort("position")
        self.page.max = max(0, (len(self.rows) - 1) // self.page_size)
        self.page.value = 0
        self.strip.highlighted = []
        self._reset_threshold()
        with self.scatter.batch_update():
            trace = self.scatter.data[0]
            trace.x, trace.y = self.rows["unc"].to_list(), self.rows["dkd"].to_list()
            trace.text = self.rows["token"].to_list()
            trace.marker.color = ["#d62728" if h else "#1f77b4" for h in self.rows["hard"]]
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

    def _page_rows(self) -> pl.DataFrame:
        return self.rows.slice(self.page.value * self.page_size, self.page_size)

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
        rows = self._page_rows()
        colors = token_colors(rows[metric].to_list(), low=float(values.min() or 0), high=float(values.quantile(0.99)
                                                                                          or 1))
        dim = self._dimmed(rows)
        self.strip.tokens = [
            {"text": t, "color": DIM if d else c, "hard": bool(h), "dim": d,
             "title": f"{metric} {v:.3f}  u {u:.3f}  rank t/s {tr}/{sr}"}
            for t, c, h, d, v, u, tr, sr in zip(rows["token"], colors, rows["hard"], dim, rows[metric], rows["unc"],
                                                rows["t_rank"], rows["s_rank"])
        ]
        self.strip.selected = -1
        self.detail.value = ""

    # interactions ------------------------------------------------------------------------------
    def _show_token(self, index: int) -> None:
        rows = self._page_rows()
        if 0 <= index < len(rows):
            self.detail.value = token_detail_html(rows.row(index, named=True))

    def jump_to_worst(self) -> None:
        """Highlight the `worst_k` tokens of the text by the metric and move to the page of the worst."""
        metric = self.metric.value
        order = self.rows.with_row_index("row").sort(metric, descending=True).head(self.worst_k.value)["row"].to_list()
        self.page.value = order[0] // self.page_size
        start = self.page.value * self.page_size
        self.strip.highlighted = [r - start for r in order if start <= r < start + self.page_size]
        self.strip.selected = order[0] - start

    def _on_scatter_selection(self, trace, points, selector) -> None:
        self.highlight_rows(points.point_inds)

    def highlight_rows(self, rows: list[int]) -> None:
        """Highlight these rows of the current text in the strip (the scatter selection calls this)."""
        if rows:
            self.page.value = min(rows) // self.page_size
        start = self.page.value * self.page_size
        self.strip.highlighted = [r - start for r in rows if start <= r < start + self.page_size]

    # display ------------------------------------------------------------------------------------
    def widget(self) -> w.Widget:
        controls = w.VBox([w.HBox([self.doc, self.metric]), w.HBox([self.show, self.response_only]),
                           w.HBox([self.threshold, self.page]), w.HBox([self.worst_k, self.jump])])
        return w.VBox([controls, self.strip, w.HBox([self.detail, self.scatter])])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())

    def static_html(self) -> str:
        """The current page of the strip as self-contained HTML (for executed notebooks and reports)."""
        spans = []
        for token in self.strip.tokens:
            style = f"background:{token['color']};white-space:pre;" + ("border-bottom:2px solid #222;"
                                                                         if token["hard"] else "")
            spans.append(f'<span style="{style}" title="{html.escape(token["title"])}">{html.escape(token["text"])}'
                         f'</span>' + ("<br>" if token["text"].endswith("↵") else ""))
        return f'<div style="font-family:monospace;line-height:1.9">{"".join(spans)}</div>'


def token_detail_html(row: dict) -> str:
    """Teacher and student side by side for one token, with KL = TKD + u * DKD spelled out."""
    u, tkd, dkd, kl = row["unc"], row["tkd"], row["dkd"], row["kl"]
    head = (f"<b>{html.escape(row['token'])}</b> at position {row['position']}"
            f"{' (hard)' if row['hard'] else ' (easy)'}<br>"
            f"KL = TKD + u &middot; DKD: {kl:.3f} = {tkd:.3f} + {u:.3f} &middot; {dkd:.3f}"
            f" (= {tkd + u * dkd:.3f})<br>")
    target = (f"target rank / prob: teacher {row['t_rank']} / {math.exp(row['t_logp']):.3f}, "
              f"student {row['s_rank']} / {math.exp(row['s_logp']):.3f}<br>")
    if "t_topk_tokens" not in row or row["t_topk_tokens"] is None:
        return head + target
    lines = "".join(
        f"<tr><td>{html.escape(tt)}</td><td>{tp:.3f}</td><td>{html.escape(st)}</td><td>{sp:.3f}</td></tr>"
        for tt, tp, st, sp in zip(row["t_topk_tokens"], row["t_topk_probs"], row["s_topk_tokens"],
                                  row["s_topk_probs"]))
    return (head + target + "<table><tr><th>teacher top-k</th><th>p</th><th>student top-k</th><th>q</th></tr>"
            + lines + "</table>")
