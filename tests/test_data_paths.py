"""Dataset paths: one check (megadistill.data.inspect.resolve_dataset) for every tool, run by the stage before any model loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from megadistill.config import DataConfig, RunConfig, StudentConfig, TeacherConfig
from megadistill.data.indexed import IndexedDatasetWriter, write_provenance
from megadistill.data.inspect import resolve_dataset
from megadistill.stages import pretrain
from megadistill.stages.build import check_paths


def pair(prefix: Path, provenance: bool = True) -> Path:
    """A one-document ``.bin``/``.idx`` pair (with a stub ``.json`` when ``provenance``)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([2, 5, 1])
    if provenance:
        write_provenance(prefix, {"documents": 1, "tokens": 3})
    return prefix


@pytest.fixture
def teacher_dir(tmp_path):
    """A directory that passes the cheap teacher check (a config.json); nothing loads from it here."""
    path = tmp_path / "teacher"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def config(tmp_path, teacher_dir, train, valid=(), **teacher) -> RunConfig:
    return RunConfig(run_dir=str(tmp_path / "run"), teacher=TeacherConfig(path=str(teacher_dir), **teacher),
                     data=DataConfig(train_prefixes=[str(p) for p in train], valid_prefixes=[str(p) for p in valid]))


def test_resolve_dataset_accepts_suffixes_and_names_what_is_missing(tmp_path):
    prefix = pair(tmp_path / "hin_Deva.iast")  # a dotted prefix keeps its last part
    for arg in (prefix, f"{prefix}.idx", f"{prefix}.bin", f"{prefix}.json"):
        assert resolve_dataset(arg) == prefix
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        resolve_dataset(f"{missing}.idx", "data.train_prefixes[0]")
    assert str(err.value) == (f"data.train_prefixes[0]: dataset {missing} not found (no {missing}.bin/.idx): create it "
                              f"with python tools/binarize.py --input ... --output-prefix {missing}")
    Path(f"{prefix}.bin").unlink()
    with pytest.raises(FileNotFoundError, match=rf"dataset {prefix} is incomplete \(no {prefix}.bin\)"):
        resolve_dataset(prefix)


def test_resolve_dataset_without_provenance_names_adopt_dataset(tmp_path):
    prefix = pair(tmp_path / "megatron_text_document", provenance=False)
    assert resolve_dataset(prefix, provenance=False) == prefix
    with pytest.raises(FileNotFoundError) as err:
        resolve_dataset(prefix, tokenizer="/models/gemma")
    assert str(err.value) == (f"dataset {prefix} has no provenance {prefix}.json; if Megatron-LM (or another tool) "
                              f"wrote it, check and record one with: python tools/adopt_dataset.py {prefix} "
                              "--tokenizer /models/gemma")


@pytest.fixture
def no_teacher_load(monkeypatch):
    """Fail the test if the stage gets as far as loading the teacher."""
    def fail(*args, **kwargs):
        pytest.fail("the teacher was loaded before the data paths were checked")

    monkeypatch.setattr(pretrain, "load_teacher_once", fail)


def test_stage_refuses_a_missing_dataset_before_loading_the_teacher(tmp_path, teacher_dir, no_teacher_load):
    missing = tmp_path / "data" / "hin_Deva"
    with pytest.raises(FileNotFoundError, match=rf"^data.train_prefixes\[0\]: dataset {missing} not found "
                                                rf"\(no {missing}.bin/.idx\)"):
        pretrain.build(config(tmp_path, teacher_dir, [missing]), {})


def test_stage_names_the_field_of_each_path(tmp_path, teacher_dir, no_teacher_load):
    good = pair(tmp_path / "good")
    bare = pair(tmp_path / "bare", provenance=False)
    with pytest.raises(FileNotFoundError, match=rf"^data.valid_prefixes\[1\]: dataset {bare} has no provenance.*"
                                                rf"adopt_dataset.py {bare} --tokenizer {teacher_dir}$"):
        pretrain.build(config(tmp_path, teacher_dir, [good], [good, bare]), {})
    with pytest.raises(FileNotFoundError, match="^teacher.path hf:google/gemma-3-1b is not a local directory"):
        pretrain.build(dataclasses.replace(config(tmp_path, teacher_dir, [good]),
                                           teacher=TeacherConfig(path="hf:google/gemma-3-1b")), {})
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=rf"^teacher.logit_cache: {cache}/meta.json not found"):
        pretrain.build(config(tmp_path, teacher_dir, [good], mode="offline", logit_cache=str(cache)), {})
    student = dataclasses.replace(config(tmp_path, teacher_dir, [good]),
                                  student=StudentConfig(init="checkpoint", checkpoint=str(tmp_path / "runs/x/hf")))
    with pytest.raises(FileNotFoundError, match="^student.checkpoint .*runs/x/hf is not a local directory"):
        pretrain.build(student, {})


def test_check_paths_turns_file_names_into_prefixes(tmp_path, teacher_dir):
    train, valid = pair(tmp_path / "hin_Deva"), pair(tmp_path / "hin_Deva.dev")
    cfg = check_paths(config(tmp_path, teacher_dir, [f"{train}.idx"], [f"{valid}.bin"]))
    assert (cfg.data.train_prefixes, cfg.data.valid_prefixes) == ([str(train)], [str(valid)])


def test_train_cli_says_which_dataset_is_missing_in_one_line(tmp_path, teacher_dir):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    missing = tmp_path / "hin_Deva.train"
    cmd = [sys.executable, "megadistill/train.py", "--ds_config", "ds_configs/cpu_zero3.json", "--config",
           "megadistill/recipes/quickstart.yaml", f"run_dir={tmp_path / 'run'}", f"teacher.path={teacher_dir}",
           f"data.train_prefixes=[{missing}.idx]", "data.valid_prefixes=[]"]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == [f"megadistill.train: error: data.train_prefixes[0]: dataset {missing} not found (no "
                      f"{missing}.bin/.idx): create it with python tools/binarize.py --input ... --output-prefix {missing}"]
