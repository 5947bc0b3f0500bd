"""Checkpoints that resume exactly (DeepSpeed ZeRO shards + loop state) and the Hugging Face export.

A checkpoint is complete or absent. ``save`` has DeepSpeed write into a hidden
``checkpoints/.partial.step_XXXXXXX/``; once every rank has written its shard, rank 0 fsyncs it,
renames it to ``checkpoints/step_XXXXXXX/`` and only then replaces ``checkpoints/latest``
(atomically, fsynced), so a process killed at any moment (SIGKILL mid-save included) leaves
``latest`` naming a whole checkpoint. Older ``step_*`` folders beyond ``keep`` are deleted after
``latest`` has moved on; leftover partial folders are removed by the next save or resume.

What a resume needs besides the engine (model, optimizer, LR scheduler: DeepSpeed's files) is the
loop state (optimizer steps, consumed samples, skipped steps): the sampler position, the masked-LM
masks (seeded by sample index), the teacher-cache read position (by window id) and the dropout
RNG (seeded by step, :func:`megadistill.loop.step_seed`) are all functions of it, so no RNG state
is saved and a resumed run repeats the uninterrupted run's losses bitwise on CPU.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import deepspeed
import torch

from megadistill import distributed
from megadistill.files import atomic_directory, atomic_write_text, disk_full_errno, fsync_directory, fsync_tree, tree_bytes

__all__ = ["CheckpointError", "export_hf", "resume", "save"]

_STEP_DIR = re.compile(r"^step_(\d+)$")
_PARTIAL = ".partial."


class CheckpointError(OSError):
    """A checkpoint or export could not be written; the previous one is intact (the message says which)."""


def tag_of(step: int) -> str:
    """The checkpoint folder name of optimizer step ``step`` (``step_0000042``)."""
    return f"step_{step:07d}"


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep: int = 2) -> None:
    """Save model, optimizer, scheduler and ``client_state`` (picklable) of optimizer step ``step``.

    Every rank must call this (collective). Keeps the newest ``keep`` complete checkpoints.

    Raises:
        CheckpointError: on every rank, when any rank failed to write (disk full, read-only
            folder, ...); the partial folder is removed and ``latest`` still names the previous
            checkpoint. A full disk is reported with the bytes written, needed and free.
    """
    ckpt_dir, tag = Path(ckpt_dir), tag_of(step)
    partial = ckpt_dir / f"{_PARTIAL}{tag}"
    _collective(lambda: _prepare(ckpt_dir), f"checkpoint {ckpt_dir / tag} not saved")
    error = None
    try:
        # DeepSpeed's own `latest` is written by rank 0 without waiting for the other ranks and not
        # atomically: ours is written after the rename below.
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
    except Exception as err:  # noqa: BLE001 - reported on every rank below
        error = err
        # save_checkpoint ends with a barrier that the other ranks are waiting in; writes fail
        # after its opening collectives, so this matches the barrier the failed rank skipped.
        distributed.barrier()
    if _any_rank(error is not None):
        raise _save_failed(ckpt_dir, tag, partial, error)
    _collective(lambda: _commit(ckpt_dir, partial, tag, keep), f"checkpoint {ckpt_dir / tag} not committed")


def _prepare(ckpt_dir: Path) -> None:
    """Rank 0: create the folder and remove partial checkpoints a killed save left behind."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for leftover in ckpt_dir.glob(f"{_PARTIAL}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _commit(ckpt_dir: Path, partial: Path, tag: str, keep: int) -> None:
    """Rank 0: fsync the partial folder, rename it into place, point ``latest`` at it, prune old ones."""
    fsync_tree(partial)
    final = ckpt_dir / tag
    if final.exists():  # a rerun after a kill between an earlier rename and its `latest`
        aside = ckpt_dir / f"{_PARTIAL}old.{tag}"
        os.replace(final, aside)
        shutil.rmtree(aside)
    os.replace(partial, final)
    fsync_directory(ckpt_dir)
    atomic_write_text(ckpt_dir / "latest", tag)  # written last: it names a complete checkpoint
    for old in complete_checkpoints(ckpt_dir)[:-keep]:
        if old.name != tag:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """The ``step_*`` folders under ``ckpt_dir``, oldest first (partial saves are never named so)."""
    found = [p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _save_failed(ckpt_dir: Path, tag: str, partial: Path, error: BaseException | None) -> CheckpointError:
    """Every rank: measure the partial save, let rank 0 remove it, and describe the failure.

    The disk is diagnosed from the error and the free space before the partial folder is removed,
    so a rank whose own writes succeeded reports the same full disk as the one whose writes failed.
    """
    written, free_at_failure = tree_bytes(partial), shutil.disk_usage(ckpt_dir).free
    distributed.barrier()  # every rank has measured before rank 0 deletes
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    distributed.barrier()
    previous = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    kept = f"{ckpt_dir / 'latest'} still names {previous}" if previous else "no earlier checkpoint exists"
    if is_disk_full(error, free_at_failure):
        older = complete_checkpoints(ckpt_dir)
        needed = max(written, tree_bytes(older[-1]) if older else 0)
        return CheckpointError(errno.ENOSPC, f"checkpoint {ckpt_dir / tag} not saved: disk full ({written:,} bytes written "
                               f"before it filled; a checkpoint of this run needs about {needed:,} bytes, "
                               f"{shutil.disk_usage(ckpt_dir).free:,} free now): free space or move run_dir; {kept}")
    cause = " ".join(str(error).split()) if error is not None else "another rank failed to write its shard (see its error)"
    return CheckpointError(f"checkpoint {ckpt_dir / tag} not saved: {cause}; {kept}")


def is_disk_full(error: BaseException | None, free_bytes: int) -> bool:
    """Whether a write failed on a full disk: ``error`` (or one it was raised from) is ENOSPC/EDQUOT, or
    under 1 MiB was free when it failed.

    ``torch.save`` reports a full disk without an errno (``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos ...`` or ``file write failed``), hence the free-space test,
    which also lets a rank whose own writes succeeded diagnose the disk another rank filled.
    """
    return disk_full_errno(error) is not None or free_bytes < 2**20


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (collective: one all-reduce)."""
    return bool(distributed.all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64))[0] > 0)


def _collective(rank0_work, what: str) -> None:
    """Run ``rank0_work()`` on rank 0 and raise :class:`CheckpointError` on every rank if it failed."""
    error = None
    if distributed.is_main():
        try:
            rank0_work()
        except OSError as err:
            error = err
    if _any_rank(error is not None):
        raise CheckpointError(f"{what}: {error}" if error else f"{what}: rank 0 failed (see its error)")


def resume(engine, ckpt_dir: str | Path) -> dict | None:
    """Load the checkpoint ``ckpt_dir/latest`` names into ``engine``; return its client state.

    Returns ``None`` when there is no checkpoint (a fresh run). Every rank must call this.
    Partial folders of a save that was killed are removed first (rank 0).

    Raises:
        ValueError: ``latest`` names a checkpoint directory that does not exist or cannot be
            loaded. A checkpoint saved with another world size raises DeepSpeed's own error (convert
            it with DeepSpeed's ``ds_to_universal`` or resume with the same number of ranks).
    """
    ckpt_dir = Path(ckpt_dir)
    if distributed.is_main() and ckpt_dir.is_dir():
        _prepare(ckpt_dir)
    distributed.barrier()
    if not (ckpt_dir / "latest").is_file():
        return None
    tag = (ckpt_dir / "latest").read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise ValueError(f"checkpoint {ckpt_dir / tag} (named by {ckpt_dir / 'latest'}) does not exist: point latest at "
                         f"an existing step_* folder ({', '.join(p.name for p in complete_checkpoints(ckpt_dir)) or 'none'}), or use a new run_dir")
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise ValueError(f"checkpoint {ckpt_dir / tag} could not be loaded: point {ckpt_dir / 'latest'} at an earlier step_* folder, or use a new run_dir")
    return client_state


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, extra_files: dict[str, dict] | None = None) -> None:
    """Write ``model`` (gathered from ZeRO-3 shards) and ``tokenizer`` with ``save_pretrained``.

    The directory reloads with the ``AutoModelFor*`` class of the model's family:
    ``AutoModelForCausalLM`` for decoders, ``AutoModelForMaskedLM`` for BERT / RoBERTa / XLM-R /
    DistilBERT students (``config.architectures`` names the class; tied embeddings and MLM head
    biases are re-tied on load), and ``AutoTokenizer`` for the (trimmed) tokenizer.

    Every rank must call this (the gather is collective); rank 0 writes into a temporary
    directory (:func:`megadistill.files.atomic_directory`: fsynced, then renamed to ``out_dir``),
    replacing an older export only when the new one is complete. ``extra_files`` maps file names
    to JSON-serializable dicts written beside the weights (e.g. ``vocab_map.json``, ``megadistill.json``).

    Raises:
        CheckpointError: on every rank when rank 0 could not write (disk full: with the bytes
            needed and free); an older ``out_dir`` is left as it was and no temporary folder remains.
    """
    out_dir = Path(out_dir)
    params = list(model.parameters())
    error, needed = None, 0
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if distributed.is_main():
            needed = sum(p.numel() * p.element_size() for p in model.parameters())
            try:
                _write_export(model, tokenizer, out_dir, extra_files or {})
            except Exception as err:  # noqa: BLE001 - reported on every rank below
                error = err
    if _any_rank(error is not None):
        if is_disk_full(error, getattr(error, "free_at_failure", shutil.disk_usage(out_dir.parent).free)):
            raise CheckpointError(errno.ENOSPC, f"export {out_dir} not written: disk full (the weights need about {needed:,} "
                                  f"bytes, {shutil.disk_usage(out_dir.parent).free:,} free): free space or move run_dir; "
                                  "the last checkpoint is intact, rerun the same command to export again")
        raise CheckpointError(f"export {out_dir} not written: {error or 'rank 0 failed (see its error)'}")
    distributed.barrier()


def _write_export(model: torch.nn.Module, tokenizer, out_dir: Path, extra_files: dict[str, dict]) -> None:
    """Rank 0: ``save_pretrained`` of model and tokenizer plus ``extra_files`` into ``out_dir``, atomically."""
    for stale in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):  # left by a process killed mid-export
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_directory(out_dir) as tmp:
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for name, payload in extra_files.items():
                (tmp / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
        except Exception as err:
            err.free_at_failure = shutil.disk_usage(tmp).free  # measured before the partial export is removed
            raise
