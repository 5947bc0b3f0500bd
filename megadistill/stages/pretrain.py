"""Pre-training distillation: the student/teacher modules the engines wrap, and the training loop.

The loop is a plain function (no Trainer class): for each micro-batch the frozen teacher
produces final hidden states, the student module computes the chunked
``w_ce * CE + w_kd * forward-KL`` loss from hidden states and output projections, and the
DeepSpeed engine runs backward and (at accumulation boundaries) the optimizer step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from megadistill import distributed
from megadistill.config import LossConfig, TrainConfig
from megadistill.data.collate import collate_clm
from megadistill.data.packing import micro_batch_indices
from megadistill.losses.logits import chunked_distill_loss
from megadistill.models.teacher import final_hidden_states


class TeacherBody(torch.nn.Module):
    """The frozen teacher up to its final (normalized) hidden states: [B, L] ids -> [B, L, Ht]."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return final_hidden_states(self.teacher, input_ids)


class DistillStudent(torch.nn.Module):
    """Student plus chunked distillation loss; the module the training engine wraps.

    Args:
        student: a causal LM with a (possibly trimmed) vocabulary of ``vocab_size`` ids.
        teacher_head: [vocab_size, Ht] teacher output projection restricted to the student's
            ids (``VocabMap.restrict_rows``); a non-persistent buffer, so it is neither
            trained nor checkpointed. ``None`` disables KD.
        loss: weights, temperature and chunk size.
        vocab_size: real student vocabulary (rows past it in the student head are padding).
        student_softcap, teacher_softcap: final-logit soft-capping of each model, if any.

    ``forward(input_ids [B, L] int64, labels [B, L] int64, teacher_hidden [B, L, Ht] | None)``
    returns a dict of scalars: ``loss`` (differentiable), ``ce`` and ``kd`` (nats/token,
    detached), ``ce_tokens`` and ``kd_tokens`` (counts).
    """

    def __init__(self, student, teacher_head, loss: LossConfig, vocab_size: int, student_softcap=None, teacher_softcap=None):
        super().__init__()
        self.student = student
        self.register_buffer("teacher_head", teacher_head, persistent=False)
        self.loss_cfg = loss
        self.vocab_size = vocab_size
        self.softcaps = (student_softcap, teacher_softcap)

    def forward(self, input_ids, labels, teacher_hidden=None):
        hidden = final_hidden_states(self.student, input_ids)
        use_kd = teacher_hidden is not None and self.loss_cfg.kd_weight > 0
        out = chunked_distill_loss(
            hidden.flatten(0, 1),
            self.student.get_output_embeddings().weight,
            labels.flatten(),
            teacher_hidden.flatten(0, 1) if use_kd else None,
            self.teacher_head if use_kd else None,
            vocab_size=self.vocab_size,
            temperature=self.loss_cfg.temperature,
            ce_weight=self.loss_cfg.ce_weight,
            kd_weight=self.loss_cfg.kd_weight if use_kd else 0.0,
            chunk_size_tokens=self.loss_cfg.chunk_size_tokens,
            student_softcap=self.softcaps[0],
            teacher_softcap=self.softcaps[1],
        )
        return {
            "loss": out.loss,
            "ce": out.ce,
            "kd": out.kd,
            "ce_tokens": torch.tensor(float(out.num_ce_tokens)),
            "kd_tokens": torch.tensor(float(out.num_kd_tokens)),
        }


@dataclass
class LoopState:
    """What a checkpoint must restore besides the engine: optimizer steps done and samples consumed."""

    step: int = 0
    consumed_samples: int = 0


def _forward(student_engine, teacher_engine, windows, vocab_map):
    """One micro-batch through teacher (no grad) and student; returns the student module's dict."""
    batch = collate_clm(windows, vocab_map)
    dev = student_engine.device
    teacher_hidden = None
    if teacher_engine is not None:
        with torch.no_grad():
            teacher_hidden = teacher_engine(batch["teacher_input_ids"].to(dev))
    out = student_engine(batch["input_ids"].to(dev), batch["labels"].to(dev), teacher_hidden)
    out["dropped_tokens"] = batch["dropped_tokens"].float()
    return out


class _Totals:
    """Token-weighted sums of CE/KD over micro-batches, reduced over ranks on read."""

    def __init__(self):
        self.values = torch.zeros(5, dtype=torch.float64)

    def add(self, out: dict) -> None:
        self.values += torch.tensor(
            [out["ce"].item() * out["ce_tokens"].item(), out["ce_tokens"].item(),
             out["kd"].item() * out["kd_tokens"].item(), out["kd_tokens"].item(), out["dropped_tokens"].item()],
            dtype=torch.float64,
        )

    def reduce(self) -> dict[str, float]:
        ce_sum, ce_n, kd_sum, kd_n, dropped = distributed.all_reduce_sum(self.values).tolist()
        return {"ce": ce_sum / max(ce_n, 1), "kd": kd_sum / max(kd_n, 1), "tokens": ce_n, "dropped_tokens": dropped}


def evaluate_loss(student_engine, teacher_engine, dataset, vocab_map, micro_batch_size: int, max_batches: int) -> dict:
    """Held-out CE (nats/token), KD and perplexity over up to ``max_batches`` micro-batches per rank.

    Every rank runs the same number of forward passes (ZeRO-3 gathers are collective); the
    last batches wrap around to the start of ``dataset`` when it does not divide evenly.
    """
    world, rank = distributed.world_size(), distributed.rank()
    per_step = world * micro_batch_size
    batches = max(1, min(max_batches, math.ceil(len(dataset) / per_step)))
    totals = _Totals()
    student_engine.eval()
    with torch.no_grad():
        for b in range(batches):
            idx = micro_batch_indices(b * per_step, rank, world, micro_batch_size)
            totals.add(_forward(student_engine, teacher_engine, [dataset[i % len(dataset)] for i in idx], vocab_map))
    student_engine.train()
    metrics = totals.reduce()
    metrics["ppl"] = math.exp(min(metrics["ce"], 50.0))
    return metrics


def train_loop(
    student_engine,
    teacher_engine,
    train_data,
    valid_data,
    vocab_map,
    train: TrainConfig,
    state: LoopState,
    metrics_logger,
    save_fn,
    seq_len_tokens: int,
) -> dict:
    """Run optimizer steps from ``state.step`` to ``train.max_steps``; returns throughput totals.

    With ``train.exit_after_steps`` the loop stops early (the caller checkpoints), so a
    time-limited job can be resumed by rerunning the same command.

    ``save_fn(state)`` is called (on all ranks) every ``train.save_every_steps`` steps.
    Logged per step (rank 0): loss, ce, kd (nats/token), lr, grad_norm, tokens/s (all ranks).
    """
    from megadistill.logging import progress_bar

    world, rank = distributed.world_size(), distributed.rank()
    tokens_per_step = world * train.micro_batch_size * train.grad_accum_steps * seq_len_tokens
    bar = progress_bar(train.max_steps, state.step, distributed.is_main())
    start, steps_run = time.time(), 0
    stop_at = train.max_steps if train.exit_after_steps is None else min(train.max_steps, state.step + train.exit_after_steps)
    while state.step < stop_at:
        t0, totals = time.time(), _Totals()
        lr = student_engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside step()
        for _ in range(train.grad_accum_steps):
            idx = micro_batch_indices(state.consumed_samples, rank, world, train.micro_batch_size)
            state.consumed_samples += world * train.micro_batch_size
            out = _forward(student_engine, teacher_engine, [train_data[i] for i in idx], vocab_map)
            student_engine.backward(out["loss"])
            student_engine.step()
            totals.add(out)
        state.step += 1
        steps_run += 1
        metrics = totals.reduce()
        metrics["loss"] = metrics_loss(metrics, student_engine.module.loss_cfg)
        metrics["lr"] = lr
        metrics["grad_norm"] = float(student_engine.get_global_grad_norm() or 0.0)
        metrics["tokens_per_s"] = tokens_per_step / max(time.time() - t0, 1e-9)
        if state.step % train.log_every_steps == 0:
            metrics_logger.log(state.step, "train", metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", ce=f"{metrics['ce']:.3f}", kd=f"{metrics['kd']:.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}")
        if valid_data is not None and train.eval_every_steps and state.step % train.eval_every_steps == 0 and state.step < stop_at:
            metrics_logger.log(state.step, "valid", evaluate_loss(student_engine, teacher_engine, valid_data, vocab_map,
                                                                  train.micro_batch_size, train.eval_max_batches))
        if train.save_every_steps and state.step % train.save_every_steps == 0 and state.step < stop_at:
            save_fn(state)
    bar.close()
    elapsed = time.time() - start
    return {"steps_run": steps_run, "train_time_s": elapsed,
            "tokens_per_s": steps_run * tokens_per_step / max(elapsed, 1e-9), "tokens_per_step": tokens_per_step}


def metrics_loss(metrics: dict, loss: LossConfig) -> float:
    """The objective ``ce_weight * ce + kd_weight * kd`` from token-weighted means (nats/token)."""
    return loss.ce_weight * metrics["ce"] + loss.kd_weight * metrics["kd"]
