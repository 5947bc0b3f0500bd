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
