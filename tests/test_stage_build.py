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


# ------------------------------------------------------------------ model paths, GGUF tokenizers, cache file modes


def test_hub_id_or_typo_fails_in_one_line_without_the_hub(tmp_path):
    from megadistill.models import teacher as teacher_lib

    for spec, hint in (("hf:google/gemma-3-270m", " (hf: names datasets for tools/binarize.py, not models)"),
                       ("google/gemma-3-270m", "")):
        for load in (teacher_lib.load_tokenizer, teacher_lib.load_teacher, teacher_lib.resolve_teacher):
            with pytest.raises(FileNotFoundError) as err:
                load(spec, cache_dir=tmp_path)
            assert str(err.value).startswith(f"teacher path {spec} is not a local directory or file{hint}: pass a "
                                             "directory saved with save_pretrained (Hub ids are never downloaded")
            assert "\n" not in str(err.value)


def test_model_directory_without_tokenizer_fails_before_the_weights(tmp_path):
    from megadistill.models import teacher as teacher_lib

    tiny_teacher().save_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"model has no tokenizer files \(tokenizer.json, tokenizer_config.json"):
        teacher_lib.load_teacher(tmp_path / "model")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_tokenizer):
    """A ``.gguf`` file whose tokenizer (read through ``gguf_file=``) is ``tiny_tokenizer``; returns the reads."""
    from megadistill.models import teacher as teacher_lib

    real, reads = teacher_lib.AutoTokenizer, []

    class GgufAutoTokenizer:
        @staticmethod
        def from_pretrained(path, gguf_file=None, **kwargs):
            if gguf_file is None:
                return real.from_pretrained(path, **kwargs)
            reads.append(gguf_file)
            return tiny_tokenizer

    monkeypatch.setattr(teacher_lib, "AutoTokenizer", GgufAutoTokenizer)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not really a gguf")
    return gguf, reads


def _convert_tiny(gguf_path, out_dir):
    """What _convert_gguf leaves, for a tiny model: save_pretrained weights (mode 0600) + the GGUF's tokenizer."""
    from megadistill.models import teacher as teacher_lib

    tiny_teacher().save_pretrained(out_dir)
    if not (out_dir / "tokenizer_config.json").is_file():  # as _convert_gguf: a tokenizer copied from the cache stays
        teacher_lib.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out_dir)


def test_gguf_tokenizer_loads_without_converting_the_weights(fake_gguf, tmp_path, monkeypatch, tiny_tokenizer):
    from megadistill.data.indexed import tokenizer_sha256
    from megadistill.models import teacher as teacher_lib

    gguf, reads = fake_gguf
    monkeypatch.setattr(teacher_lib, "_convert_gguf", lambda *a: pytest.fail("weights converted for a tokenizer"))
    cache = tmp_path / "cache"
    first = teacher_lib.load_tokenizer(gguf, cache_dir=cache)
    assert teacher_lib.load_tokenizer(gguf, cache_dir=cache).backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    assert len(reads) == 1 and [p.name for p in (cache / "tokenizers").iterdir()] == [teacher_lib._sha256_file(gguf)[:16]]
    assert not (cache / "teachers").exists()
    # Once the weights are converted, the teacher's own tokenizer is used: the same hash as before.
    monkeypatch.setattr(teacher_lib, "_convert_gguf", _convert_tiny)
    teacher_dir = teacher_lib.resolve_teacher(gguf, cache_dir=cache)
    assert len(reads) == 1  # the conversion took the cached tokenizer instead of reading the GGUF again
    again = teacher_lib.load_tokenizer(gguf, cache_dir=cache)
    assert again.name_or_path == str(teacher_dir)
    assert tokenizer_sha256(again) == tokenizer_sha256(first)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_cached_teacher_and_tokenizer_files_follow_the_umask(fake_gguf, tmp_path, monkeypatch, umask):
    import os
    import stat

    from megadistill.models import teacher as teacher_lib

    gguf, _ = fake_gguf
    monkeypatch.setattr(teacher_lib, "_convert_gguf", _convert_tiny)
    old = os.umask(umask)
    try:
        teacher_lib.load_tokenizer(gguf, cache_dir=tmp_path / "cache")
        teacher_lib.resolve_teacher(gguf, cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    for kind in ("teachers", "tokenizers"):
        folder = next((tmp_path / "cache" / kind).iterdir())
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, kind
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes and set(modes.values()) == {0o666 & ~umask}, (kind, modes)
    assert "model.safetensors" in {p.name for p in (tmp_path / "cache" / "teachers").rglob("*")}


def test_teacher_cache_shards_are_readable_by_others(tmp_path):
    import os
    import stat

    import numpy as np

    from megadistill.teacher_cache import write_shard

    old = os.umask(0o022)
    try:
        write_shard(tmp_path / "cache", 0, {"entries": np.zeros((2, 3), np.uint32), "tail": np.zeros(2, np.float16)})
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "cache").iterdir()} == {0o644}
