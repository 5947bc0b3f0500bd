"""Chunked CE + KD loss checked against a plain full-logits autograd reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadistill.losses.logits import chunked_distill_loss
from megadistill.objectives.spec import KDSpec

N_TOKENS, HS, HT, VOCAB = 100, 24, 40, 53


def call_chunked(student_hidden, student_weight, labels, teacher_hidden=None, teacher_weight=None, *, vocab_size=None,
                 kd_mask=None, sparse_targets=None, normalizer=None, ignore_index=-100, **spec_fields):
    """The chunked loss with a KDSpec built from the old keyword form (vocab_size defaults to the head rows)."""
    spec = KDSpec(vocab_size=student_weight.shape[0] if vocab_size is None else vocab_size, **spec_fields)
    return chunked_distill_loss(student_hidden, student_weight, labels, spec, teacher_hidden=teacher_hidden,
                                teacher_weight=teacher_weight, sparse_targets=sparse_targets, kd_mask=kd_mask,
                                normalizer=normalizer, ignore_index=ignore_index)


def naive_distill_loss(
    student_hidden, student_weight, labels, teacher_hidden=None, teacher_weight=None, *,
    vocab_size=None, temperature=1.0, ce_weight=1.0, kd_weight=1.0, kd_mask=None,
    student_softcap=None, teacher_softcap=None, ignore_index=-100, chunk_size_tokens=None,
):
    """Reference: full [N, V] fp32 logits and torch autograd. Returns (loss, ce, kd).

    ``chunk_size_tokens`` is accepted and ignored so both functions take the same kwargs.
    """
    vocab = student_weight.shape[0] if vocab_size is None else vocab_size
    z = student_hidden.float() @ student_weight[:vocab].float().T
    if student_softcap is not None:
        z = student_softcap * torch.tanh(z / student_softcap)
    ce_mask = labels != ignore_index
    ce = F.cross_entropy(z, labels, ignore_index=ignore_index, reduction="sum") / ce_mask.sum().clamp(min=1)
    kd = torch.zeros(())
    if teacher_hidden is not None and kd_weight != 0:
        with torch.no_grad():
            zt = teacher_hidden.float() @ teacher_weight.float().T
            if teacher_softcap is not None:
                zt = teacher_softcap * torch.tanh(zt / teacher_softcap)
        mask = ce_mask if kd_mask is None else kd_mask
        log_ps = F.log_softmax(z / temperature, dim=-1)
        log_pt = F.log_softmax(zt / temperature, dim=-1)
        kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
        kd = temperature**2 * (kl * mask).sum() / mask.sum().clamp(min=1)
    return ce_weight * ce + kd_weight * kd, ce.detach(), kd.detach()


def make_case(dtype=torch.float32, padded_rows=0, seed=0, n=N_TOKENS):
    """Random student/teacher tensors with some ignored labels; returns a dict of kwargs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    case = dict(
        student_hidden=torch.randn(n, HS, generator=g).to(dtype),
        student_weight=(0.3 * torch.randn(VOCAB + padded_rows, HS, generator=g)).to(dtype),
        labels=labels,
        teacher_hidden=torch.randn(n, HT, generator=g).to(dtype),
        teacher_weight=(0.5 * torch.randn(VOCAB, HT, generator=g)).to(dtype),
    )
    if padded_rows:
        # Large padded rows would dominate the softmax if they were not masked.
        case["student_weight"][VOCAB:] = 50.0
    return case


def run_both(case, **kwargs):
    """Run chunked and naive on fresh leaf copies; return (chunked out, grads, naive out, grads)."""
    results = []
    for fn in (call_chunked, naive_distill_loss):
        h = case["student_hidden"].clone().requires_grad_(True)
        w = case["student_weight"].clone().requires_grad_(True)
        args = dict(case, student_hidden=h, student_weight=w)
        out = fn(**args, **kwargs)
        loss = out.loss if fn is call_chunked else out[0]
        loss.backward()
        results += [out, (h.grad, w.grad)]
    return results


def assert_matches(case, atol=1e-5, rtol=1e-5, **kwargs):
    """Chunked loss, CE, KD and both grads equal the naive reference."""
    out, (gh, gw), ref, (rgh, rgw) = run_both(case, **kwargs)
    torch.testing.assert_close(out.loss.float(), ref[0].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.ce, ref[1].float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.kd, ref[2].float(), atol=atol, rtol=rtol)
    assert gh.dtype == case["student_hidden"].dtype and gw.dtype == case["student_weight"].dtype
    torch.testing.assert_close(gh.float(), rgh.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(gw.float(), rgw.float(), atol=atol, rtol=rtol)
    return out, (gh, gw)


@pytest.mark.parametrize("chunk", [1, 7, 64, N_TOKENS, N_TOKENS + 13])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_mixed_matches_naive_over_chunk_sizes(chunk, temperature):
    assert_matches(make_case(), temperature=temperature, ce_weight=0.3, kd_weight=0.7, chunk_size_tokens=chunk)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize(
    "weights", [dict(ce_weight=1.0, kd_weight=0.0), dict(ce_weight=0.0, kd_weight=1.0), dict(ce_weight=0.5, kd_weight=2.0)]
)
def test_weights_match_naive(weights, temperature):
    out, _ = assert_matches(make_case(seed=1), temperature=temperature, chunk_size_tokens=16, **weights)
    if weights["kd_weight"] == 0:
        assert int(out.kd_tokens) == 0 and out.kd.item() == 0


def test_ce_only_without_teacher():
    case = make_case(seed=2)
    case.update(teacher_hidden=None, teacher_weight=None)
    out, _ = assert_matches(case, chunk_size_tokens=9)
    assert int(out.kd_tokens) == 0 and out.kd.item() == 0
    assert int(out.ce_tokens) == int((case["labels"] != -100).sum())


def test_kd_mask_differs_from_label_mask():
    case = make_case(seed=3)
    kd_mask = torch.rand(N_TOKENS, generator=torch.Generator().manual_seed(9)) < 0.6
    assert not torch.equal(kd_mask, case["labels"] != -100)
    out, _ = assert_matches(case, kd_mask=kd_mask, temperature=2.0, chunk_size_tokens=11)
    assert int(out.kd_tokens) == int(kd_mask.sum())


def test_no_ce_tokens_gives_zero_ce_and_kd_only_grads():
    case = make_case(seed=4)
    case["labels"][:] = -100
    kd_mask = torch.ones(N_TOKENS, dtype=torch.bool)
    out, (gh, _) = assert_matches(case, kd_mask=kd_mask, chunk_size_tokens=32)
    assert out.ce.item() == 0 and int(out.ce_tokens) == 0 and torch.isfinite(out.loss)
    assert gh.abs().sum() > 0


def test_nothing_to_learn_gives_zero_loss_and_grads():
    case = make_case(seed=5)
    case["labels"][:] = -100
    out, (gh, gw) = run_both(case, chunk_size_tokens=8)[:2]
    assert out.loss.item() == 0 and out.ce.item() == 0 and out.kd.item() == 0
    assert gh.abs().sum() == 0 and gw.abs().sum() == 0


def test_padded_rows_are_masked_and_get_zero_grad():
    case = make_case(padded_rows=11, seed=6)
    out, (gh, gw) = assert_matches(case, vocab_size=VOCAB, temperature=2.5, chunk_size_tokens=17)
    assert gw.shape == case["student_weight"].shape
    assert gw[VOCAB:].abs().sum() == 0
    assert out.loss.item() < 20, "padded rows with logit ~50 must not reach the softmax"


@pytest.mark.parametrize("chunk", [5, N_TOKENS])
def test_softcap_matches_naive(chunk):
    case = make_case(seed=7)
    case["student_weight"] = case["student_weight"] * 4  # logits near the cap exercise tanh'
    assert_matches(case, student_softcap=3.0, teacher_softcap=5.0, temperature=1.5, chunk_size_tokens=chunk)


@pytest.mark.parametrize("chunk", [7, 64])
def test_bf16_matches_naive_loosely(chunk):
    case = make_case(dtype=torch.bfloat16, padded_rows=3, seed=8)
    assert_matches(
        case, atol=2e-2, rtol=2e-2, vocab_size=VOCAB, temperature=2.0, ce_weight=0.5, kd_weight=0.5,
        chunk_size_tokens=chunk, student_softcap=30.0,
    )


def test_kd_temperature_grad_matches_naive():
    """tau**2 scaling: KD-only gradients at tau = 4 agree with autograd through the reference."""
    case = make_case(seed=10)
    out, (gh, _) = assert_matches(case, ce_weight=0.0, temperature=4.0, chunk_size_tokens=13)
    assert out.kd.item() > 0 and gh.abs().sum() > 0


def test_eval_mode_returns_same_values():
    case = make_case(seed=11)
    kwargs = dict(temperature=2.5, ce_weight=0.4, kd_weight=0.6, chunk_size_tokens=10)
    train = call_chunked(
        **dict(case, student_hidden=case["student_hidden"].requires_grad_(True)), **kwargs
    )
    with torch.no_grad():
        evaluated = call_chunked(**case, **kwargs)
    plain = call_chunked(**dict(case, student_hidden=case["student_hidden"].detach()), **kwargs)
    for other in (evaluated, plain):
        assert not other.loss.requires_grad
        torch.testing.assert_close(other.loss, train.loss.detach(), atol=0, rtol=0)
        torch.testing.assert_close(other.kd, train.kd, atol=0, rtol=0)
        torch.testing.assert_close(other.ce, train.ce, atol=0, rtol=0)


def test_identical_teacher_and_student_gives_zero_kd():
    case = make_case(seed=12)
    case.update(teacher_hidden=case["student_hidden"].clone(), teacher_weight=case["student_weight"].clone())
    out, (gh, gw) = run_both(case, ce_weight=0.0, temperature=2.0, chunk_size_tokens=16)[:2]
    assert abs(out.kd.item()) < 1e-6
    assert gh.abs().max() < 1e-6 and gw.abs().max() < 1e-6


def test_frozen_student_head_gets_no_grad_and_grad_output_scales():
    case = make_case(seed=13)
    h = case["student_hidden"].clone().requires_grad_(True)
    out = call_chunked(**dict(case, student_hidden=h), temperature=2.0, chunk_size_tokens=20)
    (3.0 * out.loss + h.sum()).backward()
    assert case["student_weight"].grad is None
    ref_h = case["student_hidden"].clone().requires_grad_(True)
    ref = naive_distill_loss(**dict(case, student_hidden=ref_h), temperature=2.0)[0]
    (3.0 * ref + ref_h.sum()).backward()
    torch.testing.assert_close(h.grad, ref_h.grad, atol=1e-5, rtol=1e-5)


def test_teacher_row_mismatch_raises():
    case = make_case(padded_rows=4)
    case["teacher_weight"] = torch.randn(VOCAB + 4, HT)
    with pytest.raises(ValueError, match=rf"teacher head has {VOCAB + 4} rows .* {VOCAB} ids: restrict .*VocabMap"):
        call_chunked(**case, vocab_size=VOCAB)


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (dict(labels=torch.full((N_TOKENS,), VOCAB + 7)), {}, f"label {VOCAB + 7} is outside"),
        (dict(labels=torch.zeros(N_TOKENS - 1, dtype=torch.long)), {}, "labels must be"),
        (dict(teacher_hidden=torch.randn(N_TOKENS - 1, HT)), {}, "teacher_hidden must be"),
        (dict(student_hidden=torch.randn(N_TOKENS, HS + 1)), {}, "width"),
        ({}, dict(kd_mask=torch.ones(3, dtype=torch.bool)), "kd_mask must be"),
        ({}, dict(temperature=0.0), "temperature must be > 0"),  # KDSpec validates it
        ({}, dict(chunk_size_tokens=0), "chunk_size_tokens must be >= 1"),  # KDSpec validates it
        ({}, dict(vocab_size=VOCAB + 1), "vocab_size"),
    ],
)
def test_bad_input_raises(change, kwargs, message):
    with pytest.raises(ValueError, match=message):
        call_chunked(**dict(make_case(), **change), **kwargs)


def test_restricted_teacher_head_equals_renormalized_full_distribution():
    """Design sanity: softmax over kept head rows == full softmax restricted to kept ids, renormalized."""
    g = torch.Generator().manual_seed(14)
    full_head, hidden = torch.randn(300, HT, generator=g), torch.randn(6, HT, generator=g)
    kept = torch.randperm(300, generator=g)[:VOCAB]  # student-id order, not sorted
    full = torch.softmax(hidden @ full_head.T, dim=-1)[:, kept]
    restricted = torch.softmax(hidden @ full_head[kept].T, dim=-1)
    torch.testing.assert_close(restricted, full / full.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_zero_ce_weight_without_teacher_reports_ce_and_gives_zero_grads():
    case = make_case(seed=15)
    case.update(teacher_hidden=None, teacher_weight=None)
    out, (gh, gw), ref, _ = run_both(case, ce_weight=0.0, chunk_size_tokens=30)
    torch.testing.assert_close(out.ce, ref[1])
    assert out.loss.item() == 0 and gh.abs().sum() == 0 and gw.abs().sum() == 0
