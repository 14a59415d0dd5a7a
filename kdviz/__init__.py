"""kdviz: a Jupyter workbench for knowledge distillation of autoregressive language models.

>>> import kdviz
>>> pair = kdviz.load_pair("zoo:teacher-l", "zoo:student", device="cpu")
>>> table = kdviz.analyze(pair, "zoo:docstrings", limit=8, progress=False)
>>> table.summary().row("all")["tokens"] > 0
True
"""

__version__ = "0.1.0"

from kdviz import losses
from kdviz.analysis import Summary, TokenTable, analyze, exposure_bias
from kdviz.comparison import Comparison, compare
from kdviz.maths.decomposition import TokenStats, decompose
from kdviz.pair import ModelPair, load_pair

__all__ = ["losses", "Comparison", "ModelPair", "Summary", "TokenStats", "TokenTable", "analyze", "compare", "decompose",
           "exposure_bias", "load_pair"]
