"""Tests of megadistill.models.embedding_init: hand-made tokenizers with a known teacher table, and a tiny Gemma 3."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers
from transformers import PreTrainedTokenizerFast

from megadistill.models.embedding_init import apply_embeddings, init_embeddings

H = 32
TEACHER_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "b", "c", "▁ab", "<0xE0>", "x", "नमस्ते"]
# Student id -> piece, and the teacher ids its row must come from (worked out by hand from TEACHER_PIECES).
STUDENT = [
    ("<s>", [2]),  # bos by role -> teacher <bos>
    ("</s>", [1]),  # eos by role
    ("[PAD]", [0]),  # pad by role (its name is not in the teacher vocab)
    ("[UNK]", [3]),  # unk by role
    ("▁ab", [8]),  # exact piece
    ("abc", [5, 6, 7]),  # teacher: a + b + c
    ("▁abc", [8, 7]),  # teacher: ▁ab + c
    ("<0xE0>", [9]),  # exact byte piece
    ("<0x78>", [10]),  # byte piece the teacher lacks: its text "x"
    ("<0xC3>", None),  # lone non-ASCII byte: no text -> fallback
    ("zz", None),  # teacher gives only <unk> -> fallback
    ("▁", [4]),  # exact
]


def teacher_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """Unigram teacher: equal scores, so the fewest pieces win (``▁abc`` -> ``▁ab`` + ``c``); unknown text -> <unk>."""
    vocab = [(piece, 0.0 if i < 4 else -1.0) for i, piece in enumerate(TEACHER_PIECES)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in TEACHER_PIECES[:4]])
    specials = dict(eos_token="<eos>", pad_token="<pad>", unk_token="<unk>") | ({"bos_token": "<bos>"} if bos else {})
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def student_tokenizer() -> PreTrainedTokenizerFast:
    """WordLevel student whose special tokens are named otherwise than the teacher's."""
    backend = Tokenizer(models.WordLevel({piece: i for i, (piece, _) in enumerate(STUDENT)}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="[PAD]",
                                   unk_token="[UNK]")


@pytest.fixture
def table() -> torch.Tensor:
    """Teacher table [12 + 3, H]: 12 token rows, then 3 padding rows that must never be used."""
    rows = torch.randn(len(TEACHER_PIECES), H, generator=torch.Generator().manual_seed(1)) * 0.5
    return torch.cat([rows, torch.full((3, H), 100.0)])


def test_mean_rows_are_the_expected_teacher_rows(table):
    result = init_embeddings(student_tokenizer(), teacher_tokenizer(), table, method="mean")
    assert result.weight.shape == (len(STUDENT), H) and result.weight.dtype == torch.float32
    fallback = table[:len(TEACHER_PIECES)].mean(dim=0)  # padding rows excluded
    for i, (piece, ids) in enumerate(STUDENT):
        expected = fallback if ids is None else table[ids].mean(dim=0)
        torch.testing.assert_close(result.weight[i], expected, msg=f"row {i} {piece!r}")
    assert (result.specials, result.exact, result.averaged, result.fallback) == (4, 3, 3, 2)
    assert result.fallback_pieces == ["<0xC3>", "zz"]


def test_mean_accepts_a_bf16_table(table):
    result = init_embeddings(student_tokenizer(), teacher_tokenizer(), table.to(torch.bfloat16))
    assert result.weight.dtype == torch.float32
    torch.testing.assert_close(result.weight[4], table[8].to(torch.bfloat16).float())


def test_random_is_seeded_with_the_teacher_std(table):
    student, teacher = student_tokenizer(), teacher_tokenizer()
    first = init_embeddings(student, teacher, table, method="random", seed=7)
    again = init_embeddings(student, teacher, table, method="random", seed=7)
    other = init_embeddings(student, teacher, table, method="random", seed=8)
    assert torch.equal(first.weight, again.weight) and not torch.equal(first.weight, other.weight)
    assert first.weight.shape == (len(STUDENT), H) and first.random == len(STUDENT)
    teacher_std = table[:len(TEACHER_PIECES)].std().item()  # about 0.5; the padding rows would make it ~40
    assert abs(first.weight.std().item() - teacher_std) < 0.1 * teacher_std
    assert abs(first.weight.mean().item()) < 0.1


def test_bad_inputs_raise(table):
    student, teacher = student_tokenizer(), teacher_tokenizer()
    with pytest.raises(ValueError, match="width 32 does not match the student hidden_size 16"):
        init_embeddings(student, teacher, table, hidden_size=16)
    with pytest.raises(ValueError, match="has 5 rows but the teacher tokenizer has 12 ids"):
        init_embeddings(student, teacher, table[:5])
    with pytest.raises(ValueError, match="2-D floating tensor"):
        init_embeddings(student, teacher, table[0])
    with pytest.raises(ValueError, match="method must be one of"):
        init_embeddings(student, teacher, table, method="focus")
    with pytest.raises(ValueError, match="student tokenizer has a bos token .* teacher tokenizer has none"):
        init_embeddings(student, teacher_tokenizer(bos=False), table)


def tiny_gemma(**overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=300, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                              sliding_window=16, **overrides)
    return Gemma3ForCausalLM(config)


def test_apply_embeddings_resizes_a_tied_gemma3(table):
    model, student = tiny_gemma(), student_tokenizer()
    weight = init_embeddings(student, teacher_tokenizer(), table).weight
    apply_embeddings(model, weight, student)
    inputs, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inputs.shape == (len(STUDENT), H) and torch.equal(inputs, weight)
    assert head.data_ptr() == inputs.data_ptr()  # still one tensor: tied
    assert model.config.vocab_size == len(STUDENT)
    ids = (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id, model.config.unk_token_id)
    assert ids == (0, 1, 2, 3)  # the student's, not Gemma's (2, 1, 0)
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (0, 1)
    logits = model(torch.tensor([[0, 4, 5, 11]])).logits
    assert logits.shape == (1, 4, len(STUDENT))


def test_apply_embeddings_fills_an_untied_head_and_checks_shapes(table):
    model, student = tiny_gemma(tie_word_embeddings=False), student_tokenizer()
    weight, head_rows = torch.randn(len(STUDENT), H), torch.randn(len(STUDENT), H)
    apply_embeddings(model, weight, student, output_weight=head_rows)
    assert torch.equal(model.get_input_embeddings().weight, weight)
    assert torch.equal(model.get_output_embeddings().weight, head_rows)
    with pytest.raises(ValueError, match=r"weight has shape \(12, 16\) but the model needs \[Vs, 32\]"):
        apply_embeddings(model, torch.zeros(len(STUDENT), 16), student)
    with pytest.raises(ValueError, match="weight has 5 rows but the tokenizer has 12 ids"):
        apply_embeddings(model, torch.zeros(5, H), student)
