"""Tests for megadistill.models.vocab: the id map, BPE merge closure and the trimmed tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import read_sib200_texts
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from megadistill.models.vocab import (
    BYTE_FALLBACK_TOKENS,
    VocabMap,
    close_over_merges,
    kept_ids_from_corpus,
    trim_tokenizer,
    vocab_map_from_corpus,
)


@pytest.fixture(scope="module")
def hindi(sib200_dir):
    return read_sib200_texts(sib200_dir, "hin_Deva", "train")


@pytest.fixture(scope="module")
def unseen(sib200_dir):
    return read_sib200_texts(sib200_dir, "ben_Beng", "dev") + read_sib200_texts(sib200_dir, "eng_Latn", "dev")


@pytest.fixture(scope="module")
def hindi_docs(tiny_tokenizer, hindi):
    return [np.asarray(ids, dtype=np.uint16) for ids in tiny_tokenizer(hindi)["input_ids"]]


@pytest.fixture(scope="module")
def hindi_map(hindi_docs, tiny_tokenizer):
    return vocab_map_from_corpus([hindi_docs], tiny_tokenizer)


@pytest.fixture(scope="module")
def trimmed(tiny_tokenizer, hindi_map):
    return trim_tokenizer(tiny_tokenizer, hindi_map)


def test_vocab_map_basics_and_round_trip(tmp_path):
    vmap = VocabMap.from_token_ids({7: 3, 5: 1, 9: 0}, teacher_vocab_size=12, always_keep=[0, 1], unk_teacher_id=3)
    assert vmap.student_to_teacher.tolist() == [0, 1, 3, 5, 7]
    assert len(vmap) == 5 and vmap.unk_student_id == 2
    assert vmap.teacher_to_student.tolist() == [0, 1, -1, 2, -1, 3, -1, 4, -1, -1, -1, -1]
    vmap.save(tmp_path / "map.json")
    assert VocabMap.load(tmp_path / "map.json") == vmap
    assert [p.name for p in tmp_path.iterdir()] == ["map.json"]
    assert VocabMap.from_dict(json.loads(json.dumps(vmap.to_dict()))) == vmap
    assert json.loads((tmp_path / "map.json").read_text())["student_to_teacher"] == [0, 1, 3, 5, 7]


def test_vocab_map_default_unk_is_smallest_kept_id():
    vmap = VocabMap.from_token_ids([9, 4, 6], teacher_vocab_size=10)
    assert vmap.unk_teacher_id == 4 and vmap.unk_student_id == 0
    assert VocabMap([2, 5], 6).unk_teacher_id == 2


def test_vocab_map_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="strictly increasing"):
        VocabMap([3, 1], 5, unk_teacher_id=3)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        VocabMap([1, 5], 5, unk_teacher_id=1)
    with pytest.raises(ValueError, match="unk"):
        VocabMap([1, 2], 5, unk_teacher_id=3)
    with pytest.raises(FileNotFoundError):
        VocabMap.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a megadistill vocab map"):
        VocabMap.load(tmp_path / "other.json")


def test_remap_marks_dropped_ids():
    vmap = VocabMap.from_token_ids([4, 8], teacher_vocab_size=10, always_keep=[0, 2], unk_teacher_id=2)
    student, dropped = vmap.remap(torch.tensor([[0, 4, 5], [8, 9, 2]]))
    assert student.tolist() == [[0, 2, 1], [3, 1, 1]]
    assert dropped.tolist() == [[False, False, True], [False, True, False]]
    assert vmap.to_teacher(torch.tensor([0, 1, 2, 3])).tolist() == [0, 2, 4, 8]
    with pytest.raises(ValueError, match="teacher ids"):
        vmap.remap(torch.tensor([10]))
    with pytest.raises(ValueError, match="student ids"):
        vmap.to_teacher(torch.tensor([4]))


def test_restrict_rows_and_padded_vocab():
    vmap = VocabMap.from_token_ids([1, 4], teacher_vocab_size=6, unk_teacher_id=1)
    weight = torch.arange(6 * 3, dtype=torch.float32).reshape(6, 3)
    torch.testing.assert_close(vmap.restrict_rows(weight), weight[[1, 4]])
    padded = torch.cat([weight, torch.full((2, 3), -1.0)])  # 8 rows for 6 real ids
    torch.testing.assert_close(vmap.restrict_rows(padded), weight[[1, 4]])
    torch.testing.assert_close(vmap.restrict_rows(torch.arange(6.0)), torch.tensor([1.0, 4.0]))
    with pytest.raises(ValueError, match="5 rows.*6 teacher ids"):
        vmap.restrict_rows(weight[:5])


def test_restricted_logits_renormalize_teacher_probabilities():
    torch.manual_seed(0)
    vocab, hidden = 50, 8
    head, states = torch.randn(vocab, hidden), torch.randn(4, hidden)
    vmap = VocabMap.from_token_ids(range(0, vocab, 3), teacher_vocab_size=vocab, unk_teacher_id=0)
    p_teacher = torch.softmax(states @ head.T, dim=-1)[:, vmap.student_to_teacher]
    p_student = torch.softmax(states @ vmap.restrict_rows(head).T, dim=-1)
    torch.testing.assert_close(p_student, p_teacher / p_teacher.sum(-1, keepdim=True))


def test_kept_ids_include_specials_bytes_and_extras(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab()
    corpus = [[np.array([600, 601])], iter([np.array([], dtype=np.int32)])]
    kept = kept_ids_from_corpus(corpus, tiny_tokenizer, extra_ids=[650])
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
    expected = {600, 601, 650, *tiny_tokenizer.all_special_ids, *(vocab[b] for b in BYTE_FALLBACK_TOKENS)}
    assert expected <= set(kept.tolist())
    with pytest.raises(ValueError, match="different tokenizer"):
        kept_ids_from_corpus([[np.array([len(tiny_tokenizer)])]], tiny_tokenizer)


def test_close_over_merges_adds_ancestors():
    data = {"model": {"type": "BPE", "merges": [["a", "b"], ["ab", "c"], ["x", "y"], "c d"]}}
    assert close_over_merges(data, {"abc"}) == {"abc", "ab", "a", "b", "c"}
    assert close_over_merges(data, {"cd", "z"}) == {"cd", "c", "d", "z"}
    prefixed = {"model": {"type": "BPE", "continuing_subword_prefix": "##", "merges": [["a", "##b"]]}}
    assert close_over_merges(prefixed, {"ab"}) == {"ab", "a", "##b"}


def test_trimmed_tokenizer_is_exact_on_kept_text(tiny_tokenizer, hindi, hindi_map, trimmed):
    assert len(trimmed) == len(hindi_map) < len(tiny_tokenizer)
    for text in hindi:
        teacher_ids = torch.tensor(tiny_tokenizer(text)["input_ids"])
        student_ids, dropped = hindi_map.remap(teacher_ids)
        assert not dropped.any()
        assert trimmed(text)["input_ids"] == student_ids.tolist(), text


def test_closure_is_needed_for_exactness(tiny_tokenizer, hindi, hindi_docs):
    seen = np.unique(np.concatenate(hindi_docs))
    vocab = tiny_tokenizer.get_vocab()
    always = [*tiny_tokenizer.all_special_ids, *(vocab[b] for b in BYTE_FALLBACK_TOKENS)]
    unclosed = VocabMap.from_token_ids(seen, len(tiny_tokenizer), always, unk_teacher_id=3)
    naive = trim_tokenizer(tiny_tokenizer, unclosed)
    expected = [unclosed.remap(torch.tensor(ids))[0].tolist() for ids in tiny_tokenizer(hindi)["input_ids"]]
    mismatches = sum(naive(text)["input_ids"] != ids for text, ids in zip(hindi, expected))
    assert mismatches > 0


def test_trimmed_tokenizer_handles_unseen_text(trimmed, hindi_map, unseen):
    for text in unseen:
        ids = trimmed(text)["input_ids"]
        assert max(ids) < len(hindi_map) and ids[0] == trimmed.bos_token_id
        assert trimmed.decode(ids, skip_special_tokens=True) == text


def test_trimmed_tokenizer_save_reload(tmp_path, trimmed, hindi, unseen):
    trimmed.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.backend_tokenizer.to_str() == trimmed.backend_tokenizer.to_str()
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(reloaded, name) == getattr(trimmed, name)
    for text in hindi[:50] + unseen[:50]:
        assert reloaded(text)["input_ids"] == trimmed(text)["input_ids"]


def test_trim_rejects_dropped_special_and_unknown_model(tiny_tokenizer):
    no_pad = VocabMap.from_token_ids(range(1, 300), len(tiny_tokenizer), unk_teacher_id=3)
    with pytest.raises(ValueError, match="pad_token"):
        trim_tokenizer(tiny_tokenizer, no_pad)
    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    word_level = PreTrainedTokenizerFast(tokenizer_object=word_level)
    with pytest.raises(ValueError, match="WordLevel"):
        trim_tokenizer(word_level, VocabMap([0], 2, unk_teacher_id=0))


def _wordpiece_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """BERT-like: [PAD] 0, unused slots, then [UNK] [CLS] [SEP] [MASK], so trimming renumbers them."""
    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(5)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials))
    sep, cls = ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
    tok.post_processor = processors.BertProcessing(sep, cls)
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
        mask_token="[MASK]",
    )


def _unigram_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """XLM-R-like Unigram: <s> 0, <pad> 1, </s> 2, <unk> 3, pieces, Template post-processor."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<extra>"]
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=400, special_tokens=specials, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.mark.parametrize("build", [_wordpiece_tokenizer, _unigram_tokenizer])
def test_trim_wordpiece_and_unigram(build, hindi, tmp_path):
    teacher = build(hindi[:300])
    half = hindi[:150]
    docs = [np.asarray(ids) for ids in teacher(half)["input_ids"]]
    vmap = vocab_map_from_corpus([docs], teacher)
    assert vmap.student_to_teacher[-1] > len(vmap) - 1  # some ids dropped, so special ids move
    trimmed = trim_tokenizer(teacher, vmap)
    for text in half:
        assert trimmed(text)["input_ids"] == vmap.remap(torch.tensor(teacher(text)["input_ids"]))[0].tolist()
    trimmed.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(half[0])["input_ids"] == trimmed(half[0])["input_ids"]
    for text in hindi[150:200]:
        assert max(trimmed(text)["input_ids"]) < len(vmap)


# ---- WordPiece (mBERT-like) and Unigram (XLM-R-like) trimming: exact on the corpus ----

def _bert_tokenizer(texts: list[str], directory, vocab_size: int = 3000, limit_alphabet: int = 100):
    """A cased mBERT-like ``BertTokenizerFast`` from a ``vocab.txt`` trained on ``texts``.

    ``limit_alphabet`` leaves rare characters out, so some corpus words become ``[UNK]``.
    """
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                             limit_alphabet=limit_alphabet))
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    path = directory / "vocab.txt"
    path.write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    return BertTokenizerFast(vocab=str(path), do_lower_case=False)


def _xlmr_tokenizer(texts: list[str], vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """An XLM-R-like Unigram tokenizer: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4, ``<s> $A </s>``."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def _remapped(teacher, vmap: VocabMap, text: str) -> list[int]:
    student_ids, dropped = vmap.remap(torch.tensor(teacher(text)["input_ids"]))
    assert not dropped.any(), text
    return student_ids.tolist()


@pytest.fixture(scope="module")
def multilingual(sib200_dir):
    """Hindi train text plus Bengali and Marathi dev text (characters the tokenizers have not all seen)."""
    return (read_sib200_texts(sib200_dir, "hin_Deva") + read_sib200_texts(sib200_dir, "ben_Beng", "dev")[:40]
            + read_sib200_texts(sib200_dir, "mar_Deva", "dev")[:40])


def test_wordpiece_trim_is_exact_on_the_corpus(tmp_path, hindi, multilingual):
    from megadistill.models.vocab import wordpiece_unk_paths

    teacher = _bert_tokenizer(hindi, tmp_path)
    corpus = multilingual[600:]
    docs = [np.asarray(ids) for ids in teacher(corpus)["input_ids"]]
    assert sum(int((d == teacher.unk_token_id).sum()) for d in docs) > 0  # the corpus has [UNK] words
    assert wordpiece_unk_paths(teacher, corpus)  # ... some of them after matching a few pieces
    vmap = vocab_map_from_corpus([docs], teacher, texts=corpus)
    assert len(vmap) < 0.7 * len(teacher)
    trimmed = trim_tokenizer(teacher, vmap)
    for text in corpus:
        assert trimmed(text)["input_ids"] == _remapped(teacher, vmap, text), text
    assert trimmed.model_input_names == teacher.model_input_names and "token_type_ids" in trimmed(corpus[0])
    trimmed.save_pretrained(tmp_path / "trimmed")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "trimmed")
    for text in corpus[:50]:
        assert reloaded(text)["input_ids"] == trimmed(text)["input_ids"]
    assert (reloaded.cls_token, reloaded.sep_token, reloaded.mask_token) == ("[CLS]", "[SEP]", "[MASK]")
    assert reloaded.mask_token_id == int(vmap.teacher_to_student[teacher.mask_token_id])


def test_wordpiece_char_fallback_keeps_new_words_out_of_unk(tmp_path, hindi, sib200_dir):
    teacher = _bert_tokenizer(hindi, tmp_path, limit_alphabet=1000)
    corpus, unseen = hindi[:100], read_sib200_texts(sib200_dir, "hin_Deva", "test")
    docs = [np.asarray(ids) for ids in teacher(corpus)["input_ids"]]
    bare_map = vocab_map_from_corpus([docs], teacher, texts=corpus, char_fallback=False)
    with_chars = trim_tokenizer(teacher, vocab_map_from_corpus([docs], teacher, texts=corpus))
    bare = trim_tokenizer(teacher, bare_map)
    unk_rate = lambda tok: np.mean([i == tok.unk_token_id for t in unseen for i in tok(t)["input_ids"]])  # noqa: E731
    assert len(bare) < len(with_chars) and unk_rate(with_chars) < 0.5 * unk_rate(bare)
    for text in corpus:  # the bare map is exact on the corpus too: the character pieces are an extra
        assert bare(text)["input_ids"] == _remapped(teacher, bare_map, text)


def test_wordpiece_unk_words_need_their_greedy_walk():
    """Teacher: "abcd" -> abc + (no ##d) -> [UNK]. Without "abc", greedy takes ab + ##cd and succeeds."""
    from transformers import BertTokenizerFast

    from megadistill.models.vocab import wordpiece_unk_paths

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "ab", "abc", "##cd", "x", "z"])}
    teacher = BertTokenizerFast(vocab=vocab, do_lower_case=False)
    corpus = ["abcd", "ab", "xcd"]
    assert teacher("abcd")["input_ids"] == [2, 1, 3]
    docs = [np.asarray(ids) for ids in teacher(corpus)["input_ids"]]
    assert wordpiece_unk_paths(teacher, corpus) == {"abc"}
    without_text = vocab_map_from_corpus([docs], teacher, char_fallback=False)
    assert trim_tokenizer(teacher, without_text)("abcd")["input_ids"] != _remapped(teacher, without_text, "abcd")
    with_text = vocab_map_from_corpus([docs], teacher, texts=corpus, char_fallback=False)
    trimmed = trim_tokenizer(teacher, with_text)
    for text in corpus:
        assert trimmed(text)["input_ids"] == _remapped(teacher, with_text, text)
    assert 9 not in with_text.student_to_teacher  # "z" was never needed


def test_unigram_trim_is_exact_on_the_corpus(tmp_path, hindi, multilingual):
    teacher = _xlmr_tokenizer(hindi)
    corpus = multilingual[600:]
    docs = [np.asarray(ids) for ids in teacher(corpus)["input_ids"]]
    assert sum(int((d == teacher.unk_token_id).sum()) for d in docs) > 0  # Bengali has no pieces: <unk>
    vmap = vocab_map_from_corpus([docs], teacher)
    assert vmap.student_to_teacher[-1] >= len(vmap) and len(vmap) < 0.7 * len(teacher)
    trimmed = trim_tokenizer(teacher, vmap)
    for text in corpus:
        assert trimmed(text)["input_ids"] == _remapped(teacher, vmap, text), text
    bare = vocab_map_from_corpus([docs], teacher, char_fallback=False)
    assert len(bare) < len(vmap)
    for text in corpus:
        assert trim_tokenizer(teacher, bare)(text)["input_ids"] == _remapped(teacher, bare, text), text
    assert trimmed.mask_token_id == int(vmap.teacher_to_student[teacher.mask_token_id])


def test_unigram_trim_keeps_the_lowest_score_piece():
    """Dropping the lowest-score piece raises the unknown-piece score until an <unk> path beats the teacher's."""
    from megadistill.models.vocab import unigram_min_score_token

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁ab", -15.0), ("c", -15.0), ("▁", -1.0),
              ("a", -100.0), ("bc", -1.0), ("d", -1.0), ("e", -1.0), ("b", -50.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    teacher = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    corpus = ["abc", "d", "ebc"]
    assert teacher.convert_ids_to_tokens(teacher("abc")["input_ids"]) == ["▁ab", "c"]
    docs = [np.asarray(ids) for ids in teacher(corpus)["input_ids"]]
    assert unigram_min_score_token(json.loads(tok.to_str())) == "a"
    seen = np.unique(np.concatenate(docs + [np.arange(4)]))
    naive = VocabMap(seen, len(teacher), unk_teacher_id=3)
    assert trim_tokenizer(teacher, naive)("abc")["input_ids"] != _remapped(teacher, naive, "abc")  # ▁ <unk> bc
    vmap = vocab_map_from_corpus([docs], teacher, char_fallback=False)
    assert 7 in vmap.student_to_teacher and 11 not in vmap.student_to_teacher
    trimmed = trim_tokenizer(teacher, vmap)
    for text in corpus:
        assert trimmed(text)["input_ids"] == _remapped(teacher, vmap, text)
