"""Datasets for analysis and distillation: plain text, prompt/response JSONL, HF datasets, zoo data.

Every loader returns a `TokenDataset`: tokenized examples whose `labels` hold the target ids
(-100 where a token is not a target, e.g. prompt tokens of instruction data). Labels are
aligned with `input_ids`; the model's logits at t predict labels at t + 1.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")

# Field layouts recognised out of the box: (prompt fields, optional context field, response field).
LAYOUTS = {
    "prompt/response": ("prompt", None, "response"),
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
}
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n{context_block}### Response:\n"


@dataclass(frozen=True)
class Example:
    """One tokenized sequence; `labels[i]` is the target id of position i or -100."""

    input_ids: list[int]
    labels: list[int]
    source: str  # where it came from, e.g. "train.jsonl:12" or "notes.txt#window3"


@dataclass
class TokenDataset:
    """A list of tokenized examples plus a description of where they came from."""

    examples: list[Example]
    description: str

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]

    def __iter__(self):
        return iter(self.examples)

    @property
    def fingerprint(self) -> str:
        """Hash of every example's ids and labels (the cache key for the data)."""
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(torch.tensor(ex.input_ids + [-1] + ex.labels).numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def n_targets(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in ex.labels) for ex in self.examples)


def _nonempty(examples: list[Example], what: str) -> list[Example]:
    if not examples:
        raise ValueError(f"{what} gave no examples (empty input); give at least one non-empty text or record.")
    return examples


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def from_texts(texts: list[str], tokenizer, *, max_length: int, names: list[str] | None = None) -> TokenDataset:
    """Plain texts cut into non-overlapping windows of `max_length` tokens; every token a target."""
    if isinstance(texts, str):
        texts = [texts]
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 to have a target, got {max_length}.")
    names = names or [f"text[{i}]" for i in range(len(texts))]
    examples = []
    for name, text in zip(names, texts):
        ids = _encode(tokenizer, text)
        for window, start in enumerate(range(0, len(ids), max_length)):
            chunk = ids[start : start + max_length]
            if len(chunk) >= 2:
                examples.append(Example(chunk, list(chunk), f"{name}#window{window}"))
    return TokenDataset(_nonempty(examples, f"Texts {names[:3]}"), f"{len(texts)} text(s)")


def from_files(paths: list[str | os.PathLike], tokenizer, *, max_length: int) -> TokenDataset:
    """Text files (or folders of .txt/.py/.md/.rst files), windowed like `from_texts`."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"Data path {path} does not exist.")
    if not files:
        raise ValueError(f"No text files ({', '.join(TEXT_SUFFIXES)}) under {[str(p) for p in paths]}.")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    return from_texts(texts, tokenizer, max_length=max_length, names=[str(p) for p in files])


def _detect_layout(record: dict, where: str) -> tuple[str, str | None, str]:
    for prompt, context, response in LAYOUTS.values():
        if prompt in record and response in record:
            return prompt, context, response
    known = "; ".join(f"{k}: {p}/{r}" for k, (p, _, r) in LAYOUTS.items())
    raise ValueError(
        f"{where}: cannot find prompt/response fields among {sorted(record)}. Known layouts: {known}. "
        "Name yours with prompt_field= and response_field= (CLI: --prompt-field/--response-field)."
    )


def _format_prompt(record: dict, prompt_field: str, context_field: str | None) -> str:
    if context_field is None:
        return str(record[prompt_field])
    context = str(record.get(context_field) or "").strip()
    block = f"### Input:\n{context}\n\n" if context else ""
    return INSTRUCTION_TEMPLATE.format(instruction=str(record[prompt_field]).strip(), context_block=block)


def _pair_example(tokenizer, prompt: str, response: str, *, max_length: int, where: str, truncate: bool) -> Example:
    prompt_ids = _encode(tokenizer, prompt)
    response_ids = _encode(tokenizer, response)
    if tokenizer.eos_token_id is not None:
        response_ids.append(tokenizer.eos_token_id)
    if not response.strip():
        raise ValueError(f"{where}: the response is empty; every record needs a response to use as targets.")
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
        if not truncate or len(prompt_ids) >= max_length - 1:
            raise ValueError(
                f"{where}: prompt + response is {len(ids)} tokens ({len(prompt_ids)} prompt), longer than "
                f"the models' context of {max_length}. Pass truncate=True (CLI: --truncate) to cut the "
                "response, or drop the record."
            )
        ids = ids[:max_length]
    labels = [IGNORE_INDEX] * len(prompt_ids) + ids[len(prompt_ids) :]
    return Example(ids, labels, where)


def from_records(
    records,
    tokenizer,
    *,
    max_length: int,
    prompt_field: str | None = None,
    response_field: str | None = None,
    context_field: str | None = None,
    truncate: bool = False,
    source: str = "records",
) -> TokenDataset:
    """Prompt/response records (dicts); only response tokens are targets.

    Fields are detected (prompt/response, Dolly's instruction/context/response, Alpaca's
    instruction/input/output) unless named. Works on a list of dicts or a `datasets.Dataset`.
    """
    examples = []
    for line, record in enumerate(records, start=1):
        where = f"{source}:{line}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt/response fields, got {type(record).__name__}.")
        if prompt_field or response_field:
            fields = (prompt_field or "prompt", context_field, response_field or "response")
        else:
            fields = _detect_layout(record, where)
        missing = [f for f in (fields[0], fields[2]) if f not in record]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; the record has {sorted(record)}.")
        prompt = _format_prompt(record, fields[0], fields[1])
        examples.append(
            _pair_example(tokenizer, prompt, str(record[fields[2]]), max_length=max_length, where=where, truncate=truncate)
        )
    return TokenDataset(_nonempty(examples, source), f"{len(examples)} prompt/response pairs from {source}")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; ValueError naming the file and line of anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Data file {path} does not exist.")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno}). "
                    'Each line must be one JSON object, e.g. {"prompt": "...", "response": "..."}.'
                ) from None
    if not records:
        raise ValueError(f"{path} is empty: a JSONL file needs one JSON object per line.")
    return records


def from_jsonl(path: str | os.PathLike, tokenizer, *, max_length: int, **fields) -> TokenDataset:
    """A prompt/response JSONL file (see `from_records` for fields and layouts)."""
    return from_records(read_jsonl(path), tokenizer, max_length=max_length, source=str(path), **fields)


def docstring_pairs(texts: list[str], names: list[str]) -> list[dict]:
    """Instruction-style pairs from Python source: prompt = signature + docstring, response = body."""
    pairs = []
    for name, text in zip(names, texts):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
                continue
            if len(node.body) < 2:
                continue
            first = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            split = node.body[0].end_lineno
            source = textwrap.dedent("".join(lines[first : node.end_lineno]))
            source_lines = source.splitlines(keepends=True)
            prompt, response = "".join(source_lines[: split - first]), "".join(source_lines[split - first :])
            pairs.append({"prompt": prompt, "response": response, "source": f"{name}:{node.lineno}"})
    return pairs


def zoo_dataset(name: str, tokenizer, *, max_length: int) -> TokenDataset:
    """`zoo:code` (held-out stdlib source windows) or `zoo:docstrings` (held-out function pairs)."""
    from kdviz.corpus import Corpus

    corpus = Corpus.from_stdlib()
    files = corpus.heldout
    texts = corpus.texts("heldout")
    if name == "zoo:code":
        return from_texts(texts, tokenizer, max_length=max_length, names=files)
    if name == "zoo:docstrings":
        examples = []
        for pair in docstring_pairs(texts, files):
            try:
                examples.append(
                    _pair_example(tokenizer, pair["prompt"], pair["response"], max_length=max_length,
                                  where=pair["source"], truncate=False)
                )
            except ValueError:  # longer than the context: this dataset keeps the pairs that fit
                continue
        return TokenDataset(_nonempty(examples, name), f"{len(examples)} docstring pairs from held-out stdlib")
    raise ValueError(f"Unknown zoo dataset {name!r}; available: zoo:code, zoo:docstrings.")


def load_data(data, tokenizer, *, max_length: int, limit: int | None = None, **fields) -> TokenDataset:
    """Any supported input as a TokenDataset.

    `data` can be a TokenDataset, `zoo:code` / `zoo:docstrings`, a .jsonl path, a text file or
    folder, a string of text, a list of strings, a list of prompt/response dicts, or a
    Hugging Face `datasets.Dataset` of such records. `limit` keeps the first N examples.
    """
    if isinstance(data, TokenDataset):
        dataset = data
    elif isinstance(data, str) and data.startswith("zoo:"):
        dataset = zoo_dataset(data, tokenizer, max_length=max_length)
    elif isinstance(data, (str, os.PathLike)) and Path(data).suffix in (".jsonl", ".json"):
        dataset = from_jsonl(data, tokenizer, max_length=max_length, **fields)
    elif isinstance(data, os.PathLike) or (isinstance(data, str) and "\n" not in data and Path(data).exists()):
        dataset = from_files([data], tokenizer, max_length=max_length)
    elif isinstance(data, str):
        dataset = from_texts([data], tokenizer, max_length=max_length)
    elif isinstance(data, list) and data and all(isinstance(d, str) for d in data):
        dataset = from_texts(data, tokenizer, max_length=max_length)
    elif _is_records(data):
        dataset = from_records(data, tokenizer, max_length=max_length, source=type(data).__name__, **fields)
    else:
        raise ValueError(
            f"Cannot read data of type {type(data).__name__} ({str(data)[:60]!r}). Give a zoo name "
            "(zoo:code, zoo:docstrings), a .jsonl file, a text file or folder, text, a list of texts, "
            "or a list / datasets.Dataset of prompt/response records."
        )
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}.")
        dataset = TokenDataset(dataset.examples[:limit], f"{dataset.description} (first {limit})")
    return dataset


def _is_records(data) -> bool:
    if isinstance(data, list):
        return bool(data) and all(isinstance(d, dict) for d in data)
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, datasets.Dataset)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 on padding and non-targets
    lengths: list[int]
    offsets: list[int]  # column where each example starts (non-zero with left padding)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or 0 when it has none (padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(examples: list[Example], *, pad_id: int, padding_side: str = "right") -> Batch:
    """Pad examples to one [B, L] batch on the given side."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    offsets = []
    for row, ex in enumerate(examples):
        start = width - len(ex.input_ids) if padding_side == "left" else 0
        span = slice(start, start + len(ex.input_ids))
        ids[row, span] = torch.tensor(ex.input_ids)
        labels[row, span] = torch.tensor(ex.labels)
        mask[row, span] = 1
        offsets.append(start)
    return Batch(ids, mask, labels, [len(ex.input_ids) for ex in examples], offsets)
