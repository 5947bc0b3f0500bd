"""THE training loop: a plain function over an iterator of micro-batches, shared by every stage.

It owns gradient accumulation, the global-batch loss normalization, logging, the eval and
save cadence (including the last step) and ``train.exit_after_steps``. It never sees datasets,
tokenizers or model families: a stage hands it a :class:`LoopParts` (see ``megadistill/stages/``).

The student engine's module (an objective such as :class:`megadistill.objectives.lm.LMObjective`)
must provide ``counts(batch) -> {"ce_tokens", "kd_tokens"}`` (from CPU tensors) and
``forward(batch, signal, step, normalizer) -> {"loss", "stats"}``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megadistill import distributed
from megadistill.config import TrainConfig
from megadistill.objectives.spec import LossNormalizer

__all__ = ["LoopParts", "LoopState", "NonFiniteError", "evaluate", "run"]

log = logging.getLogger("megadistill.loop")


@dataclass
class LoopState:
    """What a checkpoint must restore besides the engine: optimizer steps done, global samples consumed,
    and steps skipped for a non-finite loss or gradient norm (counted in ``step``: their data is consumed)."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


class NonFiniteError(RuntimeError):
    """``train.max_bad_steps`` optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class LoopParts:
    """What a stage hands the loop.

    Attributes:
        engine: the student engine (DeepSpeed); ``engine.module`` is the objective.
        train_batches: ``f(consumed_samples) -> iterator`` of this rank's micro-batches (dicts of CPU
            tensors) from that global sample count on; each dict has ``samples``: global samples
            (all ranks) the micro-batch consumes.
        teacher: ``.signal(batch) -> TeacherSignal`` for training batches (:mod:`megadistill.teachers`).
        metrics: summed stats (over micro-batches and ranks) -> logged metrics (e.g. ``lm_metrics``).
        save: ``f(state)`` writes a checkpoint (collective: every rank calls it).
        tokens_per_sample: tokens one sample feeds the student (for tokens/s).
        eval_batches: ``f() -> iterable`` of this rank's held-out micro-batches (every rank the same
            number), or None for no evaluation.
        eval_teacher: teacher for held-out batches (an offline cache covers only training windows).
        log: ``f(step, split, metrics)`` (e.g. :class:`megadistill.logging.MetricsLogger.log`).
        on_eval: ``f(step, metrics)`` after each held-out evaluation, on every rank (collective: e.g.
            the task stage exports its best dev checkpoint), or None.
        stop: anything with a ``requested`` bool (:class:`megadistill.stop.GracefulStop`): when set on
            any rank, the loop saves after the current step and returns; None: never stops early.
    """

    engine: object
    train_batches: Callable[[int], Iterator[dict]]
    teacher: object
    metrics: Callable[[dict], dict]
    save: Callable[[LoopState], None]
    tokens_per_sample: int
    eval_batches: Callable[[], Iterable[dict]] | None = None
    eval_teacher: object = None
    log: Callable[[int, str, dict], None] = field(default=lambda step, split, metrics: None)
    on_eval: Callable[[int, dict], None] | None = None
    stop: object = None


class _Totals:
    """Named stats summed over micro-batches; reduced over ranks on read (one host sync)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        # Stays on the stats' device (no host sync per micro-batch).
        for name, value in stats.items():
            value = value.detach().double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def reduce(self) -> dict[str, float]:
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n].to(self.sums[names[0]].device) for n in names])
        # host sync: one all-reduce and one copy of every named sum per step (the logged metrics).
        values = distributed.all_reduce_sum(stacked).tolist()
        return dict(zip(names, values))


def global_normalizer(counts: list[dict[str, int]], accum_steps: int) -> LossNormalizer:
    """The :class:`LossNormalizer` of one optimizer step from its micro-batches' token counts on this rank.

    Sums the counts over the step's micro-batches and over ranks (one all-reduce of two numbers,
    computed from CPU labels before any forward), then divides by ``world * accum`` because the
    engine averages gradients over both.
    """
    local = torch.tensor([[c["ce_tokens"], c["kd_tokens"]] for c in counts], dtype=torch.float64).sum(0)
    total = distributed.all_reduce_sum(local)
    per_micro = distributed.world_size() * accum_steps
    return LossNormalizer(ce_tokens=max(float(total[0]), 1.0) / per_micro, kd_tokens=max(float(total[1]), 1.0) / per_micro)


def evaluate(parts: LoopParts, step: int) -> dict[str, float]:
    """Held-out metrics at optimizer step ``step`` (no grad; token means over all ranks' batches)."""
    engine, totals = parts.engine, _Totals()
    engine.eval()
    with torch.no_grad():
        for batch in parts.eval_batches():
            out = engine(batch, parts.eval_teacher.signal(batch), step, None)
            totals.add(out["stats"])
    engine.train()
    metrics = parts.metrics(totals.reduce())
    metrics["ppl"] = math.exp(min(metrics["ce"], 50.0))
    return metrics


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the torch RNG for optimizer step ``step`` on ``rank`` (mixed by NumPy's ``SeedSequence``)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _train_step(parts: LoopParts, batches: Iterator[dict], train: TrainConfig, state: LoopState) -> tuple[dict, list[dict]]:
    """One optimizer step over ``train.grad_accum_steps`` micro-batches.

    Dropout (and anything else drawing from torch's RNG) is seeded from ``(train.seed, step, rank)``,
    so a resumed run draws what the uninterrupted run drew, with no RNG state in the checkpoint.

    Returns:
        The reduced metrics (plus ``stop_requested``: how many ranks were signalled to stop) and
        this rank's micro-batches (for the sample ids of a skipped step).
    """
    torch.manual_seed(step_seed(train.seed, state.step, distributed.rank()))
    engine = parts.engine
    t0 = time.perf_counter()
    micro = [next(batches) for _ in range(train.grad_accum_steps)]
    batch_s = time.perf_counter() - t0
    normalizer = global_normalizer([engine.module.counts(b) for b in micro], train.grad_accum_steps)
    totals = _Totals()
    for batch in micro:
        out = engine(batch, parts.teacher.signal(batch), state.step, normalizer)
        engine.backward(out["loss"])  # the engine already scales by 1 / grad_accum_steps
        engine.step()  # at the boundary: DeepSpeed skips the update when the gradient norm is not finite
        totals.add(out["stats"])
        state.consumed_samples += batch["samples"]
    # The stop flag rides on the step's one all-reduce of the stats: every rank stops at the same step.
    totals.add({"stop_requested": torch.tensor(float(bool(parts.stop is not None and parts.stop.requested)))})
    reduced = totals.reduce()
    stop_requested = reduced.pop("stop_requested")
    metrics = parts.metrics(reduced)
    metrics["stop_requested"] = stop_requested
    metrics.update(_time_breakdown(micro, batch_s))
    return metrics, micro


def _time_breakdown(micro: list[dict], batch_s: float) -> dict[str, float]:
    """This rank's seconds spent making the step's micro-batches (``batch_s``), and of those, sampling
    on-policy continuations (``generate_s``, with ``on_policy_batches`` counted) when any were generated."""
    out = {"batch_s": batch_s}
    generated = [b["generate_s"] for b in micro if "generate_s" in b]
    if generated:
        out.update(generate_s=sum(generated), on_policy_batches=float(len(generated)))
    return out


def sample_ids(micro: list[dict]) -> list:
    """The window / example ids of this rank's micro-batches (``window_ids`` or ``example_ids``)."""
    return [i for b in micro for i in b.get("window_ids", b.get("example_ids", []))]


def _check_finite(parts: LoopParts, train: TrainConfig, state: LoopState, metrics: dict, micro: list[dict],
                  bad_in_row: int) -> int:
    """Count a step whose loss or gradient norm is not finite; returns the new run of bad steps in a row.

    DeepSpeed's ZeRO optimizer skips the update of such a step (no parameter or LR-scheduler change;
    ``engine.was_step_applied()`` is False). The ids of the step's samples on every rank are logged.

    Raises:
        NonFiniteError: the ``train.max_bad_steps``-th bad step in a row, or a non-finite gradient
            norm that was applied anyway (a DeepSpeed without the skip: the parameters are lost).
    """
    applied = parts.engine.was_step_applied()
    if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and applied:
        return 0
    ids = distributed.all_gather_object(sample_ids(micro))  # collective, on this rare path only
    if applied and not math.isfinite(metrics["grad_norm"]):
        raise NonFiniteError(f"step {state.step}: non-finite gradient norm was applied (this DeepSpeed does not skip "
                             "such steps: upgrade deepspeed); restart from the last checkpoint")
    state.skipped_steps += int(not applied)
    log.warning("step %d skipped: loss %s, grad norm %s (non-finite); sample ids per rank: %s (%d skipped so far)",
                state.step, metrics["loss"], metrics["grad_norm"], ids, state.skipped_steps)
    bad_in_row += 1
    if bad_in_row >= train.max_bad_steps:
        raise NonFiniteError(f"{bad_in_row} steps in a row (to step {state.step}) had a non-finite loss or gradient norm "
                             f"(train.max_bad_steps={train.max_bad_steps}); last sample ids per rank: {ids}. Lower optim.lr "
                             "or check the data and teacher signal; the last checkpoint is intact")
    return bad_in_row


def _check_spike(train: TrainConfig, state: LoopState, metrics: dict, recent: deque) -> None:
    """Log a loss above ``train.spike_factor`` x the mean of the recent finite losses (and mark ``spike``)."""
    loss = metrics["loss"]
    if not math.isfinite(loss):
        return
    if train.spike_factor and len(recent) >= 5 and loss > train.spike_factor * (sum(recent) / len(recent)):
        metrics["spike"] = 1.0
        log.warning("step %d: loss spike %.4f (%.1fx the mean of the last %d steps)", state.step, loss,
                    loss / (sum(recent) / len(recent)), len(recent))
    recent.append(loss)


def _step_metrics(parts: LoopParts, metrics: dict, spec, lr: float, tokens: int, seconds: float) -> dict:
    """Add the objective value, scheduled weights, lr, grad norm and throughput to a step's metrics."""
    loss = spec.ce_weight * metrics["ce"] + spec.kd_weight * metrics["kd"] + sum(
        v for k, v in metrics.items() if k.startswith("feat_"))
    metrics.update(loss=loss, lr=lr, ce_weight=spec.ce_weight, kd_weight=spec.kd_weight, temperature=spec.temperature,
                   grad_norm=float(parts.engine.get_global_grad_norm() or 0.0), tokens_per_s=tokens / max(seconds, 1e-9),
                   step_s=seconds)
    return metrics


def run(parts: LoopParts, train: TrainConfig, state: LoopState) -> dict:
    """Run optimizer steps from ``state.step`` to ``train.max_steps`` (or ``exit_after_steps`` more).

    Evaluates every ``train.eval_every_steps`` and at ``max_steps``; saves every
    ``train.save_every_steps`` and at the last step this process runs (so an early exit resumes),
    including a step after which ``parts.stop`` was requested (SIGTERM/SIGINT) on any rank.
    A step with a non-finite loss or gradient norm is skipped by the engine, counted in
    ``state.skipped_steps`` and logged with its sample ids; loss spikes are logged.

    Returns:
        ``{"steps_run", "train_time_s", "tokens_per_s", "tokens_per_step", "valid", "skipped_steps",
        "stopped_by"}`` where ``valid`` is the last held-out evaluation (``{}`` when none ran) and
        ``stopped_by`` the signal that stopped the run early (None otherwise).

    Raises:
        NonFiniteError: ``train.max_bad_steps`` bad steps in a row.
    """
    from megadistill.logging import progress_bar

    engine = parts.engine
    tokens_per_step = distributed.world_size() * train.micro_batch_size * train.grad_accum_steps * parts.tokens_per_sample
    stop_at = train.max_steps if train.exit_after_steps is None else min(train.max_steps, state.step + train.exit_after_steps)
    bar = progress_bar(train.max_steps, state.step, distributed.is_main())
    batches = parts.train_batches(state.consumed_samples)
    start, steps_run, valid, stopped = time.time(), 0, {}, None
    bad_in_row, recent = 0, deque(maxlen=20)
    # The bar closes (ending its line) even when a step raises, so the one-line error that
    # train.cli prints starts a line of its own.
    with bar:
        while state.step < stop_at:
            t0 = time.time()
            lr = engine.get_lr()[0]  # the rate this step uses; the scheduler advances inside step()
            spec = engine.module.spec_at(state.step)
            metrics, micro = _train_step(parts, batches, train, state)
            state.step += 1
            steps_run += 1
            metrics = _step_metrics(parts, metrics, spec, lr, tokens_per_step, time.time() - t0)
            bad_in_row = _check_finite(parts, train, state, metrics, micro, bad_in_row)
            _check_spike(train, state, metrics, recent)
            metrics["skipped_steps"] = float(state.skipped_steps)
            stop_requested = metrics.pop("stop_requested") > 0
            if state.step % train.log_every_steps == 0:
                parts.log(state.step, "train", metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", ce=f"{metrics['ce']:.3f}", kd=f"{metrics['kd']:.3f}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}")
            if parts.eval_batches is not None and (state.step == train.max_steps or (
                    train.eval_every_steps and state.step % train.eval_every_steps == 0)):
                valid = evaluate(parts, state.step)
                parts.log(state.step, "valid", valid)
                if parts.on_eval is not None:
                    parts.on_eval(state.step, valid)
            if stop_requested or state.step == stop_at or (train.save_every_steps and state.step % train.save_every_steps == 0):
                parts.save(state)
            if stop_requested:
                stopped = getattr(parts.stop, "signal_name", None) or "a signal to another rank"
                break
    elapsed = time.time() - start
    return {"steps_run": steps_run, "train_time_s": elapsed, "tokens_per_step": tokens_per_step,
            "tokens_per_s": steps_run * tokens_per_step / max(elapsed, 1e-9), "valid": valid,
            "skipped_steps": state.skipped_steps, "stopped_by": stopped}


def why_not_finished(totals: dict, state: LoopState, max_steps: int, run_dir: Path) -> str | None:
    """Why a job exits without exporting, from :func:`run`'s totals: a signal, an earlier complete
    run (its ``hf/`` export exists and no step ran), ``train.exit_after_steps``; None when finished."""
    if totals["stopped_by"]:
        return (f"stopped by {totals['stopped_by']} after step {state.step} of {max_steps}: checkpoint saved; "
                "rerun the same command to resume")
    if totals["steps_run"] == 0 and (run_dir / "hf" / "config.json").is_file():
        return f"run already complete at step {state.step}: {run_dir / 'hf'} holds its export (use a new run_dir to train again)"
    if state.step < max_steps:
        return f"stopped at step {state.step} of {max_steps} (train.exit_after_steps): rerun the same command to resume"
    return None
