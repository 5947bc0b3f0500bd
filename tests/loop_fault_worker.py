"""One rank of the loop fault tests (run by tests/test_loop_faults.py in spawned processes).

The tiny ZeRO-3 student of ``zero3_loss_worker`` trained by the real loop (:func:`megadistill.loop.run`)
on 2 gloo ranks, in three scenarios:

- ``skip``: rank 1's teacher signal of step 3 is NaN (the poisoned micro-batch); records every step's
  metrics, whether the engine applied it, its LR and a checksum of the gathered parameters;
- ``max_bad``: the teacher signal of steps 2 and 3 is NaN on rank 0 and ``train.max_bad_steps=2``;
  records the error;
- ``sigterm``: rank 0 alone receives a real SIGTERM in the middle of step 2 (inside
  :class:`megadistill.stop.GracefulStop`); records the steps run, the saves and ``stopped_by``.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zero3_loss_worker as base  # noqa: E402

POISON = {"skip": {(3, 1)}, "max_bad": {(2, 0), (3, 0)}, "sigterm": set()}


def make_batch(index: int) -> dict:
    """The micro-batch of global sample ``index`` (same on every run): 16 token ids, 12 labels, teacher hidden states."""
    g = torch.Generator().manual_seed(100 + index)
    ids = torch.randint(0, base.VOCAB, (1, base.SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, 12:] = -100
    return {"input_ids": ids[:, :-1], "labels": labels, "dropped_tokens": torch.tensor(0), "samples": 2,
            "window_ids": [index], "t_hidden": torch.randn(1, base.SEQ, base.TEACHER_HIDDEN, generator=g)}


class StepTeacher(base.FixedTeacher):
    """The batch's teacher signal, made NaN on the poisoned (step, rank) pairs; SIGTERMs rank 0 in step 2 if asked."""

    def __init__(self, scenario: str, rank: int):
        self.scenario, self.rank, self.step = scenario, rank, 0

    def signal(self, batch):
        out = super().signal(batch)
        step = batch["window_ids"][0] // 2 + 1  # 1-based optimizer step of this micro-batch (2 samples a step)
        if (step, self.rank) in POISON[self.scenario]:
            out.hidden = torch.full_like(out.hidden, float("nan"))
        if self.scenario == "sigterm" and step == 2 and self.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the step must still finish
        return out


def run(rank: int, world: int, port: int, out_path: str, scenario: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, str(ROOT))
    import deepspeed

    from megadistill import distributed, engine, loop
    from megadistill.config import OptimConfig, TrainConfig
    from megadistill.objectives.lm import lm_metrics
    from megadistill.stop import GracefulStop

    distributed.init()
    engine.init_distributed_backend()
    module = base.make_module(chunk=1024)
    train = TrainConfig(micro_batch_size=1, grad_accum_steps=1, max_steps=5, save_every_steps=0,
                        max_bad_steps=2 if scenario == "max_bad" else 10)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0)
    ds_config = engine.build_ds_config(engine.load_ds_config(ROOT / "ds_configs" / "cpu_zero3.json"), train, optim, world)
    student_engine = engine.init_student(module, ds_config, train, optim,
                                         external_params=module.adapter.head_parameters(module.student))
    result = {"steps": {}, "saves": [], "error": None}

    def log(step, split, metrics):
        with deepspeed.zero.GatheredParameters(list(module.student.parameters())):
            checksum = sum(float(p.detach().double().sum()) for p in module.student.parameters())
        result["steps"][step] = {**metrics, "applied": student_engine.was_step_applied(), "checksum": checksum,
                                 "lr_next": student_engine.get_lr()[0]}

    def batches(consumed):
        index = consumed // world * world + rank  # this rank's sample of each global step
        while True:
            yield make_batch(index)
            index += world

    with GracefulStop() as stop:
        parts = loop.LoopParts(engine=student_engine, train_batches=batches, teacher=StepTeacher(scenario, rank),
                               metrics=lambda sums: lm_metrics(sums), save=lambda s: result["saves"].append(s.step),
                               tokens_per_sample=base.SEQ, log=log, stop=stop)
        state = loop.LoopState()
        try:
            result["totals"] = {k: v for k, v in loop.run(parts, train, state).items() if k != "valid"}
        except loop.NonFiniteError as err:
            result["error"] = str(err)
    result["state"] = vars(state)
    torch.save(result, out_path)
    distributed.barrier()


def main(rank: int, world: int, port: int, out_dir: str, scenario: str) -> None:
    """Spawn entry point: write ``rank{r}.pt`` or ``rank{r}.err`` (the traceback) into ``out_dir``."""
    try:
        run(rank, world, port, str(Path(out_dir) / f"rank{rank}.pt"), scenario)
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
