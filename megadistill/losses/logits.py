"""Chunked CE + temperature KD loss from hidden states and output heads, never holding full logits.

The student's loss over a trimmed vocabulary of ``V`` ids is

    loss = ce_weight * CE(z_s, labels) + kd_weight * tau**2 * KL(softmax(z_t/tau) || softmax(z_s/tau))

with ``z_s = h_s @ W_s[:V].T`` and ``z_t = h_t @ W_t.T`` (optionally soft-capped). Tokens are
processed in chunks: each chunk's logits are built in fp32, its loss terms summed, and its
gradients w.r.t. the student hidden states and head computed on the spot, so the backward pass
only scales stored gradients. This is the "gradient in forward" idea of Liger-Kernel's fused
linear cross-entropy / JSD (Hsu et al. 2024, arXiv:2410.10989), written here in plain PyTorch;
the temperature-scaled KD term follows Hinton et al. 2015 (arXiv:1503.02531).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DistillLossOutput", "chunked_distill_loss"]


@dataclass
class DistillLossOutput:
    """Result of :func:`chunked_distill_loss`.

    Attributes:
        loss: scalar fp32, differentiable; ``ce_weight * ce + kd_weight * kd``.
        ce: scalar fp32, detached; mean cross entropy over label tokens, nats/token
            (0 when there are none).
        kd: scalar fp32, detached; mean ``tau**2 * KL(p_T^tau || p_S^tau)`` over KD tokens,
            nats/token (0 when KD is skipped or there are no KD tokens).
        num_ce_tokens: tokens whose label is not ``ignore_index``.
        num_kd_tokens: tokens that received KD (0 when KD is skipped).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    num_ce_tokens: int
    num_kd_tokens: int


@dataclass(frozen=True)
class _Spec:
    """Scalar settings shared by every chunk (internal)."""

    vocab_size: int
    temperature: float
    ce_weight: float
    kd_weight: float
    chunk_size_tokens: int
    student_softcap: float | None
    teacher_softcap: float | None


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    kd_mask: torch.Tensor | None = None,
    chunk_size_tokens: int = 1024,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    ignore_index: int = -100,
) -> DistillLossOutput:
    """Cross entropy plus temperature KD, computed over token chunks with fused gradients.

    Args:
        student_hidden: ``[N, Hs]`` float (fp32/bf16/fp16) final student hidden states.
        student_weight: ``[Vp, Hs]`` student output projection (may be a tied embedding);
            ``Vp >= V``. Rows ``>= V`` are vocabulary padding: they never get probability
            (they are left out of the softmax) and get zero gradient.
        labels: ``[N]`` int64 student ids in ``[0, V)``, or ``ignore_index`` for no CE.
        teacher_hidden: ``[N, Ht]`` float teacher hidden states; never differentiated.
            ``None`` skips KD.
        teacher_weight: ``[V, Ht]`` teacher head already restricted to the kept ids, rows in
            student-id order, so its softmax is the teacher distribution renormalized over
            the kept ids.
        vocab_size: real student vocabulary ``V``; default ``Vp``.
        temperature: KD temperature ``tau > 0``; CE always uses ``tau = 1``. The KD term is
            multiplied by ``tau**2`` so its gradient scale does not depend on ``tau``
            (Hinton et al. 2015).
        ce_weight, kd_weight: loss weights; ``kd_weight == 0`` skips KD.
        kd_mask: ``[N]`` bool, positions that get KD; default ``labels != ignore_index``.
        chunk_size_tokens: tokens per chunk. Peak extra memory is about
            ``4 * chunk_size_tokens * V * 4`` bytes plus one fp32 copy of each head when it is
            not already fp32 (and an fp32 ``[Vp, Hs]`` gradient accumulator).
        student_softcap, teacher_softcap: Gemma-2 style ``cap * tanh(z / cap)`` on logits.
        ignore_index: label value that means "no CE at this position".

    Returns:
        :class:`DistillLossOutput`; ``loss`` carries gradients to ``student_hidden`` and
        ``student_weight`` (in their own dtypes) when grad mode is on and they require it.

    Raises:
        ValueError: mismatched shapes, a teacher head whose row count is not ``V``,
            ``temperature <= 0``, ``chunk_size_tokens <= 0``, or a label outside ``[0, V)``.
    """
    vocab = student_weight.shape[0] if vocab_size is None else vocab_size
    use_kd = teacher_hidden is not None and kd_weight != 0
    _check_shapes(student_hidden, student_weight, labels, vocab, kd_mask)
    if use_kd:
        _check_teacher(student_hidden, teacher_hidden, teacher_weight, vocab)
    _check_scalars(temperature, chunk_size_tokens)
    ce_mask = labels != ignore_index
    _check_labels(labels, ce_mask, vocab)
    if not use_kd:
        kd_mask = torch.zeros_like(ce_mask)
    kd_mask = ce_mask if kd_mask is None else kd_mask.bool()

    spec = _Spec(vocab, temperature, ce_weight, kd_weight, chunk_size_tokens, student_softcap, teacher_softcap)
    safe_labels = torch.where(ce_mask, labels, torch.zeros_like(labels))
    args = (student_hidden, student_weight, safe_labels, ce_mask, kd_mask, teacher_hidden, teacher_weight, spec)
    wants_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    if wants_grad:
        loss, ce, kd = _FusedDistillLoss.apply(*args)
    else:
        loss, ce, kd, _, _ = _distill_forward(*args, grad_hidden=False, grad_weight=False)
    return DistillLossOutput(loss, ce, kd, int(ce_mask.sum()), int(kd_mask.sum()))


def _check_shapes(hidden, weight, labels, vocab, kd_mask) -> None:
    """Raise ``ValueError`` unless the student-side tensors agree on N, Hs and V."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"student_hidden must be [N, Hs] and student_weight [Vp, Hs], got {tuple(hidden.shape)} "
            f"and {tuple(weight.shape)}: flatten batch and sequence with hidden.reshape(-1, hidden.shape[-1])"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"student_hidden has width {hidden.shape[1]} but student_weight has {weight.shape[1]} columns")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if kd_mask is not None and kd_mask.shape != (hidden.shape[0],):
        raise ValueError(f"kd_mask must be [N] = [{hidden.shape[0]}], got {tuple(kd_mask.shape)}")
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"vocab_size {vocab} must be in [1, {weight.shape[0]}] (rows of student_weight)")


def _check_teacher(student_hidden, teacher_hidden, teacher_weight, vocab) -> None:
    """Raise ``ValueError`` unless the teacher tensors match N, Ht and exactly V rows."""
    if teacher_weight is None:
        raise ValueError("teacher_hidden was given without teacher_weight: pass the teacher head restricted to kept ids")
    if teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != student_hidden.shape[0]:
        raise ValueError(
            f"teacher_hidden must be [N, Ht] with N = {student_hidden.shape[0]}, got {tuple(teacher_hidden.shape)}"
        )
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(
            f"teacher_weight must be [V, Ht] with Ht = {teacher_hidden.shape[1]}, got {tuple(teacher_weight.shape)}"
        )
    if teacher_weight.shape[0] != vocab:
        raise ValueError(
            f"teacher head has {teacher_weight.shape[0]} rows but the student vocabulary has {vocab} ids: "
            "restrict the teacher head with VocabMap (padded vocab rows?)"
        )


def _check_scalars(temperature: float, chunk_size_tokens: int) -> None:
    """Raise ``ValueError`` for a non-positive temperature or chunk size."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size_tokens <= 0:
        raise ValueError(f"chunk_size_tokens must be > 0, got {chunk_size_tokens}")


def _check_labels(labels: torch.Tensor, ce_mask: torch.Tensor, vocab: int) -> None:
    """Raise ``ValueError`` naming one label outside ``[0, V)`` that is not ``ignore_index``."""
    bad = ce_mask & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"label {value} is outside the student vocabulary [0, {vocab}) and is not ignore_index: "
            "remap teacher ids to student ids with VocabMap before the loss"
        )


class _FusedDistillLoss(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward, backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ce_mask, kd_mask, t_hidden, t_weight, spec):
        loss, ce, kd, grad_h, grad_w = _distill_forward(
            hidden, weight, labels, ce_mask, kd_mask, t_hidden, t_weight, spec,
            grad_hidden=ctx.needs_input_grad[0], grad_weight=ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        # The common case is loss.backward() with grad 1: skip two full-size multiplies.
        if not bool(grad_loss == 1):
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def _distill_forward(hidden, weight, labels, ce_mask, kd_mask, t_hidden, t_weight, spec, *, grad_hidden, grad_weight):
    """Loop over chunks of active tokens; return (loss, ce, kd, grad_hidden, grad_weight).

    Only tokens with CE or KD are projected; the others have zero gradient.
    """
    num_ce, num_kd = ce_mask.sum(), kd_mask.sum()
    # Global normalization: each token's gradient weight is fixed before chunking.
    ce_scale = ce_mask.float() * (spec.ce_weight / num_ce.clamp(min=1))
    kd_scale = kd_mask.float() * (spec.kd_weight / num_kd.clamp(min=1))
    rows = (ce_mask | kd_mask).nonzero().squeeze(1)
    w32 = weight[: spec.vocab_size].float()  # no copy when already fp32
    tw32 = None if t_weight is None or not bool(kd_mask.any()) else t_weight.detach().float()
    acc = _Accumulator(hidden, weight, spec.vocab_size, grad_hidden, grad_weight)
    want_grad = grad_hidden or grad_weight

    for start in range(0, rows.numel(), spec.chunk_size_tokens):
        idx = rows[start : start + spec.chunk_size_tokens]
        h32 = hidden[idx].detach().float()
        t_h = None if tw32 is None else t_hidden[idx]
        ce_sum, kd_sum, grad_z = _chunk_loss_and_grad(
            h32, w32, labels[idx], ce_mask[idx], ce_scale[idx], kd_mask[idx], kd_scale[idx], t_h, tw32, spec, want_grad
        )
        acc.add(idx, h32, w32, ce_sum, kd_sum, grad_z)

    ce = acc.ce_sum / num_ce.clamp(min=1)
    kd = acc.kd_sum / num_kd.clamp(min=1)
    loss = spec.ce_weight * ce + spec.kd_weight * kd
    grad_h, grad_w = acc.grads()
    return loss, ce, kd, grad_h, grad_w


class _Accumulator:
    """Running loss sums and gradient buffers across chunks (internal)."""

    def __init__(self, hidden, weight, vocab, grad_hidden, grad_weight):
        self.ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        self.kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        self.hidden_dtype, self.weight_dtype = hidden.dtype, weight.dtype
        self.grad_h = torch.zeros_like(hidden) if grad_hidden else None
        # fp32 across chunks so a bf16 head is rounded once, not once per chunk.
        self.grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        self.vocab = vocab

    def add(self, idx, h32, w32, ce_sum, kd_sum, grad_z) -> None:
        """Add one chunk's sums and, given ``grad_z`` ``[c, V]`` fp32, its parameter grads.

        ``grad_z is None`` leaves this chunk's gradients at zero.
        """
        self.ce_sum += ce_sum
        self.kd_sum += kd_sum
        if grad_z is None:
            return
        if self.grad_h is not None:
            self.grad_h[idx] = (grad_z @ w32).to(self.hidden_dtype)
        if self.grad_w32 is not None:
            self.grad_w32[: self.vocab].addmm_(grad_z.T, h32)

    def grads(self):
        """Return ``(grad_hidden, grad_weight)`` in the inputs' dtypes (``None`` when not wanted)."""
        grad_w = None if self.grad_w32 is None else self.grad_w32.to(self.weight_dtype)
        return self.grad_h, grad_w


def _teacher_logits(t_hidden: torch.Tensor, tw32: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """Teacher ``[c, V]`` fp32 logits (soft-capped), outside autograd."""
    with torch.no_grad():
        logits = t_hidden.detach().float() @ tw32.T
        return _softcap_(logits, spec.teacher_softcap)


def _chunk_loss_and_grad(h32, w32, labels, ce_mask, ce_scale, kd_mask, kd_scale, t_hidden, tw32, spec, want_grad):
    """One chunk: return (ce_sum, kd_sum, d loss / d raw student logits ``[c, V]`` fp32 or None).

    ``t_hidden`` is ``None`` when the chunk gets no KD. The gradient is ``None`` when not
    wanted or when no term depends on the student (``ce_weight == 0`` without KD).
    """
    z = _softcap_(h32 @ w32.T, spec.student_softcap)
    kd_sum, grad_z = torch.zeros((), dtype=torch.float32, device=z.device), None
    if t_hidden is not None:
        # KD before CE, and the teacher logits passed without a name here, so that they are
        # freed before the CE buffers exist: peak stays at about four [c, V] fp32 buffers.
        kd_sum, grad_z = _kd_sum_and_grad(
            z, _teacher_logits(t_hidden, tw32, spec), kd_mask, kd_scale, spec.temperature, want_grad
        )
    ce_sum, ce_grad = _ce_sum_and_grad(z, labels, ce_mask, ce_scale, want_grad and spec.ce_weight != 0)
    if ce_grad is not None:
        grad_z = ce_grad if grad_z is None else grad_z.add_(ce_grad)
    if grad_z is not None and spec.student_softcap is not None:
        # d/dx cap*tanh(x/cap) = 1 - tanh^2(x/cap), and tanh(x/cap) = z/cap.
        grad_z.mul_(z.div_(spec.student_softcap).square_().neg_().add_(1))
    return ce_sum, kd_sum, grad_z


def _ce_sum_and_grad(z, labels, ce_mask, ce_scale, want_grad):
    """Summed CE (nats) of logits ``z`` ``[c, V]`` over masked rows, and its scaled logit grad."""
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    ce_sum = ((lse - target) * ce_mask).sum()
    if not want_grad:
        return ce_sum, None
    # dCE/dz = softmax(z) - onehot(label), weighted per token by ce_weight / num_ce_tokens.
    grad = (z - lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, labels.unsqueeze(1), torch.full_like(target, -1.0).unsqueeze(1))
    return ce_sum, grad.mul_(ce_scale.unsqueeze(1))


def _kd_sum_and_grad(z, t_logits, kd_mask, kd_scale, temperature, want_grad):
    """Summed ``tau**2 * KL(p_t || p_s)`` (nats) over ``kd_mask`` rows, and its scaled logit grad.

    ``z`` and ``t_logits`` are ``[c, V]`` fp32 student and teacher logits; ``t_logits`` is
    overwritten. The gradient ``[c, V]`` fp32 is ``None`` unless ``want_grad``.
    """
    log_pt = _log_softmax_(t_logits.div_(temperature))
    log_ps = _log_softmax_(z / temperature)
    p_t = log_pt.exp()
    kl_rows = _row_dot(p_t, log_pt) - _row_dot(p_t, log_ps)
    kd_sum = temperature**2 * (kl_rows * kd_mask).sum()
    if not want_grad:
        return kd_sum, None
    # d(tau^2 KL)/dz = tau * (softmax(z/tau) - p_t), weighted by kd_weight / num_kd_tokens.
    grad = log_ps.exp_().sub_(p_t)
    return kd_sum, grad.mul_((temperature * kd_scale).unsqueeze(1))


def _softcap_(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """In place ``cap * tanh(logits / cap)`` (Gemma 2 final-logit soft-capping); no-op for ``None``."""
    if cap is None:
        return logits
    return logits.div_(cap).tanh_().mul_(cap)


def _log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """In-place log-softmax over the last dim, to avoid one more ``[c, V]`` buffer."""
    return x.sub_(torch.logsumexp(x, dim=-1, keepdim=True))


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product ``[c, V] x [c, V] -> [c]`` without a ``[c, V]`` product buffer."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
