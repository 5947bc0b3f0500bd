"""Bits per character equals a hand computation of the same log-likelihood, whatever the tokenizer appends."""

import math

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from megadistill.evaluate import start_token_id, text_nll

TEXTS = ["नमस्ते दुनिया", "a longer sentence, with punctuation.", "यह एक वाक्य है"]


def tiny_llama(vocab):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def with_template(tokenizer, single: str, special: list[tuple[str, int]], **tokens):
    """A copy of ``tokenizer`` whose post-processor is ``single`` (e.g. ``"<bos> $A <eos>"``)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", **tokens)


def test_bits_per_char_matches_manual(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer))
    result = text_nll(model, tiny_tokenizer, TEXTS, batch_size=2)
    manual_nll, manual_tokens = 0.0, 0
    for text in TEXTS:
        ids = torch.tensor([tiny_tokenizer(text)["input_ids"]])
        assert ids[0, 0].item() == tiny_tokenizer.bos_token_id
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        manual_nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
        manual_tokens += ids.shape[1] - 1
    assert result.tokens == manual_tokens
    assert math.isclose(result.nll_nats, manual_nll, rel_tol=1e-4)
    chars = sum(len(t) for t in TEXTS)
    assert math.isclose(result.bits_per_char, manual_nll / math.log(2) / chars, rel_tol=1e-4)
    assert result.bytes_utf8 == sum(len(t.encode()) for t in TEXTS)


def test_appended_eos_is_not_scored(tiny_tokenizer):
    """A post-processor "<bos> $A <eos>" scores exactly what "<bos> $A" scores (the old code added one EOS per text)."""
    appends = with_template(tiny_tokenizer, "<bos> $A <eos>", [("<bos>", 2), ("<eos>", 1)], bos_token="<bos>", eos_token="<eos>")
    assert appends(TEXTS[0])["input_ids"][-1] == appends.eos_token_id
    model = tiny_llama(len(tiny_tokenizer))
    plain, appended = text_nll(model, tiny_tokenizer, TEXTS), text_nll(model, appends, TEXTS)
    assert appended.tokens == plain.tokens == sum(len(tiny_tokenizer(t, add_special_tokens=False).input_ids) for t in TEXTS)
    assert math.isclose(appended.nll_nats, plain.nll_nats, rel_tol=1e-6)


def test_cls_sep_tokenizer_starts_with_cls_and_scores_no_sep(tiny_tokenizer):
    """A "[CLS] $A [SEP]" style tokenizer without BOS: CLS is the start token, the SEP is never scored."""
    bert_like = with_template(tiny_tokenizer, "<bos> $A <eos>", [("<bos>", 2), ("<eos>", 1)], cls_token="<bos>", sep_token="<eos>")
    assert bert_like.bos_token_id is None and start_token_id(bert_like) == bert_like.cls_token_id == 2
    model = tiny_llama(len(tiny_tokenizer))
    result = text_nll(model, bert_like, TEXTS, batch_size=3)
    assert result.tokens == sum(len(bert_like(t, add_special_tokens=False).input_ids) for t in TEXTS)
    assert math.isclose(result.nll_nats, text_nll(model, tiny_tokenizer, TEXTS).nll_nats, rel_tol=1e-6)


def test_no_start_token_is_a_value_error(tiny_tokenizer):
    bare = with_template(tiny_tokenizer, "$A", [])
    with pytest.raises(ValueError, match="no BOS, CLS or EOS"):
        text_nll(tiny_llama(len(tiny_tokenizer)), bare, TEXTS)
