"""Where the teacher signal of a batch comes from: a frozen online teacher, an offline cache, or none.

Each teacher kind has ``.signal(batch) -> TeacherSignal``; the objective reads whichever
fields are set. :class:`NoTeacher` is how every baseline runs (``teacher.mode: none``): the
same data, tokens and objective code, with CE / MLM only, and no teacher engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megadistill.losses.features import collect_features
from megadistill.losses.logits import SparseTargets, remap_sparse_targets
from megadistill.models.adapters import adapter_for

__all__ = ["CachedClassTeacher", "CachedTeacher", "ClassifierBody", "ClassifierTeacher", "NoTeacher", "OnlineTeacher",
           "TeacherBody", "TeacherSignal"]


@dataclass
class TeacherSignal:
    """The teacher's view of one micro-batch (all fields optional).

    Attributes:
        hidden: ``[B, L, Ht]`` what the teacher's output projection reads (final normed hidden
            state of a decoder, MLM-head transform of an encoder); the objective turns it into
            logits chunk by chunk through the teacher head it holds.
        sparse: :class:`SparseTargets` with ``B * L`` rows (or one row per masked position, the
            batch's ``mlm_mask`` in row-major order, for a masked-LM cache) in student ids: top-k
            log-probs + tail from an offline cache.
        features: the teacher's :func:`~megadistill.losses.features.collect_features` dict when
            intermediate layers are matched (its ``last_hidden`` is the head input).
        logits: ``[N, C]`` fp32 class logits of a fine-tuned teacher classifier (task stage), one row
            per labelled row of the batch in order: each real example (sequence classification), or
            each tagged word's first sub-token (token classification).
    """

    hidden: torch.Tensor | None = None
    sparse: SparseTargets | None = None
    features: dict | None = None
    logits: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        """True when there is nothing to distil from (no-teacher baseline)."""
        return self.hidden is None and self.sparse is None and self.features is None and self.logits is None


class TeacherBody(torch.nn.Module):
    """The frozen teacher up to its head input (optionally with intermediate features); what the teacher engine wraps.

    ``forward(input_ids [B, L] int64, document_ids [B, L] int64 | None, position_ids [B, L] int64 | None)``
    returns the ``[B, L, Ht]`` head input, or the :func:`collect_features` dict when
    ``features`` (a :class:`~megadistill.losses.features.FeatureDistiller`) is given.
    """

    def __init__(self, teacher: torch.nn.Module, features=None):
        super().__init__()
        self.teacher = teacher
        self.adapter = adapter_for(teacher)
        self.request = None if features is None else (features.wants_attentions, features.qkv_layers_teacher)

    def forward(self, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None):
        if self.request is None:
            return self.adapter.final_hidden_states(self.teacher, input_ids, document_ids=document_ids,
                                                    position_ids=position_ids)
        return collect_features(self.teacher, input_ids, attentions=self.request[0], qkv_layers=self.request[1],
                                document_ids=document_ids, position_ids=position_ids)


def _to(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


class NoTeacher:
    """No teacher signal: the objective trains on CE / MLM labels only (the no-teacher baseline)."""

    kind = "none"

    def signal(self, batch: dict) -> TeacherSignal:
        """An empty :class:`TeacherSignal`."""
        return TeacherSignal()


class OnlineTeacher:
    """A frozen teacher engine (a :class:`TeacherBody` inside, ZeRO-3 sharded) run on every micro-batch.

    Args:
        engine: the teacher engine; called with ``teacher_input_ids`` (teacher ids, masked the same
            way as the student's for masked LM), ``document_ids`` and ``position_ids`` of the batch.
        device: where the batch tensors go.
    """

    kind = "online"

    def __init__(self, engine, device):
        self.engine, self.device = engine, device

    def signal(self, batch: dict) -> TeacherSignal:
        """Run the teacher (no grad) on ``batch``; returns ``hidden`` or ``features``."""
        with torch.no_grad():
            # A paired (cross-tokenizer) batch has the teacher's own document and position ids.
            docs = batch.get("teacher_document_ids", batch.get("document_ids"))
            positions = batch.get("teacher_position_ids", batch.get("position_ids"))
            out = self.engine(batch["teacher_input_ids"].to(self.device), _to(docs, self.device), _to(positions, self.device))
        return TeacherSignal(features=out) if isinstance(out, dict) else TeacherSignal(hidden=out)


class CachedTeacher:
    """Teacher signal read from an offline cache (:class:`megadistill.teacher_cache.TeacherCache`).

    The batch must carry ``window_ids`` (list of ints, the cached windows) and ``windows``
    (their teacher token arrays, checked against the cache's hashes).

    Args:
        cache: the opened, compatibility-checked cache.
        vocab_map: the student's :class:`~megadistill.models.vocab.VocabMap` (cached top-k ids are
            teacher ids), or None.
        device: where the signal tensors go.

    Raises (from :meth:`signal`):
        ValueError: a cached window's token hash differs from the data (cache built from other data).
    """

    kind = "offline"

    def __init__(self, cache, vocab_map, device):
        self.cache, self.vocab_map, self.device = cache, vocab_map, device

    def signal(self, batch: dict) -> TeacherSignal:
        """Cached hidden states ``[B, L, Ht]`` or top-k targets (remapped to student ids) for ``batch``."""
        window_ids = batch["window_ids"]
        self.cache.verify_windows(window_ids, batch["windows"])
        if self.cache.kind == "hidden":
            return TeacherSignal(hidden=self.cache.hidden(window_ids).to(self.device))
        if self.cache.objective == "mlm":  # the masked inputs must be those the cached teacher saw
            self.cache.verify_masked(window_ids, batch["teacher_input_ids"])
        targets = self.cache.targets(window_ids)
        if self.vocab_map is not None:
            targets = remap_sparse_targets(targets, self.vocab_map)
        return TeacherSignal(sparse=targets.to(self.device))


class ClassifierBody(torch.nn.Module):
    """A frozen fine-tuned teacher classifier (``*ForSequenceClassification``); what its engine wraps.

    ``forward(input_ids [B, L] int64, attention_mask [B, L] int64)`` returns ``[B, C]`` fp32 logits.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


class ClassifierTeacher:
    """A fine-tuned teacher classifier engine run on every micro-batch (``teacher_input_ids`` in its own tokenization).

    Sequence classifiers give ``[B, C]`` logits, kept where ``labels`` != -100; token classifiers
    give ``[B, Lt, C]``, kept where ``teacher_labels`` != -100 (the tagged words' first sub-tokens).
    """

    kind = "online"

    def __init__(self, engine, device):
        self.engine, self.device = engine, device

    def signal(self, batch: dict) -> TeacherSignal:
        """The teacher's ``[N, C]`` class logits of the batch's labelled rows (no grad)."""
        with torch.no_grad():
            logits = self.engine(batch["teacher_input_ids"].to(self.device), batch["teacher_attention_mask"].to(self.device))
        labels = batch["teacher_labels"] if logits.dim() == 3 else batch["labels"]
        return TeacherSignal(logits=logits[labels.to(self.device) != -100])


class CachedClassTeacher:
    """Teacher class logits read from a task logit cache (:class:`megadistill.task_cache.TaskLogitCache`).

    The batch's ``example_ids`` (split positions; ``-1`` = padding slot, skipped) index the cache.
    """

    kind = "offline"

    def __init__(self, cache, device):
        self.cache, self.device = cache, device

    def signal(self, batch: dict) -> TeacherSignal:
        """Cached ``[N, C]`` fp32 logits of the batch's real examples."""
        return TeacherSignal(logits=self.cache.logits([i for i in batch["example_ids"] if i >= 0]).to(self.device))
