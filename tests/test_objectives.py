"""LMObjective against plain full-logits references: causal LM, and masked LM with KD at masked or all positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, XLMRobertaConfig, XLMRobertaForMaskedLM

from megadistill.config import LossConfig
from megadistill.data.batches import MlmBatches, mask_generator
from megadistill.data.masking import MaskingConfig, MlmCollator
from megadistill.objectives.lm import LMObjective, lm_metrics
from megadistill.objectives.spec import KDSpec, LossNormalizer
from megadistill.teachers import NoTeacher, TeacherSignal

V, H, B, L = 50, 32, 2, 12
TAU = 2.0


def tiny_encoder(seed: int) -> XLMRobertaForMaskedLM:
    torch.manual_seed(seed)
    cfg = XLMRobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                           architectures=["XLMRobertaForMaskedLM"])
    return XLMRobertaForMaskedLM(cfg).eval()


def mlm_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, V, (B, L), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4, 7]] = ids[0, [1, 4, 7]]
    labels[1, [2]] = ids[1, [2]]
    masked = ids.masked_fill(labels != -100, 4)
    return {"input_ids": masked, "teacher_input_ids": masked, "labels": labels, "mlm_mask": labels != -100,
            "dropped_tokens": torch.tensor(0)}


def kl_rows(t_logits, s_logits, tau):
    p = F.log_softmax(t_logits / tau, -1)
    return tau**2 * (p.exp() * (p - F.log_softmax(s_logits / tau, -1))).sum(-1)


@pytest.mark.parametrize("kd_positions", ["masked", "all"])
def test_mlm_kd_equals_full_logits_reference(kd_positions):
    student, teacher = tiny_encoder(0), tiny_encoder(1)
    loss_cfg = LossConfig(ce_weight=2.0, kd_weight=5.0, temperature=TAU, chunk_size_tokens=3, kd_positions=kd_positions)
    head, bias = teacher.lm_head.decoder.weight.detach(), teacher.lm_head.bias.detach()
    objective = LMObjective(student, KDSpec.from_config(loss_cfg, V), loss_cfg, 10, masked=True, teacher_head=head,
                            teacher_bias=bias)
    batch = mlm_batch()
    with torch.no_grad():
        t_hidden = objective.adapter.final_hidden_states(teacher, batch["teacher_input_ids"])
        t_logits = teacher(batch["teacher_input_ids"]).logits
    out = objective(batch, TeacherSignal(hidden=t_hidden), step=0)
    s_logits = student(batch["input_ids"]).logits
    sel = batch["labels"] != -100
    ce = F.cross_entropy(s_logits[sel], batch["labels"][sel])
    kd_sel = sel if kd_positions == "masked" else torch.ones_like(sel)
    kd = kl_rows(t_logits[kd_sel], s_logits[kd_sel], TAU).mean()
    torch.testing.assert_close(out["loss"], 2.0 * ce + 5.0 * kd, rtol=1e-5, atol=1e-5)
    metrics = lm_metrics({k: float(v) for k, v in out["stats"].items()})
    assert metrics["tokens"] == int(sel.sum())
    assert objective.counts(batch) == {"ce_tokens": 4, "kd_tokens": 4 if kd_positions == "masked" else B * L}
    # Gradients equal the reference's too (the chunked loss computes them in forward).
    out["loss"].backward()
    got = student.lm_head.dense.weight.grad.clone()
    student.zero_grad()
    (2.0 * ce + 5.0 * kd).backward()
    torch.testing.assert_close(got, student.lm_head.dense.weight.grad, rtol=1e-4, atol=1e-6)


def test_mlm_position_whose_label_trimming_dropped_keeps_kd_and_its_cache_row():
    """A selected position whose label the vocab map dropped gets KD but no CE, so rows stay aligned with a cache."""
    student, teacher = tiny_encoder(0), tiny_encoder(1)
    loss_cfg = LossConfig(ce_weight=1.0, kd_weight=1.0, temperature=1.0, chunk_size_tokens=4)
    objective = LMObjective(student, KDSpec.from_config(loss_cfg, V), loss_cfg, 10, masked=True,
                            teacher_head=teacher.lm_head.decoder.weight.detach(), teacher_bias=teacher.lm_head.bias.detach())
    batch = mlm_batch()
    batch["labels"][0, 4] = -100  # dropped by trimming: still selected in mlm_mask
    with torch.no_grad():
        t_hidden = objective.adapter.final_hidden_states(teacher, batch["teacher_input_ids"])
    out = objective(batch, TeacherSignal(hidden=t_hidden), 0)
    assert float(out["stats"]["ce_tokens"]) == 3 and float(out["stats"]["kd_tokens"]) == 4
    assert objective.counts(batch) == {"ce_tokens": 3, "kd_tokens": 4}


def test_causal_lm_with_normalizer_is_a_share_of_the_global_token_mean():
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1))
    loss_cfg = LossConfig(ce_weight=1.0, kd_weight=0.0, chunk_size_tokens=5)
    objective = LMObjective(student, KDSpec.from_config(loss_cfg, V), loss_cfg, 10)
    ids = torch.randint(0, V, (1, L + 1), generator=torch.Generator().manual_seed(1))
    labels = ids[:, 1:].clone()
    labels[:, 3:] = -100  # 3 valid tokens
    batch = {"input_ids": ids[:, :-1], "labels": labels, "dropped_tokens": torch.tensor(0)}
    out = objective(batch, NoTeacher().signal(batch), 0, LossNormalizer(ce_tokens=10.0, kd_tokens=10.0))
    logits = student(batch["input_ids"]).logits[0, :3]
    ref = F.cross_entropy(logits, labels[0, :3], reduction="sum") / 10.0
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    assert float(out["stats"]["kd_sum"]) == 0.0


class _Packed:
    """Two fixed windows of L + 1 ids (stands in for PackedDataset)."""

    seq_len_tokens = L

    def __init__(self):
        g = np.random.default_rng(0)
        self.rows = [g.integers(5, V, L + 1) for _ in range(4)]

    def window_id(self, i):
        return i % 4

    def item(self, i):
        return self.rows[i % 4], np.zeros(L + 1, dtype=np.int64)


def test_mlm_masks_are_reproducible_dynamic_and_static():
    special = torch.zeros(V, dtype=torch.bool)
    special[:5] = True
    collator = MlmCollator(mask_id=4, vocab_size=V, special=special, config=MaskingConfig(mask_prob=0.3))
    data = _Packed()
    dynamic, static = MlmBatches(data, collator, seed=7), MlmBatches(data, collator, seed=7, static_mask=True)
    a, b = dynamic([0, 1]), dynamic([0, 1])
    assert torch.equal(a["labels"], b["labels"]), "same samples, same seed: same mask (resume needs no RNG state)"
    later = dynamic([4, 5])  # the same windows one epoch later
    assert not torch.equal(later["labels"], a["labels"]), "dynamic masking: a new mask each epoch"
    assert torch.equal(static([4, 5])["labels"], static([0, 1])["labels"]), "static masking: the mask follows the window"
    assert a["input_ids"].shape == (2, L) and int((a["labels"] != -100).sum()) == 2 * round(0.3 * L)
    assert mask_generator(7, 1).initial_seed() != mask_generator(7, 2).initial_seed()
