"""Formatting and tokenizing: texts cut into windows, records formatted with a template; `load_data` does all.

Every example's `labels` hold the target ids (-100 where a token is not a target, e.g. prompt
tokens of instruction data), aligned with `input_ids`.
"""

from __future__ import annotations

import os
import warnings

from kdviz.corpus import Corpus, docstring_pairs, topic_pairs
from kdviz.data.examples import IGNORE_INDEX, Example, TokenDataset, nonempty
from kdviz.data.read import (PROMPT_ONLY_READERS, ZOO_DATASETS, Fields, Record, Source, make_records, read_data,
                             read_path)
from kdviz.data.templates import Formatted, check_template, format_record, resolve_template
from kdviz.files import expand


def encode(tokenizer, text: str, *, user: bool = True) -> list[int]:
    """Token ids of `text`. User text (`user`) never yields control tokens: "<|im_end|>" written in a tutorial is
    the characters it shows; a template's own text keeps its control tokens."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=user)["input_ids"]


def encode_segments(tokenizer, segments) -> list[int]:
    return [i for segment in segments for i in encode(tokenizer, segment.text, user=segment.user)]


def pair_example(tokenizer, formatted: Formatted, *, max_length: int, where: str, truncate: bool,
                 need_response: bool = True) -> Example:
    """One prompt/response example: the response's tokens (and EOS when the template adds it) are the targets.
    Without `need_response`, a record with no response gives its prompt alone (no targets: a model writes one)."""
    prompt_ids = encode_segments(tokenizer, formatted.prompt)
    if not formatted.response_text.strip():
        if need_response:
            raise ValueError(f"{where}: the response is empty; every record needs a response to use as targets (or "
                             f"let a model write them: {PROMPT_ONLY_READERS}).")
        if len(prompt_ids) >= max_length - 1:
            raise ValueError(f"{where}: the prompt alone is {len(prompt_ids)} tokens, and the context is {max_length} "
                             "tokens, so no response token fits. Use a longer --max-length or drop the record.")
        return Example(prompt_ids, [IGNORE_INDEX] * len(prompt_ids), where)
    response_ids = encode_segments(tokenizer, formatted.response)
    if formatted.eos and tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
        if len(prompt_ids) >= max_length - 1:
            raise ValueError(f"{where}: the prompt alone is {len(prompt_ids)} tokens, and the context is {max_length} "
                             "tokens, so no response token fits (--truncate cuts responses, not prompts). Use a longer "
                             "--max-length (at most the models' context) or drop the record.")
        if not truncate:
            raise ValueError(f"{where}: prompt + response is {len(ids)} tokens ({len(prompt_ids)} prompt), longer than "
                             f"the context of {max_length} tokens. Pass truncate=True (CLI: --truncate) to cut the "
                             "response, or drop the record.")
        ids = ids[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return Example(ids, labels, where)


def from_texts(texts: list[str], tokenizer, *, max_length: int, names: list[str] | None = None,
               limit: int | None = None) -> TokenDataset:
    """Plain texts cut into non-overlapping windows of `max_length` tokens; every token a target."""
    if isinstance(texts, str):
        texts = [texts]
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to have a target, got {max_length}.")
    names = names or [f"text[{i}]" for i in range(len(texts))]
    blank = [name for name, text in zip(names, texts) if not text.strip()]
    if blank and len(blank) == len(texts):
        raise ValueError(f"Texts {blank[:3]} are empty or hold only whitespace: nothing to analyse or distil. Give text with words "
                         "or code in it.")
    if blank:
        warnings.warn(f"Skipping {len(blank)} text(s) that hold only whitespace: {blank[:3]}"
                      f"{' ...' if len(blank) > 3 else ''}.", stacklevel=2)
    examples, short = [], []
    for name, text in zip(names, texts):
        if not text.strip():
            continue
        ids = encode(tokenizer, text)
        if len(ids) < 2:
            short.append(f"{name} ({len(ids)} token)")
        for window, start in enumerate(range(0, len(ids), max_length)):
            chunk = ids[start : start + max_length]
            if len(chunk) >= 2:
                examples.append(Example(chunk, list(chunk), f"{name}#window{window}"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples and short:
        raise ValueError(f"Every text is shorter than 2 tokens ({', '.join(short[:3])}): a token is predicted from the "
                         "ones before it, so a text needs at least 2. Give longer texts.")
    return TokenDataset(nonempty(examples[:limit], f"Texts {names[:3]}"), f"{len(texts)} text(s)")


def from_files(paths: list[str | os.PathLike], tokenizer, *, max_length: int) -> TokenDataset:
    """Text files (or folders of .txt/.py/.md/.rst files), windowed like `from_texts`."""
    texts = [t for path in paths for t in read_path(expand(path), limit=None, fields=Fields()).texts]
    return from_texts([t for _, t in texts], tokenizer, max_length=max_length, names=[n for n, _ in texts])


def from_records(records, tokenizer, *, max_length: int, prompt_field: str | None = None,
                 response_field: str | None = None, context_field: str | None = None, truncate: bool = False,
                 template: str = "auto", source: str = "records") -> TokenDataset:
    """Prompt/response records (dicts); only response tokens are targets.

    Fields are detected (prompt/response, Dolly's instruction/context/response, Alpaca's
    instruction/input/output) unless named; a context/input field is used whenever present.
    Works on a list of dicts or a `datasets.Dataset`.
    """
    raw = [(f"{source}:{i}", r) for i, r in enumerate(records, start=1)]
    checked = make_records(raw, Fields(prompt_field, response_field, context_field))
    return _tokenize_records(checked, tokenizer, max_length=max_length, truncate=truncate, template=template,
                             description=f"{len(checked)} prompt/response pairs from {source}")


def _tokenize_records(records: list[Record], tokenizer, *, max_length: int, truncate: bool, template: str,
                      description: str, need_response: bool = True) -> TokenDataset:
    examples, used = [], set()
    for record in records:
        chosen = resolve_template(template, tokenizer, instruction=record.instruction)
        used.add(chosen)
        examples.append(pair_example(tokenizer, format_record(record, chosen, tokenizer), max_length=max_length,
                                     where=record.where, truncate=truncate, need_response=need_response))
    return TokenDataset(nonempty(examples, description), description, template="+".join(sorted(used)))


def from_jsonl(path: str | os.PathLike, tokenizer, *, max_length: int, **options) -> TokenDataset:
    """A prompt/response JSONL file (see `from_records` for fields and layouts)."""
    return load_data(path, tokenizer, max_length=max_length, **options)



def zoo_source(name: str) -> Source:
    """A zoo dataset read but not tokenized: held-out stdlib texts (`zoo:code`) or records (`zoo:docstrings`,
    `zoo:topics`); see `zoo_dataset`."""
    if name not in ZOO_DATASETS:
        raise ValueError(f"Unknown zoo dataset {name!r}; available: {', '.join(ZOO_DATASETS)}.")
    if name == "zoo:topics":
        pairs, instruction, description = topic_pairs(heldout=True), True, "held-out Python reference topics"
    else:
        corpus = Corpus.from_stdlib()
        texts = corpus.texts("heldout")
        if name == "zoo:code":
            return Source(texts=list(zip(corpus.heldout, texts)), description="held-out stdlib", zoo=name)
        pairs, instruction, description = docstring_pairs(texts, corpus.heldout), False, "held-out stdlib"
    records = [Record(pair["prompt"], pair["response"], "", pair["source"], instruction) for pair in pairs]
    return Source(records=records, description=description, zoo=name)


def zoo_dataset(name: str, tokenizer, *, max_length: int, template: str = "auto", limit: int | None = None
                ) -> TokenDataset:
    """Held-out data every Python installation has, read at run time.

    `zoo:code`: windows of held-out stdlib source. `zoo:docstrings`: held-out functions as
    signature + docstring -> body (code completion; without a chat template its "auto"
    template is plain, as the zoo models were trained). `zoo:topics`: held-out topics of the
    Python reference (`pydoc_data`) as "Explain <title> in Python." -> its first paragraphs
    (instructions). The pair datasets keep the pairs that fit the context.
    """
    source = zoo_source(name)
    if source.texts:
        _no_template_for_text(template, name)
        return from_texts([t for _, t in source.texts], tokenizer, max_length=max_length,
                          names=[n for n, _ in source.texts], limit=limit)
    template = resolve_template(template, tokenizer, instruction=name == "zoo:topics")
    examples = []
    for record in source.records:
        if limit is not None and len(examples) >= limit:
            break
        try:
            examples.append(pair_example(tokenizer, format_record(record, template, tokenizer), max_length=max_length,
                                         where=record.where, truncate=False))
        except ValueError:  # longer than the context: these datasets keep the pairs that fit
            continue
    kind = "docstring pairs" if name == "zoo:docstrings" else "topic pairs"
    if source.records and not examples:
        raise ValueError(f"None of the {len(source.records)} {kind} of {name} fits a context of {max_length} tokens; "
                         "give a longer --max-length (or none: the models' context).")
    return TokenDataset(nonempty(examples, name), f"{len(examples)} {kind} from {source.description}",
                        template=template)


def _no_template_for_text(template: str, description: str) -> None:
    if check_template(template) != "auto":
        raise ValueError(f"template={template!r} formats prompt/response records, but {description} is plain text "
                         "(windows of tokens, every token a target). Leave the template out (auto) for text.")


def tokenize(source: Source, tokenizer, *, max_length: int, limit: int | None = None, template: str = "auto",
             truncate: bool = False, need_response: bool = True) -> TokenDataset:
    """Format and tokenize what `read_data` read (`limit` examples at most); without `need_response`, a record with
    no response gives its (formatted) prompt with no targets, for a model to continue."""
    if source.zoo:
        dataset = zoo_dataset(source.zoo, tokenizer, max_length=max_length, template=template, limit=limit)
    elif source.texts:
        _no_template_for_text(template, source.description)
        dataset = from_texts([t for _, t in source.texts], tokenizer, max_length=max_length,
                             names=[n for n, _ in source.texts], limit=limit)
        dataset.description = source.description
    else:
        records = source.records[:limit] if limit is not None else source.records
        dataset = _tokenize_records(records, tokenizer, max_length=max_length, truncate=truncate, template=template,
                                    description=source.description, need_response=need_response)
    if limit is not None:
        dataset = TokenDataset(dataset.examples[:limit], f"{dataset.description} (first {limit})", dataset.template)
    return dataset


def load_data(data, tokenizer, *, max_length: int, limit: int | None = None, template: str = "auto",
              truncate: bool = False, prompt_field: str | None = None, response_field: str | None = None,
              context_field: str | None = None, need_response: bool = True) -> TokenDataset:
    """Any supported input as a TokenDataset.

    `data` can be a TokenDataset, `zoo:code` / `zoo:docstrings`, a path (``~`` is expanded) to a
    .jsonl / .json / .parquet file of records, a text file, or a folder of one kind of them, a
    list of strings (a string with a newline is taken as text), a list of prompt/response
    dicts, or a Hugging Face `datasets.Dataset` of such records. `limit` keeps the first N
    examples; `template` formats records (see the module doc). Without `need_response` (a model
    writes the responses) records may hold a prompt only.
    """
    if isinstance(data, TokenDataset):
        return data if limit is None else TokenDataset(data.examples[:limit], f"{data.description} (first {limit})",
                                                       data.template)
    source = read_data(data, limit=limit, prompt_field=prompt_field, response_field=response_field,
                       context_field=context_field, need_response=need_response)
    return tokenize(source, tokenizer, max_length=max_length, limit=limit, template=template, truncate=truncate,
                    need_response=need_response)


