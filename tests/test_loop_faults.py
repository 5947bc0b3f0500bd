"""The loop survives numerical faults and signals on 2 gloo ranks (ZeRO-3, the real DeepSpeed engine).

- a NaN teacher signal on one rank's micro-batch: the step is skipped on every rank (no parameter
  or LR change), counted, and the next step trains again;
- ``train.max_bad_steps`` bad steps in a row stop the run with a one-line error on every rank;
- SIGTERM to one rank mid-step: every rank finishes that step, saves once, and returns ``stopped_by``.
"""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import loop_fault_worker as worker
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def launch(scenario: str, out_dir: Path, world: int = 2) -> list[dict]:
    """Run ``world`` spawned ranks of the worker on ``scenario``; return their results or fail with a traceback."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker.main, args=(r, world, port, str(out_dir), scenario)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in sorted(out_dir.glob("rank*.err"))]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def test_poisoned_micro_batch_is_skipped_and_counted(tmp_path):
    ranks = launch("skip", tmp_path)
    for result in ranks:
        steps = result["steps"]
        assert sorted(steps) == [1, 2, 3, 4, 5]
        assert not steps[3]["applied"] and math.isnan(steps[3]["loss"]), "the poisoned step must be skipped"
        assert all(steps[s]["applied"] and math.isfinite(steps[s]["loss"]) for s in (1, 2, 4, 5))
        assert steps[3]["checksum"] == steps[2]["checksum"], "a skipped step must not change the parameters"
        assert steps[4]["checksum"] != steps[3]["checksum"] and math.isfinite(steps[5]["checksum"])
        assert steps[3]["lr_next"] == steps[2]["lr_next"], "the LR schedule must not advance on a skipped step"
        assert [steps[s]["skipped_steps"] for s in (2, 3, 4)] == [0.0, 1.0, 1.0]
        assert result["totals"]["skipped_steps"] == 1 and result["state"]["skipped_steps"] == 1
        assert result["state"]["consumed_samples"] == 10, "the skipped step's samples are consumed, not replayed"


def test_consecutive_bad_steps_stop_the_run(tmp_path):
    for result in launch("max_bad", tmp_path):
        assert result["error"] is not None and "\n" not in result["error"]
        assert "2 steps in a row (to step 3)" in result["error"] and "train.max_bad_steps=2" in result["error"]
        assert "[[4], [5]]" in result["error"], "the message names the sample ids of every rank"
        assert sorted(result["steps"]) == [1, 2], "the failing step is not logged as trained"


def test_sigterm_on_one_rank_finishes_the_step_and_saves_everywhere(tmp_path):
    ranks = launch("sigterm", tmp_path)
    assert [r["totals"]["stopped_by"] for r in ranks] == ["SIGTERM", "a signal to another rank"]
    for result in ranks:
        assert sorted(result["steps"]) == [1, 2], "the step in flight finishes, no further step starts"
        assert result["saves"] == [2], "one checkpoint, at the step the signal interrupted"
        assert result["state"]["step"] == 2


def test_second_signal_exits_at_once(tmp_path):
    """The first SIGTERM only sets the flag (a repeat within 1 s is the same request); a later one exits with 128 + 15."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from megadistill.stop import GracefulStop
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding the same request: no exit
            time.sleep(1.2)
            print("requested", stop.requested, stop.signal_name, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("not reached", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + 15
    assert "requested True SIGTERM" in proc.stdout and "not reached" not in proc.stdout
    assert "exiting immediately" in proc.stderr


@pytest.mark.parametrize("text", ['{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "split": "tr'])
def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, text):
    from megadistill.logging import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text(text)
    MetricsLogger(tmp_path, enabled=True, resume_step=1).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "split": "train", "loss": 2.0}\n'


def test_loss_spike_is_marked_against_the_recent_mean(caplog):
    from collections import deque

    from megadistill.config import TrainConfig
    from megadistill.loop import LoopState, _check_spike

    train, recent = TrainConfig(spike_factor=3.0), deque(maxlen=20)
    flags = []
    for step, loss in enumerate([2.0, 2.1, 1.9, 2.0, 2.0, 7.0, 2.0, float("nan"), 2.0], start=1):
        metrics = {"loss": loss}
        _check_spike(train, LoopState(step=step), metrics, recent)
        flags.append(metrics.get("spike", 0.0))
    assert flags == [0, 0, 0, 0, 0, 1.0, 0, 0, 0], "only the 7.0 after five ~2.0 losses is a spike; NaN is not averaged"
    assert "step 6: loss spike 7.0000" in caplog.text
    assert len(recent) == 8 and all(math.isfinite(x) for x in recent)
    quiet = {"loss": 100.0}
    _check_spike(TrainConfig(spike_factor=0.0), LoopState(step=10), quiet, recent)
    assert "spike" not in quiet
