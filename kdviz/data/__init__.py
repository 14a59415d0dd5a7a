"""Datasets for analysis and distillation: plain text, prompt/response records, HF datasets, zoo data.

Reading happens in two steps. `read_data` checks and reads the input without a tokenizer
(paths exist, files are text, records have string fields), so mistakes surface before any
model is loaded. `tokenize` then formats records with a template and tokenizes them.
`load_data` does both. Every example's `labels` hold the target ids (-100 where a token is not
a target, e.g. prompt tokens of instruction data), aligned with `input_ids`; the model's
logits at t predict labels at t + 1.
"""

from kdviz.data.padding import Batch, collate, pad_id
from kdviz.data.examples import (IGNORE_INDEX, Example, TokenDataset, example_key, target_positions,
                                 usable_context)
from kdviz.data.read import ZOO_DATASETS, Record, Source, read_data, read_jsonl
from kdviz.data.templates import TEMPLATES, check_template, format_record, resolve_template, stop_ids
from kdviz.data.tokenizing import (encode_segments, from_files, from_records, from_texts, load_data, tokenize,
                                    zoo_dataset, zoo_source)

__all__ = ["IGNORE_INDEX", "TEMPLATES", "ZOO_DATASETS", "Batch", "Example", "Record", "Source", "TokenDataset",
           "check_template", "collate", "encode_segments", "example_key", "format_record", "from_files", "from_records",
           "from_texts", "load_data", "pad_id", "read_data", "read_jsonl", "resolve_template", "stop_ids",
           "target_positions", "tokenize", "usable_context", "zoo_dataset", "zoo_source"]
