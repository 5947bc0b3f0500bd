"""Task metrics equal hand computations and sklearn; batched logits equal one-at-a-time ones; the MLP learns."""

import copy
import csv
import math

import numpy as np
import pytest
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.metrics import f1_score
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from conftest import read_sib200_texts
from megadistill.task_eval import (classification_scores, macro_f1_from_counts, mlp_baseline, predict_classes,
                                   summarize_seeds)

GOLD = np.array([0, 0, 0, 1, 1, 2, 2, 2])


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: the tiny models' matmuls then take microseconds, not a wait for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
PRED = np.array([0, 0, 1, 1, 2, 2, 2, 0])


def test_classification_scores_by_hand():
    # Correct at positions 0, 1, 3, 5, 6: accuracy 5/8 = 62.5 %.
    # Class 0: tp 2, predicted 3, gold 3 -> F1 2*2/(3+3) = 2/3.
    # Class 1: tp 1, predicted 2, gold 2 -> 2*1/(2+2) = 1/2.
    # Class 2: tp 2, predicted 3, gold 3 -> 2/3.
    # 3 labels: (2/3 + 1/2 + 2/3) / 3 = 11/18. 4 labels: class 3 is never seen, F1 0 -> (11/6) / 4 = 11/24.
    three = classification_scores(GOLD, PRED, num_labels=3)
    assert three == pytest.approx({"accuracy": 62.5, "macro_f1": 100 * 11 / 18, "examples": 8})
    four = classification_scores(GOLD, PRED, num_labels=4)
    assert four["accuracy"] == pytest.approx(62.5)
    assert four["macro_f1"] == pytest.approx(100 * 11 / 24)


@pytest.mark.parametrize("gold, pred, num_labels, match", [
    (GOLD, PRED[:-1], 3, "shape"),
    (np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3, "empty"),
    (GOLD, PRED, 2, r"\[0, 2\)"),
    (GOLD - 1, PRED, 3, r"\[0, 3\)"),
    (GOLD.astype(float), PRED, 3, "integer"),
])
def test_classification_scores_rejects_bad_input(gold, pred, num_labels, match):
    with pytest.raises(ValueError, match=match):
        classification_scores(gold, pred, num_labels)


def class_counts(gold, pred, num_labels):
    """Per-class (true positives, predictions, gold examples), as a training loop would sum them."""
    tp = np.bincount(gold[gold == pred], minlength=num_labels)
    return tp, np.bincount(pred, minlength=num_labels), np.bincount(gold, minlength=num_labels)


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_from_counts_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    num_labels = 6
    # Class 5 never occurs in gold, class 0 is never predicted.
    gold = rng.integers(0, num_labels - 1, size=60)
    pred = np.where(rng.random(60) < 0.5, np.maximum(gold, 1), rng.integers(1, num_labels, size=60))
    expected = 100 * f1_score(gold, pred, average="macro", labels=range(num_labels), zero_division=0)
    counts = class_counts(gold, pred, num_labels)
    assert counts[1][0] == 0 and counts[2][num_labels - 1] == 0
    assert macro_f1_from_counts(*(c.astype(np.float32) for c in counts)) == pytest.approx(expected, abs=1e-9)
    assert classification_scores(gold, pred, num_labels)["macro_f1"] == pytest.approx(expected, abs=1e-9)
    # A class absent from both gold and predictions adds an F1 of 0 to the mean.
    wider = class_counts(gold, pred, num_labels + 1)
    assert macro_f1_from_counts(*wider) == pytest.approx(expected * num_labels / (num_labels + 1))


@pytest.mark.parametrize("counts, match", [
    (([1, 2], [1, 2], [1]), "one length"),
    (([], [], []), "one length"),
    (([3, 0], [2, 1], [3, 1]), "true positives"),
    (([0, 0], [-1, 1], [1, 1]), "non-negative"),
])
def test_macro_f1_from_counts_rejects_bad_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        macro_f1_from_counts(*counts)


def test_summarize_seeds_by_hand():
    runs = [{"accuracy": 80.0, "macro_f1": 70.0}, {"accuracy": 82.0, "macro_f1": 74.0, "loss": 1.0},
            {"accuracy": 87.0, "macro_f1": 72.0}]
    summary = summarize_seeds(runs)
    assert list(summary) == ["accuracy", "macro_f1"]  # "loss" is missing from two runs
    # accuracy: mean 83; deviations -3, -1, 4; (9 + 1 + 16) / (3 - 1) = 13 -> std sqrt(13).
    assert summary["accuracy"] == pytest.approx({"mean": 83.0, "std": math.sqrt(13.0), "n": 3})
    # macro_f1: mean 72; deviations -2, 2, 0; 8 / 2 = 4 -> std 2.
    assert summary["macro_f1"] == pytest.approx({"mean": 72.0, "std": 2.0, "n": 3})
    assert summarize_seeds(runs[:1])["accuracy"] == {"mean": 80.0, "std": 0.0, "n": 1}
    with pytest.raises(ValueError, match="no results"):
        summarize_seeds([])


@pytest.fixture(scope="module")
def texts(sib200_dir):
    """Twelve texts of very different token counts, not sorted by length."""
    hindi = read_sib200_texts(sib200_dir, "hin_Deva")[:5]
    english = read_sib200_texts(sib200_dir, "eng_Latn")[:4]
    return [hindi[0], "खेल", english[0], hindi[1] + " " + hindi[2], "a", english[1], hindi[3], "चुनाव में सरकार",
            english[2] + " " + english[3], hindi[4], "ok then", english[0][:20]]


def tiny_bert(tokenizer):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=3, initializer_range=0.3,
                     pad_token_id=tokenizer.pad_token_id)
    return BertForSequenceClassification(cfg)


def tiny_llama(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, num_labels=3,
                      initializer_range=0.3, bos_token_id=2, eos_token_id=1, pad_token_id=tokenizer.pad_token_id)
    return LlamaForSequenceClassification(cfg)


def one_at_a_time(model, tokenizer, texts, max_len_tokens):
    """[N, C] logits with each text alone in its batch: no padding at all."""
    model.eval()
    with torch.no_grad():
        rows = [model(**tokenizer(text, truncation=True, max_length=max_len_tokens, return_tensors="pt")).logits[0]
                for text in texts]
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_batched_predictions_equal_unbatched(arch, texts, bert_tokenizer, tiny_tokenizer):
    tokenizer = bert_tokenizer if arch == "bert" else tiny_tokenizer
    model = tiny_bert(tokenizer) if arch == "bert" else tiny_llama(tokenizer)
    max_len = 24  # several texts are longer: truncation must match too
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    assert max(lengths) == max_len and min(lengths) <= 3
    expected = one_at_a_time(model, tokenizer, texts, max_len)
    model.train()
    pred, logits = predict_classes(model, tokenizer, texts, batch_size=5, max_len_tokens=max_len, progress=True)
    assert model.training  # the caller's mode is restored
    assert pred.dtype == np.int64 and logits.dtype == np.float32 and logits.shape == (len(texts), 3)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(pred, expected.argmax(axis=1))
    # Every two texts differ in logits by far more than atol, so a text scored in another's slot would fail.
    assert np.abs(expected[:, None] - expected[None]).max(axis=2)[np.triu_indices(len(texts), 1)].min() > 1e-3
    # Reversed input gives reversed output: batches are re-formed by length, the order restored.
    _, reversed_logits = predict_classes(model, tokenizer, texts[::-1], batch_size=3, max_len_tokens=max_len)
    np.testing.assert_allclose(reversed_logits[::-1], expected, atol=1e-5, rtol=0)


def test_predict_classes_no_texts(bert_tokenizer):
    pred, logits = predict_classes(tiny_bert(bert_tokenizer), bert_tokenizer, [])
    assert pred.shape == (0,) and logits.shape == (0, 3)


def test_predict_classes_requires_pad_ids(tiny_tokenizer, texts):
    model = tiny_llama(tiny_tokenizer)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id is None"):
        predict_classes(model, tiny_tokenizer, texts)
    model.config.pad_token_id = tiny_tokenizer.eos_token_id
    with pytest.raises(ValueError, match="pads with id 0"):
        predict_classes(model, tiny_tokenizer, texts)
    no_pad = copy.deepcopy(tiny_tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        predict_classes(tiny_llama(tiny_tokenizer), no_pad, texts)


def marker_texts(rng, count):
    """Texts of two classes told apart by one word; each pair (कम/कमी, ...) differs only in a vowel sign."""
    markers = [("कम", "पत", "जल"), ("कमी", "पति", "जली")]
    filler = ["और", "वह", "घर", "सब", "नया", "दिन"]
    labels = rng.integers(0, 2, size=count)
    texts = []
    for label in labels:
        words = list(rng.choice(filler, size=2)) + [str(rng.choice(markers[label]))]
        texts.append(" ".join(rng.permutation(words)))
    return texts, labels


@pytest.mark.parametrize("analyzer", ["word", "char_wb"])
def test_mlp_baseline_learns_marker_words(analyzer):
    # The default sklearn token pattern maps both words of a pair to one token; the baseline must not.
    default = CountVectorizer().build_analyzer()
    assert default("कमी") == default("कम") == ["कम"]
    rng = np.random.default_rng(0)
    train_texts, train_labels = marker_texts(rng, 80)
    test_texts, test_labels = marker_texts(rng, 40)
    pred = mlp_baseline(train_texts, train_labels, test_texts, seed=0, analyzer=analyzer)
    assert pred.dtype == np.int64 and pred.shape == (40,)
    # With the pairs merged, the texts of the two classes would look alike (about 50 %).
    assert classification_scores(test_labels, pred, 2)["accuracy"] >= 95.0
    again = mlp_baseline(train_texts, train_labels, test_texts, seed=0, analyzer=analyzer)
    np.testing.assert_array_equal(again, pred)


def test_mlp_baseline_rejects_bad_input():
    with pytest.raises(ValueError, match="2 training texts"):
        mlp_baseline(["a b", "c d"], [0], ["a"], seed=0)
    with pytest.raises(ValueError, match="single class"):
        mlp_baseline(["a b", "c d"], [1, 1], ["a"], seed=0)
    with pytest.raises(ValueError, match="analyzer"):
        mlp_baseline(["a b", "c d"], [0, 1], ["a"], seed=0, analyzer="char")


def read_split(sib200_dir, split, names):
    with open(sib200_dir / "hin_Deva" / f"{split}.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row["text"] for row in rows], np.array([names.index(row["category"]) for row in rows])


def test_mlp_baseline_on_sib200_hindi(sib200_dir):
    names = (sib200_dir / "hin_Deva" / "labels.txt").read_text(encoding="utf-8").split()
    train_texts, train_labels = read_split(sib200_dir, "train", names)
    dev_texts, dev_labels = read_split(sib200_dir, "dev", names)
    assert len(names) == 7 and len(train_texts) == 701 and len(dev_texts) == 99
    scores = classification_scores(dev_labels, mlp_baseline(train_texts, train_labels, dev_texts, seed=1), 7)
    # Chance is 100/7 = 14.3 %; seeds 1-3 give about 50-57 % here.
    assert scores["accuracy"] > 35.0 and scores["macro_f1"] > 25.0
