"""The rows of one batch and of one part: the teacher's side from `pair.source`, the student's, token texts."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from kdviz.batching import Part, length_batches
from kdviz.data import IGNORE_INDEX, TokenDataset, collate, example_key, pad_id
from kdviz.maths.decomposition import SCALAR_FIELDS
from kdviz.analysis.table import visible
from kdviz.pair import ModelPair


@dataclass(frozen=True)
class Settings:
    top_k: int
    temperature: float
    padding_side: str
    batch_size: int
    batch_tokens: int


def batch_frame(pair: ModelPair, examples, doc_ids: list[int], s: Settings) -> pl.DataFrame:
    """Per-token columns for one padded batch (row order: batch row, then position)."""
    batch = collate(examples, pad_id=pad_id(pair.tokenizer), padding_side=s.padding_side)
    targets = pair.source.analysis_targets(batch)  # (B, L-1): every position, or the targets only (a cache)
    stats = pair.source.decompose(pair.student, batch, [example_key(ex) for ex in examples], linear=pair.linear_heads,
                                  temperature=s.temperature, top_k=s.top_k)
    b_idx, t_idx = stats.valid.cpu().nonzero(as_tuple=True)
    columns = {
        "doc_id": torch.tensor(doc_ids)[b_idx].numpy(),
        "position": (t_idx + 1 - torch.tensor(batch.offsets)[b_idx]).numpy(),
        "token_id": targets[b_idx, t_idx].numpy(),
        "is_response": (batch.labels[:, 1:][b_idx, t_idx] != IGNORE_INDEX).numpy(),
    }
    for name, tensor in stats.as_dict().items():
        if name != "valid":
            columns[name] = tensor.cpu()[b_idx, t_idx].numpy()
    df = pl.DataFrame(columns)
    if "t_rank" in df.columns:  # -1: outside a cached top-k, unknown
        df = df.with_columns(t_rank=pl.when(pl.col("t_rank") > 0).then(pl.col("t_rank")))
    lists = [c for c in df.columns if c.endswith(("_topk_ids", "_topk_probs"))]
    return df.with_columns(pl.col(c).cast(pl.List(df.schema[c].inner)) for c in lists)


class TokenTexts:
    """Decoded, visible token texts, decoded once per id over the whole run."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, {}

    def add_columns(self, df: pl.DataFrame, top_k: int) -> pl.DataFrame:
        ids = set(df["token_id"].unique().to_list())
        if top_k:
            ids |= set(df["t_topk_ids"].explode().unique().to_list()) | set(df["s_topk_ids"].explode().unique().to_list())
        self.texts.update({i: visible(self.tokenizer.decode([i])) for i in ids if i not in self.texts})
        texts = {i: self.texts[i] for i in ids}
        df = df.with_columns(token=pl.col("token_id").replace_strict(texts, return_dtype=pl.String))
        if top_k:
            df = df.with_columns(
                pl.col(f"{side}_topk_ids").list.eval(pl.element().replace_strict(texts, return_dtype=pl.String))
                .alias(f"{side}_topk_tokens") for side in ("t", "s"))
        return df


def part_frame(pair: ModelPair, dataset: TokenDataset, part: Part, s: Settings, texts: TokenTexts,
                advance) -> pl.DataFrame:
    examples = dataset.examples[part.start : part.end]
    lengths = [len(ex.input_ids) for ex in examples]
    frames = []
    for batch in length_batches(lengths, batch_size=s.batch_size, batch_tokens=s.batch_tokens):
        frames.append(batch_frame(pair, [examples[i] for i in batch], [part.start + i for i in batch], s))
        advance(sum(lengths[i] for i in batch))
    df = pl.concat(frames).sort("doc_id", "position")
    df = df.with_columns(pl.col(list(SCALAR_FIELDS)).cast(pl.Float32))
    of = lambda field: {part.start + i: getattr(ex, field) for i, ex in enumerate(examples)}  # noqa: E731
    return texts.add_columns(df, s.top_k).with_columns(
        source=pl.col("doc_id").replace_strict(of("source"), return_dtype=pl.String),
        response_from=pl.col("doc_id").replace_strict(of("origin"), return_dtype=pl.String),
        sample=pl.col("doc_id").replace_strict(of("sample"), return_dtype=pl.Int32))


