"""Tests for megadistill.models.teacher on tiny Gemma 3 and Llama models built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from megadistill.models import teacher as teacher_lib
from megadistill.models.teacher import (
    count_parameters,
    final_hidden_states,
    load_teacher,
    load_tokenizer,
    output_softcap,
    resolve_teacher,
)


def tiny_gemma3(vocab_size: int, softcap: float | None = None) -> Gemma3ForCausalLM:
    """A 4-layer Gemma 3 with random (not default-initialized) weights, so layers differ."""
    config = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=128, final_logit_softcapping=softcap,
    )
    return _randomized(Gemma3ForCausalLM(config))


def tiny_llama(vocab_size: int, tied: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=tied,
    )
    return _randomized(LlamaForCausalLM(config))


def _randomized(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tiny_gemma3")
    tiny_gemma3(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_load_teacher_is_frozen_and_reproduces_logits(gemma_dir):
    model, tokenizer = load_teacher(gemma_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    reference = Gemma3ForCausalLM.from_pretrained(gemma_dir).eval()
    ids = torch.tensor([tokenizer("नमस्ते दुनिया, hello world")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert len(tokenizer) == model.config.vocab_size


def test_load_teacher_dtype(gemma_dir):
    model, _ = load_teacher(gemma_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_resolve_teacher_accepts_model_dir(gemma_dir):
    assert resolve_teacher(gemma_dir) == gemma_dir
    assert resolve_teacher(str(gemma_dir)) == gemma_dir


def test_resolve_teacher_rejects_non_model_dir(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_teacher(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json"):
        resolve_teacher(tmp_path / "weights.bin")


def test_resolve_teacher_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        resolve_teacher(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        load_teacher(tmp_path / "nope.gguf")


def tiny_masked_lm(kind: str, vocab_size: int):
    """A 2-layer BERT / XLM-R / DistilBERT masked LM with random weights."""
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM

    common = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    build = {
        "bert": lambda: BertForMaskedLM(BertConfig(**common)),
        "xlmr": lambda: XLMRobertaForMaskedLM(XLMRobertaConfig(**common, pad_token_id=0, bos_token_id=2, eos_token_id=1)),
        "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab_size, dim=32, n_layers=2,
                                                                     n_heads=2, hidden_dim=64, max_position_embeddings=64)),
    }[kind]
    return _randomized(build())


@pytest.mark.parametrize("kind", ["bert", "xlmr", "distilbert"])
def test_masked_lm_teacher_loads_frozen_with_its_head(kind, tmp_path, tiny_tokenizer):
    reference = tiny_masked_lm(kind, len(tiny_tokenizer))
    reference.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_teacher(tmp_path)
    assert type(model) is type(reference)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([tokenizer("नमस्ते दुनिया, hello world")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=0)
        hidden = final_hidden_states(model, ids)
    head = model.get_output_embeddings()
    torch.testing.assert_close(hidden @ head.weight.T + head.bias, logits)


def test_unsupported_teacher_architectures_rejected(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertForSequenceClassification.*not supported.*ForCausalLM.*XLMRobertaForMaskedLM"):
        load_teacher(tmp_path)


def test_load_tokenizer_matches_saved(gemma_dir, tiny_tokenizer):
    tokenizer = load_tokenizer(gemma_dir)
    assert tokenizer.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()


def test_gguf_conversion_is_cached_and_atomic(tmp_path, monkeypatch, gemma_dir):
    """The GGUF path converts once into teachers/<sha16>/ and never leaves a partial directory."""
    import shutil

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    calls = []

    def fake_convert(path, out_dir):
        calls.append(path)
        if len(calls) == 1:
            raise RuntimeError("interrupted")
        shutil.copytree(gemma_dir, out_dir, dirs_exist_ok=True)

    monkeypatch.setattr(teacher_lib, "_convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        resolve_teacher(gguf, cache_dir=cache)
    assert list((cache / "teachers").iterdir()) == []
    path = resolve_teacher(gguf, cache_dir=cache)
    assert path.parent == cache / "teachers" and len(path.name) == 16
    assert (path / "config.json").is_file() and (path / teacher_lib.SOURCE_FILE).is_file()
    assert resolve_teacher(gguf, cache_dir=cache) == path
    assert len(calls) == 2
    monkeypatch.setenv("MEGADISTILL_CACHE", str(cache))
    assert resolve_teacher(gguf) == path


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_llama])
def test_final_hidden_states_feed_the_head(build, tiny_tokenizer):
    model = build(len(tiny_tokenizer))
    batch = tiny_tokenizer(["एक छोटा वाक्य", "एक और थोड़ा लंबा वाक्य"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()
    with torch.no_grad():
        hidden = final_hidden_states(model, ids, attention_mask=mask)
        logits = model(ids, attention_mask=mask).logits
    assert hidden.shape == (*ids.shape, model.config.hidden_size)
    torch.testing.assert_close(hidden @ model.get_output_embeddings().weight.T, logits)


def test_final_hidden_states_with_softcap(tiny_tokenizer):
    model = tiny_gemma3(len(tiny_tokenizer), softcap=2.0)
    cap = output_softcap(model.config)
    assert cap == 2.0
    ids = torch.tensor([tiny_tokenizer("सॉफ्ट कैप")["input_ids"]])
    with torch.no_grad():
        raw = final_hidden_states(model, ids) @ model.lm_head.weight.T
        torch.testing.assert_close(cap * torch.tanh(raw / cap), model(ids).logits)
    assert output_softcap(tiny_llama(10).config) is None


def test_count_parameters_tied_and_untied():
    vocab, hidden = 100, 64
    tied, untied = tiny_llama(vocab, tied=True), tiny_llama(vocab, tied=False)
    for model, head_rows in ((tied, 0), (untied, vocab)):
        counts = count_parameters(model)
        assert counts["embedding"] == (vocab + head_rows) * hidden
        assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    assert count_parameters(tied)["non_embedding"] == count_parameters(untied)["non_embedding"]
    assert count_parameters(tied)["total"] == sum(p.numel() for p in tied.parameters())
