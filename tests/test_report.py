"""The own-tokenizer study table: rows from eval.json and hf_best/, numbers relative to the no-teacher run."""

import json

import pytest

from conftest import load_tool
from megadistill.report import own_tokenizer_table


def _record(name: str, bpc: float, tpc: float) -> dict:
    return {"name": name, "language": "sat_Olck", "bits_per_char": bpc, "tokens_per_char": tpc, "chars_per_s": 1234.4,
            "parameters": {"non_embedding": 22_295_168}}


def _study(tmp_path):
    lang = tmp_path / "sat_Olck"
    lang.mkdir(parents=True)
    results = [_record("teacher", 3.35, 1.022), _record("a_trimmed", 4.0, 1.03), _record("b_own_none", 5.0, 0.35),
               _record("d_own_span", 4.5, 0.35)]
    (lang / "eval.json").write_text(json.dumps({"results": results}))
    for step, name in ((30, "a_trimmed"), (20, "b_own_none"), (50, "d_own_span")):
        (lang / name / "hf_best").mkdir(parents=True)
        (lang / name / "hf_best" / "megadistill.json").write_text(json.dumps({"best": {"step": step, "value": 1.0}}))
        (lang / name / "summary.json").write_text(json.dumps({"steps": 50}))
    return tmp_path


def test_table_puts_each_student_next_to_the_baseline_and_the_teacher(tmp_path):
    table = own_tokenizer_table(_study(tmp_path)).splitlines()
    assert len(table) == 2 + 4  # header, rule, teacher + three students (c missing: left out, not invented)
    teacher, a, b, d = table[2:]
    assert "teacher" in teacher and "| 3.3500 | - |" in teacher
    assert "| 4.0000 | -20.0% |" in a and "30 / 50" in a
    assert "| 5.0000 | +0.0% |" in b and "20 / 50" in b
    assert "| 0.350 | 4.5000 | -10.0% | 1234 | 22.3M | 50 / 50 |" in d


def test_missing_study_and_broken_json_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no <lang>/eval.json"):
        own_tokenizer_table(tmp_path)
    study = _study(tmp_path / "s")
    (study / "sat_Olck" / "eval.json").write_text("{")
    with pytest.raises(ValueError, match="eval.json: not valid JSON"):
        own_tokenizer_table(study)


def test_cli_writes_the_table(tmp_path, capsys):
    tool = load_tool("report")
    out = tmp_path / "table.md"
    assert tool.main(["own-tokenizer", str(_study(tmp_path / "s")), "--output", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out


def _post_study(tmp_path):
    """A post-study fixture: teacher, a reduced-only row (hf_init of depth6_healed), its healed row and the baseline."""
    lang = tmp_path / "hin_Deva"
    lang.mkdir(parents=True)
    rec = lambda name, bpc, non_emb, total: {"name": name, "language": "hin_Deva", "bits_per_char": bpc,  # noqa: E731
                                              "parameters": {"non_embedding": non_emb, "total": total}}
    results = [rec("teacher", 2.0, 100_000_000, 268_000_000), rec("depth6_reduced", 8.0, 67_000_000, 80_000_000),
               rec("depth6_healed", 3.0, 67_000_000, 80_000_000), rec("depth6_no_teacher", 4.0, 67_000_000, 80_000_000)]
    (lang / "eval.json").write_text(json.dumps({"results": results}))
    for name, step in (("depth6_healed", 20), ("depth6_no_teacher", 30)):
        (lang / name / "hf_best").mkdir(parents=True)
        (lang / name / "hf_best" / "megadistill.json").write_text(json.dumps({"best": {"step": step, "value": 1.0}}))
        (lang / name / "summary.json").write_text(json.dumps({"steps": 30}))
    (lang / "depth6_healed" / "hf_init").mkdir()
    (lang / "depth6_healed" / "hf_init" / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    return tmp_path


def test_post_table_reads_reduced_rows_from_hf_init_and_trained_rows_at_their_best_step(tmp_path):
    from megadistill.report import post_table

    teacher, reduced, healed, baseline = post_table(_post_study(tmp_path)).splitlines()[2:]
    assert "teacher" in teacher and "| 2.0000 | - |" in teacher
    assert "not healed" in reduced and "| 67.0M | 80.0M | 3 | 8.0000 | +300.0% | - |" in reduced
    assert "healed (KD)" in healed and "| 3.0000 | +50.0% | 20 / 30 |" in healed
    assert "no teacher" in baseline and "| 4.0000 | +100.0% | 30 / 30 |" in baseline


# ---------------------------------------------------------------- experiment grid

GRID_CELLS = {
    "ce_only": {"overrides": ["distill.kd_weight=0"], "baseline": None, "view": "native", "description": "CE only"},
    "kd": {"overrides": [], "baseline": "ce_only", "view": "native", "description": "token-level KD"},
    "kd_iso": {"overrides": ["data.view=iso"], "baseline": "ce_only", "view": "iso", "description": "KD on ISO 15919"},
}
TEACHER_BPC = {"hin_Deva": 2.0, "tam_Taml": 2.5}
CELL_BPC = {("hin_Deva", "ce_only"): 3.0, ("hin_Deva", "kd"): 2.4, ("hin_Deva", "kd_iso"): 2.7,
            ("tam_Taml", "ce_only"): 3.5, ("tam_Taml", "kd"): 3.2}  # tam_Taml/kd_iso: not run
STEPS, TOKENS_PER_STEP, BEST = 40, 2048, {"ce_only": 30, "kd": 40, "kd_iso": 20}


def _eval_json(path, name, lang, bpc, non_emb=22_000_000, total=60_000_000):
    path.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "language": lang, "kind": "causal", "bits_per_char": bpc, "tokens_per_char": 0.4,
              "parameters": {"total": total, "non_embedding": non_emb, "embedding": total - non_emb}}
    (path / "eval.json").write_text(json.dumps({"results": [record]}))


def _metrics(run_dir, final_ce):
    lines = []
    for step in range(10, STEPS + 1, 10):
        lines.append({"step": step, "time_s": step * 0.5, "split": "train", "loss": final_ce + 3.0 - step / 20,
                      "ce": 5.0 - step / 20, "kd": 1.0, "tokens_per_s": 4000.0})
        lines.append({"step": step, "time_s": step * 0.5, "split": "valid", "ce": final_ce + (STEPS - step) / 40,
                      "kd": 1.0, "ppl": 10.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _grid_study(tmp_path):
    """Two languages, three cells (ce_only is the baseline of the others; tam_Taml/kd_iso not run)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "grid.json").write_text(json.dumps({"name": "g1", "languages": list(TEACHER_BPC), "cells": GRID_CELLS,
                                                    "common": [], "recipe": "pretrain", "teacher": "gemma"}))
    for lang, bpc in TEACHER_BPC.items():
        _eval_json(tmp_path / lang / "teacher", "teacher", lang, bpc, 100_000_000, 268_000_000)
    _eval_json(tmp_path / "hin_Deva" / "teacher_iso", "teacher", "hin_Deva", 2.2, 100_000_000, 268_000_000)
    for (lang, cell), bpc in CELL_BPC.items():
        run = tmp_path / lang / cell
        _eval_json(run, cell, lang, bpc)
        (run / "hf_best").mkdir()
        (run / "hf_best" / "megadistill.json").write_text(json.dumps({"best": {"step": BEST[cell], "value": 4.0}}))
        (run / "summary.json").write_text(json.dumps({"steps": STEPS, "tokens_per_step": TOKENS_PER_STEP,
                                                      "train_time_s": 123.4}))
        (run / "cell.json").write_text(json.dumps({"train_s": 150.0, "eval_s": 9.0}))
        _metrics(run, bpc)
    return tmp_path


def _rows(table: str) -> dict[tuple[str, str], list[str]]:
    """``{(language, model): cells}`` of the markdown table's body rows."""
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return {(r[0].strip(), r[1].strip()): [c.strip() for c in r] for r in rows[1:]}


def _pct(value, reference):
    return f"{100 * (value / reference - 1):+.1f}%"


def test_grid_table_puts_cells_next_to_their_baseline_and_the_teacher(tmp_path):
    from megadistill.report import grid_table

    rows = _rows(grid_table(_grid_study(tmp_path)))
    for (lang, cell), bpc in CELL_BPC.items():
        row = rows[(lang, cell)]
        baseline = GRID_CELLS[cell]["baseline"]
        assert row[3] == f"{bpc:.4f}"
        assert row[4] == (_pct(bpc, CELL_BPC[(lang, baseline)]) if baseline else "-")
        assert row[5] == _pct(bpc, TEACHER_BPC[lang])
        assert row[6] == "22.0M / 60.0M" and row[7] == f"{BEST[cell]} / {STEPS}"
        assert row[8] == f"{STEPS * TOKENS_PER_STEP / 1e3:.2f}k" and row[9] == "123"
    assert rows[("tam_Taml", "kd_iso")][3:] == ["not run"] + ["-"] * 6
    assert rows[("hin_Deva", "teacher")][3:6] == [f"{TEACHER_BPC['hin_Deva']:.4f}", "-", "-"]
    assert rows[("hin_Deva", "teacher_iso")][5] == _pct(2.2, TEACHER_BPC["hin_Deva"])
    assert ("tam_Taml", "teacher_iso") not in rows  # no teacher_iso run there: not invented
    assert list(rows)[:2] == [("hin_Deva", "teacher"), ("hin_Deva", "teacher_iso")]


def test_grid_malformed_json_names_the_file(tmp_path):
    from megadistill.report import grid_plots, grid_table

    study = _grid_study(tmp_path)
    bad = study / "tam_Taml" / "kd" / "summary.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=f"{bad}: not valid JSON"):
        grid_table(study)
    bad.write_text(json.dumps({"steps": STEPS, "tokens_per_step": TOKENS_PER_STEP}))
    metrics = study / "hin_Deva" / "kd" / "metrics.jsonl"
    metrics.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2,\n')
    with pytest.raises(ValueError, match=f"{metrics}:2: not a JSON record"):
        grid_plots(study, tmp_path / "png")
    with pytest.raises(FileNotFoundError, match="grid.json not found"):
        grid_table(tmp_path / "nothing")


def test_grid_plots_write_pngs_that_open(tmp_path):
    from matplotlib.image import imread

    from megadistill.report import grid_plots

    paths = grid_plots(_grid_study(tmp_path / "study"), tmp_path / "png")
    names = ["bits_per_char.png", "curves_hin_Deva.png", "curves_tam_Taml.png", "bpc_vs_tokens.png"]
    assert [p.name for p in paths] == names and all(p.parent == tmp_path / "png" for p in paths)
    for path in paths:
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.shape[2] in (3, 4)
    assert not list((tmp_path / "png").glob(".*.tmp"))  # atomic writes leave no temporary files


def test_grid_cli_prints_the_table_and_writes_plots(tmp_path, capsys):
    tool = load_tool("report")
    study, out = _grid_study(tmp_path / "study"), tmp_path / "table.md"
    assert tool.main(["grid", str(study), "--output", str(out), "--plots", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr()
    assert out.read_text() == printed.out and "not run" in printed.out
    assert f"wrote {tmp_path / 'png' / 'bits_per_char.png'}" in printed.err
    assert tool.main(["grid", str(study)]) == 0  # --plots defaults to the study directory
    assert (study / "bpc_vs_tokens.png").is_file()


def test_grid_marks_a_romanized_cell_counted_on_its_own_characters(tmp_path):
    from megadistill.report import ROMANIZED_MARK, grid_table

    study = _grid_study(tmp_path)
    path = study / "hin_Deva" / "kd_iso" / "eval.json"
    report = json.loads(path.read_text())
    report["results"][0]["characters_from"] = "scored"  # evaluated without --chars-from
    path.write_text(json.dumps(report))
    rows = _rows(grid_table(study))
    assert rows[("hin_Deva", "kd_iso")][3] == f"{CELL_BPC[('hin_Deva', 'kd_iso')]:.4f}{ROMANIZED_MARK}"
    assert ROMANIZED_MARK not in rows[("hin_Deva", "kd")][3]
