import json
import subprocess
import sys

import pytest

from kdviz import load_pair, zoo
from kdviz.zoo import ladder
from kdviz.corpus import Corpus
from kdviz.data import load_data

LADDER = ["zoo:student", "zoo:teacher-s", "zoo:teacher-m", "zoo:teacher-l"]


def test_corpus_split_is_stable_and_skips_tests():
    corpus = Corpus.from_stdlib()
    assert set(corpus.train).isdisjoint(corpus.heldout)
    assert len(corpus.heldout) > 0.05 * len(corpus.files)
    assert not any("/test/" in f or f.startswith("test/") or f.split("/")[-1].startswith("test_") for f in corpus.files)
    assert Corpus.from_stdlib().heldout == corpus.heldout  # hash split, same every time


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return root, ladder.build(root, tiny=True, progress=False)


def test_tiny_build_covers_the_build_path(tiny_zoo):
    root, manifests = tiny_zoo
    assert zoo.names(root) == sorted(LADDER)
    for name in LADDER:
        saved = zoo.manifest(name, root)
        assert saved == json.loads(json.dumps(manifests[name.removeprefix("zoo:")]))
        model, tokenizer = zoo.load(name, root=root)
        assert model.num_parameters() == saved["parameters"]
        assert len(tokenizer) == saved["settings"]["vocab_size"] == 512
        assert 0 < saved["heldout_loss"] < 7


def test_zoo_names_work_in_load_pair(tiny_zoo, monkeypatch):
    root, _ = tiny_zoo
    monkeypatch.setenv("KDVIZ_ZOO_DIR", str(root))
    pair = load_pair("zoo:teacher-l", "zoo:student", device="cpu")
    assert pair.max_length == 64 and pair.teacher_name == "zoo:teacher-l"


def test_zoo_datasets(tiny_zoo):
    root, _ = tiny_zoo
    tokenizer = zoo.load_tokenizer(root)
    code = load_data("zoo:code", tokenizer, max_length=64, limit=5)
    assert len(code) == 5 and all(ex.labels == ex.input_ids for ex in code)
    pairs = load_data("zoo:docstrings", tokenizer, max_length=256, limit=20)
    for ex in pairs:
        prompt = tokenizer.decode([i for i, l in zip(ex.input_ids, ex.labels) if l == -100])
        assert prompt.lstrip().startswith(("def ", "async def ", "@")) and ('"""' in prompt or "'''" in prompt)
        assert any(l != -100 for l in ex.labels)


def test_shipped_ladder_sizes_and_losses():
    manifests = [zoo.manifest(name) for name in LADDER]
    params = [m["parameters"] for m in manifests]
    assert params[3] >= 10_000_000 and params[3] >= 8 * params[1] and params[0] <= params[3] / 10
    losses = [m["heldout_loss"] for m in manifests]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 4
    assert losses[0] - losses[1] > 0.1  # the student is clearly worse than the smallest teacher
    assert len({m["corpus"]["file_list_hash"] for m in manifests}) == 1


def test_loss_on_unseen_code_falls_with_teacher_size():
    """Held-out standard library code none of the zoo trained on, past the windows its manifests were scored on
    (the same text whatever kdviz's own source says)."""
    tokenizer = zoo.load_tokenizer()
    stream = ladder.token_stream(Corpus.from_stdlib().texts("heldout"), tokenizer)
    windows = ladder.windows(stream, 256)[64:112]
    losses = [ladder.mean_loss(zoo.load(name)[0], windows) for name in LADDER]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 4, losses


def test_demo_writes_report_and_table(tmp_path):
    env = {**__import__("os").environ, "KDVIZ_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "kdviz.cli", "demo", "--limit", "4", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "demo_report.html").stat().st_size > 1_000_000
    assert (tmp_path / "out" / "demo_tokens.parquet").is_file()
    assert "demo_report.html" in result.stdout and "jupyter lab" in result.stdout and "Report:" in result.stdout
