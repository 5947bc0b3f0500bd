"""Step schedules for the loss weights and the KD temperature (constant, linear, cosine).

Annealing the CE/KD mix or the temperature over training is common in KD recipes (e.g.
MiniLLM and DistilBERT-style warm starts); the schedule shapes here are the same as the
learning-rate ones: linear interpolation, or half a cosine from start to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LossWeights:
    """The loss settings in force at one optimizer step.

    Attributes:
        ce_weight: weight of next-token cross entropy (unitless).
        kd_weight: weight of the KD divergence (unitless).
        temperature: KD softmax temperature (> 0).
    """

    ce_weight: float
    kd_weight: float
    temperature: float


def scheduled_value(start: float, end: float | None, kind: str, step: int, total_steps: int) -> float:
    """Value at optimizer step ``step`` (0-based) of a schedule from ``start`` to ``end``.

    ``end is None`` or ``kind == "constant"`` keeps ``start``. ``linear`` and ``cosine`` reach
    ``end`` at ``step == total_steps`` and stay there afterwards.

    Raises:
        ValueError: unknown ``kind`` or ``total_steps < 1``.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"schedule needs total_steps >= 1, got {total_steps}")
    if end is None or kind == "constant":
        return start
    progress = min(1.0, max(0.0, step / total_steps))
    if kind == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    return start + (end - start) * progress


def loss_weights_at(loss, step: int, total_steps: int) -> LossWeights:
    """The :class:`LossWeights` of a ``LossConfig`` at optimizer step ``step`` of ``total_steps``."""
    total = loss.schedule_steps or total_steps
    return LossWeights(
        ce_weight=scheduled_value(loss.ce_weight, loss.ce_weight_end, loss.schedule, step, total),
        kd_weight=scheduled_value(loss.kd_weight, loss.kd_weight_end, loss.schedule, step, total),
        temperature=scheduled_value(loss.temperature, loss.temperature_end, loss.schedule, step, total),
    )
