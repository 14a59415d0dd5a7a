"""Notebook views (ipywidgets + plotly) that render what kdviz computed; no math lives here."""

from kdviz.widgets.inspector import TokenInspector
from kdviz.widgets.launcher import DistillLauncher, LiveCurves
from kdviz.widgets.strip import TokenStrip
from kdviz.widgets.tables import html_table
from kdviz.widgets.workshop import ToyKD

__all__ = ["DistillLauncher", "LiveCurves", "TokenInspector", "TokenStrip", "ToyKD", "html_table", "setup_notebook"]


def setup_notebook() -> None:
    """Plotly figures render live in JupyterLab and as inline, offline HTML in executed copies."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"
