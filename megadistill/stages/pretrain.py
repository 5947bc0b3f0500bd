"""Pre-training distillation: the student/teacher modules the engines wrap, and the training loop.

The loop is a plain function (no Trainer class): for each micro-batch the teacher signal
comes from the frozen teacher (final hidden states, plus intermediate features when
feature matching is on) or from an offline cache (top-k log-probs or hidden states); the
student module computes the chunked ``w_ce * CE + w_kd * KD`` loss from hidden states and
output projections (plus weighted feature terms), and the DeepSpeed engine runs backward
and (at accumulation boundaries) the optimizer step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from megadistill import distributed
from megadistill.config import LossConfig, TrainConfig
from megadistill.data.collate import collate_clm
from megadistill.data.sampler import micro_batch_indices
from megadistill.losses.features import collect_features
from megadistill.losses.logits import auto_chunk_size_tokens, chunked_distill_loss, remap_sparse_targets
from megadistill.losses.schedule import LossWeights, loss_weights_at
from megadistill.models.teacher import final_hidden_states


class TeacherBody(torch.nn.Module):
    """The frozen teacher up to its final (normalized) hidden states, optionally with features.

    ``forward(input_ids [B, L] int64, position_ids [B, L] int64 | None)`` returns ``[B, L, Ht]`` hidden states, or, when
    ``features`` (a :class:`~megadistill.losses.features.FeatureDistiller`) is given, the
    dict of :func:`~megadistill.losses.features.collect_features` (one teacher forward).
    """

    def __init__(self, teacher: torch.nn.Module, features=None):
        super().__init__()
        self.teacher = teacher
        self.request = None if features is None else (features.wants_attentions, features.qkv_layers_teacher)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        if self.request is None:
            return final_hidden_states(self.teacher, input_ids, position_ids=position_ids)
        return collect_features(self.teacher, input_ids, attentions=self.request[0], qkv_layers=self.request[1],
                                position_ids=position_ids)


STAT_NAMES = ("ce_sum", "ce_tokens", "kd_sum", "kd_tokens", "feat_hidden", "feat_attention", "feat_relation", "micro_batches")


class DistillStudent(torch.nn.Module):
    """Student plus chunked distillation loss (and optional feature matching); what the training engine wraps.

    Args:
        student: a causal LM with a (possibly trimmed) vocabulary of ``vocab_size`` ids.
        teacher_head: [vocab_size, Ht] teacher output projection restricted to the student's
            ids (``VocabMap.restrict_rows``); a non-persistent buffer, so it is neither
            trained nor checkpointed. ``None`` when the teacher signal is sparse (top-k cache).
        loss: divergence, weights, temperature, top-k and chunk size.
        vocab_size: real student vocabulary (rows past it in the student head are padding).
        student_softcap, teacher_softcap: final-logit soft-capping of each model, if any.
        features: optional :class:`~megadistill.losses.features.FeatureDistiller`; its
            projections are trained with the student (and checkpointed) but not exported.

    ``forward(input_ids [B, L] int64, labels [B, L] int64, teacher_hidden [B, L, Ht] | None,
    sparse_targets=SparseTargets [B*L rows, student ids] | None, teacher_features=dict | None,
    weights=LossWeights | None, position_ids [B, L] int64 | None)`` returns ``loss`` (differentiable scalar), ``ce`` and ``kd``
    (nats/token, detached) and ``stats``: fp32 ``[len(STAT_NAMES)]`` token-weighted sums on
    the loss's device, so the loop reads them with one host sync per step.
    """

    def __init__(self, student, teacher_head, loss: LossConfig, vocab_size: int, student_softcap=None,
                 teacher_softcap=None, features=None):
        super().__init__()
        self.student = student
        self.register_buffer("teacher_head", teacher_head, persistent=False)
        self.loss_cfg = loss
        self.vocab_size = vocab_size
        self.softcaps = (student_softcap, teacher_softcap)
        self.features = features

    def forward(self, input_ids, labels, teacher_hidden=None, sparse_targets=None, teacher_features=None, weights=None,
                position_ids=None):
        weights = weights or LossWeights(self.loss_cfg.ce_weight, self.loss_cfg.kd_weight, self.loss_cfg.temperature)
        feats = None
        if self.features is not None and teacher_features is not None:
            feats = collect_features(self.student, input_ids, attentions=self.features.wants_attentions,
                                     qkv_layers=self.features.qkv_layers_student, position_ids=position_ids)
            hidden, teacher_hidden = feats["last_hidden"], teacher_features["last_hidden"]
        else:
            hidden = final_hidden_states(self.student, input_ids, position_ids=position_ids)
        out = self._logit_loss(hidden, labels, teacher_hidden, sparse_targets, weights)
        loss, feat = out.loss, torch.zeros(3, device=out.loss.device)
        if feats is not None:
            parts = self.features(feats, teacher_features)
            loss = loss + parts["loss"]
            feat = torch.stack([parts["hidden"], parts["attention"], parts["relation"]]).to(out.loss.device)
        counts = torch.tensor([out.num_ce_tokens, out.num_kd_tokens], dtype=torch.float32, device=out.loss.device)
        stats = torch.cat([torch.stack([out.ce * counts[0], counts[0], out.kd * counts[1], counts[1]]), feat,
                           torch.ones(1, device=out.loss.device)])
        return {"loss": loss, "ce": out.ce, "kd": out.kd, "stats": stats}

    def _logit_loss(self, hidden, labels, teacher_hidden, sparse_targets, weights: LossWeights):
        """CE + KD over the student's vocabulary from final hidden states ``[B, L, Hs]``."""
        cfg = self.loss_cfg
        use_kd = (teacher_hidden is not None or sparse_targets is not None) and weights.kd_weight > 0
        dense = use_kd and sparse_targets is None
        return chunked_distill_loss(
            hidden.flatten(0, 1),
            self.student.get_output_embeddings().weight,
            labels.flatten(),
            teacher_hidden.flatten(0, 1) if dense else None,
            self.teacher_head if dense else None,
            vocab_size=self.vocab_size,
            temperature=weights.temperature,
            ce_weight=weights.ce_weight,
            kd_weight=weights.kd_weight if use_kd else 0.0,
            chunk_size_tokens=cfg.chunk_size_tokens or auto_chunk_size_tokens(self.vocab_size),
            student_softcap=self.softcaps[0],
            teacher_softcap=self.softcaps[1],
            sparse_targets=sparse_targets if use_kd else None,
            divergence=cfg.divergence,
            jsd_beta=cfg.jsd_beta,
            top_k=cfg.top_k or None,
            top_p=cfg.top_p,
        )


@dataclass
class LoopState:
    """What a checkpoint must restore besides the engine: optimizer steps done and samples consumed."""

    step: int = 0
    consumed_samples: int = 0


@dataclass
class TeacherSource:
    """Where a batch's teacher signal comes from: an online teacher engine, an offline cache, or nothing.

    Attributes:
        engine: the teacher engine (:class:`TeacherBody` inside), or None.
        cache: a :class:`megadistill.teacher_cache.TeacherCache` aligned with the training
            data's fixed packing (``PackedDataset(..., fixed_layout=True)``), or None.
        vocab_map: the student's :class:`~megadistill.models.vocab.VocabMap` (cached top-k
            targets are in teacher ids and are remapped with it), or None.
    """

    engine: object = None
    cache: object = None
    vocab_map: object = None

    def signal(self, batch: dict, data, indices: list[int], windows, device) -> dict:
        """Keyword arguments for :meth:`DistillStudent.forward` carrying this batch's teacher signal.

        Raises:
            ValueError: a cached window's token hash differs from the data (cache built from other data).
        """
        if self.engine is not None:
            positions = batch.get("position_ids")
            with torch.no_grad():
                out = self.engine(batch["teacher_input_ids"].to(device), None if positions is None else positions.to(device))
            return {"teacher_features": out} if isinstance(out, dict) else {"teacher_hidden": out}
        if self.cache is None:
            return {}
        window_ids = [data.window_id(i) for i in indices]
        self.cache.verify_windows(window_ids, windows)
        if self.cache.kind == "hidden":
            return {"teacher_hidden": self.cache.hidden(window_ids).to(device)}
        targets = self.cache.targets(window_ids)
        if self.vocab_map is not None:
            targets = remap_sparse_targets(targets, self.vocab_map)
        return {"sparse_targets": targets.to(device)}


def _forward(student_engine, teacher: TeacherSource, data, indices, vocab_map, weights: LossWeights, wrap=False,
             document_masking: bool = True):
    """One micro-batch (samples ``indices`` of ``data``) through the teacher signal and the student."""
    indices = [i % len(data) for i in indices] if wrap else list(indices)
    items = [data.item(i) for i in indices]
    windows = [tokens for tokens, _ in items]
    batch = collate_clm(windows, vocab_map, [docs for _, docs in items] if document_masking else None)
    dev = student_engine.device
    kwargs = teacher.signal(batch, data, indices, windows, dev)
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"].to(dev)
    out = student_engine(batch["input_ids"].to(dev), batch["labels"].to(dev), weights=weights, **kwargs)
    out["dropped_tokens"] = batch["dropped_tokens"]
    return out


class _Totals:
    """Sums of the student module's ``stats`` over micro-batches; reduced over ranks on read (one host sync)."""

    def __init__(self):
        self.stats = None
        self.dropped = 0

    def add(self, out: dict) -> None:
        stats = out["stats"].detach().double()
        self.stats = stats if self.stats is None else self.stats + stats
        self.dropped += int(out["dropped_tokens"])

    def reduce(self) -> dict[str, float]:
        values = torch.cat([self.stats.cpu(), torch.tensor([float(self.dropped)], dtype=torch.float64)])
        named = dict(zip(STAT_NAMES + ("dropped_tokens",), distributed.all_reduce_sum(values).tolist()))
        micro = max(named["micro_batches"], 1)
        metrics = {"ce": named["ce_sum"] / max(named["ce_tokens"], 1), "kd": named["kd_sum"] / max(named["kd_tokens"], 1),
                   "tokens": named["ce_tokens"], "dropped_tokens": named["dropped_tokens"]}
        for name in ("feat_hidden", "feat_attention", "feat_relation"):
            if named[name]:
                metrics[name] = named[name] / micro
        return metrics


def evaluate_loss(student_engine, teacher: TeacherSource, dataset, vocab_map, micro_batch_size: int, max_batches: int,
                  weights: LossWeights | None = None, document_masking: bool = True) -> dict:
    """Held-out CE (nats/token), KD and perplexity over up to ``max_batches`` micro-batches per rank.

    Every rank runs the same number of forward passes (ZeRO-3 gathers are collective); the
    last batches wrap around to the start of ``dataset`` when it does not divide evenly.
    ``teacher`` without engine or cache gives CE only (kd reported as 0).
    """
    world, rank = distributed.world_size(), distributed.rank()
    per_step = world * micro_batch_size
    batches = max(1, min(max_batches, math.ceil(len(dataset) / per_step)))
    totals = _Totals()
    student_engine.eval()
    with torch.no_grad():
        for b in range(batches):
            idx = micro_batch_indices(b * per_step, rank, world, micro_batch_size)
            totals.add(_forward(student_engine, teacher, dataset, idx, vocab_map, weights, wrap=True,
                                document_masking=document_masking))
    student_engine.train()
    metrics = totals.reduce()
    metrics["ppl"] = math.exp(min(metrics["ce"], 50.0))
    return metrics


@dataclass
class LoopData:
    """The datasets and teacher signals the loop reads.

    Attributes:
        train: packed training windows (``PackedDataset``).
        valid: packed held-out windows, or None.
        teacher: :class:`TeacherSource` for training batches.
        valid_teacher: :class:`TeacherSource` for held-out batches (an offline cache covers
            only the training windows, so offline runs evaluate CE only).
        vocab_map: the student's ``VocabMap``, or None for an untrimmed vocabulary.
        seq_len_tokens: tokens per packed window fed to the models.
        document_masking: feed position ids that restart per document, so attention stays
            inside documents (``data.document_masking``).
    """

    train: object
    valid: object
    teacher: TeacherSource
    valid_teacher: TeacherSource
    vocab_map: object
    seq_len_tokens: int
    document_masking: bool = True


def train_loop(student_engine, data: LoopData, train: TrainConfig, loss: LossConfig, state: LoopState,
               metrics_logger, save_fn) -> dict:
    """Run optimizer steps from ``state.step`` to ``train.max_steps``; returns throughput totals.

    With ``train.exit_after_steps`` the loop stops early (the caller checkpoints), so a
    time-limited job can be resumed by rerunning the same command. Loss weights and
    temperature follow ``loss``'s schedules by optimizer step (so they resume too).

    ``save_fn(state)`` is called (on all ranks) every ``train.save_every_steps`` steps.
    Logged per step (rank 0): loss, ce, kd (nats/token), feature terms when on, the
    scheduled weights, lr, grad_norm, tokens/s (all ranks).
    """
    from megadistill.logging import progress_bar

    world, rank = distributed.world_size(), distributed.rank()
    tokens_per_step = world * train.micro_batch_size * train.grad_accum_steps * data.seq_len_tokens
    bar = progress_bar(train.max_steps, state.step, distributed.is_main())
    start, steps_run = time.time(), 0
    stop_at = train.max_steps if train.exit_after_steps is None else min(train.max_steps, state.step + train.exit_after_steps)
    while state.step < stop_at:
        t0, totals = time.time(), _Totals()
        lr = student_engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside step()
        weights = loss_weights_at(loss, state.step, train.max_steps)
        for _ in range(train.grad_accum_steps):
            idx = micro_batch_indices(state.consumed_samples, rank, world, train.micro_batch_size)
            state.consumed_samples += world * train.micro_batch_size
            out = _forward(student_engine, data.teacher, data.train, idx, data.vocab_map, weights,
                           document_masking=data.document_masking)
            student_engine.backward(out["loss"])
            student_engine.step()
            totals.add(out)
        state.step += 1
        steps_run += 1
        metrics = totals.reduce()
        metrics.update(loss=metrics_loss(metrics, weights), lr=lr, ce_weight=weights.ce_weight,
                       kd_weight=weights.kd_weight, temperature=weights.temperature,
                       grad_norm=float(student_engine.get_global_grad_norm() or 0.0),
                       tokens_per_s=tokens_per_step / max(time.time() - t0, 1e-9))
        if state.step % train.log_every_steps == 0:
            metrics_logger.log(state.step, "train", metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", ce=f"{metrics['ce']:.3f}", kd=f"{metrics['kd']:.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        if data.valid is not None and train.eval_every_steps and state.step % train.eval_every_steps == 0 and state.step < stop_at:
            metrics_logger.log(state.step, "valid", evaluate_loss(student_engine, data.valid_teacher, data.valid, data.vocab_map,
                                                                  train.micro_batch_size, train.eval_max_batches, weights,
                                                                  data.document_masking))
        if train.save_every_steps and state.step % train.save_every_steps == 0 and state.step < stop_at:
            save_fn(state)
    bar.close()
    elapsed = time.time() - start
    return {"steps_run": steps_run, "train_time_s": elapsed,
            "tokens_per_s": steps_run * tokens_per_step / max(elapsed, 1e-9), "tokens_per_step": tokens_per_step}


def metrics_loss(metrics: dict, weights: LossWeights) -> float:
    """The objective ``ce_weight * ce + kd_weight * kd`` (+ feature terms as logged) from token-weighted means."""
    return weights.ce_weight * metrics["ce"] + weights.kd_weight * metrics["kd"] + sum(
        metrics.get(k, 0.0) for k in ("feat_hidden", "feat_attention", "feat_relation"))
