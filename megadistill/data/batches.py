"""Micro-batch iterators over packed windows: causal-LM and masked-LM batches for the training loop.

Both walk the global sample sequence with :func:`megadistill.data.sampler.micro_batch_indices`
from a consumed-sample count, so a resumed run continues exactly where it stopped. Masked-LM
masks are drawn from a generator seeded by ``(seed, sample index)`` (dynamic masking, RoBERTa
style, yet reproducible after a restart without saving RNG state), or by ``(seed, window id)``
when ``static_mask`` is set: the mask an offline masked-LM teacher cache was built with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from megadistill.data.collate import collate_clm
from megadistill.data.masking import MlmCollator
from megadistill.data.packing import position_ids_from_documents
from megadistill.data.sampler import micro_batch_indices

__all__ = ["ClmBatches", "MlmBatches", "eval_indices", "mask_generator", "train_indices"]


def train_indices(consumed_samples: int, rank: int, world_size: int, micro_batch_size: int) -> Iterator[list[int]]:
    """This rank's sample indices of each micro-batch from ``consumed_samples`` on (endless)."""
    while True:
        yield micro_batch_indices(consumed_samples, rank, world_size, micro_batch_size)
        consumed_samples += world_size * micro_batch_size


def eval_indices(num_samples: int, rank: int, world_size: int, micro_batch_size: int, max_batches: int) -> list[list[int]]:
    """Held-out micro-batches of this rank: every rank runs the same number (ZeRO-3 gathers are collective).

    At most ``max_batches``; the last ones wrap around to the start of the ``num_samples`` samples.
    """
    per_step = world_size * micro_batch_size
    batches = max(1, min(max_batches, math.ceil(num_samples / per_step)))
    return [[i % num_samples for i in micro_batch_indices(b * per_step, rank, world_size, micro_batch_size)]
            for b in range(batches)]


def mask_generator(seed: int, key: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, key)`` through NumPy's ``SeedSequence`` (well mixed, stable)."""
    state = np.random.SeedSequence([seed, key]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class ClmBatches:
    """Causal-LM micro-batches (:func:`collate_clm`) of a :class:`~megadistill.data.packing.PackedDataset`.

    Args:
        data: packed windows of ``L + 1`` teacher ids.
        vocab_map: the student's ``VocabMap``, or None.
        document_masking: add ``document_ids``/``position_ids`` so attention stays inside documents.
        world_size: data-parallel ranks (for the ``samples`` count of each batch).

    ``self(indices)`` returns the :func:`collate_clm` dict plus ``window_ids`` (list of ints),
    ``windows`` (teacher id arrays ``[L + 1]``, for cache verification) and ``samples`` (int).
    """

    def __init__(self, data, vocab_map=None, document_masking: bool = True, world_size: int = 1):
        self.data, self.vocab_map, self.document_masking, self.world_size = data, vocab_map, document_masking, world_size
        self.tokens_per_sample = data.seq_len_tokens

    def __call__(self, indices: list[int]) -> dict:
        items = [self.data.item(i) for i in indices]
        windows = [tokens for tokens, _ in items]
        batch = collate_clm(windows, self.vocab_map, [docs for _, docs in items] if self.document_masking else None)
        batch.update(window_ids=[self.data.window_id(i) for i in indices], windows=windows,
                     samples=self.world_size * len(indices))
        return batch


class MlmBatches:
    """Masked-LM micro-batches: the first ``L`` tokens of each packed window, masked 80/10/10 per row.

    Args:
        data: packed windows (``L + 1`` ids; the last id is not used, so the windows, and an
            offline cache's alignment, are the same as for causal LM).
        collator: an :class:`~megadistill.data.masking.MlmCollator` (teacher tokenizer, vocab map).
        seed: masking seed.
        static_mask: seed each row's mask by its window id (epoch-independent: what a cache replays)
            instead of its sample index (a fresh mask each epoch).
        document_masking: pass ``document_ids``/``position_ids`` (bidirectional attention kept inside
            documents by the model adapter); always used to keep whole words inside documents.
        world_size: data-parallel ranks.

    ``self(indices)`` returns the :class:`MlmCollator` dict plus ``document_ids``/``position_ids``
    ``[B, L]``, ``window_ids``, ``windows`` and ``samples``.
    """

    def __init__(self, data, collator: MlmCollator, seed: int, static_mask: bool = False, document_masking: bool = True,
                 world_size: int = 1):
        self.data, self.collator, self.seed, self.static_mask = data, collator, seed, static_mask
        self.document_masking, self.world_size = document_masking, world_size
        self.tokens_per_sample = data.seq_len_tokens

    def __call__(self, indices: list[int]) -> dict:
        window_ids = [self.data.window_id(i) for i in indices]
        items = [self.data.item(i) for i in indices]
        rows = [self._masked_row(tokens[:-1], docs[:-1], key)
                for (tokens, docs), key in zip(items, window_ids if self.static_mask else indices)]
        batch = {name: torch.cat([r[name] for r in rows]) for name in rows[0] if name != "dropped_tokens"}
        batch["dropped_tokens"] = sum(r["dropped_tokens"] for r in rows)
        docs = torch.from_numpy(np.stack([d[:-1] for _, d in items]).astype(np.int64))
        if self.document_masking:
            batch.update(document_ids=docs, position_ids=position_ids_from_documents(docs))
        batch.update(window_ids=window_ids, windows=[tokens for tokens, _ in items], samples=self.world_size * len(indices))
        return batch

    def _masked_row(self, tokens: np.ndarray, docs: np.ndarray, key: int) -> dict:
        return self.collator([tokens], mask_generator(self.seed, key), document_ids=[docs])


def batch_iterator(make_batch: Callable[[list[int]], dict], indices) -> Iterator[dict]:
    """``make_batch(i)`` for each index list ``i`` of ``indices`` (lazy)."""
    return (make_batch(i) for i in indices)
