"""The experiment grid runner end to end on CPU: one language, an offline KD cell and its no-teacher baseline.

One tiny grid run (a 4-layer hidden-64 Gemma 3 teacher, 2-layer students, 16-token windows, 2
steps) is shared by the tests: the cells' exports and evaluations, one cache shared by the offline
cell, a rerun that skips everything, a changed cell refused; bad grids and ``--dry-run`` need no run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny_gemma_teacher
from megadistill.experiments import load_grid
from tools.run_experiments import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.seq_len_tokens=16", "train.max_steps=2", "train.micro_batch_size=2", "train.grad_accum_steps=1",
        "train.eval_every_steps=2", "train.save_every_steps=2", "train.eval_max_batches=2", "optim.warmup_steps=1",
        "loss.chunk_size_tokens=16", "student.layer_map=2", "data.window_bos=true"]


def write_grid(path: Path, teacher: Path | None, data_dir: Path, cells: dict, languages=("hin_Deva",),
               recipe: Path = ROOT / "megadistill/recipes/quickstart.yaml") -> Path:
    """A grid file over ``recipe`` (default: the quickstart's) with the tiny budget in ``common``."""
    grid = {"name": "tiny", "recipe": str(recipe), "data_dir": str(data_dir),
            "languages": list(languages), "ranks": 1, "common": TINY, "cache": {"k": 8}, "cells": cells}
    if teacher is not None:
        grid["teacher"] = str(teacher)
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


CELLS = {"kd": {"overrides": ["teacher.mode=offline", "loss.divergence=forward_kl"], "baseline": "base",
                "description": "offline forward KL"},
         "base": {"overrides": ["teacher.mode=none"]}}


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``tools/run_experiments.py`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def small_sib200(sib200_dir: Path, directory: Path, lines: dict[str, int]) -> Path:
    """``directory/hin_Deva/{split}.tsv``: the header and first ``lines[split]`` rows of SIB-200 Hindi."""
    for split, count in lines.items():
        rows = (sib200_dir / "hin_Deva" / f"{split}.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        (directory / "hin_Deva").mkdir(parents=True, exist_ok=True)
        (directory / "hin_Deva" / f"{split}.tsv").write_text("".join(rows[:count + 1]), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """The tiny grid run once (SIB-200 Hindi cut to 60 train, 30 dev texts): ``(root, grid file, out dir, stdout)``."""
    root = tmp_path_factory.mktemp("grid")
    teacher = save_tiny_gemma_teacher(root / "teacher", tiny_tokenizer)
    data = small_sib200(sib200_dir, root / "sib200", {"train": 60, "dev": 30})
    grid = write_grid(root / "grid.yaml", teacher, data, CELLS)
    rc, out, err = run_main([str(grid), "--out", str(root / "out")])
    assert rc == 0, out[-4000:] + err[-4000:]
    return root, grid, root / "out", out


def test_cells_are_trained_evaluated_and_share_one_cache(grid_run):
    _, _, out, stdout = grid_run
    lang = out / "hin_Deva"
    for cell in ("kd", "base"):
        assert (lang / cell / "hf_best" / "config.json").is_file()
        result = json.loads((lang / cell / "eval.json").read_text())["results"][0]
        assert result["name"] == cell and math.isfinite(result["bits_per_char"]) and result["bits_per_char"] > 0
        record = json.loads((lang / cell / "cell.json").read_text())
        assert record["cell"] == cell and record["language"] == "hin_Deva" and record["view"] == "native"
        assert record["train_s"] > 0 and record["eval_s"] > 0 and len(record["config_sha256"]) == 64
        assert "megadistill/train.py" in record["command"] and "run_dir=" + str(lang / cell) in record["overrides"]
    caches = [p for p in (lang / "cache").iterdir() if p.is_dir()]
    assert [p.name for p in caches] == ["native-L16-s1234-k8-bos"] and (caches[0] / "meta.json").is_file()
    kd = yaml.safe_load((lang / "kd" / "config.yaml").read_text())
    assert kd["teacher"]["mode"] == "offline" and kd["teacher"]["logit_cache"] == str(caches[0])
    assert yaml.safe_load((lang / "base" / "config.yaml").read_text())["teacher"]["mode"] == "none"
    teacher = json.loads((lang / "teacher" / "eval.json").read_text())["results"][0]
    assert teacher["name"] == "teacher" and math.isfinite(teacher["bits_per_char"])
    grid = json.loads((out / "grid.json").read_text())
    assert list(grid["cells"]) == ["kd", "base"] and grid["cells"]["kd"]["baseline"] == "base"
    assert grid["languages"] == ["hin_Deva"] and grid["skipped"] == []
    timings = json.loads((out / "timings.json").read_text())["hin_Deva"]
    assert set(timings) >= {"binarize_s", "teacher_eval_s", "cache_s", "cells"} and set(timings["cells"]) == {"kd", "base"}
    assert "[1/2] hin_Deva/kd train" in stdout and "python tools/report.py grid" in stdout


def test_rerun_skips_finished_cells_and_keeps_the_cache(grid_run):
    _, grid, out, _ = grid_run
    lang = out / "hin_Deva"
    watched = [lang / "kd" / "eval.json", lang / "base" / "eval.json", lang / "cache" / "native-L16-s1234-k8-bos" / "meta.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    rc, stdout, stderr = run_main([str(grid), "--out", str(out)])
    assert rc == 0, stdout + stderr
    assert "skip hin_Deva/kd (done)" in stdout and "skip hin_Deva/base (done)" in stdout
    assert ": train" not in stdout and "cache native" not in stdout.replace("skip hin_Deva: cache", "")
    assert [p.stat().st_mtime_ns for p in watched] == before


def test_a_changed_cell_is_refused(grid_run):
    root, _, out, _ = grid_run
    cells = {**CELLS, "kd": {**CELLS["kd"], "overrides": CELLS["kd"]["overrides"] + ["loss.kd_weight=0.7"]}}
    changed = write_grid(root / "changed.yaml", root / "teacher", Path(load_grid(root / "grid.yaml").data_dir), cells)
    before = (out / "hin_Deva" / "kd" / "eval.json").stat().st_mtime_ns
    rc, stdout, stderr = run_main([str(changed), "--out", str(out)])
    assert rc == 2 and stderr.startswith("run_experiments: error: hin_Deva/kd: ") and stderr.count("\n") == 1
    assert "another config" in stderr and "loss.kd_weight=0.7" in stderr and "another --out" in stderr
    assert (out / "hin_Deva" / "kd" / "eval.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("cells, message", [
    ({"kd": {"overrides": ["teacher.mode=offline"], "baseline": "none"}}, "cells.kd.baseline: unknown cell 'none'"),
    ({"kd": {"overrides": [], "view": "klingon"}}, "cells.kd.view: unknown view 'klingon'"),
    ({"kd": {"overrides": [], "veiw": "iso"}}, "cells.kd.veiw: unknown key (did you mean 'view'?)"),
    ({"kd": {"overrides": ["train.max_step=3"]}}, "cells.kd.overrides (hin_Deva): unknown config key 'train.max_step'"),
    ({"kd": {"overrides": ["teacher.mode=offline"], "baseline": "b"}, "b": {"overrides": ["teacher.mode=online"]}},
     "cells.kd.baseline: 'b' is not a no-teacher cell"),
])
def test_bad_grid_names_the_file_and_field(tmp_path, sib200_dir, cells, message):
    grid = write_grid(tmp_path / "bad.yaml", None, sib200_dir, cells)
    rc, stdout, stderr = run_main([str(grid), "--out", str(tmp_path / "out")])
    assert rc == 2 and stderr == f"run_experiments: error: {grid}: {message}" + stderr.split(message, 1)[1]
    assert stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_bad_languages_and_selections(tmp_path, sib200_dir):
    grid = write_grid(tmp_path / "g.yaml", None, sib200_dir, CELLS, languages=["xyz_Latn"])
    rc, _, stderr = run_main([str(grid), "--out", str(tmp_path / "out")])
    assert rc == 2 and f"{grid}: languages: xyz_Latn: no directory {sib200_dir / 'xyz_Latn'}" in stderr
    empty = tmp_path / "data" / "hin_Deva"
    empty.mkdir(parents=True)
    (empty / "train.tsv").write_text("text\nx\n")
    rc, _, stderr = run_main([str(grid), "--out", str(tmp_path / "out"), "--langs", "hin_Deva", "--data-dir",
                              str(tmp_path / "data")])
    assert rc == 2 and "--langs: hin_Deva: " in stderr and "dev.tsv not found" in stderr
    rc, _, stderr = run_main([str(grid), "--out", str(tmp_path / "out"), "--langs", "hin_Deva", "--cells", "kdd"])
    assert rc == 2 and "--cells: unknown cell 'kdd' (did you mean 'kd'?)" in stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, sib200_dir):
    cells = {**CELLS, "kd_iso": {"overrides": ["teacher.mode=offline"], "view": "iso", "baseline": "base_iso"},
             "base_iso": {"overrides": ["teacher.mode=none"], "view": "iso"}}
    grid = write_grid(tmp_path / "g.yaml", tmp_path, sib200_dir, cells, languages=["hin_Deva", "sat_Olck"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "tools/run_experiments.py", str(grid), "--out", str(tmp_path / "out"),
                           "--dry-run", "--set", "train.max_steps=3"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skip sat_Olck/kd_iso: no iso view: script 'Olck' is not supported" in proc.stdout
    assert "[1/6] hin_Deva/kd (todo)" in proc.stdout and "[6/6] sat_Olck/base (todo)" in proc.stdout
    assert "megadistill/train.py" in proc.stdout and "train.max_steps=3" in proc.stdout
    assert "--chars-from " + str(sib200_dir / "hin_Deva" / "dev.tsv") in proc.stdout
    assert "cache/native-L16-s1234-k8-bos" in proc.stdout and "cache/iso-L16-s1234-k8-bos" in proc.stdout
    assert "--window-bos" in proc.stdout  # the caches are built with the windows the cells train on
    assert not (tmp_path / "out").exists()


def test_the_report_renders_from_the_runner_output(grid_run, tmp_path):
    from matplotlib.image import imread

    from megadistill.report import grid_plots, grid_table

    _, _, out, _ = grid_run
    table = grid_table(out)
    kd, base = (json.loads((out / "hin_Deva" / c / "eval.json").read_text())["results"][0]["bits_per_char"] for c in ("kd", "base"))
    row = next(line for line in table.splitlines() if line.startswith("| hin_Deva | kd "))
    assert f"{kd:.4f}" in row and f"{100 * (kd / base - 1):+.1f}%" in row  # relative to its own baseline cell
    pngs = grid_plots(out, tmp_path)
    assert {p.name for p in pngs} >= {"bits_per_char.png", "curves_hin_Deva.png", "bpc_vs_tokens.png"}
    assert all(imread(p).ndim == 3 for p in pngs)


def test_a_subset_rerun_keeps_what_earlier_invocations_recorded(grid_run):
    _, grid, out, _ = grid_run
    rc, stdout, stderr = run_main([str(grid), "--out", str(out), "--cells", "base"])
    assert rc == 0, stdout + stderr
    record = json.loads((out / "grid.json").read_text())
    assert list(record["cells"]) == ["kd", "base"] and record["runs"]["hin_Deva"]["cells"] == ["kd", "base"]
    assert "native-L16-s1234-k8-bos" in record["runs"]["hin_Deva"]["caches"]


def test_a_recipe_edited_after_planning_is_refused_before_training(tmp_path, sib200_dir):
    from megadistill.experiments import GridError, check_planned_config, plan_grid

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((ROOT / "megadistill/recipes/quickstart.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    grid = load_grid(write_grid(tmp_path / "g.yaml", tmp_path, sib200_dir, {"base": CELLS["base"]}, recipe=recipe))
    plan = plan_grid(grid, tmp_path / "out")
    cell = plan.languages[0].cells[0]
    check_planned_config(grid, cell, plan.out)  # unchanged: no error
    config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    config["optim"]["lr"] = 1e-3
    recipe.write_text(yaml.safe_dump(config), encoding="utf-8")
    with pytest.raises(GridError, match=r"hin_Deva/base: .*recipe.yaml changed after this invocation planned"):
        check_planned_config(grid, cell, plan.out)
