"""Stage dispatch end to end: masked-LM distillation (encoder teacher) and no-teacher baselines, 2 gloo ranks, ZeRO-3.

Runs ``megadistill/train.py`` through the real ``deepspeed`` launcher on tiny models: a 4-layer
XLM-R-shaped teacher with a Unigram tokenizer trained on SIB-200 Hindi, distilled DistilBERT-style
into a 2-layer student (one layer out of two); the same run with ``teacher.mode=none``; and the
decoder quickstart recipe with ``teacher.mode=none``.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from conftest import free_port, read_sib200_texts
from megadistill.data.binarize import binarize
from megadistill.models.scratch import random_xlmr_encoder, train_unigram_tokenizer

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sib200_dir):
    """A tiny encoder teacher and a tiny decoder teacher, with Hindi train/dev binarized for each."""
    root = tmp_path_factory.mktemp("stages")
    texts = read_sib200_texts(sib200_dir, "hin_Deva")
    tok = train_unigram_tokenizer(texts, vocab_size=600)
    random_xlmr_encoder(tok, num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64, max_positions=80,
                        seed=0).save_pretrained(root / "encoder")
    tok.save_pretrained(root / "encoder")
    tok = AutoTokenizer.from_pretrained(root / "encoder")
    for split in ("train", "dev"):
        binarize([sib200_dir / "hin_Deva" / f"{split}.tsv"], tok, root / "data" / f"enc.{split}", show_progress=False)
    return root


def run_train(workspace: Path, run_dir: Path, recipe: str, teacher: Path, data: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
           "--ds_config", "ds_configs/cpu_zero3.json", "--config", f"megadistill/recipes/{recipe}.yaml",
           f"run_dir={run_dir}", f"teacher.path={teacher}", f"data.train_prefixes=[{workspace / 'data' / data}.train]",
           f"data.valid_prefixes=[{workspace / 'data' / data}.dev]", "data.seq_len_tokens=32", "train.micro_batch_size=2",
           "train.grad_accum_steps=2", "train.max_steps=3", "train.eval_every_steps=0", "train.eval_max_batches=2",
           "train.save_every_steps=0", "optim.warmup_steps=1", "loss.chunk_size_tokens=16", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def records(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_masked_lm_distillation_distilbert_recipe(workspace):
    run_dir = workspace / "run_mlm"
    run_train(workspace, run_dir, "distilbert", workspace / "encoder", "enc")
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert r["kd"] > 0 and r["feat_hidden"] > 0 and r["ce"] > 0
        # DistilBERT's weighting: alpha_ce 5 (KD at T=2), alpha_mlm 2, alpha_cos 1 (already inside feat_hidden).
        assert r["loss"] == pytest.approx(2.0 * r["ce"] + 5.0 * r["kd"] + r["feat_hidden"], rel=1e-6)
        assert r["temperature"] == 2.0
        # About 15% of the 2 ranks x 2 x 2 windows x 32 tokens are predicted.
        assert 0.08 * 256 <= r["tokens"] <= 0.2 * 256
    valid = records(run_dir, "valid")
    assert len(valid) == 1 and valid[0]["step"] == 3 and valid[0]["kd"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["objective"] == "mlm" and summary["stage"] == "pre"
    student = AutoModelForMaskedLM.from_pretrained(run_dir / "hf")
    tok = AutoTokenizer.from_pretrained(run_dir / "hf")
    assert student.config.num_hidden_layers == 2 and student.config.vocab_size == len(tok)
    meta = json.loads((run_dir / "hf" / "megadistill.json").read_text())
    assert meta["layer_map"] == [1, 3]  # every:2 keeps the last layer
    ids = tok("नमस्ते दुनिया", return_tensors="pt").input_ids
    assert torch.isfinite(student(ids).logits).all()


def test_masked_lm_no_teacher_baseline(workspace):
    run_dir = workspace / "run_mlm_none"
    proc = run_train(workspace, run_dir, "distilbert", workspace / "encoder", "enc", "teacher.mode=none",
                     "features.hidden_weight=0")
    train = records(run_dir, "train")
    for r in train:
        assert r["kd"] == 0 and r["ce_weight"] == 1.0 and r["kd_weight"] == 0.0
        assert r["loss"] == pytest.approx(r["ce"], rel=1e-9)
    assert "teacher signal: none (mlm objective)" in proc.stdout + proc.stderr
    with_teacher = records(workspace / "run_mlm", "train") if (workspace / "run_mlm").exists() else None
    if with_teacher:  # same data, same tokens: the baseline is one override apart
        assert [r["tokens"] for r in train] == [r["tokens"] for r in with_teacher]


def test_causal_lm_no_teacher_baseline(workspace, tiny_tokenizer, sib200_dir):
    """The decoder quickstart recipe with teacher.mode=none: CE only, the teacher never runs, student exported."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"], bos_token_id=2, eos_token_id=1,
                           pad_token_id=0)
    Gemma3ForCausalLM(cfg).save_pretrained(workspace / "decoder")
    tiny_tokenizer.save_pretrained(workspace / "decoder")
    tok = AutoTokenizer.from_pretrained(workspace / "decoder")
    for split in ("train", "dev"):
        binarize([sib200_dir / "hin_Deva" / f"{split}.tsv"], tok, workspace / "data" / f"dec.{split}", show_progress=False)
    run_dir = workspace / "run_clm_none"
    proc = run_train(workspace, run_dir, "quickstart", workspace / "decoder", "dec", "teacher.mode=none",
                     "student.layer_map=1")
    assert "teacher signal: none (clm objective)" in proc.stdout + proc.stderr
    train = records(run_dir, "train")
    assert len(train) == 3 and all(r["kd"] == 0 and r["loss"] == pytest.approx(r["ce"], rel=1e-9) for r in train)
    assert train[-1]["ce"] < train[0]["ce"]
    assert (run_dir / "hf" / "config.json").is_file()


def test_masked_lm_resume_reproduces_the_loss_sequence(workspace):
    """Masks come from (seed, sample index): a run stopped after 2 steps and resumed repeats the fresh run's losses."""
    fresh = workspace / "run_mlm"
    if not (fresh / "metrics.jsonl").exists():
        run_train(workspace, fresh, "distilbert", workspace / "encoder", "enc")
    resumed = workspace / "run_mlm_resumed"
    run_train(workspace, resumed, "distilbert", workspace / "encoder", "enc", "train.exit_after_steps=2")
    assert not (resumed / "hf").exists()
    proc = run_train(workspace, resumed, "distilbert", workspace / "encoder", "enc")
    assert "resumed from step 2" in proc.stdout + proc.stderr
    expected = {r["step"]: r for r in records(fresh, "train")}
    got = {r["step"]: r for r in records(resumed, "train")}
    assert sorted(got) == [1, 2, 3]
    for step, r in expected.items():
        assert got[step]["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6), step
        assert got[step]["tokens"] == r["tokens"], step
