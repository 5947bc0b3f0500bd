"""Rows excluded by a mask are selected out, not multiplied by 0: NaN / inf there never reaches loss or grads.

A row excluded from KD but still computed (it has a label: CE) can hold a teacher whose
logits are all -inf (e.g. a fully masked position), whose divergence is NaN or inf; NaN * 0 =
NaN, so masking by multiplication poisons the sums and every gradient.
"""

from __future__ import annotations

import pytest
import torch

from megadistill.losses.divergences import DIVERGENCES, PROB_DIVERGENCES
from megadistill.losses.logits import SparseTargets, chunked_distill_loss, topk_targets
from megadistill.objectives.spec import KDSpec

N, HS, HT, V, BAD = 30, 12, 20, 37, 11


def make_case(seed=0):
    """Positive teacher head, so a teacher row of -inf hidden states gives all -inf logits."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    return dict(student_hidden=torch.randn(N, HS, generator=g), student_weight=0.4 * torch.randn(V, HS, generator=g),
                labels=labels, teacher_hidden=torch.randn(N, HT, generator=g),
                teacher_weight=0.3 * torch.rand(V, HT, generator=g))


def run(case, spec, rows=None, **kwargs):
    """Loss and student grads on the ``rows`` subset (all rows by default)."""
    rows = torch.arange(N) if rows is None else rows
    h = case["student_hidden"][rows].clone().requires_grad_(True)
    w = case["student_weight"].clone().requires_grad_(True)
    teacher = {k: case[k][rows] for k in ("teacher_hidden",) if k in case}
    if "teacher_hidden" in case:
        teacher["teacher_weight"] = case["teacher_weight"]
    if "sparse_targets" in case:
        teacher["sparse_targets"] = case["sparse_targets"][rows]
    if "kd_mask" in kwargs:
        kwargs["kd_mask"] = kwargs["kd_mask"][rows]
    out = chunked_distill_loss(h, w, case["labels"][rows], spec, **teacher, **kwargs)
    out.loss.backward()
    return out, h.grad, w.grad


def assert_same(a, b, ce=True):
    """Finite, and equal loss, KD sum and count, (CE sum,) and grads; ``a``'s hidden grad may have extra rows."""
    (out, gh, gw), (ref, rgh, rgw) = a, b
    for value in (out.loss, out.ce_sum, out.kd_sum, gh, gw):
        assert bool(torch.isfinite(value).all())
    if gh.shape != rgh.shape:  # the reference dropped row BAD
        gh = torch.cat([gh[:BAD], gh[BAD + 1 :]])
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.kd_sum, ref.kd_sum, rtol=1e-6, atol=1e-7)
    assert int(out.kd_tokens) == int(ref.kd_tokens)
    if ce:
        torch.testing.assert_close(out.ce_sum, ref.ce_sum, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gh, rgh, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gw, rgw, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("poison", [float("-inf"), float("nan")])
def test_excluded_dense_teacher_row_of_minus_inf_or_nan_equals_dropping_the_row(divergence, poison):
    """The poisoned row keeps a label, so it is projected (CE at weight 0) but excluded from KD."""
    case = make_case()
    case["teacher_hidden"][BAD] = poison  # all -inf (or NaN) teacher logits in that row
    case["labels"][BAD] = 3
    kd_mask = torch.ones(N, dtype=torch.bool)
    kd_mask[BAD] = False
    spec = KDSpec(vocab_size=V, ce_weight=0.0, temperature=2.0, divergence=divergence, chunk_size_tokens=8)
    keep = torch.tensor([i for i in range(N) if i != BAD])
    got = run(case, spec, kd_mask=kd_mask)
    want = run(case, spec, rows=keep, kd_mask=kd_mask)
    assert float(got[1][BAD].abs().max()) == 0.0  # the excluded row gets no gradient
    assert_same(got, want, ce=False)


@pytest.mark.parametrize("divergence", PROB_DIVERGENCES)
def test_ce_row_with_an_excluded_minus_inf_teacher_keeps_its_ce(divergence):
    """The row still gets CE; its KD is excluded: same result as with a finite teacher there."""
    case = make_case(seed=1)
    case["labels"][BAD] = 3
    kd_mask = case["labels"] != -100
    kd_mask[BAD] = False
    spec = KDSpec(vocab_size=V, ce_weight=0.7, temperature=1.5, divergence=divergence, top_k=6, chunk_size_tokens=5)
    want = run(case, spec, kd_mask=kd_mask)
    case["teacher_hidden"][BAD] = float("-inf")
    assert_same(run(case, spec, kd_mask=kd_mask), want)


@pytest.mark.parametrize("divergence", PROB_DIVERGENCES)
def test_excluded_sparse_row_with_no_mass_equals_dropping_the_row(divergence):
    """Sparse targets with all -inf entries and tail (an empty distribution) in a CE-only row."""
    case = make_case(seed=2)
    targets = topk_targets(case.pop("teacher_hidden") @ case.pop("teacher_weight").T, 5)
    logprobs, tail = targets.logprobs.clone(), targets.tail_logprob.clone()
    logprobs[BAD], tail[BAD] = float("-inf"), float("-inf")
    case["sparse_targets"] = SparseTargets(targets.ids, logprobs, tail)
    case["labels"][BAD] = 3
    kd_mask = torch.ones(N, dtype=torch.bool)
    kd_mask[BAD] = False
    spec = KDSpec(vocab_size=V, ce_weight=0.0, divergence=divergence, chunk_size_tokens=7)
    keep = torch.tensor([i for i in range(N) if i != BAD])
    got = run(case, spec, kd_mask=kd_mask)
    want = run(case, spec, rows=keep, kd_mask=kd_mask)
    assert_same(got, want, ce=False)
