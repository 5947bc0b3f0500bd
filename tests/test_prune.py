"""Tests for megadistill.models.prune: depth and width pruning of tiny Gemma 3, Llama, Qwen2 and BERT models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from megadistill.models.prune import WidthPlan, drop_layers, prune_width

VOCAB = 97
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def tiny_gemma3() -> Gemma3ForCausalLM:
    """4 query heads sharing 1 KV head (head_dim 8 != hidden / heads), tied embeddings, q/k norms."""
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=20, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, sliding_window=4, layer_types=LAYER_TYPES, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return _randomized(Gemma3ForCausalLM(config))


def tiny_llama() -> LlamaForCausalLM:
    """Multi-head attention (4 query and 4 KV heads), untied head."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return _randomized(LlamaForCausalLM(config))


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Grouped-query attention (4 query heads, 2 KV heads), q/k/v biases, tied embeddings."""
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return _randomized(Qwen2ForCausalLM(config))


def tiny_bert() -> BertForMaskedLM:
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=32)
    return _randomized(BertForMaskedLM(config))


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=12, max_position_embeddings=32, bos_token_id=0, pad_token_id=1,
                           eos_token_id=2)
    return _randomized(RobertaForMaskedLM(config))


def tiny_distilbert() -> DistilBertForMaskedLM:
    config = DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=12,
                              max_position_embeddings=32)
    return _randomized(DistilBertForMaskedLM(config))


DECODERS = [tiny_gemma3, tiny_llama, tiny_qwen2]


def _randomized(model):
    """Random weights everywhere (norms and biases included) so that no slice equals another by accident."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval().requires_grad_(False)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(_ids() if ids is None else ids).logits


def _assert_reloads(model, tmp_path, auto=AutoModelForCausalLM):
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path)
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in reloaded.config.to_dict().items() if k != "_name_or_path"} == config
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
    return reloaded


def _assert_untouched(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def _assert_no_shared_storage(a, b):
    ptrs = {p.data_ptr() for p in a.parameters()}
    assert not any(p.data_ptr() in ptrs for p in b.parameters())


def _rows(heads, head_dim):
    return [h * head_dim + d for h in heads for d in range(head_dim)]


# ---- depth ----

def test_drop_nothing_is_an_identical_copy():
    model = tiny_gemma3()
    copy = drop_layers(model, [])
    assert copy is not model and copy.config.layer_types == LAYER_TYPES
    assert copy.state_dict().keys() == model.state_dict().keys()
    for key, value in copy.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    torch.testing.assert_close(_logits(copy), _logits(model), rtol=0, atol=0)
    _assert_no_shared_storage(model, copy)


def test_drop_layers_keeps_the_others_and_reloads(tmp_path):
    model = tiny_gemma3()
    before = _snapshot(model)
    reduced = drop_layers(model, [3, 1])
    assert reduced.config.num_hidden_layers == len(reduced.model.layers) == 2
    assert reduced.config.layer_types == [LAYER_TYPES[0], LAYER_TYPES[2]]
    for j, i in enumerate([0, 2]):
        original = dict(model.model.layers[i].named_parameters())
        for name, p in reduced.model.layers[j].named_parameters():
            assert torch.equal(p, original[name]), (j, name)
    _assert_untouched(model, before)
    _assert_reloads(reduced, tmp_path)


def test_drop_layers_errors():
    model = tiny_llama()
    for drop, message in [([3], r"outside \[0, 3\)"), ([-1], "outside"), ([1, 1], "more than once"),
                          ([0, 1, 2], "all 3 layers"), ([0.5], "must be ints")]:
        with pytest.raises(ValueError, match=message):
            drop_layers(model, drop)


# ---- attention heads ----

# Per layer, heads to keep (given unsorted: they are sorted inside). Qwen2 keeps one head of each KV group.
HEAD_PLANS = {
    "Gemma3ForCausalLM": [[3, 0], [1, 2], [0, 1], [2, 3]],
    "LlamaForCausalLM": [[1, 3], [0, 2], [2, 3]],
    "Qwen2ForCausalLM": [[3, 1], [0, 2], [1, 2]],
}


@pytest.mark.parametrize("build", DECODERS)
def test_head_pruning_keeps_exactly_the_selected_rows_and_columns(build, tmp_path):
    model = build()
    before = _snapshot(model)
    plan = HEAD_PLANS[type(model).__name__]
    heads, kv_heads, head_dim = 4, model.config.num_key_value_heads, model.model.layers[0].self_attn.head_dim
    pruned = prune_width(model, WidthPlan(heads=plan))

    mha = kv_heads == heads
    assert pruned.config.num_attention_heads == 2
    assert pruned.config.num_key_value_heads == (2 if mha else kv_heads)
    assert pruned.config.head_dim == head_dim and pruned.config.hidden_size == model.config.hidden_size
    original, new = model.state_dict(), pruned.state_dict()
    for layer, kept in enumerate(plan):
        q = _rows(sorted(kept), head_dim)
        kv = q if mha else list(range(kv_heads * head_dim))
        p = f"model.layers.{layer}.self_attn."
        assert torch.equal(new[p + "q_proj.weight"], original[p + "q_proj.weight"][q])
        assert torch.equal(new[p + "o_proj.weight"], original[p + "o_proj.weight"][:, q])
        for name in ("k_proj", "v_proj"):
            assert torch.equal(new[p + name + ".weight"], original[p + name + ".weight"][kv])
        if type(model) is Qwen2ForCausalLM:
            assert torch.equal(new[p + "q_proj.bias"], original[p + "q_proj.bias"][q])
            assert torch.equal(new[p + "k_proj.bias"], original[p + "k_proj.bias"][kv])
    pruned_keys = {"q_proj.weight", "q_proj.bias", "o_proj.weight"} | (
        {"k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"} if mha else set())
    unchanged = [k for k in new if k.rsplit("self_attn.", 1)[-1] not in pruned_keys]
    assert len(unchanged) > len(new) // 2
    for key in unchanged:
        assert torch.equal(new[key], original[key]), key

    _assert_untouched(model, before)
    _assert_no_shared_storage(model, pruned)
    assert pruned.training and all(p.requires_grad for p in pruned.parameters())
    assert _logits(pruned).shape == (2, 7, VOCAB)
    _assert_reloads(pruned, tmp_path)


@pytest.mark.parametrize("build", DECODERS)
def test_pruning_heads_that_contribute_nothing_keeps_the_logits(build):
    """Zeroing a head's o_proj columns removes its contribution: pruning exactly that head changes nothing."""
    model = build()
    plan = HEAD_PLANS[type(model).__name__]
    head_dim = model.model.layers[0].self_attn.head_dim
    with torch.no_grad():
        for layer, kept in enumerate(plan):
            dropped = [h for h in range(4) if h not in kept]
            model.model.layers[layer].self_attn.o_proj.weight[:, _rows(dropped, head_dim)] = 0
    pruned = prune_width(model, WidthPlan(heads=plan))
    torch.testing.assert_close(_logits(pruned), _logits(model), rtol=1e-5, atol=1e-5)
    # Control: removing other heads than the zeroed ones does change the logits.
    others = [[h for h in range(4) if h not in kept] for kept in plan]
    if type(model) is not Qwen2ForCausalLM:  # Qwen2's complement keeps one head per group too
        assert not torch.allclose(_logits(prune_width(model, WidthPlan(heads=others))), _logits(model), atol=1e-3)


# ---- MLP channels ----

MLP_KEEP = [[0, 3, 4, 9, 11, 12, 15, 19], [1, 2, 5, 6, 7, 13, 16, 18], [19, 18, 17, 10, 8, 3, 2, 0]]


@pytest.mark.parametrize("build", DECODERS)
def test_pruning_mlp_channels_that_contribute_nothing_keeps_the_logits(build, tmp_path):
    model = build()
    plan = MLP_KEEP + [MLP_KEEP[0]] * (model.config.num_hidden_layers - len(MLP_KEEP))
    with torch.no_grad():
        for layer, kept in enumerate(plan):
            mlp, dropped = model.model.layers[layer].mlp, [c for c in range(20) if c not in kept]
            mlp.down_proj.weight[:, dropped] = 0
            mlp.gate_proj.weight[dropped] = 0
            mlp.up_proj.weight[dropped] = 0
    original = model.state_dict()
    pruned = prune_width(model, WidthPlan(mlp=plan))
    assert pruned.config.intermediate_size == 8
    new = pruned.state_dict()
    for layer, kept in enumerate(plan):
        p, rows = f"model.layers.{layer}.mlp.", sorted(kept)
        assert torch.equal(new[p + "gate_proj.weight"], original[p + "gate_proj.weight"][rows])
        assert torch.equal(new[p + "up_proj.weight"], original[p + "up_proj.weight"][rows])
        assert torch.equal(new[p + "down_proj.weight"], original[p + "down_proj.weight"][:, rows])
    for key in new:
        if ".mlp." not in key:
            assert torch.equal(new[key], original[key]), key
    torch.testing.assert_close(_logits(pruned), _logits(model), rtol=1e-5, atol=1e-5)
    _assert_reloads(pruned, tmp_path)


# ---- hidden channels ----

HIDDEN_KEEP = [30, 1, 2, 5, 7, 8, 11, 12, 13, 17, 19, 20, 23, 25, 26, 29]


@pytest.mark.parametrize("build", DECODERS)
def test_hidden_pruning_slices_every_residual_tensor(build, tmp_path):
    model = build()
    size = model.config.hidden_size
    keep = sorted(h for h in HIDDEN_KEEP if h < size)
    head_dim = model.model.layers[0].self_attn.head_dim
    pruned = prune_width(model, WidthPlan(hidden=keep))
    assert pruned.config.hidden_size == len(keep) and pruned.config.head_dim == head_dim
    assert pruned.config.num_attention_heads == 4 and pruned.config.intermediate_size == 20
    original, new = model.state_dict(), pruned.state_dict()
    assert torch.equal(new["model.embed_tokens.weight"], original["model.embed_tokens.weight"][:, keep])
    assert torch.equal(new["lm_head.weight"], original["lm_head.weight"][:, keep])
    assert torch.equal(new["model.norm.weight"], original["model.norm.weight"][keep])
    tied = model.config.tie_word_embeddings
    assert (pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()) == tied
    for key, tensor in new.items():
        if not key.startswith("model.layers."):
            continue
        name, ref = key.split(".", 3)[-1], original[key]
        if name.endswith("layernorm.weight"):
            expected = ref[keep]
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            expected = ref[:, keep]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            expected = ref[keep]
        else:  # q/k norms over head_dim, q/k/v biases over head rows
            expected = ref
        assert torch.equal(tensor, expected), key
    assert pruned.model.layers[0].self_attn.q_proj.weight.shape == (4 * head_dim, len(keep))
    reloaded = _assert_reloads(pruned, tmp_path)
    assert (reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()) == tied


def test_all_widths_at_once_reload(tmp_path):
    model = tiny_qwen2()
    plan = WidthPlan(heads=HEAD_PLANS["Qwen2ForCausalLM"], mlp=MLP_KEEP, hidden=HIDDEN_KEEP)
    pruned = prune_width(model, plan)
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size, config.hidden_size) \
        == (2, 2, 8, 16)
    q = _rows([1, 3], 8)
    assert torch.equal(pruned.model.layers[0].self_attn.q_proj.weight,
                       model.model.layers[0].self_attn.q_proj.weight[q][:, sorted(HIDDEN_KEEP)])
    assert torch.equal(pruned.model.layers[0].mlp.down_proj.weight,
                       model.model.layers[0].mlp.down_proj.weight[sorted(HIDDEN_KEEP)][:, MLP_KEEP[0]])
    _assert_reloads(pruned, tmp_path)


# ---- encoders ----

@pytest.mark.parametrize("build", [tiny_bert, tiny_roberta, tiny_distilbert])
def test_encoder_mlp_pruning(build, tmp_path):
    from megadistill.models.adapters import adapter_for

    model = build()
    adapter = adapter_for(model)
    bert = type(model) is not DistilBertForMaskedLM
    keep = [[0, 2, 5, 6, 8, 11], [11, 10, 4, 3, 1, 0]]
    layers = adapter.layers(model)
    with torch.no_grad():
        for layer, kept in zip(layers, keep):
            dropped = [c for c in range(12) if c not in kept]
            (layer.output.dense if bert else layer.ffn.lin2).weight[:, dropped] = 0
    original = model.state_dict()
    pruned = prune_width(model, WidthPlan(mlp=keep))
    assert (pruned.config.intermediate_size if bert else pruned.config.hidden_dim) == 6
    new = pruned.state_dict()
    prefix = adapter.layers_prefix
    up, down = ("intermediate.dense", "output.dense") if bert else ("ffn.lin1", "ffn.lin2")
    for i, kept in enumerate(keep):
        p, rows = f"{prefix}{i}.", sorted(kept)
        assert torch.equal(new[p + up + ".weight"], original[p + up + ".weight"][rows])
        assert torch.equal(new[p + up + ".bias"], original[p + up + ".bias"][rows])
        assert torch.equal(new[p + down + ".weight"], original[p + down + ".weight"][:, rows])
    changed = {f"{prefix}{i}.{name}" for i in range(2) for name in (up + ".weight", up + ".bias", down + ".weight")}
    for key in set(new) - changed:
        assert torch.equal(new[key], original[key]), key
    torch.testing.assert_close(_logits(pruned), _logits(model), rtol=1e-5, atol=1e-5)
    _assert_reloads(pruned, tmp_path, AutoModelForMaskedLM)


def test_encoder_heads_and_hidden_are_refused():
    model = tiny_bert()
    for plan in (WidthPlan(heads=[[0], [1]]), WidthPlan(hidden=list(range(8)))):
        with pytest.raises(ValueError, match=r"hidden_size / num_attention_heads.*drop_layers.*MLP"):
            prune_width(model, plan)


# ---- errors ----

def test_width_errors():
    llama, qwen2 = tiny_llama(), tiny_qwen2()
    cases = [
        (llama, WidthPlan(mlp=[[0, 1], [0, 1], [0]]), "keeps 2 in layer 0 but 1 in layer 2.*intermediate_size"),
        (llama, WidthPlan(heads=[[0, 1], [1, 2, 3], [0, 1]]), "2 in layer 0 but 3 in layer 1.*num_attention_heads"),
        (llama, WidthPlan(heads=[[0, 1], [0, 1]]), "2 lists but the model has 3 layers"),
        (llama, WidthPlan(mlp=[[0, 20], [0, 1], [0, 1]]), r"layer 0: indices \[0, 20\] are outside \[0, 20\)"),
        (llama, WidthPlan(hidden=[-1, 3]), "outside"),
        (llama, WidthPlan(hidden=[3, 3]), "more than once"),
        (llama, WidthPlan(mlp=[[], [], []]), "at least one"),
        (qwen2, WidthPlan(heads=[[0, 1], [0, 2], [1, 3]]),
         "layer 0 keeps 0 query heads in KV group 1 but 2 in group 0"),
    ]
    for model, plan, message in cases:
        with pytest.raises(ValueError, match=message):
            prune_width(model, plan)


def test_unsupported_layout_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="cannot prune GPT2LMHeadModel.*supported are.*Llama"):
        prune_width(gpt2, WidthPlan(mlp=[[0]]))
