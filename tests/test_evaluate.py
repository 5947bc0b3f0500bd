"""Bits per character equals a hand computation of the same log-likelihood, whatever the tokenizer appends;
romanized text is scored per character of its native twin (``--chars-from``)."""

import json
import math
import unicodedata

import pytest
import torch
from tokenizers import Tokenizer, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import load_tool
from megadistill.evaluate import EvalOptions, NativeText, evaluate_model, start_token_id, text_nll

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


NATIVE = ["नमस्ते दुनिया", "यह एक वाक्य है।", "भारत की राजधानी नई दिल्ली है, और मुंबई सबसे बड़ा शहर।"]


def romanized(texts):
    """ISO 15919 of Devanagari ``texts`` (megadistill.data.romanize), as a romanized model would read them."""
    from megadistill.data.romanize import Romanizer

    iso = Romanizer("Deva", "iso")
    return [iso.romanize(t) for t in texts]


def manual_nll_nats(model, tokenizer, texts) -> float:
    """Summed NLL (nats) of each text's tokens after BOS, one text at a time: the hand computation."""
    total = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        total -= logp.gather(1, ids[0, 1:, None]).sum().item()
    return total


def nfc_chars(texts) -> int:
    return sum(len(unicodedata.normalize("NFC", t)) for t in texts)


def test_romanized_text_is_scored_per_native_character(tiny_tokenizer):
    roman = romanized(NATIVE)
    assert roman[0].isascii() is False and roman[0] != NATIVE[0]  # ISO 15919 has macrons: "namastē duniyā"
    assert nfc_chars(roman) != nfc_chars(NATIVE)  # the two lengths differ, so the divisor matters
    model = tiny_llama(len(tiny_tokenizer))
    record = evaluate_model(model, tiny_tokenizer, roman, EvalOptions(batch_size=2), NativeText(NATIVE, ["native.tsv"]))
    nll_bits = manual_nll_nats(model, tiny_tokenizer, roman) / math.log(2)
    assert record["characters"] == nfc_chars(NATIVE) and record["scored_characters"] == nfc_chars(roman)
    assert record["bytes_utf8"] == sum(len(t.encode()) for t in NATIVE)
    assert record["characters_from"] == "native.tsv"
    assert math.isclose(record["bits_per_char"], nll_bits / nfc_chars(NATIVE), rel_tol=1e-4)
    assert not math.isclose(record["bits_per_char"], nll_bits / nfc_chars(roman), rel_tol=1e-3)
    plain = evaluate_model(model, tiny_tokenizer, roman, EvalOptions(batch_size=2))
    assert plain["characters_from"] == "scored" and plain["characters"] == nfc_chars(roman)
    assert math.isclose(plain["nll_nats"], record["nll_nats"], rel_tol=1e-6) and plain["tokens"] == record["tokens"]


def test_masked_lm_refuses_native_counts():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32))
    with pytest.raises(ValueError, match="causal LMs' bits/char only.*masked LM"):
        evaluate_model(bert, None, ["x"], EvalOptions(), NativeText(["x"], ["native.tsv"]))


def _jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    directory = tmp_path / "model"
    tiny_llama(len(tiny_tokenizer)).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def test_cli_chars_from_counts_the_native_file(tmp_path, tiny_model_dir, tiny_tokenizer):
    native = _jsonl(tmp_path / "native" / "hin_Deva" / "dev.jsonl", NATIVE)
    roman = _jsonl(tmp_path / "roman" / "hin_Deva.iso" / "dev.jsonl", romanized(NATIVE))
    out = tmp_path / "eval.json"
    tool = load_tool("evaluate")
    assert tool.main(["--data", str(roman), "--chars-from", str(native), "--model", f"s={tiny_model_dir}",
                      "--output", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    (record,) = report["results"]
    assert record["language"] == "hin_Deva" and record["characters_from"] == str(native)
    assert record["characters"] == nfc_chars(NATIVE) and record["tokens_per_char"] == record["tokens"] / nfc_chars(NATIVE)
    nll_bits = manual_nll_nats(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, romanized(NATIVE)) / math.log(2)
    assert math.isclose(record["bits_per_char"], nll_bits / nfc_chars(NATIVE), rel_tol=1e-4)
    assert report["data"]["hin_Deva"]["native"]["characters"] == nfc_chars(NATIVE)
    assert "per character of the native text" in report["table"]


def test_cli_chars_from_count_mismatch_names_both_files(tmp_path):
    native = _jsonl(tmp_path / "native" / "hin_Deva" / "dev.jsonl", NATIVE[:2])
    roman = _jsonl(tmp_path / "roman" / "hin_Deva.iso" / "dev.jsonl", romanized(NATIVE))
    tool = load_tool("evaluate")
    with pytest.raises(ValueError, match=r"dev.jsonl has 2 texts but --data .*hin_Deva.iso.dev.jsonl has 3") as err:
        tool.main(["--data", str(roman), "--chars-from", str(native), "--model", "s=unused"])
    assert str(native) in str(err.value) and str(roman) in str(err.value)
    with pytest.raises(ValueError, match="--task scores classifiers"):
        tool.main(["--task", "sib200", "--chars-from", str(native), "--data-dir", str(tmp_path), "--lang", "hin_Deva"])
