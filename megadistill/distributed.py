"""The one place that reads rank and world size: process-group setup, barriers, reductions.

Works under the DeepSpeed launcher, ``torchrun`` and SLURM ``srun`` (which set ``RANK``/
``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``), and as a plain single process.
CPU runs use gloo; CUDA runs use NCCL.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else _env_int("RANK", "SLURM_PROCID", default=0)


def world_size() -> int:
    """Number of processes in the job (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def local_rank() -> int:
    """Rank of this process on its node (selects the accelerator)."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def local_world_size() -> int:
    """Processes on this node."""
    return _env_int("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", default=world_size())


def is_main() -> bool:
    """True on global rank 0, the rank that logs and writes shared files."""
    return rank() == 0


def backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """The accelerator this rank computes on (``cuda:<local_rank>`` or ``cpu``)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init(timeout_s: int = 1800) -> None:
    """Create the default process group from the launcher's environment, once.

    SLURM variables are mapped to the torch names so ``srun python megadistill/train.py``
    works; ``MASTER_ADDR``/``MASTER_PORT`` must then be exported by the batch script.
    On CPU the intra-op threads are split between the ranks of a node so that two ranks
    on two cores do not oversubscribe them.
    """
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ.update(
            RANK=os.environ["SLURM_PROCID"],
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        )
    if "RANK" not in os.environ:
        # Plain `python train.py`: a one-process group, so DeepSpeed needs no MPI discovery.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size())))
    if world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend(), timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    """End a multi-process job cleanly: wait for all ranks, then destroy the default process group.

    Without it, gloo's and DeepSpeed's communicator threads can still be alive at interpreter
    shutdown, and a finished 2-rank CPU run then died with ``terminate called without an active
    exception`` (exit code 250) after its work was done. A one-process job has no group to end.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a one-process group's, or a launcher's, rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def barrier() -> None:
    """Wait for all ranks (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns a new tensor on the input's device; a copy when not distributed).

    float64 is reduced as is on gloo and NCCL; any shape.
    """
    if not dist.is_initialized():
        return values.detach().clone()
    # NCCL groups have no CPU backend: reduce on this rank's device, return on the input's device.
    out = values.detach().to(device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(values.device)


def broadcast_object(obj):
    """Send a picklable object from rank 0 to every rank and return it."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when not distributed; collective)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
