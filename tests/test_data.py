import json

import pytest

from kdviz.corpus import docstring_pairs
from kdviz.data import IGNORE_INDEX, collate, from_texts, load_data


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def response_text(tokenizer, example):
    return tokenizer.decode([i for i, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def test_text_is_windowed_to_the_context(tokenizer):
    text = "the student learns from the teacher. " * 40
    n_tokens = len(tokenizer(text)["input_ids"])
    data = from_texts([text], tokenizer, max_length=32)
    assert all(len(ex.input_ids) <= 32 for ex in data)
    assert sum(len(ex.input_ids) for ex in data) == n_tokens
    assert all(ex.labels == ex.input_ids for ex in data)


def test_text_file_and_folder(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("hello teacher\n" * 5)
    (tmp_path / "b.py").write_text("def f():\n    return 1\n")
    folder = load_data(str(tmp_path), tokenizer, max_length=64)
    single = load_data(tmp_path / "a.txt", tokenizer, max_length=64)
    assert len(folder) == 2 and len(single) == 1
    assert single[0].source.endswith("a.txt#window0")


@pytest.mark.parametrize(
    "record,prompt_part",
    [
        ({"prompt": "Q: 2+2?\nA:", "response": " 4"}, "Q: 2+2?"),
        ({"instruction": "Add", "context": "2 and 2", "response": "4", "category": "qa"}, "### Input:\n2 and 2"),
        ({"instruction": "Add", "input": "", "output": "4"}, "### Instruction:\nAdd"),
    ],
    ids=["prompt-response", "dolly", "alpaca"],
)
def test_jsonl_layouts_only_response_tokens_are_targets(tmp_path, tokenizer, record, prompt_part):
    data = load_data(write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer, max_length=64)
    ex = data[0]
    response = record.get("response", record.get("output"))
    assert response_text(tokenizer, ex) == response + tokenizer.eos_token
    assert prompt_part in tokenizer.decode(ex.input_ids)
    assert ex.labels[0] == IGNORE_INDEX and ex.source.endswith("d.jsonl:1")


def test_jsonl_custom_field_names(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "why?", "answer": "because"}])
    data = load_data(path, tokenizer, max_length=64, prompt_field="question", response_field="answer")
    assert response_text(tokenizer, data[0]).startswith("because")


def test_hf_datasets_object(tokenizer):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"instruction": "Say hi", "input": "", "output": "hi"}] * 3)
    data = load_data(ds, tokenizer, max_length=64)
    assert len(data) == 3 and response_text(tokenizer, data[2]) == "hi" + tokenizer.eos_token


def test_malformed_jsonl_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_data(path, tokenizer, max_length=64)


def test_missing_fields_are_named(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a", "response": "b"}, {"text": "no fields"}])
    with pytest.raises(ValueError, match=r"m.jsonl:2: cannot find prompt/response fields among \['text'\]"):
        load_data(path, tokenizer, max_length=64)


def test_non_object_line(tmp_path, tokenizer):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="list.jsonl:1: expected a JSON object"):
        load_data(path, tokenizer, max_length=64)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_jsonl_is_an_error(tmp_path, tokenizer, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty"):
        load_data(path, tokenizer, max_length=64)


@pytest.mark.parametrize("texts", [[""], ["  \n\t\n"], ["", " \n"]])
def test_empty_or_whitespace_text_is_an_error(tokenizer, texts):
    with pytest.raises(ValueError, match="empty or hold only whitespace"):
        load_data(texts, tokenizer, max_length=64)


def test_a_blank_text_file_among_others_is_skipped_with_a_warning(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("   \n\n")
    (tmp_path / "b.txt").write_text("def f(x):\n    return x\n")
    with pytest.warns(UserWarning, match=r"Skipping 1 text\(s\) that hold only whitespace: \['.*a.txt'\]"):
        data = load_data(tmp_path, tokenizer, max_length=64)
    assert [example.source.split("#")[0] for example in data.examples] == [str(tmp_path / "b.txt")]


def test_empty_response_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a", "response": "  "}])
    with pytest.raises(ValueError, match="r.jsonl:1: the response is empty"):
        load_data(path, tokenizer, max_length=64)


def test_too_long_record_is_an_error_unless_truncated(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "short", "response": "the teacher " * 50}])
    with pytest.raises(ValueError, match=r"long.jsonl:1: prompt \+ response is \d+ tokens.*context of 64"):
        load_data(path, tokenizer, max_length=64)
    data = load_data(path, tokenizer, max_length=64, truncate=True)
    assert len(data[0].input_ids) == 64


def test_missing_file_and_unknown_type(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        load_data(tmp_path / "nope.jsonl", tokenizer, max_length=32)
    with pytest.raises(ValueError, match="Cannot read data of type int"):
        load_data(42, tokenizer, max_length=32)
    with pytest.raises(ValueError, match="Unknown zoo dataset"):
        load_data("zoo:nothing", tokenizer, max_length=32)


def test_collate_padding_sides(tokenizer):
    data = from_texts(["a b c d e f", "a b"], tokenizer, max_length=64)
    right = collate(data.examples, pad_id=0, padding_side="right")
    left = collate(data.examples, pad_id=0, padding_side="left")
    short = len(data[1].input_ids)
    assert right.attention_mask[1, :short].all() and not right.attention_mask[1, short:].any()
    assert left.attention_mask[1, -short:].all() and left.offsets[1] == right.input_ids.shape[1] - short
    assert (left.labels[1, : left.offsets[1]] == IGNORE_INDEX).all()


def test_docstring_pairs_split_signature_and_body():
    source = 'def f(x):\n    """Double x."""\n    y = x * 2\n    return y\n\ndef g():\n    """No body."""\n'
    pairs = docstring_pairs([source], ["m.py"])
    assert len(pairs) == 1
    assert pairs[0]["prompt"] == 'def f(x):\n    """Double x."""\n'
    assert pairs[0]["response"] == "    y = x * 2\n    return y\n"
