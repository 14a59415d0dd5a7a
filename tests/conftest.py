"""Tiny random models and tokenizers made on the fly: nothing is downloaded."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
STRICT = os.environ.get("KDVIZ_STRICT_TESTS") == "1"  # CI: a test that would skip fails instead


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With KDVIZ_STRICT_TESTS=1 (as .ci/run sets it), a skipped test is a failure that says why it skipped:
    CI has the real teacher, node, Chromium and the privileges to mount, so nothing may pass by not running."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under KDVIZ_STRICT_TESTS=1: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr}"

from kdviz.zoo.ladder import train_tokenizer

TEXTS = [
    "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n",
    "The teacher knows more than the student. The student learns from the teacher.\n",
    "for i in range(10):\n\tprint(i * i)  # squares\n",
    "Knowledge distillation transfers the distribution of a large model to a small one.\n",
] * 4


def tiny_gpt2(tokenizer, *, n_embd=16, n_layer=1, n_positions=64, extra_rows=0, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer) + extra_rows, n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=2, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """Local folders of a tiny teacher and a tiny student (saved with save_pretrained)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, kwargs in {"teacher": dict(n_embd=32, n_layer=2, seed=1), "student": dict(seed=2)}.items():
        tiny_gpt2(tokenizer, **kwargs).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def pair(model_dirs):
    from kdviz import load_pair

    return load_pair(model_dirs["teacher"], model_dirs["student"], device="cpu")
