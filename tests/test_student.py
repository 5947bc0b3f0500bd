"""Tests for megadistill.models.student: layer maps and students built from tiny teachers."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from megadistill.models.student import (
    build_student_from_teacher,
    describe_parameters,
    parse_layer_map,
    uniform_layer_map,
)
from megadistill.models.vocab import VocabMap

VOCAB = 300
SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = [SLIDING, FULL, SLIDING, SLIDING, FULL, FULL]


def tiny_gemma3() -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, sliding_window=4, layer_types=LAYER_TYPES, max_position_embeddings=128,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return _randomized(Gemma3ForCausalLM(config))


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=[1, 5], pad_token_id=0,
    )
    return _randomized(LlamaForCausalLM(config))


def tiny_qwen2():
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=4, max_window_layers=2, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return _randomized(Qwen2ForCausalLM(config))


def _randomized(model):
    """Random weights everywhere (norms included) so that every layer is distinguishable."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    model.eval().requires_grad_(False)
    return model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def trim_map() -> VocabMap:
    return VocabMap.from_token_ids(range(10, VOCAB, 2), VOCAB, always_keep=[0, 1, 2, 3, 5], unk_teacher_id=3)


def test_uniform_layer_map():
    assert uniform_layer_map(18, 6) == [0, 3, 7, 10, 14, 17]
    assert uniform_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]
    assert uniform_layer_map(4, 4) == [0, 1, 2, 3]
    assert uniform_layer_map(5, 2) == [0, 4]
    assert uniform_layer_map(7, 1) == [6]
    for teacher in range(1, 30):
        for student in range(1, teacher + 1):
            layers = uniform_layer_map(teacher, student)
            assert len(layers) == student and layers[-1] == teacher - 1
            assert all(b > a for a, b in zip(layers, layers[1:]))
            assert student == 1 or layers[0] == 0
    for bad in (0, 5):
        with pytest.raises(ValueError, match="between 1 and 4"):
            uniform_layer_map(4, bad)


def test_parse_layer_map():
    assert parse_layer_map(6, 18) == uniform_layer_map(18, 6)
    assert parse_layer_map("6", 18) == uniform_layer_map(18, 6)
    assert parse_layer_map("every:3", 18) == [2, 5, 8, 11, 14, 17]
    assert parse_layer_map("every:2", 5) == [0, 2, 4]
    assert parse_layer_map("every:1", 3) == [0, 1, 2]
    assert parse_layer_map([0, 4, 17], 18) == [0, 4, 17]
    assert parse_layer_map("0, 4,17", 18) == [0, 4, 17]
    bad_specs = [
        ([], "non-empty"), ([0, 18], "outside"), ([-1, 3], "outside"), ([3, 3], "strictly"), ([4, 2], "strictly"),
        ("every:0", "k must be"), ("every:x", "not an int"), ("two", "not an int"), ([0, 1.5], "list of ints"),
        (True, "an int, .every:k. or a list"),
    ]
    for bad, message in bad_specs:
        with pytest.raises(ValueError, match=message):
            parse_layer_map(bad, 18)


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("trim", [False, True])
def test_student_copies_mapped_teacher_layers(build, trim):
    teacher = build()
    before = _snapshot(teacher)
    layer_map = [0, 2, teacher.config.num_hidden_layers - 1]
    vmap = trim_map() if trim else None
    student = build_student_from_teacher(teacher, layer_map, vmap)

    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == len(student.model.layers) == 3
    assert student.config.vocab_size == (len(vmap) if trim else VOCAB)
    if getattr(teacher.config, "layer_types", None) is not None:
        assert student.config.layer_types == [teacher.config.layer_types[i] for i in layer_map]
    for j, i in enumerate(layer_map):
        t_params = dict(teacher.model.layers[i].named_parameters())
        for name, p in student.model.layers[j].named_parameters():
            assert torch.equal(p, t_params[name]), (j, name)
    t_embed = teacher.get_input_embeddings().weight
    expected_embed = vmap.restrict_rows(t_embed) if trim else t_embed
    assert torch.equal(student.get_input_embeddings().weight, expected_embed)
    t_head = teacher.get_output_embeddings().weight
    assert torch.equal(student.get_output_embeddings().weight, vmap.restrict_rows(t_head) if trim else t_head)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)

    tied = teacher.config.tie_word_embeddings
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tied
    assert student.training and all(p.requires_grad for p in student.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert len(teacher.model.layers) == teacher.config.num_hidden_layers == layer_map[-1] + 1
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(s.data_ptr() != t.data_ptr() for s in student.parameters() for t in teacher.parameters())


def test_student_forward_and_save_reload(tmp_path):
    student = build_student_from_teacher(tiny_gemma3(), [1, 5], trim_map())
    ids = torch.randint(0, len(trim_map()), (2, 9))
    logits = student(ids).logits
    assert logits.shape == (2, 9, len(trim_map()))
    logits.sum().backward()
    assert student.get_input_embeddings().weight.grad is not None
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.layer_types == [LAYER_TYPES[1], LAYER_TYPES[5]]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_llama, tiny_qwen2])
def test_identity_map_student_matches_teacher_on_kept_ids(build):
    teacher = build()
    vmap = trim_map()
    student = build_student_from_teacher(teacher, list(range(teacher.config.num_hidden_layers)), vmap).eval()
    teacher_ids = vmap.student_to_teacher[torch.randint(0, len(vmap), (2, 11))]
    teacher_ids = torch.as_tensor(teacher_ids)
    student_ids, dropped = vmap.remap(teacher_ids)
    assert not dropped.any()
    with torch.no_grad():
        expected = teacher(teacher_ids).logits[..., vmap.student_to_teacher]
        torch.testing.assert_close(student(student_ids).logits, expected)


def test_special_ids_remapped():
    vmap = trim_map()
    llama = build_student_from_teacher(tiny_llama(), [0, 4], vmap)
    assert (llama.config.bos_token_id, llama.config.eos_token_id, llama.config.pad_token_id) == (2, [1, 4], 0)
    assert llama.generation_config.eos_token_id == [1, 4]
    gemma = build_student_from_teacher(tiny_gemma3(), [0, 5], VocabMap([0, 1, 2, 3, 7], VOCAB, unk_teacher_id=3))
    assert (gemma.config.bos_token_id, gemma.config.eos_token_id, gemma.config.pad_token_id) == (2, 1, 0)
    without_bos = VocabMap([0, 1, 3, 7], VOCAB, unk_teacher_id=3)
    with pytest.raises(ValueError, match="bos_token_id"):
        build_student_from_teacher(tiny_gemma3(), [0, 5], without_bos)


def test_student_rejects_bad_inputs():
    teacher = tiny_llama()
    with pytest.raises(ValueError, match="strictly increasing"):
        build_student_from_teacher(teacher, [2, 1])
    with pytest.raises(ValueError, match="outside"):
        build_student_from_teacher(teacher, [0, 5])
    with pytest.raises(ValueError, match="rows"):
        build_student_from_teacher(teacher, [0], VocabMap([0, 1, 2, 3, 5], VOCAB + 10, unk_teacher_id=3))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="model.layers"):
        build_student_from_teacher(gpt2, [0])


def test_describe_parameters():
    teacher = tiny_gemma3()
    student = build_student_from_teacher(teacher, [0, 5], trim_map())
    info = describe_parameters(teacher, student)
    assert info["student"]["embedding"] == len(trim_map()) * 64
    assert info["teacher"]["embedding"] == VOCAB * 64
    ratio = info["student"]["non_embedding"] / info["teacher"]["non_embedding"]
    assert info["non_embedding_ratio"] == pytest.approx(ratio)
    assert 0 < info["total_ratio"] < 1


# ---- encoders (BERT / RoBERTa / XLM-R / DistilBERT masked LMs) ----

ENCODER_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def tiny_encoder(family: str, **overrides):
    """A 6-layer masked LM with random weights (pad 0 for BERT/DistilBERT, <s> 0 <pad> 1 </s> 2 for RoBERTa/XLM-R)."""
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, RobertaConfig,
                              RobertaForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM)

    roberta_ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2)
    build = {
        "bert": lambda: BertForMaskedLM(BertConfig(**{**ENCODER_COMMON, **overrides})),
        "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**{**ENCODER_COMMON, **roberta_ids, **overrides})),
        "xlmr": lambda: XLMRobertaForMaskedLM(XLMRobertaConfig(**{**ENCODER_COMMON, **roberta_ids, **overrides})),
        "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(**{
            **dict(vocab_size=VOCAB, dim=32, n_layers=6, n_heads=2, hidden_dim=64, max_position_embeddings=64),
            **overrides})),
    }[family]
    return _randomized(build())


ENCODERS = ["bert", "roberta", "xlmr", "distilbert"]


def _encoder_map() -> VocabMap:
    return VocabMap.from_token_ids(range(10, VOCAB, 3), VOCAB, always_keep=[0, 1, 2, 3, 4], unk_teacher_id=3)


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("trim", [False, True])
def test_encoder_student_copies_mapped_teacher_layers(family, trim):
    from megadistill.models.adapters import adapter_for

    teacher = _randomized(tiny_encoder(family, tie_word_embeddings=False)) if family == "bert" else tiny_encoder(family)
    before = _snapshot(teacher)
    adapter = adapter_for(teacher)
    layer_map = parse_layer_map("every:2", 6)  # DistilBERT's one layer out of two: [1, 3, 5]
    vmap = _encoder_map() if trim else None
    student = build_student_from_teacher(teacher, layer_map, vmap)

    assert type(student) is type(teacher) and adapter_for(student) is adapter
    assert getattr(student.config, adapter.depth_field) == len(adapter.layers(student)) == 3
    for j, i in enumerate(layer_map):
        t_params = dict(adapter.layers(teacher)[i].named_parameters())
        for name, p in adapter.layers(student)[j].named_parameters():
            assert torch.equal(p, t_params[name]), (j, name)
    rows = (lambda t: vmap.restrict_rows(t)) if trim else (lambda t: t)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    vocab_keys = {n for n, p in teacher.named_parameters(remove_duplicate=False)
                  if any(p is v for v in adapter.vocab_parameters(teacher))}
    assert len(vocab_keys) >= 3
    for key, tensor in s_state.items():
        if not key.startswith(adapter.layers_prefix):
            expected = rows(t_state[key]) if key in vocab_keys else t_state[key]
            assert torch.equal(tensor, expected), key
    assert torch.equal(adapter.output_bias(student), rows(adapter.output_bias(teacher)))
    assert student.config.vocab_size == (len(vmap) if trim else VOCAB)
    assert student.training and all(p.requires_grad for p in student.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(s.data_ptr() != t.data_ptr() for s in student.parameters() for t in teacher.parameters())


@pytest.mark.parametrize("family", ENCODERS)
def test_full_encoder_student_reproduces_the_teacher(family):
    """All layers, no trim: the same logits; all layers, trimmed: the teacher's logits on the kept ids."""
    from megadistill.models.adapters import adapter_for

    teacher = tiny_encoder(family)
    adapter = adapter_for(teacher)
    vmap = _encoder_map()
    teacher_ids = torch.as_tensor(vmap.student_to_teacher[torch.randint(3, len(vmap), (2, 13))])
    doc_ids = torch.tensor([[0] * 5 + [1] * 8, [0] * 13])
    whole = build_student_from_teacher(teacher, list(range(6))).eval()
    trimmed = build_student_from_teacher(teacher, list(range(6)), vmap).eval()
    student_ids, dropped = vmap.remap(teacher_ids)
    assert not dropped.any()
    with torch.no_grad():
        expected = teacher(teacher_ids).logits
        torch.testing.assert_close(whole(teacher_ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(trimmed(student_ids).logits, expected[..., vmap.student_to_teacher])
        t_hidden = adapter.final_hidden_states(teacher, teacher_ids, document_ids=doc_ids)
        s_hidden = adapter.final_hidden_states(trimmed, student_ids, document_ids=doc_ids)
    torch.testing.assert_close(s_hidden, t_hidden)
    chunk_logits = s_hidden @ adapter.output_weight(trimmed).T + adapter.output_bias(trimmed)
    teacher_logits = t_hidden @ adapter.output_weight(teacher).T + adapter.output_bias(teacher)
    torch.testing.assert_close(chunk_logits, teacher_logits[..., vmap.student_to_teacher])


def test_encoder_special_ids_remapped_and_roberta_pad_must_not_move():
    vmap = VocabMap.from_token_ids([0, 1, 2, 3, 40, 77], VOCAB, unk_teacher_id=3)
    bert = build_student_from_teacher(tiny_encoder("bert", pad_token_id=40), [0, 5], vmap)
    assert bert.config.pad_token_id == 4 and bert.bert.embeddings.word_embeddings.padding_idx == 4
    xlmr = build_student_from_teacher(tiny_encoder("xlmr"), [0, 5], vmap)
    assert (xlmr.config.bos_token_id, xlmr.config.pad_token_id, xlmr.config.eos_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="pad_token_id"):
        build_student_from_teacher(tiny_encoder("xlmr"), [0], VocabMap([0, 2, 3], VOCAB, unk_teacher_id=3))
    moved = VocabMap([1, 2, 3, 40], VOCAB, unk_teacher_id=3)  # pad 1 -> 0 would shift RoBERTa's position rows
    with pytest.raises(ValueError, match="position"):
        build_student_from_teacher(tiny_encoder("roberta", bos_token_id=None), [0], moved)


@pytest.mark.parametrize("family", ["bert", "distilbert", "gemma3"])
def test_random_student_is_seeded_fresh_and_shaped_like_the_template(family):
    from megadistill.models.student import build_random_student

    teacher = tiny_gemma3() if family == "gemma3" else tiny_encoder(family)
    layer_map = [1, 4] if family == "gemma3" else [0, 5]
    vmap = trim_map() if family == "gemma3" else _encoder_map()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_random_student(teacher, seed=7, layer_map=layer_map, vocab_map=vmap)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    b = build_random_student(teacher, seed=7, layer_map=layer_map, vocab_map=vmap)
    c = build_random_student(teacher.config, seed=8, layer_map=layer_map, vocab_map=vmap)
    assert type(a) is type(b) is type(c) is type(teacher)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)
    assert a.get_input_embeddings().weight.shape[0] == len(vmap) == a.config.vocab_size
    copied = build_student_from_teacher(teacher, layer_map, vmap)
    assert a.state_dict().keys() == copied.state_dict().keys()
    assert not torch.equal(a.get_input_embeddings().weight, copied.get_input_embeddings().weight)
    if family == "gemma3":
        assert a.config.layer_types == [LAYER_TYPES[1], LAYER_TYPES[4]]
    assert a.training and all(p.requires_grad for p in a.parameters())
