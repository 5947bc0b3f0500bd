"""KD between class logits (sequence or token classification): KL at a temperature, or MSE on logits.

* ``kl``: ``T^2 * KL(softmax(t / T) || softmax(s / T))`` per example (Hinton et al. 2015,
  arXiv:1503.02531; the T^2 keeps the gradient scale of the soft term independent of T).
* ``mse``: mean over classes of ``(s - t)^2`` per example, on raw logits (Tang et al. 2019,
  "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", arXiv:1903.12136;
  Kim et al. 2021, arXiv:2105.08919, show it is KD's T -> infinity limit). No temperature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLASS_KD_LOSSES = ("kl", "mse")

__all__ = ["CLASS_KD_LOSSES", "class_logit_kd"]


def class_logit_kd(student: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float = 1.0) -> torch.Tensor:
    """Per-example KD between ``[N, C]`` student and teacher class logits; returns ``[N]`` fp32 (nats for ``kl``).

    Gradients flow into ``student`` only (``teacher`` is detached).

    Raises:
        ValueError: an unknown ``kind``, a non-positive temperature, or shapes that differ.
    """
    if kind not in CLASS_KD_LOSSES:
        raise ValueError(f"task.kd_loss {kind!r}: choose one of {', '.join(CLASS_KD_LOSSES)}")
    if temperature <= 0:
        raise ValueError(f"task.temperature must be > 0, got {temperature}")
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ: "
                         "the teacher must be fine-tuned on the same label set")
    student, teacher = student.float(), teacher.detach().float()
    if kind == "mse":
        return (student - teacher).pow(2).mean(dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(dim=-1)
