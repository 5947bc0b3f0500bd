"""Task evaluation: accuracy and macro-F1, seed summaries, batched classifier predictions and the SIB-200 MLP baseline.

Scores are in percent (0-100), as SIB-200 reports them (Adelani et al., 2023, arXiv:2309.07445).
Macro-F1 averages the F1 of every class id in ``[0, num_labels)``, including a class that is
neither predicted nor in the gold labels (its F1 is 0), so that a score from summed per-class
counts (:func:`macro_f1_from_counts`, what a distributed loop all-reduces) equals the score from
the predictions themselves (:func:`classification_scores`). Predictions of a Hugging Face
``*ForSequenceClassification`` model come from :func:`predict_classes`; :func:`mlp_baseline` is the
paper's n-gram MLP baseline, the floor a distilled student should clear.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

__all__ = ["classification_scores", "macro_f1_from_counts", "mlp_baseline", "predict_classes", "summarize_seeds"]

SIB200_MLP_HIDDEN_UNITS = 100
"""Hidden units of the SIB-200 MLP: scikit-learn's default ``hidden_layer_sizes=(100,)`` (paper §4.1)."""

SIB200_MLP_MAX_ITER = 300
"""Training epochs (scikit-learn ``max_iter`` with the Adam solver) of the SIB-200 MLP (paper §4.2)."""


def _label_ids(name: str, ids: np.ndarray, num_labels: int) -> np.ndarray:
    """``ids`` as a 1-D int64 array, or ``ValueError`` if it is not integer ids in ``[0, num_labels)``."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D array of integer class ids, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
        raise ValueError(f"{name}: class ids must lie in [0, {num_labels}), got min {ids.min()} max {ids.max()}")
    return ids.astype(np.int64)


def classification_scores(gold: np.ndarray, pred: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids, both in percent (0-100).

    Args:
        gold: [N] integer gold class ids in ``[0, num_labels)``.
        pred: [N] integer predicted class ids in ``[0, num_labels)``.
        num_labels: number of classes C. Macro-F1 is the unweighted mean over all C classes
            (``sklearn.metrics.f1_score(average="macro", labels=range(C), zero_division=0)``):
            a class absent from both ``gold`` and ``pred`` counts with F1 0.

    Returns:
        ``{"accuracy": percent, "macro_f1": percent, "examples": N}``.

    Raises:
        ValueError: ``num_labels < 1``; shapes differ; no examples; ids not integers in range.
    """
    from sklearn.metrics import f1_score

    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    gold = _label_ids("gold", gold, num_labels)
    pred = _label_ids("pred", pred, num_labels)
    if gold.shape != pred.shape:
        raise ValueError(f"gold and pred differ in shape: {gold.shape} vs {pred.shape}")
    if gold.size == 0:
        raise ValueError("no examples to score: gold and pred are empty")
    macro_f1 = f1_score(gold, pred, average="macro", labels=range(num_labels), zero_division=0)
    return {"accuracy": 100.0 * float(np.mean(gold == pred)), "macro_f1": 100.0 * float(macro_f1),
            "examples": int(gold.size)}


def macro_f1_from_counts(true_positive: Sequence[float], predicted: Sequence[float], gold: Sequence[float]) -> float:
    """Macro-F1 in percent (0-100) from per-class counts summed over examples (and over ranks).

    Per class c, F1_c = 2 * tp_c / (predicted_c + gold_c), which equals 2PR / (P + R), and 0 when
    ``predicted_c + gold_c == 0``; the result is the mean over all classes, as in
    :func:`classification_scores`. Counts may be floats, as an all-reduced tensor holds them.

    Args:
        true_positive: [C] examples of class c predicted as c.
        predicted: [C] examples predicted as class c.
        gold: [C] examples whose gold class is c.

    Raises:
        ValueError: lengths differ or are 0; a count is negative or not finite; tp_c exceeds
            predicted_c or gold_c.
    """
    tp, pred, ref = (np.asarray(x, dtype=np.float64) for x in (true_positive, predicted, gold))
    if not (tp.ndim == pred.ndim == ref.ndim == 1) or not (tp.size == pred.size == ref.size) or tp.size == 0:
        raise ValueError(f"expected three non-empty 1-D count arrays of one length, got {tp.shape}, {pred.shape}, "
                         f"{ref.shape}")
    counts = np.stack([tp, pred, ref])
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("counts must be finite and non-negative")
    if np.any(tp > np.minimum(pred, ref)):
        raise ValueError("a class has more true positives than predictions or gold examples: counts are mixed up")
    denominator = pred + ref
    f1 = np.divide(2.0 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return 100.0 * float(f1.mean())


def summarize_seeds(results: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation and count of each metric over runs with different seeds.

    Args:
        results: one dict of metrics per run (e.g. from :func:`classification_scores`).

    Returns:
        ``{metric: {"mean", "std", "n"}}`` for every metric present in all runs, in the first
        run's key order. ``std`` is the sample standard deviation (``ddof=1``), in the metric's
        own unit, and 0.0 when n == 1 (a single run has no spread to estimate).

    Raises:
        ValueError: ``results`` is empty.
    """
    if not results:
        raise ValueError("no results to summarize: pass one metrics dict per seed")
    common = [key for key in results[0] if all(key in run for run in results[1:])]
    summary = {}
    for key in common:
        values = np.array([float(run[key]) for run in results], dtype=np.float64)
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        summary[key] = {"mean": float(values.mean()), "std": std, "n": int(values.size)}
    return summary


def _check_padding(model, tokenizer) -> None:
    """``ValueError`` unless the tokenizer pads and the model's config knows the pad id."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token, so texts cannot be batched: set one, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token, and model.config.pad_token_id to its id")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    # Decoder classifiers (Llama, Gemma, Qwen, Mistral) score the last token that is not
    # config.pad_token_id; without it they refuse batches, and with a different id than the
    # tokenizer pads with they would silently score a pad token.
    if config.pad_token_id is None:
        raise ValueError("model.config.pad_token_id is None: decoder classifiers pool the last non-pad token, so set "
                         f"model.config.pad_token_id = tokenizer.pad_token_id (= {tokenizer.pad_token_id})")
    if config.pad_token_id != tokenizer.pad_token_id:
        raise ValueError(f"model.config.pad_token_id = {config.pad_token_id} but the tokenizer pads with id "
                         f"{tokenizer.pad_token_id}: set model.config.pad_token_id = {tokenizer.pad_token_id}")


def _batch_logits(model, tokenizer, texts: list[str], max_len_tokens: int, device) -> np.ndarray:
    """[B, C] float32 logits of one batch of texts, right-padded to the batch's longest."""
    # Right padding keeps every real token at the position it has alone, so a causal model
    # without explicit position ids gives each text the same logits in any batch.
    enc = tokenizer(texts, truncation=True, max_length=max_len_tokens, padding="longest", padding_side="right",
                    return_tensors="pt", split_special_tokens=True)  # as in training (tasks.encode_texts)
    # Generic fast tokenizers may return token_type_ids, which decoder forwards do not take.
    accepted = inspect.signature(model.forward).parameters
    inputs = {key: value.to(device) for key, value in enc.items() if key in accepted}
    return model(**inputs).logits.float().cpu().numpy()


def predict_classes(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, max_len_tokens: int = 164,
                    device: str | torch.device = "cpu", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and logits of a Hugging Face ``*ForSequenceClassification`` model.

    Texts are tokenized with the tokenizer's special tokens, truncated to ``max_len_tokens``
    (164 is SIB-200's fine-tuning length, paper §4.2), sorted by token count (longest first, so
    batches hold similar lengths and the largest batch runs first) and run ``batch_size`` at a
    time in eval mode without gradients; outputs come back in the order of ``texts``. The model's
    train/eval mode is restored afterwards.

    Args:
        model: the classifier, already on ``device``; ``model.config.pad_token_id`` must be set
            and equal to the tokenizer's pad id.
        tokenizer: its tokenizer; it must have a pad token.
        texts: N input texts.
        batch_size: texts per forward pass.
        max_len_tokens: longest input kept, in tokens, special tokens included.
        device: where the inputs go.
        progress: show a tqdm bar over batches.

    Returns:
        ``(pred, logits)``: pred [N] int64 argmax class ids, logits [N, C] float32.

    Raises:
        ValueError: no pad token in the tokenizer; ``model.config.pad_token_id`` unset or different
            from the tokenizer's; ``batch_size`` or ``max_len_tokens`` below 1.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_len_tokens < 1:
        raise ValueError(f"batch_size and max_len_tokens must be >= 1, got {batch_size} and {max_len_tokens}")
    _check_padding(model, tokenizer)
    texts = list(texts)
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    if not texts:
        return np.zeros(0, dtype=np.int64), logits
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len_tokens, split_special_tokens=True)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="predict", unit="batch"):
                index = order[start:start + batch_size]
                logits[index] = _batch_logits(model, tokenizer, [texts[i] for i in index], max_len_tokens, device)
    finally:
        model.train(was_training)
    return logits.argmax(axis=1).astype(np.int64), logits


def _ngram_vectorizer(analyzer: str, ngram_range: tuple[int, int]):
    """A ``CountVectorizer`` of word (whitespace-split) or in-word character n-gram counts."""
    from sklearn.feature_extraction.text import CountVectorizer

    # float32 counts: the MLP then keeps float32 weights, and its Adam updates over
    # [n-gram features, hidden] weights, which dominate the fit, take half the memory traffic.
    if analyzer == "word":
        # Whitespace tokens: the default pattern (?u)\b\w\w+\b ends a token at every combining
        # vowel sign (matras such as ि ी ा are not \w), which splits Devanagari and Bengali words
        # and maps कमी and कम to the same token.
        return CountVectorizer(analyzer="word", ngram_range=ngram_range, token_pattern=None, tokenizer=str.split,
                               dtype=np.float32)
    if analyzer == "char_wb":
        return CountVectorizer(analyzer="char_wb", ngram_range=ngram_range, dtype=np.float32)
    raise ValueError(f"analyzer must be 'word' or 'char_wb', got {analyzer!r}")


def mlp_baseline(train_texts: Sequence[str], train_labels: Sequence[int], test_texts: Sequence[str], *, seed: int,
                 ngram_range: tuple[int, int] = (1, 3), hidden_units: int = SIB200_MLP_HIDDEN_UNITS,
                 max_iter: int = SIB200_MLP_MAX_ITER, analyzer: Literal["word", "char_wb"] = "word") -> np.ndarray:
    """The SIB-200 MLP baseline: n-gram counts into a one-hidden-layer scikit-learn MLP.

    Settings from Adelani et al. (2023), "SIB-200", arXiv:2309.07445: n-gram features with n = 1
    up to 3 and "the default setting on scikit-learn" (§4.1), trained for 300 iterations on "word
    ngram tokens" (§4.2). scikit-learn's defaults are one hidden layer of 100 ReLU units, Adam
    (learning rate 1e-3, L2 alpha 1e-4), mini-batches of min(200, N), stopping early when the
    training loss improves by less than 1e-4 for 10 epochs. The paper's repository
    (dadelani/sib-200) has no MLP script; the same group's MasakhaNEWS repository
    (masakhane-io/masakhane-news, code/classical_models) feeds character n-grams (``char_wb``, 1-3)
    to ``MLPClassifier(max_iter=300)``. The paper's Table 8 MLP test accuracies (hin_Deva 66.71,
    ben_Beng 65.76) are nearer to ``analyzer="char_wb"`` here (67.6-68.6 over seeds 1-3; 67.2)
    than to the word n-grams its text describes (55.4-58.3; 52.9), which stay the default.

    Args:
        train_texts: N training texts.
        train_labels: [N] integer class ids (at least two distinct classes).
        test_texts: M texts to classify.
        seed: ``random_state`` of the MLP (weight init and mini-batch shuffling); same inputs and
            seed give the same predictions.
        ngram_range: smallest and largest n of the n-grams.
        hidden_units: units of the one hidden layer.
        max_iter: largest number of training epochs.
        analyzer: ``"word"`` (whitespace tokens, so Indic combining marks stay in their words) or
            ``"char_wb"`` (character n-grams inside word boundaries).

    Returns:
        [M] int64 predicted class ids.

    Raises:
        ValueError: texts and labels differ in length; no training texts; labels not integers or
            fewer than two classes; unknown ``analyzer``.
    """
    from sklearn.neural_network import MLPClassifier

    labels = np.asarray(train_labels)
    if labels.ndim != 1 or labels.shape[0] != len(train_texts):
        raise ValueError(f"{len(train_texts)} training texts but labels of shape {labels.shape}")
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"training labels must be a non-empty array of integer class ids, got dtype {labels.dtype}")
    if np.unique(labels).size < 2:
        raise ValueError("training labels hold a single class: the MLP needs at least two")
    vectorizer = _ngram_vectorizer(analyzer, ngram_range)
    features = vectorizer.fit_transform(list(train_texts))
    if len(test_texts) == 0:
        return np.zeros(0, dtype=np.int64)
    classifier = MLPClassifier(hidden_layer_sizes=(hidden_units,), max_iter=max_iter, random_state=seed)
    classifier.fit(features, labels)
    return classifier.predict(vectorizer.transform(list(test_texts))).astype(np.int64)
