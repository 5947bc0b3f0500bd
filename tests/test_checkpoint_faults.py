"""Checkpoints and exports are complete or absent: commit order, keep-last-N, leftovers, full disks.

The 2-rank runs killed mid-save and filled during checkpointing are in tests/test_train_e2e.py;
these tests exercise the same functions in one process, without DeepSpeed engines.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import small_tmpfs
from megadistill import checkpoint
from megadistill.checkpoint import CheckpointError, complete_checkpoints, export_hf, is_disk_full


def fake_checkpoint(path: Path, payload: bytes = b"x" * 100) -> Path:
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(payload)
    return path


def test_commit_renames_then_moves_latest_then_prunes(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (1, 2):
        fake_checkpoint(ckpts / checkpoint.tag_of(step))
    (ckpts / "latest").write_text("step_0000002")
    partial = fake_checkpoint(ckpts / ".partial.step_0000003", b"new")
    checkpoint._commit(ckpts, partial, "step_0000003", keep=2)
    assert (ckpts / "latest").read_text() == "step_0000003"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_0000002", "step_0000003"]
    assert (ckpts / "step_0000003" / "mp_rank_00_model_states.pt").read_bytes() == b"new"
    assert not partial.exists()


def test_commit_replaces_a_folder_left_by_a_kill_before_latest_moved(tmp_path):
    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts / "step_0000001")
    fake_checkpoint(ckpts / "step_0000002", b"stale")  # renamed, but killed before `latest` named it
    (ckpts / "latest").write_text("step_0000001")
    checkpoint._commit(ckpts, fake_checkpoint(ckpts / ".partial.step_0000002", b"fresh"), "step_0000002", keep=1)
    assert (ckpts / "step_0000002" / "mp_rank_00_model_states.pt").read_bytes() == b"fresh"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_0000002"]


def test_resume_removes_partial_saves_and_refuses_a_dangling_latest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts / ".partial.step_0000004")
    assert checkpoint.resume(object(), ckpts) is None, "no latest: a fresh run"
    assert not (ckpts / ".partial.step_0000004").exists()
    fake_checkpoint(ckpts / "step_0000002")
    (ckpts / "latest").write_text("step_0000003")
    with pytest.raises(ValueError, match=r"step_0000003 .* does not exist: point latest at an existing step_\* folder \(step_0000002\)"):
        checkpoint.resume(object(), ckpts)


def test_disk_full_is_recognized_without_an_errno():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), free_bytes=10**9)
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert is_disk_full(wrapped, free_bytes=10**9)
    torch_style = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2432 vs 2324")
    assert is_disk_full(torch_style, free_bytes=4096) and not is_disk_full(torch_style, free_bytes=10**9)
    assert not is_disk_full(ValueError("bad value"), free_bytes=10**9)


class TinyTokenizer:
    """Stands in for a tokenizer: ``save_pretrained`` writes one small file."""

    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")


def tiny_model(layers: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=layers, n_head=2, n_positions=64))


def test_export_on_a_full_disk_keeps_the_previous_export(tmp_path, monkeypatch):
    small, big = tiny_model(1), tiny_model(4)
    need = sum(p.numel() * 4 for p in small.parameters())
    with small_tmpfs(tmp_path / "disk", int(1.6 * need)) as mounted:
        out = tmp_path / "disk" / "hf"
        export_hf(small, TinyTokenizer(), out, {"megadistill.json": {"stage": "pretrain"}})
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        if not mounted:  # no tmpfs without root: the same failure, injected
            def full_disk(self, path, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", full_disk)
        with pytest.raises(CheckpointError) as caught:
            export_hf(big, TinyTokenizer(), out)
        message = str(caught.value)
        assert "disk full" in message and "need about" in message and "\n" not in message
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the previous export must stay intact"
        assert sorted(p.name for p in out.parent.iterdir()) == ["hf"], "no temporary folder may remain"
