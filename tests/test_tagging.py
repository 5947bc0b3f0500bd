"""Tests for megadistill.data.tagging: word-level label alignment, the tagged .jsonl reader, and a tiny tagger."""

from __future__ import annotations

import json
import logging
import unicodedata

import numpy as np
import pytest
import torch

from conftest import read_sib200_texts
from megadistill.data.tagging import (IGNORE_INDEX, MISSING_WORD, TaggedSplit, align_word_labels, collate_tagged,
                                      encode_tagged, read_tagged_jsonl, word_predictions)
from megadistill.data.tasks import LabelSet

X = IGNORE_INDEX


# --- alignment ----------------------------------------------------------------------------------

def test_align_first_subtoken_only():
    # [CLS] w0 w1a w1b w1c w2 [SEP]
    word_ids = [None, 0, 1, 1, 1, 2, None]
    assert align_word_labels(word_ids, [5, 6, 7]) == [X, 5, 6, X, X, 7, X]


def test_align_all_subwords_copies_the_tag():
    word_ids = [None, 0, 0, 1, 2, 2, None]
    assert align_word_labels(word_ids, [3, 1, 4], all_subwords=True) == [X, 3, 3, 1, 4, 4, X]


def test_align_custom_ignore_index_and_repeated_tags():
    # Two adjacent words with the same tag: the second word's first piece is still labelled.
    word_ids = [None, 0, 1, 1, None, None]
    assert align_word_labels(word_ids, [2, 2], ignore_index=-1) == [-1, 2, 2, -1, -1, -1]


def test_align_no_special_tokens():
    assert align_word_labels([0, 0, 1], [1, 0]) == [1, X, 0]


@pytest.mark.parametrize("bad", [3, -1])
def test_align_word_id_outside_tags(bad):
    with pytest.raises(ValueError, match=f"word id {bad} is outside the 3 word tags"):
        align_word_labels([None, 0, bad, None], [0, 1, 2])


# --- predictions and collation ------------------------------------------------------------------

def test_word_predictions_read_the_first_subtoken():
    word_ids = [None, 0, 1, 1, 2, None]
    logits = torch.zeros(8, 3)  # 8 rows: two pad rows past the example are ignored
    logits[0, 2] = logits[5, 2] = 9.0  # special tokens favour tag 2: must not leak in
    logits[1, 1] = 1.0
    logits[2, 0] = 1.0
    logits[3, 2] = 5.0  # the second piece of word 1 disagrees with its first piece
    logits[4, 1] = 1.0
    logits[6:, 0] = 9.0
    np.testing.assert_array_equal(word_predictions(logits, word_ids), [1, 0, 1])
    assert word_predictions(logits, word_ids).dtype == np.int64


def test_word_predictions_mark_lost_words():
    logits = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    predictions = word_predictions(logits, [None, 0, 1], num_words=4)
    np.testing.assert_array_equal(predictions, [1, 0, MISSING_WORD, MISSING_WORD])


def test_word_predictions_errors():
    with pytest.raises(ValueError, match="do not cover 3 tokens"):
        word_predictions(torch.zeros(2, 4), [None, 0, None])
    with pytest.raises(ValueError, match="do not cover"):
        word_predictions(torch.zeros(1, 3, 4), [None, 0, None])
    with pytest.raises(ValueError, match="past num_words=1"):
        word_predictions(torch.zeros(3, 4), [None, 0, 1], num_words=1)


def test_collate_pads_right():
    examples = [{"input_ids": np.array([2, 7, 8, 3]), "labels": np.array([X, 1, X, X])},
                {"input_ids": np.array([2, 9, 3]), "labels": np.array([X, 0, X])}]
    batch = collate_tagged(examples, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 4) for t in batch.values())
    assert batch["input_ids"].tolist() == [[2, 7, 8, 3], [2, 9, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[X, 1, X, X], [X, 0, X, X]]


def test_collate_errors():
    with pytest.raises(ValueError, match="at least one example"):
        collate_tagged([], pad_id=0)
    with pytest.raises(ValueError, match="example 0: 2 input_ids but 1 labels"):
        collate_tagged([{"input_ids": np.array([1, 2]), "labels": np.array([X])}], pad_id=0)


# --- reader -------------------------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"tokens": ["राम", "ने", "3", "आम", "खाए", "।"],
                   "tags": ["WORD", "FUNC", "NUM", "WORD", "WORD", "PUNCT"], "id": "s1"}, ensure_ascii=False)


def test_read_tagged_jsonl(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [GOOD, "", json.dumps({"tokens": ["यह"], "tags": ["FUNC"]})])
    split = read_tagged_jsonl(path, None)
    assert isinstance(split, TaggedSplit) and len(split) == 2
    assert split.label_set.names == ("FUNC", "NUM", "PUNCT", "WORD")  # sorted names seen in training
    assert split.words[0] == ["राम", "ने", "3", "आम", "खाए", "।"]
    assert split.tags[0].dtype == np.int64
    np.testing.assert_array_equal(split.tags[0], [3, 0, 1, 3, 3, 2])
    assert split.ids == ["s1", "3"]  # the line number when there is no id (blank line 2 skipped)
    assert split.sources == [str(path)]
    # A dev split read with the training label set keeps its ids.
    dev_line = json.dumps({"tokens": ["a", "b"], "tags": ["WORD", "NUM"]})
    dev = read_tagged_jsonl(write_lines(tmp_path / "dev.jsonl", [dev_line]), LabelSet(("NUM", "WORD")))
    np.testing.assert_array_equal(dev.tags[0], [1, 0])


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected a JSON object with fields 'tokens' and 'tags'"),
    (json.dumps({"tags": ["WORD"]}), "missing field 'tokens'"),
    (json.dumps({"tokens": ["a"]}), "missing field 'tags'"),
    (json.dumps({"tokens": "a b", "tags": ["WORD", "WORD"]}), "field 'tokens' must be a list"),
    (json.dumps({"tokens": [], "tags": []}), "field 'tokens' is empty"),
    (json.dumps({"tokens": ["a", "b"], "tags": ["WORD"]}), "field 'tags' has 1 tags for 2 tokens"),
    (json.dumps({"tokens": ["a", ""], "tags": ["WORD", "WORD"]}), "field 'tokens' word 1 is ''"),
    (json.dumps({"tokens": ["a", "  "], "tags": ["WORD", "WORD"]}), "field 'tokens' word 1 is '  '"),
    (json.dumps({"tokens": ["a", "b"], "tags": ["WORD", "VERB"]}), r"\(tags, word 1\): label 'VERB' is not in"),
])
def test_read_tagged_jsonl_errors(tmp_path, bad, message):
    path = write_lines(tmp_path / "dev.jsonl", [GOOD, bad])
    label_set = LabelSet(("FUNC", "NUM", "PUNCT", "WORD"), "labels.txt")
    with pytest.raises(ValueError, match=f"^{path}:2[: ].*{message}"):
        read_tagged_jsonl(path, label_set)


def test_read_tagged_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        read_tagged_jsonl(tmp_path / "nope.jsonl", None)
    with pytest.raises(ValueError, match="no examples"):
        read_tagged_jsonl(write_lines(tmp_path / "empty.jsonl", ["", "  "]), None)


# --- encoding with a real WordPiece tokenizer ---------------------------------------------------

FUNCTION_WORDS = frozenset("के में की से को का पर ने तक और या कि भी ही है हैं".split())
RULE_TAGS = LabelSet(("FUNC", "NUM", "PUNCT", "WORD"), "rule: digit / punctuation-only / function word / other")


def rule_tag(word: str) -> str:
    """The synthetic tag of a word: NUM (has a digit), PUNCT (punctuation only), FUNC (a Hindi function word), WORD."""
    if any(ch.isdigit() for ch in word):
        return "NUM"
    if all(unicodedata.category(ch).startswith("P") for ch in word):
        return "PUNCT"
    return "FUNC" if word in FUNCTION_WORDS else "WORD"


def rule_split(sentences: list[str], source: str) -> TaggedSplit:
    words = [s.split() for s in sentences]
    tags = [np.asarray([RULE_TAGS.index(rule_tag(w), source) for w in ws], dtype=np.int64) for ws in words]
    return TaggedSplit(words, tags, [str(i) for i in range(len(words))], RULE_TAGS, [source])


def test_encode_aligns_every_word(sib200_dir, bert_tokenizer):
    split = rule_split(read_sib200_texts(sib200_dir, "hin_Deva", "dev")[:20], "hin dev")
    encoded = encode_tagged(split, bert_tokenizer, max_len_tokens=256)
    multi_piece = 0
    for example, words, tags in zip(encoded, split.words, split.tags):
        assert example["input_ids"].dtype == np.int64 and example["labels"].dtype == np.int64
        assert len(example["input_ids"]) == len(example["labels"]) == len(example["word_ids"])
        assert example["num_words"] == len(words) and example["lost_words"] == 0
        pieces = bert_tokenizer.convert_ids_to_tokens(example["input_ids"].tolist())
        assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
        assert example["word_ids"][0] is None and example["word_ids"][-1] is None
        assert example["labels"][0] == X and example["labels"][-1] == X
        for w, (word, tag) in enumerate(zip(words, tags)):
            positions = [i for i, wid in enumerate(example["word_ids"]) if wid == w]
            # The pieces of word w spell it: word_ids point at the right word.
            assert "".join(pieces[i].removeprefix("##") for i in positions) == word
            assert example["labels"][positions[0]] == tag
            assert all(example["labels"][i] == X for i in positions[1:])
            multi_piece += len(positions) > 1
        assert (example["labels"] != X).sum() == len(words)
    assert multi_piece > 50  # the check above covered many words split into several pieces


def test_encode_reports_truncated_words(sib200_dir, bert_tokenizer, caplog):
    split = rule_split(read_sib200_texts(sib200_dir, "hin_Deva", "dev")[:10], "hin dev")
    full = encode_tagged(split, bert_tokenizer, max_len_tokens=512)
    max_len = 16
    with caplog.at_level(logging.WARNING, logger="megadistill.data.tagging"):
        cut = encode_tagged(split, bert_tokenizer, max_len_tokens=max_len)
    expected_total = 0
    for whole, short in zip(full, cut):
        assert len(short["input_ids"]) <= max_len
        # Room for max_len - 2 pieces between [CLS] and [SEP]: a word whose first piece sits past it is lost.
        firsts = [whole["word_ids"].index(w) for w in range(whole["num_words"])]
        expected = sum(first > max_len - 2 for first in firsts)
        assert short["lost_words"] == expected
        expected_total += expected
        predictions = word_predictions(torch.randn(max_len, len(RULE_TAGS)), short["word_ids"], short["num_words"])
        assert (predictions == MISSING_WORD).sum() == expected  # lost words score as wrong, not dropped
        assert (short["labels"] != X).sum() == short["num_words"] - expected
    assert expected_total > 100
    assert f"cut off {expected_total} of {sum(len(w) for w in split.words)} words" in caplog.text


def test_encode_rejects_slow_tokenizer_and_tiny_length(bert_tokenizer, tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = bert_tokenizer.get_vocab()
    (tmp_path / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    slow = BertTokenizerLegacy(str(tmp_path / "vocab.txt"), do_lower_case=False)
    split = TaggedSplit([["a"]], [np.array([0])], ["0"], LabelSet(("WORD",)))
    with pytest.raises(ValueError, match="not a fast tokenizer: word_ids"):
        encode_tagged(split, slow, 16)
    with pytest.raises(ValueError, match="max_len_tokens=2 leaves no room"):
        encode_tagged(split, bert_tokenizer, 2)


# --- a tiny tagger trains on the aligned labels -------------------------------------------------

def word_accuracy(model, examples, split: TaggedSplit, pad_id: int) -> float:
    """Word-level accuracy over all words of ``split`` (lost words count as wrong)."""
    right = total = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), 32):
            chunk = examples[start:start + 32]
            batch = collate_tagged(chunk, pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for row, example in enumerate(chunk):
                gold = split.tags[start + row]
                right += int((word_predictions(logits[row], example["word_ids"], example["num_words"]) == gold).sum())
                total += len(gold)
    model.train()
    return right / total


def test_tiny_bert_tagger_learns_above_majority(sib200_dir, bert_tokenizer):
    from transformers import BertConfig, BertForTokenClassification

    train = rule_split(read_sib200_texts(sib200_dir, "hin_Deva", "train")[:200], "hin train")
    held_out = rule_split(read_sib200_texts(sib200_dir, "hin_Deva", "dev"), "hin dev")
    max_len = 160
    train_examples = encode_tagged(train, bert_tokenizer, max_len)
    held_examples = encode_tagged(held_out, bert_tokenizer, max_len)
    counts = np.bincount(np.concatenate(held_out.tags), minlength=len(RULE_TAGS))
    majority = counts.max() / counts.sum()
    assert 0.6 < majority < 0.8 and (counts > 0).all()  # WORD about 0.75: a tagger must beat it by learning tags

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=max_len, num_labels=len(RULE_TAGS),
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=bert_tokenizer.pad_token_id)
    model = BertForTokenClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(40):
        picks = torch.randint(len(train_examples), (16,), generator=order).tolist()
        loss = model(**collate_tagged([train_examples[i] for i in picks], bert_tokenizer.pad_token_id)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = word_accuracy(model, held_examples, held_out, bert_tokenizer.pad_token_id)
    # Measured 0.941-0.949 over torch seeds 0-3 (majority 0.752); 0.88 leaves a wide margin.
    assert accuracy > 0.88, (accuracy, majority)
