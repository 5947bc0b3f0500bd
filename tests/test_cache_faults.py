"""Faults while caching teacher logits: a full disk and SIGTERM keep the complete shards and resume exactly.

A real full disk is a small tmpfs (the tests mount one when they may, as root); where mounting
is not permitted the same checks run against a simulated ENOSPC. Each failure must leave no
temporary file, the complete shards byte-identical to an uninterrupted cache, one line on
stderr with the numbers, and a rerun of the same command must finish with the same content.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import megadistill.task_cache as task_cache_module
import megadistill.teacher_cache as teacher_cache_module
from conftest import remount_tmpfs, small_tmpfs
from megadistill.data.tasks import load_split
from megadistill.task_cache import TaskLogitCache, write_task_cache
from megadistill.teacher_cache import CacheDiskFull, CacheInterrupted, TeacherCache, complete_shard_bytes
from test_teacher_cache import ROOT, SEQ
from tools import cache_teacher_logits

SINGLE_PROCESS = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
SHARD_FULL = re.compile(
    r"cache_teacher_logits: error: disk full writing (?P<path>\S+): (?P<written>[\d,]+) bytes of shard (?P<shard>\d+) "
    r"written before it filled \(its partial files were removed\); about (?P<needed>[\d,]+) more bytes needed to "
    r"finish the cache \((?P<left>\d+) shards left x (?P<per>[\d,]+) bytes, the mean complete shard\); "
    r"(?P<free>[\d,]+) bytes free on (?P<root>\S+); (?P<kept>\d+) complete shards kept: free space or use another "
    r"--output, then rerun the same command to resume")


def tool_args(workspace: Path, out: Path) -> list[str]:
    """The arguments of ``test_teacher_cache.run_tool`` (8 windows per shard, top-64)."""
    return ["--teacher", str(workspace / "teacher"), "--data", str(workspace / "data" / "hin"), "--output", str(out),
            "--seq-len", str(SEQ), "--seed", "7", "--windows-per-shard", "8", "--micro-batch-size", "3",
            "--chunk-tokens", "20"]


@pytest.fixture(scope="module")
def reference(cache_workspace, tmp_path_factory) -> Path:
    """An uninterrupted cache (57 shards of ~34 KB)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SINGLE_PROCESS.items():
            mp.setenv(key, value)
        assert cache_teacher_logits.main(tool_args(cache_workspace, out)) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".tmp" in p.name]


def stderr_lines(capsys) -> list[str]:
    """The tool's own lines on stderr (logging lines start with a date, tqdm's with its description)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("cache_teacher_logits")]


def enospc_in_write_npy(monkeypatch, tmp_suffix: str) -> None:
    """Simulated full disk: ``write_npy`` into a temporary ``*<tmp_suffix>`` writes 100 bytes, then ENOSPC."""
    real = teacher_cache_module.write_npy

    def write_npy(f, array):
        if tmp_suffix in Path(f.name).name:
            f.write(b"\0" * 100)
            f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(f, array)

    monkeypatch.setattr(teacher_cache_module, "write_npy", write_npy)


def assert_complete_shards_intact(out: Path, reference: Path, kept: int) -> None:
    """Shards ``0..kept-1`` complete and equal to the reference, nothing else of a shard, no temporary, no meta.json."""
    assert not temporaries(out)
    assert sorted(p.name for p in out.glob("*.done.json")) == [f"shard_{s:06d}.done.json" for s in range(kept)]
    ref, got = snapshot(reference), snapshot(out)
    assert all(got[name] == ref[name] for name in got if name.startswith("shard_"))
    assert {n for n in got if n.startswith("shard_")} == {n for n in ref if n.startswith("shard_") and int(n[6:12]) < kept}
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        TeacherCache(out)


def test_disk_full_on_a_small_tmpfs_keeps_complete_shards_and_resumes(cache_workspace, reference, tmp_path,
                                                                      single_process, monkeypatch, capsys):
    """256 KiB holds 4 shards (14 tmpfs pages each): the 5th fails, one line; after a remount to 8 MiB the rerun finishes."""
    disk = tmp_path / "disk"
    out, args = disk / "cache", tool_args(cache_workspace, disk / "cache")
    with small_tmpfs(disk, "256k") as mounted:
        if not mounted:
            enospc_in_write_npy(monkeypatch, ".shard_000004.entries.npy.tmp")
        assert cache_teacher_logits.run_cli(args) == 1
        lines = stderr_lines(capsys)
        assert len(lines) == 1, lines
        found = SHARD_FULL.fullmatch(lines[0])
        assert found, lines[0]
        num = {k: int(v.replace(",", "")) for k, v in found.groupdict().items() if k not in ("path", "root")}
        kept, num_shards = num["kept"], TeacherCache(reference).meta["num_shards"]
        assert 0 < kept < num_shards and num["shard"] == kept and found["root"] == str(out)
        assert found["path"].startswith(str(out / f"shard_{kept:06d}."))
        sizes = complete_shard_bytes(out)
        assert num["per"] == round(sum(sizes) / len(sizes)) and num["left"] == num_shards - kept
        assert num["needed"] == num["per"] * num["left"] and num["free"] == shutil.disk_usage(out).free
        assert 0 < num["written"] < num["per"]
        if mounted:
            assert num["free"] < num["per"]  # the shard really did not fit
        assert_complete_shards_intact(out, reference, kept)
        if mounted:
            remount_tmpfs(disk, "size=8m")
        else:
            monkeypatch.undo()
            for key, value in SINGLE_PROCESS.items():
                monkeypatch.setenv(key, value)
        assert cache_teacher_logits.run_cli(args) == 0
        assert snapshot(out) == snapshot(reference) and not temporaries(out)
        TeacherCache(out)


def test_disk_full_writing_meta_json_keeps_every_shard(cache_workspace, reference, tmp_path, single_process,
                                                       monkeypatch, capsys):
    """The disk fills just before meta.json: one line naming it; the rerun only writes meta.json."""
    disk = tmp_path / "disk"
    out, args = disk / "cache", tool_args(cache_workspace, disk / "cache")
    filler = disk / "filler"
    real = cache_teacher_logits.directory_bytes_per_token

    def fill_then_measure(root, meta):
        if mounted:
            with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
                while True:  # short writes until the tmpfs is full, then ENOSPC
                    f.write(b"\0" * 4096)
        else:
            def fsync(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(os, "fsync", fsync)
        return real(root, meta)

    with small_tmpfs(disk, "6m") as mounted:
        monkeypatch.setattr(cache_teacher_logits, "directory_bytes_per_token", fill_then_measure)
        assert cache_teacher_logits.run_cli(args) == 1
        monkeypatch.undo()
        for key, value in SINGLE_PROCESS.items():
            monkeypatch.setenv(key, value)
        lines = stderr_lines(capsys)
        assert len(lines) == 1, lines
        size, num_shards = len((reference / "meta.json").read_bytes()), TeacherCache(reference).meta["num_shards"]
        free = shutil.disk_usage(out).free
        assert re.fullmatch(
            rf"cache_teacher_logits: error: disk full writing {re.escape(str(out / 'meta.json'))}: \d+ bytes of it "
            rf"written before it filled \(the partial file was removed\); about {size:,} more bytes needed to finish "
            rf"the cache \({size:,} bytes of meta.json \+ 0 shards left x [\d,]+ bytes\); {free:,} bytes free on "
            rf"{re.escape(str(out))}; {num_shards} complete shards kept: free space or use another --output, then rerun the same "
            r"command to resume", lines[0]), lines[0]
        assert not temporaries(out) and not (out / "meta.json").exists()
        assert {n: b for n, b in snapshot(out).items() if n.startswith("shard_")} == \
            {n: b for n, b in snapshot(reference).items() if n.startswith("shard_")}
        filler.unlink(missing_ok=True)
        assert cache_teacher_logits.run_cli(args) == 0
        assert snapshot(out) == snapshot(reference) and not temporaries(out)


_CHILD = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
real_replace = os.replace
def replace(src, dst):
    if str(dst).endswith("shard_000002.counts.npy"):  # shard 2's entries are in place, its counts still a temporary
        os.kill(os.getpid(), signal.SIGTERM)
    return real_replace(src, dst)
os.replace = replace
sys.argv = ["cache_teacher_logits.py"] + {argv!r}
runpy.run_path(os.path.join({repo!r}, "tools", "cache_teacher_logits.py"), run_name="__main__")
"""


def test_sigterm_against_the_tool_removes_the_partial_shard_and_a_rerun_resumes(cache_workspace, reference, tmp_path,
                                                                                 single_process):
    out = tmp_path / "cache"
    args = tool_args(cache_workspace, out)
    env = {**{k: v for k, v in os.environ.items() if k not in SINGLE_PROCESS}, **SINGLE_PROCESS}
    script = textwrap.dedent(_CHILD).format(repo=str(ROOT), argv=args)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=env)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("cache_teacher_logits")]
    assert lines == [f"cache_teacher_logits: interrupted by SIGTERM while caching into {out}: the partial shard was "
                     "removed, the complete shards are kept; rerunning the same command resumes"]
    assert_complete_shards_intact(out, reference, 2)
    assert cache_teacher_logits.run_cli(args) == 0
    assert snapshot(out) == snapshot(reference) and not temporaries(out)


def test_stale_temporaries_of_a_killed_run_are_removed_on_rerun(cache_workspace, reference, tmp_path, single_process):
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    (out / "meta.json").unlink()
    (out / ".shard_000003.entries.npy.tmp4242").write_bytes(b"half")  # SIGKILL leaves these
    (out / ".meta.json.abc.tmp").write_bytes(b"{")
    assert cache_teacher_logits.run_cli(tool_args(cache_workspace, out)) == 0
    assert snapshot(out) == snapshot(reference) and not temporaries(out)


class _TestHandlerCalled(Exception):
    pass


def _test_handler(signum, frame):
    raise _TestHandlerCalled(signum)


@pytest.fixture
def previous_task_cache(sib200_dir, tmp_path):
    """A good task cache of SIB-200 Hindi dev (99 x 7) at ``<dir>/c``, in a folder the test may mount over."""
    def write(directory: Path) -> dict[str, bytes]:
        split = load_split(sib200_dir, ["hin_Deva"], "dev")
        logits = np.random.default_rng(0).normal(size=(len(split), 7)).astype(np.float32)
        write_task_cache(directory / "c", logits, split, teacher="t", max_len_tokens=64)
        return snapshot(directory / "c")
    return write


def test_task_cache_disk_full_on_a_tmpfs_keeps_the_previous_cache(sib200_dir, tmp_path, previous_task_cache,
                                                                  monkeypatch):
    """16 KiB holds the dev cache (2 pages) but not the train split's 19.7 KB of logits."""
    disk = tmp_path / "disk"
    split = load_split(sib200_dir, ["hin_Deva"], "train")
    logits = np.random.default_rng(1).normal(size=(len(split), 7)).astype(np.float32)
    with small_tmpfs(disk, "16k") as mounted:
        before = previous_task_cache(disk)
        if not mounted:
            enospc_in_write_npy(monkeypatch, "logits.npy")
            monkeypatch.setattr(task_cache_module, "write_npy", teacher_cache_module.write_npy)
        with pytest.raises(CacheDiskFull) as caught:
            write_task_cache(disk / "c", logits, split, teacher="t2", max_len_tokens=64)
        err = caught.value
        assert err.errno == errno.ENOSPC and "\n" not in str(err) and err.path == disk / "c" / "logits.npy"
        assert err.free == shutil.disk_usage(disk).free and 0 < err.written < logits.nbytes
        assert err.needed > logits.nbytes
        assert str(err).startswith(f"disk full writing {disk / 'c' / 'logits.npy'}: {err.written:,} bytes of it written")
        assert (f"about {err.needed:,} more bytes needed to finish the cache (logits {len(split)} x 7 float32 + "
                f"meta.json, all written again); {err.free:,} bytes free on {disk}; a previous cache there, if any, "
                "is unchanged") in str(err)
        assert snapshot(disk / "c") == before and not temporaries(disk) and sorted(os.listdir(disk)) == ["c"]
        TaskLogitCache(disk / "c").check_compatible(load_split(sib200_dir, ["hin_Deva"], "dev"), 64)
        if mounted:
            remount_tmpfs(disk, "size=1m")
        else:
            monkeypatch.undo()
        write_task_cache(disk / "c", logits, split, teacher="t2", max_len_tokens=64)
        assert np.array_equal(TaskLogitCache(disk / "c").array, logits) and not temporaries(disk)


def test_task_cache_sigterm_removes_the_partial_directory_and_restores_the_handler(sib200_dir, tmp_path,
                                                                                   previous_task_cache, monkeypatch):
    before = previous_task_cache(tmp_path)
    split = load_split(sib200_dir, ["hin_Deva"], "train")
    logits = np.zeros((len(split), 7), dtype=np.float32)
    real = teacher_cache_module.write_npy

    def write_npy(f, array):
        f.write(b"\0" * 100)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(f, array)

    original = signal.signal(signal.SIGTERM, _test_handler)  # without the cache's own handler, this one raises
    try:
        monkeypatch.setattr(task_cache_module, "write_npy", write_npy)
        with pytest.raises(CacheInterrupted) as caught:
            write_task_cache(tmp_path / "c", logits, split, teacher="t2", max_len_tokens=64)
        assert caught.value.signum == signal.SIGTERM
        assert str(caught.value) == (f"interrupted by SIGTERM while writing the task logit cache {tmp_path / 'c'}: "
                                     "nothing was written (a previous cache there, if any, is unchanged); rerunning "
                                     "the same command writes it")
        assert signal.getsignal(signal.SIGTERM) is _test_handler
        assert snapshot(tmp_path / "c") == before and not temporaries(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    finally:
        signal.signal(signal.SIGTERM, original)
