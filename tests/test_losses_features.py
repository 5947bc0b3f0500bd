"""Feature matching (TinyBERT hidden/attention, MiniLM relations) against plain references, on tiny Llamas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from megadistill.losses.features import (FeatureDistiller, FeatureProjector, attention_kl, collect_features,
                                         feature_layer_pairs, hidden_state_loss, relation_kl, use_eager_attention)
from megadistill.models.teacher import final_hidden_states


def tiny_llama(layers=4, width=32, heads=4, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads)
    return LlamaForCausalLM(cfg).eval()


def test_layer_pair_specs():
    assert feature_layer_pairs("uniform", 2, 4) == [(0, 0), (1, 2), (2, 4)]
    assert feature_layer_pairs("uniform", 4, 18)[-1] == (4, 18)
    assert feature_layer_pairs("last:2", 3, 6) == [(2, 5), (3, 6)]
    assert feature_layer_pairs([[1, 3], [2, 6]], 2, 6) == [(1, 3), (2, 6)]
    for bad in ("last:0", "last:x", "every:2", [[3, 1]], [[1, 7]], []):
        with pytest.raises(ValueError, match="feature layer"):
            feature_layer_pairs(bad, 2, 6)


def test_projector_is_identity_only_for_equal_widths_in_auto_mode():
    assert len(list(FeatureProjector(3, 32, 32).parameters())) == 0
    always = FeatureProjector(2, 32, 32, project="always")
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(always(1, x), x)  # starts as the identity
    wide = FeatureProjector(2, 16, 32)
    assert wide(0, torch.randn(2, 5, 16)).shape == (2, 5, 32)
    assert [tuple(p.shape) for p in wide.parameters()] == [(32, 16), (32, 16)]
    with pytest.raises(ValueError, match="project"):
        FeatureProjector(1, 4, 4, project="never")


def test_hidden_state_loss_matches_reference_and_respects_mask():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 6, 16, generator=g, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 6, 32, generator=g, requires_grad=True) for _ in range(2)]
    proj = FeatureProjector(2, 16, 32)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    loss = hidden_state_loss(s, t, proj, "mse", mask)
    ref = torch.stack([F.mse_loss(proj(i, s[i])[mask], t[i][mask]) for i in range(2)]).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert s[0].grad is not None and proj.maps[0].weight.grad is not None and t[0].grad is None
    # Masked-out positions do not matter.
    s2 = [x.detach().clone() for x in s]
    s2[0][1, 5] += 100.0
    torch.testing.assert_close(hidden_state_loss(s2, t, proj, "mse", mask), loss.detach())
    cos = hidden_state_loss(s, t, proj, "cosine")
    ref_cos = torch.stack([(1 - F.cosine_similarity(proj(i, s[i]), t[i], dim=-1)).mean() for i in range(2)]).mean()
    torch.testing.assert_close(cos, ref_cos)
    same = [torch.randn(2, 6, 32) for _ in range(2)]
    assert float(hidden_state_loss(same, same, FeatureProjector(2, 32, 32))) == 0.0


def causal_probs(b, h, n, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, n, n, generator=g).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1)


def test_attention_kl_matches_reference_without_nan():
    s, t = causal_probs(2, 4, 5, 1).requires_grad_(True), causal_probs(2, 4, 5, 2)
    loss = attention_kl(s, t)
    ref = 0.0
    for b in range(2):
        for h in range(4):
            for i in range(5):
                p, q = t[b, h, i, : i + 1], s.detach()[b, h, i, : i + 1]
                ref += float((p * (p / q).log()).sum())
    assert float(loss.detach()) == pytest.approx(ref / 40, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert float(attention_kl(t, t)) == pytest.approx(0.0, abs=1e-7)
    # Different head counts: one head-averaged map per model.
    mixed = attention_kl(causal_probs(2, 2, 5, 3), t)
    assert float(mixed) == pytest.approx(float(attention_kl(causal_probs(2, 2, 5, 3).mean(1, keepdim=True), t.mean(1, keepdim=True))))


def test_relation_kl_matches_reference():
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(2, 6, 12, generator=g, requires_grad=True)
    xt = torch.randn(2, 6, 20, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    loss = relation_kl(xs, xt, 2, mask, causal=True)
    total, rows = 0.0, 0
    for b in range(2):
        for h in range(2):
            a, c = xs.detach()[b, :, h * 6:(h + 1) * 6], xt[b, :, h * 10:(h + 1) * 10]
            for i in range(6):
                if not mask[b, i]:
                    continue
                keys = [j for j in range(i + 1) if mask[b, j]]
                log_s = (a[i] @ a[keys].T / math.sqrt(6)).log_softmax(-1)
                log_t = (c[i] @ c[keys].T / math.sqrt(10)).log_softmax(-1)
                total += float((log_t.exp() * (log_t - log_s)).sum())
                rows += 1
    assert float(loss.detach()) == pytest.approx(total / rows, rel=1e-5)
    loss.backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not divisible"):
        relation_kl(xs, xt, 5)


def test_collect_features_one_forward_shapes_and_hooks_removed():
    model = tiny_llama()
    use_eager_attention(model)
    ids = torch.randint(0, 64, (2, 7))
    feats = collect_features(model, ids, attentions=True, qkv_layers=[2, 4])
    torch.testing.assert_close(feats["last_hidden"], final_hidden_states(model, ids))
    assert len(feats["hidden_states"]) == 5 and feats["hidden_states"][0].shape == (2, 7, 32)
    assert len(feats["attentions"]) == 4 and feats["attentions"][0].shape == (2, 4, 7, 7)
    assert feats["qkv"][2]["q"].shape == (2, 7, 32) and feats["qkv"][4]["k"].shape == (2, 7, 16)
    for layer in model.model.layers:
        assert all(len(getattr(layer.self_attn, f"{n}_proj")._forward_hooks) == 0 for n in "qkv")
    with pytest.raises(ValueError, match="not a decoder layer"):
        collect_features(model, ids, qkv_layers=[9])
    sdpa = tiny_llama()
    with pytest.raises(ValueError, match="use_eager_attention"):
        collect_features(sdpa, ids, attentions=True)


def test_feature_distiller_trains_student_toward_teacher():
    teacher, student = tiny_llama(4, 32, 4, 2, seed=1), tiny_llama(2, 16, 2, 1, seed=2).train()
    use_eager_attention(teacher)
    use_eager_attention(student)
    pairs = feature_layer_pairs("uniform", 2, 4)
    distiller = FeatureDistiller(pairs, 16, 32, hidden_weight=1.0, attention_weight=1.0, relation_weight=1.0,
                                 num_relation_heads=2)
    assert distiller.qkv_layers_student == [1, 2] and distiller.qkv_layers_teacher == [2, 4]
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_feats = collect_features(teacher, ids, attentions=True, qkv_layers=distiller.qkv_layers_teacher)
    opt = torch.optim.Adam(list(student.parameters()) + list(distiller.parameters()), lr=3e-3)
    losses = []
    for _ in range(20):
        s_feats = collect_features(student, ids, attentions=True, qkv_layers=distiller.qkv_layers_student)
        out = distiller(s_feats, t_feats)
        torch.testing.assert_close(out["loss"].detach(), out["hidden"] + out["attention"] + out["relation"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="relation_heads"):
        FeatureDistiller(pairs, 16, 32, relation_weight=1.0)


# ---- encoders (BERT / RoBERTa / DistilBERT): Q/K/V lookup through the adapter, bidirectional relations ----

def tiny_encoder(family: str, layers: int = 3, width: int = 32, heads: int = 4, seed: int = 0):
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, RobertaConfig,
                              RobertaForMaskedLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * width, max_position_embeddings=40)
    model = {
        "bert": lambda: BertForMaskedLM(BertConfig(**common)),
        "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**common, pad_token_id=1)),
        "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(vocab_size=64, dim=width, n_layers=layers,
                                                                     n_heads=heads, hidden_dim=2 * width,
                                                                     max_position_embeddings=40)),
    }[family]()
    return model.eval()


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_collect_features_on_encoders(family):
    from megadistill.models.adapters import adapter_for

    model = tiny_encoder(family)
    use_eager_attention(model)
    adapter = adapter_for(model)
    ids = torch.randint(3, 64, (2, 9))
    doc_ids = torch.tensor([[0] * 4 + [1] * 5, [0] * 9])
    with torch.no_grad():
        feats = collect_features(model, ids, attentions=True, qkv_layers=[1, 3], document_ids=doc_ids)
        torch.testing.assert_close(feats["last_hidden"], adapter.final_hidden_states(model, ids, document_ids=doc_ids))
        modules = adapter.qkv_modules(model, 2)
        for n in "qkv":  # the captured projection is that module applied to block 3's input
            torch.testing.assert_close(feats["qkv"][3][n], modules[n](feats["hidden_states"][2]))
    assert len(feats["hidden_states"]) == 4 and feats["qkv"][1]["v"].shape == (2, 9, 32)
    probs = feats["attentions"][0]
    assert probs.shape == (2, 4, 9, 9) and float(probs[0, :, :4, 4:].abs().max()) == 0.0
    assert float(probs[0, :, 0, 1:4].min()) > 0  # bidirectional: token 0 attends to later tokens of its document
    assert all(len(m._forward_hooks) == 0 for layer in (0, 2) for m in adapter.qkv_modules(model, layer).values())
    with pytest.raises(ValueError, match="not an encoder layer"):
        collect_features(model, ids, qkv_layers=[4])


def test_relation_kl_stays_inside_documents():
    torch.manual_seed(0)
    xs, xt = torch.randn(1, 8, 12), torch.randn(1, 8, 16)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    packed = relation_kl(xs, xt, 4, document_ids=doc_ids)
    first, second = relation_kl(xs[:, :3], xt[:, :3], 4), relation_kl(xs[:, 3:], xt[:, 3:], 4)
    torch.testing.assert_close(packed, (3 * first + 5 * second) / 8)
    assert not torch.allclose(relation_kl(xs, xt, 4), packed)
    causal = relation_kl(xs, xt, 4, causal=True, document_ids=doc_ids)
    expected = (3 * relation_kl(xs[:, :3], xt[:, :3], 4, causal=True)
                + 5 * relation_kl(xs[:, 3:], xt[:, 3:], 4, causal=True)) / 8
    torch.testing.assert_close(causal, expected)


def test_feature_distiller_trains_an_encoder_student_on_packed_windows():
    from megadistill.models.adapters import adapter_for

    teacher, student = tiny_encoder("bert", 4, 32, 4, seed=1), tiny_encoder("distilbert", 2, 16, 2, seed=2).train()
    for model in (teacher, student):
        use_eager_attention(model)
    assert not adapter_for(student).causal
    distiller = FeatureDistiller(feature_layer_pairs("uniform", 2, 4), 16, 32, attention_weight=1.0,
                                 relation_weight=1.0, num_relation_heads=2, causal=adapter_for(student).causal)
    ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.tensor([[0] * 6 + [1] * 4, [0] * 3 + [1] * 7])
    with torch.no_grad():
        t_feats = collect_features(teacher, ids, attentions=True, qkv_layers=distiller.qkv_layers_teacher,
                                   document_ids=doc_ids)
    opt = torch.optim.Adam(list(student.parameters()) + list(distiller.parameters()), lr=3e-3)
    losses = []
    for _ in range(15):
        s_feats = collect_features(student, ids, attentions=True, qkv_layers=distiller.qkv_layers_student,
                                   document_ids=doc_ids)
        out = distiller(s_feats, t_feats)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]


def test_masked_mean_selects_so_excluded_nan_does_not_leak():
    """An excluded position holding NaN/inf leaves the hidden-state loss finite (multiplying by 0 would give NaN)."""
    from megadistill.losses.features import _masked_mean

    values = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]]).unsqueeze(-1).expand(2, 2, 4)
    mask = torch.tensor([[True, False], [True, False]])
    assert _masked_mean(values, mask).item() == 2.0
