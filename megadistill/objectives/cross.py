"""Causal-LM objective of a student with its own tokenizer: CE on its own tokens + KD across tokenizers.

``loss = w_ce * CE(student labels) + w_kd * KD(teacher, student)``, where KD compares the two
models over the smallest common character spans of a paired window
(:class:`megadistill.data.paired.PairedBatches`): span-aligned KD (TRL's GOLD trainer) or ULD
(Boizard et al. 2024, arXiv:2402.12030), both computed in chunks by
:func:`megadistill.losses.cross_tokenizer.cross_tokenizer_loss`. CE is a mean over the global
batch's student label tokens, KD over its aligned spans (:class:`LossNormalizer`). With no teacher
signal (``teacher.mode: none``) it is plain CE on the same student tokens: the baseline.
"""

from __future__ import annotations

import dataclasses

import torch

from megadistill.config import LossConfig
from megadistill.data.collate import IGNORE_INDEX
from megadistill.losses.cross_tokenizer import SharedVocab, SpanAlignment, cross_tokenizer_loss
from megadistill.losses.logits import chunked_distill_loss
from megadistill.losses.schedule import loss_weights_at
from megadistill.models.adapters import adapter_for
from megadistill.models.vocab import VocabMap
from megadistill.objectives.spec import KDSpec, LossNormalizer
from megadistill.teachers import TeacherSignal

__all__ = ["CrossTokenizerObjective"]


class CrossTokenizerObjective(torch.nn.Module):
    """The student plus its cross-tokenizer distillation loss; what the student engine wraps.

    Args:
        student: a HF causal LM with its own vocabulary (``Vs`` ids).
        spec: the validated :class:`KDSpec` at step 0 (``vocab_size = Vs``, chunking, softcaps).
        loss: the :class:`LossConfig` (schedules of weights and temperature; ``cross_tokenizer`` method).
        total_steps: optimizer steps the schedules span when ``loss.schedule_steps`` is 0.
        teacher_head: ``[Vt, Ht]`` teacher output projection (real ids only; a non-persistent buffer), or
            None for the no-teacher baseline.
        shared: student/teacher ids of identical token strings (span-aligned KD; teacher ids in the
            restricted teacher vocabulary when ``teacher_vocab_map`` is set), or None.
        teacher_vocab_map: the teacher ids ``teacher_head`` keeps (a :class:`VocabMap` whose "student"
            side is the restricted teacher vocabulary), or None for the whole teacher vocabulary. Teacher
            labels are remapped into it; an id outside it counts as the map's unk id.

    ``forward(batch, signal, step, normalizer)`` takes a :class:`PairedBatches` batch and returns
    ``{"loss": differentiable fp32 scalar, "stats": {name: fp32 scalar sum}}`` with the names of
    :func:`megadistill.objectives.lm.lm_metrics` (``kd_tokens`` counts aligned spans).
    """

    def __init__(self, student: torch.nn.Module, spec: KDSpec, loss: LossConfig, total_steps: int, *,
                 teacher_head: torch.Tensor | None = None, shared: SharedVocab | None = None,
                 teacher_vocab_map: VocabMap | None = None):
        super().__init__()
        self.student, self.adapter = student, adapter_for(student)
        self.spec, self.loss_cfg, self.total_steps = spec, loss, total_steps
        self.method = loss.cross_tokenizer
        self.register_buffer("teacher_head", teacher_head, persistent=False)
        self.shared, self.teacher_vocab_map = shared, teacher_vocab_map

    def spec_at(self, step: int) -> KDSpec:
        """The spec with the weights and temperature scheduled for optimizer step ``step``."""
        return self.spec.at(loss_weights_at(self.loss_cfg, step, self.total_steps))

    def counts(self, batch: dict) -> dict[str, int]:
        """Student CE tokens and aligned spans of a micro-batch (CPU tensors and ints: no device sync)."""
        return {"ce_tokens": int((batch["labels"] != IGNORE_INDEX).sum()), "kd_tokens": int(batch.get("num_groups", 0))}

    def forward(self, batch: dict, signal: TeacherSignal, step: int, normalizer: LossNormalizer | None = None) -> dict:
        device = self.student.get_input_embeddings().weight.device
        spec = self.spec_at(step)
        labels = batch["labels"].to(device)
        hidden = self.adapter.final_hidden_states(
            self.student, batch["input_ids"].to(device), document_ids=_to(batch.get("document_ids"), device),
            position_ids=_to(batch.get("position_ids"), device)).flatten(0, 1)
        weight = self.adapter.output_weight(self.student)
        if signal.hidden is None:
            out = chunked_distill_loss(hidden, weight, labels.flatten(), _ce_only(spec), normalizer=normalizer)
        else:
            alignment = SpanAlignment(batch["student_group"].flatten().to(device), batch["teacher_group"].flatten().to(device),
                                      int(batch["num_groups"]))
            out = cross_tokenizer_loss(hidden, weight, labels.flatten(), signal.hidden.flatten(0, 1),
                                       self.teacher_head, self._teacher_labels(batch).to(device), alignment, spec,
                                       self.method, shared=self.shared, normalizer=normalizer)
        stats = {"ce_sum": out.ce_sum, "ce_tokens": out.ce_tokens.float(), "kd_sum": out.kd_sum,
                 "kd_tokens": out.kd_tokens.float(), "micro_batches": torch.ones((), device=device),
                 "dropped_tokens": torch.zeros((), device=device)}
        return {"loss": out.loss, "stats": {k: v.detach().float() for k, v in stats.items()}}

    def _teacher_labels(self, batch: dict) -> torch.Tensor:
        """``[B * Lt]`` teacher labels in the (restricted) teacher vocabulary; padding stays -100."""
        labels = batch["teacher_labels"].flatten()
        if self.teacher_vocab_map is None:
            return labels
        valid = labels != IGNORE_INDEX
        mapped, _ = self.teacher_vocab_map.remap(labels.clamp_min(0))
        return mapped.masked_fill(~valid, IGNORE_INDEX)


def _ce_only(spec: KDSpec) -> KDSpec:
    """The spec of the no-teacher baseline: CE with its weight, no KD term."""
    return dataclasses.replace(spec, kd_weight=0.0)


def _to(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
