"""Training entry point: recipe in, trained and exported student out, for every stage.

    deepspeed --num_gpus 2 megadistill/train.py --ds_config ds_configs/cpu_zero3.json \
        --config megadistill/recipes/quickstart.yaml [key=value ...]

Also runs under ``torchrun``, SLURM ``srun`` and as plain ``python`` (one process). Reads top to
bottom: config -> process group -> STAGES[cfg.stage].build -> resume -> loop.run -> export.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: put the repository root first and drop megadistill/ itself, whose
    # logging.py would otherwise shadow the standard library module.
    _root = str(Path(__file__).resolve().parents[1])
    sys.path[:] = [_root] + [p for p in sys.path[1:] if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import logging
import time
import warnings

import torch

from megadistill import checkpoint, distributed, engine, loop
from megadistill.config import load_config, write_run_config
from megadistill.files import atomic_write_text
from megadistill.logging import MetricsLogger, one_line, setup_console, write_error_line
from megadistill.stages import STAGES
from megadistill.stop import GracefulStop

log = logging.getLogger("megadistill.train")
# DeepSpeed calls torch.distributed collectives that torch has renamed; the warning repeats every step.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def parse_args(argv=None) -> argparse.Namespace:
    """``--config`` recipe, ``--ds_config`` DeepSpeed JSON, and dotted ``key=value`` overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see megadistill/recipes/)")
    parser.add_argument("--ds_config", required=True, help="DeepSpeed JSON (see ds_configs/)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run one training job; returns the process exit code (0 also when stopped by ``exit_after_steps``)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    distributed.init()
    engine.init_distributed_backend()
    setup_console(distributed.is_main())
    torch.manual_seed(cfg.train.seed)
    run_dir, wall_start = Path(cfg.run_dir), time.time()
    if distributed.is_main():
        write_run_config(cfg)

    built = STAGES[cfg.stage].build(cfg, engine.load_ds_config(args.ds_config))
    ckpt_dir = run_dir / "checkpoints"
    client = checkpoint.resume(built.engine, ckpt_dir)
    state = loop.LoopState(**client["loop_state"]) if client else loop.LoopState()
    if client:
        log.info("resumed from step %d (%d samples consumed)", state.step, state.consumed_samples)
    metrics_logger = MetricsLogger(run_dir, distributed.is_main(), resume_step=state.step)

    def save(s: loop.LoopState) -> None:
        checkpoint.save(built.engine, ckpt_dir, s.step, {"loop_state": vars(s).copy()}, keep=cfg.train.keep_checkpoints)

    with GracefulStop() as stop:
        try:
            totals = loop.run(built.loop_parts(save, metrics_logger.log, stop), cfg.train, state)
        finally:
            metrics_logger.close()
    unfinished = loop.why_not_finished(totals, state, cfg.train.max_steps, run_dir)
    if unfinished:
        log.info(unfinished)
    else:
        built.export(run_dir / "hf")
        if distributed.is_main():
            summary = {"stage": cfg.stage, "world_size": distributed.world_size(), "steps": state.step,
                       "consumed_samples": state.consumed_samples, **built.info, "wall_time_s": time.time() - wall_start, **totals}
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
            log.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "tokens_per_s", "wall_time_s")}))
    distributed.shutdown()
    return 0


def cli(argv=None) -> int:
    """Console entry point (``megadistill-train``, and ``python megadistill/train.py``).

    Bad input and OS failures end as one line naming the fix instead of a traceback: config and
    data errors (``ValueError``, ``FileNotFoundError``) exit 2; OS errors (read-only or full disk,
    a checkpoint that could not be written: ``OSError``) and ``train.max_bad_steps`` non-finite
    steps in a row (:class:`megadistill.loop.NonFiniteError`) exit 1.
    """
    try:
        return main(argv)
    except (ValueError, FileNotFoundError) as err:
        write_error_line("megadistill.train", str(err))
        return 2
    except (OSError, loop.NonFiniteError) as err:
        write_error_line("megadistill.train", one_line(err))
        return 1


if __name__ == "__main__":
    sys.exit(cli())
