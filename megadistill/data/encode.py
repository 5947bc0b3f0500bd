"""Parse and tokenize corpus blocks into flat token arrays, in this process or an ordered pool of worker processes.

The worker side of :mod:`megadistill.data.binarize`: each worker holds one :class:`DocumentEncoder`
(the teacher tokenizer, the document :class:`~megadistill.data.framing.Framing`, an optional
romanizer and the expected script) and
turns a :class:`megadistill.data.sources.Block` of raw lines or rows into one flat ``int64``
array plus per-document lengths, which pickle cheaply back to the writer; decoding, JSON
parsing and NFC run in the workers too, so the reading process only frames bytes. :func:`ordered_map` keeps at most ``max_in_flight`` batches
queued, so memory stays bounded however fast the reader is (``Pool.imap`` would read the
whole input ahead of the workers).

Text is encoded as text: a literal ``<eos>``, ``</s>`` or ``[SEP]`` in a document is tokenized
like any other characters (``tokenizers``' ``encode_special_tokens``, transformers'
``split_special_tokens``), never as the control id, which only the framing puts around a
document. Some tokenizers cannot do this (a Unigram model whose vocabulary holds ``<s>`` as a
piece, as XLM-R's): every control id still found inside a document's text is counted
(:attr:`EncodedBatch.control_ids_in_text`) and reported in the provenance.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from megadistill.data.dedup import sentence_hash
from megadistill.data.framing import Framing, control_ids
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
        control_ids_in_text: control-token ids (:func:`~megadistill.data.framing.control_ids`)
            found inside the documents' text ids, native and romanized (the framing's own not
            counted); 0 when the tokenizer keeps literal special-token strings as text.
        control_documents: batch positions of the documents holding such ids.
        control_locations: ``"file:line"`` of the first 5 of them.
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
    control_ids_in_text: int = 0
    control_documents: list[int] = field(default_factory=list)
    control_locations: list[str] = field(default_factory=list)


class TokenizerHandle:
    """Batch encoder (no special tokens, text as text) over the fast tokenizer's ``tokenizers`` backend; pickles as the backend's JSON.

    In this process it uses the tokenizer's own backend (no second copy of a 262k-id vocabulary)
    when truncation and padding are off; worker processes rebuild it with
    ``tokenizers.Tokenizer.from_str`` (no ``transformers`` import). ``encode_batch_fast`` (no
    offsets) is ~1.6x faster than ``tokenizer(texts)`` on Gemma 3, and runs on the Rust thread
    pool (``RAYON_NUM_THREADS`` threads). A tokenizer without a backend (slow tokenizers), or
    whose backend gives other ids than ``tokenizer(text, add_special_tokens=False)`` on a probe
    text, is called normally (with ``split_special_tokens=True`` where it accepts it).

    Literal special-token strings are encoded as text: the backend's ``encode_special_tokens``
    is switched on for each call and restored after (the in-process backend is the caller's
    tokenizer's own, so its setting must not leak).

    Args:
        tokenizer: a Hugging Face tokenizer.
    """

    _PROBE = "Hello world, नमस्ते दुनिया। ওড়িয়া ᱥᱟᱱᱛᱟᱲᱤ 123"

    def __init__(self, tokenizer: Any) -> None:
        self._slow, self._backend, self._split = None, getattr(tokenizer, "backend_tokenizer", None), {}
        if self._backend is not None and (self._backend.truncation is not None or self._backend.padding is not None):
            self._backend = self._from_json(self._backend.to_str())
        if self._backend is None or self.encode([self._PROBE]) != [tokenizer(self._PROBE, add_special_tokens=False)["input_ids"]]:
            self._slow, self._backend = tokenizer, None
            self._split = _split_kwargs(tokenizer)

    @staticmethod
    def _from_json(text: str):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(text)
        backend.no_truncation()
        backend.no_padding()
        return backend

    def __getstate__(self) -> dict:
        return {"json": None if self._backend is None else self._backend.to_str(), "slow": self._slow, "split": self._split}

    def __setstate__(self, state: dict) -> None:
        self._slow, self._split = state["slow"], state.get("split", {})
        self._backend = None if state["json"] is None else self._from_json(state["json"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids (list of int lists, one per text) without special tokens; literal special-token strings stay text."""
        if self._backend is None:
            return self._slow(texts, add_special_tokens=False, **self._split)["input_ids"]
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        with _special_tokens_as_text(self._backend):
            return [e.ids for e in encode(texts, add_special_tokens=False)]


@contextlib.contextmanager
def _special_tokens_as_text(backend: Any) -> Iterator[None]:
    """Switch a ``tokenizers.Tokenizer`` to encode special-token strings as text for the block; restore after."""
    if not hasattr(backend, "encode_special_tokens"):  # tokenizers < 0.15: counted downstream instead
        yield
        return
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield
    finally:
        backend.encode_special_tokens = previous


def _split_kwargs(tokenizer: Any) -> dict:
    """``{"split_special_tokens": True}`` if calling ``tokenizer`` accepts it, else ``{}`` (then counted downstream)."""
    try:
        tokenizer("x", add_special_tokens=False, split_special_tokens=True)
    except TypeError:
        return {}
    return {"split_special_tokens": True}


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

    Attributes:
        control_ids: int64 [k], sorted control-token ids that must not occur inside a document's text.
        literal_kept_as_text: whether the tokenizer encodes the strings of its special tokens
            (``<eos>``, ``[SEP]``, ...) without producing a control id (probed once here).
    """

    def __init__(self, tokenizer: Any, framing: Framing, script: str | None = None, romanizer: Any = None,
                 native: bool = True, dedup: bool = False) -> None:
        self.tokenizer, self.script = TokenizerHandle(tokenizer), script
        self.prefix_ids, self.suffix_ids = list(framing.prefix_ids), list(framing.suffix_ids)
        self.romanizer, self.native, self.dedup = romanizer, native, dedup
        controls = control_ids(tokenizer)
        self.control_ids = np.array(sorted(controls), dtype=np.int64)
        self._frame_controls = sum(i in controls for i in self.prefix_ids + self.suffix_ids)
        self.literal_kept_as_text = self._keeps_literals(tokenizer, controls)

    def _keeps_literals(self, tokenizer: Any, controls: frozenset[int]) -> bool:
        """True when the special tokens' own strings, as text, encode to no control id."""
        unk = getattr(tokenizer, "unk_token", None)
        literals = [t for t in getattr(tokenizer, "all_special_tokens", None) or () if t != unk]
        return not literals or not controls.intersection(self.tokenizer.encode([" ".join(literals)])[0])

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
        batch.control_locations = [f"{docs[i].source}:{docs[i].line}" for i in batch.control_documents[:5]]
        if self.dedup:
            batch.texts = texts
            batch.sentence_hashes = [np.array([sentence_hash(line) for line in text.split("\n") if line.strip()],
                                              dtype=np.uint64) for text in texts]
        return batch

    def encode_texts(self, texts: list[str]) -> EncodedBatch:
        """Encode NFC texts (see :class:`EncodedBatch`; ``stats`` and the ``*_locations`` stay empty)."""
        controls = np.zeros(len(texts), np.int64)  # control ids inside each document's text
        batch = EncodedBatch(None, None)
        if self.native:
            batch.ids, batch.lengths, controls = self._ids(texts)
        batch.bytes_utf8 = sum(len(t.encode("utf-8")) for t in texts)
        batch.mixed_script = self._mixed_script(texts)
        if self.romanizer is not None:
            from megadistill.data.romanize import RomanizeStats

            stats = RomanizeStats()
            romanized = [self.romanizer.romanize(t, stats) for t in texts]
            batch.romanized_ids, batch.romanized_lengths, romanized_controls = self._ids(romanized)
            controls = controls + romanized_controls
            batch.romanized_char_counts = np.fromiter(map(len, romanized), dtype=np.int64, count=len(romanized))
            batch.romanize_stats, batch.romanized_characters = stats.as_dict(), int(batch.romanized_char_counts.sum())
        batch.control_ids_in_text, batch.control_documents = int(controls.sum()), np.flatnonzero(controls).tolist()
        return batch

    def _ids(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``prefix_ids + tokenizer(text) + suffix_ids`` per text: flat int64 ids, int64 lengths [texts], and
        int64 [texts] counts of control ids inside each text's own ids."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        prefix, suffix = self.prefix_ids, self.suffix_ids
        docs = [prefix + ids + suffix for ids in self.tokenizer.encode(texts)]
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        ids = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
        return ids, lengths, self._controls_per_document(ids, lengths)

    def _controls_per_document(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """int64 [documents]: control ids in each document minus the frame's own (which sit at fixed positions)."""
        if not len(self.control_ids):
            return np.zeros(len(lengths), np.int64)
        hits = np.concatenate([[0], np.cumsum(np.isin(ids, self.control_ids), dtype=np.int64)])
        ends = np.cumsum(lengths)
        return hits[ends] - hits[ends - lengths] - self._frame_controls

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
    The workers ignore SIGINT: a Ctrl-C reaches the whole process group, and the caller, which
    handles it, terminates the pool on its way out (else each worker prints a traceback).
    """
    context = multiprocessing.get_context("spawn")
    with _children_ignore_sigint():
        pool = context.Pool(workers, initializer=initializer, initargs=initargs)
    with pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_in_flight:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT while processes are started in the block, so they inherit it from their first instruction.

    Python keeps an inherited ``SIG_IGN`` for SIGINT (it installs ``KeyboardInterrupt`` only over
    ``SIG_DFL``), which an initializer could not do for a worker still starting up. Main thread
    only (elsewhere a no-op); the caller's handler is back when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
