"""Faults during binarize: a dataset is its .bin/.idx/.json triple or nothing.

Errors while writing the provenance, a failed rename (in the writer's finalize or in the commit),
a full disk (simulated, and a real 256 KiB tmpfs when the test may mount one) and SIGTERM (in
this process, and against the CLI in a child process) must leave the final names as they were,
a previous dataset intact, and no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import megadistill.data.binarize as binarize_module
from conftest import small_tmpfs
from megadistill.data.binarize import BinarizeInterrupted, BinarizeOptions, DiskFullError, binarize
from megadistill.data.indexed import IndexedDataset, IndexedDatasetWriter, read_provenance
from test_binarize import REPO_ROOT, _save_teacher_dir, binarize_tool

SMALL = BinarizeOptions(block_bytes=2048)  # SIB-200 dev: ~16 blocks, so faults can strike mid-stream


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".tmp" in p.name]


@pytest.fixture
def previous(tmp_path, tiny_tokenizer, sib200_dir):
    """A good dataset (SIB-200 Hindi dev) at ``tmp_path/out/hin_Deva``, and its folder's files."""
    prefix = tmp_path / "out" / "hin_Deva"
    binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tiny_tokenizer, prefix, show_progress=False)
    return prefix, _snapshot(prefix.parent)


def _assert_untouched(prefix: Path, before: dict[str, bytes]) -> None:
    assert _snapshot(prefix.parent) == before
    assert not _temporaries(prefix.parent)
    assert len(IndexedDataset(prefix)) == 99 and read_provenance(prefix)["documents"] == 99


def _fail_on_call(monkeypatch, n: int, action):
    """Make IndexedDatasetWriter.add_documents run ``action()`` on its n-th call (then write as usual)."""
    original, calls = IndexedDatasetWriter.add_documents, [0]

    def add_documents(self, ids, lengths):
        calls[0] += 1
        if calls[0] == n:
            action()
        return original(self, ids, lengths)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", add_documents)


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_on_the_json_leaves_nothing_new(previous, tiny_tokenizer, sib200_dir, monkeypatch):
    prefix, before = previous
    monkeypatch.setattr(binarize_module, "write_provenance", lambda *a, **k: _enospc())
    inputs = [sib200_dir / "hin_Deva" / "test.tsv"]
    with pytest.raises(DiskFullError, match=rf"disk full writing {prefix}\.json: .* bytes free"):
        binarize(inputs, tiny_tokenizer, prefix, show_progress=False)
    _assert_untouched(prefix, before)
    fresh = prefix.parent / "fresh"
    with pytest.raises(DiskFullError):
        binarize(inputs, tiny_tokenizer, fresh, show_progress=False)
    assert not list(prefix.parent.glob("fresh*")) and _snapshot(prefix.parent) == before


def test_failed_rename_in_the_writer_leaks_no_temporary(previous, tiny_tokenizer, sib200_dir, monkeypatch):
    prefix, before = previous
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(".idx.tmp"):
            raise OSError(errno.EIO, "simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated rename failure"):
        binarize([sib200_dir / "hin_Deva" / "test.tsv"], tiny_tokenizer, prefix, show_progress=False)
    monkeypatch.undo()
    _assert_untouched(prefix, before)


def test_failed_rename_in_the_commit_restores_the_previous_dataset(previous, tiny_tokenizer, sib200_dir, monkeypatch):
    """Both triples of a romanized run: the native one is already in place when the last rename fails."""
    prefix, before = previous
    real_replace, last = os.replace, Path(f"{prefix}.iast.json")

    def replace(src, dst):
        if Path(dst) == last:
            raise OSError(errno.EIO, "simulated rename failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated rename failure"):
        binarize([sib200_dir / "hin_Deva" / "test.tsv"], tiny_tokenizer, prefix, BinarizeOptions(romanize="iast"),
                 show_progress=False)
    monkeypatch.undo()
    _assert_untouched(prefix, before)
    assert not list(prefix.parent.glob("*.iast*"))


def _check_disk_full_mid_stream(prefix: Path, before: dict, tokenizer, inputs, monkeypatch) -> None:
    _fail_on_call(monkeypatch, 3, _enospc)
    with pytest.raises(DiskFullError) as caught:
        binarize(inputs, tokenizer, prefix, SMALL, show_progress=False)
    monkeypatch.undo()
    err = caught.value
    message = str(err)
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"disk full writing {prefix}.bin: ")
    assert err.written > 0 and err.needed > 0 and err.free == shutil.disk_usage(prefix.parent).free
    assert f"{err.written:,} bytes of tokens written" in message and f"about {err.needed:,} more bytes needed" in message
    assert f"{err.free:,} bytes free on {prefix.parent}" in message
    _assert_untouched(prefix, before)


def test_disk_full_mid_stream_simulated(previous, tiny_tokenizer, sib200_dir, monkeypatch):
    prefix, before = previous
    _check_disk_full_mid_stream(prefix, before, tiny_tokenizer, [sib200_dir / "hin_Deva" / "test.tsv"], monkeypatch)


def test_disk_full_on_a_small_tmpfs(tmp_path, tiny_tokenizer, sib200_dir, monkeypatch):
    """A real full disk: 256 KiB tmpfs holding a good dataset, then an input whose tokens need ~1 MB.

    Where mounting is not permitted the same checks run against a simulated ENOSPC instead.
    """
    big = tmp_path / "big.tsv"
    rows = (sib200_dir / "hin_Deva" / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    big.write_text(rows[0] + "".join(rows[1:]) * 4, encoding="utf-8")  # ~1 MB of Hindi
    mount = Path(tempfile.mkdtemp(dir=tmp_path))
    with small_tmpfs(mount, "256k") as mounted:
        prefix = mount / "hin_Deva"
        binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tiny_tokenizer, prefix, show_progress=False)
        if not mounted:
            _check_disk_full_mid_stream(prefix, _snapshot(mount), tiny_tokenizer, [big], monkeypatch)
            return
        before = _snapshot(mount)
        with pytest.raises(DiskFullError) as caught:
            binarize([big], tiny_tokenizer, prefix, show_progress=False)
        err = caught.value
        assert str(err).startswith(f"disk full writing {prefix}.") and "\n" not in str(err)
        assert err.needed is not None and err.written + err.needed > 256 * 1024 - sum(map(len, before.values()))
        assert err.free == shutil.disk_usage(mount).free
        _assert_untouched(prefix, before)


def test_cli_disk_full_is_one_line(tmp_path, tiny_tokenizer, sib200_dir, monkeypatch, capsys):
    tok = _save_teacher_dir(tiny_tokenizer, tmp_path / "tok")
    _fail_on_call(monkeypatch, 2, _enospc)
    code = binarize_tool.main(["--input", str(sib200_dir / "hin_Deva" / "dev.tsv"), "--tokenizer", str(tok),
                               "--output-prefix", str(tmp_path / "out" / "x"), "--no-progress", "--block-bytes", "2048"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"binarize: error: disk full writing {tmp_path / 'out' / 'x'}.bin: ")
    assert not list((tmp_path / "out").iterdir())


class _TestHandlerCalled(Exception):
    pass


def _test_handler(signum, frame):
    raise _TestHandlerCalled(signum)


def test_sigterm_cleans_up_and_restores_the_handler(previous, tiny_tokenizer, sib200_dir, monkeypatch):
    prefix, before = previous
    original = signal.signal(signal.SIGTERM, _test_handler)  # without binarize's handler, this one raises
    sigint = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    try:
        binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tiny_tokenizer, prefix.parent / "ok", show_progress=False)
        assert signal.getsignal(signal.SIGTERM) is _test_handler
        before = _snapshot(prefix.parent)
        _fail_on_call(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(BinarizeInterrupted) as caught:
            binarize([sib200_dir / "hin_Deva" / "test.tsv"], tiny_tokenizer, prefix, SMALL, show_progress=False)
        assert caught.value.signum == signal.SIGTERM
        assert str(caught.value) == (f"interrupted by SIGTERM while writing {prefix}; nothing was written under "
                                     f"{prefix} (a previous dataset there is unchanged)")
        assert signal.getsignal(signal.SIGTERM) is _test_handler
        assert signal.getsignal(signal.SIGINT) is sigint
        monkeypatch.undo()
        _assert_untouched(prefix, before)
    finally:
        signal.signal(signal.SIGTERM, original)


_CHILD = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
from megadistill.data.indexed import IndexedDatasetWriter
original, calls = IndexedDatasetWriter.add_documents, [0]
def add_documents(self, ids, lengths):
    calls[0] += 1
    if calls[0] == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return original(self, ids, lengths)
IndexedDatasetWriter.add_documents = add_documents
sys.argv = ["binarize"] + {argv!r}
runpy.run_path(os.path.join({repo!r}, "tools", "binarize.py"), run_name="__main__")
"""


def test_sigterm_against_the_cli(previous, tiny_tokenizer, sib200_dir, tmp_path):
    """The real process: SIGTERM mid-write exits 143 with one line, no x.bin.tmp, the previous dataset intact."""
    prefix, before = previous
    tok = _save_teacher_dir(tiny_tokenizer, tmp_path / "tok")
    argv = ["--input", str(sib200_dir / "hin_Deva" / "test.tsv"), "--tokenizer", str(tok), "--output-prefix",
            str(prefix), "--no-progress", "--block-bytes", "2048", "--workers", "1"]
    script = textwrap.dedent(_CHILD).format(repo=str(REPO_ROOT), argv=argv)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("binarize")]
    assert lines == [f"binarize: interrupted by SIGTERM while writing {prefix}; nothing was written under {prefix} "
                     "(a previous dataset there is unchanged)"]
    _assert_untouched(prefix, before)
