"""Global-batch token means through LossNormalizer, and the named sums and counts of DistillLossOutput.

Every loss is a mean over the valid tokens of the whole global batch: each micro-batch divides
its sums by the global count per micro-batch, and DeepSpeed's backward averages micro-batches
(and ranks), so micro-batches with 12 and 2 valid tokens weigh 12:2, not 1:1.
"""

from __future__ import annotations

import pytest
import torch

from megadistill.losses.logits import DistillLossOutput, chunked_distill_loss, topk_targets
from megadistill.objectives.spec import KDSpec, LossNormalizer

L, HS, HT, V = 16, 10, 14, 29


def micro_batch(seed: int, valid: int):
    """``L`` tokens of which ``valid`` have a label (and get KD)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((L,), -100)
    labels[torch.randperm(L, generator=g)[:valid]] = torch.randint(0, V, (valid,), generator=g)
    return dict(student_hidden=torch.randn(L, HS, generator=g), labels=labels, teacher_hidden=torch.randn(L, HT, generator=g))


def heads(seed=9):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(V, HS, generator=g), 0.5 * torch.randn(V, HT, generator=g)


SPEC = KDSpec(vocab_size=V, ce_weight=0.6, kd_weight=0.4, temperature=2.0, chunk_size_tokens=5)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("sparse", [False, True])
def test_two_micro_batches_with_a_normalizer_give_the_global_token_mean(as_tensor, sparse):
    parts = [micro_batch(0, 12), micro_batch(1, 2)]
    w_s, w_t = heads()
    per_micro = 14 / 2  # global count / (world * accum), world = 1, accum = 2
    div = torch.tensor(per_micro) if as_tensor else per_micro
    norm = LossNormalizer(ce_tokens=div, kd_tokens=div)

    def call(part, h, w, normalizer):
        teacher = dict(teacher_hidden=part["teacher_hidden"], teacher_weight=w_t)
        if sparse:
            teacher = dict(sparse_targets=topk_targets(part["teacher_hidden"] @ w_t.T, 6, temperature=SPEC.temperature))
        return chunked_distill_loss(h, w, part["labels"], SPEC, normalizer=normalizer, **teacher)

    w = w_s.clone().requires_grad_(True)
    hs = [p["student_hidden"].clone().requires_grad_(True) for p in parts]
    outs = [call(p, h, w, norm) for p, h in zip(parts, hs)]
    # engine.backward scales each micro-batch's loss by 1 / accum: emulate it.
    total = sum(o.loss for o in outs) / 2
    total.backward()

    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    w_ref = w_s.clone().requires_grad_(True)
    h_ref = whole["student_hidden"].clone().requires_grad_(True)
    ref = call(whole, h_ref, w_ref, None)  # one call: its local counts are the global 14 tokens
    ref.loss.backward()
    assert int(ref.ce_tokens) == 14 and int(ref.kd_tokens) == 14
    torch.testing.assert_close(total, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([h.grad for h in hs]), h_ref.grad, rtol=1e-5, atol=1e-7)
    # The sums and counts add up across micro-batches to the single call's.
    torch.testing.assert_close(sum(o.ce_sum for o in outs), ref.ce_sum)
    torch.testing.assert_close(sum(o.kd_sum for o in outs), ref.kd_sum)
    assert sum(int(o.ce_tokens) for o in outs) == 14
    # Without the normalizer each micro-batch is its own mean: a mean of means, weighting 12:2 as 1:1.
    plain = [call(p, p["student_hidden"], w_s, None) for p in parts]
    assert abs(float(sum(o.loss for o in plain) / 2 - ref.loss.detach())) > 1e-2


def test_normalizer_scales_each_term_separately():
    part = micro_batch(2, 10)
    w_s, w_t = heads()
    out = chunked_distill_loss(part["student_hidden"], w_s, part["labels"], SPEC, teacher_hidden=part["teacher_hidden"],
                               teacher_weight=w_t, normalizer=LossNormalizer(ce_tokens=4.0, kd_tokens=25.0))
    want = SPEC.ce_weight * out.ce_sum / 4.0 + SPEC.kd_weight * out.kd_sum / 25.0
    torch.testing.assert_close(out.loss, want)


def test_zero_divisor_gives_a_zero_term_and_bad_divisors_raise():
    part = micro_batch(3, 8)
    w_s, _ = heads()
    h = part["student_hidden"].clone().requires_grad_(True)
    # No teacher anywhere: the global KD count is 0; the KD term must be 0, not 0 / 0.
    out = chunked_distill_loss(h, w_s, part["labels"], SPEC, normalizer=LossNormalizer(ce_tokens=8.0, kd_tokens=0.0))
    out.loss.backward()
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(h.grad).all())
    torch.testing.assert_close(out.loss, SPEC.ce_weight * out.ce_sum / 8.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="LossNormalizer.kd_tokens must be a finite count >= 0"):
            chunked_distill_loss(h, w_s, part["labels"], SPEC, normalizer=LossNormalizer(ce_tokens=8.0, kd_tokens=bad))


def test_output_holds_sums_and_int64_counts_with_mean_properties():
    part = micro_batch(4, 11)
    w_s, w_t = heads()
    kd_mask = part["labels"] != -100
    kd_mask[:3] = True
    out = chunked_distill_loss(part["student_hidden"], w_s, part["labels"], SPEC, teacher_hidden=part["teacher_hidden"],
                               teacher_weight=w_t, kd_mask=kd_mask)
    assert isinstance(out, DistillLossOutput)
    for count, want in ((out.ce_tokens, 11), (out.kd_tokens, int(kd_mask.sum()))):
        assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.dim() == 0
        assert int(count) == want
    for total in (out.ce_sum, out.kd_sum, out.loss):
        assert total.dtype == torch.float32 and total.dim() == 0
    assert not out.ce_sum.requires_grad and not out.kd_sum.requires_grad
    torch.testing.assert_close(out.ce, out.ce_sum / 11)
    torch.testing.assert_close(out.kd, out.kd_sum / int(kd_mask.sum()))
    torch.testing.assert_close(out.loss, SPEC.ce_weight * out.ce + SPEC.kd_weight * out.kd)
    empty = chunked_distill_loss(part["student_hidden"], w_s, torch.full((L,), -100), SPEC)
    assert int(empty.ce_tokens) == 0 and float(empty.ce) == 0.0 and float(empty.kd) == 0.0
