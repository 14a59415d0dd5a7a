"""Analysis: teacher and student over a dataset -> a `TokenTable` (one row per token) and its `Summary`; across
tokenizers a `GroupTable` (one row per aligned group) and its `AlignmentSummary`."""

from kdviz.analysis.exposure import ExposureBias, exposure_bias
from kdviz.analysis.grouptable import AlignmentSummary, GroupTable
from kdviz.analysis.run import DEFAULT_BATCH_TOKENS, DEFAULT_PART_TOKENS, SPLITS, analyze, check_options
from kdviz.analysis.table import Summary, TokenTable, visible

__all__ = ["DEFAULT_BATCH_TOKENS", "DEFAULT_PART_TOKENS", "SPLITS", "AlignmentSummary", "ExposureBias", "GroupTable",
           "Summary", "TokenTable", "analyze", "check_options", "exposure_bias", "visible"]
