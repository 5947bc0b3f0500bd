"""A student with its own tokenizer, end to end: 2 CPU ranks, ZeRO-3, tiny Gemma teacher, paired data.

Span-aligned KD and ULD train (KD > 0), the no-teacher baseline reads the same student windows
(same CE at step 1 as the distilled runs, since KD does not change the first forward pass), a
resumed run repeats the uninterrupted losses, the export reloads with the student's vocabulary,
and data binarized with the wrong tokenizer is refused with one line.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import build_tiny_tokenizer, free_port, read_sib200_texts, save_tiny_gemma_teacher
from megadistill.data.binarize import binarize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """Tiny Gemma 3 teacher (about 700 ids), a smaller student tokenizer (about 385 ids), Hindi train/dev binarized with both."""
    root = tmp_path_factory.mktemp("own_tok")
    save_tiny_gemma_teacher(root / "teacher", tiny_tokenizer)
    build_tiny_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva")[:300], vocab_size=330).save_pretrained(root / "student_tok")
    teacher_tok = AutoTokenizer.from_pretrained(root / "teacher")
    student_tok = AutoTokenizer.from_pretrained(root / "student_tok")
    for split in ("train", "dev"):
        source = [sib200_dir / "hin_Deva" / f"{split}.tsv"]
        binarize(source, teacher_tok, root / "data" / f"hin.{split}", show_progress=False)
        binarize(source, student_tok, root / "data" / f"hin.student.{split}", show_progress=False)
    return root


def own_args(ws: Path, run_dir: Path, *extra: str) -> list[str]:
    d = ws / "data"
    return [
        "--ds_config", "ds_configs/cpu_zero3.json", "--config", "megadistill/recipes/own-tokenizer.yaml",
        f"run_dir={run_dir}", f"teacher.path={ws / 'teacher'}", f"student.tokenizer={ws / 'student_tok'}",
        f"data.train_prefixes=[{d / 'hin.train'}]", f"data.valid_prefixes=[{d / 'hin.dev'}]",
        f"data.student_train_prefixes=[{d / 'hin.student.train'}]", f"data.student_valid_prefixes=[{d / 'hin.student.dev'}]",
        "data.seq_len_tokens=32", "student.layer_map=2", "train.micro_batch_size=2", "train.max_steps=4",
        "train.eval_every_steps=2", "train.eval_max_batches=2", "train.save_every_steps=2", "optim.warmup_steps=1",
        "loss.chunk_size_tokens=16", *extra,
    ]


def launch(ws: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
           *own_args(ws, run_dir, *extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_ok(ws: Path, run_dir: Path, *extra: str) -> dict[int, dict]:
    proc = launch(ws, run_dir, *extra)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def span_run(workspace):
    run_dir = workspace / "span"
    return run_dir, run_ok(workspace, run_dir, "loss.cross_tokenizer=span")


def test_span_kd_trains_and_exports_the_student_vocabulary(workspace, span_run):
    run_dir, metrics = span_run
    assert sorted(metrics) == [1, 2, 3, 4]
    assert all(m["kd"] > 0 and m["ce"] > 0 for m in metrics.values())
    student_tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    size = len(AutoTokenizer.from_pretrained(workspace / "student_tok"))
    assert len(student_tok) == size != len(AutoTokenizer.from_pretrained(workspace / "teacher"))
    assert model.get_input_embeddings().weight.shape[0] == size
    best = json.loads((run_dir / "hf_best" / "megadistill.json").read_text())["best"]
    valid = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dev_ce = {r["step"]: r["ce"] for r in valid if r["split"] == "valid"}
    assert best["step"] == min(dev_ce, key=dev_ce.get) and best["metric"] == "ce"


def test_uld_and_no_teacher_read_the_same_student_windows(workspace, span_run):
    _, span = span_run
    uld = run_ok(workspace, workspace / "uld", "loss.cross_tokenizer=uld")
    none = run_ok(workspace, workspace / "none", "teacher.mode=none")
    assert all(m["kd"] > 0 for m in uld.values())
    assert all(m["kd"] == 0 for m in none.values())
    # Step 1's forward pass precedes any update: the same windows give the same CE in all three.
    assert uld[1]["ce"] == pytest.approx(span[1]["ce"], rel=1e-6) == pytest.approx(none[1]["ce"], rel=1e-6)
    assert uld[1]["kd"] != pytest.approx(span[1]["kd"])  # and the two KD terms really differ


def test_resume_repeats_the_uninterrupted_losses(workspace, span_run):
    _, fresh = span_run
    run_dir = workspace / "resumed"
    run_ok(workspace, run_dir, "loss.cross_tokenizer=span", "train.exit_after_steps=2")
    resumed = run_ok(workspace, run_dir, "loss.cross_tokenizer=span")
    assert [resumed[s]["loss"] for s in (1, 2, 3, 4)] == [fresh[s]["loss"] for s in (1, 2, 3, 4)]


def test_student_data_from_the_teacher_tokenizer_is_refused(workspace, tmp_path):
    d = workspace / "data"
    proc = launch(workspace, tmp_path / "bad", f"data.student_train_prefixes=[{d / 'hin.train'}]")
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("megadistill.train: error:")]
    assert errors and "hin.train" in errors[0] and "tokenizer" in errors[0], (proc.stdout + proc.stderr)[-3000:]
