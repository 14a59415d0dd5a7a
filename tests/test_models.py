import pytest
import torch

from conftest import TEXTS, tiny_gpt2
from kdviz import analyze, load_pair
from kdviz.align import KINDS
from kdviz.models import fingerprint
from kdviz.pair import ModelPair, check_same_tokenizer
from kdviz.train import distill
from kdviz.zoo.ladder import train_tokenizer


def test_load_pair_from_local_folders(pair, tokenizer):
    assert pair.vocab_size == len(tokenizer)
    assert not pair.teacher.training and not pair.student.training
    assert all(not p.requires_grad for p in pair.teacher.parameters())
    assert pair.max_length == 64
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"]])
    teacher, student = pair.logits(ids, torch.ones_like(ids))
    assert teacher.shape == student.shape == (*ids.shape, len(tokenizer))
    assert not torch.allclose(teacher, student)


def test_different_tokenizers_load_as_a_pair_across_tokenizers_and_say_so(tmp_path, model_dirs, tokenizer, capsys):
    other = train_tokenizer(["completely different text, other merges " * 20, "zzz yyy xxx"], vocab_size=280)
    tiny_gpt2(other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="map the same text to different ids.*same tokenizer"):
        check_same_tokenizer(tokenizer, other)
    pair = load_pair(model_dirs["teacher"], tmp_path / "other", device="cpu")
    said = capsys.readouterr().err
    assert pair.cross_tokenizer and pair.tokenizer is not pair.teacher_tokenizer
    assert pair.vocab_size == len(other) and pair.source.vocab_size == len(tokenizer)
    assert f"teacher vocabulary {len(tokenizer)}, student vocabulary {len(other)}" in said
    assert f"({pair.vocabulary.share:.1%})" in said and 0 < pair.vocabulary.share < 1
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="different tokenizers .*teacher vocabulary"):
        pair.logits(ids, torch.ones_like(ids))
    assert set(analyze(pair, TEXTS[:2], progress=False, cache=False).df["kind"]) <= set(KINDS)  # aligned groups
    with pytest.raises(ValueError, match="^--loss atkd compares .* Use --loss uld, gold or cross-atkd"):
        distill(model_dirs["teacher"], tmp_path / "other", TEXTS[:4], steps=1, device="cpu", progress=False)


def test_a_pair_with_one_tokenizer_is_not_across_tokenizers(pair, capsys):
    assert not pair.cross_tokenizer and pair.vocabulary is None and pair.teacher_tokenizer is None
    pair.check_shared_tokenizer("analyze")


def test_same_ids_but_different_vocab_is_refused(tokenizer):
    class Renamed:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, *a, **k):
            return self.tok(*a, **k)

        def get_vocab(self):
            return {**self.tok.get_vocab(), "<extra>": 10_000}

    with pytest.raises(ValueError, match="different vocabularies"):
        check_same_tokenizer(tokenizer, Renamed(tokenizer))


def test_padded_vocab_rows_are_cut_to_the_shared_vocab(tmp_path, tokenizer, model_dirs):
    """A family member with extra padded output rows (like 151936 vs 152064) is aligned."""
    tiny_gpt2(tokenizer, extra_rows=17, seed=5).save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    pair = load_pair(model_dirs["teacher"], tmp_path / "padded", device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    teacher, student = pair.logits(ids, torch.ones_like(ids))
    assert pair.student.get_output_embeddings().weight.shape[0] == len(tokenizer) + 17
    assert teacher.shape[-1] == student.shape[-1] == len(tokenizer)


def test_too_few_output_rows_is_refused(tokenizer):
    small = tiny_gpt2(tokenizer, extra_rows=-10)
    with pytest.raises(ValueError, match="output rows but the tokenizer has"):
        ModelPair(teacher=tiny_gpt2(tokenizer), student=small, tokenizer=tokenizer)


def test_sequence_longer_than_context_is_refused(pair):
    ids = torch.ones(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="sequence of 65 tokens: the models' context is only 64"):
        pair.logits(ids, torch.ones_like(ids))


def test_missing_model_path_says_what_to_give(tmp_path, model_dirs):
    with pytest.raises(ValueError, match="nowhere does not exist.*Give a folder saved with save_pretrained"):
        load_pair(model_dirs["teacher"], tmp_path / "nowhere", device="cpu")


def test_unknown_zoo_model(model_dirs):
    with pytest.raises(ValueError, match="Zoo model 'zoo:giant' is not in"):
        load_pair("zoo:giant", model_dirs["student"], device="cpu")


def test_fingerprint_changes_with_weights(tokenizer):
    a, b = tiny_gpt2(tokenizer, seed=1), tiny_gpt2(tokenizer, seed=1)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1.0
    assert fingerprint(a) != fingerprint(b)
