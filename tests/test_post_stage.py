"""Post-training distillation end to end: 2 CPU ranks, ZeRO-3, a tiny Gemma 3 "trained model" reduced and healed.

* lambda = 0 is supervised KD: dropping layers [1, 2] in ``stage: post`` trains exactly like
  ``stage: pre`` with the student built from teacher layers [0, 3] (same losses every step).
* one on-policy step (lambda = 1) has the generalized JSD(0.5) a hand computation gives on the
  same samples (read back from ``onpolicy/rank*.jsonl``), with the sampling time reported.
* reduction by importance (``tools/importance.py``): the least important layer dropped, heads and
  MLP channels pruned; ``hf_init/`` (reduced) and ``hf/`` (healed) reload with ``from_pretrained``.
"""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import free_port, save_tiny_gemma_teacher
from megadistill.data.binarize import binarize
from megadistill.models.vocab import VocabMap

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """A 4-layer tiny Gemma 3 (the model to compress) and SIB-200 Hindi train/dev binarized with its tokenizer."""
    root = tmp_path_factory.mktemp("post")
    save_tiny_gemma_teacher(root / "teacher", tiny_tokenizer)
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    for split in ("train", "dev"):
        binarize([sib200_dir / "hin_Deva" / f"{split}.tsv"], tok, root / "data" / f"hin.{split}", show_progress=False)
    return root


def args(ws: Path, run_dir: Path, *extra: str) -> list[str]:
    d = ws / "data"
    return ["--ds_config", "ds_configs/cpu_zero3.json", f"run_dir={run_dir}", f"teacher.path={ws / 'teacher'}",
            f"data.train_prefixes=[{d / 'hin.train'}]", f"data.valid_prefixes=[{d / 'hin.dev'}]",
            "data.seq_len_tokens=32", "train.micro_batch_size=2", "train.max_steps=3", "train.eval_every_steps=3",
            "train.eval_max_batches=2", "train.save_every_steps=3", "optim.warmup_steps=1", "loss.chunk_size_tokens=16",
            *extra]


def run_ok(ws: Path, run_dir: Path, *extra: str) -> dict[int, dict]:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
           *args(ws, run_dir, *extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["split"] == "train"}


def test_lambda_zero_equals_supervised_kd_from_the_same_layers(workspace):
    post = run_ok(workspace, workspace / "post", "stage=post", "post.drop_layers=[1,2]")
    pre = run_ok(workspace, workspace / "pre", "stage=pre", "student.layer_map=[0,3]")
    assert sorted(post) == [1, 2, 3]
    assert [post[s]["loss"] for s in (1, 2, 3)] == [pre[s]["loss"] for s in (1, 2, 3)]
    assert all(post[s]["kd"] > 0 and "generate_s" not in post[s] for s in post)
    reduced = json.loads((workspace / "post" / "hf_init" / "megadistill.json").read_text())
    healed = json.loads((workspace / "post" / "hf" / "megadistill.json").read_text())
    assert (reduced["stage"], healed["stage"], healed["layer_map"]) == ("reduced", "healed", [0, 3])
    summary = json.loads((workspace / "post" / "summary.json").read_text())
    assert summary["reduction"]["dropped_layers"] == [1, 2]


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD(beta) per row, written out from GKD's definition (m = beta p + (1 - beta) q)."""
    p, q = log_p.exp(), log_q.exp()
    m = beta * p + (1 - beta) * q
    return beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)


def test_one_on_policy_step_matches_a_hand_computed_jsd(workspace):
    run_dir = workspace / "gkd"
    metrics = run_ok(workspace, run_dir, "stage=post", "post.drop_layers=[1,2]", "post.on_policy=1.0",
                     "post.prompt_tokens=6", "post.max_new_tokens=12", "post.save_samples=true", "train.max_steps=1",
                     "train.eval_every_steps=0", "loss.ce_weight=0", "loss.kd_weight=1", "loss.divergence=jsd",
                     "loss.jsd_beta=0.5")
    step = metrics[1]
    assert step["on_policy_batches"] == 1 and step["generate_s"] > 0 and step["batch_s"] >= step["generate_s"]
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher", dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(run_dir / "hf_init", dtype=torch.float32).eval()
    vocab = VocabMap.load(run_dir / "hf_init" / "vocab_map.json")
    kept = torch.from_numpy(vocab.student_to_teacher).long()
    total, count = 0.0, 0
    for rank in (0, 1):
        (line,) = (run_dir / "onpolicy" / f"rank{rank}.jsonl").read_text().splitlines()
        record = json.loads(line)
        seq, teacher_seq = torch.tensor(record["sequences"]), torch.tensor(record["teacher_sequences"])
        sampled = torch.tensor(record["generated"])[:, 1:]  # label i is token i + 1
        assert torch.equal(kept[seq], teacher_seq)
        with torch.no_grad():
            log_q = torch.log_softmax(student(seq[:, :-1]).logits.double(), -1)
            log_p = torch.log_softmax(teacher(teacher_seq[:, :-1]).logits.double()[..., kept], -1)
        rows = _jsd(log_p, log_q, 0.5)[sampled]
        total, count = total + rows.sum().item(), count + rows.numel()
    assert count > 0
    assert step["kd"] == pytest.approx(total / count, rel=1e-4)
    assert math.isfinite(step["loss"]) and step["ce_weight"] == 0


def test_reduction_by_importance_prunes_depth_heads_and_mlp(workspace, tmp_path):
    from megadistill.importance import Importance

    d = workspace / "data"
    out = tmp_path / "imp"
    proc = subprocess.run(["python", "tools/importance.py", "--model", str(workspace / "teacher"), "--data",
                           str(d / "hin.train"), "--documents", "16", "--seq-len", "32", "--micro-batch-size", "4",
                           "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    importance = Importance.load(out / "importance.json")
    run_dir = tmp_path / "pruned"
    run_ok(workspace, run_dir, "stage=post", f"post.importance={out / 'importance.json'}", "post.drop_layers=1",
           "post.keep_heads=1", "post.keep_mlp=64", "train.max_steps=2", "train.eval_every_steps=2")
    dropped = importance.least_important_layers(1, "cosine")
    for name in ("hf_init", "hf"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / name)
        config = model.config
        assert (config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (3, 1, 64)
        assert json.loads((run_dir / name / "megadistill.json").read_text())["layer_map"] == [
            i for i in range(4) if i not in dropped]
