"""Shared stage builders: the student of ``student.init: checkpoint`` and the no-teacher loss."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megadistill.config import LossConfig, StudentConfig
from megadistill.models.vocab import VocabMap
from megadistill.stages.build import build_student, stage_loss


def tiny_teacher() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, bos_token_id=2, eos_token_id=1, pad_token_id=0, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


def test_checkpoint_student_loads_weights_tokenizer_and_vocab_map(tmp_path, tiny_tokenizer):
    teacher = tiny_teacher()
    saved = LlamaForCausalLM(teacher.config)
    saved.save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    vocab_map = VocabMap(list(range(0, 40, 2)), 40)
    vocab_map.save(tmp_path / "student" / "vocab_map.json")
    cfg = StudentConfig(init="checkpoint", checkpoint=str(tmp_path / "student"))
    parts = build_student(cfg, 0, teacher, tiny_tokenizer, [], teacher_vocab=40)
    for (name, a), b in zip(saved.state_dict().items(), parts.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert parts.model.training and all(p.requires_grad for p in parts.model.parameters())
    assert parts.vocab_map == vocab_map and parts.layer_map == []
    # KD compares with the teacher rows of the checkpoint's ids, in student-id order.
    torch.testing.assert_close(parts.teacher_head, teacher.lm_head.weight.detach()[0:40:2])
    assert len(parts.tokenizer) == len(tiny_tokenizer)


def test_checkpoint_student_without_config_is_a_clear_error(tmp_path, tiny_tokenizer):
    cfg = StudentConfig(init="checkpoint", checkpoint=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="student.checkpoint .* has no config.json"):
        build_student(cfg, 0, tiny_teacher(), tiny_tokenizer, [], teacher_vocab=40)


def test_no_teacher_loss_is_plain_ce():
    loss = LossConfig(ce_weight=0.5, kd_weight=0.5, kd_weight_end=1.0, temperature=2.0)
    none = stage_loss(loss, "none")
    assert (none.ce_weight, none.kd_weight, none.kd_weight_end) == (1.0, 0.0, None)
    assert stage_loss(loss, "online") is loss
