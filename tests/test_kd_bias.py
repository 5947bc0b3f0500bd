"""Output biases (BERT / XLM-R MLM heads): z = h @ W[:V].T + b[:V], with the bias gradient through autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadistill.losses.logits import chunked_distill_loss
from megadistill.objectives.spec import KDSpec

N, HS, HT, V, PAD = 50, 12, 18, 43, 5


def make_case(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.25] = -100
    weight = 0.4 * torch.randn(V + PAD, HS, generator=g)
    bias = torch.randn(V + PAD, generator=g)
    bias[V:] = 40.0  # padded rows: would dominate every softmax if they leaked in
    return dict(student_hidden=torch.randn(N, HS, generator=g).to(dtype), student_weight=weight.to(dtype),
                student_bias=bias.to(dtype), labels=labels, teacher_hidden=torch.randn(N, HT, generator=g).to(dtype),
                teacher_weight=(0.5 * torch.randn(V, HT, generator=g)).to(dtype),
                teacher_bias=torch.randn(V, generator=g).to(dtype))


def reference(case, h, w, b, spec):
    """Full logits and autograd: CE + tau^2 KL(teacher || student) (forward KL, or reverse)."""
    z = h.float() @ w[:V].float().T + b[:V].float()
    if spec.student_softcap:
        z = spec.student_softcap * torch.tanh(z / spec.student_softcap)
    mask = case["labels"] != -100
    ce = F.cross_entropy(z, case["labels"], ignore_index=-100, reduction="sum")
    zt = case["teacher_hidden"].float() @ case["teacher_weight"].float().T + case["teacher_bias"].float()
    tau = spec.temperature
    log_p, log_q = F.log_softmax(zt / tau, -1), F.log_softmax(z / tau, -1)
    if spec.divergence == "forward_kl":
        rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    else:
        rows = (log_q.exp() * (log_q - log_p)).sum(-1)
    kd = tau**2 * rows[mask].sum()
    n = mask.sum()
    return spec.ce_weight * ce / n + spec.kd_weight * kd / n


def grads(case, spec, fn, **kwargs):
    leaves = {k: case[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias")}
    if fn == "chunked":
        loss = chunked_distill_loss(leaves["student_hidden"], leaves["student_weight"], case["labels"], spec,
                                    student_bias=leaves["student_bias"], teacher_hidden=case["teacher_hidden"],
                                    teacher_weight=case["teacher_weight"], teacher_bias=case["teacher_bias"], **kwargs).loss
    else:
        loss = reference(case, leaves["student_hidden"], leaves["student_weight"], leaves["student_bias"], spec)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk", [7, N])
def test_biased_heads_match_the_autograd_reference(divergence, softcap, chunk):
    case = make_case()
    spec = KDSpec(vocab_size=V, ce_weight=0.4, kd_weight=0.6, temperature=2.0, divergence=divergence,
                  chunk_size_tokens=chunk, student_softcap=softcap)
    loss, got = grads(case, spec, "chunked")
    ref_loss, want = grads(case, spec, "reference")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6)
    assert float(got["student_bias"][V:].abs().max()) == 0.0  # padded rows get no gradient
    assert float(got["student_bias"][:V].abs().max()) > 0


def test_bias_gradient_is_the_logit_gradient_summed_over_tokens():
    """CE only: d loss / d b_v = sum_t (softmax(z_t)_v - [y_t = v]) / n."""
    case = make_case(seed=1)
    spec = KDSpec(vocab_size=V, kd_weight=0.0)
    _, got = grads(case, spec, "chunked")
    z = case["student_hidden"] @ case["student_weight"][:V].T + case["student_bias"][:V]
    mask = case["labels"] != -100
    grad_z = F.softmax(z[mask], -1) - F.one_hot(case["labels"][mask], V).float()
    torch.testing.assert_close(got["student_bias"][:V], grad_z.sum(0) / mask.sum(), rtol=1e-5, atol=1e-6)


def test_bf16_bias_keeps_its_dtype_and_matches_loosely():
    case = make_case(seed=2, dtype=torch.bfloat16)
    spec = KDSpec(vocab_size=V, temperature=1.5, chunk_size_tokens=9)
    _, got = grads(case, spec, "chunked")
    _, want = grads(case, spec, "reference")
    assert got["student_bias"].dtype == torch.bfloat16
    torch.testing.assert_close(got["student_bias"].float(), want["student_bias"].float(), rtol=2e-2, atol=2e-2)


def test_frozen_bias_gets_no_grad_and_only_bias_trainable_works():
    case = make_case(seed=3)
    spec = KDSpec(vocab_size=V, temperature=2.0)
    h = case["student_hidden"].clone().requires_grad_(True)
    out = chunked_distill_loss(h, case["student_weight"], case["labels"], spec, student_bias=case["student_bias"],
                               teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"])
    out.loss.backward()
    assert case["student_bias"].grad is None and h.grad is not None
    b = case["student_bias"].clone().requires_grad_(True)
    out = chunked_distill_loss(case["student_hidden"], case["student_weight"], case["labels"], spec, student_bias=b)
    (2.0 * out.loss).backward()
    _, want = grads(dict(case, teacher_bias=case["teacher_bias"]), KDSpec(vocab_size=V, kd_weight=0.0), "chunked")
    torch.testing.assert_close(b.grad, 2.0 * want["student_bias"], rtol=1e-5, atol=1e-7)


def test_teacher_bias_changes_the_target_and_bad_bias_shapes_raise():
    case = make_case(seed=4)
    spec = KDSpec(vocab_size=V, ce_weight=0.0, temperature=1.0)
    args = (case["student_hidden"], case["student_weight"], case["labels"], spec)
    teacher = dict(teacher_hidden=case["teacher_hidden"], teacher_weight=case["teacher_weight"])
    with_bias = chunked_distill_loss(*args, teacher_bias=case["teacher_bias"], **teacher)
    without = chunked_distill_loss(*args, **teacher)
    assert abs(float(with_bias.kd - without.kd)) > 1e-3
    with pytest.raises(ValueError, match=r"student_bias must be \[Vp\] = \[48\]"):
        chunked_distill_loss(*args, student_bias=torch.zeros(V), **teacher)
    with pytest.raises(ValueError, match=r"teacher_bias must be \[V\] = \[43\]"):
        chunked_distill_loss(*args, teacher_bias=torch.zeros(V + PAD), **teacher)
