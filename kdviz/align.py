"""Two tokenizations of one text side by side: UTF-8 byte offsets, groups, and the vocabulary both tokenizers share.

A group closes where both tokenizers end a token at the same byte (TRL GOLD's
`_align_by_byte_offsets`): a group's text is then the same under both tokenizers, so its
probability under either model is exact and comparable. Tokens are compared by the bytes they
stand for, which normalises the byte-level markers ('Ġ' space, 'Ċ' newline, 'Ã¼' for ü) and
sentencepiece's '▁' space and <0xNN> byte-fallback pieces.

>>> from kdviz.models import load_tokenizer
>>> smollm2, gpt2 = load_tokenizer("zoo:smollm2-student"), load_tokenizer("zoo:student")
>>> alignment = align_text(smollm2, gpt2, "x = 1234")
>>> [(alignment.text.encode()[g.byte_start : g.byte_end], g.kind) for g in alignment.groups]
[(b'x', 'same'), (b' =', 'same'), (b' 1', 'merged-one-side'), (b'23', 'merged-one-side'), (b'4', 'same')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

SCHEMES = ("byte-level", "sentencepiece", "plain")
# same: one token each, the same bytes; different: one token each, other bytes (e.g. a sentencepiece prefix space);
# merged-one-side: several tokens on one side, one on the other; merged-both-sides: several on each;
# unpaired: tokens on one side only (zero-width tokens at the end, such as an appended EOS).
KINDS = ("same", "different", "merged-one-side", "merged-both-sides", "unpaired")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE pieces."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


BYTE_OF_CHAR = {char: byte for byte, char in _bytes_to_unicode().items()}


def token_scheme(tokenizer) -> str:
    """How the tokenizer writes its pieces: "byte-level" (GPT-2, Llama 3, Qwen, SmolLM), "sentencepiece" ('▁'
    spaces and <0xNN> bytes: Llama 2, Mistral, Gemma) or "plain" (pieces are their text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: aligning two tokenizers needs the character "
                         "offsets of a fast one. Load it with use_fast=True (AutoTokenizer does by default).")
    described = repr(backend.pre_tokenizer) + repr(backend.decoder)
    if "ByteLevel" in described:
        return "byte-level"
    return "sentencepiece" if "Metaspace" in described or "▁" in described else "plain"


def piece_bytes(piece: str, scheme: str) -> bytes:
    """The bytes a token piece stands for under `scheme` (a control token such as '<|im_end|>' is its own text)."""
    if scheme == "byte-level" and all(char in BYTE_OF_CHAR for char in piece):
        return bytes(BYTE_OF_CHAR[char] for char in piece)
    if scheme == "sentencepiece":
        byte = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(byte.group(1), 16)]) if byte else piece.replace("▁", " ").encode()
    return piece.encode()


def vocabulary_bytes(tokenizer) -> list[bytes]:
    """The bytes of every id of the tokenizer (its added tokens included), index = id."""
    scheme = token_scheme(tokenizer)
    return [piece_bytes(piece, scheme) for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]


class Tokenized(NamedTuple):
    """A text under one tokenizer: ids, each token's (start, end) UTF-8 byte offsets into the text, its bytes."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    pieces: list[bytes]


def byte_offsets(char_offsets: list[tuple[int, int]], pieces: list[bytes], text: str) -> list[tuple[int, int]]:
    """UTF-8 byte offsets from a fast tokenizer's character offsets.

    Several byte-level tokens can share one character (東 as 'æ', 'Ŀ', '±'), or a token can hold a space and part
    of the next character ('Ġæ'); their char spans overlap. Each token is given its own bytes in turn: it starts
    where the one before ended (or at its own start, if later) and is as long as its piece, within its char span.
    """
    char_to_byte = [0]
    for char in text:
        char_to_byte.append(char_to_byte[-1] + len(char.encode()))
    out, cursor = [], 0
    for (start, end), piece in zip(char_offsets, pieces):
        start, end = char_to_byte[start], char_to_byte[end]
        if start < end:
            start = max(start, cursor)
            end = min(end, start + len(piece)) if piece else end
        else:  # a zero-width token (e.g. a control token the text does not show) sits where the last one ended
            start = end = max(start, cursor)
        assert cursor <= start <= end, f"byte offsets went backwards at {(start, end)} after {cursor}"
        out.append((start, end))
        cursor = end
    return out


def tokenize_with_offsets(tokenizer, text: str) -> Tokenized:
    """`text` as user text (control-token strings stay plain text, no BOS/EOS added), with UTF-8 byte offsets."""
    encoded = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    scheme = token_scheme(tokenizer)
    pieces = [piece_bytes(p, scheme) for p in tokenizer.convert_ids_to_tokens(encoded["input_ids"])]
    return Tokenized(list(encoded["input_ids"]), byte_offsets(encoded["offset_mapping"], pieces, text), pieces)


def group_by_byte_ends(teacher_offsets: list[tuple[int, int]], student_offsets: list[tuple[int, int]]
                       ) -> list[tuple[list[int], list[int]]]:
    """(teacher positions, student positions) of each group: walk both offset lists, advancing the side whose token
    ends first; a group closes where both end at the same byte. Tokens left at the end form one last group."""
    groups, t_start, s_start, t, s = [], 0, 0, 0, 0
    while t < len(teacher_offsets) and s < len(student_offsets):
        t_end, s_end = teacher_offsets[t][1], student_offsets[s][1]
        t, s = t + (t_end <= s_end), s + (s_end <= t_end)
        if t_end == s_end:
            groups.append((list(range(t_start, t)), list(range(s_start, s))))
            t_start, s_start = t, s
    if t < len(teacher_offsets) or s < len(student_offsets):
        groups.append((list(range(t_start, len(teacher_offsets))), list(range(s_start, len(student_offsets)))))
    return groups


class Group(NamedTuple):
    """One aligned group: token positions on each side, its UTF-8 byte span in the text, its kind (see KINDS)."""

    teacher: list[int]
    student: list[int]
    byte_start: int
    byte_end: int
    kind: str


def group_kind(teacher_pieces: list[bytes], student_pieces: list[bytes]) -> str:
    """The kind of a group with these token pieces (see KINDS)."""
    if not teacher_pieces or not student_pieces:
        return "unpaired"
    if len(teacher_pieces) == len(student_pieces) == 1:
        return "same" if teacher_pieces == student_pieces else "different"
    return "merged-both-sides" if len(teacher_pieces) > 1 and len(student_pieces) > 1 else "merged-one-side"


@dataclass(frozen=True)
class Alignment:
    """One text under the teacher's and the student's tokenizer, and its groups in text order."""

    text: str
    teacher: Tokenized
    student: Tokenized
    groups: list[Group]

    @cached_property
    def kind_counts(self) -> dict[str, int]:
        return {kind: sum(group.kind == kind for group in self.groups) for kind in KINDS}


def align(teacher: Tokenized, student: Tokenized, text: str = "") -> Alignment:
    """The groups of two tokenizations of the same text (their byte offsets must index the same bytes)."""
    groups = []
    for t_positions, s_positions in group_by_byte_ends(teacher.offsets, student.offsets):
        spans = [teacher.offsets[i] for i in t_positions] + [student.offsets[i] for i in s_positions]
        kind = group_kind([teacher.pieces[i] for i in t_positions], [student.pieces[i] for i in s_positions])
        groups.append(Group(t_positions, s_positions, min(a for a, _ in spans), max(b for _, b in spans), kind))
    return Alignment(text, teacher, student, groups)


def align_text(teacher_tokenizer, student_tokenizer, text: str) -> Alignment:
    """`text` tokenized by both tokenizers (teacher first) and grouped where both end at the same byte."""
    return align(tokenize_with_offsets(teacher_tokenizer, text), tokenize_with_offsets(student_tokenizer, text), text)


@dataclass(frozen=True)
class VocabularyMatch:
    """The teacher's tokens whose bytes are also one token of the student's: `teacher_ids[i]` <-> `student_ids[i]`.

    The map is one-to-one (where a side writes the same bytes twice, its lowest id is kept), so a distribution
    over the matched ids is comparable on both sides.
    """

    teacher_ids: Tensor  # (M,) long, ascending
    student_ids: Tensor  # (M,) long
    teacher_size: int
    student_size: int

    @property
    def share(self) -> float:
        """The share of the teacher's vocabulary with an exact match in the student's."""
        return len(self.teacher_ids) / self.teacher_size

    @cached_property
    def student_of_teacher(self) -> Tensor:
        """(teacher_size,) long: the student id of each teacher id, -1 where there is none."""
        out = torch.full((self.teacher_size,), -1, dtype=torch.long)
        out[self.teacher_ids] = self.student_ids
        return out

    def describe(self) -> str:
        return (f"teacher vocabulary {self.teacher_size:,}, student vocabulary {self.student_size:,}; "
                f"{len(self.teacher_ids):,} teacher tokens ({self.share:.1%}) have an exact match in the student's")


def match_vocabularies(teacher_tokenizer, student_tokenizer) -> VocabularyMatch:
    """Teacher id -> student id for tokens that stand for the same bytes (space markers normalised)."""
    student_first: dict[bytes, int] = {}
    for i, piece in enumerate(vocabulary_bytes(student_tokenizer)):
        student_first.setdefault(piece, i)
    pairs, seen = [], set()
    for i, piece in enumerate(vocabulary_bytes(teacher_tokenizer)):
        if piece in student_first and piece not in seen:
            seen.add(piece)
            pairs.append((i, student_first[piece]))
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return VocabularyMatch(ids[:, 0], ids[:, 1], len(teacher_tokenizer), len(student_tokenizer))
