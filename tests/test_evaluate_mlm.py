"""Masked-LM evaluation (fixed seeded mask, accuracy, loss, pseudo-log-likelihood) and tools/evaluate.py end to end."""

import collections
import json
import math

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

from megadistill.data.masking import IGNORE_INDEX
from megadistill.evaluate import eval_text_files, fixed_mlm_masks, mlm_eval, pll_bits_per_char, text_nll
from tests.conftest import read_sib200_texts
from tools import evaluate as evaluate_tool

LANGS = ("hin_Deva", "ben_Beng", "eng_Latn")
PADDED_ROWS = 11


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory, sib200_dir):
    """A WordPiece tokenizer from a vocab file: every character (alone and as ##piece) plus frequent words."""
    texts = [t for lang in LANGS for t in read_sib200_texts(sib200_dir, lang)]
    chars = sorted(set("".join(texts)) - {" "})
    words = [w for w, _ in collections.Counter(w for t in texts for w in t.split()).most_common(100) if len(w) > 1]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + words
    path = tmp_path_factory.mktemp("bert_vocab") / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab=str(path), do_lower_case=False, strip_accents=False, tokenize_chinese_chars=False)


def tiny_bert(tokenizer, texts):
    """A 2-layer BERT with PADDED_ROWS padded vocabulary rows whose bias would win every argmax if they were read.

    The real rows' bias is a unigram log-prior of ``texts``, so some predictions are right.
    """
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tokenizer) + PADDED_ROWS, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    model = BertForMaskedLM(cfg).eval()
    counts = torch.bincount(torch.tensor([i for t in texts for i in tokenizer(t).input_ids]), minlength=len(tokenizer))
    with torch.no_grad():
        model.cls.predictions.bias[: len(tokenizer)] = 2.0 * torch.log1p(counts.float())
        model.cls.predictions.bias[len(tokenizer):] = 100.0
    return model


@pytest.fixture(scope="module")
def dev_texts(sib200_dir):
    return read_sib200_texts(sib200_dir, "hin_Deva", "dev")[:6] + read_sib200_texts(sib200_dir, "eng_Latn", "dev")[:4]


def reference_mlm(model, tokenizer, examples):
    """One text at a time, no padding: (correct, nll nats, masked tokens) over the tokenizer's ids."""
    correct, nll, count = 0, 0.0, 0
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(input_ids=e.input_ids[None]).logits[0, :, : len(tokenizer)], -1)
            for position in torch.nonzero(e.labels != IGNORE_INDEX).flatten().tolist():
                label = int(e.labels[position])
                correct += int(logp[position].argmax()) == label
                nll -= float(logp[position, label])
                count += 1
    return correct, nll, count


def test_accuracy_and_loss_match_reference(bert_tokenizer, dev_texts):
    model = tiny_bert(bert_tokenizer, dev_texts)
    result = mlm_eval(model, bert_tokenizer, dev_texts, seed=3, batch_size=4)
    correct, nll, count = reference_mlm(model, bert_tokenizer, fixed_mlm_masks(bert_tokenizer, dev_texts, seed=3))
    assert (result.masked_tokens, result.correct, result.texts) == (count, correct, len(dev_texts))
    assert 0 < result.correct < result.masked_tokens
    assert math.isclose(result.nll_nats, nll, rel_tol=1e-4)
    assert math.isclose(result.mlm_loss, nll / count, rel_tol=1e-4)
    assert result.masked_token_accuracy == correct / count
    assert mlm_eval(model, bert_tokenizer, dev_texts, seed=3, batch_size=1).correct == correct


def test_mask_fixed_by_seed(bert_tokenizer, dev_texts):
    first, again = fixed_mlm_masks(bert_tokenizer, dev_texts, seed=5), fixed_mlm_masks(bert_tokenizer, dev_texts, seed=5)
    other = fixed_mlm_masks(bert_tokenizer, dev_texts, seed=6)
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels) for a, b in zip(first, again))
    assert any(not torch.equal(a.labels, b.labels) for a, b in zip(first, other))
    # A text's mask depends on its index and the seed only, not on the texts after it.
    assert torch.equal(fixed_mlm_masks(bert_tokenizer, dev_texts[:2], seed=5)[1].labels, first[1].labels)


def test_special_tokens_never_masked(bert_tokenizer, dev_texts):
    special = torch.tensor(bert_tokenizer.all_special_ids)
    for mask_prob in (0.15, 1.0):
        for text, e in zip(dev_texts, fixed_mlm_masks(bert_tokenizer, dev_texts, mask_prob=mask_prob)):
            original = torch.tensor(bert_tokenizer(text)["input_ids"])
            assert original[0] == bert_tokenizer.cls_token_id and original[-1] == bert_tokenizer.sep_token_id
            is_special = torch.isin(original, special)
            assert (e.labels[is_special] == IGNORE_INDEX).all()
            assert torch.equal(e.input_ids[is_special], original[is_special])
            selected = e.labels != IGNORE_INDEX
            assert torch.equal(e.labels[selected], original[selected])
            assert int(selected.sum()) == max(1, round(mask_prob * int((~is_special).sum())))


def test_bad_input_is_a_value_error(bert_tokenizer, dev_texts):
    model = tiny_bert(bert_tokenizer, dev_texts)
    with pytest.raises(ValueError, match="mask_prob"):
        mlm_eval(model, bert_tokenizer, dev_texts, mask_prob=1.5)
    with pytest.raises(ValueError, match="positions"):
        mlm_eval(model, bert_tokenizer, [" ".join(dev_texts * 3)])


def test_pll_matches_loop_reference(bert_tokenizer, dev_texts):
    model = tiny_bert(bert_tokenizer, dev_texts)
    texts = [dev_texts[0][:40], dev_texts[-1][:80]]  # short: the reference runs one forward per token
    result = pll_bits_per_char(model, bert_tokenizer, texts, batch_size=7)  # batches straddle texts
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = bert_tokenizer(text)["input_ids"]
            for position in range(1, len(ids) - 1):  # every token between [CLS] and [SEP]
                masked = torch.tensor([ids])
                masked[0, position] = bert_tokenizer.mask_token_id
                logits = model(input_ids=masked).logits[0, position, : len(bert_tokenizer)]
                nll -= float(torch.log_softmax(logits, -1)[ids[position]])
                tokens += 1
    assert result.tokens == tokens == sum(len(bert_tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
    assert math.isclose(result.nll_nats, nll, rel_tol=1e-4)
    assert math.isclose(result.bits_per_char, nll / math.log(2) / sum(map(len, texts)), rel_tol=1e-4)


def test_eval_text_files_by_language(sib200_dir):
    by_dir = eval_text_files(data_dir=sib200_dir, langs=["ben_Beng", "hin_Deva"], split="dev")
    assert by_dir == {lang: [sib200_dir / lang / "dev.tsv"] for lang in ("ben_Beng", "hin_Deva")}
    assert eval_text_files([str(sib200_dir / "*" / "test.tsv")], langs=["hin_Deva"]) == {
        "hin_Deva": [sib200_dir / "hin_Deva" / "test.tsv"]}
    every = eval_text_files([str(sib200_dir)], split="dev")
    assert "eng_Latn" in every and all(paths[0].name == "dev.tsv" for paths in every.values())
    with pytest.raises(FileNotFoundError, match="xyz_Latn"):
        eval_text_files(data_dir=sib200_dir, langs=["xyz_Latn"])
    with pytest.raises(ValueError, match="--data-dir"):
        eval_text_files()


def test_tool_end_to_end(tmp_path, sib200_dir, bert_tokenizer, tiny_tokenizer, dev_texts, capsys):
    from tests.test_evaluate import tiny_llama

    model, llama = tiny_bert(bert_tokenizer, dev_texts), tiny_llama(len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "bert")
    bert_tokenizer.save_pretrained(tmp_path / "bert")
    llama.save_pretrained(tmp_path / "llama")
    tiny_tokenizer.save_pretrained(tmp_path / "llama")
    data = tmp_path / "sib"  # a few dev sentences per language keep PLL short
    for lang in ("hin_Deva", "eng_Latn"):
        (data / lang).mkdir(parents=True)
        lines = (sib200_dir / lang / "dev.tsv").read_text(encoding="utf-8").splitlines()[:4]
        (data / lang / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "eval.json"
    argv = ["--data-dir", str(data), "--split", "dev", "--lang", "hin_Deva", "--lang", "eng_Latn", "--pll",
            "--model", f"bert={tmp_path / 'bert'}", "--model", f"llama={tmp_path / 'llama'}", "--seed", "3",
            "--output", str(out)]
    assert evaluate_tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "masked acc" in printed and "bits/char" in printed and "held-out eng_Latn" in printed
    report = json.loads(out.read_text(encoding="utf-8"))
    assert len(report["results"]) == 4
    hindi = read_sib200_texts(sib200_dir, "hin_Deva", "dev")[:3]
    bert_hi, llama_hi = report["by_model"]["bert"]["hin_Deva"], report["by_model"]["llama"]["hin_Deva"]
    expected = mlm_eval(model, bert_tokenizer, hindi, seed=3)
    assert bert_hi["kind"] == "mlm" and (bert_hi["correct"], bert_hi["masked_tokens"]) == (expected.correct, expected.masked_tokens)
    assert math.isclose(bert_hi["pll"]["bits_per_char"], pll_bits_per_char(model, bert_tokenizer, hindi).bits_per_char, rel_tol=1e-4)
    assert llama_hi["kind"] == "causal" and "masked_token_accuracy" not in llama_hi
    assert math.isclose(llama_hi["bits_per_char"], text_nll(llama, tiny_tokenizer, hindi).bits_per_char, rel_tol=1e-4)
    assert report["data"]["hin_Deva"]["texts"] == 3


def test_tool_rejects_bad_arguments(sib200_dir, tmp_path):
    with pytest.raises(ValueError, match="name=path"):
        evaluate_tool.main(["--data-dir", str(sib200_dir), "--model", "nopath"])
    with pytest.raises(FileNotFoundError, match="xyz_Latn"):
        evaluate_tool.main(["--data-dir", str(sib200_dir), "--lang", "xyz_Latn", "--model", f"m={tmp_path}"])
