"""Group viewer: a response of a pair across tokenizers as its aligned groups, one box per group.

Renders a `kdviz.analysis.GroupTable` (from `kdviz.analyze` on a pair with different tokenizers); it computes
nothing but colours. A group merged on a side (one side cut the bytes into several tokens) is one framed box
showing its parts, split where that side's tokens end (``lin¦eno``); the tooltip and a click give both sides'
tokens. Colour by a metric (teacher u, TKD, KL or DKD over the matched vocabulary, ULD, the teacher's mass off
the matched vocabulary) or by the group's kind. Metrics that do not apply to a group (KL, DKD and the unmatched
mass away from one-to-one groups) leave it white with a dotted frame.
"""

from __future__ import annotations

import html
import math

import ipywidgets as w
import polars as pl

from kdviz.analysis.grouptable import GroupTable
from kdviz.analysis.table import visible
from kdviz.widgets.strip import TokenStrip
from kdviz.widgets.style import WIDE, hard_css, legend_html, readable_ink, token_colors

METRICS = {
    "unc": "teacher uncertainty of the group, 1 - p(group text)",
    "tkd": "TKD: KL of the binaries [p(group), 1 - p(group)]",
    "kl": "KL over the string-matched vocabulary (one-to-one groups)",
    "dkd": "DKD over the string-matched vocabulary (one-to-one groups)",
    "uld": "ULD: sorted-probability L1 of the merged distributions",
    "t_unmatched": "teacher mass off the matched vocabulary (one-to-one groups)",
    "kind": "group kind",
}
KIND_COLORS = {"same": "#ffffff", "different": "#fdae6b", "merged-one-side": "#9ecae1",
               "merged-both-sides": "#c994c7"}
PART = "¦"  # between the parts of a merged group
MERGED_CSS = "box-shadow: inset 0 0 0 1px #333333; border-radius: 3px;"
NOT_APPLICABLE_CSS = "outline: 1px dotted #888888; outline-offset: -1px;"
PLACEHOLDER = "<i>Click a group to pin both tokenizers' tokens and its numbers here.</i>"


def parts_text(row: dict) -> str:
    """The group's text as one side's tokens (the side that cut it into several; the teacher's if both did), with
    ¦ between them; a one-to-one group's text as it is (an end token: the teacher's token)."""
    teacher, student = row["teacher_tokens"] or [], row["student_tokens"] or []
    pieces = teacher if len(teacher) > 1 or len(student) <= 1 else student
    if not row["text"]:
        return visible(teacher[0] if teacher else student[0] if student else "")
    return PART.join(visible(piece) for piece in pieces) if len(pieces) > 1 else visible(row["text"])


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def group_token(row: dict, metric: str, color: str | None) -> dict:
    """One box of the strip: its text (parts marked), inline style and tooltip."""
    merged = row["kind"].startswith("merged")
    background = color or "#ffffff"
    ink = readable_ink(background)
    style = (f"background: {background}; color: {ink}; padding: 1px 0; cursor: pointer;"
             + (hard_css(ink) if row["hard"] else "") + (MERGED_CSS if merged else "")
             + (NOT_APPLICABLE_CSS if color is None else ""))
    sides = (f"teacher {PART.join(visible(t) for t in row['teacher_tokens'])} / student "
             f"{PART.join(visible(t) for t in row['student_tokens'])}")
    shown = "" if metric == "kind" else f"{metric} {_number(row[metric])}, "
    return {"text": parts_text(row), "color": background, "hard": bool(row["hard"]), "kind": row["kind"],
            "style": style, "title": f"bytes {row['byte_start']}-{row['byte_end']} ({row['kind']}): {shown}"
                                     f"u {row['unc']:.3f}; {sides}"}


def group_detail_html(row: dict) -> str:
    """Both tokenizers' tokens of one group and its numbers."""
    def side(name: str) -> str:
        cells = "".join(f"<td><code>{html.escape(visible(token))}</code><br><small>{i}</small></td>"
                        for token, i in zip(row[f"{name}_tokens"], row[f"{name}_ids"]))
        return f"<tr><th style='text-align:left'>{name}</th>{cells}</tr>"

    numbers = ", ".join(f"{name} {_number(row[name])}" for name in ("unc", "tkd", "kl", "dkd", "uld", "t_unmatched",
                                                                    "s_unmatched"))
    return (f'<div style="line-height:1.6"><b>{html.escape(visible(row["text"]) or "(end token)")}</b> bytes '
            f"{row['byte_start']}-{row['byte_end']}: {row['kind']}, {row['text_class']}, "
            f"{'hard' if row['hard'] else 'easy'}<br>"
            f'<table style="border-spacing:10px 0; margin-left:-10px">{side("teacher")}{side("student")}</table>'
            f"{numbers}<br>p(group): teacher {math.exp(row['t_logp']):.3g}, student {math.exp(row['s_logp']):.3g}"
            "</div>")


def kind_legend() -> str:
    boxes = " &nbsp; ".join(f'<span style="background:{color};color:{readable_ink(color)};padding:1px 4px;'
                            f'{MERGED_CSS if kind.startswith("merged") else "border:1px solid #ccc;"}">{kind}</span>'
                            for kind, color in KIND_COLORS.items())
    return (f'<div class="kdviz-legend" style="line-height:2">group kind: {boxes}<br>framed: one group merged on a '
            f"side, {PART} between that side's tokens; underlined: hard</div>")


class GroupViewer:
    """Pick a response and a colouring: its aligned groups as boxes; click one to pin both sides' tokens.

    >>> import polars as pl
    >>> row = lambda group, text, kind, t, s, kl: {"doc_id": 0, "source": "d:0", "group": group,
    ...     "byte_start": group, "byte_end": group + len(text), "text": text, "kind": kind, "text_class": "other",
    ...     "teacher_ids": list(range(len(t))), "student_ids": list(range(len(s))), "teacher_tokens": t,
    ...     "student_tokens": s, "unc": 0.5, "tkd": 0.1, "t_logp": -0.7, "s_logp": -0.9, "kl": kl, "dkd": kl,
    ...     "t_unmatched": kl, "s_unmatched": kl, "uld": 0.3, "hard": False}
    >>> view = GroupViewer(pl.DataFrame([row(0, "def", "same", ["def"], ["def"], 0.2),
    ...                                  row(3, "lineno", "merged-one-side", ["lin", "eno"], ["lineno"], None)]))
    >>> [token["text"] for token in view.strip.tokens]
    ['def', 'lin¦eno']
    >>> view.strip.selected = 1
    >>> "merged-one-side" in view.detail.value and "eno" in view.detail.value
    True
    """

    def __init__(self, table: GroupTable | pl.DataFrame, *, metric: str = "unc", doc: int | None = None):
        df = table.df if isinstance(table, GroupTable) else table
        if "kind" not in df.columns or "teacher_tokens" not in df.columns:
            raise ValueError("GroupViewer draws a group table (kdviz.analyze on a pair with different tokenizers); "
                             "for one tokenizer's token table use kdviz.widgets.TokenInspector.")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}.")
        self.df = df.sort("doc_id", "byte_start", "group")
        docs = self.df.select("doc_id", "source").unique(maintain_order=True)
        self.doc = w.Dropdown(options=[(f"{d}: {s}", d) for d, s in docs.iter_rows()],
                              value=doc if doc is not None else docs["doc_id"][0], description="response", style=WIDE)
        self.metric = w.Dropdown(options=[(f"{m}: {text}", m) for m, text in METRICS.items()], value=metric,
                                 description="colour by", style=WIDE)
        self.legend, self.detail = w.HTML(), w.HTML(PLACEHOLDER)
        self.detail.add_class("kdviz-group-detail")
        self.strip = TokenStrip(tokens=[])
        self.strip.add_class("kdviz-groups")
        self.strip.observe(lambda change: self.show_group(change["new"]), "selected")
        self.doc.observe(lambda _: self._draw(), "value")
        self.metric.observe(lambda _: self._draw(), "value")
        self._draw()

    def _colors(self, rows: pl.DataFrame, metric: str) -> list[str | None]:
        if metric == "kind":
            self.legend.value = kind_legend()
            return [KIND_COLORS[kind] for kind in rows["kind"]]
        values = self.df[metric].drop_nulls().drop_nans()
        low, high = float(values.quantile(0.01) or 0.0), max(float(values.quantile(0.99) or 0.0), 1e-6)
        self.legend.value = legend_html(METRICS[metric], low=low, high=high) + kind_legend()
        present = [v for v in rows[metric] if v is not None and not math.isnan(v)]
        colors = iter(token_colors(present, low=low, high=high))
        return [None if v is None or math.isnan(v) else next(colors) for v in rows[metric]]

    def _draw(self) -> None:
        self._rows = self.df.filter(pl.col("doc_id") == self.doc.value)
        colors = self._colors(self._rows, self.metric.value)
        self.strip.selected = -1
        self.strip.tokens = [group_token(row, self.metric.value, color)
                             for row, color in zip(self._rows.iter_rows(named=True), colors)]
        self.detail.value = PLACEHOLDER

    def show_group(self, index: int) -> None:
        """Pin group `index` of the shown response (what a click does)."""
        if 0 <= index < len(self._rows):
            self.detail.value = group_detail_html(self._rows.row(index, named=True))

    def widget(self) -> w.Widget:
        return w.VBox([w.HBox([self.doc, self.metric]), self.legend, self.strip, self.detail])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget())

    def static_html(self) -> str:
        """The legend and the shown response as self-contained HTML (executed notebooks)."""
        return self.legend.value + self.strip.static_html()
