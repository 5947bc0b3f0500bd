"""On-policy distillation batches (GKD): some micro-batches are the student's own continuations of corpus prompts.

Generalized Knowledge Distillation (Agarwal et al. 2024, arXiv:2306.13649, Algorithm 1): with
probability ``lambda`` a micro-batch is replaced by continuations the student samples from the
prompts of that corpus window; the teacher scores them and the objective's divergence (GKD's
generalized JSD(beta): ``loss.divergence: jsd``) is taken on the sampled tokens only. With
``lambda = 0`` the corpus batches pass through untouched (supervised KD). Only the batch
iterator differs from pre-training distillation: the loop, teacher and objective are the same.

The choice is a function of ``(seed, global sample index)``, so every rank makes the same one
(generation gathers ZeRO-3 weights, a collective) and a resumed run makes the choices the
uninterrupted run made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megadistill.data.collate import IGNORE_INDEX, collate_clm
from megadistill.generate import SamplingConfig, Samples, sample_continuations

__all__ = ["OnPolicySpec", "StudentSampler", "generated_batch", "is_on_policy", "on_policy_batches"]


@dataclass(frozen=True)
class OnPolicySpec:
    """What on-policy batches need, validated by :func:`megadistill.config.validate` (``post.*``).

    Attributes:
        fraction: GKD's lambda, in ``[0, 1]``: probability that a micro-batch is generated.
        prompt_tokens: prompt length P (tokens) taken from the start of each window.
        sampling: the student's sampling settings (``max_new_tokens`` N, temperature, top-p).
        seed: run seed (``train.seed``); choices and samples derive from it.
        rank: this data-parallel rank (its samples differ from the other ranks').
        samples_dir: directory for ``rank<r>.jsonl`` logs of every generated micro-batch, or None.
    """

    fraction: float
    prompt_tokens: int
    sampling: SamplingConfig
    seed: int
    rank: int = 0
    samples_dir: Path | None = None


class StudentSampler:
    """Samples continuations with a plain copy of the student, refreshed from the trained weights before each use.

    Args:
        trained: the student module inside the training engine (ZeRO-3 may partition it).
        plain: a module of the same structure outside the engine (a copy made before the engine existed).
        refresh: ``f(trained, plain)`` copying the full weights (:func:`megadistill.engine.copy_full_parameters`;
            collective under ZeRO-3).
        eos_token_id, pad_token_id: student ids ending a continuation and padding after it.
        sampling: :class:`~megadistill.generate.SamplingConfig`.
        vocab_map: the student's ``VocabMap`` (its samples go back to teacher ids), or None.
        vocab_size: real student vocabulary size (ids at or above it, padded head rows, are never sampled), or None.
    """

    def __init__(self, trained: torch.nn.Module, plain: torch.nn.Module, refresh: Callable, eos_token_id: int,
                 pad_token_id: int, sampling: SamplingConfig, vocab_map=None, vocab_size: int | None = None):
        self.trained, self.plain, self.refresh, self.vocab_map = trained, plain, refresh, vocab_map
        self.vocab_size = vocab_size
        self.eos_token_id, self.pad_token_id, self.sampling = eos_token_id, pad_token_id, sampling

    def __call__(self, prompts: torch.Tensor, seed: int) -> Samples:
        """Continuations of ``prompts`` ``[B, P]`` int64 (student ids) -> :class:`Samples` on the CPU ``[B, P + N]``."""
        device = next(self.trained.parameters()).device
        self.plain.to(device)
        self.refresh(self.trained, self.plain)
        samples = sample_continuations(self.plain, prompts.to(device), self.sampling, eos_token_id=self.eos_token_id,
                                       pad_token_id=self.pad_token_id, seed=seed, vocab_size=self.vocab_size)
        return Samples(sequences=samples.sequences.cpu(), generated=samples.generated.cpu())


def is_on_policy(fraction: float, seed: int, sample_index: int) -> bool:
    """Whether the micro-batch starting at global sample ``sample_index`` is generated (same on every rank)."""
    if fraction <= 0.0:
        return False
    draw = np.random.SeedSequence([seed, sample_index, 0x6B64]).generate_state(1, dtype=np.uint64)[0]
    return float(draw) / 2.0**64 < fraction


def _generation_seed(seed: int, sample_index: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, sample_index, rank]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generated_batch(batch: dict, samples: Samples, vocab_map=None) -> dict:
    """The causal-LM micro-batch of the student's continuations, in place of corpus ``batch``.

    Args:
        batch: the corpus micro-batch whose prompts were continued (its ``samples`` and ``window_ids`` are kept).
        samples: ``sequences`` ``[B, P + N]`` int64 student ids and ``generated`` ``[B, P + N]`` bool
            (True at sampled tokens up to and including the first EOS).
        vocab_map: the student's ``VocabMap`` (student ids go back to teacher ids for the teacher), or None.

    Returns:
        :func:`~megadistill.data.collate.collate_clm` of the ``P + N`` tokens (inputs and labels
        ``[B, P + N - 1]``), one document per row, with labels (hence CE and KD positions) only where
        the next token was sampled; plus ``samples``, ``window_ids``, ``windows`` and ``on_policy``.
    """
    sequences = samples.sequences
    teacher_ids = vocab_map.to_teacher(sequences) if vocab_map is not None else sequences
    windows = list(teacher_ids.numpy())
    one_document = [np.zeros(len(w), dtype=np.int64) for w in windows]
    out = collate_clm(windows, vocab_map, one_document)
    # Label i is token i + 1: keep it only where that token is the student's own sample.
    out["labels"] = out["labels"].masked_fill(~samples.generated[:, 1:], IGNORE_INDEX)
    out.update(samples=batch["samples"], window_ids=batch.get("window_ids", []), windows=windows, on_policy=True)
    return out


def on_policy_batches(batches: Iterator[dict], consumed_samples: int, spec: OnPolicySpec,
                      sampler: StudentSampler) -> Iterator[dict]:
    """Corpus micro-batches with a ``spec.fraction`` of them replaced by the student's continuations of their prompts.

    Args:
        batches: this rank's corpus micro-batches from global sample ``consumed_samples`` on.
        consumed_samples: the global sample index the iterator starts at (keys every choice).
        spec: :class:`OnPolicySpec`.
        sampler: :class:`StudentSampler` (uses the student's trained weights at that moment).

    Yields:
        Micro-batch dicts; a generated one also has ``generate_s`` (seconds spent sampling) and
        ``on_policy`` True, for the loop's step-time breakdown.
    """
    index = consumed_samples
    for batch in batches:
        start, index = index, index + batch["samples"]
        if not is_on_policy(spec.fraction, spec.seed, start):
            yield batch
            continue
        t0 = time.perf_counter()
        prompts = batch["input_ids"][:, :spec.prompt_tokens]
        samples = sampler(prompts, _generation_seed(spec.seed, start, spec.rank))
        out = generated_batch(batch, samples, sampler.vocab_map)
        out["generate_s"] = time.perf_counter() - t0
        if spec.samples_dir is not None:
            _log_samples(spec.samples_dir / f"rank{spec.rank}.jsonl", start, out, samples)
        yield out


def _log_samples(path: Path, sample_index: int, batch: dict, samples: Samples) -> None:
    """Append one JSON line: the sample index, student and teacher ids ``[B, P + N]`` and the sampled-token mask."""
    record = {"sample_index": sample_index, "sequences": samples.sequences.tolist(),
              "teacher_sequences": [w.tolist() for w in batch["windows"]], "generated": samples.generated.tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:  # an append-only log: one write per line, no rename needed
        out.write(json.dumps(record) + "\n")
