"""Chunked CE + KD losses from hidden states and output heads, never holding full logits.

The student's loss over a trimmed vocabulary of ``V`` ids is

    loss = ce_weight * CE_sum / n_ce + kd_weight * KD_sum / n_kd

with ``z_s = h_s @ W_s[:V].T (+ b_s[:V])``, the sums taken over this call's tokens and the
divisors either its own token counts or, with a :class:`~megadistill.objectives.spec.LossNormalizer`,
the global-batch counts per micro-batch (so the loss of an optimizer step is a mean over all
its valid tokens, not a mean of micro-batch means). The teacher is either dense
(``z_t = h_t @ W_t.T (+ b_t)``, optionally soft-capped, its head restricted to the student's
ids) or sparse (:class:`SparseTargets`: top-k entries of the *tempered* teacher distribution
plus a tail bucket, from an offline cache or taken online from the dense logits). ``KD`` is
one of the divergences in :mod:`megadistill.losses.divergences` (forward/reverse KL,
JSD(beta), total variation, squared error of probabilities: all at temperature ``tau`` and
multiplied by ``tau**2``; MSE or cosine of raw logits).

Tokens are processed in chunks: each chunk's logits are built in fp32, its loss terms
summed, and its gradients w.r.t. the student hidden states, head and bias computed on the
spot, so the backward pass only scales stored gradients. This is the "gradient in forward"
idea of Liger-Kernel's fused linear cross-entropy / JSD (Hsu et al. 2024, arXiv:2410.10989),
written here in plain PyTorch; the temperature-scaled KD term follows Hinton et al. 2015
(arXiv:1503.02531). The student head is read once per call (ZeRO-3 gathers it once per
forward), never once per chunk. Masks select rows with ``torch.where`` / ``masked_fill``,
never by multiplying, so a NaN or inf in an excluded row (e.g. an all ``-inf`` teacher row)
cannot reach the loss or the gradients.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megadistill.losses.divergences import LOGIT_DIVERGENCES, logit_divergence, prob_divergence

if TYPE_CHECKING:  # losses/ is the math only: no runtime dependency on objectives/
    from megadistill.objectives.spec import KDSpec, LossNormalizer

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
    """A tempered teacher distribution kept as its top entries plus one tail bucket, per token.

    Attributes:
        ids: ``[N, k]`` int64 vocabulary ids, most probable first. Padding slots (fewer than
            ``k`` entries kept, e.g. after top-p) have ``logprobs == -inf``; their id is
            ignored but must be a valid id (0 is used).
        logprobs: ``[N, k]`` fp32 log-probabilities of ``ids`` under the teacher distribution
            at ``temperature`` (``softmax(z_t / T)``, normalized over the whole vocabulary),
            ``-inf`` in padding slots.
        tail_logprob: ``[N]`` fp32 log of that distribution's mass outside the kept entries
            (``log(1 - sum(exp(logprobs)))``, i.e. ``log sum_i p_i^(1/T) / Z`` over the tail ids);
            ``-inf`` when nothing is left over.
        temperature: the ``T > 0`` the distribution was tempered with before top-k (1.0: the
            plain teacher). A tail bucket cannot be re-tempered afterwards, so these targets
            are valid only for a loss at this same temperature.

    Keeping the tail mass as an explicit bucket keeps every divergence (reverse KL in
    particular) finite and the targets a proper distribution over ``k + 1`` bins.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    temperature: float = 1.0

    def __getitem__(self, index) -> "SparseTargets":
        """Rows ``index`` of each field (any tensor index on the token dimension), same temperature."""
        return SparseTargets(self.ids[index], self.logprobs[index], self.tail_logprob[index], self.temperature)

    def to(self, device) -> "SparseTargets":
        """The same targets on ``device``."""
        return SparseTargets(self.ids.to(device), self.logprobs.to(device), self.tail_logprob.to(device),
                             self.temperature)

    @classmethod
    def cat(cls, parts: list["SparseTargets"]) -> "SparseTargets":
        """Rows of ``parts`` one after the other (all with the same ``k`` and temperature).

        Raises:
            ValueError: no parts, or parts built at different temperatures.
        """
        if not parts:
            raise ValueError("SparseTargets.cat needs at least one part")
        temperatures = {p.temperature for p in parts}
        if len(temperatures) != 1:
            raise ValueError(f"cannot concatenate sparse targets of different temperatures {sorted(temperatures)}")
        return cls(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                   torch.cat([p.tail_logprob for p in parts]), parts[0].temperature)


def topk_targets(logits: torch.Tensor, k: int, top_p: float = 1.0, temperature: float = 1.0) -> SparseTargets:
    """Top-k (optionally top-p, then top-k) targets of ``softmax(logits / temperature)``, with a tail bucket.

    The logits are tempered *before* the top-k is taken, so the tail bucket holds the exact
    tempered tail mass ``sum_i p_i^(1/T)`` (normalized), which no operation on an untempered
    tail could recover (Hinton et al. 2015 temperature, arXiv:1503.02531; top-k + tail as in
    sparse-logit KD, Anshumann et al. 2025, arXiv:2503.16870). The nucleus is taken on the
    tempered distribution too.

    Args:
        logits: ``[N, V]`` float teacher logits (already soft-capped, not yet tempered).
        k: largest number of kept entries per token, ``1 <= k``; ``k > V`` keeps all.
        top_p: keep the smallest prefix of the sorted distribution whose mass reaches
            ``top_p`` (nucleus, Holtzman et al. 2020), at most ``k`` entries; 1.0 keeps ``k``.
        temperature: ``T > 0``; recorded in the result's ``temperature``.

    Returns:
        :class:`SparseTargets` with ``min(k, V)`` slots; the tail log-mass is computed from the
        left-out log-probabilities directly (a log-sum-exp), so it stays exact when it is tiny.

    Raises:
        ValueError: ``k < 1``, ``top_p`` outside ``(0, 1]``, ``temperature <= 0`` or ``logits`` not 2-D.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(logits.shape)}")
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.no_grad():
        scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
        return _topk_of_logprobs(torch.log_softmax(scaled, dim=-1), k, top_p, temperature)


def _topk_of_logprobs(logp: torch.Tensor, k: int, top_p: float, temperature: float) -> SparseTargets:
    """Top-k (top-p) entries of ``[N, V]`` fp32 log-probabilities ``logp`` (already tempered) plus the tail."""
    values, ids = logp.topk(min(k, logp.shape[1]), dim=-1)
    if top_p < 1:
        mass_before = values.exp().cumsum(dim=-1) - values.exp()
        values = values.masked_fill(mass_before >= top_p, float("-inf"))
    keep = torch.isfinite(values)
    ids = ids.masked_fill(~keep, 0)
    # scatter_add (not scatter): padding slots add 0 to id 0 and cannot undo a kept id 0's -inf.
    rest = logp.scatter_add(1, ids, torch.where(keep, float("-inf"), 0.0))
    return SparseTargets(ids, values, torch.logsumexp(rest, dim=-1), temperature)


def remap_sparse_targets(targets: SparseTargets, vocab_map) -> SparseTargets:
    """Move sparse teacher targets from teacher ids to a trimmed student's ids, renormalized.

    Entries whose teacher id the student does not have are removed and the remaining
    entries and the tail are renormalized to sum to one, i.e. the teacher distribution is
    restricted to the student's vocabulary as in the dense path (exact for the kept
    entries; the tail may still hold mass of dropped ids, which top-k cannot separate).
    Restricting and tempering commute for the kept entries, so the temperature is kept.

    Args:
        targets: :class:`SparseTargets` in teacher ids.
        vocab_map: :class:`megadistill.models.vocab.VocabMap`.

    Returns:
        :class:`SparseTargets` in student ids (same shapes and temperature).
    """
    student_ids, dropped = vocab_map.remap(targets.ids)
    logprobs = targets.logprobs.masked_fill(dropped, float("-inf"))
    ids = student_ids.masked_fill(~torch.isfinite(logprobs), 0)
    total = torch.logsumexp(torch.cat([logprobs, targets.tail_logprob.unsqueeze(1)], dim=1), dim=1)
    return SparseTargets(ids, logprobs - total.unsqueeze(1), targets.tail_logprob - total, targets.temperature)


@dataclass
class DistillLossOutput:
    """Result of :func:`chunked_distill_loss`: the loss and the named sums and counts behind it.

    Sums and counts (not means) are returned so a training loop can add them over
    micro-batches and ranks and report exact global-batch token means.

    Attributes:
        loss: fp32 scalar, differentiable: ``ce_weight * ce_sum / ce_div + kd_weight * kd_sum / kd_div``
            with the divisors of the normalizer (or the local counts clamped to >= 1).
        ce_sum: fp32 scalar, detached: summed cross entropy over label tokens, nats.
        kd_sum: fp32 scalar, detached: summed KD over KD tokens, nats for the KL family,
            already including the ``tau**2`` factor of the probability divergences
            (0 when KD is skipped).
        ce_tokens: int64 scalar tensor (on the loss's device, no host sync): tokens whose
            label is not ``ignore_index``.
        kd_tokens: int64 scalar tensor: tokens that received KD (0 when KD is skipped).
    """

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor
    ce_tokens: torch.Tensor
    kd_tokens: torch.Tensor

    @property
    def ce(self) -> torch.Tensor:
        """fp32 scalar: mean CE over this call's label tokens, nats/token (0 when there are none)."""
        return self.ce_sum / self.ce_tokens.clamp(min=1)

    @property
    def kd(self) -> torch.Tensor:
        """fp32 scalar: mean KD over this call's KD tokens (``tau**2 * D``; 0 when there are none)."""
        return self.kd_sum / self.kd_tokens.clamp(min=1)


def chunked_distill_loss(student_hidden, student_weight, labels, spec: KDSpec, *, student_bias=None,
                         teacher_hidden=None, teacher_weight=None, teacher_bias=None, sparse_targets=None,
                         kd_mask=None, normalizer: LossNormalizer | None = None,
                         ignore_index: int = -100) -> DistillLossOutput:
    """Cross entropy plus KD to a dense or sparse teacher, over token chunks with fused gradients.

    Args:
        student_hidden: ``[N, Hs]`` float (fp32/bf16/fp16) student hidden states as the output
            projection reads them (for BERT-style MLM heads: after the dense + LayerNorm transform).
        student_weight: ``[Vp, Hs]`` student output projection (may be a tied embedding);
            ``Vp >= V = spec.vocab_size``. Rows ``>= V`` are vocabulary padding: they never get
            probability (they are left out of the softmax) and get zero gradient.
        labels: ``[N]`` int64 student ids in ``[0, V)``, or ``ignore_index`` for no CE.
        spec: validated :class:`~megadistill.objectives.spec.KDSpec` (vocabulary, weights,
            temperature, divergence, top-k/p, chunk size, soft-caps); not re-validated here.
        student_bias: optional ``[Vp]`` output bias (BERT / XLM-R MLM heads):
            ``z = h @ W[:V].T + b[:V]``; it gets a gradient (the logit gradient summed over
            tokens, zero on padding rows) like the weight.
        teacher_hidden: ``[N, Ht]`` float teacher hidden states; never differentiated.
            ``None`` (and no ``sparse_targets``) skips KD.
        teacher_weight: ``[V, Ht]`` teacher head already restricted to the kept ids, rows in
            student-id order, so its softmax is the teacher distribution renormalized over
            the kept ids.
        teacher_bias: optional ``[V]`` teacher output bias, restricted like ``teacher_weight``; no grad.
        sparse_targets: :class:`SparseTargets` with ``N`` rows in student ids (e.g. an offline
            cache after :func:`remap_sparse_targets`), instead of ``teacher_hidden``; its
            ``temperature`` must be ``spec.temperature`` (the teacher side is not re-tempered).
        kd_mask: ``[N]`` bool, positions that get KD; default ``labels != ignore_index``.
        normalizer: divisors of the CE and KD sums (global-batch token counts per micro-batch,
            floats or 0-d tensors, >= 0; a zero divisor makes its term 0, as its sum must be
            then). ``None`` divides by this call's counts clamped to >= 1 (a local token mean).
        ignore_index: label value that means "no CE at this position".

    With a dense teacher and ``spec.top_k``, each chunk's teacher logits are soft-capped,
    divided by ``tau`` and only then cut to their top-k (top-p) entries plus a tail bucket
    (:func:`topk_targets`), exactly what an offline cache of the same k, p and temperature
    holds. With sparse targets the divergence is taken over those ``k + 1`` bins: the kept ids
    and one tail bin (the student's tail is the softmax mass of all its other ids at ``tau``).
    Peak extra memory is about ``4 * chunk_size_tokens * V * 4`` bytes plus one fp32 copy of
    each head when it is not already fp32 (and an fp32 ``[Vp, Hs]`` gradient accumulator).

    Follows Hinton et al. 2015 (arXiv:1503.02531) for the ``tau**2``-scaled tempered KD, and
    Liger-Kernel (Hsu et al. 2024, arXiv:2410.10989) for gradients computed in the forward pass;
    with ``normalizer`` every loss is a mean over the valid tokens of the whole global batch.

    Returns:
        :class:`DistillLossOutput`; ``loss`` carries gradients to ``student_hidden``,
        ``student_weight`` and ``student_bias`` (in their own dtypes) when grad mode is on and
        they require it.

    Raises:
        ValueError: mismatched shapes, a teacher head or bias whose row count is not ``V``, a
            label or sparse target id outside ``[0, V)``, both a dense and a sparse teacher, a
            logit divergence with sparse targets, sparse targets of another temperature, or a
            negative / non-finite normalizer.
    """
    use_kd = (teacher_hidden is not None or sparse_targets is not None) and spec.kd_weight != 0
    _check_student(student_hidden, student_weight, student_bias, labels, spec.vocab_size, kd_mask)
    if use_kd and sparse_targets is not None:
        _check_sparse(student_hidden, teacher_hidden, sparse_targets, spec)
    elif use_kd:
        _check_teacher(student_hidden, teacher_hidden, teacher_weight, teacher_bias, spec.vocab_size)
    ce_mask = labels != ignore_index
    _check_labels(labels, ce_mask, spec.vocab_size)
    if not use_kd:
        kd_mask = torch.zeros_like(ce_mask)
    kd_mask = ce_mask if kd_mask is None else kd_mask.bool()
    ce_tokens, kd_tokens = ce_mask.sum(), kd_mask.sum()
    ce_scale, kd_scale = _term_scales(spec, ce_tokens, kd_tokens, normalizer)
    batch = _Batch(
        labels=torch.where(ce_mask, labels, torch.zeros_like(labels)), ce_mask=ce_mask, kd_mask=kd_mask,
        teacher=(sparse_targets if sparse_targets is not None else teacher_hidden) if use_kd else None,
        teacher_weight=teacher_weight, teacher_bias=teacher_bias, ce_scale=ce_scale, kd_scale=kd_scale,
    )
    params = (student_hidden, student_weight, student_bias)
    wants_grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    if wants_grad:
        loss, ce_sum, kd_sum = _FusedDistillLoss.apply(*params, batch, spec)
    else:
        loss, ce_sum, kd_sum, _ = _distill_forward(*params, batch, spec, wanted=(False, False, False))
    return DistillLossOutput(loss, ce_sum, kd_sum, ce_tokens, kd_tokens)


@dataclass
class _Batch:
    """Everything of one call that is not differentiated (internal).

    ``labels`` have ``ignore_index`` replaced by 0 (masked out by ``ce_mask``); ``teacher`` is
    the ``[N, Ht]`` dense teacher hidden states, a :class:`SparseTargets`, or None (no KD);
    ``ce_scale`` / ``kd_scale`` are fp32 0-d tensors: each term's weight / divisor.
    """

    labels: torch.Tensor
    ce_mask: torch.Tensor
    kd_mask: torch.Tensor
    teacher: object
    teacher_weight: torch.Tensor | None
    teacher_bias: torch.Tensor | None
    ce_scale: torch.Tensor
    kd_scale: torch.Tensor


def _term_scales(spec, ce_tokens, kd_tokens, normalizer):
    """``(ce_weight / ce_div, kd_weight / kd_div)`` as fp32 0-d tensors on the counts' device.

    Each token's gradient weight is fixed here, before chunking: the loss is a sum over
    chunks, never a mean of chunk means.
    """
    if normalizer is None:
        divisors = (ce_tokens.clamp(min=1), kd_tokens.clamp(min=1))
    else:
        divisors = (_divisor(normalizer.ce_tokens, "ce_tokens"), _divisor(normalizer.kd_tokens, "kd_tokens"))
    return tuple(_safe_ratio(weight, torch.as_tensor(div, dtype=torch.float32, device=ce_tokens.device))
                 for weight, div in zip((spec.ce_weight, spec.kd_weight), divisors))


def _divisor(value, name: str):
    """Check a python-number divisor (tensors are not inspected: that would be a host sync)."""
    if isinstance(value, numbers.Real) and not (0 <= value < float("inf")):
        raise ValueError(f"LossNormalizer.{name} must be a finite count >= 0 (global {name} / (world * accum)), "
                         f"got {value}")
    return value


def _safe_ratio(weight: float, divisor: torch.Tensor) -> torch.Tensor:
    """``weight / divisor``, and 0 where ``divisor == 0`` (no tokens anywhere: the sum is 0 as well)."""
    return torch.where(divisor > 0, weight / divisor, torch.zeros((), dtype=torch.float32, device=divisor.device))


def _check_student(hidden, weight, bias, labels, vocab, kd_mask) -> None:
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
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"student_bias must be [Vp] = [{weight.shape[0]}] like the rows of student_weight, "
                         f"got {tuple(bias.shape)}")


def _check_teacher(student_hidden, teacher_hidden, teacher_weight, teacher_bias, vocab) -> None:
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
    if teacher_bias is not None and teacher_bias.shape != (vocab,):
        raise ValueError(f"teacher_bias must be [V] = [{vocab}] (restricted to the student's ids like the head), "
                         f"got {tuple(teacher_bias.shape)}")


def _check_sparse(student_hidden, teacher_hidden, targets: SparseTargets, spec) -> None:
    """Raise ``ValueError`` unless sparse targets have ``N`` rows of ids in ``[0, V)`` at ``spec.temperature``."""
    if teacher_hidden is not None:
        raise ValueError("give either teacher_hidden (dense teacher) or sparse_targets, not both")
    if spec.divergence in LOGIT_DIVERGENCES:
        raise ValueError(f"divergence {spec.divergence!r} compares full logits: "
                         "it needs a dense teacher, not top-k targets")
    if targets.temperature != spec.temperature:
        raise ValueError(
            f"sparse targets hold the teacher distribution at temperature {targets.temperature} but "
            f"loss.temperature is {spec.temperature}: a top-k tail bucket cannot be re-tempered (its tempered "
            f"mass is sum p_i^(1/T)); rebuild the cache with tools/cache_teacher_logits.py --temperature {spec.temperature} "
            f"(or set loss.temperature={targets.temperature} without a temperature schedule)"
        )
    n = student_hidden.shape[0]
    if targets.ids.dim() != 2 or targets.ids.shape[0] != n or targets.logprobs.shape != targets.ids.shape \
            or targets.tail_logprob.shape != (n,):
        raise ValueError(f"sparse targets must be ids/logprobs [N, k] and tail [N] with N = {n}, got "
                         f"{tuple(targets.ids.shape)}, {tuple(targets.logprobs.shape)}, {tuple(targets.tail_logprob.shape)}")
    # host sync: one min/max read, so a teacher-id target fails here with a fix instead of deep in a gather.
    if targets.ids.numel() and (int(targets.ids.min()) < 0 or int(targets.ids.max()) >= spec.vocab_size):
        raise ValueError(f"sparse target ids must be student ids in [0, {spec.vocab_size}): "
                         "map cached teacher ids with remap_sparse_targets(targets, vocab_map)")


def _check_labels(labels: torch.Tensor, ce_mask: torch.Tensor, vocab: int) -> None:
    """Raise ``ValueError`` naming one label outside ``[0, V)`` that is not ``ignore_index``."""
    bad = ce_mask & ((labels < 0) | (labels >= vocab))
    # host sync: one bool read, so a teacher-id label fails here with a fix instead of deep in a gather.
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"label {value} is outside the student vocabulary [0, {vocab}) and is not ignore_index: "
            "remap teacher ids to student ids with VocabMap before the loss"
        )


class _FusedDistillLoss(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward, backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, batch, spec):
        loss, ce_sum, kd_sum, grads = _distill_forward(hidden, weight, bias, batch, spec,
                                                       wanted=tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grads = ctx.saved_tensors
        # host sync: the common case is loss.backward() with grad 1, where we skip full-size multiplies.
        if not bool(grad_loss == 1):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None, None)


def _distill_forward(hidden, weight, bias, batch: _Batch, spec, *, wanted):
    """Loop over chunks of active tokens; return ``(loss, ce_sum, kd_sum, (grad_h, grad_w, grad_b))``.

    ``wanted`` says which of hidden, weight, bias need a gradient. Only tokens with CE or KD
    are projected; the others have zero gradient.
    """
    # host sync: nonzero() must know how many rows are active to size its output (and the chunk loop).
    rows = (batch.ce_mask | batch.kd_mask).nonzero().squeeze(1)
    vocab = spec.vocab_size
    w32 = weight[:vocab].float()  # no copy when already fp32
    b32 = None if bias is None else bias[:vocab].float()
    # host sync: skip the teacher projection entirely when no token gets KD.
    use_kd = batch.teacher is not None and bool(batch.kd_mask.any())
    teacher = None
    if use_kd:
        teacher = batch.teacher if isinstance(batch.teacher, SparseTargets) else _DenseTeacher.of(batch, spec)
    acc = _Accumulator(hidden, weight, bias, vocab, wanted)
    for start in range(0, rows.numel(), spec.chunk_size_tokens):
        idx = rows[start : start + spec.chunk_size_tokens]
        h32 = hidden[idx].detach().float()
        ce_sum, kd_sum, grad_z = _chunk_loss_and_grad(
            _student_logits(h32, w32, b32, spec), batch.labels[idx], batch.ce_mask[idx], batch.kd_mask[idx],
            None if teacher is None else teacher[idx], batch, spec, any(wanted),
        )
        acc.add(idx, h32, w32, ce_sum, kd_sum, grad_z)
    loss = acc.ce_sum * batch.ce_scale + acc.kd_sum * batch.kd_scale
    return loss, acc.ce_sum, acc.kd_sum, acc.grads()


class _DenseTeacher:
    """The dense teacher's hidden states ``[n, Ht]`` and fp32 head, projected chunk by chunk (internal)."""

    def __init__(self, hidden, weight32, bias32, softcap):
        self.hidden, self.weight32, self.bias32, self.softcap = hidden, weight32, bias32, softcap

    @classmethod
    def of(cls, batch: _Batch, spec) -> "_DenseTeacher":
        """The teacher of ``batch``, its head (and bias) cast to fp32 once per call."""
        bias = None if batch.teacher_bias is None else batch.teacher_bias.detach().float()
        return cls(batch.teacher, batch.teacher_weight.detach().float(), bias, spec.teacher_softcap)

    def __getitem__(self, idx) -> "_DenseTeacher":
        """The same teacher restricted to rows ``idx`` (a ``[c, Ht]`` gather; no logits yet)."""
        return _DenseTeacher(self.hidden[idx], self.weight32, self.bias32, self.softcap)

    def logits(self) -> torch.Tensor:
        """Teacher ``[c, V]`` fp32 logits (biased, soft-capped, not tempered), outside autograd."""
        with torch.no_grad():
            return _project(self.hidden.detach().float(), self.weight32, self.bias32, self.softcap)


def _student_logits(h32, w32, b32, spec) -> torch.Tensor:
    """Student ``[c, V]`` fp32 logits ``softcap(h @ W.T + b)``."""
    return _project(h32, w32, b32, spec.student_softcap)


def _project(h32, w32, b32, softcap) -> torch.Tensor:
    """``softcap(h @ W.T (+ b))`` in fp32: ``[c, H] x [V, H] -> [c, V]``."""
    logits = h32 @ w32.T if b32 is None else torch.addmm(b32, h32, w32.T)
    return _softcap_(logits, softcap)


class _Accumulator:
    """Running loss sums and gradient buffers across chunks (internal)."""

    def __init__(self, hidden, weight, bias, vocab, wanted):
        grad_hidden, grad_weight, grad_bias = wanted
        self.ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        self.kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        self.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        self.grad_h = torch.zeros_like(hidden) if grad_hidden else None
        # fp32 across chunks so a bf16 head (or bias) is rounded once, not once per chunk.
        self.grad_w32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        self.grad_b32 = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grad_bias else None
        self.vocab = vocab

    def add(self, idx, h32, w32, ce_sum, kd_sum, grad_z) -> None:
        """Add one chunk's sums and, given ``grad_z`` ``[c, V]`` fp32 (d loss / d raw logits), its parameter grads.

        ``grad_z is None`` leaves this chunk's gradients at zero.
        """
        self.ce_sum += ce_sum
        self.kd_sum += kd_sum
        if grad_z is None:
            return
        if self.grad_h is not None:
            self.grad_h[idx] = (grad_z @ w32).to(self.dtypes[0])
        if self.grad_w32 is not None:
            self.grad_w32[: self.vocab].addmm_(grad_z.T, h32)
        if self.grad_b32 is not None:
            self.grad_b32[: self.vocab] += grad_z.sum(0)

    def grads(self):
        """``(grad_hidden, grad_weight, grad_bias)`` in the inputs' dtypes (``None`` when not wanted)."""
        grad_w = None if self.grad_w32 is None else self.grad_w32.to(self.dtypes[1])
        grad_b = None if self.grad_b32 is None else self.grad_b32.to(self.dtypes[2])
        return self.grad_h, grad_w, grad_b


def _chunk_loss_and_grad(z, labels, ce_mask, kd_mask, target, batch: _Batch, spec, want_grad):
    """One chunk: return (ce_sum, kd_sum, d loss / d raw student logits ``[c, V]`` fp32 or None).

    ``z`` is the chunk's ``[c, V]`` fp32 student logits (soft-capped; overwritten). ``target`` is
    the chunk's :class:`_DenseTeacher` rows or :class:`SparseTargets`, ``None`` when the chunk
    gets no KD. The gradient is ``None`` when not wanted or when no term depends on the
    student (``ce_weight == 0`` without KD). Rows outside a term's mask are selected out
    (``where`` / ``masked_fill``), so NaN in an excluded row cannot leak into sums or grads.
    """
    kd_sum, grad_z = torch.zeros((), dtype=torch.float32, device=z.device), None
    if target is not None:
        # KD before CE, and the dense teacher logits dropped right after, so that they are
        # freed before the CE buffers exist: peak stays at about four [c, V] fp32 buffers.
        dense_or_sparse = target if isinstance(target, SparseTargets) else target.logits()
        kd_rows, grad_z = _kd_rows_and_grad(z, dense_or_sparse, spec, want_grad)
        del dense_or_sparse
        kd_sum = torch.where(kd_mask, kd_rows, 0.0).sum()
        if grad_z is not None:
            grad_z.mul_(batch.kd_scale).masked_fill_(~kd_mask.unsqueeze(1), 0.0)
    ce_sum, ce_grad = _ce_sum_and_grad(z, labels, ce_mask, batch.ce_scale, want_grad and spec.ce_weight != 0)
    if ce_grad is not None:
        grad_z = ce_grad if grad_z is None else grad_z.add_(ce_grad)
    if grad_z is not None and spec.student_softcap is not None:
        # d/dx cap*tanh(x/cap) = 1 - tanh^2(x/cap), and tanh(x/cap) = z/cap.
        grad_z.mul_(z.div_(spec.student_softcap).square_().neg_().add_(1))
    return ce_sum, kd_sum, grad_z


def _ce_sum_and_grad(z, labels, ce_mask, ce_scale, want_grad):
    """Summed CE (nats) of logits ``z`` ``[c, V]`` over masked rows, and its scaled logit grad ``[c, V]``."""
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    ce_sum = torch.where(ce_mask, lse - target, 0.0).sum()
    if not want_grad:
        return ce_sum, None
    # dCE/dz = softmax(z) - onehot(label), weighted per token by ce_weight / ce divisor.
    grad = (z - lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, labels.unsqueeze(1), torch.full_like(target, -1.0).unsqueeze(1))
    return ce_sum, grad.mul_(ce_scale).masked_fill_(~ce_mask.unsqueeze(1), 0.0)


def _kd_rows_and_grad(z, target, spec, want_grad: bool):
    """Per-token KD ``[c]`` fp32 and its unscaled gradient w.r.t. the student logits ``z`` ``[c, V]``.

    ``target`` is dense teacher logits ``[c, V]`` fp32 (overwritten) or :class:`SparseTargets`.
    The gradient is ``None`` unless ``want_grad``.
    """
    tau = spec.temperature
    if isinstance(target, torch.Tensor) and spec.top_k is not None:
        # Temper the dense logits BEFORE the top-k, so the tail bucket is the tempered tail
        # sum_i p_i^(1/T), which cannot be recovered from an untempered one (in place: no extra buffer).
        target = _topk_of_logprobs(_log_softmax_(target.div_(tau)), spec.top_k, spec.top_p, tau)
    if isinstance(target, SparseTargets):
        return _sparse_rows_and_grad(z, target, spec, want_grad)
    if spec.divergence in LOGIT_DIVERGENCES:
        rows, grad = logit_divergence(spec.divergence, z, target)
        return rows, grad if want_grad else None
    if spec.divergence == "forward_kl" or (spec.divergence == "jsd" and spec.jsd_beta == 0.0):
        return _forward_kl_rows_and_grad(z, target, tau, want_grad)
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


def _sparse_rows_and_grad(z, target: SparseTargets, spec, want_grad: bool):
    """KD against top-k + tail-bucket targets: the student is collapsed onto the same ``k + 1`` bins.

    The targets already hold the teacher distribution at ``tau`` (checked by the caller, or
    built tempered online), so only the student is tempered: its bin log-probabilities are
    the log-softmax of ``z / tau`` at the kept ids and the log-sum-exp of all its other
    tempered logits (the tail). With ``qg = q * dD/dq`` per bin and ``S = sum(qg)``, the logit
    gradient is ``qg_b - q_j S`` at a kept id ``j`` of bin ``b`` and ``q_j (qg_tail / q_tail - S)``
    elsewhere (softmax chain rule through the bin sums), times ``1 / tau``, times ``tau**2``.
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
