"""Parse and tokenize corpus blocks into flat token arrays, in this process or an ordered pool of worker processes.

The worker side of :mod:`megadistill.data.binarize`: each worker holds one :class:`DocumentEncoder`
(the teacher tokenizer, the document :class:`~megadistill.data.framing.Framing`, an optional
romanizer and the expected script) and
turns a :class:`megadistill.data.sources.Block` of raw lines or rows into one flat ``int64``
array plus per-document lengths, which pickle cheaply back to the writer; decoding, JSON
parsing and NFC run in the workers too, so the reading process only frames bytes. :func:`ordered_map` keeps at most ``max_in_flight`` batches
queued, so memory stays bounded however fast the reader is (``Pool.imap`` would read the
whole input ahead of the workers).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from megadistill.data.dedup import sentence_hash
from megadistill.data.framing import Framing
from megadistill.data.scripts import SCRIPT_RANGES, script_letter_counts
from megadistill.data.sources import Block, SourceStats, parse_block

MIXED_SCRIPT_SHARE = 0.5
"""A document is counted as mixed-script when under this share of its letters are in the declared script."""


@dataclass
class EncodedBatch:
    """Token ids of a batch of documents.

    Attributes:
        ids: int64 [total tokens], the documents' ids concatenated (teacher ids, framing included); None
            when only the romanized text is encoded.
        lengths: int64 [documents], tokens per document (or None, as ``ids``).
        romanized_ids, romanized_lengths: the same for the romanized texts, or None.
        romanize_stats: counters of the romanizer (``RomanizeStats.as_dict()``), or None.
        mixed_script: batch positions of documents under ``MIXED_SCRIPT_SHARE`` in the declared script.
        bytes_utf8: UTF-8 bytes of the (native) texts.
        romanized_characters: code points of the romanized texts (0 without romanization).
        romanized_char_counts: int64 [documents], code points of each romanized text, or None.
        stats: reading counters of the block (documents, lines, characters, dropped).
        locations: ``"file:line"`` of the documents flagged as mixed-script (at most 5).
        texts, sentence_hashes: with dedup only: the NFC texts, and per document a uint64
            array of the hashes of its non-blank lines (:func:`megadistill.data.dedup.sentence_hash`).
    """

    ids: np.ndarray | None
    lengths: np.ndarray | None
    romanized_ids: np.ndarray | None = None
    romanized_lengths: np.ndarray | None = None
    romanize_stats: dict | None = None
    mixed_script: list[int] = field(default_factory=list)
    bytes_utf8: int = 0
    romanized_characters: int = 0
    romanized_char_counts: np.ndarray | None = None
    stats: SourceStats = field(default_factory=SourceStats)
    locations: list[str] = field(default_factory=list)
    texts: list[str] | None = None
    sentence_hashes: list[np.ndarray] | None = None


class TokenizerHandle:
    """Batch encoder (no special tokens) over the fast tokenizer's ``tokenizers`` backend; pickles as the backend's JSON.

    In this process it uses the tokenizer's own backend (no second copy of a 262k-id vocabulary)
    when truncation and padding are off; worker processes rebuild it with
    ``tokenizers.Tokenizer.from_str`` (no ``transformers`` import). ``encode_batch_fast`` (no
    offsets) is ~1.6x faster than ``tokenizer(texts)`` on Gemma 3, and runs on the Rust thread
    pool (``RAYON_NUM_THREADS`` threads). A tokenizer without a backend (slow tokenizers), or
    whose backend gives other ids than ``tokenizer(text, add_special_tokens=False)`` on a probe
    text, is called normally.

    Args:
        tokenizer: a Hugging Face tokenizer.
    """

    _PROBE = "Hello world, नमस्ते दुनिया। ওড়িয়া ᱥᱟᱱᱛᱟᱲᱤ 123"

    def __init__(self, tokenizer: Any) -> None:
        self._slow, self._backend = None, getattr(tokenizer, "backend_tokenizer", None)
        if self._backend is not None and (self._backend.truncation is not None or self._backend.padding is not None):
            self._backend = self._from_json(self._backend.to_str())
        if self._backend is None or self.encode([self._PROBE]) != [tokenizer(self._PROBE, add_special_tokens=False)["input_ids"]]:
            self._slow, self._backend = tokenizer, None

    @staticmethod
    def _from_json(text: str):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(text)
        backend.no_truncation()
        backend.no_padding()
        return backend

    def __getstate__(self) -> dict:
        return {"json": None if self._backend is None else self._backend.to_str(), "slow": self._slow}

    def __setstate__(self, state: dict) -> None:
        self._slow = state["slow"]
        self._backend = None if state["json"] is None else self._from_json(state["json"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (the :class:`Framing` adds them)."""
        if self._backend is None:
            return self._slow(texts, add_special_tokens=False)["input_ids"]
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]


class DocumentEncoder:
    """Parser + tokenizer + framing + optional romanizer for one output dataset (picklable to worker processes).

    Args:
        tokenizer: Hugging Face tokenizer (the teacher's), fast preferably.
        framing: ids put around each document's tokens
            (:func:`megadistill.data.framing.framing_for_tokenizer`).
        script: ISO 15924 code the texts should be in (``"Deva"``), or None to skip the check.
        romanizer: a :class:`megadistill.data.romanize.Romanizer`, or None.
        native: also encode the native text (False: only the romanized one is written).
        dedup: return the texts and their sentence hashes for the writer's deduplication.
    """

    def __init__(self, tokenizer: Any, framing: Framing, script: str | None = None, romanizer: Any = None,
                 native: bool = True, dedup: bool = False) -> None:
        self.tokenizer, self.script = TokenizerHandle(tokenizer), script
        self.prefix_ids, self.suffix_ids = list(framing.prefix_ids), list(framing.suffix_ids)
        self.romanizer, self.native, self.dedup = romanizer, native, dedup

    def encode(self, block: Block) -> EncodedBatch:
        """Parse a block (:func:`megadistill.data.sources.parse_block`) and encode its documents.

        Raises:
            ValueError: a malformed record with ``on_error="fail"`` (names ``file:line``).
        """
        stats = SourceStats()
        docs = list(parse_block(block, stats))
        texts = [doc.text for doc in docs]
        batch = self.encode_texts(texts)
        batch.stats = stats
        batch.locations = [f"{docs[i].source}:{docs[i].line}" for i in batch.mixed_script[:5]]
        if self.dedup:
            batch.texts = texts
            batch.sentence_hashes = [np.array([sentence_hash(line) for line in text.split("\n") if line.strip()],
                                              dtype=np.uint64) for text in texts]
        return batch

    def encode_texts(self, texts: list[str]) -> EncodedBatch:
        """Encode NFC texts (see :class:`EncodedBatch`; ``stats`` stays empty)."""
        batch = EncodedBatch(*(self._ids(texts) if self.native else (None, None)))
        batch.bytes_utf8 = sum(len(t.encode("utf-8")) for t in texts)
        batch.mixed_script = self._mixed_script(texts)
        if self.romanizer is not None:
            from megadistill.data.romanize import RomanizeStats

            stats = RomanizeStats()
            romanized = [self.romanizer.romanize(t, stats) for t in texts]
            batch.romanized_ids, batch.romanized_lengths = self._ids(romanized)
            batch.romanized_char_counts = np.fromiter(map(len, romanized), dtype=np.int64, count=len(romanized))
            batch.romanize_stats, batch.romanized_characters = stats.as_dict(), int(batch.romanized_char_counts.sum())
        return batch

    def _ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Flat int64 ids and int64 lengths of ``prefix_ids + tokenizer(text) + suffix_ids`` per text."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        prefix, suffix = self.prefix_ids, self.suffix_ids
        docs = [prefix + ids + suffix for ids in self.tokenizer.encode(texts)]
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        ids = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
        return ids, lengths

    def _mixed_script(self, texts: list[str]) -> list[int]:
        """Positions of texts whose letters are mostly outside the declared script (none for unknown scripts)."""
        if self.script not in SCRIPT_RANGES or not texts:
            return []
        letters, native = script_letter_counts(texts, self.script)
        return np.flatnonzero((letters > 0) & (native < MIXED_SCRIPT_SHARE * letters)).tolist()


_WORKER_ENCODER: DocumentEncoder | None = None


def _init_worker(encoder: DocumentEncoder, threads: int) -> None:
    """Pool initializer: keep the encoder; size the tokenizer's thread pool before its first use."""
    global _WORKER_ENCODER
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _WORKER_ENCODER = encoder


def _encode_in_worker(block: Block) -> EncodedBatch:
    assert _WORKER_ENCODER is not None, "worker pool was not initialized"
    return _WORKER_ENCODER.encode(block)


def encode_batches(encoder: DocumentEncoder, blocks: Iterable[Block], processes: int = 0, threads: int = 1,
                   max_in_flight: int | None = None) -> Iterator[EncodedBatch]:
    """Encode ``blocks`` in order, in this process (``processes=0``) or in ``processes`` spawned processes.

    In this process the Rust tokenizer encodes each block on its own thread pool
    (``RAYON_NUM_THREADS``, set it before the tokenizer's first batch call) while parsing stays
    on the Python thread; ~1 GB less memory than worker processes, each of which holds a copy of
    the tokenizer (~350 MB for Gemma 3). Processes pay off when single-threaded parsing (~45 MB/s
    of JSON lines) becomes the limit, i.e. beyond ~8 tokenizer threads.

    Args:
        encoder: sent once to each worker process.
        blocks: corpus blocks; consumed lazily, at most ``max_in_flight`` (default ``4 * processes``)
            ahead of the results yielded.
        processes: worker processes; 0 encodes in the calling process.
        threads: tokenizer threads per worker process.
    Yields:
        One :class:`EncodedBatch` per block, in input order.
    Raises:
        ValueError: ``processes < 0`` or ``threads < 1``; a malformed record with ``on_error="fail"``.
    """
    if processes < 0 or threads < 1:
        raise ValueError(f"need processes >= 0 and threads >= 1, got {processes}, {threads}")
    if processes == 0:
        yield from map(encoder.encode, blocks)
        return
    yield from ordered_map(_encode_in_worker, blocks, processes, max_in_flight or 4 * processes,
                           initializer=_init_worker, initargs=(encoder, threads))


def ordered_map(fn: Callable, items: Iterable, workers: int, max_in_flight: int, *, initializer=None,
                initargs: tuple = ()) -> Iterator:
    """``map(fn, items)`` over a spawned process pool, in order, with at most ``max_in_flight`` items queued.

    ``spawn`` (not ``fork``): forking after the fast tokenizer has used its thread pool can deadlock.
    """
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
