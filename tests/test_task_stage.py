"""The task stage end to end on 2 gloo ranks (ZeRO-3): fine-tune a teacher, task-distil students, offline = online.

Tiny models on SIB-200 Hindi: a 3-layer Gemma-3-shaped decoder teacher fine-tuned with
``tools/finetune.py`` (its hf_best/ keeps the label map), a 2-layer decoder student distilled from
it online and from cached logits (the same losses), ``alpha=1`` equal step for step to plain
fine-tuning (``teacher.mode=none``), and a tiny BERT encoder student distilled from the decoder
teacher (each model reads the text with its own tokenizer). Bad input ends as one line.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, BertConfig, BertForMaskedLM, Gemma3ForCausalLM, Gemma3TextConfig

from conftest import build_tiny_tokenizer, free_port, read_sib200_texts

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["science/technology", "travel", "politics", "sports", "health", "entertainment", "geography"]
COMMON = ["--data-dir", None, "--languages", "hin_Deva", "--protocol", "cpu", "train.max_steps=4", "train.eval_every_steps=2",
          "train.log_every_steps=1", "task.max_len_tokens=48", "train.micro_batch_size=4", "task.freeze_embeddings=false"]


def tiny_decoder(tok, layers: int, seed: int):
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, sliding_window=64,
        layer_types=["full_attention"] * layers))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, sib200_dir, bert_tokenizer):
    root = tmp_path_factory.mktemp("task")
    tok = build_tiny_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva"), 500)
    for name, layers, seed in (("teacher_lm", 3, 1), ("student_lm", 2, 2)):
        tiny_decoder(tok, layers, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    torch.manual_seed(3)
    BertForMaskedLM(BertConfig(vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    bert_tokenizer.save_pretrained(root / "bert")
    return root


def finetune(sib200_dir, *args, ranks: int = 2, check: bool = True) -> subprocess.CompletedProcess:
    common = [sib200_dir if a is None else a for a in COMMON]
    launcher = (["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
    cmd = [*launcher, "tools/finetune.py", *map(str, common), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir: Path, split: str = "train", key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["split"] == split]


@pytest.fixture(scope="module")
def teacher(workspace, sib200_dir):
    """The tiny decoder teacher fine-tuned on Hindi SIB-200 (teacher.mode=none), 2 ranks."""
    out = workspace / "teacher_ft"
    finetune(sib200_dir, "--model", workspace / "teacher_lm", "--out", out, "--seed", "5", "train.max_steps=6")
    return out


def test_finetuned_teacher_keeps_its_label_map_and_best_dev_checkpoint(teacher):
    model = AutoModelForSequenceClassification.from_pretrained(teacher / "hf_best")
    assert [model.config.id2label[i] for i in range(7)] == LABELS
    meta = json.loads((teacher / "hf_best" / "megadistill.json").read_text())
    dev = losses(teacher, "valid", "accuracy")
    assert meta["best"]["value"] == pytest.approx(max(dev)) and meta["protocol"] == "cpu" and meta["labels"] == LABELS
    assert all(k in json.loads((teacher / "summary.json").read_text()) for k in ("steps", "protocol", "parameters"))
    assert len(dev) == 3  # steps 2, 4, 6


def test_offline_equals_online_and_alpha_one_equals_plain_finetuning(workspace, teacher, sib200_dir):
    student = ["--model", workspace / "student_lm", "--seed", "9"]
    kd = ["--teacher", teacher / "hf_best", "--alpha", "0.3", "--temperature", "2"]
    finetune(sib200_dir, *student, *kd, "--out", workspace / "online")
    cache = workspace / "cache"
    subprocess.run([sys.executable, "tools/cache_teacher_logits.py", "--task", "--teacher", str(teacher / "hf_best"),
                    "--data-dir", str(sib200_dir), "--languages", "hin_Deva", "--max-len", "48", "--output", str(cache)],
                   cwd=ROOT, check=True, capture_output=True)
    finetune(sib200_dir, *student, *kd, "--teacher-logits", cache, "--out", workspace / "offline")
    online, offline = losses(workspace / "online"), losses(workspace / "offline")
    assert len(online) == 4 and online == pytest.approx(offline, rel=1e-5)
    assert min(losses(workspace / "online", key="kd")) > 0  # KD really contributed
    finetune(sib200_dir, *student, *kd[:2], "--alpha", "1.0", "--out", workspace / "alpha1")
    finetune(sib200_dir, *student, "--out", workspace / "plain")
    assert losses(workspace / "alpha1") == losses(workspace / "plain")
    assert losses(workspace / "alpha1") != pytest.approx(online, rel=1e-3)
    assert json.loads((workspace / "alpha1" / "summary.json").read_text())["teacher_mode"] == "none"


def test_encoder_student_distils_from_a_decoder_teacher_with_its_own_tokenizer(workspace, teacher, sib200_dir):
    out = workspace / "bert_kd"
    finetune(sib200_dir, "--model", workspace / "bert", "--teacher", teacher / "hf_best", "--alpha", "0.5", "--out", out)
    model = AutoModelForSequenceClassification.from_pretrained(out / "hf")
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 7
    assert min(losses(out, key="kd")) > 0


def test_teacher_without_classification_head_is_one_line(workspace, sib200_dir):
    proc = finetune(sib200_dir, "--model", workspace / "student_lm", "--teacher", workspace / "teacher_lm", "--alpha", "0.5",
                    "--out", workspace / "bad", ranks=1, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "has no sequence classification head" in lines[-1] and "tools/finetune.py" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_student_tokenizer_that_does_not_match_the_data_is_one_line(workspace, sib200_dir):
    # The BERT WordPiece vocabulary was built on Hindi: Santali (Ol Chiki) text is almost all [UNK].
    proc = finetune(sib200_dir, "--model", workspace / "bert", "--out", workspace / "bad_tok", "--languages", "sat_Olck",
                    ranks=1, check=False)
    assert proc.returncode == 2 and "to unk" in proc.stderr.strip().splitlines()[-1]


FUNCTION_WORDS = {"के", "में", "की", "से", "है", "और", "का", "को", "पर", "ने", "एक", "यह", "हैं", "भी", "कि", "था"}


def tag_of(word: str) -> str:
    if any(c.isdigit() for c in word):
        return "NUM"
    if not any(c.isalnum() for c in word):
        return "PUNCT"
    return "FUNC" if word in FUNCTION_WORDS else "WORD"


def test_token_classification_teacher_and_distilled_student(workspace, sib200_dir):
    """Tagging through the same stage: a BERT token-classification teacher, then a student distilled word by word."""
    data = workspace / "tagging" / "hin_Deva"
    data.mkdir(parents=True)
    for split in ("train", "dev"):
        lines = [json.dumps({"tokens": t.split(), "tags": [tag_of(w) for w in t.split()]}, ensure_ascii=False)
                 for t in read_sib200_texts(sib200_dir, "hin_Deva", split)[:200]]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tagging = ["--data-dir", workspace / "tagging", "--kind", "token"]
    finetune(sib200_dir, "--model", workspace / "bert", "--out", workspace / "tag_teacher", *tagging, "train.max_steps=40",
             "train.micro_batch_size=16", "optim.lr=0.003", "train.eval_every_steps=20", ranks=1)
    meta = json.loads((workspace / "tag_teacher" / "hf_best" / "megadistill.json").read_text())
    assert meta["labels"] == ["FUNC", "NUM", "PUNCT", "WORD"]
    # Word-level dev accuracy (first sub-tokens) beats always answering the majority tag.
    words = [tag_of(w) for t in read_sib200_texts(sib200_dir, "hin_Deva", "dev")[:200] for w in t.split()]
    majority = 100 * max(words.count(t) for t in set(words)) / len(words)
    assert meta["best"]["dev"]["accuracy"] > majority + 5
    out = workspace / "tag_student"
    finetune(sib200_dir, "--model", workspace / "bert", "--out", out, "--seed", "4", *tagging, "--teacher",
             workspace / "tag_teacher" / "hf_best", "--alpha", "0.5")
    model = AutoModelForTokenClassification.from_pretrained(out / "hf")
    assert [model.config.id2label[i] for i in range(4)] == ["FUNC", "NUM", "PUNCT", "WORD"]
    assert min(losses(out, key="kd")) > 0


def test_missing_teacher_is_named_before_anything_loads(workspace, sib200_dir, tmp_path):
    proc = finetune(sib200_dir, "--model", workspace / "student_lm", "--teacher", tmp_path / "no_such_teacher", "--alpha", "0.5",
                    "--out", workspace / "bad_teacher", ranks=1, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "teacher.path" in lines[-1] and "no_such_teacher" in lines[-1], proc.stderr[-2000:]
    assert not any("Traceback" in line for line in lines)


def test_killed_task_run_resumes_the_same_losses_and_best_checkpoint(workspace, teacher, sib200_dir):
    """SIGKILL the teacher's fine-tuning run (2 ranks) after step 3, rerun: the same losses, dev scores and hf_best."""
    import signal
    import time

    out = workspace / "teacher_ft_killed"
    args = ["--model", workspace / "teacher_lm", "--out", out, "--seed", "5", "train.max_steps=6", "train.save_every_steps=1"]
    common = [sib200_dir if a is None else a for a in COMMON]
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "tools/finetune.py", *map(str, common), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and sum('"split": "train"' in line for line in metrics.read_text().splitlines()) >= 3:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    while time.time() < deadline:  # until every rank of the group is gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    assert not (out / "hf").exists(), "the kill must land before the run finished"
    finetune(sib200_dir, *args)
    for split, key in (("train", "loss"), ("valid", "accuracy")):
        assert losses(out, split, key) == losses(teacher, split, key), split
    best = lambda d: json.loads((d / "hf_best" / "megadistill.json").read_text())["best"]  # noqa: E731
    assert best(out) == best(teacher)
