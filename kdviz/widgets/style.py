"""Styles chosen for reading: a light colour scale, text colour by WCAG contrast, a legend, label widths.

>>> contrast_ratio("#ffffff", "#000000")
21.0
>>> readable_ink("rgb(239, 101, 72)"), readable_ink("rgb(40, 40, 120)")
('#000000', '#ffffff')
"""

from __future__ import annotations

import html

from plotly.colors import hex_to_rgb, sample_colorscale, unlabel_rgb

from kdviz.widgets.strip import HIGHLIGHT_CSS, PINNED_CSS

# The light end of ColorBrewer's OrRd: black text reads at >= 6:1 on every colour of it.
SCALE = [[0.0, "#ffffff"], [0.2, "rgb(254, 232, 200)"], [0.4, "rgb(253, 212, 158)"], [0.6, "rgb(253, 187, 132)"],
         [0.8, "rgb(252, 141, 89)"], [1.0, "rgb(239, 101, 72)"]]
INKS = ("#000000", "#ffffff")  # one of the two always reads at >= 4.58:1, whatever the background
DIM_INK = "#6b6b6b"  # filtered-out tokens: grey text on the box's white, 5.3:1
WIDE = {"description_width": "initial"}  # ipywidgets labels at their full width, never cut off


def _rgb(color: str) -> tuple[float, float, float]:
    return hex_to_rgb(color) if color.startswith("#") else unlabel_rgb(color)


def relative_luminance(color: str) -> float:
    """WCAG 2 relative luminance of "#rrggbb" or "rgb(r, g, b)"."""
    channels = [c / 255 for c in _rgb(color)]
    r, g, b = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(first: str, second: str) -> float:
    """WCAG contrast ratio between two colours, from 1 (same) to 21 (black on white)."""
    light, dark = sorted((relative_luminance(first), relative_luminance(second)), reverse=True)
    return round((light + 0.05) / (dark + 0.05), 2)


def readable_ink(background: str) -> str:
    """Black or white text, whichever contrasts more with `background` (>= 4.58:1 on any background)."""
    return max(INKS, key=lambda ink: contrast_ratio(ink, background))


def token_colors(values: list[float], *, low: float, high: float, scale=SCALE) -> list[str]:
    """Background colours for `values`, clipped to [low, high] on `scale` (a plotly colorscale)."""
    span = max(high - low, 1e-9)
    return sample_colorscale(scale, [min(1.0, max(0.0, (v - low) / span)) for v in values])


def legend_html(title: str, *, low: float, high: float, scale=SCALE) -> str:
    """A colour bar from `low` to `high` and a key to the strip's marks."""
    stops = ", ".join(f"{color} {100 * at:.0f}%" for at, color in scale)
    bar = (f'<span style="display:inline-block;width:180px;height:12px;vertical-align:middle;'
           f'border:1px solid #999;background:linear-gradient(to right, {stops})"></span>')
    key = (f'<span style="{hard_css(INKS[0])}">underlined</span>: hard &nbsp; '
           f'<span style="{HIGHLIGHT_CSS}">dashed</span>: worst k / scatter selection &nbsp; '
           f'<span style="{PINNED_CSS}">framed</span>: pinned &nbsp; '
           f'<span style="color:{DIM_INK}">grey</span>: filtered out &nbsp; <i>italic</i>: prompt (context, not a '
           'target) &nbsp; ↵ newline, · space, → tab')
    return (f'<div class="kdviz-legend" style="line-height:2">{html.escape(title)}: {low:.3f} {bar} {high:.3f}'
            f' (values beyond the ends take the end colours)<br>{key}</div>')


def hard_css(ink: str) -> str:
    """The hard-token underline, in the token's own text colour (so it contrasts like the text)."""
    return f"border-bottom: 2px solid {ink};"
