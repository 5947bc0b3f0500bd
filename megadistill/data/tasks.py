"""Labelled task data: SIB-200-style ``.tsv``, ``.jsonl`` and Hugging Face ``datasets`` splits, tokenized per model.

A task split is a list of (text, label id) examples with their source ids and languages. Labels
come from ``labels.txt`` (one name per line; SIB-200 ships one per language directory) or, for
files without one, from the training split; a label outside the label set, an empty text, a
missing column, or a label set that differs between languages or splits is a ``ValueError``
naming the file, line and field. Each model reads the same examples through its own tokenizer
(:func:`encode_texts`), so a teacher and a student with different vocabularies see the same
sentences, and micro-batches (:class:`TaskBatches`) carry both.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["EncodedTexts", "LabelSet", "TaskBatches", "TaskSplit", "encode_texts", "load_split", "read_jsonl",
           "epoch_order", "json_object", "read_labels", "right_pad", "read_tsv", "split_from_hf", "task_eval_indices", "task_train_indices"]

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class LabelSet:
    """The ordered label names of a task; a label's id is its position.

    Attributes:
        names: label names in id order (``labels.txt`` order for SIB-200).
        source: where the names came from (a file path, or ``"<file> (labels seen in training)"``).
    """

    names: tuple[str, ...]
    source: str = ""

    def __post_init__(self):
        if not self.names:
            raise ValueError(f"{self.source or 'label set'}: no labels")
        duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
        if duplicates:
            raise ValueError(f"{self.source or 'label set'}: duplicate labels {duplicates}")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str, where: str) -> int:
        """The id of label ``name``.

        Raises:
            ValueError: ``name`` is not a label; the message starts with ``where`` (file:line, field).
        """
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"{where}: label {name!r} is not in {self.source or 'the label set'} "
                             f"({', '.join(self.names)})") from None

    @property
    def id2label(self) -> dict[int, str]:
        """``{id: name}`` as Hugging Face configs store it."""
        return dict(enumerate(self.names))


def read_labels(path: str | Path) -> LabelSet:
    """A ``labels.txt`` file: one label name per non-empty line, in id order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is empty or repeats a label.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} not found (one label name per line)")
    names = tuple(line.strip() for line in read_lines(path) if line.strip())
    return LabelSet(names, str(path))


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split on ``\n`` only (``\r`` stripped).

    ``str.splitlines`` would also split inside a JSON string at U+2028, U+0085 or ``\x1c``.

    Raises:
        ValueError: the file is not UTF-8 (naming the file, line and byte).
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


@dataclass
class TaskSplit:
    """Examples of one split (possibly several languages concatenated).

    Attributes:
        texts: the example texts (NFC as given; never empty).
        labels: ``[N]`` int64 label ids into ``label_set``.
        ids: source ids (SIB-200 ``index_id``; line numbers for ``.jsonl``), one per example.
        languages: language code of each example.
        label_set: the task's labels.
        sources: files (or datasets) the examples came from.
    """

    texts: list[str]
    labels: np.ndarray
    ids: list[str]
    languages: list[str]
    label_set: LabelSet
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """SHA-256 (hex, 16 chars) of the texts and labels in order: what a logit cache is checked against."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels.tolist()):
            digest.update(f"{label}\t{text}\n".encode("utf-8"))
        return digest.hexdigest()[:16]

    def select_language(self, language: str) -> TaskSplit:
        """The examples of one language (same label set)."""
        keep = [i for i, lang in enumerate(self.languages) if lang == language]
        return TaskSplit([self.texts[i] for i in keep], self.labels[keep], [self.ids[i] for i in keep],
                         [language] * len(keep), self.label_set, self.sources)


def _example(text, label, label_set: LabelSet, where: str) -> tuple[str, int]:
    """``(text, label id)`` of one example; ``where`` (``file:line``) starts every error."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: field 'text' is empty" if text is None or isinstance(text, str)
                         else f"{where}: field 'text' must be a string, got {type(text).__name__}")
    if "\x00" in text:
        raise ValueError(f"{where}: field 'text' contains a NUL byte")
    return text, label_set.index(label_name(label, where), where)


def label_name(label, where: str) -> str:
    """A label given as a string or an integer, as the name ``labels.txt`` would hold.

    Raises:
        ValueError: empty, or not a string/integer (a list or object), naming ``where``.
    """
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise ValueError(f"{where}: field 'label' must be a label name (string or integer), got {type(label).__name__}")
    if str(label).strip() == "":
        raise ValueError(f"{where}: field 'label' is empty")
    return str(label).strip()


def read_tsv(path: str | Path, label_set: LabelSet, language: str = "") -> TaskSplit:
    """A SIB-200 ``.tsv``: header ``index_id<TAB>category<TAB>text``, one example per row.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing ``index_id``/``category``/``text`` column, an empty text, or a category
            not in ``label_set`` (naming the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    with io.StringIO("\n".join(read_lines(path))) as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = [c for c in ("index_id", "category", "text") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {missing} (header must be index_id, category, text)")
        texts, labels, ids = [], [], []
        for line, row in enumerate(reader, start=2):
            text, label = _example(row["text"], row["category"], label_set, f"{path}:{line} (category)")
            texts.append(text)
            labels.append(label)
            ids.append(row["index_id"])
    return _split(texts, labels, ids, language, label_set, str(path))


def json_object(raw: str, where: str, fields: Sequence[str]) -> dict:
    """One ``.jsonl`` line as a dict that has every name in ``fields``.

    Raises:
        ValueError: not JSON, not an object, or a missing field; the message starts with ``where``.
    """
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err.msg})") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to parse") from None
    except ValueError as err:  # e.g. an integer over Python's 4300-digit limit
        raise ValueError(f"{where}: unreadable JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {' and '.join(map(repr, fields))}")
    for key in fields:
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r}")
    return row


def read_jsonl(path: str | Path, label_set: LabelSet | None, language: str = "") -> TaskSplit:
    """A ``.jsonl`` file: one object per line with ``text`` and ``label`` (a label name), optional ``id``, ``language``.

    ``label_set=None`` takes the sorted label names found in this file (use it for the training split,
    then pass its label set to the other splits).

    Raises:
        FileNotFoundError / ValueError: no such file; a line that is not a JSON object, lacks ``text``
            or ``label``, has an empty text or an unknown label (naming the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} not found")
    rows = []
    for line, raw in enumerate(read_lines(path), start=1):
        if not raw.strip():
            continue
        rows.append((line, json_object(raw, f"{path}:{line}", ("text", "label"))))
    if label_set is None:
        seen = {label_name(r["label"], f"{path}:{line}") for line, r in rows}
        label_set = LabelSet(tuple(sorted(seen)), f"{path} (labels seen in training)")
    texts, labels, ids, langs = [], [], [], []
    for line, row in rows:
        text, label = _example(row["text"], row["label"], label_set, f"{path}:{line} (label)")
        texts.append(text)
        labels.append(label)
        ids.append(str(row.get("id", line)))
        langs.append(str(row.get("language", language)))
    split = _split(texts, labels, ids, language, label_set, str(path))
    split.languages = langs
    return split


def split_from_hf(dataset, label_set: LabelSet | None, source: str, language: str = "",
                  text_field: str = "text", label_field: str = "label") -> TaskSplit:
    """A Hugging Face ``datasets.Dataset`` split with a text column and a label column.

    The label column may be a ``ClassLabel`` (its names become the label set when ``label_set`` is
    None) or strings.

    Raises:
        ValueError: a missing column, an empty text or an unknown label (naming ``source`` and the row).
    """
    for name in (text_field, label_field):
        if name not in dataset.column_names:
            raise ValueError(f"{source}: missing column {name!r} (columns: {', '.join(dataset.column_names)})")
    feature = dataset.features[label_field]
    class_names = getattr(feature, "names", None)
    if label_set is None:
        names = class_names or sorted({str(v) for v in dataset[label_field]})
        label_set = LabelSet(tuple(names), f"{source} ({label_field} column)")
    texts, labels = [], []
    for row, (text, value) in enumerate(zip(dataset[text_field], dataset[label_field])):
        name = class_names[value] if class_names is not None else str(value)
        text, label = _example(text, name, label_set, f"{source} row {row} ({label_field})")
        texts.append(text)
        labels.append(label)
    return _split(texts, labels, [str(i) for i in range(len(texts))], language, label_set, source)


def _split(texts, labels, ids, language, label_set, source) -> TaskSplit:
    if not texts:
        raise ValueError(f"{source}: no examples")
    return TaskSplit(texts, np.asarray(labels, dtype=np.int64), ids, [language] * len(texts), label_set, [source])


def load_split(data_dir: str | Path, languages: Sequence[str], split: str) -> TaskSplit:
    """One split of a task directory, all ``languages`` concatenated in the order given.

    Layouts: ``<data_dir>/<lang>/{train,dev,test}.tsv`` with ``<data_dir>/<lang>/labels.txt`` (SIB-200),
    the same with ``.jsonl`` files (label set from ``labels.txt`` when present, else from the
    training split), or a ``datasets`` ``DatasetDict`` saved with ``save_to_disk`` (``<data_dir>`` or
    ``<data_dir>/<lang>``; split ``dev`` also matches ``validation``).

    Raises:
        FileNotFoundError: a language directory or split file is missing (naming it).
        ValueError: bad rows (see :func:`read_tsv`), no languages, or languages whose label sets differ.
    """
    if not languages:
        raise ValueError("task.languages is empty: name at least one language directory (e.g. hin_Deva)")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {', '.join(SPLITS)}")
    parts = [_load_language(Path(data_dir), lang, split) for lang in languages]
    first = parts[0]
    for part in parts[1:]:
        if part.label_set.names != first.label_set.names:
            raise ValueError(f"label sets differ: {first.label_set.source} has {list(first.label_set.names)}, "
                             f"{part.label_set.source} has {list(part.label_set.names)}")
    return TaskSplit([t for p in parts for t in p.texts], np.concatenate([p.labels for p in parts]),
                     [i for p in parts for i in p.ids], [g for p in parts for g in p.languages], first.label_set,
                     [s for p in parts for s in p.sources])


def _load_language(root: Path, language: str, split: str) -> TaskSplit:
    directory = root / language
    for candidate in (directory, root):
        if (candidate / "dataset_dict.json").is_file():
            return _load_hf(candidate, language, split)
    if not directory.is_dir():
        raise FileNotFoundError(f"task directory {directory} not found (expected <data_dir>/<language>/{split}.tsv)")
    labels_file = directory / "labels.txt"
    label_set = read_labels(labels_file) if labels_file.is_file() else None
    tsv, jsonl = directory / f"{split}.tsv", directory / f"{split}.jsonl"
    if tsv.is_file():
        if label_set is None:
            raise FileNotFoundError(f"{labels_file} not found: SIB-200 .tsv splits need the label list beside them")
        return read_tsv(tsv, label_set, language)
    if jsonl.is_file():
        if label_set is None and split != "train":
            label_set = read_jsonl(directory / "train.jsonl", None, language).label_set
        return read_jsonl(jsonl, label_set, language)
    raise FileNotFoundError(f"no {split}.tsv or {split}.jsonl in {directory}")


def _load_hf(directory: Path, language: str, split: str) -> TaskSplit:
    from datasets import load_from_disk

    dataset = load_from_disk(str(directory))
    name = split if split in dataset else ("validation" if split == "dev" and "validation" in dataset else None)
    if name is None:
        raise FileNotFoundError(f"{directory}: no split {split!r} (has {', '.join(dataset)})")
    train_labels = split_from_hf(dataset["train"], None, f"{directory}[train]").label_set if "train" in dataset else None
    return split_from_hf(dataset[name], train_labels, f"{directory}[{name}]", language)


@dataclass
class EncodedTexts:
    """Texts tokenized by one model's tokenizer.

    Attributes:
        ids: one int64 array of token ids per text (special tokens included, at most ``max_len_tokens``).
        truncated: texts cut at ``max_len_tokens``.
        unk_tokens: tokens that became the tokenizer's unknown id (0 when it has none).
        tokens: total tokens.
    """

    ids: list[np.ndarray]
    truncated: int
    unk_tokens: int
    tokens: int

    @property
    def unk_rate(self) -> float:
        """Fraction of tokens that are the unknown id."""
        return self.unk_tokens / max(self.tokens, 1)

    @classmethod
    def from_ids(cls, ids: list[np.ndarray], truncated: int, tokenizer) -> EncodedTexts:
        """Count the tokens and the unknown ids of ``ids`` (``tokenizer.unk_token_id``; none: 0)."""
        unk = tokenizer.unk_token_id
        unk_tokens = 0 if unk is None else int(sum(int((row == unk).sum()) for row in ids))
        return cls(ids, truncated, unk_tokens, int(sum(len(row) for row in ids)))


def encode_texts(texts: Sequence[str], tokenizer, max_len_tokens: int, batch_size: int = 512) -> EncodedTexts:
    """Tokenize ``texts`` with ``tokenizer`` (its special tokens added), truncated to ``max_len_tokens``.

    Text is encoded as text: a literal ``<eos>`` or ``</s>`` in a sentence stays characters
    (``split_special_tokens=True``), never a control id in the middle of an example.

    Raises:
        ValueError: ``max_len_tokens`` < 2.
    """
    if max_len_tokens < 2:
        raise ValueError(f"task.max_len_tokens must be >= 2, got {max_len_tokens}")
    ids, truncated = [], 0
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        full = tokenizer(chunk, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        for row in full:
            truncated += len(row) > max_len_tokens
            ids.append(np.asarray(_truncate(row, max_len_tokens, tokenizer), dtype=np.int64))
    return EncodedTexts.from_ids(ids, truncated, tokenizer)


def _truncate(row: list[int], max_len: int, tokenizer) -> list[int]:
    """Cut ``row`` to ``max_len`` ids, keeping a trailing EOS/SEP the tokenizer appended (what pooling may read)."""
    if len(row) <= max_len:
        return row
    last = row[-1]
    if last in (tokenizer.sep_token_id, tokenizer.eos_token_id) and last is not None:
        return row[:max_len - 1] + [last]
    return row[:max_len]


def epoch_order(num_examples: int, seed: int, epoch: int, lengths: Sequence[int] | None = None,
                global_batch: int = 1, group_batches: int = 50) -> np.ndarray:
    """The order of the examples in one epoch: a permutation seeded by ``(seed, epoch)``.

    With ``lengths`` (tokens per example) the permutation is cut into groups of ``group_batches``
    global batches, each group sorted longest first and cut into global batches, and the batches
    shuffled (seeded by ``(seed, epoch, 1)``): batches hold examples of similar length, so right
    padding wastes little compute (HF ``Trainer``'s ``group_by_length`` does the same), and the
    order still depends only on the seed.
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    if lengths is None:
        return order
    lengths = np.asarray(lengths)
    size = group_batches * global_batch
    groups = [order[i:i + size] for i in range(0, num_examples, size)]
    order = np.concatenate([g[np.argsort(-lengths[g], kind="stable")] for g in groups])
    batches = [order[i:i + global_batch] for i in range(0, num_examples, global_batch)]
    shuffle = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return np.concatenate([batches[i] for i in shuffle])


def task_train_indices(consumed_samples: int, rank: int, world_size: int, micro_batch_size: int,
                       num_examples: int, seed: int, lengths: Sequence[int] | None = None) -> Iterator[list[int]]:
    """This rank's example indices of each training micro-batch from ``consumed_samples`` on (endless epochs).

    Global sample ``p`` is example ``order_e[p % N]`` of epoch ``e = p // N``, with ``order_e`` from
    :func:`epoch_order` (grouped by ``lengths`` when given); each micro-step takes ``world_size *
    micro_batch_size`` consecutive samples and rank ``r`` the ``r``-th block (as
    :mod:`megadistill.data.sampler`). So the order depends only on the seed and the consumed-sample
    count: a resumed run, and two runs that differ only in their loss (``alpha``), read exactly the
    same examples.
    """
    if num_examples < 1:
        raise ValueError("no training examples")
    orders: dict[int, np.ndarray] = {}
    global_batch = world_size * micro_batch_size

    def example(position: int) -> int:
        epoch = position // num_examples
        if epoch not in orders:
            if len(orders) > 1:
                orders.pop(min(orders))  # a micro-batch spans at most two epochs
            orders[epoch] = epoch_order(num_examples, seed, epoch, lengths, global_batch)
        return int(orders[epoch][position % num_examples])

    while True:
        start = consumed_samples + rank * micro_batch_size
        yield [example(p) for p in range(start, start + micro_batch_size)]
        consumed_samples += global_batch


def task_eval_indices(num_examples: int, rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """Held-out micro-batches of this rank covering every example exactly once; ``-1`` marks padding.

    Every rank runs the same number of micro-batches (ZeRO-3 gathers are collective); slots past
    the last example are ``-1`` and count for nothing (their label is ignored).
    """
    per_step = world_size * micro_batch_size
    batches = math.ceil(num_examples / per_step)
    out = []
    for b in range(batches):
        start = b * per_step + rank * micro_batch_size
        out.append([i if i < num_examples else -1 for i in range(start, start + micro_batch_size)])
    return out


def right_pad(rows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad int64 rows to ``[B, L_max]`` int64; returns ``(padded, attention_mask)`` (mask 1 on real entries)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.as_tensor(np.asarray(row), dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


class TaskBatches:
    """Sequence-classification micro-batches: student inputs, teacher inputs (when given) and labels.

    Args:
        student: the student's :class:`EncodedTexts` of the split.
        labels: ``[N]`` int64 label ids.
        student_pad_id: the student tokenizer's pad id.
        teacher: the teacher's :class:`EncodedTexts` of the same texts, or None (no online teacher).
        teacher_pad_id: the teacher tokenizer's pad id.
        world_size: data-parallel ranks (for the ``samples`` count).

    ``self(indices)`` (example indices; ``-1`` = a padding slot) returns ``input_ids``/``attention_mask``
    ``[B, Ls]`` int64, ``labels`` ``[B]`` int64 (``-100`` at padding slots), ``example_ids`` (list of
    ints, the split positions, ``-1`` for padding), ``samples`` (int), and with a teacher
    ``teacher_input_ids``/``teacher_attention_mask`` ``[B, Lt]``. Rows are right-padded, so decoder
    classifiers pool the last non-pad token.
    """

    def __init__(self, student: EncodedTexts, labels: np.ndarray, student_pad_id: int,
                 teacher: EncodedTexts | None = None, teacher_pad_id: int = 0, world_size: int = 1):
        self.student, self.labels, self.student_pad_id = student, labels, student_pad_id
        self.teacher, self.teacher_pad_id, self.world_size = teacher, teacher_pad_id, world_size

    def __call__(self, indices: list[int]) -> dict:
        real = [i if i >= 0 else 0 for i in indices]  # padding slots reuse example 0, with label ignored
        input_ids, attention_mask = right_pad([self.student.ids[i] for i in real], self.student_pad_id)
        labels = torch.tensor([int(self.labels[i]) if i >= 0 else -100 for i, _ in zip(indices, real)], dtype=torch.long)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "example_ids": list(indices), "samples": self.world_size * sum(i >= 0 for i in indices)}
        if self.teacher is not None:
            batch["teacher_input_ids"], batch["teacher_attention_mask"] = right_pad(
                [self.teacher.ids[i] for i in real], self.teacher_pad_id)
        return batch
