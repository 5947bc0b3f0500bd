"""Bits per character equals a hand computation of the same log-likelihood."""

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megadistill.evaluate import text_nll


def tiny_llama(vocab):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def test_bits_per_char_matches_manual(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    texts = ["नमस्ते दुनिया", "a longer sentence, with punctuation.", "यह एक वाक्य है"]
    result = text_nll(model, tiny_tokenizer, texts, batch_size=2)
    manual_nll, manual_tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
        assert ids[0, 0].item() == tiny_tokenizer.bos_token_id
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        manual_nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        manual_tokens += ids.shape[1] - 1
    assert result.tokens == manual_tokens
    assert math.isclose(result.nll_nats, manual_nll, rel_tol=1e-4)
    chars = sum(len(t) for t in texts)
    assert math.isclose(result.bits_per_char, manual_nll / math.log(2) / chars, rel_tol=1e-4)
    assert result.bytes_utf8 == sum(len(t.encode()) for t in texts)
