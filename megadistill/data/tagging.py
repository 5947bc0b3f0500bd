"""Token-classification (tagging) data: word-tagged .jsonl, word-level label alignment to sub-word tokens.

A tagged example is a list of words with one tag per word (POS, NER, ...). Models see sub-word
tokens, so labels follow the Hugging Face convention (``run_ner.py``): the first sub-token of a
word carries the word's tag, later sub-tokens and special tokens carry ``-100`` (ignored by the
loss), and a word's prediction is read from its first sub-token. Truncation can cut words off
the end of a long example; :func:`encode_tagged` counts them per example (``lost_words``) and
logs the total, so evaluation can score them as errors instead of silently dropping them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megadistill.data.tasks import LabelSet, json_object, read_lines, right_pad

__all__ = ["IGNORE_INDEX", "MISSING_WORD", "TaggedSplit", "align_word_labels", "collate_tagged", "encode_tagged",
           "read_tagged_jsonl", "word_predictions"]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
MISSING_WORD = -1  # prediction of a word with no sub-token left: never equal to a tag id, so it scores as wrong


@dataclass
class TaggedSplit:
    """Tagged examples of one split.

    Attributes:
        words: per example, its words (non-empty strings; never an empty list).
        tags: per example, ``[W]`` int64 tag ids into ``label_set``, one per word.
        ids: source ids (the ``id`` field; the line number when absent), one per example.
        label_set: the tag names.
        sources: files the examples came from.
    """

    words: list[list[str]]
    tags: list[np.ndarray]
    ids: list[str]
    label_set: LabelSet
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.words)


def _parse_line(raw: str, where: str) -> tuple[list[str], list[str], dict]:
    """The words and tag names of one ``.jsonl`` line, checked for shape (not yet for tag names)."""
    row = json_object(raw, where, ("tokens", "tags"))
    for key in ("tokens", "tags"):
        if not isinstance(row[key], list):
            raise ValueError(f"{where}: field {key!r} must be a list, got {type(row[key]).__name__}")
    words, tags = row["tokens"], row["tags"]
    if not words:
        raise ValueError(f"{where}: field 'tokens' is empty (an example needs at least one word)")
    if len(tags) != len(words):
        raise ValueError(f"{where}: field 'tags' has {len(tags)} tags for {len(words)} tokens (one tag per word)")
    for position, word in enumerate(words):
        # An empty or blank word yields no sub-token at all, so its tag could never be trained or predicted.
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"{where}: field 'tokens' word {position} is {word!r} (words must be non-empty strings)")
    return words, [str(t) for t in tags], row


def read_tagged_jsonl(path: str | Path, label_set: LabelSet | None) -> TaggedSplit:
    """A ``.jsonl`` file: per line an object with ``tokens`` (words), ``tags`` (a tag name per word), optional ``id``.

    ``label_set=None`` takes the sorted tag names found in this file (use it for the training split,
    then pass its label set to the other splits). Blank lines are skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is not a JSON object, lacks ``tokens`` or ``tags``, has an empty
            ``tokens`` list, an empty word, a different number of tags and words, or a tag not in
            ``label_set``; each message starts with ``<file>:<line>`` and names the field. Also a
            file without examples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tagging file {path} not found (one JSON object per line with 'tokens' and 'tags')")
    rows = []
    for line, raw in enumerate(read_lines(path), start=1):
        if raw.strip():
            rows.append((line, *_parse_line(raw, f"{path}:{line}")))
    if not rows:
        raise ValueError(f"{path}: no examples")
    if label_set is None:
        names = sorted({t for _, _, tags, _ in rows for t in tags})
        label_set = LabelSet(tuple(names), f"{path} (tags seen in training)")
    words, tag_ids, ids = [], [], []
    for line, row_words, row_tags, row in rows:
        ids_of_row = [label_set.index(t, f"{path}:{line} (tags, word {i})") for i, t in enumerate(row_tags)]
        words.append(list(row_words))
        tag_ids.append(np.asarray(ids_of_row, dtype=np.int64))
        ids.append(str(row.get("id", line)))
    return TaggedSplit(words, tag_ids, ids, label_set, [str(path)])


def align_word_labels(word_ids: Sequence[int | None], word_tags: Sequence[int], *, all_subwords: bool = False,
                      ignore_index: int = IGNORE_INDEX) -> list[int]:
    """Token labels ``[L]`` from word tags ``[W]`` and the word of each token (``BatchEncoding.word_ids()``).

    A special token (word id ``None``) gets ``ignore_index``. The first sub-token of a word (a token
    whose word id differs from the previous token's, as in Hugging Face ``run_ner.py``) gets the
    word's tag; later sub-tokens get ``ignore_index``, or the same tag when ``all_subwords`` (copied
    as is: a ``B-`` tag is not rewritten to ``I-``).

    Raises:
        ValueError: a word id outside ``[0, len(word_tags))``.
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(ignore_index)
        elif not 0 <= word < len(word_tags):
            raise ValueError(f"word id {word} is outside the {len(word_tags)} word tags "
                             "(word_ids and word_tags come from different examples?)")
        elif word != previous or all_subwords:
            labels.append(int(word_tags[word]))
        else:
            labels.append(ignore_index)
        previous = word
    return labels


def _first_subtokens(word_ids: Sequence[int | None]) -> dict[int, int]:
    """``{word id: position of its first sub-token}`` (the same rule as :func:`align_word_labels`)."""
    first, previous = {}, None
    for position, word in enumerate(word_ids):
        if word is not None and word != previous:
            first.setdefault(word, position)
        previous = word
    return first


def encode_tagged(split: TaggedSplit, tokenizer, max_len_tokens: int) -> list[dict]:
    """Tokenize each example's words with a fast tokenizer and align its tags to the tokens.

    Args:
        split: the tagged examples.
        tokenizer: a Hugging Face *fast* tokenizer (``is_fast``; ``word_ids()`` needs one); its
            special tokens (e.g. ``[CLS] ... [SEP]``) are added.
        max_len_tokens: the most tokens per example, special tokens included; longer examples are
            truncated at the end.

    Returns:
        One dict per example: ``input_ids`` [L] int64, ``labels`` [L] int64 (see
        :func:`align_word_labels`; ``-100`` off first sub-tokens), ``word_ids`` (list of L word
        indices or None), ``num_words`` int (words of the example) and ``lost_words`` int (words
        with no sub-token left, almost always cut off by truncation; they are the last words of
        the example). The total of ``lost_words`` is logged as a warning when not zero; pass
        ``num_words`` to :func:`word_predictions` so lost words score as errors.

    Raises:
        ValueError: a slow tokenizer, or ``max_len_tokens`` leaving no room for a word next to the
            special tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: word_ids() needs a fast tokenizer "
                         "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))")
    specials = tokenizer.num_special_tokens_to_add(pair=False)
    if max_len_tokens <= specials:
        raise ValueError(f"max_len_tokens={max_len_tokens} leaves no room for a word next to the {specials} "
                         "special tokens: raise it")
    examples = [_encode_example(words, tags, tokenizer, max_len_tokens) for words, tags in zip(split.words, split.tags)]
    lost = sum(e["lost_words"] for e in examples)
    if lost:
        logger.warning("truncation at %d tokens cut off %d of %d words in %d of %d examples of %s",
                       max_len_tokens, lost, sum(len(w) for w in split.words),
                       sum(e["lost_words"] > 0 for e in examples), len(examples), ", ".join(split.sources))
    return examples


def _encode_example(words: list[str], tags: np.ndarray, tokenizer, max_len_tokens: int) -> dict:
    encoding = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len_tokens)
    word_ids = encoding.word_ids()
    labels = align_word_labels(word_ids, tags.tolist())
    kept = len({w for w in word_ids if w is not None})
    return {"input_ids": np.asarray(encoding["input_ids"], dtype=np.int64),
            "labels": np.asarray(labels, dtype=np.int64), "word_ids": word_ids,
            "num_words": len(words), "lost_words": len(words) - kept}


def word_predictions(token_logits: torch.Tensor, word_ids: Sequence[int | None],
                     num_words: int | None = None) -> np.ndarray:
    """The predicted tag of each word: the argmax of its first sub-token's logits.

    Args:
        token_logits: ``[L', C]`` float logits of one example, ``L' >= len(word_ids)``; rows past
            ``len(word_ids)`` (padding of a batch) are ignored.
        word_ids: the example's ``word_ids`` (length L).
        num_words: the example's word count (``num_words`` of :func:`encode_tagged`); words with
            no sub-token (cut off by truncation) then get ``MISSING_WORD`` (-1). ``None``: the
            words seen in ``word_ids``.

    Returns:
        ``[W]`` int64 tag ids, W = ``num_words`` or one past the largest word id.

    Raises:
        ValueError: logits that are not 2-D or have fewer rows than ``word_ids``, or a word id
            at or past ``num_words``.
    """
    if token_logits.ndim != 2 or token_logits.shape[0] < len(word_ids):
        raise ValueError(f"token_logits of shape {tuple(token_logits.shape)} do not cover {len(word_ids)} tokens "
                         "(expected [L, num_tags] for one example)")
    first = _first_subtokens(word_ids)
    width = num_words if num_words is not None else max(first, default=-1) + 1
    if first and max(first) >= width:
        raise ValueError(f"word id {max(first)} is past num_words={width}")
    predictions = np.full(width, MISSING_WORD, dtype=np.int64)
    if first:
        words, positions = zip(*sorted(first.items()))
        best = token_logits[list(positions)].argmax(dim=-1)
        predictions[list(words)] = best.cpu().numpy()
    return predictions


def collate_tagged(examples: list[dict], pad_id: int, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Right-pad examples of :func:`encode_tagged` to the longest one.

    Returns:
        ``input_ids`` [B, L] int64 (``pad_id`` at pads), ``attention_mask`` [B, L] int64 (1 on
        tokens, 0 on pads), ``labels`` [B, L] int64 (``ignore_index`` at pads).

    Raises:
        ValueError: no examples, or an example whose ``input_ids`` and ``labels`` differ in length.
    """
    if not examples:
        raise ValueError("collate_tagged needs at least one example")
    for number, example in enumerate(examples):
        if len(example["input_ids"]) != len(example["labels"]):
            raise ValueError(f"example {number}: {len(example['input_ids'])} input_ids "
                             f"but {len(example['labels'])} labels")
    input_ids, attention_mask = right_pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = right_pad([e["labels"] for e in examples], ignore_index)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def load_tagged_split(data_dir: str | Path, languages: Sequence[str], split: str) -> TaggedSplit:
    """``<data_dir>/<lang>/<split>.jsonl`` of every language, concatenated in order.

    Tags come from ``<data_dir>/<lang>/labels.txt`` when present, else from that language's
    ``train.jsonl`` (so dev/test tags outside the training tags are refused).

    Raises:
        FileNotFoundError: a missing language directory or split file.
        ValueError: bad lines (see :func:`read_tagged_jsonl`), or tag sets that differ between languages.
    """
    from megadistill.data.tasks import read_labels

    parts = []
    for lang in languages:
        directory = Path(data_dir) / lang
        labels_file = directory / "labels.txt"
        label_set = read_labels(labels_file) if labels_file.is_file() else None
        if label_set is None and split != "train":
            label_set = read_tagged_jsonl(directory / "train.jsonl", None).label_set
        parts.append(read_tagged_jsonl(directory / f"{split}.jsonl", label_set))
    for part in parts[1:]:
        if part.label_set.names != parts[0].label_set.names:
            raise ValueError(f"tag sets differ: {parts[0].label_set.source} has {list(parts[0].label_set.names)}, "
                             f"{part.label_set.source} has {list(part.label_set.names)}")
    return TaggedSplit([w for p in parts for w in p.words], [t for p in parts for t in p.tags],
                       [i for p in parts for i in p.ids], parts[0].label_set, [s for p in parts for s in p.sources])


class TaggedBatches:
    """Token-classification micro-batches for the task stage: student (and teacher) tokens with word-aligned tags.

    Args:
        student: :func:`encode_tagged` examples in the student's tokenization.
        student_pad_id: its pad id.
        teacher: the same examples in the teacher's tokenization, or None (no online teacher).
        teacher_pad_id: the teacher's pad id.
        world_size: data-parallel ranks (for ``samples``).

    ``self(indices)`` (``-1`` = padding slot, all its labels ignored) returns :func:`collate_tagged`'s
    ``input_ids``/``attention_mask``/``labels`` ``[B, L]``, ``example_ids``, ``samples`` and with a
    teacher ``teacher_input_ids``/``teacher_attention_mask``/``teacher_labels`` ``[B, Lt]``: the
    labelled positions of both are the first sub-tokens of the same words, in the same order.
    """

    def __init__(self, student: list[dict], student_pad_id: int, teacher: list[dict] | None = None,
                 teacher_pad_id: int = 0, world_size: int = 1):
        self.student, self.student_pad_id = student, student_pad_id
        self.teacher, self.teacher_pad_id, self.world_size = teacher, teacher_pad_id, world_size

    @staticmethod
    def _rows(examples: list[dict], indices: list[int]) -> list[dict]:
        rows = []
        for i in indices:
            example = examples[max(i, 0)]
            rows.append(example if i >= 0 else {**example, "labels": np.full_like(example["labels"], IGNORE_INDEX)})
        return rows

    def __call__(self, indices: list[int]) -> dict:
        batch = collate_tagged(self._rows(self.student, indices), self.student_pad_id)
        batch.update(example_ids=list(indices), samples=self.world_size * sum(i >= 0 for i in indices))
        if self.teacher is not None:
            teacher = collate_tagged(self._rows(self.teacher, indices), self.teacher_pad_id)
            batch.update({f"teacher_{k}": v for k, v in teacher.items()})
        return batch
