"""`analyze` for a teacher and a student with different tokenizers: one row per aligned group (`kdviz.align`).

Prompt/response records: each model reads the record in its own template ("auto" picks per tokenizer, as for
one model; "chat" needs both tokenizers to have one), and the groups are aligned on the response's text, followed
by each side's end-of-response token (EOS, or the chat template's end of turn) as a last, zero-width group.
Plain text: the text itself, cut into windows at group boundaries so that both tokenizations fit their contexts;
a window's first group is context only (no row predicts it). Per group, `kdviz.maths.groups.group_stats`.

>>> import kdviz
>>> pair = kdviz.load_pair("zoo:smollm2-student", "zoo:student", device="cpu")  # doctest: +SKIP
>>> table = kdviz.analyze(pair, "zoo:docstrings", limit=8, progress=False)  # doctest: +SKIP
>>> print(table.summary())  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from kdviz.align import Alignment, Group, Tokenized, align, piece_bytes, token_scheme, tokenize_with_offsets
from kdviz.analysis.grouptable import GroupTable, text_class
from kdviz.analysis.table import visible
from kdviz.batching import length_batches
from kdviz.data import (Example, Record, Source, TokenDataset, collate, encode_segments, format_record, pad_id,
                        read_data, resolve_template, usable_context, zoo_source)
from kdviz.maths.groups import group_stats
from kdviz.models import context_length, model_logits
from kdviz.pair import ModelPair

COLUMN_OF_STAT = {"kl_matched": "kl", "dkd_matched": "dkd"}


@dataclass(frozen=True)
class AlignedExample:
    """A text to analyse: its alignment, and the ids each model reads before the text (its prompt, in its template)."""

    source: str
    alignment: Alignment
    teacher_before: list[int]
    student_before: list[int]

    def inputs(self, role: str) -> list[int]:
        """What the teacher or the student reads: the ids before, then the text's tokens."""
        before, tokens = ((self.teacher_before, self.alignment.teacher) if role == "teacher"
                          else (self.student_before, self.alignment.student))
        return before + tokens.ids


def response_tokens(tokenizer, record: Record, template: str) -> tuple[list[int], Tokenized]:
    """(ids before the response's text, its tokens with byte offsets and the end-of-response token) under the
    tokenizer's own rendering of `template`."""
    formatted = format_record(record, resolve_template(template, tokenizer, instruction=record.instruction), tokenizer)
    at = next((i for i, seg in enumerate(formatted.response) if seg.user and seg.text == record.response), None)
    if at is None:
        raise ValueError(f"{record.where}: this chat template rewrites the response, so its text cannot be aligned "
                         "across tokenizers; use template='alpaca' or 'plain'.")
    before = encode_segments(tokenizer, formatted.prompt + formatted.response[:at])
    end = encode_segments(tokenizer, formatted.response[at + 1 :])[:1]  # a chat template's end of turn
    if formatted.eos and tokenizer.eos_token_id is not None:
        end = [tokenizer.eos_token_id]
    text, size = tokenize_with_offsets(tokenizer, record.response), len(record.response.encode())
    pieces = [piece_bytes(p, token_scheme(tokenizer)) for p in tokenizer.convert_ids_to_tokens(end)]
    return before, Tokenized(text.ids + end, text.offsets + [(size, size)] * len(end), text.pieces + pieces)


def sub_alignment(alignment: Alignment, start: int, stop: int) -> Alignment:
    """Groups [start, stop) of `alignment`, with only their tokens (positions renumbered from 0)."""
    sides = []
    for tokens, role in ((alignment.teacher, "teacher"), (alignment.student, "student")):
        lo = sum(len(getattr(g, role)) for g in alignment.groups[:start])
        hi = lo + sum(len(getattr(g, role)) for g in alignment.groups[start:stop])
        sides.append((lo, Tokenized(tokens.ids[lo:hi], tokens.offsets[lo:hi], tokens.pieces[lo:hi])))
    (t_lo, teacher), (s_lo, student) = sides
    groups = [Group([i - t_lo for i in g.teacher], [i - s_lo for i in g.student], g.byte_start, g.byte_end, g.kind)
              for g in alignment.groups[start:stop]]
    return Alignment(alignment.text, teacher, student, groups)


def fitted(example: AlignedExample, contexts: tuple[int, int], *, truncate: bool) -> AlignedExample | None:
    """`example` if both models' inputs fit their contexts; else with `truncate` its longest run of first groups
    that fits, else None."""
    room = (contexts[0] - len(example.teacher_before), contexts[1] - len(example.student_before))
    groups, used, keep = example.alignment.groups, [0, 0], 0
    for group in groups:
        used = [used[0] + len(group.teacher), used[1] + len(group.student)]
        if used[0] > room[0] or used[1] > room[1]:
            break
        keep += 1
    if keep == len(groups):
        return example
    if not truncate or keep == 0:
        return None
    return AlignedExample(example.source, sub_alignment(example.alignment, 0, keep), example.teacher_before,
                          example.student_before)


def record_examples(pair: ModelPair, records: list[Record], *, template: str, contexts: tuple[int, int],
                    truncate: bool, skip_long: bool, limit: int | None) -> list[AlignedExample]:
    """The records that fit both contexts (long ones cut with `truncate`, else skipped with `skip_long`)."""
    out = []
    for record in records:
        if limit is not None and len(out) >= limit:
            break
        if not record.response.strip():
            raise ValueError(f"{record.where}: the response is empty; every record needs a response to use as targets.")
        (t_before, t_tokens), (s_before, s_tokens) = (response_tokens(tok, record, template)
                                                      for tok in (pair.teacher_tokenizer, pair.tokenizer))
        example = AlignedExample(record.where, align(t_tokens, s_tokens, record.response), t_before, s_before)
        kept = fitted(example, contexts, truncate=truncate)
        if kept is None and not skip_long:
            raise ValueError(f"{record.where}: the teacher reads {len(example.inputs('teacher'))} tokens and the student "
                             f"{len(example.inputs('student'))}, longer than their contexts {contexts}. Pass "
                             "truncate=True (CLI: --truncate) to cut the response, or drop the record.")
        out += [kept] if kept is not None else []
    return out


def text_windows(pair: ModelPair, name: str, text: str, contexts: tuple[int, int]) -> list[AlignedExample]:
    """`text` cut at group boundaries into windows that fit both contexts; each window's first group is read as
    context (no row predicts its tokens) and the rest are analysed."""
    alignment = align(tokenize_with_offsets(pair.teacher_tokenizer, text), tokenize_with_offsets(pair.tokenizer, text),
                      text)
    bounds, start, used = [], 0, [0, 0]
    for i, group in enumerate(alignment.groups):
        used = [used[0] + len(group.teacher), used[1] + len(group.student)]
        if used[0] > contexts[0] or used[1] > contexts[1]:
            bounds.append((start, i))
            start, used = i, [len(group.teacher), len(group.student)]
    bounds.append((start, len(alignment.groups)))
    out = []
    for window, (start, stop) in enumerate(b for b in bounds if b[1] - b[0] >= 2):
        first = alignment.groups[start]
        out.append(AlignedExample(f"{name}#window{window}", sub_alignment(alignment, start + 1, stop),
                                  [alignment.teacher.ids[i] for i in first.teacher],
                                  [alignment.student.ids[i] for i in first.student]))
    return out


def aligned_examples(pair: ModelPair, source: Source, *, template: str, max_length: int | None, limit: int | None,
                     truncate: bool) -> list[AlignedExample]:
    """The data as aligned examples (in data order), each fitting the teacher's and the student's context."""
    contexts = (usable_context(context_length(pair.teacher), max_length),
                usable_context(context_length(pair.student), max_length))
    if source.zoo:
        source = zoo_source(source.zoo)
    if source.records:
        examples = record_examples(pair, source.records, template=template, contexts=contexts, truncate=truncate,
                                   skip_long=source.zoo is not None, limit=limit)
    else:
        if template not in ("auto", "plain"):
            raise ValueError(f"template={template!r} formats prompt/response records, but {source.description} is "
                             "plain text. Leave the template out (auto) for text.")
        examples = []
        for name, text in source.texts:
            examples += text_windows(pair, name, text, contexts)
            if limit is not None and len(examples) >= limit:
                break
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{source.description} gave no example that fits the teacher's and the student's contexts "
                         f"{contexts} tokens; give a longer max_length (or none) or shorter texts.")
    return examples


@torch.inference_mode()
def text_rows(model, tokenizer, examples: list[AlignedExample], role: str, *, vocab: int, temperature: float,
              padding_side: str) -> list[Tensor]:
    """Per example, the log-softmax rows [n, V] (fp32, on the cpu) that predict the n tokens of its text."""
    batch = collate([Example(ex.inputs(role), ex.inputs(role), ex.source) for ex in examples],
                    pad_id=pad_id(tokenizer), padding_side=padding_side)
    device = next(model.parameters()).device
    logits = model_logits(model, batch.input_ids.to(device), batch.attention_mask.to(device))  # (B, L, V')
    out = []
    for b, ex in enumerate(examples):
        first = batch.offsets[b] + len(ex.teacher_before if role == "teacher" else ex.student_before) - 1
        tokens = len(getattr(ex.alignment, role).ids)
        rows = logits[b, first : first + tokens, :vocab].float() / temperature  # (n, V)
        out.append(rows.log_softmax(-1).cpu())
    return out


def group_frame(example: AlignedExample, stats: dict[str, Tensor], doc_id: int) -> pl.DataFrame:
    """One row per group of `example`: where it is, its tokens on each side, its kind and statistics."""
    alignment, data = example.alignment, example.alignment.text.encode()
    groups = alignment.groups
    texts = [data[g.byte_start : g.byte_end].decode("utf-8", "replace") for g in groups]
    token_text = lambda tokens, i: visible(tokens.pieces[i].decode("utf-8", "backslashreplace"))  # noqa: E731
    columns = {
        "doc_id": [doc_id] * len(groups), "source": [example.source] * len(groups), "group": list(range(len(groups))),
        "byte_start": [g.byte_start for g in groups], "byte_end": [g.byte_end for g in groups], "text": texts,
        "kind": [g.kind for g in groups], "text_class": [text_class(t) for t in texts],
        "teacher_ids": [[alignment.teacher.ids[i] for i in g.teacher] for g in groups],
        "student_ids": [[alignment.student.ids[i] for i in g.student] for g in groups],
        "teacher_tokens": [[token_text(alignment.teacher, i) for i in g.teacher] for g in groups],
        "student_tokens": [[token_text(alignment.student, i) for i in g.student] for g in groups],
    }
    schema = {"teacher_ids": pl.List(pl.Int64), "student_ids": pl.List(pl.Int64),
              "teacher_tokens": pl.List(pl.String), "student_tokens": pl.List(pl.String)}
    stat_columns = {COLUMN_OF_STAT.get(name, name): values.float().numpy() for name, values in stats.items()}
    return pl.DataFrame(columns, schema_overrides=schema).with_columns(
        pl.Series(name, values, dtype=pl.Float32).fill_nan(None) for name, values in stat_columns.items())


def batch_frames(pair: ModelPair, examples: list[AlignedExample], doc_ids: list[int], *, temperature: float,
                 padding_side: str) -> list[pl.DataFrame]:
    """Run both models on a batch of examples and return each example's group rows."""
    options = dict(temperature=temperature, padding_side=padding_side)
    teacher = text_rows(pair.teacher, pair.teacher_tokenizer, examples, "teacher", vocab=pair.source.vocab_size,
                        **options)
    student = text_rows(pair.student, pair.tokenizer, examples, "student", vocab=pair.vocab_size, **options)
    frames = []
    for ex, t_rows, s_rows, doc_id in zip(examples, teacher, student, doc_ids):
        stats = group_stats(t_rows, torch.tensor(ex.alignment.teacher.ids, dtype=torch.long), s_rows,
                            torch.tensor(ex.alignment.student.ids, dtype=torch.long), ex.alignment.groups,
                            pair.vocabulary.student_of_teacher)
        frames.append(group_frame(ex, stats.as_dict(), doc_id))
    return frames


def with_hard(df: pl.DataFrame, *, k: float, split: str, batch_size: int) -> pl.DataFrame:
    """`hard`: a group's u is at least the (1 - k) quantile (linear) of its sequence's, batch's or the data's u."""
    threshold = pl.col("unc").quantile(1 - k, interpolation="linear")
    if split != "dataset":
        threshold = threshold.over(pl.col("doc_id") if split == "sequence" else pl.col("doc_id") // batch_size)
    return df.with_columns(hard=(pl.col("unc") >= threshold).fill_null(False))


def analyze_aligned(pair: ModelPair, data, *, k: float, split: str, batch_size: int, batch_tokens: int,
                    temperature: float, padding_side: str, max_length: int | None, limit: int | None, template: str,
                    out=None, progress: bool = True, truncate: bool = False, **fields) -> GroupTable:
    """`kdviz.analyze` on a pair across tokenizers (see the module doc); the options mean what they mean there."""
    if isinstance(data, TokenDataset):
        raise ValueError("A tokenized dataset holds one tokenizer's ids, and this pair has two tokenizers: give the "
                         "texts or records themselves (a file, a list, a zoo name).")
    source = read_data(data, limit=limit, **fields)
    examples = aligned_examples(pair, source, template=template, max_length=max_length, limit=limit,
                                truncate=truncate)
    lengths = [max(len(ex.inputs("teacher")), len(ex.inputs("student"))) for ex in examples]
    frames: list[pl.DataFrame | None] = [None] * len(examples)
    bar = tqdm(total=sum(lengths), desc="analyze (aligned)", unit="tok", unit_scale=True, disable=not progress)
    for batch in length_batches(lengths, batch_size=batch_size, batch_tokens=batch_tokens):
        found = batch_frames(pair, [examples[i] for i in batch], batch, temperature=temperature,
                             padding_side=padding_side)
        for i, frame in zip(batch, found):
            frames[i] = frame
        bar.update(sum(lengths[i] for i in batch))
    bar.close()
    meta = {"k": k, "split": split, "temperature": temperature, "teacher": pair.teacher_name,
            "student": pair.student_name, "data": source.description, "template": template,
            "vocabulary_share": pair.vocabulary.share, "examples": len(examples)}
    table = GroupTable(with_hard(pl.concat(frames), k=k, split=split, batch_size=batch_size), meta)
    if out is not None:
        table.save(out)
    return table
