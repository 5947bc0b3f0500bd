"""Collate packed windows into causal-LM distillation batches (teacher ids, student ids, labels, positions).

Labels, masks and position ids are made here, not in the training loop; masked-LM batches
come from :mod:`megadistill.data.masking`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megadistill.data.packing import position_ids_from_documents

IGNORE_INDEX = -100


def collate_clm(windows: Sequence[np.ndarray], vocab_map=None, document_ids: Sequence[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Stack windows of L + 1 teacher ids into a next-token batch.

    Args:
        windows: B int arrays of shape [L + 1] holding teacher token ids.
        vocab_map: a :class:`megadistill.models.vocab.VocabMap` for a trimmed student, or
            ``None`` when the student shares the teacher vocabulary.
        document_ids: B int arrays [L + 1], the document of each token
            (:meth:`megadistill.data.packing.PackedDataset.item`); when given the batch also
            holds ``document_ids`` and ``position_ids`` [B, L] int64 (restarting at 0 at each
            document start), which make Hugging Face models keep attention inside documents.

    Returns:
        ``teacher_input_ids`` [B, L] int64 (teacher ids, fed to the teacher),
        ``input_ids`` [B, L] int64 (student ids; dropped teacher ids become the student's
        UNK), ``labels`` [B, L] int64 (student id of the next token, ``-100`` where the
        next token is not in the student vocabulary), ``dropped_tokens`` scalar int64
        (labels lost to trimming; should be 0 when the vocabulary was built from this data).

    Raises:
        ValueError: windows of different lengths.
    """
    lengths = {len(w) for w in windows}
    if len(lengths) != 1:
        raise ValueError(f"collate_clm needs windows of one length, got lengths {sorted(lengths)}")
    tokens = torch.from_numpy(np.stack([np.asarray(w, dtype=np.int64) for w in windows]))
    teacher_inputs, teacher_labels = tokens[:, :-1], tokens[:, 1:]
    if vocab_map is None:
        batch = {
            "teacher_input_ids": teacher_inputs,
            "input_ids": teacher_inputs.clone(),
            "labels": teacher_labels.clone(),
            "dropped_tokens": torch.tensor(0),
        }
    else:
        student_inputs, _ = vocab_map.remap(teacher_inputs)
        labels, dropped = vocab_map.remap(teacher_labels)
        batch = {
            "teacher_input_ids": teacher_inputs,
            "input_ids": student_inputs,
            "labels": labels.masked_fill(dropped, IGNORE_INDEX),
            "dropped_tokens": dropped.sum(),
        }
    if document_ids is not None:
        docs = torch.from_numpy(np.stack([np.asarray(d, dtype=np.int64) for d in document_ids]))[:, :-1]
        if docs.shape != teacher_inputs.shape:
            raise ValueError(f"document_ids of shape {tuple(docs.shape)} do not match the windows {tuple(teacher_inputs.shape)}")
        batch["document_ids"], batch["position_ids"] = docs, position_ids_from_documents(docs)
    return batch
