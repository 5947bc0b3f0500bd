"""Cross-tokenizer KD: ULD and span-aligned KD between models with different vocabularies, chunked.

Teacher and student read the same text through different tokenizers, so their rows (one per
token, shifted like CE: row ``r`` predicts ``labels[r]``) do not correspond one to one. A
:class:`SpanAlignment` (from :func:`megadistill.data.offsets.align_spans`) groups each side's
rows into the smallest common character spans; the first row of a group is where both models
have read exactly the same text prefix. Two KD terms compare the models per group:

* ``uld``: Universal Logit Distillation (Boizard et al. 2024, arXiv:2402.12030), the
  closed-form Wasserstein-1 distance between the first rows' distributions with their
  probabilities sorted, ``sum_i |sort(p_s)_i - sort(p_t)_i|`` (the shorter zero-padded);
* ``span``: the span-aligned KD of TRL's GOLD trainer (Patiño et al. 2025, "Unlocking
  On-Policy Distillation for Any Model Family"): each side's span distribution by the chain
  rule, ``log q_k(y) = log p(y | first row) + sum_{later rows r} log p(labels[r] | row r)``,
  compared by the generalized KL on the vocabulary entries both tokenizers share
  (:class:`SharedVocab`) and by ULD's sorted L1 on the others.

The loss is ``ce_weight * CE_sum / n_ce + kd_weight * KD_sum / n_kd`` with CE on the student's
own labels (``T = 1``), KD at temperature ``T`` times ``T**2`` (Hinton et al. 2015,
arXiv:1503.02531), and the divisors of :class:`~megadistill.objectives.spec.LossNormalizer` (or
the local CE tokens and KD groups). As in :mod:`megadistill.losses.logits`, gradients are
computed in the forward pass, chunk by chunk (autograd on each chunk's small graph, then the
graph is dropped), so at most one chunk's ``[chunk, V]`` buffers live at a time and backward only
scales stored gradients (Liger-Kernel's fused-linear idea, Hsu et al. 2024, arXiv:2410.10989).
``torch.utils.checkpoint`` per chunk was not used: it would keep every chunk's teacher targets
(``[chunk, ~Vs]`` each) as saved inputs until backward, or recompute the ``[chunk, Vt]`` teacher
projection in backward, and it would project every student row twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megadistill.losses.logits import DistillLossOutput, _softcap_, _term_scales

if TYPE_CHECKING:  # losses/ is the math only: no runtime dependency on objectives/
    from megadistill.objectives.spec import KDSpec, LossNormalizer

__all__ = ["METHODS", "SharedVocab", "SpanAlignment", "cross_tokenizer_loss"]

METHODS = ("uld", "span")
IGNORE_INDEX = -100  # megadistill.data.collate.IGNORE_INDEX (losses/ does not import data/)


@dataclass(frozen=True)
class SpanAlignment:
    """Which student and teacher rows cover the same characters (one group per common span).

    Attributes:
        student_group: ``[Ns]`` int64, group ``0..K-1`` of each student row, ``-1`` = not aligned.
        teacher_group: ``[Nt]`` int64, the same for the teacher rows.
        num_groups: ``K``. A group's rows are consecutive on each side, and a group present on
            one side is present on the other (checked by :func:`cross_tokenizer_loss`).
    """

    student_group: torch.Tensor
    teacher_group: torch.Tensor
    num_groups: int


@dataclass(frozen=True)
class SharedVocab:
    """The vocabulary entries both tokenizers have: the same piece string under two ids.

    Attributes:
        student_ids: ``[M]`` int64 student ids (distinct) whose piece is also a teacher piece.
        teacher_ids: ``[M]`` int64 teacher ids (distinct) of those same pieces, pair by pair.

    Raises:
        ValueError: the two are not 1-D tensors of one length.
    """

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.student_ids.dim() != 1 or self.student_ids.shape != self.teacher_ids.shape:
            raise ValueError(f"SharedVocab ids must be two [M] tensors, got {tuple(self.student_ids.shape)} "
                             f"and {tuple(self.teacher_ids.shape)}")

    @classmethod
    def from_tokenizers(cls, student_tokenizer, teacher_tokenizer) -> "SharedVocab":
        """Pairs of ids whose piece strings (``get_vocab()`` keys) are identical, special tokens left out.

        Special tokens (``all_special_ids`` and added tokens marked special) are control
        symbols, not text, so a ``<bos>`` in both vocabularies is not a shared entry. Pieces
        are compared as strings: SentencePiece ``▁`` pieces and ``<0xNN>`` byte pieces match
        between two SentencePiece-style tokenizers, as Gemma's and a student's trained alike.

        Returns:
            :class:`SharedVocab` sorted by student id.
        """
        teacher_vocab, teacher_special = teacher_tokenizer.get_vocab(), _special_ids(teacher_tokenizer)
        student_special = _special_ids(student_tokenizer)
        pairs = sorted((sid, teacher_vocab[piece]) for piece, sid in student_tokenizer.get_vocab().items()
                       if piece in teacher_vocab and sid not in student_special
                       and teacher_vocab[piece] not in teacher_special)
        ids = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        return cls(ids[:, 0].contiguous(), ids[:, 1].contiguous())


def _special_ids(tokenizer) -> set[int]:
    """Ids of a tokenizer's special tokens and of its added tokens marked special."""
    added = tokenizer.added_tokens_decoder  # a property that builds a new dict: read it once
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def cross_tokenizer_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_labels: torch.Tensor,
                         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_labels: torch.Tensor,
                         alignment: SpanAlignment, spec: KDSpec, method: str, *, shared: SharedVocab | None = None,
                         normalizer: LossNormalizer | None = None) -> DistillLossOutput:
    """Student CE plus ULD or span-aligned KD to a teacher with another tokenizer, over chunks.

    Rows are flattened over the micro-batch and shifted like CE (row ``r`` predicts
    ``labels[r]``). Logits are ``softcap(h @ W.T)`` (Gemma-style ``cap * tanh(z / cap)``,
    before the temperature), built ``spec.chunk_size_tokens`` rows at a time; teacher rows go
    in chunks of at most ``spec.chunk_size_tokens * Vs / Vt`` rows, so a teacher ``[c, Vt]``
    buffer is no larger than a student one. KD per group ``k`` (``T = spec.temperature``):

    * ``uld``: ``sum_i |sort_desc(p_s)_i - sort_desc(p_t)_i|`` over the first rows' tempered
      distributions, the shorter zero-padded (Boizard et al. 2024). No full sort of a 262k
      teacher row: for ``Vs <= Vt`` (non-negative entries, padding compares the teacher's
      smallest entries with 0) the padded sum is
      ``sum_{i<Vs} |s_i - topk(t, Vs)_i| + (sum(t) - sum(topk(t, Vs)))``, and symmetrically for
      ``Vt < Vs``; the left-out mass is summed from the left-out entries, not ``1 - top``.
    * ``span``: with the group's rows ``j..j+m`` on a side, the unnormalized span measure
      ``log q(y) = log p(y | row j) + sum_{r=j+1..j+m} log p(labels[r] | row r)`` at ``T``
      (TRL GOLD, Patiño et al. 2025). On the ``M`` shared entries the generalized KL
      ``sum_y q_t (log q_t - log q_s) - q_t + q_s`` (>= 0, and forward KL for two normalized
      distributions); on the others ULD's sorted L1 of the unnormalized values (the same top-k
      identity). ``shared=None`` treats every entry as unmatched. With one token per group and
      ``shared`` the identity, this is token-level forward-KL KD at ``T``.

    Every KD term is multiplied by ``T**2``. ``spec.divergence``, ``top_k`` and ``top_p`` are
    not used. Gradients (fp32, or fp64 for fp64 inputs) are computed in the forward pass: the
    student's first rows once, the later rows of span groups twice (value, then chain-rule
    gradient), CE rows once; memory is one chunk's buffers plus ``[Ns, Hs]`` and ``[Vp, Hs]``
    gradients and an fp32 copy of a non-fp32 teacher head.

    Args:
        student_hidden: ``[Ns, Hs]`` float student hidden states (requires grad to train).
        student_weight: ``[Vp, Hs]`` student head, ``Vp >= Vs = spec.vocab_size``; rows past
            ``Vs`` are padding: never scored, zero gradient.
        student_labels: ``[Ns]`` int64 student ids in ``[0, Vs)`` or -100 (no CE).
        teacher_hidden: ``[Nt, Ht]`` float teacher hidden states (never differentiated).
        teacher_weight: ``[Vt, Ht]`` teacher head, every row a real id.
        teacher_labels: ``[Nt]`` int64 teacher ids (only the later rows of span groups are read).
        alignment: :class:`SpanAlignment` of the rows.
        spec: :class:`~megadistill.objectives.spec.KDSpec` (``vocab_size = Vs``, weights,
            temperature, chunk size, soft-caps).
        method: ``"uld"`` or ``"span"``.
        shared: :class:`SharedVocab` for ``span`` (ignored by ``uld``).
        normalizer: divisors of the CE and KD sums (``kd_tokens`` divides the group KD sum);
            ``None`` divides by this call's CE tokens and KD groups clamped to >= 1.

    Returns:
        :class:`~megadistill.losses.logits.DistillLossOutput` (``kd_tokens`` counts the groups that received KD).

    Raises:
        ValueError: unknown method; mismatched ranks, widths or lengths; ``Vs`` above the head
            rows; a student label outside ``[0, Vs)`` and not -100; group ids outside
            ``[-1, K)``, a group on one side only, a group whose rows are not consecutive; for
            ``span`` a later row of a group with a label outside its vocabulary; shared ids out
            of range or repeated; a negative or non-finite normalizer.
    """
    _check_inputs(student_hidden, student_weight, student_labels, teacher_hidden, teacher_weight, teacher_labels,
                  alignment, spec, method)
    ce_mask = student_labels != IGNORE_INDEX
    _check_label_range(student_labels[ce_mask], spec.vocab_size, "student label (not -100)")
    use_kd = spec.kd_weight != 0
    span = method == "span"
    groups = _Groups.of(alignment, student_hidden.device, teacher_hidden.device)
    if use_kd and span:
        _check_label_range(student_labels[groups.student.rest_rows], spec.vocab_size, "student label of a span row")
        _check_label_range(teacher_labels[groups.teacher.rest_rows], teacher_weight.shape[0],
                           "teacher label of a span row")
    if use_kd and span and shared is not None:
        _check_shared(shared, spec.vocab_size, teacher_weight.shape[0])
    ce_tokens = ce_mask.sum()
    kd_groups = torch.tensor(groups.count if use_kd else 0, dtype=torch.int64, device=student_hidden.device)
    ce_scale, kd_scale = _term_scales(spec, ce_tokens, kd_groups, normalizer)
    problem = _Problem(student_labels, ce_mask, teacher_hidden, teacher_weight, teacher_labels, groups, spec,
                       method if use_kd else None, shared if span else None, ce_scale, kd_scale)
    wants_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad)
    if wants_grad:
        loss, ce_sum, kd_sum = _CrossTokenizerLoss.apply(student_hidden, student_weight, problem)
    else:
        loss, ce_sum, kd_sum, _ = _forward(student_hidden, student_weight, problem, wanted=(False, False))
    return DistillLossOutput(loss=loss, ce_sum=ce_sum, kd_sum=kd_sum, ce_tokens=ce_tokens, kd_tokens=kd_groups)


def _check_inputs(s_hidden, s_weight, s_labels, t_hidden, t_weight, t_labels, alignment, spec, method) -> None:
    """Raise ``ValueError`` (one line) for an unknown method or tensors that disagree on shapes."""
    if method not in METHODS:
        raise ValueError(f"cross-tokenizer method must be one of {', '.join(METHODS)}, got {method!r}")
    for side, hidden, weight, labels in (("student", s_hidden, s_weight, s_labels),
                                         ("teacher", t_hidden, t_weight, t_labels)):
        if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"{side}_hidden must be [N, H] and {side}_weight [V, H] of the same width, got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
        if labels.shape != (hidden.shape[0],):
            raise ValueError(f"{side}_labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if not 0 < spec.vocab_size <= s_weight.shape[0]:
        raise ValueError(f"vocab_size {spec.vocab_size} must be in [1, {s_weight.shape[0]}] (rows of student_weight)")
    if alignment.student_group.shape != (s_hidden.shape[0],) or alignment.teacher_group.shape != (t_hidden.shape[0],):
        raise ValueError(f"alignment groups must be [Ns] = [{s_hidden.shape[0]}] and [Nt] = [{t_hidden.shape[0]}], "
                         f"got {tuple(alignment.student_group.shape)} and {tuple(alignment.teacher_group.shape)}")
    if alignment.num_groups < 0:
        raise ValueError(f"alignment.num_groups must be >= 0, got {alignment.num_groups}")


def _check_label_range(labels: torch.Tensor, vocab: int, what: str) -> None:
    """Raise ``ValueError`` naming one of ``labels`` outside ``[0, vocab)``."""
    bad = (labels < 0) | (labels >= vocab)
    # host sync: one bool read, so a wrong-vocabulary id fails here instead of deep in a gather.
    if bool(bad.any()):
        raise ValueError(f"{what} {int(labels[bad][0])} is outside the vocabulary [0, {vocab})")


def _check_shared(shared: SharedVocab, student_vocab: int, teacher_vocab: int) -> None:
    """Raise ``ValueError`` for shared ids outside either vocabulary or repeated on one side."""
    _check_label_range(shared.student_ids, student_vocab, "SharedVocab student id")
    _check_label_range(shared.teacher_ids, teacher_vocab, "SharedVocab teacher id")
    for side, ids in (("student", shared.student_ids), ("teacher", shared.teacher_ids)):
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"SharedVocab {side} ids repeat an id: each entry may be matched once")


@dataclass
class _Side:
    """One side's rows per group, groups renumbered ``0..G-1`` in id order (internal).

    ``first`` ``[G]`` the first row of each group; ``rest_rows`` ``[R]`` the other rows of the
    groups and ``rest_group`` ``[R]`` their group.
    """

    first: torch.Tensor
    rest_rows: torch.Tensor
    rest_group: torch.Tensor


@dataclass
class _Groups:
    """Both sides' groups (only those present, checked to be present on both sides) (internal)."""

    student: _Side
    teacher: _Side
    count: int

    @classmethod
    def of(cls, alignment: SpanAlignment, student_device, teacher_device) -> "_Groups":
        """Check ``alignment`` and index its groups on each side's device; ``ValueError`` for a malformed one."""
        k = alignment.num_groups
        s_group, t_group = alignment.student_group.to(student_device), alignment.teacher_group.to(teacher_device)
        s_present = _present(s_group, k, "student")
        t_present = _present(t_group, k, "teacher").to(student_device)
        # host sync: the group structure decides the chunk loops.
        if not torch.equal(s_present, t_present):
            missing = int((s_present != t_present).nonzero()[0])
            raise ValueError(f"group {missing} has rows on one side only: every group needs student and teacher rows")
        renumber = torch.cumsum(s_present, 0) - 1
        return cls(_side(s_group, renumber, k, "student"), _side(t_group, renumber.to(teacher_device), k, "teacher"),
                   int(s_present.sum()))


def _present(group: torch.Tensor, k: int, side: str) -> torch.Tensor:
    """``[K]`` bool: which group ids have rows; ``ValueError`` for ids outside ``[-1, K)``."""
    if group.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{side}_group must be an int64 tensor, got {group.dtype}")
    if group.numel() and (int(group.min()) < -1 or int(group.max()) >= k):
        raise ValueError(f"{side}_group ids must be in [-1, {k}), got {int(group.min())}..{int(group.max())}")
    return torch.bincount(group[group >= 0].long(), minlength=k) > 0


def _side(group: torch.Tensor, renumber: torch.Tensor, k: int, side: str) -> _Side:
    """First and later rows of each group on one side; ``ValueError`` when a group's rows are not consecutive."""
    group = group.long()
    rows = (group >= 0).nonzero().squeeze(1)
    ids = group[rows]
    first = torch.full((k,), group.numel(), dtype=torch.int64, device=group.device).scatter_reduce(
        0, ids, rows, "amin")
    last = torch.full((k,), -1, dtype=torch.int64, device=group.device).scatter_reduce(0, ids, rows, "amax")
    count = torch.bincount(ids, minlength=k)
    present = count > 0
    if bool((last - first + 1 != count)[present].any()):
        bad = int(((last - first + 1 != count) & present).nonzero()[0])
        raise ValueError(f"{side} rows of group {bad} are not consecutive: a group is one span of tokens")
    is_rest = rows != first[ids]
    return _Side(first[present], rows[is_rest], renumber[ids[is_rest]])


@dataclass
class _Problem:
    """Everything of one call that is not differentiated (internal).

    ``method`` is None when KD is skipped; ``ce_scale`` / ``kd_scale`` are 0-d fp32 tensors:
    each term's weight / divisor.
    """

    labels: torch.Tensor
    ce_mask: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    teacher_labels: torch.Tensor
    groups: _Groups
    spec: KDSpec
    method: str | None
    shared: SharedVocab | None
    ce_scale: torch.Tensor
    kd_scale: torch.Tensor


class _CrossTokenizerLoss(torch.autograd.Function):
    """Autograd wrapper: gradients are computed in forward, backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, problem):
        loss, ce_sum, kd_sum, grads = _forward(hidden, weight, problem, wanted=tuple(ctx.needs_input_grad[:2]))
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grads = ctx.saved_tensors
        # host sync: the common case is loss.backward() with grad 1, where we skip full-size multiplies.
        if not bool(grad_loss == 1):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None)


def _forward(hidden, weight, p: _Problem, *, wanted):
    """All chunks: ``(loss, ce_sum, kd_sum, (grad_hidden, grad_weight))``, grads None where not wanted."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for finite-difference checks
    w = weight[: p.spec.vocab_size].detach().to(dtype)
    acc = _Grads(hidden, weight, p.spec.vocab_size, wanted, dtype)
    kd_sum, grad_offsets = torch.zeros((), dtype=dtype, device=hidden.device), None
    if p.method is not None and p.groups.count:
        kd_sum, grad_offsets = _kd_over_groups(hidden, w, p, acc, dtype)
    ce_sum = _ce_and_span_chain(hidden, w, p, grad_offsets, acc, dtype)
    loss = ce_sum * p.ce_scale + kd_sum * p.kd_scale
    return loss, ce_sum, kd_sum, acc.grads()


class _Grads:
    """Gradient buffers of the student hidden states ``[Ns, Hs]`` and head ``[Vp, Hs]`` across chunks (internal)."""

    def __init__(self, hidden, weight, vocab, wanted, dtype):
        self.wanted, self.vocab, self.dtypes = wanted, vocab, (hidden.dtype, weight.dtype)
        self.hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if wanted[0] else None
        self.weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if wanted[1] else None

    def add(self, rows, grad_h, grad_w) -> None:
        """Add one chunk's gradients: ``grad_h`` ``[c, Hs]`` of ``rows``, ``grad_w`` ``[Vs, Hs]`` (None = 0)."""
        if self.hidden is not None and grad_h is not None:
            self.hidden.index_add_(0, rows, grad_h)  # a row may get CE and KD gradients in separate passes
        if self.weight is not None and grad_w is not None:
            self.weight[: self.vocab] += grad_w

    def grads(self):
        """``(grad_hidden, grad_weight)`` in the inputs' dtypes (None when not wanted)."""
        return tuple(None if g is None else g.to(dt) for g, dt in zip((self.hidden, self.weight), self.dtypes))


def _value_and_grads(fn, inputs, want):
    """``fn(*inputs) -> (objective, value)`` and d objective / d each input with ``want`` true (else None).

    Autograd runs on this chunk's graph only, which is freed on return.
    """
    if not any(want):
        with torch.no_grad():
            return fn(*inputs)[1], [None] * len(inputs)
    leaves = [x.detach().requires_grad_(bool(wx)) for x, wx in zip(inputs, want)]
    with torch.enable_grad():
        objective, value = fn(*leaves)
        targets = [x for x in leaves if x.requires_grad]
        found = iter(torch.autograd.grad(objective, targets, allow_unused=True) if objective.requires_grad
                     else [None] * len(targets))
    return value.detach(), [next(found) if x.requires_grad else None for x in leaves]


def _student_logits(h, w, cap):
    """Student ``[c, Vs]`` logits ``softcap(h @ W.T)``, out of place (differentiable)."""
    z = h @ w.T
    return z if cap is None else cap * torch.tanh(z / cap)


def _row_terms(h, w, labels, spec):
    """Per row ``[c]``: CE at ``T = 1`` (nats) and the label log-prob at ``T`` (differentiable)."""
    z = _student_logits(h, w, spec.student_softcap)
    target = z.gather(1, labels.unsqueeze(1)).squeeze(1)
    ce = torch.logsumexp(z, dim=-1) - target
    return ce, target / spec.temperature - torch.logsumexp(z / spec.temperature, dim=-1)


class _Teacher:
    """The teacher's hidden states and head, projected chunk by chunk outside autograd (internal)."""

    def __init__(self, p: _Problem, dtype):
        self.hidden = p.teacher_hidden.detach()
        self.weight = p.teacher_weight.detach().to(torch.promote_types(dtype, p.teacher_weight.dtype))
        self.labels, self.spec = p.teacher_labels, p.spec
        # a [c, Vt] teacher buffer no larger than a [chunk, Vs] student one
        scaled = p.spec.chunk_size_tokens * p.spec.vocab_size // self.weight.shape[0]
        self.chunk = max(1, min(p.spec.chunk_size_tokens, scaled))

    def log_probs(self, rows) -> torch.Tensor:
        """``[c, Vt]`` tempered log-probabilities ``log_softmax(softcap(z) / T)`` of ``rows``."""
        with torch.no_grad():
            z = _softcap_(self.hidden[rows].to(self.weight.dtype) @ self.weight.T, self.spec.teacher_softcap)
            return torch.log_softmax(z.div_(self.spec.temperature), dim=-1)

    def span_offsets(self, side: _Side, count: int) -> torch.Tensor:
        """``[G]`` sum over each group's later rows of ``log p(label | row)`` at ``T``."""
        offsets = torch.zeros(count, dtype=self.weight.dtype, device=self.hidden.device)
        for start in range(0, side.rest_rows.numel(), self.chunk):
            rows = side.rest_rows[start : start + self.chunk]
            lp = self.log_probs(rows).gather(1, self.labels[rows].unsqueeze(1)).squeeze(1)
            offsets.index_add_(0, side.rest_group[start : start + self.chunk], lp)
        return offsets


def _student_span_offsets(hidden, w, p: _Problem, dtype) -> torch.Tensor:
    """``[G]`` sum over each group's later student rows of ``log p(label | row)`` at ``T`` (values only)."""
    side, chunk = p.groups.student, p.spec.chunk_size_tokens
    offsets = torch.zeros(p.groups.count, dtype=dtype, device=hidden.device)
    with torch.no_grad():
        for start in range(0, side.rest_rows.numel(), chunk):
            rows = side.rest_rows[start : start + chunk]
            _, lp = _row_terms(hidden[rows].to(dtype), w, p.labels[rows], p.spec)
            offsets.index_add_(0, side.rest_group[start : start + chunk], lp)
    return offsets


def _kd_over_groups(hidden, w, p: _Problem, acc: _Grads, dtype):
    """KD summed over groups (``T**2`` included), student grads added to ``acc``; also the ``[G]``
    gradient of the scaled KD w.r.t. the student span offsets (None for ``uld`` or without grads)."""
    teacher, span, count = _Teacher(p, dtype), p.method == "span", p.groups.count
    t_offsets = teacher.span_offsets(p.groups.teacher, count) if span else None
    s_offsets = _student_span_offsets(hidden, w, p, dtype) if span else torch.zeros(count, dtype=dtype,
                                                                                     device=hidden.device)
    s_matched = None
    if p.shared is not None:
        s_matched = torch.zeros(p.spec.vocab_size, dtype=torch.bool, device=w.device)
        s_matched[p.shared.student_ids.to(w.device)] = True
    kd_sum = torch.zeros((), dtype=dtype, device=hidden.device)
    grad_offsets = torch.zeros(count, dtype=dtype, device=hidden.device) if span and any(acc.wanted) else None
    for start in range(0, count, teacher.chunk):
        sel = slice(start, start + teacher.chunk)
        target = _teacher_target(teacher, p, p.groups.teacher.first[sel], None if t_offsets is None else t_offsets[sel],
                                 w.shape[0], dtype)
        rows = p.groups.student.first[sel]

        def objective(h, weight, offsets, target=target):
            value = _group_kd(h, weight, offsets, target, p, s_matched).sum()
            return value * p.kd_scale, value

        value, (g_h, g_w, g_off) = _value_and_grads(objective, [hidden[rows].to(dtype), w, s_offsets[sel]],
                                                    [acc.wanted[0], acc.wanted[1], grad_offsets is not None])
        kd_sum += value
        acc.add(rows, g_h, g_w)
        if grad_offsets is not None and g_off is not None:
            grad_offsets[sel] = g_off
    return kd_sum, grad_offsets


@dataclass
class _Target:
    """One chunk of teacher groups, reduced to what the student side needs (internal).

    ``matched_logq`` ``[c, M]`` teacher span log-measure at the shared ids (None without
    ``shared`` or for ``uld``); ``top`` ``[c, min(Vs, Vt)]`` the largest unmatched teacher
    values in descending order; ``tail`` ``[c]`` the unmatched teacher mass outside ``top``
    (None when ``top`` holds all of it, i.e. ``Vt <= Vs``).
    """

    matched_logq: torch.Tensor | None
    top: torch.Tensor
    tail: torch.Tensor | None


def _teacher_target(teacher: _Teacher, p: _Problem, rows, offsets, student_vocab: int, dtype) -> _Target:
    """The teacher side of a chunk of groups: span log-measure at shared ids, top unmatched values, tail."""
    with torch.no_grad():
        log_q = teacher.log_probs(rows)
        matched = None
        if offsets is not None:
            log_q.add_(offsets.unsqueeze(1))
            if p.shared is not None:
                teacher_ids = p.shared.teacher_ids.to(log_q.device)
                matched = log_q[:, teacher_ids].to(dtype)
                log_q.index_fill_(1, teacher_ids, float("-inf"))  # shared entries leave the sorted L1
        q = log_q.exp_()
        if q.shape[1] <= student_vocab:
            return _Target(matched, q.sort(dim=-1, descending=True).values.to(dtype), None)
        top, idx = q.topk(student_vocab, dim=-1)
        # the tail summed from the left-out entries: exact even when 1 - sum(top) would cancel
        return _Target(matched, top.to(dtype), q.scatter_(1, idx, 0.0).sum(-1).to(dtype))


def _group_kd(h, w, offsets, target: _Target, p: _Problem, s_matched) -> torch.Tensor:
    """Per-group KD ``[c]`` (``T**2`` included) from the student's first rows ``h`` ``[c, Hs]`` (differentiable)."""
    tau = p.spec.temperature
    log_q = torch.log_softmax(_student_logits(h, w, p.spec.student_softcap) / tau, dim=-1)
    matched = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
    if p.method == "span":
        log_q = log_q + offsets.unsqueeze(1)
        if target.matched_logq is not None:
            matched = _generalized_kl(target.matched_logq, log_q[:, p.shared.student_ids.to(log_q.device)])
            log_q = log_q.masked_fill(s_matched, float("-inf"))
    return tau**2 * (matched + _sorted_l1(log_q.exp(), target))


def _generalized_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row sums ``[c]`` of ``p (log p - log q) - p + q`` (I-divergence of unnormalized measures, >= 0)."""
    p = log_p.exp()
    # where, not a product, so p == 0 with log p == -inf gives 0 instead of NaN
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype, device=p.device))
    return (kl - p + log_q.exp()).sum(-1)


def _sorted_l1(q: torch.Tensor, target: _Target) -> torch.Tensor:
    """Row sums ``[c]`` of ``|sort_desc(q) - sort_desc(t)|``, both zero-padded, from the teacher's top values.

    ``q`` ``[c, Vs]`` student values (differentiable, 0 at excluded entries). For ``Vs <= Vt``
    the teacher's ``top`` has ``Vs`` values and its ``tail`` is the rest; else ``top`` is all
    ``Vt`` teacher values and the student's left-out mass plays the tail.
    """
    if target.tail is not None:
        return (q.sort(dim=-1, descending=True).values - target.top).abs().sum(-1) + target.tail
    top, idx = q.topk(target.top.shape[1], dim=-1)
    return (top - target.top).abs().sum(-1) + q.scatter(1, idx, 0.0).sum(-1)


def _ce_and_span_chain(hidden, w, p: _Problem, grad_offsets, acc: _Grads, dtype) -> torch.Tensor:
    """CE summed over label rows; with grads also CE's and the span offsets' chain-rule gradients into ``acc``.

    The span offsets are sums of later rows' label log-probs, so d KD / d row ``r`` is
    ``grad_offsets[group(r)] * d lp_r`` (already scaled by ``kd_scale``).
    """
    chain = torch.zeros(p.labels.shape[0], dtype=dtype, device=hidden.device)
    chain_mask = torch.zeros_like(p.ce_mask)
    if grad_offsets is not None:
        side = p.groups.student
        chain[side.rest_rows] = grad_offsets[side.rest_group]
        chain_mask[side.rest_rows] = True
    # host sync: nonzero() sizes the chunk loop.
    rows_all = (p.ce_mask | chain_mask).nonzero().squeeze(1)
    labels = torch.where(p.ce_mask | chain_mask, p.labels, torch.zeros_like(p.labels))
    ce_sum = torch.zeros((), dtype=dtype, device=hidden.device)
    want_ce = p.spec.ce_weight != 0
    for start in range(0, rows_all.numel(), p.spec.chunk_size_tokens):
        rows = rows_all[start : start + p.spec.chunk_size_tokens]
        ce_mask, c_mask, weights = p.ce_mask[rows], chain_mask[rows], chain[rows]

        def objective(h, weight, rows_labels=labels[rows], ce_mask=ce_mask, c_mask=c_mask, weights=weights):
            ce, lp = _row_terms(h, weight, rows_labels, p.spec)
            ce_value = torch.where(ce_mask, ce, 0.0).sum()
            return ce_value * p.ce_scale + torch.where(c_mask, weights * lp, 0.0).sum(), ce_value

        want = [acc.wanted[0] and (want_ce or grad_offsets is not None),
                acc.wanted[1] and (want_ce or grad_offsets is not None)]
        value, (g_h, g_w) = _value_and_grads(objective, [hidden[rows].to(dtype), w], want)
        ce_sum += value
        acc.add(rows, g_h, g_w)
    return ce_sum
