"""Every KD divergence, dense and top-k sparse, checked against a plain full-logits autograd reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megadistill.losses.divergences import DIVERGENCES, PROB_DIVERGENCES, prob_divergence
from megadistill.losses.logits import SparseTargets, chunked_distill_loss, remap_sparse_targets, topk_targets
from megadistill.models.vocab import VocabMap
from megadistill.objectives.spec import KDSpec

N, HS, HT, V, PAD = 60, 16, 24, 41, 3


def ref_divergence(name, log_p, log_q, beta=0.5):
    """Textbook per-row divergences from probabilities (autograd through ``log_q``)."""
    p, q = log_p.exp(), log_q.exp()
    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return (p * (log_p - log_q)).nan_to_num().sum(-1)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return (q * (log_q - log_p)).sum(-1)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).nan_to_num().sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if name == "tv":
        return 0.5 * (q - p).abs().sum(-1)
    if name == "mse_prob":
        return ((q - p) ** 2).sum(-1)
    raise AssertionError(name)


def ref_loss(case, name, tau, beta, ce_weight, kd_weight, sparse=None, top_k=None, top_p=1.0, softcap=None):
    """Full [N, V] logits, torch autograd; the sparse path collapses the student onto kept ids + tail.

    Online top-k is taken from the teacher logits divided by tau (the tempered distribution), and
    sparse targets are used as they are (they hold the distribution at their own temperature).
    """
    z = case["student_hidden"] @ case["student_weight"][:V].T
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    labels = case["labels"]
    mask = labels != -100
    ce = F.cross_entropy(z, labels, ignore_index=-100, reduction="sum") / mask.sum()
    zt = case["teacher_hidden"] @ case["teacher_weight"].T
    if top_k is not None:
        sparse = topk_targets(zt / tau, top_k, top_p)
    if sparse is not None:
        rows = _ref_sparse_rows(z, sparse, name, tau, beta)
    elif name == "mse":
        rows = ((z - zt) ** 2).mean(-1)
    elif name == "cosine":
        rows = 1 - F.cosine_similarity(z, zt, dim=-1)
    else:
        rows = tau**2 * ref_divergence(name, F.log_softmax(zt / tau, -1), F.log_softmax(z / tau, -1), beta)
    kd = (rows * mask).sum() / mask.sum()
    return ce_weight * ce + kd_weight * kd, kd


def _ref_sparse_rows(z, sparse, name, tau, beta):
    """Row by row, bins = the row's kept ids (padding slots left out) + one tail bin."""
    q = F.softmax(z / tau, -1)
    rows = []
    for i in range(z.shape[0]):
        valid = torch.isfinite(sparse.logprobs[i])
        q_kept = q[i, sparse.ids[i][valid]]
        q_bins = torch.cat([q_kept, (1 - q_kept.sum()).unsqueeze(0)])
        log_p = torch.cat([sparse.logprobs[i][valid], sparse.tail_logprob[i].unsqueeze(0)])
        if not torch.isfinite(log_p[-1]):  # empty tail (k = V): drop the bin
            q_bins, log_p = q_bins[:-1], log_p[:-1]
        rows.append(ref_divergence(name, log_p.unsqueeze(0), q_bins.log().unsqueeze(0), beta))
    return tau**2 * torch.cat(rows)


def make_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    weight = 0.4 * torch.randn(V + PAD, HS, generator=g)
    weight[V:] = 30.0  # padded rows: would dominate if they leaked into any softmax
    return dict(
        student_hidden=torch.randn(N, HS, generator=g), student_weight=weight, labels=labels,
        teacher_hidden=torch.randn(N, HT, generator=g), teacher_weight=0.6 * torch.randn(V, HT, generator=g),
    )


def call_chunked(case, sparse_targets=None, **spec_fields):
    """The chunked loss on a ``make_case`` dict with ``KDSpec(vocab_size=V, **spec_fields)``."""
    tensors = {k: v for k, v in case.items() if k in ("teacher_hidden", "teacher_weight")}
    return chunked_distill_loss(case["student_hidden"], case["student_weight"], case["labels"],
                                KDSpec(vocab_size=V, **spec_fields), sparse_targets=sparse_targets, **tensors)


def run_both(case, chunk, ref_kwargs, **loss_kwargs):
    """Loss, kd and grads of the chunked loss and of the reference on cloned leaf tensors."""
    ours = {k: v.clone().requires_grad_(k in ("student_hidden", "student_weight")) for k, v in case.items()}
    theirs = {k: v.clone().requires_grad_(k in ("student_hidden", "student_weight")) for k, v in case.items()}
    sparse = loss_kwargs.get("sparse_targets")
    if sparse is not None:
        ours.pop("teacher_hidden"), ours.pop("teacher_weight")
    out = call_chunked(ours, chunk_size_tokens=chunk, **loss_kwargs)
    out.loss.backward()
    loss, kd = ref_loss(theirs, sparse=sparse, **ref_kwargs)
    loss.backward()
    return out, loss, kd, ours, theirs


def assert_match(out, loss, kd, ours, theirs, tol=1e-5):
    torch.testing.assert_close(out.loss, loss.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(out.kd, kd.detach(), rtol=tol, atol=tol)
    for key in ("student_hidden", "student_weight"):
        torch.testing.assert_close(ours[key].grad, theirs[key].grad, rtol=1e-4, atol=1e-6)
    assert float(ours["student_weight"].grad[V:].abs().max()) == 0.0  # padded rows untouched


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 7, N])
def test_dense_divergence_matches_reference(name, tau, chunk):
    case = make_case()
    kw = dict(name=name, tau=tau, beta=0.3, ce_weight=0.4, kd_weight=0.6)
    out, loss, kd, ours, theirs = run_both(case, chunk, kw, divergence=name, temperature=tau, jsd_beta=0.3,
                                           ce_weight=0.4, kd_weight=0.6)
    assert float(out.kd) > 0
    assert_match(out, loss, kd, ours, theirs)


@pytest.mark.parametrize("name", PROB_DIVERGENCES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (12, 0.8), (V, 1.0)])
def test_online_topk_divergence_matches_reference(name, tau, top_k, top_p):
    case = make_case(seed=1)
    kw = dict(name=name, tau=tau, beta=0.7, ce_weight=0.5, kd_weight=1.0, top_k=top_k, top_p=top_p)
    for chunk in (3, N):
        out, loss, kd, ours, theirs = run_both(case, chunk, kw, divergence=name, temperature=tau, jsd_beta=0.7,
                                               ce_weight=0.5, kd_weight=1.0, top_k=top_k, top_p=top_p)
        assert_match(out, loss, kd, ours, theirs)


def test_sparse_targets_equal_online_topk_and_full_k_equals_dense():
    case = make_case(seed=2)
    zt = case["teacher_hidden"] @ case["teacher_weight"].T
    sparse = topk_targets(zt, 6, 0.9)
    kw = dict(divergence="reverse_kl", temperature=1.0, ce_weight=0.0, kd_weight=1.0)
    cached, *_ = run_both(case, 5, dict(name="reverse_kl", tau=1.0, beta=0.5, ce_weight=0, kd_weight=1.0), sparse_targets=sparse, **kw)
    online, *_ = run_both(case, 5, dict(name="reverse_kl", tau=1.0, beta=0.5, ce_weight=0, kd_weight=1.0, top_k=6, top_p=0.9), top_k=6, top_p=0.9, **kw)
    torch.testing.assert_close(cached.loss, online.loss)
    # k = V keeps everything: the tail is empty and the sparse loss is the dense loss.
    full, *_ = run_both(case, 5, dict(name="forward_kl", tau=1.0, beta=0.5, ce_weight=0, kd_weight=1.0, top_k=V), top_k=V,
                        divergence="forward_kl", ce_weight=0.0)
    dense, *_ = run_both(case, 5, dict(name="forward_kl", tau=1.0, beta=0.5, ce_weight=0, kd_weight=1.0), divergence="forward_kl", ce_weight=0.0)
    torch.testing.assert_close(full.loss, dense.loss, rtol=1e-5, atol=1e-6)


def test_jsd_limits_are_forward_and_reverse_kl():
    g = torch.Generator().manual_seed(3)
    log_p = F.log_softmax(torch.randn(8, 30, generator=g), -1)
    log_q = F.log_softmax(torch.randn(8, 30, generator=g), -1)
    fwd, _ = prob_divergence("forward_kl", log_p, log_q)
    rev, _ = prob_divergence("reverse_kl", log_p, log_q)
    torch.testing.assert_close(prob_divergence("jsd", log_p, log_q, 0.0)[0], fwd)
    torch.testing.assert_close(prob_divergence("jsd", log_p, log_q, 1.0)[0], rev)
    # The endpoints are limits of the mixture form, not special cases bolted on.
    eps = 1e-4
    torch.testing.assert_close(prob_divergence("jsd", log_p, log_q, eps)[0] / eps, fwd, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(prob_divergence("jsd", log_p, log_q, 1 - eps)[0] / eps, rev, rtol=1e-2, atol=1e-4)
    mid, _ = prob_divergence("jsd", log_p, log_q, 0.5)
    assert bool((mid > 0).all()) and bool((mid <= math.log(2) + 1e-6).all())  # JSD(0.5) is bounded by log 2


def test_topk_tail_bucket_sums_to_one_and_is_exact():
    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(20, 500, generator=g)
    for k, top_p in [(1, 1.0), (16, 1.0), (64, 0.9), (500, 1.0)]:
        t = topk_targets(logits, k, top_p)
        total = torch.logsumexp(torch.cat([t.logprobs, t.tail_logprob.unsqueeze(1)], 1), 1)
        torch.testing.assert_close(total, torch.zeros(20), atol=2e-6, rtol=0)
        probs = F.softmax(logits, -1)
        kept = torch.where(torch.isfinite(t.logprobs), probs.gather(1, t.ids), torch.zeros(()))
        torch.testing.assert_close(t.tail_logprob.exp(), (1 - kept.sum(1)).clamp_min(0), atol=2e-6, rtol=1e-4)
        if top_p < 1:  # smallest prefix reaching p: dropping its last entry falls below p
            counts = torch.isfinite(t.logprobs).sum(1)
            assert bool((counts < k).any())
            sorted_p = probs.sort(-1, descending=True).values.cumsum(-1)
            for row, c in enumerate(counts.tolist()):
                assert c == k or (sorted_p[row, c - 1] >= top_p and (c == 1 or sorted_p[row, c - 2] < top_p))
    assert torch.isinf(topk_targets(logits, 500).tail_logprob).all()  # nothing left: tail mass 0


def test_remap_to_trimmed_vocab_renormalizes_over_kept_ids():
    teacher_logits = torch.randn(5, 30)
    targets = topk_targets(teacher_logits, 8)
    kept_teacher_ids = sorted(set(range(0, 30, 2)) | {0})
    vmap = VocabMap(kept_teacher_ids, 30, unk_teacher_id=0)
    out = remap_sparse_targets(targets, vmap)
    total = torch.logsumexp(torch.cat([out.logprobs, out.tail_logprob.unsqueeze(1)], 1), 1)
    torch.testing.assert_close(total, torch.zeros(5), atol=1e-6, rtol=0)
    teacher_ids = vmap.to_teacher(out.ids)
    valid = torch.isfinite(out.logprobs)
    assert bool((teacher_ids[valid] % 2 == 0).all())  # odd (dropped) ids are gone
    # Ratios between surviving entries are unchanged (renormalization only).
    for row in range(5):
        ids = [i for i, ok in zip(targets.ids[row].tolist(), (targets.ids[row] % 2 == 0).tolist()) if ok]
        if len(ids) >= 2:
            lp = dict(zip(targets.ids[row].tolist(), targets.logprobs[row].tolist()))
            new = dict(zip(teacher_ids[row][valid[row]].tolist(), out.logprobs[row][valid[row]].tolist()))
            assert new[ids[0]] - new[ids[1]] == pytest.approx(lp[ids[0]] - lp[ids[1]], abs=1e-5)


def test_bad_inputs_are_clear():
    case = make_case()
    targets = topk_targets(case["teacher_hidden"] @ case["teacher_weight"].T, 4)
    base = {k: case[k] for k in ("student_hidden", "student_weight", "labels")}
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        call_chunked(case, divergence="kl")
    with pytest.raises(ValueError, match="beta"):
        call_chunked(case, divergence="jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="dense teacher"):
        call_chunked(base, sparse_targets=targets, divergence="mse")
    with pytest.raises(ValueError, match="not both"):
        call_chunked(case, sparse_targets=targets)
    bad = SparseTargets(targets.ids + V, targets.logprobs, targets.tail_logprob)
    with pytest.raises(ValueError, match="remap_sparse_targets"):
        call_chunked(base, sparse_targets=bad)
    with pytest.raises(ValueError, match="top_k"):
        call_chunked(case, top_k=0)


def test_auto_chunk_size_bounds_the_buffer():
    from megadistill.losses.logits import auto_chunk_size_tokens

    assert auto_chunk_size_tokens(262_144) == 64  # 64 x 262,144 x 4 B = 64 MiB
    assert auto_chunk_size_tokens(7_040) * 7_040 * 4 <= 64 * 2**20 < (auto_chunk_size_tokens(7_040) + 1) * 7_040 * 4
    assert auto_chunk_size_tokens(10**9) == 1
