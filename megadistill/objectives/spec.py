"""KDSpec: the distillation loss settings, built and validated once from ``LossConfig``.

Everything the chunked loss needs besides tensors lives here, so
:func:`megadistill.losses.logits.chunked_distill_loss` takes one validated spec instead of
a long list of keyword arguments, and the divergence, temperature and top-k settings are
checked in one place. Scheduled weights and temperature (``loss.schedule``) are applied per
optimizer step with :meth:`KDSpec.at`, which returns a copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megadistill.losses.divergences import DIVERGENCES, LOGIT_DIVERGENCES, check_divergence

__all__ = ["KDSpec", "LossNormalizer"]


@dataclass(frozen=True)
class KDSpec:
    """Scalar settings of ``ce_weight * CE + kd_weight * KD`` over a vocabulary of ``vocab_size`` ids.

    Attributes:
        vocab_size: real student vocabulary ``V`` (head rows past it are padding, never scored).
        ce_weight: weight of cross entropy on the labels (unitless, >= 0).
        kd_weight: weight of the KD divergence (unitless, >= 0); 0 skips KD.
        temperature: KD softmax temperature ``T > 0``; probability divergences are scaled by
            ``T**2`` (Hinton et al. 2015, arXiv:1503.02531). CE always uses ``T = 1``.
        divergence: a name from :data:`megadistill.losses.divergences.DIVERGENCES`.
        jsd_beta: teacher weight of the JSD mixture (0 = forward KL, 1 = reverse KL).
        top_k: with a dense teacher, keep its top-k entries plus a tail bucket (None = all).
        top_p: with ``top_k``, the smallest prefix reaching this mass, at most ``top_k`` entries.
        chunk_size_tokens: tokens per chunk of logits (resolved: never 0).
        student_softcap, teacher_softcap: Gemma-style final-logit ``cap * tanh(z / cap)``, or None.
    """

    vocab_size: int
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    top_k: int | None = None
    top_p: float = 1.0
    chunk_size_tokens: int = 1024
    student_softcap: float | None = None
    teacher_softcap: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field that is out of range."""
        check_divergence(self.divergence, self.jsd_beta)
        if self.vocab_size < 1:
            raise ValueError(f"KDSpec.vocab_size must be >= 1, got {self.vocab_size}")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.ce_weight < 0 or self.kd_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got ce {self.ce_weight}, kd {self.kd_weight}")
        if self.chunk_size_tokens < 1:
            raise ValueError(f"loss.chunk_size_tokens must be >= 1 once resolved, got {self.chunk_size_tokens}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"loss.top_k must be >= 1 (or None/0 for the full distribution), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"loss.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.divergence in LOGIT_DIVERGENCES:
            raise ValueError(f"loss.divergence {self.divergence} compares full logits: it cannot use loss.top_k")

    @classmethod
    def from_config(cls, loss, vocab_size: int, student_softcap: float | None = None,
                    teacher_softcap: float | None = None) -> "KDSpec":
        """The spec of a :class:`megadistill.config.LossConfig` for a ``vocab_size``-id student.

        ``loss.chunk_size_tokens == 0`` is resolved to ~64 MiB per fp32 ``[chunk, V]`` buffer and
        ``loss.top_k == 0`` to None (full distribution).

        Raises:
            ValueError: as :meth:`validate`.
        """
        from megadistill.losses.logits import auto_chunk_size_tokens

        if loss.divergence not in DIVERGENCES:
            raise ValueError(f"loss.divergence must be one of {', '.join(DIVERGENCES)}, got {loss.divergence!r}")
        return cls(vocab_size=vocab_size, ce_weight=loss.ce_weight, kd_weight=loss.kd_weight,
                   temperature=loss.temperature, divergence=loss.divergence, jsd_beta=loss.jsd_beta,
                   top_k=loss.top_k or None, top_p=loss.top_p,
                   chunk_size_tokens=loss.chunk_size_tokens or auto_chunk_size_tokens(vocab_size),
                   student_softcap=student_softcap, teacher_softcap=teacher_softcap)

    def at(self, weights) -> "KDSpec":
        """A copy with the scheduled ``ce_weight``, ``kd_weight`` and ``temperature`` of a
        :class:`megadistill.losses.schedule.LossWeights`."""
        return dataclasses.replace(self, ce_weight=weights.ce_weight, kd_weight=weights.kd_weight,
                                   temperature=weights.temperature)


@dataclass(frozen=True)
class LossNormalizer:
    """Divisors that turn this micro-batch's loss sums into its share of the global-batch token mean.

    Every loss is a mean over the valid tokens of the whole global batch (all micro-batches of
    the optimizer step, all ranks). Each rank's backward is averaged by DeepSpeed over ranks and
    gradient-accumulation steps (a factor ``1 / (world * accum)``), so a micro-batch's loss is
    ``sum_local / (global_count / (world * accum))``: its divisor is the global count per micro-batch.

    Attributes:
        ce_tokens: divisor of the CE sum (global CE tokens / (world * accum)), > 0.
        kd_tokens: divisor of the KD sum (global KD tokens / (world * accum)), > 0.
    """

    ce_tokens: float
    kd_tokens: float
