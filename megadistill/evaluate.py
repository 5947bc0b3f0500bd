"""Held-out evaluation of language models on raw text: causal bits per character, masked-LM metrics.

Causal LMs get bits per character (and per UTF-8 byte), which compares models with different
tokenizers (a teacher with 262k ids, a student with a trimmed vocabulary) on the same text: the
total negative log-likelihood of the text's tokens, in bits, divided by the text's length in
Unicode code points (NFC). This follows the bits-per-byte evaluation of karpathy/nanochat and the
character-level normalization common in language-modelling benchmarks.

Romanized views. A model trained on romanized text (ISO 15919 / ITRANS, :mod:`megadistill.data.romanize`)
reads the romanized text, but is scored in bits per character *of the native text it was given*,
so that it compares with a model that reads the native script: :func:`count_on_native` (and
``tools/evaluate.py --chars-from NATIVE``) keeps the NLL and token count of the romanized texts
and replaces the divisor by the native texts' length. Counting rule for the native divisor:
``characters`` = Unicode code points of each NFC-normalized native text, every code point
(letters, vowel signs, viramas, spaces, digits, punctuation), summed over the texts; ``bytes_utf8``
= UTF-8 bytes of the same NFC strings; no special token (BOS/EOS) is counted; the romanized text's
own length is NOT used (it is kept as ``scored_characters`` / ``scored_bytes_utf8``); derived
ratios follow, so ``tokens_per_char`` = romanized tokens per native character. The native texts
must be the same documents in the same order (read with the same reader): only their count can
be checked, and a mismatch is a ValueError. Each causal record says where its characters come
from in ``characters_from`` (``"scored"``: the texts the model read; else the native file(s)).
Masked-LM metrics are per masked token and refuse a native count.

Masked LMs (BERT, XLM-R, DistilBERT ``*ForMaskedLM``) get the masked-token accuracy and loss on a
fixed, seeded BERT mask of the held-out text (Devlin et al., 2019, §3.1; the masking of
:mod:`megadistill.data.masking`), so two models with the same tokenizer predict the same
positions; optionally also pseudo-log-likelihood bits per character (Salazar et al., 2020,
"Masked Language Model Scoring", arXiv:1910.14659).

The rest serves ``tools/evaluate.py``: held-out files per language (SIB-200 style
``<lang>/<split>.tsv``), loading a model by its architecture, and the printed table.
"""

from __future__ import annotations

import glob
import math
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from megadistill.data.masking import IGNORE_INDEX, MaskingConfig, mask_token_id, mask_tokens, special_ids_table

SEED_STRIDE = 0x9E3779B97F4A7C15
"""Odd 64-bit constant mixing ``(seed, text index)`` into one generator seed per text."""


@dataclass
class TextNLL:
    """Totals over a text collection; ``bits_per_char`` etc. are derived.

    Attributes:
        nll_nats: summed negative log-likelihood of the scored tokens, in nats.
        tokens: number of scored tokens (the text's own tokens, no special tokens).
        characters: Unicode code points of the NFC-normalized texts.
        bytes_utf8: UTF-8 bytes of the NFC-normalized texts.
        texts: number of texts.
    """

    nll_nats: float
    tokens: int
    characters: int
    bytes_utf8: int
    texts: int

    @property
    def bits_per_char(self) -> float:
        return self.nll_nats / math.log(2) / max(1, self.characters)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / max(1, self.bytes_utf8)

    @property
    def nats_per_token(self) -> float:
        return self.nll_nats / max(1, self.tokens)

    def to_dict(self) -> dict:
        """Totals plus the derived ratios, as a JSON-serializable dict."""
        out = asdict(self)
        out.update(bits_per_char=self.bits_per_char, bits_per_byte=self.bits_per_byte, nats_per_token=self.nats_per_token)
        return out


@dataclass
class MlmEval:
    """Masked-LM totals over a text collection on a fixed mask; ratios are derived.

    Attributes:
        masked_tokens: positions selected for prediction (80% ``[MASK]``, 10% random, 10% kept).
        correct: selected positions whose arg-max prediction is the original token.
        nll_nats: summed negative log-likelihood of the original tokens there, in nats.
        texts: number of texts.
    """

    masked_tokens: int
    correct: int
    nll_nats: float
    texts: int

    @property
    def masked_token_accuracy(self) -> float:
        """Fraction of masked positions predicted right, in ``[0, 1]``."""
        return self.correct / max(1, self.masked_tokens)

    @property
    def mlm_loss(self) -> float:
        """Mean NLL per masked token, in nats."""
        return self.nll_nats / max(1, self.masked_tokens)

    def to_dict(self) -> dict:
        """Totals plus the derived ratios, as a JSON-serializable dict."""
        out = asdict(self)
        out.update(masked_token_accuracy=self.masked_token_accuracy, mlm_loss=self.mlm_loss)
        return out


@dataclass
class MaskedText:
    """One text framed with its special tokens and masked.

    Attributes:
        input_ids: ``LongTensor[L]``, the corrupted sequence the model reads.
        labels: ``LongTensor[L]``, the original id at selected positions, ``-100`` elsewhere.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor


def start_token_id(tokenizer) -> int:
    """The one token put in front of a text for causal scoring: BOS, else CLS, else EOS.

    Raises:
        ValueError: the tokenizer has none of the three; set one, e.g.
            ``tokenizer.bos_token = "<s>"`` for a token of its vocabulary.
    """
    for name in ("bos_token_id", "cls_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        "tokenizer has no BOS, CLS or EOS token to condition the first token on: "
        "set one (e.g. tokenizer.bos_token = '<s>') to a token of its vocabulary"
    )


def _encode_causal(tokenizer, text: str, start: int) -> list[int]:
    """``[start] + ids`` of the text alone (``add_special_tokens=False``): no trailing EOS/SEP is scored."""
    return [start] + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` into ``(input_ids, attention_mask)``, both ``LongTensor[B, max len]``."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _scored_vocab(model, tokenizer) -> int:
    """Ids that may be predicted: rows past ``len(tokenizer)`` are padding (padded-vocabulary pitfall)."""
    return min(model.get_output_embeddings().weight.shape[0], len(tokenizer))


def _check_ids(rows: Sequence[Sequence[int]], vocab: int) -> None:
    top = max((max(ids) for ids in rows if len(ids)), default=-1)
    if top >= vocab:
        raise ValueError(f"tokenizer produced id {top} >= the model's vocabulary ({vocab}): wrong tokenizer for this model")


def _check_length(rows: Sequence[Sequence[int]], model, tokenizer) -> None:
    """Encoders have learned positions: a longer sequence would index past them."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limit = min((int(x) for x in limits if x is not None and x < 1_000_000), default=None)
    longest = max(len(ids) for ids in rows)
    if limit is not None and longest > limit:
        raise ValueError(
            f"a text has {longest} tokens with its special tokens, more than the model's {limit} positions: "
            "split long documents into sentences or paragraphs before evaluating"
        )


def _device(model, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _nfc(texts: Sequence[str]) -> list[str]:
    return [unicodedata.normalize("NFC", t) for t in texts]


def _text_totals(texts: Sequence[str], nll: float, tokens: int) -> TextNLL:
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return TextNLL(nll_nats=nll, tokens=tokens, characters=chars, bytes_utf8=nbytes, texts=len(texts))


@torch.no_grad()
def text_nll(model, tokenizer, texts: Sequence[str], batch_size: int = 4, device: str | torch.device | None = None) -> TextNLL:
    """Sum the next-token NLL (nats) of ``texts`` under a causal LM, one text per sequence.

    The rule is the same for every tokenizer, whatever its post-processor appends: the text is
    encoded with ``add_special_tokens=False``, ONE start token (:func:`start_token_id`: BOS, else
    CLS, else EOS) is put in front and is not scored, and exactly the text's own tokens are
    scored; no EOS/SEP is scored, so ``tokens == sum(len(tokenizer(t, add_special_tokens=False)
    .input_ids))``.

    Args:
        model: a causal LM returning ``.logits`` [B, T, V].
        tokenizer: the model's own tokenizer (ids must be < the model's vocabulary).
        texts: raw strings; each is NFC-normalized and scored independently.
        batch_size: texts per forward pass (right-padded; padding is masked out).
        device: where inputs go; default the model's device.

    Raises:
        ValueError: a token id outside the model's vocabulary (tokenizer/model mismatch), or a
            tokenizer without BOS, CLS and EOS.
    """
    model.eval()
    device = _device(model, device)
    vocab = _scored_vocab(model, tokenizer)
    start = start_token_id(tokenizer)
    texts = _nfc(texts)
    nll, tokens = 0.0, 0
    for begin in range(0, len(texts), batch_size):
        encoded = [_encode_causal(tokenizer, t, start) for t in texts[begin : begin + batch_size]]
        _check_ids(encoded, vocab)
        input_ids, mask = _pad(encoded, _pad_id(tokenizer))
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits[..., :vocab].float()
        targets = input_ids[:, 1:].to(device).masked_fill(mask[:, 1:].to(device) == 0, IGNORE_INDEX)
        nll += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((targets != IGNORE_INDEX).sum())
    return _text_totals(texts, nll, tokens)


def count_on_native(result: TextNLL, native_texts: Sequence[str]) -> TextNLL:
    """``result`` (the NLL of romanized texts) with its characters and bytes counted on the native texts.

    The NLL, token and text counts stay those of the scored (romanized) texts; ``characters`` and
    ``bytes_utf8`` become the NFC code points and UTF-8 bytes of ``native_texts`` (every code point,
    spaces and punctuation included, no special tokens), so ``bits_per_char`` is bits per native
    character. See the module docstring.

    Raises:
        ValueError: ``native_texts`` holds a different number of texts than ``result`` was scored on.
    """
    if len(native_texts) != result.texts:
        raise ValueError(f"{len(native_texts)} native texts for {result.texts} scored texts: they must be the same documents")
    native = _text_totals(_nfc(native_texts), result.nll_nats, result.tokens)
    return replace(result, characters=native.characters, bytes_utf8=native.bytes_utf8)


def _text_seed(seed: int, index: int) -> int:
    return (seed * SEED_STRIDE + index) % (1 << 63)


def fixed_mlm_masks(tokenizer, texts: Sequence[str], mask_prob: float = 0.15, seed: int = 0) -> list[MaskedText]:
    """Frame each text with the tokenizer's special tokens and mask it with a per-text seeded generator.

    Each text becomes ``tokenizer(text, add_special_tokens=True)`` (``[CLS] .. [SEP]`` /
    ``<s> .. </s>``) and is masked by :func:`megadistill.data.masking.mask_tokens` (BERT's 80/10/10,
    ``round(mask_prob * n)`` of its ``n`` non-special tokens, at least one) with a
    ``torch.Generator`` seeded from ``(seed, index of the text)``. The mask of a text therefore
    depends only on the tokenizer, the text, its index and ``seed``: not on the model, the batch
    size or the other texts. Special tokens are never masked nor used as random replacements.

    Args:
        tokenizer: with a mask token; texts are NFC-normalized first.
        mask_prob: fraction of each text's tokens selected, in ``[0, 1]``.
        seed: integer seed of the whole mask.

    Returns:
        One :class:`MaskedText` per text.

    Raises:
        ValueError: no mask token, or ``mask_prob`` outside ``[0, 1]``.
    """
    config = MaskingConfig(mask_prob=mask_prob).validate()
    mask_id, special = mask_token_id(tokenizer), special_ids_table(tokenizer)
    out = []
    for index, text in enumerate(_nfc(texts)):
        ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]], dtype=torch.long)
        generator = torch.Generator().manual_seed(_text_seed(seed, index))
        masked, labels = mask_tokens(ids, mask_id=mask_id, vocab_size=len(tokenizer), special=special,
                                     config=config, generator=generator)
        out.append(MaskedText(masked[0], labels[0]))
    return out


@torch.no_grad()
def mlm_eval(
    model, tokenizer, texts: Sequence[str], mask_prob: float = 0.15, seed: int = 0, batch_size: int = 8,
    device: str | torch.device | None = None,
) -> MlmEval:
    """Masked-token accuracy and loss of a masked LM on the fixed mask of :func:`fixed_mlm_masks`.

    Follows BERT's masked-LM objective (Devlin et al., 2019, §3.1) as an evaluation: the
    prediction at every selected position is scored against the original token, whether the
    position shows ``[MASK]``, a random token or the original. Predictions range over the
    tokenizer's ids only (rows past ``len(tokenizer)`` are padding and never predicted).

    Args:
        model: a ``*ForMaskedLM`` returning ``.logits`` ``[B, L, V]``.
        tokenizer: the model's tokenizer, with a mask token.
        texts: raw strings, one sequence each (right-padded with ``attention_mask``).
        mask_prob, seed: as :func:`fixed_mlm_masks`.
        batch_size: texts per forward pass.
        device: where inputs go; default the model's device.

    Returns:
        :class:`MlmEval` totals (argmax ties go to the lowest id).

    Raises:
        ValueError: as :func:`fixed_mlm_masks`; token ids outside the model's vocabulary; a text
            longer than the model's positions.
    """
    model.eval()
    device = _device(model, device)
    vocab = _scored_vocab(model, tokenizer)
    examples = fixed_mlm_masks(tokenizer, texts, mask_prob, seed)
    total = MlmEval(masked_tokens=0, correct=0, nll_nats=0.0, texts=len(examples))
    for begin in range(0, len(examples), batch_size):
        batch = examples[begin : begin + batch_size]
        rows = [e.input_ids.tolist() for e in batch]
        _check_ids(rows, vocab)
        _check_length(rows, model, tokenizer)
        input_ids, mask = _pad(rows, _pad_id(tokenizer))
        labels, _ = _pad([e.labels.tolist() for e in batch], IGNORE_INDEX)
        selected = labels != IGNORE_INDEX
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        picked = logits[selected.to(device)][:, :vocab].float()  # [N, vocab]
        targets = labels[selected].to(device)
        total.nll_nats += F.cross_entropy(picked, targets, reduction="sum").item()
        total.correct += int((picked.argmax(-1) == targets).sum())
        total.masked_tokens += int(targets.numel())
    return total


def _pll_copies(encoded: Sequence[list[int]], special: torch.Tensor) -> Iterator[tuple[list[int], int]]:
    """``(framed ids, position)`` for every non-special token of every text, text by text."""
    for ids in encoded:
        for position, token in enumerate(ids):
            if not special[token]:
                yield ids, position


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def pll_bits_per_char(
    model, tokenizer, texts: Sequence[str], batch_size: int = 32, device: str | torch.device | None = None
) -> TextNLL:
    """Pseudo-log-likelihood of ``texts`` under a masked LM, as :class:`TextNLL` (read ``.bits_per_char``).

    Salazar et al. (2020), arXiv:1910.14659, eq. 2: ``PLL(W) = sum_t log P(w_t | W with w_t
    masked)``. Each text is framed with its special tokens (``[CLS] .. [SEP]``); every non-special
    token is replaced by the mask token in its own copy of the sequence and the log-probability
    of the true token at that position is summed. ``nll_nats = -PLL``; ``tokens`` counts the
    scored tokens. This costs one sequence per token: copies of all texts are stacked and run
    ``batch_size`` copies per forward. PLL is not a normalized likelihood, so compare its bits per
    character only between masked LMs, never with a causal model's.

    Args:
        model: a ``*ForMaskedLM`` returning ``.logits`` ``[B, L, V]``.
        tokenizer: the model's tokenizer, with a mask token.
        texts: raw strings (NFC-normalized; characters are counted after normalization).
        batch_size: masked copies per forward pass (not texts).
        device: where inputs go; default the model's device.

    Raises:
        ValueError: no mask token; token ids outside the model's vocabulary; a text longer than
            the model's positions.
    """
    model.eval()
    device = _device(model, device)
    vocab = _scored_vocab(model, tokenizer)
    mask_id, special = mask_token_id(tokenizer), special_ids_table(tokenizer)
    texts = _nfc(texts)
    encoded = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    if encoded:
        _check_ids(encoded, vocab)
        _check_length(encoded, model, tokenizer)
    nll, tokens = 0.0, 0
    for batch in _batched(_pll_copies(encoded, special), batch_size):
        input_ids, mask = _pad([ids for ids, _ in batch], _pad_id(tokenizer))
        rows, positions = torch.arange(len(batch)), torch.tensor([p for _, p in batch])
        targets = input_ids[rows, positions].clone()
        input_ids[rows, positions] = mask_id
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        picked = logits[rows.to(device), positions.to(device), :vocab].float()  # [N, vocab]
        nll += F.cross_entropy(picked, targets.to(device), reduction="sum").item()
        tokens += len(batch)
    return _text_totals(texts, nll, tokens)


# ---------------------------------------------------------------- held-out data per language


def _language_of(path: Path) -> str:
    from megadistill.data.sources import language_from_path

    lang, script = language_from_path(path)
    return f"{lang}_{script}" if lang and script else path.name.split(".", 1)[0]


def _expand(item: str, split: str) -> list[Path]:
    """Files named by one ``--data`` item: a file, a directory of ``<lang>/<split>.tsv``, or a glob."""
    path = Path(item)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(path.glob(f"*/{split}.tsv")) or sorted(path.glob(f"{split}.tsv"))
        if not found:
            raise FileNotFoundError(f"{path} holds no {split}.tsv nor <lang>/{split}.tsv: pass files, or --split")
        return found
    found = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
    if not found:
        raise FileNotFoundError(f"--data {item}: no such file, directory or glob match")
    return found


def eval_text_files(
    data: Sequence[str] = (), data_dir: str | Path | None = None, langs: Sequence[str] = (), split: str = "dev"
) -> dict[str, list[Path]]:
    """Group held-out files by language, in first-seen order.

    Args:
        data: files (any format of :func:`megadistill.data.sources.read_documents`), directories
            holding ``<lang>/<split>.tsv`` (or ``<split>.tsv``), or glob patterns.
        data_dir: a SIB-200 style root: ``<data_dir>/<lang>/<split>.tsv`` for each of ``langs``
            (all languages there when ``langs`` is empty).
        langs: FLORES codes (``hin_Deva``) to keep; empty keeps all.
        split: split file name without ``.tsv`` (``dev``, ``test``, ``train``).

    Returns:
        ``{language: [files]}``; the language is the FLORES code in the path (``hin_Deva``),
        else the file name up to its first dot.

    Raises:
        ValueError: neither ``data`` nor ``data_dir``.
        FileNotFoundError: a missing file or language (the message lists those available).
    """
    if not data and data_dir is None:
        raise ValueError("no held-out text: pass --data FILE|DIR|GLOB, or --data-dir DIR [--lang CODE] [--split dev]")
    files = [f for item in data for f in _expand(item, split)]
    if data_dir is not None:
        files += _language_files(Path(data_dir), langs, split)
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(_language_of(path), []).append(path)
    if langs:
        missing = [lang for lang in langs if lang not in groups]
        if missing:
            raise FileNotFoundError(f"no {split} text for {missing} in --data; languages found: {', '.join(sorted(groups))}")
        groups = {lang: groups[lang] for lang in langs}
    return groups


def _language_files(root: Path, langs: Sequence[str], split: str) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} is not a directory (expected <lang>/{split}.tsv inside)")
    available = sorted(p.parent.name for p in root.glob(f"*/{split}.tsv"))
    missing = [lang for lang in langs if lang not in available]
    if missing:
        raise FileNotFoundError(f"{root}: no {split}.tsv for {missing}; languages there: {', '.join(available)}")
    return [root / lang / f"{split}.tsv" for lang in (langs or available)]


def read_texts(paths: Sequence[str | Path]) -> list[str]:
    """The documents of ``paths`` as NFC strings, in order (``on_error="fail"``: a bad record raises ValueError)."""
    from megadistill.data.sources import read_documents

    return [doc.text for path in paths for doc in read_documents(Path(path), on_error="fail")]


def text_stats(texts: Sequence[str]) -> dict:
    """``{"texts", "characters", "bytes_utf8"}`` of NFC-normalized ``texts``."""
    texts = _nfc(texts)
    return {"texts": len(texts), "characters": sum(map(len, texts)), "bytes_utf8": sum(len(t.encode()) for t in texts)}


@dataclass
class NativeText:
    """The native texts whose characters divide the NLL of one language's scored (romanized) texts.

    Attributes:
        texts: NFC native documents, one per scored text, in the same order.
        files: the file(s) they were read from.
    """

    texts: list[str]
    files: list[str]

    @property
    def origin(self) -> str:
        """The files, ``", "``-joined: a record's ``characters_from``."""
        return ", ".join(self.files)


def _describe(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def _paired_groups(files: dict[str, list[Path]], native: dict[str, list[Path]]) -> list[tuple[str, list[Path]]]:
    """``(language, native files)`` for each language of ``files``: by language code, else by position."""
    if all(lang in native for lang in files):
        return [(lang, native[lang]) for lang in files]
    if len(native) != len(files):
        raise ValueError(f"--chars-from names {len(native)} language(s) ({', '.join(native)}) but --data has "
                         f"{len(files)} ({', '.join(files)}): give one native file per scored file, in the same layout")
    return list(zip(files, native.values()))


def native_texts(files: dict[str, list[Path]], native: dict[str, list[Path]],
                 texts: dict[str, list[str]]) -> dict[str, NativeText]:
    """Read the native twin of each language's scored texts and check that they pair one to one.

    Args:
        files: ``{language: scored files}`` (:func:`eval_text_files` of ``--data``).
        native: ``{language: native files}`` (:func:`eval_text_files` of ``--chars-from``); paired
            with ``files`` by language code when it has every language of ``files``, else by position.
        texts: ``{language: scored texts}`` (:func:`read_texts` of ``files``).

    Returns:
        ``{language: NativeText}``, read with :func:`read_texts` (the same reader as the scored text).

    Raises:
        ValueError: a different number of languages, or of texts in a language (the message names
            both files and both counts).
    """
    out = {}
    for lang, paths in _paired_groups(files, native):
        items = read_texts(paths)
        if len(items) != len(texts[lang]):
            raise ValueError(f"--chars-from {_describe(paths)} has {len(items)} texts but --data {_describe(files[lang])} "
                             f"has {len(texts[lang])}: the native texts must be the same documents, in the same order")
        out[lang] = NativeText(items, [str(p) for p in paths])
    return out


# ---------------------------------------------------------------- models


@dataclass
class EvalOptions:
    """What :func:`evaluate_model` computes.

    Attributes:
        batch_size: texts per forward pass (masked copies per pass for PLL: ``batch_size * 8``).
        pll: masked LMs also get pseudo-log-likelihood bits per character (one forward per token).
        mask_prob: fraction of tokens masked for the masked-LM metrics.
        seed: seed of the fixed mask.
    """

    batch_size: int = 4
    pll: bool = False
    mask_prob: float = 0.15
    seed: int = 0


def is_masked_lm(config) -> bool:
    """True when a model config's ``architectures`` name a ``*ForMaskedLM`` class."""
    return any(name.endswith("ForMaskedLM") for name in (getattr(config, "architectures", None) or []))


def load_eval_model(spec: str | Path, cache_dir: str | Path | None = None):
    """Load ``(model, tokenizer)`` for evaluation, frozen, in eval mode, on CPU.

    A checkpoint whose config names a ``*ForMaskedLM`` architecture is loaded with
    ``AutoModelForMaskedLM``; anything else goes through
    :func:`megadistill.models.teacher.load_teacher` (HF directory, ``.gguf``, packaged GGUF).

    Raises:
        FileNotFoundError, ValueError: as :func:`megadistill.models.teacher.resolve_teacher` and
            ``load_teacher``.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    from megadistill.models.teacher import load_teacher, resolve_teacher

    path = resolve_teacher(spec, cache_dir)
    if not is_masked_lm(AutoConfig.from_pretrained(path, local_files_only=True)):
        return load_teacher(spec, cache_dir=cache_dir)
    model = AutoModelForMaskedLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _causal_record(model, tokenizer, texts: Sequence[str], options: EvalOptions, native: NativeText | None) -> dict:
    """``kind="causal"``, :meth:`TextNLL.to_dict` and ``characters_from`` (counted on ``native`` when given)."""
    result = text_nll(model, tokenizer, texts, batch_size=options.batch_size)
    if native is None:
        return {"kind": "causal", **result.to_dict(), "characters_from": "scored"}
    counted = count_on_native(result, native.texts)
    return {"kind": "causal", **counted.to_dict(), "characters_from": native.origin,
            "scored_characters": result.characters, "scored_bytes_utf8": result.bytes_utf8}


def evaluate_model(model, tokenizer, texts: Sequence[str], options: EvalOptions, native: NativeText | None = None) -> dict:
    """Metrics of one model on one text set, as a JSON-serializable dict with a ``kind`` key.

    Causal LMs: ``kind="causal"``, :meth:`TextNLL.to_dict` and ``characters_from`` (``"scored"``).
    With ``native`` (the native twin of romanized ``texts``), characters and bytes are those of the
    native texts (:func:`count_on_native`), ``characters_from`` is ``native.origin`` and
    ``scored_characters`` / ``scored_bytes_utf8`` keep the romanized texts' own length. Masked LMs
    (the model's class is a ``*ForMaskedLM``): ``kind="mlm"``, :meth:`MlmEval.to_dict`,
    ``mask_prob``, ``seed`` and, with ``options.pll``, ``pll`` holding :meth:`TextNLL.to_dict` of
    :func:`pll_bits_per_char`.

    Raises:
        ValueError: ``native`` for a masked LM (its metrics are per masked token, not per
            character), or a native text count different from ``texts``.
    """
    if not type(model).__name__.endswith("ForMaskedLM"):
        return _causal_record(model, tokenizer, texts, options, native)
    if native is not None:
        raise ValueError(f"--chars-from (native character counts, from {native.origin}) applies to causal LMs' "
                         f"bits/char only; {type(model).__name__} is a masked LM: drop --chars-from for it")
    result = mlm_eval(model, tokenizer, texts, mask_prob=options.mask_prob, seed=options.seed,
                      batch_size=options.batch_size)
    out = {"kind": "mlm", **result.to_dict(), "mask_prob": options.mask_prob, "seed": options.seed}
    if options.pll:
        out["pll"] = pll_bits_per_char(model, tokenizer, texts, batch_size=options.batch_size * 8).to_dict()
    return out


def _speed(record: dict, seconds: float) -> dict:
    """``tokens_per_char`` and ``chars_per_s`` of a causal-LM record scored in ``seconds``; {} otherwise."""
    if "characters" not in record or "bits_per_char" not in record:
        return {}
    chars = max(1, record["characters"])
    return {"tokens_per_char": record["tokens"] / chars, "chars_per_s": chars / max(seconds, 1e-9)}


def evaluate_models(
    models: Sequence[tuple[str, str]], texts: dict[str, list[str]], options: EvalOptions, cache_dir=None,
    native: dict[str, NativeText] | None = None,
) -> list[dict]:
    """Evaluate each ``(name, spec)`` on each language's texts; one model in memory at a time.

    Args:
        native: ``{language: NativeText}`` (:func:`native_texts`): count characters on these native
            texts instead of the scored (romanized) ones; causal LMs only.

    Returns:
        One record per model per language: :func:`evaluate_model`'s metrics plus ``name``,
        ``path``, ``language``, ``parameters`` (:func:`count_parameters`), ``vocab_size``
        (``len(tokenizer)``), ``eval_time_s`` (that language only; the first also includes loading),
        and for causal LMs ``tokens_per_char`` and ``chars_per_s`` (characters scored per second of
        tokenizing + forward passes, loading excluded: the model's inference speed on this machine;
        both per native character with ``native``).
    """
    from megadistill.models.teacher import count_parameters

    records = []
    for name, spec in models:
        start = time.time()
        model, tokenizer = load_eval_model(spec, cache_dir)
        info = {"name": name, "path": str(spec), "parameters": count_parameters(model), "vocab_size": len(tokenizer)}
        for language, items in texts.items():
            scored = time.time()
            record = evaluate_model(model, tokenizer, items, options, (native or {}).get(language))
            speed = _speed(record, time.time() - scored)
            records.append({**record, **info, **speed, "language": language, "eval_time_s": time.time() - start})
            start = time.time()
        del model
    return records


def by_model(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """``{model name: {language: record}}`` of :func:`evaluate_models` records."""
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        out.setdefault(r["name"], {})[r["language"]] = r
    return out


# ---------------------------------------------------------------- report


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e6:.3f}M"


def _models_table(records: Sequence[dict]) -> list[str]:
    lines = ["| model | kind | vocab | params total | embedding | non-embedding |", "|---|---|---:|---:|---:|---:|"]
    for name, langs in by_model(records).items():
        r = next(iter(langs.values()))
        p = r["parameters"]
        lines.append(f"| {name} | {r['kind']} | {r['vocab_size']} | {_millions(p['total'])} | "
                     f"{_millions(p['embedding'])} | {_millions(p['non_embedding'])} |")
    return lines


def _causal_table(records: Sequence[dict]) -> list[str]:
    lines = ["| model | language | bits/char | bits/byte | nats/token | tokens | tokens/char | chars/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        speed = f"{r['tokens_per_char']:.3f} | {r['chars_per_s']:.0f}" if "chars_per_s" in r else "- | -"
        lines.append(f"| {r['name']} | {r['language']} | {r['bits_per_char']:.4f} | {r['bits_per_byte']:.4f} | "
                     f"{r['nats_per_token']:.4f} | {r['tokens']} | {speed} |")
    return lines


def _mlm_table(records: Sequence[dict]) -> list[str]:
    lines = ["| model | language | masked acc | MLM loss (nats) | masked tokens | PLL bits/char |",
             "|---|---|---:|---:|---:|---:|"]
    for r in records:
        pll = f"{r['pll']['bits_per_char']:.4f}" if "pll" in r else "-"
        lines.append(f"| {r['name']} | {r['language']} | {r['masked_token_accuracy']:.4f} | {r['mlm_loss']:.4f} | "
                     f"{r['masked_tokens']} | {pll} |")
    return lines


def format_table(records: Sequence[dict], data: dict[str, dict] | None = None, summary: dict | None = None) -> str:
    """Markdown tables of :func:`evaluate_models` records: models, causal results, masked-LM results.

    Args:
        records: one dict per model per language.
        data: ``{language: text_stats(...)}``, listed under the tables; with a ``"native"`` entry
            (``text_stats`` of the native texts plus ``files``) the line says the causal ratios are
            per native character.
        summary: a run's ``summary.json`` (steps, world_size, tokens_per_s, train_time_s,
            wall_time_s), listed last.
    """
    lines = _models_table(records)
    for kind, table in (("causal", _causal_table), ("mlm", _mlm_table)):
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            lines += [""] + table(rows)
    if data:
        lines.append("")
    for language, s in (data or {}).items():
        lines.append(f"held-out {language}: {s['texts']} texts, {s['characters']} characters, {s['bytes_utf8']} UTF-8 bytes")
        if "native" in s:
            n = s["native"]
            lines.append(f"  causal bits/char, bits/byte and tokens/char of {language} are per character of the native text "
                         f"({', '.join(n['files'])}: {n['characters']} characters, {n['bytes_utf8']} UTF-8 bytes)")
    if summary:
        lines.append(f"distillation: {summary['steps']} optimizer steps on {summary['world_size']} ranks, "
                     f"{summary['tokens_per_s']:.0f} tokens/s (student+teacher, all ranks), "
                     f"train {summary['train_time_s']:.0f} s, job wall time {summary['wall_time_s']:.0f} s")
    return "\n".join(lines)
