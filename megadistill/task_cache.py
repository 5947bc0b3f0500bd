"""Offline teacher class logits for the task stage: written once per (teacher, split), checked, read by example.

A cache directory holds ``logits.npy`` (``[N, C]`` float32, raw logits: the temperature is applied
in the loss, so one cache serves every ``task.temperature``) and ``meta.json``: format, version,
the teacher, the split's fingerprint (texts and labels in order), languages, label names and the
teacher's ``max_len_tokens``. Opening it against a run's training split refuses any mismatch,
so a stale cache can never feed the wrong example's logits.
"""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from megadistill.data.tasks import TaskSplit
from megadistill.files import atomic_directory, tree_bytes
from megadistill.files import disk_full_errno
from megadistill.teacher_cache import CacheDiskFull, interruptible, npy_bytes, write_npy

FORMAT, VERSION = "megadistill-task-logits", 1

__all__ = ["TaskLogitCache", "teacher_class_logits", "write_task_cache"]


def teacher_class_logits(model: torch.nn.Module, tokenizer, split: TaskSplit, max_len_tokens: int,
                         batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """``[N, C]`` float32 logits of a classifier on ``split`` (:func:`megadistill.task_eval.predict_classes`).

    The ids are what the online teacher reads (special tokens, cut at ``max_len_tokens``, right
    padding), so cached equals online up to float rounding across batch shapes.
    """
    from megadistill.task_eval import predict_classes

    return predict_classes(model, tokenizer, split.texts, batch_size=batch_size, max_len_tokens=max_len_tokens,
                           progress=progress)[1]


def write_task_cache(out_dir: str | Path, logits: np.ndarray, split: TaskSplit, *, teacher: str,
                     max_len_tokens: int) -> Path:
    """Write a cache directory atomically (complete or absent; a previous one unchanged on failure); returns its path.

    The files go into a temporary sibling directory, fsynced, renamed into place; SIGTERM / SIGINT
    while writing remove it (:class:`CacheInterrupted`), and one arriving during the final renames
    waits for them.

    Raises:
        ValueError: ``logits`` is not ``[len(split), len(label_set)]`` or holds non-finite values.
        CacheDiskFull: ENOSPC / EDQUOT; one line with the file, bytes written, bytes the cache needs, bytes free.
        CacheInterrupted: SIGTERM / SIGINT while writing.
    """
    logits = np.asarray(logits, dtype=np.float32)
    expected = (len(split), len(split.label_set))
    if logits.shape != expected:
        raise ValueError(f"teacher logits have shape {logits.shape}, expected {expected} (examples, labels)")
    if not np.isfinite(logits).all():
        raise ValueError("teacher logits contain NaN/inf: the teacher is broken; nothing was written")
    meta = {"format": FORMAT, "version": VERSION, "teacher": teacher, "fingerprint": split.fingerprint(),
            "examples": len(split), "labels": list(split.label_set.names), "languages": sorted(set(split.languages)),
            "sources": split.sources, "max_len_tokens": max_len_tokens}
    files = {"logits.npy": functools.partial(write_npy, array=logits),
             "meta.json": lambda f: f.write(json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8"))}
    out_dir, progress = Path(out_dir), {"path": None, "written": 0}
    try:
        with interruptible(f"while writing the task logit cache {out_dir}: nothing was written (a previous cache there, "
                           "if any, is unchanged); rerunning the same command writes it") as guard:
            with atomic_directory(out_dir) as tmp:
                _write_files(tmp, out_dir, files, progress)
                guard.defer()  # the renames into place (leaving the block) finish before a signal acts
    except OSError as err:
        code = disk_full_errno(err)
        if code is None:
            raise
        raise _task_disk_full(code, out_dir, logits, files, progress) from None
    return out_dir


def _write_files(tmp: Path, out_dir: Path, files: dict, progress: dict) -> None:
    """Write ``files`` (name -> ``write(f)``) into ``tmp``, fsynced; ``progress`` gets the file and the bytes written."""
    for name, write in files.items():
        progress["path"] = out_dir / name
        try:
            with open(tmp / name, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        finally:
            progress["written"] = tree_bytes(tmp)


def _task_disk_full(code: int, out_dir: Path, logits: np.ndarray, files: dict, progress: dict) -> CacheDiskFull:
    """The one-line :class:`CacheDiskFull` of a task cache (called after the temporary directory was removed)."""
    meta_bytes = io.BytesIO()
    files["meta.json"](meta_bytes)
    needed = npy_bytes(logits) + len(meta_bytes.getvalue())
    how = f"logits {logits.shape[0]} x {logits.shape[1]} float32 + meta.json, all written again"
    return CacheDiskFull(code, progress["path"] or out_dir, progress["written"], needed, how, out_dir.parent, 0,
                         done="a previous cache there, if any, is unchanged: free space or use another --output, "
                              "then rerun the same command")


class TaskLogitCache:
    """An opened cache directory (see the module docstring).

    Raises:
        FileNotFoundError: no ``meta.json`` / ``logits.npy`` (naming the directory and the tool that writes it).
        ValueError: not a task logit cache, or an unsupported version, or a shape that disagrees with its meta.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_file, logits_file = self.directory / "meta.json", self.directory / "logits.npy"
        if not meta_file.is_file() or not logits_file.is_file():
            raise FileNotFoundError(f"task logit cache {self.directory} has no meta.json/logits.npy: write one with "
                                    "tools/cache_teacher_logits.py --task")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise ValueError(f"{meta_file}: not a task logit cache of version {VERSION} (format {self.meta.get('format')!r}); "
                             "rebuild it with tools/cache_teacher_logits.py --task")
        self.array = np.load(logits_file, mmap_mode="r")
        if self.array.shape != (self.meta["examples"], len(self.meta["labels"])):
            raise ValueError(f"{logits_file}: shape {self.array.shape} disagrees with meta.json "
                             f"({self.meta['examples']} examples x {len(self.meta['labels'])} labels): rebuild the cache")

    def check_compatible(self, split: TaskSplit, max_len_tokens: int) -> None:
        """Refuse a cache built from other examples, labels or teacher truncation.

        Raises:
            ValueError: naming the field that differs and how to rebuild.
        """
        fix = "rebuild it with tools/cache_teacher_logits.py --task for this run's data"
        if self.meta["labels"] != list(split.label_set.names):
            raise ValueError(f"task logit cache {self.directory}: labels {self.meta['labels']} differ from the data's "
                             f"{list(split.label_set.names)}: {fix}")
        if self.meta["fingerprint"] != split.fingerprint():
            raise ValueError(f"task logit cache {self.directory} was built from other examples (fingerprint "
                             f"{self.meta['fingerprint']}, data {split.fingerprint()}; languages "
                             f"{self.meta['languages']}): {fix}")
        if self.meta["max_len_tokens"] != max_len_tokens:
            raise ValueError(f"task logit cache {self.directory}: teacher inputs cut at {self.meta['max_len_tokens']} "
                             f"tokens, the run uses task.max_len_tokens={max_len_tokens}: {fix}")

    def logits(self, example_ids: list[int]) -> torch.Tensor:
        """``[B, C]`` fp32 logits of split positions ``example_ids`` (``-1`` = padding slot: zeros)."""
        out = torch.zeros((len(example_ids), self.array.shape[1]), dtype=torch.float32)
        for row, index in enumerate(example_ids):
            if index >= 0:
                out[row] = torch.from_numpy(np.array(self.array[index]))
        return out
