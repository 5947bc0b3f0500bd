"""Packed windows cover the token stream exactly; the rank split resumes without repeats or gaps."""

import numpy as np
import pytest
import torch

from megadistill.data.collate import collate_clm
from megadistill.data.packing import PackedDataset
from megadistill.data.sampler import micro_batch_indices


def docs(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(5, 100, size=int(rng.integers(3, 30))) for _ in range(n)]


def test_unshuffled_windows_tile_the_stream():
    corpus = docs()
    stream = np.concatenate(corpus)
    packed = PackedDataset([corpus], seq_len_tokens=16, shuffle=False)
    assert len(packed) == (len(stream) - 1) // 16
    for i in range(len(packed)):
        np.testing.assert_array_equal(packed[i], stream[i * 16 : i * 16 + 17])
    with pytest.raises(IndexError):
        packed[len(packed)]


def test_shuffled_epoch_is_a_permutation_of_documents_and_deterministic():
    corpus = docs()
    a = PackedDataset([corpus], seq_len_tokens=8, seed=3)
    b = PackedDataset([corpus], seq_len_tokens=8, seed=3)
    first = [a[i] for i in range(len(a))]
    for i in range(len(a)):
        np.testing.assert_array_equal(first[i], b[i])
    # Same windows as the unshuffled tiling of that epoch's document order, visited in another order.
    order, starts, windows = a._epoch_layout(0)
    stream = np.concatenate([corpus[k] for k in order])
    tiles = [stream[i * 8 : i * 8 + 9] for i in range(len(a))]
    for i in range(len(a)):
        np.testing.assert_array_equal(first[i], tiles[windows[i]])
    assert sorted(windows.tolist()) == list(range(len(a))) and windows.tolist() != list(range(len(a)))
    # A later epoch uses another document order.
    second = np.concatenate([a[len(a) + i] for i in range(len(a))])
    assert not np.array_equal(np.concatenate(first), second)


def test_too_little_data():
    with pytest.raises(ValueError, match="fewer than seq_len_tokens"):
        PackedDataset([[np.arange(5)]], seq_len_tokens=16)


def test_rank_split_resumes_exactly():
    world, mbs, steps = 2, 3, 10
    seen = [i for s in range(steps) for r in range(world) for i in micro_batch_indices(s * world * mbs, r, world, mbs)]
    assert sorted(seen) == list(range(steps * world * mbs))
    # Resuming after 4 micro-steps continues with exactly the remaining samples.
    resumed = [i for s in range(4, steps) for r in range(world) for i in micro_batch_indices(s * world * mbs, r, world, mbs)]
    assert resumed == seen[4 * world * mbs :]


class FakeVocabMap:
    """Keeps even teacher ids; student id = teacher id // 2; unk = 0."""

    def remap(self, ids):
        dropped = ids % 2 == 1
        return torch.where(dropped, torch.zeros_like(ids), ids // 2), dropped


def test_collate_shifts_and_masks_dropped_labels():
    windows = [np.array([2, 4, 6, 7, 8]), np.array([2, 10, 12, 14, 16])]
    batch = collate_clm(windows, FakeVocabMap())
    assert batch["teacher_input_ids"].tolist() == [[2, 4, 6, 7], [2, 10, 12, 14]]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 5, 6, 7]]
    assert batch["labels"].tolist() == [[2, 3, -100, 4], [5, 6, 7, 8]]
    assert int(batch["dropped_tokens"]) == 1
    plain = collate_clm(windows)
    assert plain["labels"].tolist()[0] == [4, 6, 7, 8]
    with pytest.raises(ValueError, match="one length"):
        collate_clm([np.arange(3), np.arange(4)])


def test_fixed_layout_keeps_windows_across_epochs_and_names_them():
    corpus = docs(30)
    packed = PackedDataset([corpus], seq_len_tokens=8, seed=5, fixed_layout=True)
    n = len(packed)
    tiles = {w: packed.window(w).tolist() for w in range(n)}
    for epoch in range(3):
        ids = [packed.window_id(epoch * n + i) for i in range(n)]
        assert sorted(ids) == list(range(n))  # every window once per epoch
        for i, w in enumerate(ids):
            assert packed[epoch * n + i].tolist() == tiles[w]
    assert [packed.window_id(i) for i in range(n)] != [packed.window_id(n + i) for i in range(n)]  # visit order reshuffled
    # Without fixed_layout the document order (so the set of windows) changes per epoch.
    moving = PackedDataset([corpus], seq_len_tokens=8, seed=5)
    assert {tuple(moving[i]) for i in range(n)} != {tuple(moving[n + i]) for i in range(n)}
    with pytest.raises(IndexError):
        packed.window(n)
