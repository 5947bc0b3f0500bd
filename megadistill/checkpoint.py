"""Checkpoints that resume (DeepSpeed ZeRO shards + loop state) and the Hugging Face export.

A checkpoint is ``<run_dir>/checkpoints/step_XXXXXXX/`` written by
``engine.save_checkpoint``; ``checkpoints/latest`` is replaced (atomically, by rank 0)
only after every rank has written its shard, so an interrupted save is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import deepspeed
import torch

from megadistill import distributed
from megadistill.files import atomic_write_text


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict) -> None:
    """Save model, optimizer, scheduler and ``client_state`` (consumed samples, step) on all ranks.

    Every rank must call this (collective). ``client_state`` must be picklable.
    """
    tag = f"step_{step:07d}"
    # DeepSpeed's own `latest` is written by rank 0 right after its own shard, without waiting
    # for the other ranks, and not atomically: write it ourselves after a barrier.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    distributed.barrier()
    if distributed.is_main():
        atomic_write_text(Path(ckpt_dir) / "latest", tag)
    distributed.barrier()


def resume(engine, ckpt_dir: str | Path) -> dict | None:
    """Load the latest checkpoint under ``ckpt_dir`` into ``engine``; return its client state.

    Returns ``None`` when there is no checkpoint (a fresh run). Every rank must call this.

    Raises:
        ValueError: ``latest`` names a checkpoint directory that does not exist. A checkpoint
            saved with another world size raises DeepSpeed's own error (convert it with
            DeepSpeed's ``ds_to_universal`` or resume with the same number of ranks).
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "latest").is_file():
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        tag = (ckpt_dir / "latest").read_text().strip()
        raise ValueError(f"checkpoint {ckpt_dir / tag} could not be loaded: point {ckpt_dir / 'latest'} at an earlier step_* folder, or use a new run_dir")
    return client_state


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, extra_files: dict[str, dict] | None = None) -> None:
    """Write ``model`` (gathered from ZeRO-3 shards) and ``tokenizer`` with ``save_pretrained``.

    The directory reloads with the ``AutoModelFor*`` class of the model's family:
    ``AutoModelForCausalLM`` for decoders, ``AutoModelForMaskedLM`` for BERT / RoBERTa / XLM-R /
    DistilBERT students (``config.architectures`` names the class; tied embeddings and MLM head
    biases are re-tied on load), and ``AutoTokenizer`` for the (trimmed) tokenizer.

    Every rank must call this (the gather is collective); rank 0 writes into a temporary
    directory and renames it to ``out_dir``, replacing an older export only when the new
    one is complete. ``extra_files`` maps file names to JSON-serializable dicts written
    beside the weights (e.g. ``vocab_map.json``, ``megadistill.json``).
    """
    out_dir = Path(out_dir)
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if distributed.is_main():
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for name, payload in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
            old = out_dir.with_name(out_dir.name + ".old")
            if out_dir.exists():
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
