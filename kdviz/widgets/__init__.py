"""Notebook views (ipywidgets + plotly) that render what kdviz computed; no math lives here."""

from kdviz.widgets.groups import GroupViewer
from kdviz.widgets.inspector import TokenInspector
from kdviz.widgets.launcher import DistillLauncher, LiveCurves
from kdviz.widgets.rollouts import RolloutViewer
from kdviz.widgets.runs import RunComparison
from kdviz.widgets.strip import TokenStrip
from kdviz.widgets.tables import html_table
from kdviz.widgets.workshop import ToyKD

__all__ = ["DistillLauncher", "GroupViewer", "LiveCurves", "RolloutViewer", "RunComparison", "TokenInspector",
           "TokenStrip", "ToyKD", "html_table", "setup_notebook"]


def setup_notebook() -> None:
    """Plotly figures render live in JupyterLab and as inline, offline HTML in executed copies.

    plotly.js is embedded once in the notebook (no CDN); figures leave out MathJax, which
    plotly's own notebook renderer would fetch from a CDN.
    """
    import plotly.io as pio
    from plotly.io._base_renderers import NotebookRenderer

    class OfflineNotebookRenderer(NotebookRenderer):
        def to_mimebundle(self, fig_dict):
            html = pio.to_html(fig_dict, include_plotlyjs=False, include_mathjax=False, full_html=False,
                               default_width="100%", default_height=525, validate=False)
            return {"text/html": html}

    pio.renderers["kdviz_offline"] = OfflineNotebookRenderer(connected=False)
    pio.renderers.default = "plotly_mimetype+kdviz_offline"
