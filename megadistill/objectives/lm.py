"""Language-model objectives over the vocabulary: causal LM (next token) and masked LM (masked positions).

``loss = w_ce * CE(labels) + w_kd * KD(teacher, student; T) + feature terms``, computed in
chunks of tokens from hidden states and output projections (:mod:`megadistill.losses.logits`),
so ``[tokens, vocab]`` logits of both models are never held in full. CE and KD are sums over
valid tokens divided by the **global batch's** token counts (:class:`LossNormalizer`, supplied
by the loop), so every token of an optimizer step weighs the same whatever its micro-batch.

* causal LM: every position predicts the next token; KD at the positions that have a label.
* masked LM (DistilBERT, Sanh et al. 2019, arXiv:1910.01108): CE at the masked positions;
  KD at the masked positions (``loss.kd_positions: masked``, default) or at all positions.
"""

from __future__ import annotations

import torch

from megadistill.config import LossConfig
from megadistill.data.collate import IGNORE_INDEX
from megadistill.losses.features import collect_features
from megadistill.losses.logits import chunked_distill_loss
from megadistill.losses.schedule import loss_weights_at
from megadistill.models.adapters import adapter_for
from megadistill.objectives.spec import KDSpec, LossNormalizer
from megadistill.teachers import TeacherSignal

__all__ = ["FEATURE_TERMS", "LMObjective", "lm_metrics"]

FEATURE_TERMS = ("feat_hidden", "feat_attention", "feat_relation")


class LMObjective(torch.nn.Module):
    """The student plus its LM distillation loss; what the student engine wraps.

    Args:
        student: a HF causal LM or masked LM (any family :func:`adapter_for` supports).
        spec: the validated :class:`KDSpec` at step 0 (vocabulary, divergence, chunking, softcaps).
        loss: the :class:`LossConfig` whose schedules move ``spec``'s weights and temperature.
        total_steps: optimizer steps the schedules span when ``loss.schedule_steps`` is 0.
        masked: masked-LM objective (encoder students) instead of next-token prediction.
        teacher_head: ``[V, Ht]`` teacher output projection restricted to the student's ids (a
            non-persistent buffer: neither trained nor checkpointed), or None (cached top-k or no teacher).
        teacher_bias: ``[V]`` the teacher head's bias restricted the same way (encoder heads), or None.
        features: optional :class:`~megadistill.losses.features.FeatureDistiller` (its projections
            train with the student and are checkpointed, not exported).

    ``forward(batch, signal, step, normalizer)`` returns ``{"loss": differentiable fp32 scalar,
    "stats": {name: fp32 scalar sum}}`` with the names of :func:`lm_metrics`.
    """

    def __init__(self, student: torch.nn.Module, spec: KDSpec, loss: LossConfig, total_steps: int, *,
                 masked: bool = False, teacher_head: torch.Tensor | None = None,
                 teacher_bias: torch.Tensor | None = None, features=None):
        super().__init__()
        self.student = student
        self.adapter = adapter_for(student)
        self.spec, self.loss_cfg, self.total_steps = spec, loss, total_steps
        self.masked = masked
        self.kd_all = masked and loss.kd_positions == "all"
        self.register_buffer("teacher_head", teacher_head, persistent=False)
        self.register_buffer("teacher_bias", teacher_bias, persistent=False)
        self.features = features

    def spec_at(self, step: int) -> KDSpec:
        """The spec with the weights and temperature scheduled for optimizer step ``step``."""
        return self.spec.at(loss_weights_at(self.loss_cfg, step, self.total_steps))

    def counts(self, batch: dict) -> dict[str, int]:
        """Valid CE and KD tokens of a micro-batch (from its CPU tensors: no device sync).

        KD covers every selected position of a masked LM (also one whose label a trimmed vocabulary
        dropped), every position with ``kd_positions: all``, and the labelled positions of a causal LM.
        """
        labels = batch["labels"]
        ce = int((labels != IGNORE_INDEX).sum())
        if self.kd_all:
            return {"ce_tokens": ce, "kd_tokens": labels.numel()}
        return {"ce_tokens": ce, "kd_tokens": int(batch["mlm_mask"].sum()) if self.masked else ce}

    def forward(self, batch: dict, signal: TeacherSignal, step: int, normalizer: LossNormalizer | None = None) -> dict:
        device = self.student.get_input_embeddings().weight.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        spec = self.spec_at(step)
        hidden, feats = self._student_hidden(batch, signal)
        teacher_hidden = signal.features["last_hidden"] if signal.features is not None else signal.hidden
        rows = self._rows(batch)
        out = chunked_distill_loss(
            _select(hidden, rows), self.adapter.output_weight(self.student), _select(batch["labels"], rows), spec,
            student_bias=self.adapter.output_bias(self.student),
            teacher_hidden=_select(teacher_hidden, rows) if teacher_hidden is not None else None,
            teacher_weight=self.teacher_head if teacher_hidden is not None else None,
            teacher_bias=self.teacher_bias if teacher_hidden is not None else None,
            sparse_targets=signal.sparse, kd_mask=self._kd_mask(batch["labels"], rows),
            normalizer=normalizer)
        stats = {"ce_sum": out.ce_sum, "ce_tokens": out.ce_tokens.float(), "kd_sum": out.kd_sum,
                 "kd_tokens": out.kd_tokens.float(), "micro_batches": torch.ones((), device=device),
                 "dropped_tokens": batch["dropped_tokens"].float()}
        loss = out.loss
        if feats is not None:
            parts = self.features(feats, signal.features)
            loss = loss + parts["loss"]
            stats.update({f"feat_{k}": parts[k].to(device) for k in ("hidden", "attention", "relation")})
        return {"loss": loss, "stats": {k: v.detach().float() for k, v in stats.items()}}

    def _student_hidden(self, batch: dict, signal: TeacherSignal):
        """``[B, L, Hs]`` head input of the student, and its feature dict when features are matched."""
        kwargs = {"document_ids": batch.get("document_ids"), "position_ids": batch.get("position_ids")}
        if self.features is not None and signal.features is not None:
            feats = collect_features(self.student, batch["input_ids"], attentions=self.features.wants_attentions,
                                     qkv_layers=self.features.qkv_layers_student, **kwargs)
            return feats["last_hidden"], feats
        return self.adapter.final_hidden_states(self.student, batch["input_ids"], **kwargs), None

    def _kd_mask(self, labels: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        """``[N]`` bool KD rows: all rows read (masked LM), or None: "where there is a label" (causal LM)."""
        if not self.masked:
            return None
        return torch.ones(labels.numel(), dtype=torch.bool, device=labels.device) if rows is None else rows[rows]

    def _rows(self, batch: dict) -> torch.Tensor | None:
        """``[B, L]`` bool positions the loss reads: the selected (masked) positions of a masked LM with KD
        there (the rows an offline masked-LM cache holds, in row-major order), else all positions (None)."""
        if self.masked and not self.kd_all:
            return batch["mlm_mask"]
        return None


def _select(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x`` ``[B, L, ...]`` flattened to ``[N, ...]`` rows: all ``B * L`` rows, or those where ``rows`` is True."""
    return x.flatten(0, 1) if rows is None else x[rows]


def lm_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Logged metrics from stats summed over micro-batches and ranks.

    Returns ``ce`` and ``kd`` (token means, nats/token; ``kd`` includes ``T**2``), ``tokens`` (CE
    tokens), ``dropped_tokens``, and each feature term present (mean over micro-batches).
    """
    metrics = {"ce": totals["ce_sum"] / max(totals["ce_tokens"], 1.0),
               "kd": totals["kd_sum"] / max(totals["kd_tokens"], 1.0),
               "tokens": totals["ce_tokens"], "dropped_tokens": totals["dropped_tokens"]}
    for name in FEATURE_TERMS:
        if totals.get(name):
            metrics[name] = totals[name] / max(totals["micro_batches"], 1.0)
    return metrics
