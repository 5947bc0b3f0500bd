"""Top-k + tail targets at temperature T != 1: tempered before the top-k, never re-tempered after.

A tail bucket cannot be re-tempered: the tempered tail is sum_i p_i^(1/T) over the tail ids,
not (sum_i p_i)^(1/T). Online, the dense teacher logits are divided by T before the top-k;
offline, a cache is valid only at the temperature it was built with.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadistill.losses.divergences import PROB_DIVERGENCES
from megadistill.losses.logits import SparseTargets, chunked_distill_loss, remap_sparse_targets, topk_targets
from megadistill.models.vocab import VocabMap
from megadistill.objectives.spec import KDSpec

N, HS, HT, V = 40, 16, 24, 61


def make_case(seed=0, n=N, vocab=V, hs=HS, ht=HT, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    return dict(student_hidden=torch.randn(n, hs, generator=g), student_weight=scale * torch.randn(vocab, hs, generator=g),
                labels=labels, teacher_hidden=torch.randn(n, ht, generator=g),
                teacher_weight=scale * 1.5 * torch.randn(vocab, ht, generator=g))


def loss_and_grads(case, spec, **kwargs):
    """Chunked loss on fresh leaf copies of the student tensors; returns (output, grad_hidden, grad_weight)."""
    h = case["student_hidden"].clone().requires_grad_(True)
    w = case["student_weight"].clone().requires_grad_(True)
    out = chunked_distill_loss(h, w, case["labels"], spec, **kwargs)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("divergence", [d for d in PROB_DIVERGENCES if d != "tv"])
def test_student_equal_to_teacher_at_temperature_2_gives_zero_kd_and_grad(divergence):
    """k=64 of V=262,144 at T=2: the old re-tempered tail gave KD ~7.9 nats and non-zero gradients.

    (TV is left out: its subgradient sign(q - p) at q == p is +-1 on rounding noise.)
    """
    vocab, hidden = 262_144, 16
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, hidden, generator=g), torch.randn(vocab, hidden, generator=g)
    case = dict(student_hidden=h, student_weight=w, labels=torch.full((6,), -100))
    spec = KDSpec(vocab_size=vocab, ce_weight=0.0, temperature=2.0, divergence=divergence, top_k=64, chunk_size_tokens=4)
    out, gh, gw = loss_and_grads(case, spec, teacher_hidden=h.clone(), teacher_weight=w.clone(),
                                 kd_mask=torch.ones(6, dtype=torch.bool))
    assert int(out.kd_tokens) == 6
    assert abs(float(out.kd)) < 1e-5
    assert float(gh.abs().max()) < 1e-5 and float(gw.abs().max()) < 1e-5


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0])
def test_tempered_topk_with_k_equal_v_is_the_dense_loss(divergence, temperature):
    case = make_case(seed=1)
    teacher = dict(teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"])
    common = dict(vocab_size=V, ce_weight=0.3, temperature=temperature, divergence=divergence, chunk_size_tokens=7)
    sparse, sgh, sgw = loss_and_grads(case, KDSpec(top_k=V, **common), **teacher)
    dense, dgh, dgw = loss_and_grads(case, KDSpec(**common), **teacher)
    assert float(dense.kd) > 0
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.kd_sum, dense.kd_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sgh, dgh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sgw, dgw, rtol=1e-4, atol=1e-6)


def test_tempered_topk_matches_bins_of_the_tempered_teacher():
    """Reference: bins = kept ids + tail of softmax(z_t / T) from the full distribution, student at T."""
    case, tau, k = make_case(seed=2), 2.0, 5
    zs = case["student_hidden"] @ case["student_weight"].T
    zt = case["teacher_hidden"] @ case["teacher_weight"].T
    p, q = F.softmax(zt / tau, -1), F.softmax(zs / tau, -1)
    ids = p.topk(k, -1).indices
    p_bins = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(1, keepdim=True)], 1)
    q_bins = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(1, keepdim=True)], 1)
    mask = case["labels"] != -100
    want = tau**2 * (p_bins * (p_bins.log() - q_bins.log())).sum(1)[mask].sum()
    spec = KDSpec(vocab_size=V, ce_weight=0.0, temperature=tau, top_k=k, chunk_size_tokens=9)
    out = chunked_distill_loss(case["student_hidden"], case["student_weight"], case["labels"], spec,
                               teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"])
    torch.testing.assert_close(out.kd_sum, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_offline_targets_at_the_loss_temperature_equal_online_topk(top_p):
    case, tau = make_case(seed=3), 2.5
    zt = case["teacher_hidden"] @ case["teacher_weight"].T
    cached = topk_targets(zt, 8, top_p, temperature=tau)
    assert cached.temperature == tau
    spec = KDSpec(vocab_size=V, ce_weight=0.5, temperature=tau, divergence="reverse_kl", top_k=8, top_p=top_p,
                  chunk_size_tokens=6)
    offline, ogh, ogw = loss_and_grads(case, spec, sparse_targets=cached)
    online, gh, gw = loss_and_grads(case, spec, teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"])
    torch.testing.assert_close(offline.loss, online.loss)
    torch.testing.assert_close(ogh, gh)
    torch.testing.assert_close(ogw, gw)


def test_sparse_targets_of_another_temperature_raise_with_the_fix():
    case = make_case(seed=4)
    cached = topk_targets(case["teacher_hidden"] @ case["teacher_weight"].T, 8)  # built at T = 1
    spec = KDSpec(vocab_size=V, temperature=2.0, top_k=8)
    with pytest.raises(ValueError, match=r"temperature 1.0 but loss.temperature is 2.0.*--temperature 2.0"):
        chunked_distill_loss(case["student_hidden"], case["student_weight"], case["labels"], spec, sparse_targets=cached)
    # kd_weight 0 skips KD: the targets are not used, so nothing to check.
    chunked_distill_loss(case["student_hidden"], case["student_weight"], case["labels"],
                         KDSpec(vocab_size=V, temperature=2.0, kd_weight=0.0), sparse_targets=cached)


def test_topk_targets_temper_before_the_cut_and_record_the_temperature():
    g = torch.Generator().manual_seed(5)
    logits = 3 * torch.randn(7, 300, generator=g)
    tau = 2.0
    t = topk_targets(logits, 10, 0.9, temperature=tau)
    plain = topk_targets(logits / tau, 10, 0.9)
    assert t.temperature == tau and plain.temperature == 1.0
    assert torch.equal(t.ids, plain.ids)
    torch.testing.assert_close(t.logprobs, plain.logprobs)
    p = F.softmax(logits / tau, -1)
    kept = torch.where(torch.isfinite(t.logprobs), p.gather(1, t.ids), torch.zeros(()))
    torch.testing.assert_close(t.tail_logprob.exp(), 1 - kept.sum(1), rtol=1e-5, atol=1e-6)  # sum of p_i^(1/T) / Z
    with pytest.raises(ValueError, match="temperature must be > 0"):
        topk_targets(logits, 10, temperature=0.0)


def test_sparse_targets_temperature_survives_slicing_moving_remapping_and_concatenation():
    t = topk_targets(torch.randn(6, 30), 4, temperature=1.5)
    assert t[1:3].temperature == 1.5 and t[torch.tensor([0, 5])].temperature == 1.5
    assert t.to("cpu").temperature == 1.5
    vmap = VocabMap(list(range(0, 30, 2)), 30, unk_teacher_id=0)
    assert remap_sparse_targets(t, vmap).temperature == 1.5
    both = SparseTargets.cat([t[:2], t[2:]])
    assert both.temperature == 1.5 and torch.equal(both.ids, t.ids)
    with pytest.raises(ValueError, match="different temperatures"):
        SparseTargets.cat([t, topk_targets(torch.randn(6, 30), 4)])
