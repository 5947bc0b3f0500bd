"""End to end through the real ``deepspeed`` launcher: 2 CPU ranks on gloo, ZeRO-3, tiny models.

One fresh run of 6 steps; a second run that stops after 3 steps (``train.exit_after_steps``)
and is resumed by rerunning the same command must reproduce the same loss sequence; the
exported student loads with ``AutoModelForCausalLM`` and its tokenizer yields student ids.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (build_tiny_tokenizer, free_port, read_sib200_texts, remount_tmpfs, save_tiny_gemma_teacher,
                      small_tmpfs)
from megadistill.data.binarize import binarize

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer, sib200_dir):
    """A tiny Gemma 3 teacher directory and binarized Hindi train/dev data."""
    root = tmp_path_factory.mktemp("e2e")
    save_tiny_gemma_teacher(root / "teacher", tiny_tokenizer)
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    binarize([sib200_dir / "hin_Deva" / "train.tsv"], tok, root / "data" / "hin.train", show_progress=False)
    binarize([sib200_dir / "hin_Deva" / "dev.tsv"], tok, root / "data" / "hin.dev", show_progress=False)
    return root


def train_args(workspace: Path, run_dir: Path, *extra: str) -> list[str]:
    """``megadistill/train.py`` arguments of the tiny 2-layer quickstart run (6 steps)."""
    return [
        "--ds_config", "ds_configs/cpu_zero3.json", "--config", "megadistill/recipes/quickstart.yaml",
        f"run_dir={run_dir}", f"teacher.path={workspace / 'teacher'}",
        f"data.train_prefixes=[{workspace / 'data' / 'hin.train'}]",
        f"data.valid_prefixes=[{workspace / 'data' / 'hin.dev'}]",
        "data.seq_len_tokens=32", "student.layer_map=2", "train.micro_batch_size=2", "train.grad_accum_steps=2",
        "train.max_steps=6", "train.eval_every_steps=3", "train.eval_max_batches=2", "train.save_every_steps=3",
        "optim.warmup_steps=2", "loss.chunk_size_tokens=16", "loss.ce_weight=0.5", "loss.kd_weight=0.5", *extra,
    ]


def run_train(workspace: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
           *train_args(workspace, run_dir, *extra)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


@pytest.fixture(scope="module")
def fresh_run(workspace):
    run_dir = workspace / "run_fresh"
    run_train(workspace, run_dir)
    return run_dir


def test_run_completes_checkpoints_and_exports(fresh_run):
    losses = train_losses(fresh_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(v == v and v > 0 for v in losses.values())
    records = [json.loads(line) for line in (fresh_run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["split"] == "train"]
    assert lrs[0] > 0 and lrs[1] == pytest.approx(2 * lrs[0]), "warmup must train from the first step"
    ckpts = fresh_run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000006"
    assert (ckpts / "step_0000003").is_dir()
    summary = json.loads((fresh_run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 2 and summary["tokens_per_s"] > 0
    assert (fresh_run / "config.yaml").is_file()
    assert any((fresh_run / "tensorboard").iterdir())


def test_resume_reproduces_loss_sequence(workspace, fresh_run):
    run_dir = workspace / "run_resumed"
    run_train(workspace, run_dir, "train.exit_after_steps=3")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert not (run_dir / "hf").exists()
    proc = run_train(workspace, run_dir)
    assert "resumed from step 3" in proc.stderr + proc.stdout
    expected, got = train_losses(fresh_run), train_losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_exported_student_loads_and_matches_vocab(workspace, fresh_run):
    hf = fresh_run / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tok = AutoTokenizer.from_pretrained(hf)
    vocab_map = json.loads((hf / "vocab_map.json").read_text())
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tok) == len(vocab_map["student_to_teacher"])
    text = read_sib200_texts(Path(os.environ.get("MEGADISTILL_SIB200", ROOT.parent / "shared/data/sib200")), "hin_Deva")[0]
    ids = tok(text, return_tensors="pt").input_ids
    assert int(ids.max()) < len(tok)
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    init = AutoModelForCausalLM.from_pretrained(fresh_run / "hf_init")
    moved = [not torch.equal(a, b) for a, b in zip(model.state_dict().values(), init.state_dict().values())]
    assert any(moved), "distillation did not change the student"


def test_bad_input_fails_with_one_line(workspace, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "megadistill/train.py", "--ds_config", "ds_configs/cpu_zero3.json",
            "--config", "megadistill/recipes/quickstart.yaml", f"run_dir={tmp_path / 'r'}",
            f"data.train_prefixes=[{workspace / 'data' / 'hin.train'}]", "data.valid_prefixes=[]"]
    proc = subprocess.run(base + ["train.max_step=3"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'train.max_steps'" in proc.stderr
    proc = subprocess.run(base + [f"teacher.path={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_data_from_another_tokenizer_is_refused(workspace, tmp_path, sib200_dir):
    other = build_tiny_tokenizer(read_sib200_texts(sib200_dir, "hin_Deva"), vocab_size=500)
    binarize([sib200_dir / "hin_Deva" / "dev.tsv"], other, tmp_path / "other", show_progress=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "megadistill/train.py", "--ds_config", "ds_configs/cpu_zero3.json",
           "--config", "megadistill/recipes/quickstart.yaml", f"run_dir={tmp_path / 'r'}",
           f"teacher.path={workspace / 'teacher'}", f"data.train_prefixes=[{tmp_path / 'other'}]", "data.valid_prefixes=[]"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "re-binarize" in proc.stderr and "Traceback" not in proc.stderr


def metric_records(run_dir: Path, split: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["split"] == split]


def test_offline_cache_run_with_reverse_kl_and_schedule(workspace):
    """Cache top-8 once, then train 2 ranks from it without the teacher; a cache from other windows is refused."""
    cache = workspace / "cache_top8"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "tools/cache_teacher_logits.py", "--teacher", str(workspace / "teacher"), "--data",
         str(workspace / "data" / "hin.train"), "--output", str(cache), "--seq-len", "32", "--seed", "1234", "--k", "8",
         "--windows-per-shard", "64", "--window-bos"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = workspace / "run_offline"
    run_train(workspace, run_dir, "teacher.mode=offline", f"teacher.logit_cache={cache}", "loss.divergence=reverse_kl",
              "loss.schedule=linear", "loss.kd_weight_end=1.0", "train.max_steps=4", "train.save_every_steps=0")
    train = metric_records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["kd"] > 0 for r in train)
    weights = [r["kd_weight"] for r in train]
    assert weights == sorted(weights) and weights[0] == 0.5 and weights[-1] > weights[0]
    assert all(r["kd"] == 0 for r in metric_records(run_dir, "valid"))  # the cache covers training windows only
    assert (run_dir / "hf" / "config.json").is_file()
    bad = subprocess.run(
        [sys.executable, "megadistill/train.py", "--ds_config", "ds_configs/cpu_zero3.json", "--config",
         "megadistill/recipes/quickstart.yaml", f"run_dir={workspace / 'run_bad_cache'}", f"teacher.path={workspace / 'teacher'}",
         f"data.train_prefixes=[{workspace / 'data' / 'hin.train'}]", "data.valid_prefixes=[]", "data.seq_len_tokens=32",
         "teacher.mode=offline", f"teacher.logit_cache={cache}", "train.seed=99"],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "seed is 1234 in the cache but 99" in bad.stderr and "Traceback" not in bad.stderr


def test_feature_matching_and_online_topk_run(workspace):
    """Hidden + attention + relation matching with tv on online top-8 targets, 2 ranks under ZeRO-3."""
    run_dir = workspace / "run_features"
    run_train(workspace, run_dir, "features.hidden_weight=1.0", "features.attention_weight=0.5",
              "features.relation_weight=0.5", "features.relation_heads=2", "loss.divergence=tv", "loss.top_k=8",
              "train.max_steps=3", "train.save_every_steps=0", "train.eval_every_steps=0")
    train = metric_records(run_dir, "train")
    assert len(train) == 3
    for r in train:
        assert r["feat_hidden"] > 0 and r["feat_attention"] > 0 and r["feat_relation"] > 0 and r["kd"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"] + r["feat_hidden"] + r["feat_attention"]
                                          + r["feat_relation"], rel=1e-6)
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert not any("projector" in k for k in exported.state_dict())


def launch_and_interrupt(workspace: Path, run_dir: Path, trigger, sig: int, log_path: Path) -> int:
    """Start a 2-rank run in its own session; when ``trigger()`` is true send ``sig`` to its whole process group."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
           *train_args(workspace, run_dir, "train.save_every_steps=1")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            if trigger():
                os.killpg(proc.pid, sig)  # the whole group, as SLURM's scancel and Ctrl-C do
                break
            time.sleep(0.02)
        proc.wait(timeout=120)
        try:
            wait_for_group(proc.pid, timeout_s=120)  # the ranks outlive the runner, which dies at once
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def wait_for_group(pgid: int, timeout_s: float) -> None:
    """Wait until no process of group ``pgid`` is left."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process group {pgid} still running after {timeout_s} s")


def shm_segments() -> set[str]:
    """Names of DeepSpeed's CPU all-reduce shared-memory segments present now."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def mid_save(run_dir: Path) -> bool:
    ckpts = run_dir / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith(".partial.") for p in ckpts.iterdir())


def test_killed_anywhere_resumes_the_same_loss_sequence(workspace, fresh_run, tmp_path):
    """SIGTERM (graceful), SIGKILL in the middle of a checkpoint save, and SIGKILL at random moments; then
    one run to the end: the loss sequence equals the uninterrupted run's bitwise, nothing partial remains."""
    import random

    rng = random.Random(15)
    run_dir = workspace / "run_killed"
    start = time.time()
    shm_before = shm_segments()
    # 1: SIGTERM once step 2 is logged: that step finishes, is saved, the ranks exit 0.
    launch_and_interrupt(workspace, run_dir, lambda: logged_steps(run_dir) >= 2, signal.SIGTERM, tmp_path / "term.log")
    out = (tmp_path / "term.log").read_text()
    assert "stopped by SIGTERM after step" in out and "Traceback" not in out, out[-3000:]
    assert not mid_save(run_dir)
    resumed_at = int((run_dir / "checkpoints" / "latest").read_text().strip()[5:])
    assert resumed_at >= 2
    # 2: SIGKILL as soon as a save has started writing (a partial folder exists).
    launch_and_interrupt(workspace, run_dir, lambda: mid_save(run_dir), signal.SIGKILL, tmp_path / "kill_save.log")
    assert mid_save(run_dir), "the kill was meant to land inside a save"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest).is_dir(), "latest must name a complete checkpoint after a kill mid-save"
    # 3, 4: SIGKILL at random moments after a further step started.
    for attempt in range(2):
        begin, delay = logged_steps(run_dir), rng.uniform(0.0, 1.5)
        fire = []

        def trigger():
            if not fire and logged_steps(run_dir) > begin:
                fire.append(time.time() + delay)
            return bool(fire) and time.time() >= fire[0]

        launch_and_interrupt(workspace, run_dir, trigger, signal.SIGKILL, tmp_path / f"kill_{attempt}.log")
    # The last run goes to the end.
    proc = run_train(workspace, run_dir, "train.save_every_steps=1")
    assert "resumed from step" in proc.stdout + proc.stderr
    expected, got = train_losses(fresh_run), train_losses(run_dir)
    assert sorted(got) == sorted(expected)
    assert got == expected, "resumed runs must repeat the uninterrupted losses bitwise on CPU"
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(("step_", ".partial"))) == ["step_0000005", "step_0000006"]
    assert (run_dir / "hf" / "config.json").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert shm_segments() <= shm_before, "DeepSpeed's shm all-reduce segments must not outlive (killed) runs"
    print(f"interrupted 4 times (SIGTERM at step {resumed_at}, SIGKILL mid-save, 2 random SIGKILLs) in {time.time() - start:.0f} s")


def enospc_on_third_save(hook_dir: Path) -> Path:
    """A ``sitecustomize`` directory whose ``torch.save`` raises ENOSPC for files of ``.partial.step_0000003``."""
    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(textwrap.dedent("""
        import errno
        import torch

        _save = torch.save

        def save(obj, f, *args, **kwargs):
            if ".partial.step_0000003" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            return _save(obj, f, *args, **kwargs)

        torch.save = save
    """))
    return hook_dir


def test_full_disk_during_checkpointing_keeps_the_last_checkpoint(workspace, fresh_run, tmp_path):
    """The run directory on a tmpfs with room for two checkpoints: the third save fails with one line, the
    two earlier checkpoints stay complete, nothing partial remains; with more room the rerun resumes and
    repeats the uninterrupted losses."""
    from megadistill.files import tree_bytes

    ckpt = tree_bytes(fresh_run / "checkpoints" / "step_0000006")
    rest = sum(tree_bytes(p) if p.is_dir() else p.stat().st_size for p in fresh_run.iterdir() if p.name not in ("checkpoints", "hf"))
    mount = tmp_path / "small"
    with small_tmpfs(mount, rest + int(2.5 * ckpt) + 256 * 1024) as mounted:
        run_dir = (mount if mounted else tmp_path) / "run"
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
               *train_args(workspace, run_dir, "train.save_every_steps=1")]
        # Without root (no tmpfs), the third save meets the same ENOSPC through an injected torch.save.
        hook = "" if mounted else f"{enospc_on_third_save(tmp_path / 'hook')}{os.pathsep}"
        env = dict(os.environ, PYTHONPATH=f"{hook}{ROOT}", PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        errors = [line for line in out.splitlines() if line.startswith("megadistill.train: error:")]
        assert errors and "disk full" in errors[0] and "needs about" in errors[0] and "still names step_" in errors[0], out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        ckpts = run_dir / "checkpoints"
        kept = sorted(p.name for p in ckpts.iterdir() if p.name.startswith(("step_", ".partial")))
        latest = (ckpts / "latest").read_text().strip()
        assert latest in kept and all(n.startswith("step_") for n in kept), kept
        failed_at = int(latest[5:]) + 1
        assert f"checkpoint {ckpts / f'step_{failed_at:07d}'} not saved" in errors[0]
        if mounted:
            remount_tmpfs(mount, f"size={64 * 2**20}")
        again = run_train(workspace, run_dir, "train.save_every_steps=1")
        assert f"resumed from step {int(latest[5:])}" in again.stdout + again.stderr
        assert train_losses(run_dir) == train_losses(fresh_run)


def test_unwritable_run_dir_is_one_line_through_the_console_entry(workspace, tmp_path):
    """``megadistill-train`` (the console entry) with run_dir on a read-only filesystem, and run_dir a file."""
    ro = tmp_path / "ro"
    base = ["--ds_config", "ds_configs/cpu_zero3.json", "--config", "megadistill/recipes/quickstart.yaml",
            f"teacher.path={workspace / 'teacher'}", f"data.train_prefixes=[{workspace / 'data' / 'hin.train'}]"]
    entry = [str(Path(sys.executable).parent / "megadistill-train")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    (tmp_path / "a_file").write_text("")
    proc = subprocess.run(entry + base + [f"run_dir={tmp_path / 'a_file'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"megadistill.train: error: run_dir {tmp_path / 'a_file'} exists and is not a directory: choose another run_dir")
    with small_tmpfs(ro, 1 << 20) as mounted:
        if mounted:
            remount_tmpfs(ro, "ro")
        else:  # without root: a folder this user may not write to (root would ignore the mode)
            ro.chmod(0o555)
        proc = subprocess.run(entry + base + [f"run_dir={ro / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1]
    reason = "Read-only file system" if mounted else "Permission denied"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"megadistill.train: error: run_dir {ro / 'run'} is not writable ({reason})"), last


def test_offline_run_killed_resumes_the_cache_reads(workspace):
    """From the top-8 cache (built by the offline test above): SIGKILL after step 2, rerun; the losses equal the
    uninterrupted offline run's (the cache is read by window id, so the resumed run reads where it stopped)."""
    cache, fresh = workspace / "cache_top8", workspace / "run_offline"
    assert (cache / "meta.json").is_file() and (fresh / "metrics.jsonl").is_file(), "runs after the offline test"
    args = ["teacher.mode=offline", f"teacher.logit_cache={cache}", "loss.divergence=reverse_kl", "loss.schedule=linear",
            "loss.kd_weight_end=1.0", "train.max_steps=4"]
    run_dir = workspace / "run_offline_killed"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
           *train_args(workspace, run_dir, *args, "train.save_every_steps=1")]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if logged_steps(run_dir) >= 2:  # two train records (no eval before step 3)
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    wait_for_group(proc.pid, timeout_s=60)
    assert not (run_dir / "hf").exists()
    run_train(workspace, run_dir, *args, "train.save_every_steps=1")
    assert train_losses(run_dir) == train_losses(fresh)
