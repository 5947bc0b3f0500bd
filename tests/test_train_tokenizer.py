"""Tests of megadistill.data.tokenizer_train and tools/train_tokenizer.py on real SIB-200 text (seconds, CPU)."""

from __future__ import annotations

import hashlib
import json
import unicodedata

import pytest
import sentencepiece

from conftest import load_tool, read_sib200_texts
from megadistill.data.framing import Framing, framing_for_tokenizer
from megadistill.data.indexed import tokenizer_sha256
from megadistill.data.tokenizer_train import (BYTE_PIECES, METADATA_FILE, SPECIAL_PIECES, SPM_FILE, TokenizerSpec,
                                              read_texts, tokens_per_char, train_tokenizer)
from megadistill.models.teacher import load_tokenizer

VOCAB = 800
HAND_MADE = [
    "  ᱥᱟᱱᱛᱟᱲᱤ  नमस्ते ",  # leading, double and trailing spaces
    "Hello, world! 2024 -- 3.14",  # Latin, digits, punctuation
    "emoji 😀🇮🇳 ok",  # 4-byte characters, a flag sequence
    "ꯀꯪꯂꯩ ✓ ∑",  # Meetei Mayek and symbols: not in the training text
    "tab\there\nand a newline",
    "e\u0301 \u0921\u093c",  # not NFC: é decomposed, Devanagari ड़ precomposed is NFC-decomposed
    "<0x41> a<0xE0>b <bos> x",  # literal byte-piece names and a literal special token
]


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@pytest.fixture(scope="module")
def train_texts(sib200_dir) -> list[str]:
    """200 Ol Chiki + 200 Devanagari training sentences."""
    return read_sib200_texts(sib200_dir, "sat_Olck")[:200] + read_sib200_texts(sib200_dir, "hin_Deva")[:200]


@pytest.fixture(scope="module")
def dev_texts(sib200_dir) -> list[str]:
    """Held-out dev text of the trained scripts and of two scripts the tokenizer never saw (Odia, Bengali-Assamese)."""
    return [text for lang in ("sat_Olck", "hin_Deva", "ory_Orya", "asm_Beng")
            for text in read_sib200_texts(sib200_dir, lang, "dev")[:40]]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def trained(request, train_texts, tmp_path_factory):
    """``(tokenizer, output directory, spec)`` for each model type."""
    spec = TokenizerSpec(model_type=request.param, vocab_size=VOCAB)
    out = tmp_path_factory.mktemp(f"tok_{request.param}") / "tokenizer"
    return train_tokenizer(train_texts, spec, out), out, spec


def test_round_trip_is_nfc_of_the_text(trained, dev_texts):
    tokenizer, _, _ = trained
    for text in dev_texts + HAND_MADE:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == nfc(text), text


def test_unseen_characters_fall_back_to_bytes(trained):
    tokenizer, _, _ = trained
    assert tokenizer.tokenize("ꯀ") == ["<0xEA>", "<0xAF>", "<0x80>"]  # U+ABC0 in UTF-8
    assert tokenizer.tokenize("😀") == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tokenizer.unk_token_id not in tokenizer("ꯀ 😀 ✓", add_special_tokens=False)["input_ids"]


def test_pieces_are_sentencepiece_style(trained):
    tokenizer, _, _ = trained
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("  ᱥ", add_special_tokens=False)["input_ids"])
    assert "".join(tokens) == "▁▁ᱥ" and tokens[0] == "▁"  # one ▁ per space, no dummy prefix added
    vocab = tokenizer.get_vocab()
    assert all(piece in vocab for piece in BYTE_PIECES)
    assert tokenizer.convert_ids_to_tokens(vocab["<0xE0>"]) == "<0xE0>"


def test_literal_byte_piece_names_stay_text(trained):
    tokenizer, _, _ = trained
    tokens = tokenizer.tokenize("<0x41>")
    assert "<0x41>" not in tokens and tokens[0] == "<"  # spelled out, not read as the byte "A"


def test_segmentation_matches_sentencepiece(trained, dev_texts):
    tokenizer, out, spec = trained
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / SPM_FILE))
    same = sum(tokenizer(nfc(t), add_special_tokens=False)["input_ids"] == sp.encode(nfc(t)) for t in dev_texts)
    # BPE applies the same merges; Unigram's Viterbi may break a tie between equal-score paths otherwise.
    assert same == len(dev_texts) if spec.model_type == "bpe" else same >= 0.95 * len(dev_texts)


def test_specials_and_framing(trained):
    tokenizer, _, _ = trained
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_PIECES)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) == VOCAB
    assert framing_for_tokenizer(tokenizer) == Framing("decoder", (2,), (1,))
    ids = tokenizer("ᱥᱟᱱ")["input_ids"]
    assert ids[0] == 2 and ids[1:] == tokenizer("ᱥᱟᱱ", add_special_tokens=False)["input_ids"]


def test_saved_directory_reloads_and_records_the_corpus(trained, train_texts, dev_texts):
    tokenizer, out, spec = trained
    reloaded = load_tokenizer(out)
    assert tokenizer_sha256(reloaded) == tokenizer_sha256(tokenizer)
    for text in dev_texts[:20] + HAND_MADE:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    meta = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
    assert meta["spec"]["model_type"] == spec.model_type and meta["vocab_size"] == VOCAB
    stream = b"".join(nfc(t).encode("utf-8") + b"\n" for t in train_texts)  # SIB-200 sentences are single lines
    assert meta["training_text"]["sha256"] == hashlib.sha256(stream).hexdigest()
    assert meta["training_text"]["texts"] == 400
    assert meta["training_text"]["characters"] == sum(len(nfc(t)) for t in train_texts)


def test_training_is_deterministic(train_texts, tmp_path):
    spec = TokenizerSpec(vocab_size=VOCAB, seed=3)
    train_tokenizer(train_texts, spec, tmp_path / "a")
    train_tokenizer(list(train_texts), spec, tmp_path / "b")
    for name in ("tokenizer.json", SPM_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_tokens_per_char_well_below_one_token_per_character(trained, sib200_dir):
    tokenizer, _, _ = trained
    sat_dev = read_sib200_texts(sib200_dir, "sat_Olck", "dev")
    # Gemma 3 gives 1.02 tokens/char on this text (load_tokenizer takes 15-50 s, too slow for a unit test).
    assert tokens_per_char(tokenizer, sat_dev) < 0.7
    text = "ᱥᱟᱱᱛᱟᱲᱤ"
    assert tokens_per_char(tokenizer, [text]) == len(tokenizer(text, add_special_tokens=False)["input_ids"]) / len(text)


@pytest.mark.parametrize("texts, spec, message", [
    ([], TokenizerSpec(vocab_size=VOCAB), "no training text"),
    (["", ""], TokenizerSpec(vocab_size=VOCAB), "no training text"),
    (["x"], TokenizerSpec(vocab_size=260), "vocab_size must be an integer > 261"),
    (["x"], TokenizerSpec(vocab_size=4, byte_fallback=False), "vocab_size must be an integer > 5"),
    (["x"], TokenizerSpec(model_type="wordpiece"), "model_type must be one of"),
    (["x"], TokenizerSpec(character_coverage=0.0), "character_coverage must be in"),
])
def test_bad_input_raises_one_line(texts, spec, message, tmp_path):
    with pytest.raises(ValueError, match=message) as info:
        train_tokenizer(texts, spec, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_vocab_too_large_or_too_small_for_the_corpus(train_texts, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size 40000 is too large for this corpus \(400 texts") as info:
        train_tokenizer(train_texts, TokenizerSpec(vocab_size=40000), tmp_path / "out")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"vocab_size 300 is too small for this corpus \(400 texts.* need \d+ ids") as info:
        train_tokenizer(train_texts, TokenizerSpec(vocab_size=300), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_read_texts_from_corpus_files_and_indexed_datasets(trained, sib200_dir, tmp_path):
    from megadistill.data.binarize import binarize

    tokenizer, out, _ = trained
    dev = sib200_dir / "sat_Olck" / "dev.tsv"
    expected = [nfc(t) for t in read_sib200_texts(sib200_dir, "sat_Olck", "dev")]
    assert read_texts([dev]) == expected
    binarize([dev], load_tokenizer(out), tmp_path / "sat", tokenizer_name=str(out), show_progress=False)
    assert read_texts([str(tmp_path / "sat")]) == expected  # decoded with the tokenizer its provenance names
    assert read_texts([str(tmp_path / "sat.idx"), dev]) == expected + expected
    with pytest.raises(FileNotFoundError, match="missing.tsv: no such corpus file or indexed dataset"):
        read_texts([str(tmp_path / "missing.tsv")])


def test_cli_trains_and_prints_tokens_per_char(trained, sib200_dir, tmp_path, capsys):
    _, teacher_dir, _ = trained
    tool = load_tool("train_tokenizer")
    out = tmp_path / "cli"
    rc = tool.main([str(sib200_dir / "sat_Olck" / "train.tsv"), str(sib200_dir / "hin_Deva" / "train.tsv"),
                    "--output", str(out), "--vocab-size", "1000", "--model-type", "bpe",
                    "--heldout", str(sib200_dir / "sat_Olck" / "dev.tsv"), "--teacher", str(teacher_dir)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "tokens/char" in printed
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()[:1] in (["student"], ["teacher"])}
    assert rows["student"][1] == "1,000" and float(rows["student"][2]) < 0.7
    assert rows["teacher"][1] == f"{VOCAB:,}"
    assert len(load_tokenizer(out)) == 1000


def test_cli_error_is_one_line_and_keeps_the_previous_output(sib200_dir, tmp_path, capsys):
    tool = load_tool("train_tokenizer")
    out = tmp_path / "tok"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    train = str(sib200_dir / "sat_Olck" / "train.tsv")
    for argv in ([train, "--output", str(out), "--vocab-size", "40000"],
                 [str(tmp_path / "nope.tsv"), "--output", str(out)],
                 [train, "--output", str(out), "--vocab-size", "100"]):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("train_tokenizer: error: ") and err.count("\n") == 1 and "Traceback" not in err
        assert (out / "previous.txt").read_text() == "kept" and not (out / "tokenizer.json").exists()
    assert tool.main([train, "--output", str(out), "--vocab-size", "600"]) == 0
    assert (out / "tokenizer.json").is_file() and not (out / "previous.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary directory left behind
