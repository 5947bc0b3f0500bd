"""Dynamic masked-language-model batches, with optional whole-word masking.

Masking follows BERT (Devlin et al., 2019, §3.1): a fraction ``mask_prob`` (15%) of the tokens
is selected for prediction; a selected token is replaced by ``[MASK]`` with probability 0.8, by a
random token with probability 0.1 and left unchanged otherwise. Masks are drawn afresh each time
a batch is built (RoBERTa's dynamic masking, Liu et al., 2019), from a ``torch.Generator`` the
caller owns, so a batch is reproducible from the generator state.

Whole-word masking (Google's BERT release of 2019-05-31; Cui et al., 2021, "Pre-Training with
Whole Word Masking for Chinese BERT") selects words rather than tokens: all sub-tokens of a
selected word are predicted. A word starts at a piece beginning with the SentencePiece ``▁``
marker, or, for WordPiece, at a piece not beginning with ``##``; a word also starts at every
special token, after every unmaskable token and at every document boundary, so a word never
spans two documents. Each selected token then gets its own 80/10/10 draw, as in Google's
``create_pretraining_data.py``.

Selection rule (the same for tokens and words; a token is a one-token word): per row, the
target is ``n = round(mask_prob * maskable)`` tokens (at least 1 when the row has a maskable
token and ``mask_prob > 0``; ``torch.round`` rounds halves to even), where maskable tokens are
the non-special tokens inside the attention mask. Words are visited in a uniformly random order
and each is selected while fewer than ``n`` tokens are covered. Token-level masking therefore
selects exactly ``n`` tokens per row; whole-word masking selects between ``n`` and
``n + longest word - 1``. Unlike BERT's per-token Bernoulli draws, the count per row does not
vary, which keeps the loss's token count steady across batches.

Special tokens (``tokenizer.all_special_ids``) are never selected and never used as random
replacements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import models as tokenizer_models

IGNORE_INDEX = -100
SENTENCEPIECE_MARKER = "▁"
WORDPIECE_PREFIX = "##"


@dataclass
class MaskingConfig:
    """Masking probabilities (BERT's defaults).

    Attributes:
        mask_prob: fraction of maskable tokens selected for prediction, in ``[0, 1]``.
        replace_mask: probability that a selected token becomes ``[MASK]``.
        replace_random: probability that a selected token becomes a random non-special token;
            the rest, ``1 - replace_mask - replace_random``, stay unchanged.
        whole_word: select whole words instead of single tokens.
    """

    mask_prob: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1
    whole_word: bool = False

    def validate(self) -> MaskingConfig:
        """Check the probabilities; return ``self``.

        Raises:
            ValueError: a probability outside ``[0, 1]`` (naming the field), or
                ``replace_mask + replace_random > 1``.
        """
        for name in ("mask_prob", "replace_mask", "replace_random"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MaskingConfig.{name} must lie in [0, 1], got {value}")
        if self.replace_mask + self.replace_random > 1.0 + 1e-9:
            raise ValueError(
                "MaskingConfig.replace_mask + MaskingConfig.replace_random must be at most 1, "
                f"got {self.replace_mask} + {self.replace_random}"
            )
        return self


def special_ids_table(tokenizer) -> torch.Tensor:
    """``BoolTensor[V]``, ``V = len(tokenizer)``: True at ``tokenizer.all_special_ids``."""
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    ids = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < len(table)]
    table[ids] = True
    return table


def word_start_table(tokenizer) -> torch.Tensor:
    """``BoolTensor[V]``, ``V = len(tokenizer)``: True for ids whose piece begins a word.

    WordPiece tokenizers (a fast tokenizer with a WordPiece model, or a vocabulary with ``##``
    pieces and no ``▁`` pieces): pieces not starting with the continuing-subword prefix (``##``)
    begin words. Otherwise SentencePiece-style: pieces starting with ``▁`` begin words (byte
    fallback tokens ``<0x..>`` continue the word they occur in). Special tokens and ids without
    a piece are True, so they never join a neighbour's word.

    Raises:
        ValueError: the vocabulary has neither ``▁`` pieces nor a WordPiece prefix (e.g. GPT-2
            byte-level BPE), so word boundaries cannot be read off the pieces.
    """
    vocab = tokenizer.get_vocab()
    is_start = _word_start_rule(tokenizer, vocab)
    table = torch.ones(len(tokenizer), dtype=torch.bool)
    for piece, index in vocab.items():
        if 0 <= index < len(table):
            table[index] = is_start(piece)
    return table | special_ids_table(tokenizer)


def _word_start_rule(tokenizer, vocab: dict[str, int]):
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if isinstance(model, tokenizer_models.WordPiece):
        prefix = model.continuing_subword_prefix or WORDPIECE_PREFIX
        return lambda piece: not piece.startswith(prefix)
    if any(piece.startswith(SENTENCEPIECE_MARKER) for piece in vocab):
        return lambda piece: piece.startswith(SENTENCEPIECE_MARKER)
    if any(piece.startswith(WORDPIECE_PREFIX) for piece in vocab):
        return lambda piece: not piece.startswith(WORDPIECE_PREFIX)
    raise ValueError(
        "cannot find word boundaries for whole-word masking: the vocabulary has no pieces starting "
        f"with {SENTENCEPIECE_MARKER!r} (SentencePiece) or {WORDPIECE_PREFIX!r} (WordPiece)"
    )


def mask_token_id(tokenizer) -> int:
    """The tokenizer's ``mask_token_id``.

    Raises:
        ValueError: the tokenizer has no mask token (``mask_token`` unset): set one, e.g.
            ``tokenizer.add_special_tokens({"mask_token": "<mask>"})`` (and resize the embeddings).
    """
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if getattr(tokenizer, "mask_token", None) is None or mask_id is None:
        raise ValueError(
            "the tokenizer has no mask token (mask_token is None): masked-LM batches need one; "
            "add it with tokenizer.add_special_tokens({'mask_token': '<mask>'})"
        )
    return int(mask_id)


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special: torch.Tensor,
    config: MaskingConfig,
    generator: torch.Generator,
    word_start: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    replacement_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select and corrupt tokens for masked-LM training (see the module docstring for the rule).

    Args:
        input_ids: ``LongTensor[B, L]`` token ids in ``[0, vocab_size)`` (CPU, like ``generator``).
        mask_id: id of the mask token.
        vocab_size: ``V``, the number of token ids.
        special: ``BoolTensor[V]`` from :func:`special_ids_table`; these ids are never selected.
        config: the probabilities; ``config.whole_word`` needs ``word_start``.
        generator: source of all randomness; the same state gives the same result.
        word_start: ``BoolTensor[V]`` from :func:`word_start_table` (used with ``whole_word``).
        document_ids: ``LongTensor[B, L]``; a new word starts wherever the value changes.
        attention_mask: ``[B, L]`` bool or 0/1; positions where it is 0 are never selected.
        replacement_ids: ``LongTensor[K]`` ids random replacements are drawn from; default all
            non-special ids in ``[0, V)``.

    Returns:
        ``(masked_input_ids, labels)``: ``LongTensor[B, L]`` with selected positions replaced
        (80% ``mask_id``, 10% a random id, 10% unchanged by default), and ``LongTensor[B, L]``
        holding the original id at selected positions and ``-100`` elsewhere.

    Raises:
        ValueError: invalid config, shapes that do not match, ids outside ``[0, V)``,
            ``whole_word`` without ``word_start``, or no ids to draw random replacements from.
    """
    config.validate()
    _check_inputs(input_ids, vocab_size, special, word_start, config.whole_word, document_ids, attention_mask)
    maskable = ~special[input_ids]
    if attention_mask is not None:
        maskable &= attention_mask.bool()
    starts = _word_starts(input_ids, maskable, word_start if config.whole_word else None, document_ids)
    selected = _select_words(starts, maskable, config.mask_prob, generator)
    if replacement_ids is None:
        replacement_ids = torch.nonzero(~special, as_tuple=True)[0]
    masked = _corrupt(input_ids, selected, mask_id, replacement_ids, config, generator)
    return masked, input_ids.masked_fill(~selected, IGNORE_INDEX)


def _check_inputs(input_ids, vocab_size, special, word_start, whole_word, document_ids, attention_mask) -> None:
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
        raise ValueError(f"input_ids must be an int64 [B, L] tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if special.shape != (vocab_size,):
        raise ValueError(f"special must be a BoolTensor[{vocab_size}], got shape {tuple(special.shape)}")
    if whole_word and word_start is None:
        raise ValueError("whole-word masking needs word_start (build it with word_start_table(tokenizer))")
    if whole_word and word_start.shape != (vocab_size,):
        raise ValueError(f"word_start must be a BoolTensor[{vocab_size}], got shape {tuple(word_start.shape)}")
    for name, extra in (("document_ids", document_ids), ("attention_mask", attention_mask)):
        if extra is not None and extra.shape != input_ids.shape:
            raise ValueError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(extra.shape)}"
            )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}")


def _word_starts(input_ids, maskable, word_start, document_ids) -> torch.Tensor:
    """``BoolTensor[B, L]``: True where a new word (selection unit) begins."""
    if word_start is None:
        return torch.ones_like(maskable)
    starts = word_start[input_ids] | ~maskable
    starts[:, 1:] |= ~maskable[:, :-1]
    if document_ids is not None:
        starts[:, 1:] |= document_ids[:, 1:] != document_ids[:, :-1]
    starts[:, 0] = True
    return starts


def _select_words(starts, maskable, mask_prob: float, generator) -> torch.Tensor:
    """``BoolTensor[B, L]``: maskable tokens of words picked in random order until the row's target is met."""
    batch, length = maskable.shape
    word_index = starts.long().cumsum(1) - 1  # [B, L], word of each token, in [0, L)
    word_sizes = torch.zeros(batch, length, dtype=torch.long).scatter_add_(1, word_index, maskable.long())
    available = maskable.sum(1)
    target = torch.round(available.double() * mask_prob).long()
    if mask_prob > 0:
        target = torch.maximum(target, (available > 0).long())
    keys = torch.rand(batch, length, generator=generator)
    keys = keys.masked_fill(word_sizes == 0, 2.0)  # empty words sort last and are never picked
    order = torch.argsort(keys, dim=1, stable=True)
    sizes = word_sizes.gather(1, order)
    covered_before = sizes.cumsum(1) - sizes
    picked = (sizes > 0) & (covered_before < target[:, None])
    picked_words = torch.zeros_like(picked).scatter_(1, order, picked)
    return picked_words.gather(1, word_index) & maskable


def _corrupt(input_ids, selected, mask_id: int, replacement_ids, config: MaskingConfig, generator) -> torch.Tensor:
    """Replace selected positions: ``mask_id`` / random id / unchanged with the config's probabilities."""
    if replacement_ids.numel() == 0:
        raise ValueError("no ids to draw random replacements from (every id is special or dropped)")
    draw = torch.rand(input_ids.shape, generator=generator)
    picks = torch.randint(0, replacement_ids.numel(), input_ids.shape, generator=generator)
    to_mask = selected & (draw < config.replace_mask)
    to_random = selected & ~to_mask & (draw < config.replace_mask + config.replace_random)
    masked = input_ids.masked_fill(to_mask, mask_id)
    return torch.where(to_random, replacement_ids.to(input_ids.device)[picks], masked)


@dataclass
class MlmCollator:
    """Build masked-LM distillation batches from windows of teacher ids.

    Made once per tokenizer with :meth:`from_tokenizer`; each call draws a fresh mask from the
    given generator. In a multi-worker ``DataLoader`` every worker holds a copy of a generator
    passed through ``functools.partial``: seed one per worker (``worker_init_fn``) or mask in
    the main process, or the workers repeat each other's masks.

    Attributes:
        mask_id: teacher id of the mask token.
        vocab_size: ``Vt = len(tokenizer)``.
        special: ``BoolTensor[Vt]`` from :func:`special_ids_table`.
        word_start: ``BoolTensor[Vt]`` from :func:`word_start_table`, or ``None`` (token-level only).
        config: masking probabilities (validated on construction).
        vocab_map: a :class:`megadistill.models.vocab.VocabMap` for a trimmed student, or ``None``.
            Random replacements are then drawn from kept non-special ids only, so teacher and
            student see the same replacement token (unless ``replace_from_all``).
        replace_from_all: draw random replacements from every non-special teacher id even with a
            ``vocab_map`` (a replacement the student lacks reaches it as its UNK). An offline masked-LM
            teacher cache is written without a vocab map, so a trimmed student needs this to replay
            exactly the masked inputs the cached teacher saw.

    Raises:
        ValueError: invalid config, ``whole_word`` without ``word_start``, or a vocab map that
            drops the mask token or was built for another vocabulary size.
    """

    mask_id: int
    vocab_size: int
    special: torch.Tensor
    word_start: torch.Tensor | None = None
    config: MaskingConfig = field(default_factory=MaskingConfig)
    vocab_map: object | None = None
    replace_from_all: bool = False

    def __post_init__(self) -> None:
        self.config.validate()
        if self.config.whole_word and self.word_start is None:
            raise ValueError("whole-word masking needs word_start (build it with word_start_table(tokenizer))")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id {self.mask_id} must lie in [0, {self.vocab_size})")
        allowed = ~self.special
        if self.vocab_map is not None:
            self._check_vocab_map()
            if not self.replace_from_all:
                allowed = allowed & torch.from_numpy(self.vocab_map.teacher_to_student >= 0)
        self.replacement_ids = torch.nonzero(allowed, as_tuple=True)[0]

    def _check_vocab_map(self) -> None:
        if self.vocab_map.teacher_vocab_size != self.vocab_size:
            raise ValueError(
                f"vocab map built for {self.vocab_map.teacher_vocab_size} teacher ids, tokenizer has {self.vocab_size}"
            )
        if self.vocab_map.teacher_to_student[self.mask_id] < 0:
            raise ValueError(f"the vocab map drops the mask token (teacher id {self.mask_id}): keep it via always_keep")

    @classmethod
    def from_tokenizer(cls, tokenizer, config: MaskingConfig | None = None, vocab_map=None,
                       replace_from_all: bool = False) -> MlmCollator:
        """Tables from the (teacher) tokenizer; ``word_start`` is built only for whole-word masking.

        Raises:
            ValueError: the tokenizer has no mask token, no readable word boundaries (whole-word
                masking only), or as the class.
        """
        config = (config or MaskingConfig()).validate()
        word_start = word_start_table(tokenizer) if config.whole_word else None
        special = special_ids_table(tokenizer)
        return cls(mask_token_id(tokenizer), len(tokenizer), special, word_start, config, vocab_map, replace_from_all)

    def __call__(
        self,
        windows: Sequence[np.ndarray],
        generator: torch.Generator,
        document_ids: Sequence[np.ndarray] | torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Stack and mask a batch.

        Args:
            windows: B integer arrays of shape [L] holding teacher token ids.
            generator: CPU ``torch.Generator``; advanced by the call.
            document_ids: ``[B, L]`` document index of every token (arrays or a tensor), so
                whole words never cross a document boundary; ``None``: no boundaries known.
            attention_mask: ``[B, L]``; positions where it is 0 are never selected.

        Returns:
            ``teacher_input_ids`` [B, L] int64: masked teacher ids (the teacher sees the same
            corrupted positions as the student); ``input_ids`` [B, L] int64: the same in student
            ids (``vocab_map.remap``; equal to the teacher ids without a map); ``labels``
            [B, L] int64: student id of the original token at selected positions, ``-100``
            elsewhere and where the original token was dropped by the vocab map; ``mlm_mask``
            [B, L] bool: the selected positions; ``dropped_tokens`` scalar int64: selected
            positions whose label was lost to vocabulary trimming.

        Raises:
            ValueError: windows of different lengths, or as :func:`mask_tokens`.
        """
        tokens = _stack(windows, "windows")
        documents = None if document_ids is None else _stack(document_ids, "document_ids")
        masked, labels = mask_tokens(
            tokens, mask_id=self.mask_id, vocab_size=self.vocab_size, special=self.special, config=self.config,
            generator=generator, word_start=self.word_start, document_ids=documents,
            attention_mask=attention_mask, replacement_ids=self.replacement_ids,
        )
        return _student_batch(masked, labels, self.vocab_map)


def _stack(rows, name: str) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        return rows.long()
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"{name} must hold rows of one length, got lengths {sorted(lengths)}")
    return torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r in rows]))


def _student_batch(masked: torch.Tensor, labels: torch.Tensor, vocab_map) -> dict[str, torch.Tensor]:
    selected = labels != IGNORE_INDEX
    if vocab_map is None:
        return {"teacher_input_ids": masked, "input_ids": masked.clone(), "labels": labels,
                "mlm_mask": selected, "dropped_tokens": torch.tensor(0)}
    student_inputs, _ = vocab_map.remap(masked)
    student_labels, dropped = vocab_map.remap(labels.masked_fill(~selected, 0))
    dropped &= selected
    return {
        "teacher_input_ids": masked,
        "input_ids": student_inputs,
        "labels": student_labels.masked_fill(dropped | ~selected, IGNORE_INDEX),
        "mlm_mask": selected,
        "dropped_tokens": dropped.sum(),
    }


def collate_mlm(
    windows: Sequence[np.ndarray],
    *,
    tokenizer,
    config: MaskingConfig | None = None,
    generator: torch.Generator,
    vocab_map=None,
    document_ids: Sequence[np.ndarray] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One-off form of ``MlmCollator.from_tokenizer(tokenizer, config, vocab_map)(windows, generator, document_ids)``.

    Rebuilds the tables on every call: in a training loop build an :class:`MlmCollator` once.
    """
    return MlmCollator.from_tokenizer(tokenizer, config, vocab_map)(windows, generator, document_ids)
