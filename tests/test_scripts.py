"""Tests for megadistill.data.scripts: vectorized letter / script counts against a per-character reference."""

from __future__ import annotations

import numpy as np
import pytest

from megadistill.data.scripts import SCRIPT_RANGES, script_letter_counts, script_mask


def _reference(text: str, script: str) -> tuple[int, int]:
    native = sum(any(a <= ord(ch) <= b for a, b in SCRIPT_RANGES[script]) for ch in text)
    return sum(ch.isalpha() for ch in text), native


def test_counts_match_a_per_character_reference_on_sib200(sib200_dir):
    from conftest import read_sib200_texts

    for lang in ("hin_Deva", "ben_Beng", "tam_Taml", "urd_Arab", "sat_Olck", "eng_Latn"):
        texts = read_sib200_texts(sib200_dir, lang, "dev")[:40]
        texts[3] = ""  # an empty text between others keeps its own count
        script = lang.split("_")[1]
        letters, native = script_letter_counts(texts, script)
        assert letters.dtype == native.dtype == np.int64 and letters.shape == (len(texts),)
        assert list(zip(letters.tolist(), native.tolist())) == [_reference(t, script) for t in texts], lang
        assert native.sum() > 0.5 * letters.sum()  # the language is mostly in its script


def test_astral_characters_and_lone_surrogates():
    texts = ["a😀b", "\ud800x", "𝔸नमस्ते"]  # emoji; a lone surrogate; a math letter outside the BMP
    letters, native = script_letter_counts(texts, "Deva")
    assert letters.tolist() == [2, 1, 1 + 4]  # 𝔸 is a letter; the Devanagari vowel signs and virama are not
    assert native.tolist() == [0, 0, 6]


def test_unknown_script_is_named():
    with pytest.raises(KeyError, match="Zzzz"):
        script_mask("Zzzz")
