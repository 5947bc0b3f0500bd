"""DeepSpeed initialization: the trainable student engine and the frozen, ZeRO-sharded teacher.

Batch size, precision, optimizer, scheduler and clipping come from the run config and
are injected into the user's DeepSpeed JSON; a conflicting value already in the JSON is
an error rather than a silent override (design rule 4).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
from pathlib import Path

import deepspeed
import torch

from megadistill.config import OptimConfig, TrainConfig

# Keys the run config owns; the JSON may repeat them only with the same value.
_INJECTED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def load_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config. Raises ``FileNotFoundError``/``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} not found: see ds_configs/ (cpu_zero3.json, zero3.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path}: invalid JSON at line {err.lineno}: {err.msg}") from err


def build_ds_config(base: dict, train: TrainConfig, optim: OptimConfig, world_size: int) -> dict:
    """Return ``base`` with batch shape, precision, clipping and AdamW injected.

    The LR schedule is not a JSON block: DeepSpeed's ``WarmupCosineLR`` gives lr 0 on the
    first two steps, so :func:`init_student` passes :func:`warmup_cosine` as a ``LambdaLR``.

    ``train_batch_size`` = micro_batch_size x grad_accum_steps x world_size (sequences).
    On machines without CUDA, DeepSpeed's fused Adam cannot build, so ``torch_adam`` selects
    PyTorch's AdamW (its fused/foreach path where available).

    Raises:
        ValueError: the JSON sets one of the injected keys to a different value, or sets
            an optimizer, scheduler or precision block of its own.
    """
    values = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "train_batch_size": train.micro_batch_size * train.grad_accum_steps * world_size,
        "gradient_clipping": optim.grad_clip,
    }
    out = copy.deepcopy(base)
    for key in _INJECTED:
        if key in out and out[key] != values[key]:
            raise ValueError(
                f"DeepSpeed config sets {key}={out[key]} but the run config implies {values[key]}: "
                "remove it from the JSON (batch shape comes from train.* in the recipe)"
            )
        out[key] = values[key]
    for key in ("optimizer", "scheduler", "bf16", "fp16"):
        if key in out:
            raise ValueError(f"DeepSpeed config has a '{key}' block: remove it; optim.* and train.precision set it")
    out["bf16"] = {"enabled": train.precision == "bf16"}
    out["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": optim.lr,
            "betas": list(optim.betas),
            "eps": optim.eps,
            "weight_decay": optim.weight_decay,
            "torch_adam": not torch.cuda.is_available(),
        },
    }
    out.setdefault("steps_per_print", 10**9)
    return out


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Step 0 already trains (multiplier ``1 / warmup_steps``); the multiplier reaches 1.0 at
    step ``warmup_steps - 1`` and ``min_lr_ratio`` at step ``total_steps`` (Loshchilov &
    Hutter, 2017, without restarts).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_ds_config(student_config: dict) -> dict:
    """The teacher's config: same ZeRO stage, batch shape and precision, no optimizer or scheduler."""
    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16", "zero_optimization")
    out = {k: copy.deepcopy(v) for k, v in student_config.items() if k in keep}
    zero = out.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    out["steps_per_print"] = 10**9
    return out


def init_student(module: torch.nn.Module, ds_config: dict, train: TrainConfig, optim: OptimConfig, external_params=()):
    """Wrap the trainable module in a DeepSpeed engine (optimizer from ``ds_config``, LR from :func:`warmup_cosine`).

    The engine steps the ``LambdaLR`` once per optimizer step, and saves it in checkpoints.

    ``external_params`` are parameters the module's ``forward`` reads directly instead of
    through the submodule that owns them (the output projection read by the chunked loss);
    ZeRO-3 must gather them for the whole forward (``deepspeed.zero.register_external_parameter``).

    Returns:
        The DeepSpeed engine; ``engine.module`` is ``module``.
    """
    for param in external_params:
        deepspeed.zero.register_external_parameter(module, param)
    trainable = [p for p in module.parameters() if p.requires_grad]
    schedule = functools.partial(
        warmup_cosine, warmup_steps=optim.warmup_steps, total_steps=train.max_steps, min_lr_ratio=optim.min_lr_ratio
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=trainable,
        config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine


def copy_full_parameters(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy ``source``'s parameters into the plain module ``target`` of the same structure (collective).

    Under ZeRO-3 each rank holds a shard of ``source``'s parameters: they are gathered
    (``deepspeed.zero.GatheredParameters``, every rank must call this at the same point) and
    copied whole, so ``target`` can generate without the per-module gathers ZeRO-3 would
    otherwise run on every decoding step. Under ZeRO-0/1/2 nothing is gathered.

    Raises:
        KeyError: ``target`` has a parameter ``source`` lacks (the modules differ).
    """
    params = dict(source.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None), torch.no_grad():
        for name, param in target.named_parameters():
            param.copy_(params[name].data.to(param.device, param.dtype))


def init_teacher(module: torch.nn.Module, ds_config: dict):
    """Wrap the frozen teacher in an inference-only DeepSpeed engine (ZeRO-3 shards its weights).

    The teacher is built outside ``deepspeed.zero.Init`` on purpose: wrapping
    ``from_pretrained`` in it leaks memory in teacher+student jobs (DeepSpeed issue 3286).
    """
    module.eval().requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=module, config=teacher_ds_config(ds_config))
    engine.eval()
    return engine


def init_distributed_backend() -> None:
    """Let DeepSpeed adopt the process group created by :func:`megadistill.distributed.init`.

    On CPU, DeepSpeed's shared-memory all-reduce (``deepspeed_shm_comm_op``) creates a 69 MB
    ``/dev/shm`` segment per rank and never unlinks it, so every run (and every killed run) leaked
    RAM until the machine swapped (21 GB after a day of tests here). Once every rank has mapped
    every segment, each rank unlinks its own: the mappings live on, nothing outlives the job.
    """
    from megadistill import distributed

    deepspeed.init_distributed(dist_backend=distributed.backend())
    if _uses_shm_allreduce(distributed.world_size()):  # the same answer on every rank
        distributed.barrier()  # every rank has opened every other rank's segment by now
        _shm_segment(distributed.rank()).unlink(missing_ok=True)


def _uses_shm_allreduce(world_size: int) -> bool:
    """Whether DeepSpeed mapped shm all-reduce segments (its CPU op, all ranks on one node: ``shm_interface.cpp``)."""
    import deepspeed.comm.comm as ds_comm

    backend = getattr(ds_comm, "cdb", None)
    return getattr(backend, "shm_comm_op", None) is not None and os.environ.get("LOCAL_SIZE") == str(world_size)


def _shm_segment(rank: int) -> Path:
    """This rank's DeepSpeed shm all-reduce segment (``shm.cpp``: ``<name>_<uid>_<addr>_<port>_<rank>``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
