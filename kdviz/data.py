"""Datasets for analysis and distillation: plain text, prompt/response records, HF datasets, zoo data.

Reading happens in two steps. `read_data` checks and reads the input without a tokenizer
(paths exist, files are text, records have string fields), so mistakes surface before any
model is loaded. `tokenize` then formats records with a template and tokenizes them.
`load_data` does both. Every example's `labels` hold the target ids (-100 where a token is not
a target, e.g. prompt tokens of instruction data), aligned with `input_ids`; the model's
logits at t predict labels at t + 1.

Templates for prompt/response records: "chat" (the tokenizer's chat template, user ->
assistant, the assistant's tokens are targets), "alpaca" (``### Instruction: ... ###
Response:``, the official ATKD code's format), "plain" (prompt, then response, as given), or
"auto": chat when the tokenizer has a chat template; otherwise alpaca for instruction data
(the Dolly and Alpaca layouts, however their fields were named) and plain for other
prompt/response pairs and zoo:docstrings (code completion, as the zoo models were trained).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdviz.files import expand

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
TEMPLATES = ("auto", "chat", "alpaca", "plain")
SNIFF_BYTES = 8192
BOM = b"\xef\xbb\xbf"

# Field layouts recognised out of the box: (prompt field, optional context field, response field).
LAYOUTS = {
    "prompt/response": ("prompt", None, "response"),
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
}
CONTEXT_FIELDS = ("context", "input")  # used when present and not named otherwise
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n{context_block}### Response:\n"
TOKEN_TABLE_COLUMNS = {"doc_id", "position", "unc", "tkd"}


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
    template: str | None = None  # the template records were formatted with (None for text)

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


@dataclass(frozen=True)
class Record:
    """One prompt/response pair, read and checked; `context` is "" when there is none."""

    prompt: str
    response: str
    context: str
    where: str  # e.g. "train.jsonl:12"
    instruction: bool = False  # read from an instruction layout (Dolly, Alpaca): "auto" formats it as alpaca


@dataclass
class Source:
    """Read, checked input before tokenization: texts (name, text) or records, plus a description."""

    texts: list[tuple[str, str]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    description: str = ""
    zoo: str | None = None  # zoo:code / zoo:docstrings are read when tokenizing (they need no checks)


def _nonempty(examples: list, what: str) -> list:
    if not examples:
        raise ValueError(f"{what} gave no examples (empty input); give at least one non-empty text or record.")
    return examples


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Reading (no tokenizer) ---------------------------------------------------------------------------

def _sniff(path: Path, head: bytes | None = None) -> None:
    """ValueError unless `path` (or its first bytes `head`) looks like a text file (no NUL bytes at its start)."""
    if head is None:
        with path.open("rb") as handle:
            head = handle.read(SNIFF_BYTES)
    if b"\0" in head[:SNIFF_BYTES]:
        kind = "a parquet file" if head.startswith(b"PAR1") else "a binary file"
        raise ValueError(f"{path} is not a text file (it looks like {kind}). Give a UTF-8 text file, a .jsonl/.json/"
                         f".parquet file of prompt/response records, or a folder of them.")


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    """`raw` as UTF-8; ValueError naming the file, line and byte that are not UTF-8."""
    if first_line == 1:
        raw = raw.removeprefix(BOM)  # a byte-order mark some editors write first: not text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw[: err.start].count(b"\n")
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start} of the "
                         f"{'line' if first_line > 1 or line > 1 else 'file'}). Convert the file to UTF-8, e.g. "
                         f"`iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`.") from None


def read_text_file(path: str | os.PathLike) -> str:
    path = expand(path)
    raw = path.read_bytes()  # read once: /dev/stdin and other pipes cannot be read twice
    _sniff(path, raw)
    return _decode(raw, path)


def _records_from_jsonl(path: Path, limit: int | None) -> list[tuple[str, object]]:
    """(where, parsed object) per non-empty line, stopping after `limit` objects."""
    out = []
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if limit is not None and len(out) >= limit:
                break
            line = _decode(raw, path, line_no)
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno}). "
                    'Each line must be one JSON object, e.g. {"prompt": "...", "response": "..."}.'
                ) from None
    return out


def _raw_records(path: Path, limit: int | None) -> list[tuple[str, object]]:
    """(where, record) pairs of a .jsonl, .json (array or lines) or .parquet file."""
    if path.suffix == ".parquet":
        import polars as pl

        try:
            df = pl.read_parquet(path, n_rows=limit)
        except Exception as err:  # polars raises several error types for a broken file
            raise ValueError(f"{path}: cannot read it as parquet ({err}).") from None
        if TOKEN_TABLE_COLUMNS <= set(df.columns):
            raise ValueError(f"{path} is a kdviz token table (written by kdviz analyze), not data. Give the "
                             "prompt/response records or texts the table was made from.")
        return [(f"{path}:row{i}", row) for i, row in enumerate(df.iter_rows(named=True))]
    _sniff(path)
    if path.suffix == ".json":
        text = _decode(path.read_bytes(), path)
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}).") from None
            items = items[:limit] if limit is not None else items
            return [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    return _records_from_jsonl(path, limit)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; ValueError naming the file and line of anything malformed."""
    path = expand(path)
    if not path.is_file():
        raise ValueError(f"Data file {path} does not exist.")
    records = [record for _, record in _records_from_jsonl(path, None)]
    if not records:
        raise ValueError(f"{path} is empty: a JSONL file needs one JSON object per line.")
    return records


def _detect_layout(record: dict, where: str) -> tuple[str, str | None, str]:
    for prompt, context, response in LAYOUTS.values():
        if prompt in record and response in record:
            return prompt, context, response
    known = "; ".join(f"{k}: {p}/{r}" for k, (p, _, r) in LAYOUTS.items())
    raise ValueError(
        f"{where}: cannot find prompt/response fields among {sorted(record)}. Known layouts: {known}. "
        "Name yours with prompt_field= and response_field= (CLI: --prompt-field/--response-field)."
    )


def _string_field(record: dict, name: str, where: str, *, optional: bool = False) -> str:
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r}; the record has {sorted(record)}.")
    value = record[name]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        shown = "null" if value is None else f"of type {type(value).__name__} ({repr(value)[:40]})"
        raise ValueError(f"{where}: field {name!r} is {shown}, not a string. Fix the record or drop it; kdviz does "
                         "not guess text for it.")
    return value


@dataclass(frozen=True)
class Fields:
    """Field names given by the user (None: detected per record)."""

    prompt: str | None = None
    response: str | None = None
    context: str | None = None

    def resolve(self, record: dict, where: str) -> tuple[str, str | None, str]:
        """(prompt, context or None, response) field names for `record`."""
        if self.prompt is None or self.response is None:
            prompt, context, response = _detect_layout(record, where)
            prompt, response = self.prompt or prompt, self.response or response
        else:
            prompt, context, response = self.prompt, None, self.response
        if self.context is not None:
            return prompt, self.context, response
        if context is None:  # a context field that is present is used whatever names were given
            context = next((c for c in CONTEXT_FIELDS if c in record and c not in (prompt, response)), None)
        return prompt, context, response


def make_records(raw: list[tuple[str, object]], fields: Fields) -> list[Record]:
    """Check raw records (dicts with string fields) and pick their prompt/context/response."""
    records, context_seen = [], fields.context is None
    for where, record in raw:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt/response fields, got "
                             f"{type(record).__name__}.")
        prompt_name, context_name, response_name = fields.resolve(record, where)
        if len({prompt_name, context_name, response_name} - {None}) < 2 + (context_name is not None):
            raise ValueError(f"{where}: the prompt, context and response fields must differ, got prompt "
                             f"{prompt_name!r}, context {context_name!r}, response {response_name!r} "
                             "(check --prompt-field/--response-field/--context-field).")
        context = ""
        if context_name is not None and context_name in record:
            context_seen = True
            context = _string_field(record, context_name, where, optional=True)
        response = _string_field(record, response_name, where)
        if not response.strip():
            raise ValueError(f"{where}: the response is empty; every record needs a response to use as targets.")
        instruction = any((prompt_name, response_name) == (p, r) for p, c, r in LAYOUTS.values() if c)
        records.append(Record(_string_field(record, prompt_name, where), response, context, where, instruction))
    if records and not context_seen:
        raise ValueError(f"No record has the context field {fields.context!r} (first record has "
                         f"{sorted(raw[0][1])}); check the name (CLI: --context-field) or leave it out.")
    return records


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(record files, text files) under `folder`, sorted; ValueError when it holds both or neither."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    records = [p for p in files if p.suffix in RECORD_SUFFIXES]
    texts = [p for p in files if p.suffix in TEXT_SUFFIXES]
    if records and texts:
        raise ValueError(f"Folder {folder} holds both record files ({len(records)}: {records[0].name}, ...) and text "
                         f"files ({len(texts)}: {texts[0].name}, ...). Point the data at one file, or at a folder "
                         "of one kind.")
    if not records and not texts:
        suffixes = sorted({p.suffix or "(none)" for p in files})
        raise ValueError(f"Folder {folder} has no data files ({', '.join(RECORD_SUFFIXES + TEXT_SUFFIXES)}); "
                         f"it has {len(files)} file(s) with suffixes {suffixes}.")
    return records, texts


def _read_path(path: Path, *, limit: int | None, fields: Fields) -> Source:
    if not path.exists():
        raise ValueError(f"Data path {path} does not exist (looked for {path.resolve()}). Give an existing file or "
                         f"folder, a zoo dataset ({', '.join(ZOO_DATASETS)}), or, from Python, a list of texts.")
    record_files, text_files = _folder_files(path) if path.is_dir() else (
        ([path], []) if path.suffix in RECORD_SUFFIXES else ([], [path]))
    if text_files:
        texts = [(str(p), read_text_file(p)) for p in text_files]
        return Source(texts=texts, description=f"{len(texts)} text file(s) from {path}")
    raw = []
    for file in record_files:
        if limit is not None and len(raw) >= limit:
            break
        raw += _raw_records(file, None if limit is None else limit - len(raw))
    if not raw:
        raise ValueError(f"{path} is empty: a record file needs one JSON object (or parquet row) per record.")
    if _is_text_rows(raw, fields):
        return Source(texts=[(where, _string_field(r, "text", where)) for where, r in raw],
                      description=f"{len(raw)} texts from {path}")
    return Source(records=make_records(raw, fields), description=f"{len(raw)} prompt/response pairs from {path}")


def _is_text_rows(raw: list[tuple[str, object]], fields: Fields) -> bool:
    """Rows like {"text": ...} (pretraining-style JSONL/parquet) with no prompt/response layout and no named fields."""
    first = raw[0][1]
    return (fields == Fields() and isinstance(first, dict) and "text" in first
            and not any(p in first and r in first for p, _, r in LAYOUTS.values()))


def read_data(data, *, limit: int | None = None, prompt_field: str | None = None,
              response_field: str | None = None, context_field: str | None = None) -> Source:
    """Read and check `data` without a tokenizer (see `load_data` for what it can be).

    A string is a path (``~`` expanded) or a zoo name; it must exist. Strings of text go in a
    list (or contain a newline). Record files stop being read at `limit` records.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}.")
    fields = Fields(prompt_field, response_field, context_field)
    if isinstance(data, Source):
        return data
    if isinstance(data, str) and data.startswith("zoo:"):
        if data not in ZOO_DATASETS:
            raise ValueError(f"Unknown zoo dataset {data!r}; available: {', '.join(ZOO_DATASETS)}.")
        return Source(zoo=data, description=data)
    if isinstance(data, str) and not data.strip():
        raise ValueError(f"The data is an empty string ({data!r}); give a file or folder path, a zoo dataset "
                         f"({', '.join(ZOO_DATASETS)}), or, from Python, a list of texts.")
    if isinstance(data, os.PathLike) or (isinstance(data, str) and "\n" not in data):
        return _no_fields_for_text(_read_path(expand(data), limit=limit, fields=fields), fields)
    if isinstance(data, str):
        return _no_fields_for_text(Source(texts=[("text[0]", data)], description="1 text"), fields)
    if isinstance(data, list) and data and all(isinstance(d, str) for d in data):
        return _no_fields_for_text(Source(texts=[(f"text[{i}]", t) for i, t in enumerate(data)],
                                          description=f"{len(data)} text(s)"), fields)
    if _is_records(data):
        raw = [(f"{type(data).__name__}:{i + 1}", r) for i, r in enumerate(data)]
        raw = raw[:limit] if limit is not None else raw
        return Source(records=make_records(raw, fields), description=f"{len(raw)} prompt/response pairs "
                                                                     f"from {type(data).__name__}")
    raise ValueError(
        f"Cannot read data of type {type(data).__name__} ({str(data)[:60]!r}). Give a zoo name "
        "(zoo:code, zoo:docstrings, zoo:topics), a .jsonl/.json/.parquet file, a text file or folder, a list of texts, "
        "or a list / datasets.Dataset of prompt/response records."
    )


def _no_fields_for_text(source: Source, fields: Fields) -> Source:
    """`source`, unless field names were given for data that is plain text (they would be ignored)."""
    if source.texts and fields != Fields():
        named = ", ".join(f"{k}_field={v!r}" for k, v in vars(fields).items() if v is not None)
        raise ValueError(f"{named} names a record field, but {source.description} is plain text (every token a "
                         "target). Give a .jsonl/.json/.parquet file of records, or leave the field names out.")
    return source


def _is_records(data) -> bool:
    if isinstance(data, list):
        return bool(data) and all(isinstance(d, dict) for d in data)
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, datasets.Dataset)


# Formatting and tokenizing -----------------------------------------------------------------------

def check_template(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}.")
    return template


def resolve_template(template: str, tokenizer, *, instruction: bool = True) -> str:
    """The template to use: `template`, or for "auto" chat when the tokenizer has one, else alpaca or plain."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if check_template(template) == "auto":
        template = "chat" if has_chat else ("alpaca" if instruction else "plain")
    if template == "chat" and not has_chat:
        raise ValueError("template='chat' needs a tokenizer with a chat template, and this one has none; use "
                         "template='alpaca' (### Instruction / ### Response) or 'plain'.")
    return template


def format_record(record: Record, template: str, tokenizer) -> tuple[str, str, bool]:
    """(prompt text, response text, whether to append EOS) of `record` under `template`."""
    if template == "alpaca":
        block = f"### Input:\n{record.context.strip()}\n\n" if record.context.strip() else ""
        return INSTRUCTION_TEMPLATE.format(instruction=record.prompt.strip(), context_block=block), record.response, True
    user = f"{record.prompt}\n\n{record.context}" if record.context.strip() else record.prompt
    if template == "plain":
        return user, record.response, True
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": record.response}],
                                         tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"{record.where}: the tokenizer's chat template does not render the conversation as the "
                         "prompt followed by the answer, so the answer's tokens cannot be found; use template="
                         "'alpaca' or 'plain'.")
    return prompt, full[len(prompt):].rstrip("\n"), False


def _pair_example(tokenizer, prompt: str, response: str, *, max_length: int, where: str, truncate: bool,
                  eos: bool = True) -> Example:
    prompt_ids = _encode(tokenizer, prompt)
    response_ids = _encode(tokenizer, response)
    if eos and tokenizer.eos_token_id is not None:
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
    examples = []
    for name, text in zip(names, texts):
        if not text.strip():
            continue
        ids = _encode(tokenizer, text)
        for window, start in enumerate(range(0, len(ids), max_length)):
            chunk = ids[start : start + max_length]
            if len(chunk) >= 2:
                examples.append(Example(chunk, list(chunk), f"{name}#window{window}"))
        if limit is not None and len(examples) >= limit:
            break
    return TokenDataset(_nonempty(examples[:limit], f"Texts {names[:3]}"), f"{len(texts)} text(s)")


def from_files(paths: list[str | os.PathLike], tokenizer, *, max_length: int) -> TokenDataset:
    """Text files (or folders of .txt/.py/.md/.rst files), windowed like `from_texts`."""
    texts = [t for path in paths for t in _read_path(expand(path), limit=None, fields=Fields()).texts]
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
                      description: str) -> TokenDataset:
    examples, used = [], set()
    for record in records:
        chosen = resolve_template(template, tokenizer, instruction=record.instruction)
        used.add(chosen)
        prompt, response, eos = format_record(record, chosen, tokenizer)
        examples.append(_pair_example(tokenizer, prompt, response, max_length=max_length, where=record.where,
                                      truncate=truncate, eos=eos))
    return TokenDataset(_nonempty(examples, description), description, template="+".join(sorted(used)))


def from_jsonl(path: str | os.PathLike, tokenizer, *, max_length: int, **options) -> TokenDataset:
    """A prompt/response JSONL file (see `from_records` for fields and layouts)."""
    return load_data(path, tokenizer, max_length=max_length, **options)


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


ZOO_DATASETS = ("zoo:code", "zoo:docstrings", "zoo:topics")


def zoo_dataset(name: str, tokenizer, *, max_length: int, template: str = "auto", limit: int | None = None
                ) -> TokenDataset:
    """Held-out data every Python installation has, read at run time.

    `zoo:code`: windows of held-out stdlib source. `zoo:docstrings`: held-out functions as
    signature + docstring -> body (code completion; without a chat template its "auto"
    template is plain, as the zoo models were trained). `zoo:topics`: held-out topics of the
    Python reference (`pydoc_data`) as "Explain <title> in Python." -> its first paragraphs
    (instructions). The pair datasets keep the pairs that fit the context.
    """
    from kdviz.corpus import Corpus

    if name not in ZOO_DATASETS:
        raise ValueError(f"Unknown zoo dataset {name!r}; available: {', '.join(ZOO_DATASETS)}.")
    if name == "zoo:topics":
        from kdviz.smollm2 import topic_pairs

        pairs, instruction, description = topic_pairs(heldout=True), True, "held-out Python reference topics"
    else:
        corpus = Corpus.from_stdlib()
        texts = corpus.texts("heldout")
        if name == "zoo:code":
            _no_template_for_text(template, name)
            return from_texts(texts, tokenizer, max_length=max_length, names=corpus.heldout, limit=limit)
        pairs, instruction, description = docstring_pairs(texts, corpus.heldout), False, "held-out stdlib"
    template = resolve_template(template, tokenizer, instruction=instruction)
    examples = []
    for pair in pairs:
        if limit is not None and len(examples) >= limit:
            break
        record = Record(pair["prompt"], pair["response"], "", pair["source"], instruction)
        prompt, response, eos = format_record(record, template, tokenizer)
        try:
            examples.append(_pair_example(tokenizer, prompt, response, max_length=max_length, where=record.where,
                                          truncate=False, eos=eos))
        except ValueError:  # longer than the context: these datasets keep the pairs that fit
            continue
    kind = "docstring pairs" if name == "zoo:docstrings" else "topic pairs"
    if pairs and not examples:
        raise ValueError(f"None of the {len(pairs)} {kind} of {name} fits a context of {max_length} tokens; give a "
                         "longer --max-length (or none: the models' context).")
    return TokenDataset(_nonempty(examples, name), f"{len(examples)} {kind} from {description}", template=template)


def _no_template_for_text(template: str, description: str) -> None:
    if check_template(template) != "auto":
        raise ValueError(f"template={template!r} formats prompt/response records, but {description} is plain text "
                         "(windows of tokens, every token a target). Leave the template out (auto) for text.")


def tokenize(source: Source, tokenizer, *, max_length: int, limit: int | None = None, template: str = "auto",
             truncate: bool = False) -> TokenDataset:
    """Format and tokenize what `read_data` read (`limit` examples at most)."""
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
                                    description=source.description)
    if limit is not None:
        dataset = TokenDataset(dataset.examples[:limit], f"{dataset.description} (first {limit})", dataset.template)
    return dataset


def load_data(data, tokenizer, *, max_length: int, limit: int | None = None, template: str = "auto",
              truncate: bool = False, prompt_field: str | None = None, response_field: str | None = None,
              context_field: str | None = None) -> TokenDataset:
    """Any supported input as a TokenDataset.

    `data` can be a TokenDataset, `zoo:code` / `zoo:docstrings`, a path (``~`` is expanded) to a
    .jsonl / .json / .parquet file of records, a text file, or a folder of one kind of them, a
    list of strings (a string with a newline is taken as text), a list of prompt/response
    dicts, or a Hugging Face `datasets.Dataset` of such records. `limit` keeps the first N
    examples; `template` formats records (see the module doc).
    """
    if isinstance(data, TokenDataset):
        return data if limit is None else TokenDataset(data.examples[:limit], f"{data.description} (first {limit})",
                                                       data.template)
    source = read_data(data, limit=limit, prompt_field=prompt_field, response_field=response_field,
                       context_field=context_field)
    return tokenize(source, tokenizer, max_length=max_length, limit=limit, template=template, truncate=truncate)


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
