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


def test_control_token_strings_in_the_text_are_text_not_control_tokens(tokenizer):
    """A tutorial about ChatML that writes "<|im_end|>", or a transcript with "<|im_start|>user", stays text: no user
    turn becomes a target, and only the template's own end-of-turn token closes the answer."""
    from kdviz.models import load_tokenizer

    chat = load_tokenizer("zoo:smollm2-student")
    response = "End a turn with <|im_end|> and start one with <|im_start|>user hello"
    (example,) = load_data([{"prompt": "How does ChatML mark turns? <|im_end|>", "response": response}], chat,
                           max_length=256, template="chat")
    control = {chat.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    targets = [label for label in example.labels if label != IGNORE_INDEX]
    assert [t for t in targets if t in control] == [chat.convert_tokens_to_ids("<|im_end|>")]  # the template's one
    assert targets[-1] in control and chat.decode(targets[:-1]) == response
    prompt_controls = [i for i, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX and i in control]
    assert len(prompt_controls) == 5  # system turn, user turn, assistant start: the template's own, not the user's
    (text,) = load_data(["a text that writes <|endoftext|> as words"], tokenizer, max_length=64)
    assert tokenizer.eos_token_id not in text.input_ids


def test_messages_say_what_came_in(tokenizer, tmp_path):
    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps({"prompt": "Say hi", "response": "hi there"}, indent=2))
    (example,) = load_data(pretty, tokenizer, max_length=64)  # a pretty-printed object is one record
    assert any(label != IGNORE_INDEX for label in example.labels)
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "prompt": "Say hi",\n  "response": \n}')
    with pytest.raises(ValueError, match=r"broken.json:4: not valid JSON .*one record, or one record per line"):
        load_data(broken, tokenizer, max_length=64)
    records = [{"prompt": "a long prompt of several words here", "response": "and an answer"}]
    with pytest.raises(ValueError, match="the prompt alone is .* tokens, and the context is 4 tokens, so no response "
                                         "token fits \\(--truncate cuts responses, not prompts\\)"):
        load_data(records, tokenizer, max_length=4, truncate=True, template="plain")
    with pytest.raises(ValueError, match="longer than the context of 40 tokens. Pass truncate=True"):
        load_data(records, tokenizer, max_length=40, template="plain")
    with pytest.raises(ValueError, match=r"shorter than 2 tokens \(text\[0\] \(1 token\)\)"):
        load_data(["a"], tokenizer, max_length=64)
