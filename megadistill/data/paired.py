"""Paired data for cross-tokenizer KD: the same text in student and teacher tokens, aligned by character span.

A corpus is binarized once per tokenizer (``tools/binarize.py`` with the teacher's tokenizer and
with the student's own, from the same source files), so document ``i`` of the student dataset and
document ``i`` of the teacher dataset hold the same text. The **student** stream defines the
packed windows (:class:`~megadistill.data.packing.PackedDataset` over the student datasets); for
each window piece (a document's tokens ``start:stop``) the teacher tokens covering exactly the
same bytes are cut out of the teacher document, so both models read the same text. Character
offsets are recovered from the token ids (:mod:`megadistill.data.offsets`) and the two
tokenizations are grouped into their smallest common character spans
(:func:`~megadistill.data.offsets.align_spans`), which the cross-tokenizer losses
(:mod:`megadistill.losses.cross_tokenizer`) compare.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from megadistill.data.collate import IGNORE_INDEX
from megadistill.data.offsets import align_spans, char_ends
from megadistill.data.packing import PackedDataset, position_ids_from_documents

__all__ = ["DocumentOffsets", "PairedBatches", "check_paired"]


def check_paired(student_sets: Sequence, teacher_sets: Sequence, student_names: Sequence[str],
                 teacher_names: Sequence[str]) -> None:
    """Check that each student dataset has a teacher twin with the same number of documents.

    Raises:
        ValueError: the lists differ in length, or a pair differs in document count (naming both prefixes).
    """
    if len(student_sets) != len(teacher_sets):
        raise ValueError(f"{len(student_sets)} student datasets but {len(teacher_sets)} teacher datasets: give one "
                         "data.student_*_prefixes entry per data.*_prefixes entry, binarized from the same source")
    for s, t, s_name, t_name in zip(student_sets, teacher_sets, student_names, teacher_names):
        if len(s) != len(t):
            raise ValueError(f"{s_name} has {len(s)} documents but its teacher twin {t_name} has {len(t)}: binarize "
                             "both from the same source files")


class DocumentOffsets:
    """Per-token byte and character ends of a dataset's documents under one tokenizer (memoized).

    Args:
        datasets: indexed datasets (``ds[i]`` -> 1-D token ids of document ``i``).
        table: bytes of each token id (:func:`megadistill.data.offsets.token_bytes_table`).
        names: dataset names for error messages.
        cache_documents: documents kept in memory (least recently used are dropped).
    """

    def __init__(self, datasets: Sequence, table: list[bytes], names: Sequence[str], cache_documents: int = 4096):
        self.datasets, self.names, self.cache_documents = list(datasets), list(names), cache_documents
        self.lengths = np.array([len(b) for b in table], dtype=np.int64)
        self.table = table
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def document(self, dataset: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, byte_ends, char_ends)`` of one document, each int64 ``[n]`` (ends are cumulative counts).

        Raises:
            ValueError: a token id past the tokenizer, or bytes that are not UTF-8 (naming the document).
        """
        key = (dataset, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        ids = np.asarray(self.datasets[dataset][index], dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.lengths)):
            raise ValueError(f"{self.names[dataset]} document {index}: token id {int(ids.max())} is past the "
                             f"tokenizer's {len(self.lengths)} ids: the dataset was binarized with another tokenizer")
        try:
            chars = char_ends(ids, self.table)
        except ValueError as err:
            raise ValueError(f"{self.names[dataset]} document {index}: {err}") from None
        value = (ids, np.cumsum(self.lengths[ids]), chars)
        self._cache[key] = value
        if len(self._cache) > self.cache_documents:
            self._cache.popitem(last=False)
        return value


class PairedBatches:
    """Micro-batches of paired windows: student tokens, the teacher tokens of the same text, span groups.

    Args:
        data: packed windows over the **student** datasets (``L + 1`` student ids each).
        student: :class:`DocumentOffsets` of the student datasets (the ones ``data`` packs).
        teacher: :class:`DocumentOffsets` of their teacher twins (same documents, teacher ids).
        teacher_pad_id: id that pads teacher rows to the batch's longest teacher window.
        document_masking: add document / position ids so attention stays inside documents.
        world_size: data-parallel ranks (for the ``samples`` count).

    ``self(indices)`` returns, for ``B = len(indices)``, student length ``L`` and the batch's
    longest teacher window ``Lt + 1``:

    * ``input_ids``, ``labels`` ``[B, L]`` int64 (student ids; labels are the next token);
    * ``teacher_input_ids``, ``teacher_labels`` ``[B, Lt]`` int64 (teacher ids; padding has label ``-100``);
    * ``document_ids``/``position_ids`` ``[B, L]`` and ``teacher_document_ids``/``teacher_position_ids``
      ``[B, Lt]`` (with ``document_masking``; padding is a document of its own);
    * ``student_group`` ``[B, L]`` / ``teacher_group`` ``[B, Lt]`` int64: the common character span
      (numbered 0..K-1 over the micro-batch) each label row belongs to, ``-1`` where a span has no
      rows on one side (it starts the window) or does not close (the window's cut tail);
    * ``num_groups`` (K), ``dropped_tokens`` (0), ``samples``.

    Raises (from ``self(indices)``):
        ValueError: a student and teacher document hold different text (byte counts differ).
    """

    def __init__(self, data: PackedDataset, student: DocumentOffsets, teacher: DocumentOffsets, teacher_pad_id: int,
                 document_masking: bool = True, world_size: int = 1):
        self.data, self.student, self.teacher = data, student, teacher
        self.teacher_pad_id, self.document_masking, self.world_size = teacher_pad_id, document_masking, world_size
        self.tokens_per_sample = data.seq_len_tokens

    def __call__(self, indices: list[int]) -> dict:
        rows = [self._window(i) for i in indices]
        width = max(2, max(len(r["teacher"]) for r in rows))
        batch = {"input_ids": [], "labels": [], "teacher_input_ids": [], "teacher_labels": [], "student_group": [],
                 "teacher_group": [], "document_ids": [], "teacher_document_ids": []}
        offset = 0
        for r in rows:
            pad = width - len(r["teacher"])
            s_group, t_group, count = _row_groups(r["s_group"], r["t_group"], offset)
            offset += count
            teacher = np.concatenate([r["teacher"], np.full(pad, self.teacher_pad_id)])
            t_labels = np.concatenate([r["teacher"][1:], np.full(pad, IGNORE_INDEX)])
            t_docs = np.concatenate([r["t_docs"], np.full(pad, r["t_docs"][-1] + 1 if len(r["t_docs"]) else 0)])
            batch["input_ids"].append(r["student"][:-1])
            batch["labels"].append(r["student"][1:])
            batch["teacher_input_ids"].append(teacher[:-1])
            batch["teacher_labels"].append(t_labels[: width - 1])
            batch["student_group"].append(s_group)
            batch["teacher_group"].append(np.concatenate([t_group, np.full(pad, -1)])[: width - 1])
            batch["document_ids"].append(r["s_docs"][:-1])
            batch["teacher_document_ids"].append(t_docs[: width - 1])
        out = {k: torch.from_numpy(np.stack(v).astype(np.int64)) for k, v in batch.items()}
        if self.document_masking:
            out["position_ids"] = position_ids_from_documents(out["document_ids"])
            out["teacher_position_ids"] = position_ids_from_documents(out["teacher_document_ids"])
        else:
            del out["document_ids"], out["teacher_document_ids"]
        out.update(num_groups=offset, dropped_tokens=torch.tensor(0), samples=self.world_size * len(indices),
                   window_ids=[self.data.window_id(i) for i in indices])
        return out

    def _window(self, index: int) -> dict:
        """One window's student and teacher tokens, document ids and per-token span groups."""
        parts = {"student": [], "teacher": [], "s_docs": [], "t_docs": [], "s_group": [], "t_group": []}
        groups = 0
        for piece, (dataset, doc, start, stop) in enumerate(self.data.segments(index)):
            s_ids, s_bytes, s_chars = self.student.document(dataset, doc)
            t_ids, t_bytes, t_chars = self.teacher.document(dataset, doc)
            if s_bytes[-1:].tolist() != t_bytes[-1:].tolist():
                raise ValueError(f"{self.student.names[dataset]} document {doc} holds {int(s_bytes[-1])} bytes of text "
                                 f"but its teacher twin {self.teacher.names[dataset]} holds {int(t_bytes[-1])}: the two "
                                 "datasets were not binarized from the same source, or a tokenizer normalizes the text")
            t_start, t_stop = _teacher_span(s_bytes, t_bytes, start, stop)
            # One origin for both sides: the piece's first student character. A teacher piece that
            # starts later (a straddling token was left out) falls in the first span, which is dropped.
            base = int(s_chars[start - 1]) if start > 0 else 0
            s_group, t_group = align_spans(s_chars[start:stop] - base, t_chars[t_start:t_stop] - base)
            parts["student"].append(s_ids[start:stop])
            parts["teacher"].append(t_ids[t_start:t_stop])
            parts["s_docs"].append(np.full(stop - start, piece))
            parts["t_docs"].append(np.full(t_stop - t_start, piece))
            parts["s_group"].append(np.where(s_group >= 0, s_group + groups, -1))
            parts["t_group"].append(np.where(t_group >= 0, t_group + groups, -1))
            groups += int(max(s_group.max(initial=-1), t_group.max(initial=-1))) + 1
        return {k: np.concatenate(v) for k, v in parts.items()}


def _teacher_span(s_bytes: np.ndarray, t_bytes: np.ndarray, start: int, stop: int) -> tuple[int, int]:
    """Teacher tokens ``[t_start, t_stop)`` holding exactly the bytes of student tokens ``[start, stop)``.

    Byte (not character) ends decide, so a byte-fallback piece belongs to the character it is part
    of. A teacher token that straddles a cut is left out (its text is not all in the window). A
    zero-byte token (BOS, EOS) at the document's start or end comes along when the student's
    piece reaches that end of the document.
    """
    b0 = int(s_bytes[start - 1]) if start > 0 else 0
    b1 = int(s_bytes[stop - 1]) if stop > start else b0
    t_begin = np.concatenate([[0], t_bytes[:-1]])
    total = int(t_bytes[-1]) if len(t_bytes) else 0
    zero = t_bytes == t_begin
    keep = np.where(zero, (t_begin >= b0) & (t_begin < b1), (t_begin >= b0) & (t_bytes <= b1))
    keep |= zero & (t_begin == 0) & (start == 0)
    keep |= zero & (t_begin == total) & (stop == len(s_bytes))
    chosen = np.flatnonzero(keep)
    return (int(chosen[0]), int(chosen[-1]) + 1) if len(chosen) else (0, 0)


def _row_groups(s_token_group: np.ndarray, t_token_group: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Span groups of the label rows of one window, renumbered from ``offset``.

    Row ``r`` predicts token ``r + 1``, so a row's group is its label token's group. A span that
    holds a window's first token (no row predicts it) on either side, or that has no row on one
    side, cannot be compared and becomes -1.

    Returns:
        ``([L] student row groups, [Lt] teacher row groups, K)`` with groups numbered offset..offset+K-1.
    """
    s_rows, t_rows = s_token_group[1:].copy(), t_token_group[1:].copy()
    bad = {int(s_token_group[0]), int(t_token_group[0])} - {-1}
    present = (set(np.unique(s_rows[s_rows >= 0]).tolist()) & set(np.unique(t_rows[t_rows >= 0]).tolist())) - bad
    keep = np.array(sorted(present), dtype=np.int64)
    # One spare entry past the largest group: rows of group -1 index it (as renumber[-1]) and stay -1.
    renumber = np.full(int(max(s_token_group.max(initial=-1), t_token_group.max(initial=-1))) + 2, -1, dtype=np.int64)
    renumber[keep] = np.arange(len(keep)) + offset
    return renumber[s_rows], renumber[t_rows], len(keep)
