"""Packing: fixed-length token windows across documents, and the resumable rank/micro-batch split.

Documents are concatenated (each already ends with EOS) in a per-epoch shuffled order and
cut into windows of ``seq_len_tokens + 1`` tokens that overlap by one token, so every
token is a next-token target exactly once per epoch; the windows of an epoch are then
visited in a shuffled order, so a global batch mixes documents (Megatron-LM's GPT dataset:
document index, sample index, shuffle index).
Attention may cross the EOS between documents in this version; per-document masks and
position resets arrive with the packing issue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class PackedDataset:
    """Windows of ``seq_len_tokens + 1`` teacher token ids over one or more indexed datasets.

    Args:
        datasets: objects with ``len()`` and ``ds[i] -> np.ndarray`` (1-D token ids of
            document ``i``), e.g. :class:`megadistill.data.indexed.IndexedDataset`.
        seq_len_tokens: model sequence length L; each sample holds L + 1 tokens.
        seed: seeds the per-epoch document shuffle.
        shuffle: shuffle documents each epoch (off for evaluation: file order, one epoch).
        fixed_layout: keep epoch 0's document order (and so the same set of windows) in
            every epoch, shuffling only the order windows are visited in. Needed when
            per-window data is precomputed, e.g. an offline teacher-logit cache
            (:mod:`megadistill.teacher_cache`): window ``w`` then has the same tokens in
            every epoch and :meth:`window_id` names it.

    Sample ``i`` is deterministic for (datasets, L, seed): the same index returns the same
    tokens in every process and after a restart. ``len()`` is the samples in one epoch;
    indices past it continue into later epochs (re-shuffled), so the sampler can run for
    any number of steps.

    Raises:
        ValueError: the datasets hold fewer than L + 1 tokens in total.
    """

    def __init__(self, datasets: Sequence, seq_len_tokens: int, seed: int = 1234, shuffle: bool = True,
                 fixed_layout: bool = False):
        self.datasets = list(datasets)
        self.seq_len_tokens = seq_len_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.fixed_layout = fixed_layout
        self._docs = [(d, i) for d, ds in enumerate(self.datasets) for i in range(len(ds))]
        self._lengths = np.concatenate([_doc_lengths(ds) for ds in self.datasets]).astype(np.int64)
        total = int(self._lengths.sum())
        if total < seq_len_tokens + 1:
            raise ValueError(
                f"packed dataset has {total} tokens, fewer than seq_len_tokens + 1 = {seq_len_tokens + 1}: "
                "use more data or a smaller data.seq_len_tokens"
            )
        self.samples_per_epoch = (total - 1) // seq_len_tokens
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Document order of an epoch, the stream offset where each document starts (tokens), and the window order."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = np.arange(len(self._docs))
            windows = np.arange(self.samples_per_epoch)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(len(self._docs))
                windows = rng.permutation(self.samples_per_epoch)
                if self.fixed_layout:
                    order = np.random.default_rng([self.seed, 0]).permutation(len(self._docs))
            starts = np.concatenate([[0], np.cumsum(self._lengths[order])[:-1]])
            self._epoch_cache = (epoch, order, starts, windows)
        return self._epoch_cache[1:]

    def window_id(self, index: int) -> int:
        """Position of sample ``index``'s window in its epoch's tiling (``[0, len(self))``).

        With ``fixed_layout`` (or ``shuffle=False``) the tiling is the same in every epoch, so
        the id names the same tokens whatever the epoch: ``self[i]`` equals ``self.window(self.window_id(i))``.
        """
        if index < 0 or (not self.shuffle and index >= self.samples_per_epoch):
            raise IndexError(f"sample {index} out of range (samples per epoch: {self.samples_per_epoch})")
        epoch, local = divmod(index, self.samples_per_epoch)
        return int(self._epoch_layout(epoch)[2][local])

    def window(self, window_id: int, epoch: int = 0) -> np.ndarray:
        """Tokens of window ``window_id`` of ``epoch``'s tiling: int64 [seq_len_tokens + 1] (teacher ids).

        Raises:
            IndexError: ``window_id`` outside ``[0, len(self))``.
        """
        if not 0 <= window_id < self.samples_per_epoch:
            raise IndexError(f"window {window_id} out of range (windows per epoch: {self.samples_per_epoch})")
        order, starts, _ = self._epoch_layout(epoch)
        return self._read_window(order, starts, window_id)

    def __getitem__(self, index: int) -> np.ndarray:
        """Tokens of sample ``index``: int64 array of shape [seq_len_tokens + 1] (teacher ids)."""
        local = self.window_id(index)
        order, starts, _ = self._epoch_layout(index // self.samples_per_epoch)
        return self._read_window(order, starts, local)

    def _read_window(self, order: np.ndarray, starts: np.ndarray, local: int) -> np.ndarray:
        """Cut window ``local`` out of the document stream given by ``order`` / ``starts``."""
        begin, end = local * self.seq_len_tokens, local * self.seq_len_tokens + self.seq_len_tokens + 1
        pieces, pos = [], begin
        k = int(np.searchsorted(starts, begin, side="right")) - 1
        while pos < end:
            d, i = self._docs[order[k]]
            doc = self.datasets[d][i]
            offset = pos - int(starts[k])
            take = doc[offset : offset + (end - pos)]
            pieces.append(np.asarray(take, dtype=np.int64))
            pos += len(take)
            k += 1
        return np.concatenate(pieces)


def _doc_lengths(dataset) -> np.ndarray:
    """Tokens per document: the index's ``sizes`` array when there is one (no document reads)."""
    sizes = getattr(dataset, "sizes", None)
    if sizes is not None:
        return np.asarray(sizes)
    return np.array([len(dataset[i]) for i in range(len(dataset))], dtype=np.int64)


def micro_batch_indices(consumed_samples: int, rank: int, world_size: int, micro_batch_size: int) -> list[int]:
    """Global sample indices of this rank's next micro-batch.

    The job consumes ``world_size * micro_batch_size`` consecutive samples per micro-step;
    rank ``r`` takes the ``r``-th block of ``micro_batch_size``. Because the split depends only
    on ``consumed_samples`` (saved in checkpoints), a resumed run sees exactly the samples it
    had not yet seen, none twice, for the same world size (Megatron's pretraining sampler).
    """
    start = consumed_samples + rank * micro_batch_size
    return list(range(start, start + micro_batch_size))
