"""Character offsets from token ids (token_bytes_table, char_ends) and span alignment (align_spans)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_bert_tokenizer, build_tiny_tokenizer, read_sib200_texts

from megadistill.data.offsets import align_spans, char_ends, token_bytes_table

TRAIN_TEXTS = ["नमस्ते दुनिया, यह एक छोटा वाक्य है।", "क्षत्रिय राजा ने युद्ध जीता", "hello world, the cat sat on the mat",
               "numbers 123 and 2024 are here", "हिन्दी और English साथ साथ"]
# Ol Chiki and the emoji are not in the training text: they come out as byte pieces.
CHECK_TEXTS = ["नमस्ते दुनिया", "क्षत्रिय", "the  cat sat 42", "ᱥᱟᱱᱛᱟᱲᱤ ᱯᱟᱹᱨᱥᱤ", "hi 👋🏽!", "मिश्रित mixed ᱚᱞ 7"]


def table_of(pieces: list[str]) -> tuple[list[bytes], dict[str, int]]:
    """A hand-made table: id 0 = BOS and id 1 = EOS (no bytes), then ``pieces`` (``<0xNN>`` = one byte)."""
    table = [b"", b""] + [bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.encode() for p in pieces]
    return table, {p: i + 2 for i, p in enumerate(pieces)}


def ends_of(pieces: list[str], table, index, bos_eos: bool = False) -> np.ndarray:
    """char_ends of a piece sequence (optionally wrapped in BOS ... EOS)."""
    ids = [index[p] for p in pieces]
    return char_ends(np.array([0, *ids, 1] if bos_eos else ids), table)


def assert_aligned(a_pieces, b_pieces, a_expected, b_expected, bos_eos=False):
    """char_ends + align_spans of two piece sequences give exactly the expected groups."""
    table, index = table_of(sorted(set(a_pieces) | set(b_pieces)))
    a_group, b_group = align_spans(ends_of(a_pieces, table, index, bos_eos), ends_of(b_pieces, table, index, bos_eos))
    assert a_group.dtype == np.int64 and b_group.dtype == np.int64
    assert a_group.tolist() == a_expected
    assert b_group.tolist() == b_expected


def test_devanagari_conjuncts():
    # क्षत्रिय is 8 code points: क ् ष | त ् र ि | य
    table, index = table_of(["क्ष", "त्रि", "य", "क", "्", "ष", "त्", "रि"])
    assert ends_of(["क्ष", "त्रि", "य"], table, index).tolist() == [3, 7, 8]
    assert ends_of(["क", "्", "ष", "त्", "रि", "य"], table, index).tolist() == [1, 2, 3, 5, 7, 8]
    assert_aligned(["क्ष", "त्रि", "य"], ["क", "्", "ष", "त्", "रि", "य"], [0, 1, 2], [0, 0, 0, 1, 1, 2])


def test_devanagari_with_bos_and_eos_on_both_sides():
    assert_aligned(["क्ष", "त्रि", "य"], ["क", "्", "ष", "त्", "रि", "य"], [0, 1, 2, 3, 4], [0, 1, 1, 1, 2, 2, 3, 4],
                   bos_eos=True)


def test_ol_chiki_with_byte_fallback_pieces():
    # ᱥ = U+1C65 = E1 B1 A5: its first two byte pieces complete no character.
    b_pieces = ["<0xE1>", "<0xB1>", "<0xA5>", "ᱟ", "ᱱᱛᱟ", "ᱲᱤ"]
    table, index = table_of(["ᱥᱟ", "ᱱᱛᱟ", "ᱲᱤ", "<0xE1>", "<0xB1>", "<0xA5>", "ᱟ"])
    assert ends_of(b_pieces, table, index).tolist() == [0, 0, 1, 2, 5, 7]
    assert_aligned(["ᱥᱟ", "ᱱᱛᱟ", "ᱲᱤ"], b_pieces, [0, 1, 2], [0, 0, 0, 0, 1, 2])


def test_latin_words_with_spaces():
    assert_aligned(["the", " cat", " sat"], ["th", "e ", "cat", " s", "at"], [0, 0, 1], [0, 0, 0, 1, 1])


def test_emoji_in_four_byte_pieces_against_one_piece():
    # 👋 = U+1F44B = F0 9F 91 8B; the space and the first three byte pieces all end at char 3.
    a_pieces = ["hi", " ", "<0xF0>", "<0x9F>", "<0x91>", "<0x8B>", "!"]
    table, index = table_of(sorted(set(a_pieces) | {"hi ", "👋", "!"}))
    assert ends_of(a_pieces, table, index).tolist() == [2, 3, 3, 3, 3, 4, 5]
    assert_aligned(a_pieces, ["hi ", "👋", "!"], [0, 0, 1, 1, 1, 1, 2], [0, 1, 2])
    assert_aligned(a_pieces, ["hi ", "👋", "!"], [0, 1, 1, 2, 2, 2, 2, 3, 4], [0, 1, 2, 3, 4], bos_eos=True)


def test_truncated_tail_is_unaligned():
    # the second text was cut after "hello wor": nothing after the last common boundary aligns
    assert_aligned(["hello", " world"], ["hello", " wor"], [0, -1], [0, -1])
    a_group, b_group = align_spans(np.array([0, 5, 11]), np.array([0, 5, 7, 9]))
    assert a_group.tolist() == [0, 1, -1] and b_group.tolist() == [0, 1, -1, -1]


def walk(a_ends, b_ends):
    """The alignment walk written out literally (TRL GOLD): the reference for the vectorized version."""
    a_group, b_group = [-1] * len(a_ends), [-1] * len(b_ends)
    i = j = a_start = b_start = group = 0
    while i < len(a_ends) and j < len(b_ends):
        if a_ends[i] == b_ends[j]:
            a_group[a_start : i + 1] = [group] * (i + 1 - a_start)
            b_group[b_start : j + 1] = [group] * (j + 1 - b_start)
            group, i, j = group + 1, i + 1, j + 1
            a_start, b_start = i, j
        elif a_ends[i] < b_ends[j]:
            i += 1
        else:
            j += 1
    return a_group, b_group


@pytest.mark.parametrize("seed", range(30))
def test_align_spans_equals_the_literal_walk(seed):
    rng = np.random.default_rng(seed)
    # small steps with many zeros: repeated ends (zero-width tokens) on both sides
    a = np.cumsum(rng.integers(0, 3, rng.integers(0, 25)))
    b = np.cumsum(rng.integers(0, 3, rng.integers(0, 25)))
    a_group, b_group = align_spans(a, b)
    assert (a_group.tolist(), b_group.tolist()) == walk(a.tolist(), b.tolist())


def test_align_spans_rejects_bad_ends():
    with pytest.raises(ValueError, match="non-decreasing"):
        align_spans(np.array([1, 3, 2]), np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="1-D integer"):
        align_spans(np.array([[1, 2]]), np.array([1, 2]))
    with pytest.raises(ValueError, match="1-D integer"):
        align_spans(np.array([1.0, 2.0]), np.array([1, 2]))


def test_char_ends_rejects_invalid_utf8_and_bad_ids():
    table = [b"", b"a", b"\x9f", b"\xe0", b"\xa4"]
    assert char_ends(np.array([1, 3, 4]), table).tolist() == [1, 1, 1]  # a window may end inside a character
    with pytest.raises(ValueError, match="not UTF-8"):
        char_ends(np.array([1, 2]), table)  # a continuation byte without its lead byte
    with pytest.raises(ValueError, match="not UTF-8"):
        char_ends(np.array([3, 1]), table)  # a lead byte followed by ASCII
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        char_ends(np.array([1, 5]), table)
    with pytest.raises(ValueError, match="1-D integer"):
        char_ends(np.array([[1]]), table)


def longest_valid_prefix_chars(data: bytes) -> int:
    """Characters in the longest prefix of ``data`` that is valid UTF-8 (the definition, by brute force)."""
    for cut in range(len(data), -1, -1):
        try:
            return len(data[:cut].decode("utf-8"))
        except UnicodeDecodeError:
            continue
    raise AssertionError("unreachable: the empty prefix decodes")


def assert_offsets_exact(tokenizer, table, text):
    """char_ends of ``BOS + ids + EOS`` match the brute-force definition at every token and end at len(text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] if tokenizer.bos_token_id is not None \
        else [*ids, tokenizer.eos_token_id]
    ends = char_ends(np.array(ids), table)
    assert ends[-1] == len(text)
    assert ends.tolist() == [longest_valid_prefix_chars(b"".join(table[t] for t in ids[: i + 1]))
                             for i in range(len(ids))]
    return ends


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """Gemma-like BPE (byte fallback, Replace(' ', '▁'), Replace + ByteFallback + Fuse decoder)."""
    return build_tiny_tokenizer(TRAIN_TEXTS, vocab_size=330)


def byte_level_tokenizer(add_prefix_space: bool = False):
    """A GPT-2 style byte-level BPE trained on TRAIN_TEXTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_sentencepiece_table_and_char_ends(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    table = token_bytes_table(tok)
    assert len(table) == len(tok)
    assert table[tok.convert_tokens_to_ids("<bos>")] == b"" and table[tok.convert_tokens_to_ids("<eos>")] == b""
    assert table[tok.convert_tokens_to_ids("<0xE0>")] == b"\xe0"
    for text in CHECK_TEXTS:
        ends = assert_offsets_exact(tok, table, text)
        if text.startswith("ᱥ"):  # untrained script: byte pieces that complete no character
            assert (np.diff(ends[1:-1]) == 0).any()


def test_byte_level_table_and_char_ends():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = byte_level_tokenizer()
    table = token_bytes_table(tok)
    assert len(table) == len(tok) and table[tok.eos_token_id] == b""
    for byte, char in bytes_to_unicode().items():  # every one of the 256 single-byte pieces
        assert table[tok.convert_tokens_to_ids(char)] == bytes([byte])
    for text in CHECK_TEXTS:
        assert_offsets_exact(tok, table, text)


def test_tokenizer_with_a_dummy_prefix_space_is_rejected():
    with pytest.raises(ValueError, match="does not give back its text"):
        token_bytes_table(byte_level_tokenizer(add_prefix_space=True))


def test_wordpiece_tokenizer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="WordPiece"):
        token_bytes_table(build_bert_tokenizer(TRAIN_TEXTS, vocab_size=200, directory=tmp_path))


@pytest.mark.parametrize("lang", ["hin_Deva", "sat_Olck"])
def test_gemma_like_table_round_trips_sib200(tiny_tokenizer, sib200_dir, lang):
    """The conftest tokenizer has Gemma's layout (BOS frame, byte fallback, ``▁``); the pip-shipped
    Gemma itself is a demo extra, never a unit-test fixture (CI installs the dev extra only)."""
    table = token_bytes_table(tiny_tokenizer)
    assert len(table) == len(tiny_tokenizer)
    for text in read_sib200_texts(sib200_dir, lang, "dev"):
        ids = tiny_tokenizer(text)["input_ids"]  # BOS + text
        assert ids[0] == tiny_tokenizer.bos_token_id and table[ids[0]] == b""
        assert b"".join(table[i] for i in ids) == text.encode()
        assert char_ends(np.array(ids), table)[-1] == len(text)
