"""Reading data without a tokenizer: paths exist, files are text, records have string fields.

Mistakes surface here, before any model is loaded. A `Source` holds texts or prompt/response
`Record`s; `kdviz.data.tokenizing` formats and tokenizes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kdviz.distributed import SharedError, world
from kdviz.files import expand

TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SNIFF_BYTES = 8192
BOM = b"\xef\xbb\xbf"
ZOO_DATASETS = ("zoo:code", "zoo:docstrings", "zoo:topics")

# Field layouts recognised out of the box: (prompt field, optional context field, response field).
LAYOUTS = {
    "prompt/response": ("prompt", None, "response"),
    "dolly": ("instruction", "context", "response"),
    "alpaca": ("instruction", "input", "output"),
}
CONTEXT_FIELDS = ("context", "input")  # used when present and not named otherwise
TOKEN_TABLE_COLUMNS = {"doc_id", "position", "unc", "tkd"}


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
        if text.lstrip().startswith(("[", "{")):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as err:
                if not (err.msg == "Extra data" and text.lstrip().startswith("{")):  # (else: one object per line)
                    raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}). A .json "
                                     "file holds an array of records, one record, or one record per line.") from None
            else:
                items = [items] if isinstance(items, dict) else items  # one (pretty-printed) record
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


PROMPT_ONLY_READERS = ("analyze --generate student|teacher, distill --on-policy 1 and distill --seq-kd read prompt-only "
                       "records")


def _detect_layout(record: dict, where: str, need_response: bool = True) -> tuple[str, str | None, str]:
    for prompt, context, response in LAYOUTS.values():
        if prompt in record and response in record:
            return prompt, context, response
    for prompt, context, response in LAYOUTS.values():  # prompt-only records, for responses a model writes
        if not need_response and prompt in record:
            return prompt, context, response
    known = "; ".join(f"{k}: {p}/{r}" for k, (p, _, r) in LAYOUTS.items())
    prompt_only = next((p for p, _, _ in LAYOUTS.values() if p in record), None)
    hint = (f" It has a prompt ({prompt_only!r}) and no response: to let a model write the responses, analyse with "
            "generate='student' or 'teacher' (CLI: --generate), or distil with every step generating (on_policy=1.0 "
            "or seq_kd=True; CLI: --on-policy 1, --seq-kd)." if prompt_only else "")
    raise ValueError(
        f"{where}: cannot find prompt/response fields among {sorted(record)}. Known layouts: {known}. "
        f"Name yours with prompt_field= and response_field= (CLI: --prompt-field/--response-field).{hint}"
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

    def resolve(self, record: dict, where: str, need_response: bool = True) -> tuple[str, str | None, str]:
        """(prompt, context or None, response) field names for `record` (without `need_response`, the response
        field may be missing from it)."""
        if self.prompt is None or self.response is None:
            prompt, context, response = _detect_layout(record, where, need_response)
            prompt, response = self.prompt or prompt, self.response or response
        else:
            prompt, context, response = self.prompt, None, self.response
        if self.context is not None:
            return prompt, self.context, response
        if context is None:  # a context field that is present is used whatever names were given
            context = next((c for c in CONTEXT_FIELDS if c in record and c not in (prompt, response)), None)
        return prompt, context, response


def make_records(raw: list[tuple[str, object]], fields: Fields, *, need_response: bool = True) -> list[Record]:
    """Check raw records (dicts with string fields) and pick their prompt/context/response. Without
    `need_response` (a model writes the responses) a record may have no response: its `response` is ""."""
    records, context_seen = [], fields.context is None
    for where, record in raw:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt/response fields, got "
                             f"{type(record).__name__}.")
        prompt_name, context_name, response_name = fields.resolve(record, where, need_response)
        if len({prompt_name, context_name, response_name} - {None}) < 2 + (context_name is not None):
            raise ValueError(f"{where}: the prompt, context and response fields must differ, got prompt "
                             f"{prompt_name!r}, context {context_name!r}, response {response_name!r} "
                             "(check --prompt-field/--response-field/--context-field).")
        context = ""
        if context_name is not None and context_name in record:
            context_seen = True
            context = _string_field(record, context_name, where, optional=True)
        response = _response(record, response_name, where, need_response)
        instruction = any((prompt_name, response_name) == (p, r) for p, c, r in LAYOUTS.values() if c)
        records.append(Record(_string_field(record, prompt_name, where), response, context, where, instruction))
    if records and not context_seen:
        raise ValueError(f"No record has the context field {fields.context!r} (first record has "
                         f"{sorted(raw[0][1])}); check the name (CLI: --context-field) or leave it out.")
    return records


def _response(record: dict, name: str, where: str, need_response: bool) -> str:
    """The record's response; "" for a prompt-only record when responses are not needed."""
    if not need_response and record.get(name) is None:
        return ""
    response = _string_field(record, name, where)
    if not response.strip() and need_response:
        raise ValueError(f"{where}: the response is empty; every record needs a response to use as targets (or let "
                         f"a model write them: {PROMPT_ONLY_READERS}).")
    return response if response.strip() else ""


# Files that mark a folder kdviz wrote (a teacher cache, a distill run or checkpoint, a converted model): not data.
ARTEFACT_MARKS = {"ids.npy": "a kdviz teacher cache", "keys.npy": "a kdviz teacher cache",
                  "kdviz_checkpoint.json": "a kdviz distill checkpoint", "trainer_state.json": "a training checkpoint",
                  "model.safetensors": "a model", "tokenizer_config.json": "a model or tokenizer"}


def _folder_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(record files, text files) under `folder`, sorted; ValueError when it holds both or neither, or holds a
    folder kdviz wrote (a teacher cache, a run, a model), whose .json files are not records."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    artefact = next((p for p in files if p.name in ARTEFACT_MARKS), None)
    if artefact is not None:
        raise ValueError(f"Folder {folder} holds {ARTEFACT_MARKS[artefact.name]} ({artefact.parent}), which is not "
                         "data: its .json files would be read as records. Move it out of the data folder, or point "
                         "--data at the data files themselves.")
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


def read_path(path: Path, *, limit: int | None, fields: Fields, need_response: bool = True) -> Source:
    if path.exists() and not (path.is_file() or path.is_dir()) and world().size > 1:
        raise SharedError(f"--data {path} is a pipe or a device, and this run has {world().size} processes: each would "
                         "read other chunks of it and train or analyse on other data. Save the data to a file all the "
                         "processes can read, and give that file.")
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
    return _records_source(make_records(raw, fields, need_response=need_response), str(path))


def _is_text_rows(raw: list[tuple[str, object]], fields: Fields) -> bool:
    """Rows like {"text": ...} (pretraining-style JSONL/parquet) with no prompt/response layout and no named fields."""
    first = raw[0][1]
    return (fields == Fields() and isinstance(first, dict) and "text" in first
            and not any(p in first and r in first for p, _, r in LAYOUTS.values()))


def _records_source(records: list[Record], origin: str) -> Source:
    prompts_only = sum(not record.response for record in records)
    what = (f"{len(records)} prompt/response pairs" if not prompts_only else f"{len(records)} prompts" if
            prompts_only == len(records) else f"{len(records)} records ({prompts_only} without a response)")
    return Source(records=records, description=f"{what} from {origin}")


def read_data(data, *, limit: int | None = None, prompt_field: str | None = None,
              response_field: str | None = None, context_field: str | None = None,
              need_response: bool = True) -> Source:
    """Read and check `data` without a tokenizer (see `load_data` for what it can be).

    A string is a path (``~`` expanded) or a zoo name; it must exist. Strings of text go in a
    list (or contain a newline). Record files stop being read at `limit` records. Without
    `need_response` (a model writes the responses), records may hold a prompt only.
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
        return _no_fields_for_text(read_path(expand(data), limit=limit, fields=fields, need_response=need_response),
                                   fields)
    if isinstance(data, str):
        return _no_fields_for_text(Source(texts=[("text[0]", data)], description="1 text"), fields)
    if isinstance(data, list) and data and all(isinstance(d, str) for d in data):
        return _no_fields_for_text(Source(texts=[(f"text[{i}]", t) for i, t in enumerate(data)],
                                          description=f"{len(data)} text(s)"), fields)
    if _is_records(data):
        raw = [(f"{type(data).__name__}:{i + 1}", r) for i, r in enumerate(data)]
        raw = raw[:limit] if limit is not None else raw
        return _records_source(make_records(raw, fields, need_response=need_response), type(data).__name__)
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

