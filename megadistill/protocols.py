"""Named fine-tuning protocols (``paper``, ``cpu``): the settings every task result is reported under.

A protocol fixes epochs, global batch, learning rate, example length, what trains and how many
seeds a table averages; :func:`protocol_overrides` turns it into ``stage: task`` config overrides
for a training split of a given size. ``paper`` is the SIB-200 paper's fine-tuning (Adelani et al.
2023, arXiv:2309.07445, section 5: 20 epochs, batch 16, lr 1e-5, max length 164, 5 seeds); ``cpu``
is what fits a 2-core machine: one multilingual model over all benchmark languages, frozen
embeddings, only the top layers trained, fewer epochs and seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PROTOCOLS", "Protocol", "protocol_overrides"]


@dataclass(frozen=True)
class Protocol:
    """One fine-tuning protocol.

    Attributes:
        name: recorded as ``task.protocol`` in every run.
        epochs: passes over the training split.
        global_batch: examples per optimizer step (all ranks).
        lr: peak learning rate (linear warm-up over ``warmup_fraction`` of the steps, cosine decay).
        max_len_tokens: tokens per example.
        seeds: how many seeds a reported mean +- std uses.
        freeze_embeddings: keep input embeddings fixed.
        train_top_layers: train only the top N layers (0 = all).
        evals_per_epoch: dev evaluations per epoch (each may export ``hf_best/``).
    """

    name: str
    epochs: float
    global_batch: int
    lr: float
    max_len_tokens: int
    seeds: int
    freeze_embeddings: bool = False
    train_top_layers: int = 0
    evals_per_epoch: int = 1
    warmup_fraction: float = 0.1


PROTOCOLS = {
    "paper": Protocol("paper", epochs=20, global_batch=16, lr=1e-5, max_len_tokens=164, seeds=5),
    "cpu": Protocol("cpu", epochs=1, global_batch=16, lr=1e-4, max_len_tokens=128, seeds=3, freeze_embeddings=True,
                    train_top_layers=4, evals_per_epoch=2),
}


def protocol_overrides(name: str, num_train: int, world_size: int) -> list[str]:
    """``key=value`` overrides that run protocol ``name`` on ``num_train`` examples with ``world_size`` ranks.

    Raises:
        ValueError: an unknown protocol, or a global batch that ``world_size`` does not divide.
    """
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    p = PROTOCOLS[name]
    if p.global_batch % world_size:
        raise ValueError(f"protocol {name}: global batch {p.global_batch} is not divisible by {world_size} ranks")
    steps_per_epoch = math.ceil(num_train / p.global_batch)
    steps = max(1, math.ceil(p.epochs * steps_per_epoch))
    return [f"task.protocol={p.name}", f"train.max_steps={steps}", f"train.micro_batch_size={p.global_batch // world_size}",
            "train.grad_accum_steps=1", f"optim.lr={p.lr}", f"optim.warmup_steps={max(1, int(p.warmup_fraction * steps))}",
            f"task.max_len_tokens={p.max_len_tokens}", f"task.freeze_embeddings={str(p.freeze_embeddings).lower()}",
            f"task.train_top_layers={p.train_top_layers}",
            f"train.eval_every_steps={max(1, steps_per_epoch // p.evals_per_epoch)}", f"train.save_every_steps={steps_per_epoch}"]
