"""A self-contained HTML report of a TokenTable (plotly inlined: opens offline, no CDN), or of a GroupTable (a pair
across tokenizers: the alignment summary and the groups with the largest TKD, as plain HTML tables)."""

from __future__ import annotations

import html
import math
import os
from pathlib import Path

import plotly.graph_objects as go
import polars as pl

from kdviz.analysis.grouptable import GroupTable
from kdviz.analysis.table import TokenTable
from kdviz.files import write_text

GROUP_COLORS = {"hard": "#d62728", "easy": "#1f77b4"}
MAX_SCATTER_POINTS = 4000


def _groups(table: TokenTable):
    targets = table.targets
    return {"hard": targets.filter(pl.col("hard")), "easy": targets.filter(~pl.col("hard"))}


def uncertainty_histogram(table: TokenTable, *, bins: int = 50) -> go.Figure:
    """Both groups over shared bins of log10 p(target) = log10(1 - u), ticks labelled with u.

    On a linear u axis an uncertain teacher's hard tokens all sit in the last bin (u = 0.98 ...
    0.99999); the log axis spreads them out.
    """
    groups = {name: df["t_logp"] / math.log(10) for name, df in _groups(table).items()}
    low = min((float(x.min()) for x in groups.values() if len(x)), default=-1.0)
    size = max(-low, 1e-6) / bins
    fig = go.Figure()
    for name, x in groups.items():
        fig.add_histogram(x=x.to_list(), name=f"{name} ({len(x)})", marker_color=GROUP_COLORS[name], opacity=0.75,
                          xbins=dict(start=low, end=size / 2, size=size))
    ticks = list(range(math.floor(low), 1))
    fig.update_layout(barmode="overlay", title="Teacher uncertainty u = 1 - p(target), on a log scale of p(target)",
                      xaxis=dict(title="u (axis: log10 p(target) = log10(1 - u))", tickvals=ticks,
                                 ticktext=[f"{1 - 10.0 ** t:.{max(1, -t)}f}" for t in ticks]),
                      yaxis_title="tokens")
    return fig


def kl_parts_bar(table: TokenTable) -> go.Figure:
    """Total TKD and u*DKD per group: where the KL of each group comes from."""
    names, tkd, weighted = [], [], []
    for name, df in _groups(table).items():
        names.append(name)
        tkd.append(df["tkd"].sum())
        weighted.append((df["unc"] * df["dkd"]).sum())
    fig = go.Figure([go.Bar(name="TKD", x=names, y=tkd), go.Bar(name="u * DKD", x=names, y=weighted)])
    fig.update_layout(barmode="stack", title="Sum of KL = TKD + u * DKD, by group", yaxis_title="nats")
    return fig


def uncertainty_dkd_scatter(table: TokenTable) -> go.Figure:
    fig = go.Figure()
    for name, df in _groups(table).items():
        if df.height > MAX_SCATTER_POINTS // 2:
            df = df.sample(MAX_SCATTER_POINTS // 2, seed=0)
        fig.add_scattergl(x=df["unc"].to_list(), y=df["dkd"].to_list(), mode="markers", name=name,
                          marker=dict(color=GROUP_COLORS[name], size=4, opacity=0.6),
                          text=df["token"].to_list(), hovertemplate="%{text}<br>u=%{x:.3f}<br>DKD=%{y:.3f}")
    fig.update_layout(title="Uncertainty vs DKD (each point a token)", xaxis_title="u", yaxis_title="DKD (nats)")
    return fig


def worst_tokens_html(table: TokenTable, n: int = 20) -> str:
    worst = table.targets.sort("kl", descending=True).head(n)
    rows = "".join(
        f"<tr><td>{html.escape(r['source'])}</td><td>{r['position']}</td><td><code>{html.escape(r['token'])}</code></td>"
        f"<td>{r['unc']:.3f}</td><td>{r['tkd']:.3f}</td><td>{r['dkd']:.3f}</td><td>{r['kl']:.3f}</td>"
        f"<td>{'hard' if r['hard'] else 'easy'}</td></tr>"
        for r in worst.iter_rows(named=True)
    )
    head = "".join(f"<th>{h}</th>" for h in ("source", "pos", "token", "u", "TKD", "DKD", "KL", "group"))
    return f"<table><tr>{head}</tr>{rows}</table>"


def html_table(df: pl.DataFrame) -> str:
    """`df` as an HTML table: floats to 4 decimals, lists joined by spaces, every cell escaped."""
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, list):
            return " ".join(f"<code>{html.escape(str(v))}</code>" for v in value)
        return "-" if value is None else html.escape(str(value))

    head = "".join(f"<th>{html.escape(name)}</th>" for name in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in df.iter_rows())
    return f"<table><tr>{head}</tr>{rows}</table>"


def _page(title: str, data: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}
pre{{background:#f6f6f6;padding:1em;white-space:pre-wrap;overflow-wrap:anywhere}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px}}</style></head>
<body><h1>{html.escape(title)}</h1><p>Data: {html.escape(data)}</p>
{body}
</body></html>"""


def write_group_report(table: GroupTable, path: str | os.PathLike, *, worst: int = 30) -> Path:
    """Write a group table's summary, its means by kind and its `worst` groups by TKD to one HTML file."""
    meta, summary = table.meta, table.summary()
    columns = ["source", "text", "kind", "teacher_tokens", "student_tokens", "unc", "tkd", "kl", "t_unmatched", "uld",
               "hard"]
    largest = table.df.sort("tkd", descending=True, nulls_last=True).head(worst).select(columns)
    body = (f"<pre>{html.escape(str(summary))}</pre><h2>By kind</h2>{html_table(summary.kinds)}"
            f"<h2>Where alignment breaks</h2>{html_table(summary.breaks)}"
            f"<h2>Groups with the largest TKD</h2>{html_table(largest)}")
    title = f"kdviz (across tokenizers): {meta.get('teacher', 'teacher')} -> {meta.get('student', 'student')}"
    return write_text(path, _page(title, str(meta.get("data", "")), body), what="report")


def write_report(table: TokenTable, path: str | os.PathLike) -> Path:
    """Write the summary, three figures and the worst tokens to one offline HTML file (renamed into place)."""
    figures = [uncertainty_histogram(table), kl_parts_bar(table), uncertainty_dkd_scatter(table)]
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    meta = table.meta
    title = f"kdviz: {meta.get('teacher', 'teacher')} -> {meta.get('student', 'student')}"
    body = (f"<pre>{html.escape(str(table.summary()))}</pre>\n{''.join(parts)}\n"
            f"<h2>Tokens with the largest KL</h2>{worst_tokens_html(table)}")
    return write_text(path, _page(title, str(meta.get("data", "")), body), what="report")
