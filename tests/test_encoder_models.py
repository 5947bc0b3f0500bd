"""Masked-LM teachers end to end: load, trim the vocabulary on SIB-200, build a student, export, reload.

BERT (WordPiece, mBERT-like), XLM-R (Unigram, SentencePiece-like) and DistilBERT teachers are
tiny random models saved with their tokenizers; the student keeps every other layer (DistilBERT,
Sanh et al. 2019) or all of them, with the vocabulary trimmed to the corpus (Abdaoui et al. 2020).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import read_sib200_texts
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizerFast,
                          DistilBertConfig, DistilBertForMaskedLM, PreTrainedTokenizerFast, XLMRobertaConfig,
                          XLMRobertaForMaskedLM)

from megadistill.checkpoint import export_hf
from megadistill.models.adapters import adapter_for
from megadistill.models.student import build_random_student, build_student_from_teacher, parse_layer_map
from megadistill.models.teacher import final_hidden_states, load_teacher
from megadistill.models.vocab import VocabMap, trim_tokenizer, vocab_map_from_corpus


def _bert_tokenizer(texts: list[str], directory) -> BertTokenizerFast:
    """A cased mBERT-like WordPiece tokenizer (``vocab.txt`` trained on ``texts``)."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=1500, special_tokens=specials))
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    (directory / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    return BertTokenizerFast(vocab=str(directory / "vocab.txt"), do_lower_case=False)


def _xlmr_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """An XLM-R-like Unigram tokenizer: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4, ``<s> $A </s>``."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=1500, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def _masked_lm(kind: str, tokenizer):
    """A 4-layer masked LM of ``kind`` over ``tokenizer``'s ids, random weights everywhere."""
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    model = {
        "bert": lambda: BertForMaskedLM(BertConfig(**common)),
        "xlmr": lambda: XLMRobertaForMaskedLM(XLMRobertaConfig(**common, bos_token_id=0, eos_token_id=2)),
        "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(
            vocab_size=vocab, dim=32, n_layers=4, n_heads=2, hidden_dim=64, max_position_embeddings=130,
            pad_token_id=tokenizer.pad_token_id)),
    }[kind]()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def hindi(sib200_dir):
    return read_sib200_texts(sib200_dir, "hin_Deva", "train")


@pytest.fixture(scope="module", params=["bert", "xlmr", "distilbert"])
def teacher_dir(request, tmp_path_factory, hindi):
    """A saved masked-LM teacher with its tokenizer (WordPiece for BERT/DistilBERT, Unigram for XLM-R)."""
    directory = tmp_path_factory.mktemp(request.param)
    tokenizer = _xlmr_tokenizer(hindi) if request.param == "xlmr" else _bert_tokenizer(hindi, directory)
    _masked_lm(request.param, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _student_parts(teacher, tokenizer, corpus: list[str], layer_map):
    docs = [np.asarray(ids) for ids in tokenizer(corpus)["input_ids"]]
    vmap = vocab_map_from_corpus([docs], tokenizer, texts=corpus)
    return build_student_from_teacher(teacher, layer_map, vmap), trim_tokenizer(tokenizer, vmap), vmap


def test_encoder_student_from_teacher_exports_and_reloads(teacher_dir, hindi, tmp_path, single_process):
    teacher, tokenizer = load_teacher(teacher_dir)
    adapter = adapter_for(teacher)
    assert adapter.family == "encoder" and type(teacher).__name__.endswith("ForMaskedLM")
    layer_map = parse_layer_map("every:2", getattr(teacher.config, adapter.depth_field))
    student, student_tokenizer, vmap = _student_parts(teacher, tokenizer, hindi[:200], layer_map)
    assert len(vmap) < len(tokenizer) and getattr(student.config, adapter.depth_field) == 2
    export_hf(student, student_tokenizer, tmp_path / "hf", extra_files={"vocab_map.json": vmap.to_dict()})

    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(reloaded) is type(teacher) and len(reloaded_tokenizer) == len(vmap) == reloaded.config.vocab_size
    assert VocabMap.load(tmp_path / "hf" / "vocab_map.json") == vmap
    batch = reloaded_tokenizer(hindi[:3], padding=True, return_tensors="pt")
    assert set(batch) == set(tokenizer.model_input_names)  # no token_type_ids for DistilBERT
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, student.eval()(**batch).logits)
    assert reloaded_tokenizer.mask_token_id == int(vmap.teacher_to_student[tokenizer.mask_token_id])
    assert reloaded_tokenizer.pad_token_id == reloaded.config.pad_token_id


def test_full_depth_trimmed_student_predicts_the_teachers_masked_tokens(teacher_dir, hindi):
    """All layers + trimmed vocabulary: on corpus text with a [MASK], the student's logits are the teacher's
    restricted to the kept ids, through the tokenizers (student ids from the trimmed tokenizer)."""
    teacher, tokenizer = load_teacher(teacher_dir)
    depth = getattr(teacher.config, adapter_for(teacher).depth_field)
    corpus = hindi[:200]
    student, student_tokenizer, vmap = _student_parts(teacher, tokenizer, corpus, list(range(depth)))
    student.eval()
    for text in corpus[:5]:
        t_ids = torch.tensor([tokenizer(text)["input_ids"]])
        s_ids = torch.tensor([student_tokenizer(text)["input_ids"]])
        assert torch.equal(vmap.remap(t_ids)[0], s_ids)
        t_ids[0, 3], s_ids[0, 3] = tokenizer.mask_token_id, student_tokenizer.mask_token_id
        with torch.no_grad():
            expected = teacher(t_ids).logits[..., vmap.student_to_teacher]
            torch.testing.assert_close(student(s_ids).logits, expected)
            hidden = final_hidden_states(student, s_ids)
        bias = adapter_for(student).output_bias(student)
        torch.testing.assert_close(hidden @ adapter_for(student).output_weight(student).T + bias, expected)


def test_random_encoder_student_exports_and_reloads(teacher_dir, tmp_path, single_process):
    teacher, tokenizer = load_teacher(teacher_dir)
    student = build_random_student(teacher, seed=3, layer_map=[0, 3])
    assert not torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    export_hf(student, tokenizer, tmp_path / "hf")
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), student.state_dict().values()))
