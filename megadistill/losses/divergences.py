"""Per-token divergences between teacher and student distributions, with their logit gradients.

Two families, both evaluated row by row on fp32 ``[c, B]`` tensors (``c`` tokens of a
chunk, ``B`` bins: the vocabulary, or top-k entries plus a tail bucket):

* probability divergences (:data:`PROB_DIVERGENCES`) take log-probabilities ``log_p``
  (teacher) and ``log_q`` (student) and return the per-row value and ``q * dD/dq``, from
  which the caller gets the gradient w.r.t. the student's logits through the softmax
  (``dD/du = q*g - q * sum(q*g)``). ``-inf`` log-probabilities (empty bins) are allowed.
* logit divergences (:data:`LOGIT_DIVERGENCES`) compare raw logits and return the
  gradient w.r.t. the student logits directly.

Sources: forward KL (Hinton et al. 2015, arXiv:1503.02531); reverse KL (MiniLLM, Gu et al.
2024, arXiv:2306.08543); generalized JSD(beta) with the GKD convention (Agarwal et al.
2024, arXiv:2306.13649; TRL's ``generalized_jsd_loss``): mixture ``m = beta*p + (1-beta)*q``,
``JSD = beta*KL(p||m) + (1-beta)*KL(q||m)``, with beta = 0 meaning forward KL and beta = 1
reverse KL (as beta -> 0, JSD/beta -> forward KL; as beta -> 1, JSD/(1-beta) -> reverse KL);
total variation (Wen et al. 2023, "f-Divergence Minimization for Sequence-Level KD",
arXiv:2307.15190); squared error between probabilities (Ba & Caruana 2014 use logits; the
probability form is the "L2 on soft targets" variant); MSE and cosine on logits (Kim et al.
2021, arXiv:2105.08919, show logit MSE is the tau -> infinity limit of KD and works best
for several students).
"""

from __future__ import annotations

import math

import torch

PROB_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tv", "mse_prob")
LOGIT_DIVERGENCES = ("mse", "cosine")
DIVERGENCES = PROB_DIVERGENCES + LOGIT_DIVERGENCES

__all__ = ["DIVERGENCES", "LOGIT_DIVERGENCES", "PROB_DIVERGENCES", "check_divergence", "logit_divergence",
           "prob_divergence"]


def check_divergence(name: str, beta: float) -> None:
    """Raise ``ValueError`` for an unknown divergence name or a JSD beta outside ``[0, 1]``."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}: choose one of {', '.join(DIVERGENCES)}")
    if name == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")


def prob_divergence(name: str, log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5):
    """Row values ``D(p, q)`` and ``q * dD/dq`` for a probability divergence.

    Args:
        name: one of :data:`PROB_DIVERGENCES`.
        log_p: ``[c, B]`` fp32 teacher log-probabilities (rows sum to 1 in probability).
        log_q: ``[c, B]`` fp32 student log-probabilities.
        beta: JSD mixture weight of the teacher, in ``[0, 1]``.

    Returns:
        ``(rows, qg)``: ``rows`` ``[c]`` fp32 divergence per token (nats for the KL family),
        ``qg`` ``[c, B]`` fp32 = ``q * dD/dq`` (0 where ``q == 0``). The gradient w.r.t. the
        student's logits ``u`` (``q = softmax(u)``) is ``qg - q * qg.sum(-1, keepdim=True)``.
    """
    if name == "jsd" and beta in (0.0, 1.0):
        name = "forward_kl" if beta == 0.0 else "reverse_kl"
    if name == "forward_kl":
        p = log_p.exp()
        return _weighted_diff(p, log_p, log_q).sum(-1), p.neg_()
    if name == "reverse_kl":
        qd = _weighted_diff(log_q.exp(), log_q, log_p)
        return qd.sum(-1), qd
    if name == "jsd":
        return _jsd(log_p, log_q, beta)
    p, q = log_p.exp(), log_q.exp()
    diff = q - p
    if name == "tv":
        return 0.5 * diff.abs().sum(-1), 0.5 * q * diff.sign()
    if name == "mse_prob":
        return diff.square().sum(-1), 2.0 * q * diff
    raise ValueError(f"{name!r} is not a probability divergence ({', '.join(PROB_DIVERGENCES)})")


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float):
    """Generalized JSD(beta) for ``0 < beta < 1``: rows and ``q * dD/dq = (1-beta) q (log q - log m)``."""
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    teacher_part = _weighted_diff(log_p.exp(), log_p, log_m).sum(-1)
    qd = _weighted_diff(log_q.exp(), log_q, log_m)
    return beta * teacher_part + (1.0 - beta) * qd.sum(-1), qd.mul_(1.0 - beta)


def _weighted_diff(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w * (a - b)`` with 0 wherever ``w == 0`` (so ``0 * log 0`` terms vanish instead of NaN)."""
    return torch.where(w > 0, w * (a - b), torch.zeros((), dtype=w.dtype, device=w.device))


def logit_divergence(name: str, z_s: torch.Tensor, z_t: torch.Tensor):
    """Row values and student-logit gradients of a logit-space divergence (no temperature).

    Args:
        name: ``mse`` (mean over the vocabulary of ``(z_s - z_t)**2``) or ``cosine``
            (``1 - cos(z_s, z_t)``).
        z_s: ``[c, V]`` fp32 student logits.
        z_t: ``[c, V]`` fp32 teacher logits over the same ids.

    Returns:
        ``(rows [c], grad [c, V])`` fp32, ``grad = d rows / d z_s`` row by row.
    """
    if name == "mse":
        diff = z_s - z_t
        return diff.square().mean(-1), diff.mul_(2.0 / z_s.shape[-1])
    if name == "cosine":
        s_norm = z_s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        t_norm = z_t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = (z_s * z_t).sum(-1, keepdim=True) / (s_norm * t_norm)
        grad = z_s * (cos / s_norm.square()) - z_t / (s_norm * t_norm)
        return 1.0 - cos.squeeze(-1), grad
    raise ValueError(f"{name!r} is not a logit divergence ({', '.join(LOGIT_DIVERGENCES)})")
