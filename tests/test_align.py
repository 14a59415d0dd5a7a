"""Alignment across tokenizers: byte offsets and groups equal TRL GOLD's, group bytes cover the text, the vocabulary
match maps tokens to the same bytes. The zoo's two tokenizers (8,192 and 49,152 tokens) ship with kdviz."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gold.gold_trainer import ULDLoss  # noqa: E402
from trl.experimental.utils import encode_with_byte_offsets  # noqa: E402

from kdviz.align import (KINDS, align, align_text, byte_offsets, group_by_byte_ends, match_vocabularies,  # noqa: E402
                         tokenize_with_offsets, vocabulary_bytes)
from kdviz.models import load_tokenizer  # noqa: E402

TEXTS = [
    "def f(x):\n    return x  # 1234 + 0.5e-3\n",
    "Grüße, 東京, café \t tabs\n\n  and  spaces 🙂 e\u0301",
    "    if not items:\n        raise ValueError(f\"got {len(items)} items\")\n",
    "a <|im_end|> b <|endoftext|> 100% in [0, 1].",
]


@pytest.fixture(scope="module")
def zoo_tokenizers():
    """(teacher, student): SmolLM2's 49,152-token tokenizer and the zoo GPT-2's 8,192-token one."""
    return load_tokenizer("zoo:smollm2-student"), load_tokenizer("zoo:student")


def sentencepiece_tokenizer():
    """A small BPE with '▁' spaces and <0xNN> byte fallback, as Llama 2 and Mistral write their pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"), decoders.ByteFallback()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", *bytes_], show_progress=False)
    tok.train_from_iterator(TEXTS * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("text", TEXTS)
def test_byte_offsets_equal_trls_on_byte_level_tokenizers(zoo_tokenizers, text):
    for tokenizer in zoo_tokenizers:
        ours = tokenize_with_offsets(tokenizer, text)
        ((ids, offsets),) = encode_with_byte_offsets(tokenizer.backend_tokenizer, [text])
        assert ours.ids == ids and ours.offsets == offsets


@pytest.mark.parametrize("text", TEXTS)
def test_groups_equal_trl_golds_on_the_zoo_pair(zoo_tokenizers, text):
    teacher, student = (tokenize_with_offsets(tok, text) for tok in zoo_tokenizers)
    s_groups, t_groups = ULDLoss._align_by_byte_offsets(student.offsets, teacher.offsets)
    assert group_by_byte_ends(teacher.offsets, student.offsets) == list(zip(t_groups, s_groups))


def segmentation(max_bytes=40):
    """Offsets of a random tokenization of n bytes, with zero-width tokens (such as an EOS) allowed at the end."""
    @st.composite
    def draw(data_draw, n):
        cuts = sorted(data_draw(st.sets(st.integers(1, n - 1), max_size=n - 1))) if n > 1 else []
        bounds = [0, *cuts, n]
        offsets = list(zip(bounds, bounds[1:]))
        return offsets + [(n, n)] * data_draw(st.integers(0, 2))

    return st.integers(1, max_bytes).flatmap(lambda n: st.tuples(draw(n), draw(n)))


@settings(max_examples=300, deadline=None)
@given(segmentation())
def test_groups_equal_trl_golds_on_any_segmentation(both):
    teacher, student = both
    s_groups, t_groups = ULDLoss._align_by_byte_offsets(student, teacher)
    assert group_by_byte_ends(teacher, student) == list(zip(t_groups, s_groups))


@pytest.mark.parametrize("text", TEXTS)
def test_each_groups_tokens_spell_its_bytes_on_both_sides(zoo_tokenizers, text):
    alignment = align_text(*zoo_tokenizers, text)
    data = text.encode()
    assert alignment.groups[0].byte_start == 0 and alignment.groups[-1].byte_end == len(data)
    for before, group in zip(alignment.groups, alignment.groups[1:]):
        assert before.byte_end == group.byte_start
    for group in alignment.groups:
        for side, positions in ((alignment.teacher, group.teacher), (alignment.student, group.student)):
            assert b"".join(side.pieces[i] for i in positions) == data[group.byte_start : group.byte_end]
        if group.kind == "same":
            assert alignment.teacher.pieces[group.teacher[0]] == alignment.student.pieces[group.student[0]]


def test_group_kinds():
    from kdviz.align import Tokenized

    teacher = Tokenized([1, 2, 3, 4, 5, 6], [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6), (6, 7)],
                        [b"a", b"b", b"c", b"de", b"f", b"g"])
    student = Tokenized([1, 2, 3, 4, 5, 6], [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7), (7, 7)],
                        [b"a", b"bc", b"d", b"ef", b"G", b""])
    groups = align(teacher, student).groups
    assert [(g.teacher, g.student, g.byte_start, g.byte_end) for g in groups] == [
        ([0], [0], 0, 1), ([1, 2], [1], 1, 3), ([3, 4], [2, 3], 3, 6), ([5], [4], 6, 7), ([], [5], 7, 7)]
    assert [g.kind for g in groups] == ["same", "merged-one-side", "merged-both-sides", "different", "unpaired"]
    assert set(align(teacher, student).kind_counts) == set(KINDS)


def test_overlapping_char_spans_get_one_byte_each():
    """'東' (3 bytes) as 'Ġæ' (space + first byte), 'Ŀ', '±': char spans (0, 2), (1, 2), (1, 2)."""
    assert byte_offsets([(0, 2), (1, 2), (1, 2)], [b" \xe6", b"\x9d", b"\xb1"], " 東") == [(0, 2), (2, 3), (3, 4)]


def test_sentencepiece_pieces_are_read_as_their_bytes(zoo_tokenizers):
    sp = sentencepiece_tokenizer()
    text = "def f(x):\n    return 東京 ok"
    tokenized = tokenize_with_offsets(sp, text)
    pieces = sp.convert_ids_to_tokens(tokenized.ids)
    assert any(p.startswith("▁") for p in pieces) and any(p.startswith("<0x") for p in pieces)
    assert b"".join(tokenized.pieces).lstrip(b" ") == text.encode()  # the first piece carries a prefix space
    alignment = align_text(sp, zoo_tokenizers[1], text)
    assert alignment.groups[-1].byte_end == len(text.encode())
    match = match_vocabularies(sp, zoo_tokenizers[1])
    assert match.student_of_teacher[sp.convert_tokens_to_ids("▁return")] == zoo_tokenizers[1].convert_tokens_to_ids(
        "Ġreturn")


def test_vocabulary_match_maps_tokens_to_the_same_bytes(zoo_tokenizers):
    teacher, student = zoo_tokenizers
    match = match_vocabularies(teacher, student)
    t_bytes, s_bytes = vocabulary_bytes(teacher), vocabulary_bytes(student)
    assert all(t_bytes[t] == s_bytes[s] for t, s in zip(match.teacher_ids.tolist(), match.student_ids.tolist()))
    assert len(set(match.student_ids.tolist())) == len(match.student_ids)  # one-to-one
    assert (match.teacher_size, match.student_size) == (49152, 8192) and 0.05 < match.share < 0.5
    assert match.student_of_teacher[teacher.convert_tokens_to_ids("Ġreturn")] == student.convert_tokens_to_ids(
        "Ġreturn")
    assert "49,152" in match.describe() and f"{match.share:.1%}" in match.describe()
    same = match_vocabularies(student, student)
    assert same.share == 1 and same.teacher_ids.tolist() == same.student_ids.tolist() == list(range(len(student)))
