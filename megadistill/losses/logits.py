"""Chunked CE + KD losses from hidden states and output heads, never holding full logits.

The student's loss over a trimmed vocabulary of ``V`` ids is

    loss = ce_weight * CE(z_s, labels) + kd_weight * KD(teacher, student)

with ``z_s = h_s @ W_s[:V].T``. The teacher is either dense (``z_t = h_t @ W_t.T``, optionally
soft-capped, its head restricted to the student's ids) or sparse (:class:`SparseTargets`:
top-k entries plus a tail bucket, from an offline cache or taken online from the dense
logits). ``KD`` is one of the divergences in :mod:`megadistill.losses.divergences`
(forward/reverse KL, JSD(beta), total variation, squared error of probabilities: all at
temperature ``tau`` and multiplied by ``tau**2``; MSE or cosine of raw logits).

Tokens are processed in chunks: each chunk's logits are built in fp32, its loss terms
summed, and its gradients w.r.t. the student hidden states and head computed on the spot,
so the backward pass only scales stored gradients. This is the "gradient in forward" idea
of Liger-Kernel's fused linear cross-entropy / JSD (Hsu et al. 2024, arXiv:2410.10989),
written here in plain PyTorch; the temperature-scaled KD term follows Hinton et al. 2015
(arXiv:1503.02531). The student head is read once per call (ZeRO-3 gathers it once per
forward), never once per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megadistill.losses.divergences import LOGIT_DIVERGENCES, check_divergence, logit_divergence, prob_divergence

__all__ = ["DistillLossOutput", "SparseTargets", "auto_chunk_size_tokens", "chunked_distill_loss", "remap_sparse_targets",
           "topk_targets"]


def auto_chunk_size_tokens(vocab_size: int, buffer_bytes: int = 64 * 2**20) -> int:
    """Tokens per chunk so one fp32 ``[chunk, vocab_size]`` buffer is about ``buffer_bytes`` (default 64 MiB).

    The chunked loss keeps about four such buffers alive, so peak extra memory is ~256 MiB
    whatever the vocabulary: 64 tokens at 262,144 ids, 2,383 at 7,040. Measured on CPU
    (``bench/kd_loss_memory.py``), 64-token chunks at 262,144 ids are as fast as full logits.
    """
    return max(1, buffer_bytes // (4 * max(1, vocab_size)))


@dataclass
class SparseTargets:
    """A teacher distribution kept as its top entries plus one tail bucket, per token.

    Attributes:
        ids: ``[N, k]`` int64 vocabulary ids, most probable first. Padding slots (fewer than
            ``k`` entries kept, e.g. after top-p) have ``logprobs == -inf``; their id is
            ignored but must be a valid id (0 is used).
        logprobs: ``[N, k]`` fp32 teacher log-probabilities of ``ids`` (normalized over the
            whole vocabulary), ``-inf`` in padding slots.
        tail_logprob: ``[N]`` fp32 log of the probability mass outside the kept entries
            (``log(1 - sum(exp(logprobs)))``); ``-inf`` when nothing is left over.

    Keeping the tail mass as an explicit bucket keeps every divergence (reverse KL in
    particular) finite and the targets a proper distribution over ``k + 1`` bins.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor

    def __getitem__(self, index) -> "SparseTargets":
        """Rows ``index`` of each field (any tensor index on the token dimension)."""
        return SparseTargets(self.ids[index], self.logprobs[index], self.tail_logprob[index])

    def to(self, device) -> "SparseTargets":
        """The same targets on ``device``."""
        return SparseTargets(self.ids.to(device), self.logprobs.to(device), self.tail_logprob.to(device))


def topk_targets(logits: torch.Tensor, k: int, top_p: float = 1.0) -> SparseTargets:
    """Top-k (optionally top-p, then top-k) sparse targets from teacher logits, with a tail bucket.

    Args:
        logits: ``[N, V]`` float teacher logits (already soft-capped, no temperature).
        k: largest number of kept entries per token, ``1 <= k``; ``k > V`` keeps all.
        top_p: keep the smallest prefix of the sorted distribution whose mass reaches
            ``top_p`` (nucleus, Holtzman et al. 2020), at most ``k`` entries; 1.0 keeps ``k``.

    Returns:
        :class:`SparseTargets` with ``min(k, V)`` slots; the tail log-mass is computed from the
        left-out logits directly (a log-sum-exp), so it stays exact when it is tiny.

    Raises:
        ValueError: ``k < 1``, ``top_p`` outside ``(0, 1]``, or ``logits`` not 2-D.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, ids = logp.topk(min(k, logp.shape[1]), dim=-1)
        if top_p < 1:
            mass_before = values.exp().cumsum(dim=-1) - values.exp()
            values = values.masked_fill(mass_before >= top_p, float("-inf"))
        keep = torch.isfinite(values)
        ids = ids.masked_fill(~keep, 0)
        # scatter_add (not scatter): padding slots add 0 to id 0 and cannot undo a kept id 0's -inf.
        rest = logp.scatter_add(1, ids, torch.where(keep, float("-inf"), 0.0))
        tail = torch.logsumexp(rest, dim=-1)
    return SparseTargets(ids, values, tail)


def remap_sparse_targets(targets: SparseTargets, vocab_map) -> SparseTargets:
    """Move sparse teacher targets from teacher ids to a trimmed student's ids, renormalized.

    Entries whose teacher id the student does not have are removed and the remaining
    entries and the tail are renormalized to sum to one, i.e. the teacher distribution is
    restricted to the student's vocabulary as in the dense path (exact for the kept
    entries; the tail may still hold mass of dropped ids, which top-k cannot separate).

    Args:
        targets: :class:`SparseTargets` in teacher ids.
        vocab_map: :class:`megadistill.models.vocab.VocabMap`.

    Returns:
        :class:`SparseTargets` in student ids (same shapes).
    """
    student_ids, dropped = vocab_map.remap(targets.ids)
    logprobs = targets.logprobs.masked_fill(dropped, float("-inf"))
    ids = student_ids.masked_fill(~torch.isfinite(logprobs), 0)
    total = torch.logsumexp(torch.cat([logprobs, targets.tail_logprob.unsqueeze(1)], dim=1), dim=1)
    return SparseTargets(ids, logprobs - total.unsqueeze(1), targets.tail_logprob - total)


@dataclass
class DistillLossOutput:
    """Result of :func:`chunked_distill_loss`.

    Attributes:
        loss: scalar fp32, differentiable; ``ce_weight * ce + kd_weight * kd``.
        ce: scalar fp32, detached; mean cross entropy over label tokens, nats/token
            (0 when there are none).
        kd: scalar fp32, detached; mean KD divergence over KD tokens (``tau**2 * D`` for the
            probability divergences, nats/token for the KL family; 0 when KD is skipped
            or there are no KD tokens).
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
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    top_k: int | None = None
    top_p: float = 1.0


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
    sparse_targets: SparseTargets | None = None,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> DistillLossOutput:
    """Cross entropy plus KD to a dense or sparse teacher, over token chunks with fused gradients.

    Args:
        student_hidden: ``[N, Hs]`` float (fp32/bf16/fp16) final student hidden states.
        student_weight: ``[Vp, Hs]`` student output projection (may be a tied embedding);
            ``Vp >= V``. Rows ``>= V`` are vocabulary padding: they never get probability
            (they are left out of the softmax) and get zero gradient.
        labels: ``[N]`` int64 student ids in ``[0, V)``, or ``ignore_index`` for no CE.
        teacher_hidden: ``[N, Ht]`` float teacher hidden states; never differentiated.
            ``None`` (and no ``sparse_targets``) skips KD.
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
        sparse_targets: :class:`SparseTargets` with ``N`` rows in student ids (e.g. an offline
            cache after :func:`remap_sparse_targets`), instead of ``teacher_hidden``.
        divergence: a name from :mod:`megadistill.losses.divergences`: ``forward_kl``
            (default), ``reverse_kl``, ``jsd``, ``tv``, ``mse_prob`` (temperature and
            ``tau**2`` apply), or ``mse`` / ``cosine`` on raw logits (temperature does not
            apply; dense teacher only).
        jsd_beta: teacher weight of the JSD mixture (0 = forward KL, 1 = reverse KL).
        top_k, top_p: with a dense teacher, replace each chunk's teacher distribution by
            its top-k (top-p, then top-k) entries plus a tail bucket (:func:`topk_targets`),
            exactly what an offline cache of the same k and p holds.

    With sparse targets the divergence is taken over ``k + 1`` bins: the kept ids and one
    tail bin holding the rest of the mass (the student's tail is the softmax mass of all
    its other ids). The temperature is applied to the student logits and to the teacher's
    bin log-probabilities (the tail bin treated as one entry), which is exact at ``tau = 1``.

    Returns:
        :class:`DistillLossOutput`; ``loss`` carries gradients to ``student_hidden`` and
        ``student_weight`` (in their own dtypes) when grad mode is on and they require it.

    Raises:
        ValueError: mismatched shapes, a teacher head whose row count is not ``V``,
            ``temperature <= 0``, ``chunk_size_tokens <= 0``, a label or sparse target id
            outside ``[0, V)``, an unknown divergence, both or a logit divergence with
            sparse targets.
    """
    vocab = student_weight.shape[0] if vocab_size is None else vocab_size
    use_kd = (teacher_hidden is not None or sparse_targets is not None) and kd_weight != 0
    _check_shapes(student_hidden, student_weight, labels, vocab, kd_mask)
    check_divergence(divergence, jsd_beta)
    if use_kd and sparse_targets is not None:
        _check_sparse(student_hidden, teacher_hidden, sparse_targets, vocab, divergence)
    elif use_kd:
        _check_teacher(student_hidden, teacher_hidden, teacher_weight, vocab)
    _check_scalars(temperature, chunk_size_tokens, top_k, top_p)
    ce_mask = labels != ignore_index
    _check_labels(labels, ce_mask, vocab)
    if not use_kd:
        kd_mask = torch.zeros_like(ce_mask)
    kd_mask = ce_mask if kd_mask is None else kd_mask.bool()

    spec = _Spec(vocab, temperature, ce_weight, kd_weight, chunk_size_tokens, student_softcap, teacher_softcap,
                 divergence, jsd_beta, top_k, top_p)
    safe_labels = torch.where(ce_mask, labels, torch.zeros_like(labels))
    teacher = sparse_targets if sparse_targets is not None else teacher_hidden
    args = (student_hidden, student_weight, safe_labels, ce_mask, kd_mask, teacher, teacher_weight, spec)
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


def _check_sparse(student_hidden, teacher_hidden, targets: SparseTargets, vocab: int, divergence: str) -> None:
    """Raise ``ValueError`` unless sparse targets have ``N`` rows of ids in ``[0, V)`` and fit the divergence."""
    if teacher_hidden is not None:
        raise ValueError("give either teacher_hidden (dense teacher) or sparse_targets, not both")
    if divergence in LOGIT_DIVERGENCES:
        raise ValueError(f"divergence {divergence!r} compares full logits: it needs a dense teacher, not top-k targets")
    n = student_hidden.shape[0]
    if targets.ids.dim() != 2 or targets.ids.shape[0] != n or targets.logprobs.shape != targets.ids.shape \
            or targets.tail_logprob.shape != (n,):
        raise ValueError(f"sparse targets must be ids/logprobs [N, k] and tail [N] with N = {n}, got "
                         f"{tuple(targets.ids.shape)}, {tuple(targets.logprobs.shape)}, {tuple(targets.tail_logprob.shape)}")
    if targets.ids.numel() and (int(targets.ids.min()) < 0 or int(targets.ids.max()) >= vocab):
        raise ValueError(f"sparse target ids must be student ids in [0, {vocab}): "
                         "map cached teacher ids with remap_sparse_targets(targets, vocab_map)")


def _check_scalars(temperature: float, chunk_size_tokens: int, top_k: int | None, top_p: float) -> None:
    """Raise ``ValueError`` for a non-positive temperature, chunk size or k, or top_p outside (0, 1]."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size_tokens <= 0:
        raise ValueError(f"chunk_size_tokens must be > 0, got {chunk_size_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for the full distribution), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


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
    def forward(ctx, hidden, weight, labels, ce_mask, kd_mask, teacher, t_weight, spec):
        loss, ce, kd, grad_h, grad_w = _distill_forward(
            hidden, weight, labels, ce_mask, kd_mask, teacher, t_weight, spec,
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


def _distill_forward(hidden, weight, labels, ce_mask, kd_mask, teacher, t_weight, spec, *, grad_hidden, grad_weight):
    """Loop over chunks of active tokens; return (loss, ce, kd, grad_hidden, grad_weight).

    ``teacher`` is the ``[N, Ht]`` teacher hidden states, a :class:`SparseTargets`, or None.
    Only tokens with CE or KD are projected; the others have zero gradient.
    """
    num_ce, num_kd = ce_mask.sum(), kd_mask.sum()
    # Global normalization: each token's gradient weight is fixed before chunking.
    ce_scale = ce_mask.float() * (spec.ce_weight / num_ce.clamp(min=1))
    kd_scale = kd_mask.float() * (spec.kd_weight / num_kd.clamp(min=1))
    rows = (ce_mask | kd_mask).nonzero().squeeze(1)
    w32 = weight[: spec.vocab_size].float()  # no copy when already fp32
    use_kd = teacher is not None and bool(kd_mask.any())
    tw32 = t_weight.detach().float() if use_kd and t_weight is not None else None
    acc = _Accumulator(hidden, weight, spec.vocab_size, grad_hidden, grad_weight)
    want_grad = grad_hidden or grad_weight

    for start in range(0, rows.numel(), spec.chunk_size_tokens):
        idx = rows[start : start + spec.chunk_size_tokens]
        h32 = hidden[idx].detach().float()
        t_chunk = teacher[idx] if use_kd else None
        ce_sum, kd_sum, grad_z = _chunk_loss_and_grad(
            h32, w32, labels[idx], ce_mask[idx], ce_scale[idx], kd_mask[idx], kd_scale[idx], t_chunk, tw32, spec, want_grad
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


def _chunk_loss_and_grad(h32, w32, labels, ce_mask, ce_scale, kd_mask, kd_scale, t_chunk, tw32, spec, want_grad):
    """One chunk: return (ce_sum, kd_sum, d loss / d raw student logits ``[c, V]`` fp32 or None).

    ``t_chunk`` is the chunk's teacher hidden states or :class:`SparseTargets`, ``None``
    when the chunk gets no KD. The gradient is ``None`` when not wanted or when no term
    depends on the student (``ce_weight == 0`` without KD).
    """
    z = _softcap_(h32 @ w32.T, spec.student_softcap)
    kd_sum, grad_z = torch.zeros((), dtype=torch.float32, device=z.device), None
    if t_chunk is not None:
        # KD before CE, and the teacher logits passed without a name here, so that they are
        # freed before the CE buffers exist: peak stays at about four [c, V] fp32 buffers.
        target = t_chunk if isinstance(t_chunk, SparseTargets) else _teacher_logits(t_chunk, tw32, spec)
        kd_rows, grad_z = _kd_rows_and_grad(z, target, spec, want_grad)
        kd_sum = (kd_rows * kd_mask).sum()
        if grad_z is not None:
            grad_z.mul_(kd_scale.unsqueeze(1))
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


def _kd_rows_and_grad(z, target, spec: _Spec, want_grad: bool):
    """Per-token KD ``[c]`` fp32 and its unscaled gradient w.r.t. the student logits ``z`` ``[c, V]``.

    ``target`` is dense teacher logits ``[c, V]`` fp32 (overwritten) or :class:`SparseTargets`.
    The gradient is ``None`` unless ``want_grad``.
    """
    if isinstance(target, torch.Tensor) and spec.top_k is not None:
        target = topk_targets(target, spec.top_k, spec.top_p)
    if isinstance(target, SparseTargets):
        return _sparse_rows_and_grad(z, target, spec, want_grad)
    if spec.divergence in LOGIT_DIVERGENCES:
        rows, grad = logit_divergence(spec.divergence, z, target)
        return rows, grad if want_grad else None
    if spec.divergence == "forward_kl" or (spec.divergence == "jsd" and spec.jsd_beta == 0.0):
        return _forward_kl_rows_and_grad(z, target, spec.temperature, want_grad)
    tau = spec.temperature
    log_q = _log_softmax_(z / tau)
    rows, qg = prob_divergence(spec.divergence, _log_softmax_(target.div_(tau)), log_q, spec.jsd_beta)
    if not want_grad:
        return rows * tau**2, None
    # d(tau^2 D)/dz = tau * (qg - q * sum(qg)), see prob_divergence.
    grad = log_q.exp_().mul_(qg.sum(-1, keepdim=True).neg_()).add_(qg)
    return rows * tau**2, grad.mul_(tau)


def _forward_kl_rows_and_grad(z, t_logits, temperature, want_grad):
    """``tau**2 * KL(p_t || p_s)`` per row and its gradient, with the fewest ``[c, V]`` buffers.

    ``t_logits`` ``[c, V]`` fp32 is overwritten.
    """
    log_pt = _log_softmax_(t_logits.div_(temperature))
    log_ps = _log_softmax_(z / temperature)
    p_t = log_pt.exp()
    kl_rows = _row_dot(p_t, log_pt) - _row_dot(p_t, log_ps)
    if not want_grad:
        return temperature**2 * kl_rows, None
    # d(tau^2 KL)/dz = tau * (softmax(z/tau) - p_t).
    return temperature**2 * kl_rows, log_ps.exp_().sub_(p_t).mul_(temperature)


def _sparse_rows_and_grad(z, target: SparseTargets, spec: _Spec, want_grad: bool):
    """KD against top-k + tail-bucket targets: the student is collapsed onto the same ``k + 1`` bins.

    The student's bin log-probabilities are its log-softmax at the kept ids and the
    log-sum-exp of all other logits (the tail). With ``qg = q * dD/dq`` per bin and
    ``S = sum(qg)``, the logit gradient is ``qg_b - q_j S`` at a kept id ``j`` of bin ``b`` and
    ``q_j (qg_tail / q_tail - S)`` elsewhere (softmax chain rule through the bin sums).
    """
    tau = spec.temperature
    valid = torch.isfinite(target.logprobs)
    u = z / tau
    lse = torch.logsumexp(u, dim=-1)
    log_q_kept = (u.gather(1, target.ids) - lse.unsqueeze(1)).masked_fill(~valid, float("-inf"))
    # Padding slots add 0 (their id may repeat a kept one); kept ids go to -inf: u becomes the tail logits.
    u.scatter_add_(1, target.ids, torch.where(valid, float("-inf"), 0.0))
    lse_tail = torch.logsumexp(u, dim=-1)
    log_q = torch.cat([log_q_kept, (lse_tail - lse).unsqueeze(1)], dim=1)
    log_p = torch.cat([target.logprobs, target.tail_logprob.unsqueeze(1)], dim=1).float()
    if tau != 1.0:
        log_p = torch.log_softmax(log_p / tau, dim=-1)
    rows, qg = prob_divergence(spec.divergence, log_p, log_q, spec.jsd_beta)
    if not want_grad:
        return rows * tau**2, None
    total = qg.sum(-1)
    q_tail = log_q[:, -1].exp()
    # u - lse_tail is log of the within-tail distribution r (0 at kept ids); q_j = r_j * q_tail there.
    finite_tail = torch.where(torch.isfinite(lse_tail), lse_tail, torch.zeros_like(lse_tail))
    grad = u.sub_(finite_tail.unsqueeze(1)).exp_().mul_((qg[:, -1] - q_tail * total).unsqueeze(1))
    grad.scatter_add_(1, target.ids, torch.where(valid, qg[:, :-1] - log_q_kept.exp() * total.unsqueeze(1), 0.0))
    return rows * tau**2, grad.mul_(tau)


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
