"""Family adapters: head input reproduces the logits, packed encoder windows keep documents apart, layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

from megadistill.models.adapters import ENCODERS, adapter_for

VOCAB = 90
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64)


def tiny_encoder(family: str, attn: str = "sdpa", seed: int = 0):
    """A 3-layer masked LM of ``family`` with random weights everywhere (LayerNorms and biases too)."""
    builders = {
        "bert": lambda: BertForMaskedLM(BertConfig(**COMMON, hidden_act="gelu_new")),
        "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**COMMON, pad_token_id=1, bos_token_id=0, eos_token_id=2)),
        "xlmr": lambda: XLMRobertaForMaskedLM(XLMRobertaConfig(**COMMON, pad_token_id=1, bos_token_id=0,
                                                               eos_token_id=2)),
        "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=3, n_heads=2, hidden_dim=64, max_position_embeddings=64)),
    }
    torch.manual_seed(seed)
    model = builders[family]()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.set_attn_implementation(attn)
    return model.eval()


FAMILIES = ["bert", "roberta", "xlmr", "distilbert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_head_input_and_output_projection_reproduce_the_logits(family):
    model = tiny_encoder(family)
    adapter = adapter_for(model)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = adapter.final_hidden_states(model, ids)
    weight, bias = adapter.output_weight(model), adapter.output_bias(model)
    assert adapter.family == "encoder" and not adapter.causal
    assert hidden.shape == (2, 11, 32) and weight.shape == (VOCAB, 32) and bias.shape == (VOCAB,)
    assert torch.equal(F.linear(hidden, weight, bias), logits)  # the same op the head runs: bit-exact
    torch.testing.assert_close(hidden @ weight.T + bias, logits)  # what the chunked loss computes
    assert not torch.allclose(hidden, model.base_model(input_ids=ids).last_hidden_state)  # the transform matters
    assert [id(p) for p in adapter.head_parameters(model)] == [id(weight), id(bias)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_encoder_window_keeps_documents_apart(family, attn):
    """Each document of a packed window gets the output it gets alone; editing one document moves no other."""
    model = tiny_encoder(family, attn)
    adapter = adapter_for(model)
    lengths = [4, 7, 1, 5]
    tokens = torch.randint(3, VOCAB, (1, sum(lengths)))  # no pad id (RoBERTa numbers positions around it)
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    with torch.no_grad():
        packed = adapter.final_hidden_states(model, tokens, document_ids=doc_ids)[0]
        edited = tokens.clone()
        edited[0, 4:11] = torch.randint(3, VOCAB, (7,))
        after_edit = adapter.final_hidden_states(model, edited, document_ids=doc_ids)[0]
        leaky = adapter.final_hidden_states(model, tokens)[0]
        start = 0
        for n in lengths:
            alone = adapter.final_hidden_states(model, tokens[:, start:start + n])[0]
            torch.testing.assert_close(packed[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    outside = torch.ones(sum(lengths), dtype=torch.bool)
    outside[4:11] = False
    assert torch.equal(after_edit[outside], packed[outside])
    assert not torch.allclose(after_edit[4:11], packed[4:11])
    assert not torch.allclose(leaky[:4], packed[:4], atol=1e-3)  # without the mask, documents see each other


def test_document_mask_combines_with_padding_and_batches():
    model = tiny_encoder("xlmr")
    adapter = adapter_for(model)
    tokens = torch.randint(3, VOCAB, (2, 9))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1, 2, 2]])
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[0, 7:] = 0
    with torch.no_grad():
        out = adapter.final_hidden_states(model, tokens, document_ids=doc_ids, attention_mask=padding)
        alone = adapter.final_hidden_states(model, tokens[:1, 3:7])
        row1 = adapter.final_hidden_states(model, tokens[1:, 5:7])
    torch.testing.assert_close(out[0, 3:7], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, 5:7], row1[0], rtol=1e-5, atol=1e-5)


def test_body_outputs_hidden_states_and_attentions():
    for family in FAMILIES:
        model = tiny_encoder(family, "eager")
        adapter = adapter_for(model)
        doc_ids = torch.tensor([[0, 0, 0, 1, 1]])
        with torch.no_grad():
            out = adapter.body_outputs(model, torch.randint(3, VOCAB, (1, 5)), document_ids=doc_ids,
                                       output_hidden_states=True, output_attentions=True)
        assert len(out.hidden_states) == getattr(model.config, adapter.depth_field) + 1 == 4
        probs = out.attentions[0]
        assert probs.shape == (1, 2, 5, 5) and float(probs[0, :, :3, 3:].abs().max()) == 0.0


def test_packed_encoder_refuses_attention_without_4d_masks():
    model = tiny_encoder("bert")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        adapter_for(model).final_hidden_states(model, torch.ones(1, 4, dtype=torch.long),
                                               document_ids=torch.tensor([[0, 0, 1, 1]]))


@pytest.mark.parametrize("family, prefix, depth_field, qkv", [
    ("bert", "bert.encoder.layer.", "num_hidden_layers", "query"),
    ("roberta", "roberta.encoder.layer.", "num_hidden_layers", "query"),
    ("xlmr", "roberta.encoder.layer.", "num_hidden_layers", "query"),
    ("distilbert", "distilbert.transformer.layer.", "n_layers", "q_lin"),
])
def test_encoder_layouts(family, prefix, depth_field, qkv):
    model = tiny_encoder(family)
    adapter = adapter_for(model)
    assert (adapter.layers_prefix, adapter.depth_field) == (prefix, depth_field)
    blocks = adapter.layers(model)
    assert len(blocks) == getattr(model.config, depth_field) == 3
    state = model.state_dict()
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            assert state[f"{prefix}{i}.{name}"].data_ptr() == p.data_ptr()
    modules = adapter.qkv_modules(model, 2)
    assert set(modules) == {"q", "k", "v"} and isinstance(modules["q"], torch.nn.Linear)
    assert dict(model.named_modules())[f"{prefix}2.{'attention.self.' if qkv == 'query' else 'attention.'}{qkv}"] \
        is modules["q"]
    with pytest.raises(ValueError, match="not an encoder layer"):
        adapter.qkv_modules(model, 3)
    vocab_names = {n for n, p in model.named_parameters(remove_duplicate=False)
                   if any(p is v for v in adapter.vocab_parameters(model))}
    assert all(model.state_dict()[n].shape[0] == VOCAB for n in vocab_names)
    assert len(vocab_names) == (3 if family == "distilbert" else 4)  # embedding, decoder weight + bias, head bias


def test_untied_head_bias_is_a_vocab_parameter():
    model = BertForMaskedLM(BertConfig(**COMMON, tie_word_embeddings=False))
    params = adapter_for(model).vocab_parameters(model)
    assert model.cls.predictions.bias is not model.cls.predictions.decoder.bias
    assert any(p is model.cls.predictions.bias for p in params) and len(params) == 4


def test_adapter_for_configs_and_refusals():
    assert adapter_for(BertConfig(architectures=["BertForMaskedLM"])).family == "encoder"
    assert adapter_for(XLMRobertaConfig()).base == "roberta"  # no architectures: model_type decides
    assert adapter_for(DistilBertConfig()).depth_field == "n_layers"
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    assert adapter_for(llama).family == "decoder" and adapter_for(llama).output_bias(llama) is None
    classifier = BertForSequenceClassification(BertConfig(**COMMON))
    for unsupported in (classifier, BertConfig(architectures=["BertForTokenClassification"])):
        with pytest.raises(ValueError, match="not supported.*ForCausalLM.*BertForMaskedLM.*DistilBertForMaskedLM"):
            adapter_for(unsupported)
    assert set(ENCODERS) == {"BertForMaskedLM", "RobertaForMaskedLM", "XLMRobertaForMaskedLM", "DistilBertForMaskedLM"}
