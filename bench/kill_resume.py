"""Benchmark: SIGKILL at random moments (mid-step, mid-save), rerun, compare with an uninterrupted run (issue 15).

Issue 15's guarantee: a run killed with SIGKILL at any moment and rerun with the same command
produces the same loss sequence as an uninterrupted run, bitwise on CPU. This is
``tests/test_train_e2e.py::test_killed_anywhere_resumes_the_same_loss_sequence`` at a larger
scale: more steps and more kills, the numbers printed instead of asserted.

Setup (in a temporary folder, or ``--workdir``): a Unigram tokenizer trained on SIB-200
hin_Deva train text, a random 4-layer Gemma 3 teacher (hidden 64), hin_Deva train/dev
binarized. Then, through the real ``deepspeed`` launcher (2 CPU ranks, gloo, ZeRO-3, a 2-layer
student, a checkpoint after every step):

1. one uninterrupted run of ``--steps`` steps;
2. a second run directory launched ``--kills`` times, its whole process group SIGKILLed each
   time at a seeded random moment (``random.Random(--seed)``): once a further step is logged,
   after a delay drawn from [0, ``--max-delay``] s; every third attempt instead the moment a
   ``checkpoints/.partial.*`` folder appears (mid-save);
3. one last launch of that directory, run to the end.

Printed: a table of the kills (kind: mid-save when a ``.partial.*`` folder existed at the
moment of the signal, else mid-step; the last train step logged; the step ``latest`` names
afterwards ("-": none yet) and whether it names a complete checkpoint folder; lost: logged steps
beyond it, the work the rerun repeats), then whether the final train losses and valid records equal the uninterrupted run's
bitwise (``==`` per step), leftover ``.partial.*`` / ``*.tmp`` files, and the wall times.
Exits 1 if a comparison fails or a kill left ``latest`` dangling.

    python bench/kill_resume.py [--steps 32] [--kills 10] [--seed 15] [--max-delay 2.0] [--workdir DIR]

SIB-200 is read from ``../shared/data/sib200`` beside the checkout (or ``MEGADISTILL_SIB200``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

PARTIAL = ".partial."
SHM = Path("/dev/shm")
SHM_REAPED = {"files": 0, "bytes": 0}  # DeepSpeed's shared-memory all-reduce buffers the launches left behind


def find_sib200() -> Path:
    """The SIB-200 directory; exits with one line saying how to fix it when hin_Deva is missing."""
    path = Path(os.environ.get("MEGADISTILL_SIB200", ROOT.parent / "shared" / "data" / "sib200"))
    if not (path / "hin_Deva" / "train.tsv").is_file() or not (path / "hin_Deva" / "dev.tsv").is_file():
        sys.exit(f"kill_resume: SIB-200 not found at {path} (need hin_Deva/train.tsv and dev.tsv): "
                 "put it at ../shared/data/sib200 beside the checkout or set MEGADISTILL_SIB200")
    return path


def read_texts(tsv: Path) -> list[str]:
    """The ``text`` column of one SIB-200 split, in file order."""
    with open(tsv, encoding="utf-8", newline="") as f:
        return [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def build_workspace(root: Path, sib200: Path) -> None:
    """Tokenizer + tiny Gemma 3 teacher in ``root/teacher``, binarized hin_Deva train/dev in ``root/data``."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from megadistill.data.binarize import binarize
    from megadistill.models.scratch import train_unigram_tokenizer

    tokenizer = decoder_tokenizer(train_unigram_tokenizer(read_texts(sib200 / "hin_Deva" / "train.tsv"), vocab_size=700))
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    Gemma3ForCausalLM(cfg).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    tok = AutoTokenizer.from_pretrained(root / "teacher")
    for split in ("train", "dev"):
        binarize([sib200 / "hin_Deva" / f"{split}.tsv"], tok, root / "data" / f"hin.{split}", show_progress=False)


def decoder_tokenizer(unigram):
    """``unigram`` (XLM-R framed ``<s> text </s>``, an encoder frame) re-framed for a causal LM: ``<s> text``.

    binarize then frames documents as a decoder's (BOS + text + EOS); no cls/sep/mask tokens.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = unigram.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", unigram.bos_token_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_cmd(workspace: Path, run_dir: Path, steps: int) -> list[str]:
    """The ``deepspeed`` command of the tests' tiny run, ``steps`` steps, a checkpoint after every step."""
    return [
        "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "megadistill/train.py",
        "--ds_config", "ds_configs/cpu_zero3.json", "--config", "megadistill/recipes/quickstart.yaml",
        f"run_dir={run_dir}", f"teacher.path={workspace / 'teacher'}",
        f"data.train_prefixes=[{workspace / 'data' / 'hin.train'}]",
        f"data.valid_prefixes=[{workspace / 'data' / 'hin.dev'}]",
        "data.seq_len_tokens=32", "student.layer_map=2", "train.micro_batch_size=2", "train.grad_accum_steps=2",
        f"train.max_steps={steps}", "train.eval_every_steps=3", "train.eval_max_batches=2", "train.save_every_steps=1",
        "optim.warmup_steps=2", "loss.chunk_size_tokens=16",
    ]


def launch(cmd: list[str], log_path: Path, trigger=None, timeout_s: float = 900) -> tuple[int, bool | None]:
    """Run ``cmd`` in its own session; SIGKILL its whole group when ``trigger()`` is true.

    Returns (exit code, partial-folder-present-just-before-the-kill or None when not killed).
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    before = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while proc.poll() is None and time.time() < deadline:
            if trigger is not None and trigger():
                before = has_partial(ckpt_dir_of(cmd))
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as SLURM's scancel does
                break
            time.sleep(0.02)
        try:
            proc.wait(timeout=120)
            wait_for_group(proc.pid, timeout_s=120)  # the ranks outlive the launcher, which dies at once
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            reap_shm(cmd[cmd.index("--master_port") + 1])
    return proc.returncode, before


def reap_shm(port: str) -> None:
    """Remove (and count) the ``/dev/shm`` all-reduce buffers of the run on ``port``, whose ranks are gone.

    DeepSpeed's CPU shm communication names them ``deepspeed_allreduce_buffer_<uid>_127.0.0.1_<port>_<rank>``
    and never unlinks them (2 x 66 MiB of RAM per run); ``megadistill.engine`` unlinks them once every
    rank mapped them, so a count above 0 means a kill landed before that or the fix regressed.
    """
    for path in SHM.glob(f"deepspeed_*127.0.0.1_{port}_*"):
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            SHM_REAPED["files"] += 1
            SHM_REAPED["bytes"] += size


def ckpt_dir_of(cmd: list[str]) -> Path:
    """``run_dir/checkpoints`` of a train command."""
    return Path(next(a for a in cmd if a.startswith("run_dir="))[len("run_dir="):]) / "checkpoints"


def wait_for_group(pgid: int, timeout_s: float) -> None:
    """Wait until no process of group ``pgid`` is left."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"process group {pgid} still running after {timeout_s} s")


def has_partial(ckpts: Path) -> bool:
    """Whether a ``.partial.*`` folder (a save in progress, or one a kill left) is in ``ckpts``."""
    with contextlib.suppress(FileNotFoundError):
        return any(p.name.startswith(PARTIAL) for p in ckpts.iterdir())
    return False


def records(run_dir: Path, split: str) -> list[dict]:
    """Whole ``metrics.jsonl`` records of ``split`` (a torn last line, from a kill mid-write, is skipped)."""
    path, out = run_dir / "metrics.jsonl", []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if record.get("split") == split:
                out.append(record)
    return out


def last_train_step(run_dir: Path) -> int:
    """The highest train step in ``metrics.jsonl`` (0 when none)."""
    return max((r["step"] for r in records(run_dir, "train")), default=0)


def random_trigger(run_dir: Path, delay: float):
    """True ``delay`` s after a train step beyond the currently logged one appears."""
    begin, fire = last_train_step(run_dir), []

    def trigger() -> bool:
        if not fire and last_train_step(run_dir) > begin:
            fire.append(time.time() + delay)
        return bool(fire) and time.time() >= fire[0]
    return trigger


def mid_save_trigger(run_dir: Path):
    """True the moment a new ``.partial.*`` folder exists (one a previous kill left is removed at resume first)."""
    ckpts, armed = run_dir / "checkpoints", []

    def trigger() -> bool:
        present = has_partial(ckpts)
        if not armed:
            if not present:
                armed.append(True)
            return False
        return present
    return trigger


def latest_state(run_dir: Path) -> tuple[int | None, bool | None]:
    """(step ``latest`` names, whether its ``step_*`` folder holds both ranks' model and optimizer shards).

    (None, None) when there is no ``latest`` yet (the rerun starts afresh).
    """
    ckpts = run_dir / "checkpoints"
    try:
        tag = (ckpts / "latest").read_text().strip()
    except FileNotFoundError:
        return None, None
    folder = ckpts / tag
    shards = [folder / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    complete = tag.startswith("step_") and tag[5:].isdigit() and all(p.is_file() and p.stat().st_size for p in shards)
    return (int(tag[5:]) if tag[5:].isdigit() else -1), complete


def kill_attempts(workspace: Path, run_dir: Path, args, logs: Path) -> list[dict]:
    """SIGKILL ``run_dir``'s run ``args.kills`` times; one row per attempt."""
    rng, rows = random.Random(args.seed), []
    for attempt in range(1, args.kills + 1):
        aim = "mid-save" if attempt % 3 == 0 else "random"
        delay = None if aim == "mid-save" else rng.uniform(0.0, args.max_delay)
        trigger = mid_save_trigger(run_dir) if aim == "mid-save" else random_trigger(run_dir, delay)
        start = time.time()
        rc, before = launch(train_cmd(workspace, run_dir, args.steps), logs / f"kill_{attempt}.log", trigger)
        step, complete = latest_state(run_dir)
        logged = last_train_step(run_dir)
        kind = "none (finished)" if before is None else ("mid-save" if before else "mid-step")
        rows.append({"attempt": attempt, "aim": aim, "delay": delay, "kind": kind, "rc": rc, "latest": step,
                     "complete": complete, "logged": logged, "lost": max(logged - (step or 0), 0),
                     "seconds": time.time() - start})
        print_row(rows[-1])
        if before is None:
            print(f"        the run reached step {args.steps} before kill {attempt}: raise --steps for more kills")
            break
    return rows


def print_row(r: dict) -> None:
    """One line of the kill table."""
    delay = "-" if r["delay"] is None else f"{r['delay']:.2f}"
    latest = "-" if r["latest"] is None else str(r["latest"])
    complete = "-" if r["complete"] is None else str(r["complete"])
    print(f"{r['attempt']:>7} {r['aim']:>8} {delay:>7} {r['kind']:>9} {r['rc']:>5} {r['logged']:>7} {latest:>7} "
          f"{complete:>9} {r['lost']:>5} {r['seconds']:>8.1f}", flush=True)


def compare(expected: Path, got: Path) -> tuple[bool, bool, list[str]]:
    """(train losses equal per step, valid records equal per step, descriptions of the differences)."""
    diffs = []
    e_loss = {r["step"]: r["loss"] for r in records(expected, "train")}
    g_loss = {r["step"]: r["loss"] for r in records(got, "train")}
    train_ok = e_loss == g_loss and len(records(got, "train")) == len(e_loss)
    for step in sorted(set(e_loss) | set(g_loss)):
        if e_loss.get(step) != g_loss.get(step):
            diffs.append(f"train step {step}: {e_loss.get(step)!r} vs {g_loss.get(step)!r}")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    e_valid, g_valid = strip(records(expected, "valid")), strip(records(got, "valid"))
    valid_ok = e_valid == g_valid and bool(e_valid)
    if not valid_ok:
        diffs.append(f"valid records: {e_valid} vs {g_valid}")
    return train_ok, valid_ok, diffs


def leftovers(run_dir: Path) -> list[str]:
    """Paths under ``run_dir`` named ``.partial.*`` or ``*.tmp`` (what a kill could leave behind)."""
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                  if p.name.startswith(PARTIAL) or p.name.endswith(".tmp"))


def run_all(workdir: Path, args) -> int:
    """Setup, the uninterrupted run, the killed runs, the last run; print the report; return the exit code."""
    t0 = time.time()
    build_workspace(workdir, find_sib200())
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    t_setup = time.time() - t0
    fresh, killed = workdir / "run_fresh", workdir / "run_killed"
    t1 = time.time()
    rc, _ = launch(train_cmd(workdir, fresh, args.steps), logs / "fresh.log")
    t_fresh = time.time() - t1
    if rc != 0:
        print((logs / "fresh.log").read_text()[-4000:])
        sys.exit(f"kill_resume: the uninterrupted run failed (exit {rc}); log {logs / 'fresh.log'}")
    print(f"uninterrupted run: {args.steps} steps in {t_fresh:.0f} s (setup {t_setup:.0f} s); seed {args.seed}, "
          f"max delay {args.max_delay} s, workdir {workdir}")
    print(f"{'attempt':>7} {'aim':>8} {'delay_s':>7} {'kind':>9} {'rc':>5} {'logged':>7} {'latest':>7} "
          f"{'complete':>9} {'lost':>5} {'seconds':>8}")
    t2 = time.time()
    rows = kill_attempts(workdir, killed, args, logs)
    rc, _ = launch(train_cmd(workdir, killed, args.steps), logs / "final.log")
    t_killed = time.time() - t2
    return report(fresh, killed, rows, rc, logs, t_fresh, t_killed, time.time() - t0)


def report(fresh: Path, killed: Path, rows: list[dict], final_rc: int, logs: Path,
           t_fresh: float, t_killed: float, t_total: float) -> int:
    """Print the summary lines; return 0 when everything held, else 1."""
    kills = [r for r in rows if r["kind"] != "none (finished)"]
    survived = sum(r["complete"] is not False for r in kills)  # no `latest` yet: the rerun starts afresh
    train_ok, valid_ok, diffs = compare(fresh, killed)
    left = leftovers(killed)
    kinds = {k: sum(r["kind"] == k for r in kills) for k in ("mid-step", "mid-save")}
    print(f"kills: {len(kills)} ({kinds['mid-step']} mid-step, {kinds['mid-save']} mid-save); "
          f"latest named a complete checkpoint after {survived}/{len(kills)}")
    print(f"final run: exit {final_rc}; {len(records(killed, 'train'))} train steps logged "
          f"(uninterrupted: {len(records(fresh, 'train'))})")
    print(f"train losses bitwise equal to the uninterrupted run: {train_ok}")
    print(f"valid records bitwise equal to the uninterrupted run: {valid_ok} ({len(records(fresh, 'valid'))} records)")
    for line in diffs[:10]:
        print(f"  differs: {line}")
    print(f"steps re-done (logged beyond the checkpoint at each kill): {sum(r['lost'] for r in kills)}")
    print(f"leftover .partial.* / *.tmp at the end: {len(left)}{' ' + ', '.join(left) if left else ''}")
    print(f"/dev/shm buffers left by the {len(rows) + 2} launches (removed): {SHM_REAPED['files']} files, "
          f"{SHM_REAPED['bytes'] / 2**20:.0f} MiB")
    print(f"wall time: uninterrupted {t_fresh:.0f} s, killed + resumed {t_killed:.0f} s, total {t_total:.0f} s")
    ok = final_rc == 0 and train_ok and valid_ok and survived == len(kills) and not left
    if final_rc != 0:
        print(f"final run failed: log {logs / 'final.log'}")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=32, help="train.max_steps of both runs")
    p.add_argument("--kills", type=int, default=10, help="SIGKILL attempts on the second run")
    p.add_argument("--seed", type=int, default=15, help="seed of the kill delays")
    p.add_argument("--max-delay", type=float, default=2.0, help="random kills: at most this long after a new step, s")
    p.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return run_all(args.workdir.resolve(), args)
    with tempfile.TemporaryDirectory(prefix="kill_resume.") as tmp:
        return run_all(Path(tmp), args)


if __name__ == "__main__":
    sys.exit(main())
