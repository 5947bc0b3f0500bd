"""Tests for megadistill.data.masking: BERT-style dynamic masking, whole-word masking, MLM batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megadistill.data.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    MlmCollator,
    collate_mlm,
    mask_tokens,
    special_ids_table,
    word_start_table,
)
from megadistill.models.vocab import VocabMap

SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]  # ids 0..4
PAD, CLS, SEP, MASK, UNK = range(5)
N_PIECES = 200  # ids 5..204: even ids "▁w<i>" (word starts), odd ids "p<i>" (continuations)


def _specials_kwargs(with_mask: bool = True) -> dict:
    kwargs = dict(pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")
    if with_mask:
        kwargs["mask_token"] = "[MASK]"
    return kwargs


def _sentencepiece_like(with_mask: bool = True) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for i in range(len(SPECIALS), len(SPECIALS) + N_PIECES):
        vocab[f"▁w{i}" if i % 2 == 0 else f"p{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **_specials_kwargs(with_mask))


def _wordpiece() -> PreTrainedTokenizerFast:
    pieces = ["play", "##ing", "##ed", "the", "un", "##believ", "##able"]
    vocab = {token: i for i, token in enumerate(SPECIALS + pieces)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **_specials_kwargs())


@pytest.fixture(scope="module")
def sp_tokenizer():
    return _sentencepiece_like()


@pytest.fixture(scope="module")
def sp_tables(sp_tokenizer):
    return dict(mask_id=MASK, vocab_size=len(sp_tokenizer), special=special_ids_table(sp_tokenizer),
                word_start=word_start_table(sp_tokenizer))


def _random_batch(rows: int = 64, length: int = 512, seed: int = 0) -> torch.Tensor:
    """Random ordinary ids with [CLS] first and a [SEP] sprinkled in (about 1 in 50 tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(len(SPECIALS), len(SPECIALS) + N_PIECES, size=(rows, length))
    ids[rng.random((rows, length)) < 0.02] = SEP
    ids[:, 0] = CLS
    return torch.from_numpy(ids)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _words(ids: torch.Tensor, word_start: torch.Tensor, special: torch.Tensor, documents=None) -> list[list[int]]:
    """Reference word segmentation of one row, by a plain loop: lists of positions of maskable tokens."""
    words: list[list[int]] = []
    for t, token in enumerate(ids.tolist()):
        new_document = documents is not None and t > 0 and documents[t] != documents[t - 1]
        if special[token]:
            words.append([])
        elif word_start[token] or new_document or not words or not words[-1]:
            words.append([t])
        else:
            words[-1].append(t)
    return [w for w in words if w]


def test_token_level_statistics_and_labels(sp_tables):
    ids = _random_batch()
    masked, labels = mask_tokens(ids, config=MaskingConfig(), generator=_gen(0), **sp_tables)
    selected = labels != IGNORE_INDEX
    maskable = ~sp_tables["special"][ids]
    # Exactly round(0.15 * maskable tokens) per row.
    expected = torch.round(maskable.sum(1).double() * 0.15).long()
    assert torch.equal(selected.sum(1), expected)
    assert abs(selected.sum().item() / maskable.sum().item() - 0.15) < 0.002
    assert not (selected & ~maskable).any(), "special tokens must never be selected"
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    # 80 / 10 / 10 among selected tokens (about 4,900 of them: 3 sigma is about 0.017 for 80%).
    out = masked[selected]
    n = out.numel()
    is_mask = out == MASK
    unchanged = out == ids[selected]
    random = ~is_mask & ~unchanged
    assert abs(is_mask.sum().item() / n - 0.8) < 0.025
    assert abs(random.sum().item() / n - 0.1) < 0.02
    assert abs(unchanged.sum().item() / n - 0.1) < 0.02
    assert not sp_tables["special"][out[random]].any(), "random replacements must be non-special ids"


def test_dynamic_masking_is_reproducible_per_generator_state(sp_tables):
    ids = _random_batch(rows=8, length=128)
    config = MaskingConfig(whole_word=True)
    first = mask_tokens(ids, config=config, generator=_gen(7), **sp_tables)
    again = mask_tokens(ids, config=config, generator=_gen(7), **sp_tables)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    generator = _gen(7)
    one = mask_tokens(ids, config=config, generator=generator, **sp_tables)
    two = mask_tokens(ids, config=config, generator=generator, **sp_tables)  # advanced state: a fresh mask
    other_seed = mask_tokens(ids, config=config, generator=_gen(8), **sp_tables)
    assert not torch.equal(one[1], two[1])
    assert not torch.equal(one[1], other_seed[1])


def test_whole_word_masking_selects_entire_words_within_documents(sp_tables):
    ids = _random_batch(rows=32, length=256, seed=1)
    rng = np.random.default_rng(3)
    documents = torch.from_numpy(np.cumsum(rng.random(ids.shape) < 0.03, axis=1))
    masked, labels = mask_tokens(ids, config=MaskingConfig(whole_word=True), generator=_gen(1),
                                 document_ids=documents, **sp_tables)
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(masked[~selected], ids[~selected])
    special, word_start = sp_tables["special"], sp_tables["word_start"]
    assert not (selected & special[ids]).any()
    for row in range(ids.shape[0]):
        words = _words(ids[row], word_start, special, documents[row].tolist())
        for word in words:
            flags = selected[row, word]
            assert flags.all() or not flags.any(), f"word {word} of row {row} partly selected"
        target = round(0.15 * sum(len(w) for w in words))
        longest = max(len(w) for w in words)
        assert target <= selected[row].sum().item() <= target + longest - 1
    # Document boundaries really split words: a continuation piece opening a document is a word
    # of its own, so somewhere its selection differs from the token before it.
    continuation_at_boundary = torch.zeros_like(selected)
    continuation_at_boundary[:, 1:] = (documents[:, 1:] != documents[:, :-1]) & ~word_start[ids[:, 1:]] \
        & ~special[ids[:, :-1]] & ~special[ids[:, 1:]]
    rows, cols = torch.nonzero(continuation_at_boundary, as_tuple=True)
    assert rows.numel() > 50
    assert (selected[rows, cols] != selected[rows, cols - 1]).any()


def test_whole_word_masking_without_documents_keeps_runs_together(sp_tables):
    ids = _random_batch(rows=16, length=256, seed=2)
    _, labels = mask_tokens(ids, config=MaskingConfig(whole_word=True), generator=_gen(2), **sp_tables)
    selected = labels != IGNORE_INDEX
    for row in range(ids.shape[0]):
        for word in _words(ids[row], sp_tables["word_start"], sp_tables["special"]):
            assert selected[row, word].all() or not selected[row, word].any()
    assert any(len(w) > 1 for w in _words(ids[0], sp_tables["word_start"], sp_tables["special"]))


def test_attention_mask_positions_are_never_selected(sp_tables):
    ids = _random_batch(rows=4, length=64)
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[:, 40:] = False
    for whole_word in (False, True):
        _, labels = mask_tokens(ids, config=MaskingConfig(mask_prob=0.5, whole_word=whole_word),
                                generator=_gen(0), attention_mask=attention, **sp_tables)
        assert (labels[:, 40:] == IGNORE_INDEX).all()
        assert ((labels[:, :40] != IGNORE_INDEX).sum(1) > 0).all()


def test_word_start_tables():
    sp = _sentencepiece_like()
    table = word_start_table(sp)
    assert table.shape == (len(sp),) and table.dtype == torch.bool
    assert table[: len(SPECIALS)].all(), "special tokens start words"
    assert table[6].item() and not table[5].item() and not table[7].item()  # ▁w6 starts, p5 / p7 continue
    wp = _wordpiece()
    vocab = wp.get_vocab()
    starts = {piece for piece, i in vocab.items() if word_start_table(wp)[i]}
    assert starts == set(SPECIALS) | {"play", "the", "un"}
    special = special_ids_table(wp)
    assert special.tolist() == [True] * len(SPECIALS) + [False] * 7


def test_word_start_table_needs_a_word_marker():
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "[MASK]": 1, "Ġa": 2, "b": 3}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", mask_token="[MASK]")
    with pytest.raises(ValueError, match="word boundaries"):
        word_start_table(tokenizer)


def test_collator_without_vocab_map(sp_tokenizer):
    collator = MlmCollator.from_tokenizer(sp_tokenizer, MaskingConfig(whole_word=True))
    windows = [row.numpy().astype(np.uint16) for row in _random_batch(rows=4, length=32)]
    batch = collator(windows, _gen(0))
    assert set(batch) == {"teacher_input_ids", "input_ids", "labels", "mlm_mask", "dropped_tokens"}
    assert batch["input_ids"].dtype == torch.int64 and batch["mlm_mask"].dtype == torch.bool
    assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
    assert torch.equal(batch["mlm_mask"], batch["labels"] != IGNORE_INDEX)
    original = torch.from_numpy(np.stack(windows).astype(np.int64))
    assert torch.equal(batch["labels"][batch["mlm_mask"]], original[batch["mlm_mask"]])
    one_off = collate_mlm(windows, tokenizer=sp_tokenizer, config=MaskingConfig(whole_word=True), generator=_gen(0))
    assert all(torch.equal(one_off[key], batch[key]) for key in batch)
    with pytest.raises(ValueError, match="one length"):
        collator([np.arange(5, 9), np.arange(5, 10)], _gen(0))


def test_collator_with_vocab_map(sp_tokenizer):
    vocab_size = len(sp_tokenizer)
    kept = [i for i in range(vocab_size) if i < len(SPECIALS) or i % 3 != 0]  # drop every third ordinary id
    vmap = VocabMap.from_token_ids(kept, vocab_size, unk_teacher_id=UNK)
    collator = MlmCollator.from_tokenizer(sp_tokenizer, MaskingConfig(mask_prob=0.3), vocab_map=vmap)
    original = _random_batch(rows=16, length=128, seed=5)
    batch = collator(list(original.numpy()), _gen(3))
    teacher, selected = batch["teacher_input_ids"], batch["mlm_mask"]
    student, _ = vmap.remap(teacher)
    assert torch.equal(batch["input_ids"], student)
    assert torch.equal(teacher[~selected], original[~selected])
    assert torch.equal(batch["input_ids"][teacher == MASK], torch.full_like(student[teacher == MASK],
                                                                           int(vmap.teacher_to_student[MASK])))
    labels = batch["labels"]
    was_dropped = torch.from_numpy(vmap.teacher_to_student < 0)[original]
    assert torch.equal(labels[selected & ~was_dropped], vmap.remap(original[selected & ~was_dropped])[0])
    assert (labels[~selected | was_dropped] == IGNORE_INDEX).all()
    assert batch["dropped_tokens"].item() == (selected & was_dropped).sum().item() > 0
    # Random replacements are kept ids, so teacher and student see the same replacement token.
    random = selected & (teacher != MASK) & (teacher != original)
    assert random.any() and not torch.from_numpy(vmap.teacher_to_student < 0)[teacher[random]].any()


def test_vocab_map_dropping_the_mask_token_is_rejected(sp_tokenizer):
    vocab_size = len(sp_tokenizer)
    vmap = VocabMap.from_token_ids([i for i in range(vocab_size) if i != MASK], vocab_size, unk_teacher_id=UNK)
    with pytest.raises(ValueError, match="mask token"):
        MlmCollator.from_tokenizer(sp_tokenizer, vocab_map=vmap)


def test_tokenizer_without_mask_token_is_rejected():
    with pytest.raises(ValueError, match="mask_token"):
        MlmCollator.from_tokenizer(_sentencepiece_like(with_mask=False))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(mask_prob=1.5), "mask_prob"),
        (dict(replace_mask=-0.1), "replace_mask"),
        (dict(replace_random=2.0), "replace_random"),
        (dict(replace_mask=0.7, replace_random=0.4), "replace_random"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MaskingConfig(**kwargs).validate()


def test_mask_tokens_input_errors(sp_tables):
    ids = _random_batch(rows=2, length=16)
    with pytest.raises(ValueError, match="word_start"):
        mask_tokens(ids, config=MaskingConfig(whole_word=True), generator=_gen(0),
                    **dict(sp_tables, word_start=None))
    with pytest.raises(ValueError, match="int64"):
        mask_tokens(ids.int(), config=MaskingConfig(), generator=_gen(0), **sp_tables)
    with pytest.raises(ValueError, match=r"\[0, 205\)"):
        mask_tokens(ids + 1000, config=MaskingConfig(), generator=_gen(0), **sp_tables)
    with pytest.raises(ValueError, match="document_ids"):
        mask_tokens(ids, config=MaskingConfig(), generator=_gen(0), document_ids=ids[:, :3], **sp_tables)


def test_zero_mask_prob_selects_nothing(sp_tables):
    ids = _random_batch(rows=2, length=16)
    masked, labels = mask_tokens(ids, config=MaskingConfig(mask_prob=0.0), generator=_gen(0), **sp_tables)
    assert torch.equal(masked, ids) and (labels == IGNORE_INDEX).all()
