"""Small HTML rendering of polars tables for widgets and static notebook output."""

from __future__ import annotations

import html

import polars as pl


def html_table(df: pl.DataFrame, *, digits: int = 3) -> str:
    """An HTML <table> of `df` with floats rounded to `digits`."""

    def cell(value) -> str:
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in df.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
