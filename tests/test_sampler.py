"""The micro-batch sampler: every global sample exactly once across ranks, also across a restart."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from megadistill.data.packing import PackedDataset
from megadistill.data.sampler import MicroBatchSampler, micro_batch_indices


def walk(total, world, micro, consumed=0, steps=None):
    """Indices each rank reads, in order, as a real job would (one sampler per rank)."""
    seen = {r: [] for r in range(world)}
    samplers = [MicroBatchSampler(total, r, world, micro, consumed) for r in range(world)]
    for step, batches in enumerate(zip(*samplers)):
        if steps is not None and step == steps:
            break
        for r, batch in enumerate(batches):
            seen[r] += batch
    return seen


@pytest.mark.parametrize("world, micro", [(2, 3), (2, 1), (3, 2)])
def test_restart_continues_with_exactly_the_remaining_samples(world, micro):
    total, stop = 120, 7
    before = walk(total, world, micro, steps=stop)
    consumed = stop * world * micro  # what the checkpoint stores
    after = walk(total, world, micro, consumed=consumed)
    everything = sorted(i for part in (before, after) for r in part.values() for i in r)
    assert everything == list(range(total - total % (world * micro)))  # nothing twice, nothing skipped
    uninterrupted = walk(total, world, micro)
    for r in range(world):
        assert before[r] + after[r] == uninterrupted[r]  # each rank's sequence is unchanged by the restart


def test_global_order_does_not_depend_on_world_size():
    two = walk(48, 2, 4)
    four = walk(48, 4, 2)
    assert sorted(two[0] + two[1]) == sorted(sum(four.values(), []))
    assert micro_batch_indices(16, 1, 2, 4) == [20, 21, 22, 23]


def test_dataloader_with_packed_windows_is_deterministic_for_seed_and_world():
    rng = np.random.default_rng(0)
    corpus = [rng.integers(0, 50, size=int(rng.integers(3, 20))) for _ in range(40)]
    packed = PackedDataset([corpus], seq_len_tokens=8, seed=5)
    def rank_windows(rank, consumed=0):
        loader = DataLoader(packed, batch_sampler=MicroBatchSampler(2 * len(packed), rank, 2, 2, consumed),
                            collate_fn=lambda ws: np.stack(ws))
        return [b for b in loader]
    first = rank_windows(0)
    assert len(first) == len(packed) // 2  # two epochs of samples, split over 2 ranks, 2 per micro-batch
    assert all(np.array_equal(a, b) for a, b in zip(first, rank_windows(0)))
    resumed = rank_windows(0, consumed=4 * 3)
    assert all(np.array_equal(a, b) for a, b in zip(first[3:], resumed))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 outside"):
        MicroBatchSampler(10, 2, 2, 1)
    with pytest.raises(ValueError, match="micro_batch_size >= 1"):
        micro_batch_indices(0, 0, 1, 0)
