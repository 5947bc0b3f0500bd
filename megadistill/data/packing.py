"""Packing: fixed-length token windows across documents, with per-token document ids and position resets.

Documents are concatenated (each already ends with EOS) in a per-epoch shuffled order and
cut into windows of ``seq_len_tokens + 1`` tokens that overlap by one token, so every
token is a next-token target exactly once per epoch; the windows of an epoch are then
visited in a shuffled order, so a global batch mixes documents (Megatron-LM's GPT dataset:
document index, sample index, shuffle index).

:meth:`PackedDataset.item` also returns which document each token belongs to;
:func:`position_ids_from_documents` turns that into position ids that restart at 0 at each
document start. Given such position ids (and no attention mask), Hugging Face models build
a per-document causal mask for every attention backend: varlen ``cu_seqlens`` for
FlashAttention-2, a block mask for FlexAttention, an explicit 4-D block-diagonal mask for
SDPA / eager (``transformers.masking_utils.find_packed_sequence_indices``), so no token
attends across documents (Krell et al. 2021, "Efficient sequence packing without
cross-contamination"). :func:`document_attention_mask` builds the explicit mask for models
that take one (bidirectional MLM encoders).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


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
        restart_id: token id (the tokenizer's BOS) put in place of a window's first token when
            that token lies inside a document, so every window starts the way a document does.
            Decoder teachers such as Gemma lean on the BOS as an attention sink: on SIB-200 Hindi
            dev, Gemma 3 270M scores 4.52 nats/token on whole documents with BOS and 7.40 without
            (``bench/teacher_windows.py``). The first token of a window is context only (it was the
            previous window's last target), so no target is lost; only that one context token
            is replaced. None (default) keeps the raw stream.

    Sample ``i`` is deterministic for (datasets, L, seed): the same index returns the same
    tokens in every process and after a restart. ``len()`` is the samples in one epoch;
    indices past it continue into later epochs (re-shuffled), so the sampler can run for
    any number of steps.

    Raises:
        ValueError: the datasets hold fewer than L + 1 tokens in total.
    """

    def __init__(self, datasets: Sequence, seq_len_tokens: int, seed: int = 1234, shuffle: bool = True,
                 fixed_layout: bool = False, restart_id: int | None = None):
        self.datasets = list(datasets)
        self.restart_id = restart_id
        self.seq_len_tokens = seq_len_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.fixed_layout = fixed_layout
        # Two compact arrays instead of a tuple per document (~16 bytes, not ~100, per document).
        counts = [len(ds) for ds in self.datasets]
        self._doc_dataset = np.repeat(np.arange(len(self.datasets), dtype=np.int32), counts)
        self._doc_index = np.concatenate([np.arange(n, dtype=np.int64) for n in counts]) if counts else np.zeros(0, np.int64)
        self._num_docs = int(sum(counts))
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
            order = np.arange(self._num_docs)
            windows = np.arange(self.samples_per_epoch)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                order = rng.permutation(self._num_docs)
                windows = rng.permutation(self.samples_per_epoch)
                if self.fixed_layout:
                    order = np.random.default_rng([self.seed, 0]).permutation(self._num_docs)
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
        return self.window_item(window_id, epoch)[0]

    def window_item(self, window_id: int, epoch: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document ids (as :meth:`item`) of window ``window_id`` of ``epoch``'s tiling.

        Raises:
            IndexError: ``window_id`` outside ``[0, len(self))``.
        """
        if not 0 <= window_id < self.samples_per_epoch:
            raise IndexError(f"window {window_id} out of range (windows per epoch: {self.samples_per_epoch})")
        order, starts, _ = self._epoch_layout(epoch)
        return self._read_window(order, starts, window_id)

    def __getitem__(self, index: int) -> np.ndarray:
        """Tokens of sample ``index``: int64 array of shape [seq_len_tokens + 1] (teacher ids)."""
        return self.item(index)[0]

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and document ids of sample ``index``.

        Returns:
            ``(tokens, document_ids)``, both int64 [seq_len_tokens + 1]: teacher ids, and for
            each token the index (0, 1, ...) of its document among those the window touches.
        """
        local = self.window_id(index)
        order, starts, _ = self._epoch_layout(index // self.samples_per_epoch)
        return self._read_window(order, starts, local)

    def segments(self, index: int) -> list[tuple[int, int, int, int]]:
        """Where sample ``index``'s tokens come from: ``(dataset, document, start, stop)`` per document piece.

        ``start``/``stop`` are token offsets inside the document, in window order; concatenating
        ``datasets[d][i][start:stop]`` over the pieces gives :meth:`item`'s tokens. Paired data
        (:mod:`megadistill.data.paired`) uses it to find the same text in another tokenization.
        """
        local = self.window_id(index)
        order, starts, _ = self._epoch_layout(index // self.samples_per_epoch)
        return self._window_segments(order, starts, local)

    def _window_segments(self, order: np.ndarray, starts: np.ndarray, local: int) -> list[tuple[int, int, int, int]]:
        """The document pieces of window ``local`` of the stream given by ``order`` / ``starts``."""
        begin, end = local * self.seq_len_tokens, local * self.seq_len_tokens + self.seq_len_tokens + 1
        pieces, pos = [], begin
        k = int(np.searchsorted(starts, begin, side="right")) - 1
        while pos < end:
            j = order[k]
            offset = pos - int(starts[k])
            take = min(int(self._lengths[j]) - offset, end - pos)
            pieces.append((int(self._doc_dataset[j]), int(self._doc_index[j]), offset, offset + take))
            pos += take
            k += 1
        return pieces

    def _read_window(self, order: np.ndarray, starts: np.ndarray, local: int) -> tuple[np.ndarray, np.ndarray]:
        """Cut window ``local`` out of the document stream given by ``order`` / ``starts``."""
        segments = self._window_segments(order, starts, local)
        pieces = [np.asarray(self.datasets[d][i][a:b], dtype=np.int64) for d, i, a, b in segments]
        doc_ids = np.repeat(np.arange(len(pieces), dtype=np.int64), [len(p) for p in pieces])
        tokens = np.concatenate(pieces)
        if self.restart_id is not None and segments[0][2] > 0:  # the window starts inside a document
            tokens[0] = self.restart_id
        return tokens, doc_ids


def restart_id(tokenizer, window_bos: bool) -> int | None:
    """The ``restart_id`` of :class:`PackedDataset` for ``data.window_bos``: the tokenizer's BOS id, or None when off.

    Raises:
        ValueError: ``window_bos`` is set but the tokenizer has no BOS token.
    """
    if not window_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise ValueError(f"data.window_bos: the teacher tokenizer ({type(tokenizer).__name__}) has no BOS token; "
                         "set data.window_bos=false")
    return int(bos)


def _doc_lengths(dataset) -> np.ndarray:
    """Tokens per document: the index's ``sizes`` array when there is one (no document reads)."""
    sizes = getattr(dataset, "sizes", None)
    if sizes is not None:
        return np.asarray(sizes)
    return np.array([len(dataset[i]) for i in range(len(dataset))], dtype=np.int64)


def position_ids_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 where the document id changes.

    Args:
        document_ids: int64 [B, L], non-decreasing along L (as :meth:`PackedDataset.item` gives).
    Returns:
        int64 [B, L]: ``position[b, t] = t - (first index of document_ids[b, t] in row b)``.
    """
    length = document_ids.shape[-1]
    arange = torch.arange(length, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    first = torch.where(starts, arange, torch.zeros_like(arange)).cummax(dim=-1).values
    return arange - first


def document_attention_mask(document_ids: torch.Tensor, causal: bool, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Explicit block-diagonal attention mask: query t sees key s only inside its own document.

    Args:
        document_ids: int64 [B, L].
        causal: also require ``s <= t`` (decoders); False for bidirectional encoders (MLM).
        padding_mask: optional [B, L] (1 = real token); padded keys are masked out.
    Returns:
        bool [B, 1, L, L], True where attention is allowed (the SDPA convention; Hugging Face
        models accept it as a custom 4-D ``attention_mask``).
    """
    mask = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        length = document_ids.shape[-1]
        mask &= torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    if padding_mask is not None:
        mask &= padding_mask.bool()[:, None, :]
    return mask[:, None]
