"""Collate packed windows into causal-LM distillation batches (teacher ids, student ids, labels).

Labels and masks are made here, not in the training loop, so that masked-LM batches can
later be added as another collate function without touching the loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def collate_clm(windows: Sequence[np.ndarray], vocab_map=None) -> dict[str, torch.Tensor]:
    """Stack windows of L + 1 teacher ids into a next-token batch.

    Args:
        windows: B int arrays of shape [L + 1] holding teacher token ids.
        vocab_map: a :class:`megadistill.models.vocab.VocabMap` for a trimmed student, or
            ``None`` when the student shares the teacher vocabulary.

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
        return {
            "teacher_input_ids": teacher_inputs,
            "input_ids": teacher_inputs.clone(),
            "labels": teacher_labels.clone(),
            "dropped_tokens": torch.tensor(0),
        }
    student_inputs, _ = vocab_map.remap(teacher_inputs)
    labels, dropped = vocab_map.remap(teacher_labels)
    labels = labels.masked_fill(dropped, IGNORE_INDEX)
    return {
        "teacher_input_ids": teacher_inputs,
        "input_ids": student_inputs,
        "labels": labels,
        "dropped_tokens": dropped.sum(),
    }
