"""Tokenize raw corpora with the teacher tokenizer into Megatron .bin/.idx/.json datasets, streaming and in parallel.

The library core of ``tools/binarize.py``. Each document becomes
``framing.prefix_ids + tokenizer(nfc(text), add_special_tokens=False).input_ids + framing.suffix_ids``
(:mod:`megadistill.data.framing`): ``[BOS] text EOS`` for decoder tokenizers, ``[CLS] text [SEP]``
or ``<s> text </s>`` for encoder (masked-LM) ones; a long document stays one long sequence, the
packer cuts it into windows. Memory does not grow with the corpus: raw blocks of about 1 MB
stream from the reader to the tokenizer (Rust threads in this process, or worker processes fed
through a bounded queue, :mod:`megadistill.data.encode`) and, in order, to the writer; only
8 bytes per document (its length) and, with ``dedup``, 8 bytes per distinct sentence are kept.
``romanize=SCHEME`` writes ``<prefix>.<scheme>`` beside ``<prefix>`` with the same documents in
the same order (a paired native/romanized view). The provenance written beside each dataset
(tokenizer hash, framing, counts, characters for bits per character) lets training refuse data
made with another tokenizer.

A dataset is the triple ``PREFIX.bin`` + ``PREFIX.idx`` + ``PREFIX.json`` or nothing: every file
of a call (both triples with ``romanize``) is written and fsynced in a temporary directory
beside the output, then moved into place; a previous dataset at the same prefix is moved aside
first and put back if anything fails, so an error, a full disk (:class:`DiskFullError`), a
failed rename or SIGTERM/SIGINT (:class:`BinarizeInterrupted`) leaves the final names as they
were and no temporary file behind (see :class:`_Staging`). Only SIGKILL or a crash of the machine
can leave the hidden ``.PREFIX.*.tmp`` directory; it is never read and may be deleted.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from megadistill import __version__
from megadistill.data.dedup import HashSet
from megadistill.data.encode import DocumentEncoder, EncodedBatch, encode_batches
from megadistill.data.framing import Framing, framing_for_tokenizer
from megadistill.data.indexed import (IndexedDatasetWriter, provenance_header, token_dtype_for_vocab,
                                      write_provenance)
from megadistill.files import DISK_FULL_ERRNOS
from megadistill.stop import Interrupted, interruptible
from megadistill.data.sources import (COMPRESSION, DEFAULT_BLOCK_BYTES, DEFAULT_MAX_LINE_BYTES, HF_PREFIX, Block,
                                      SourceStats, corpus_format, language_from_path, no_documents_error, read_blocks,
                                      sum_counts)

logger = logging.getLogger(__name__)

_EXAMPLES = 5  # locations listed per warning in the provenance
_SUFFIXES = (".bin", ".idx", ".json")  # the files of one dataset, in commit order (.json last)


class DiskFullError(OSError):
    """The disk or the quota filled (ENOSPC / EDQUOT) while ``binarize`` wrote; nothing was left under the final names.

    ``str(err)`` is one line: the file being written (its final name), the token bytes written,
    an estimate of the bytes still needed and the bytes free once the partial files were removed.

    Attributes:
        errno: ``errno.ENOSPC`` or ``errno.EDQUOT``.
        path: Path, the dataset file being written when the disk filled.
        written: int, bytes of token ids written (to ``.bin``) before the error.
        needed: int or None, estimated further bytes to finish (None when the input size is unknown).
        free: int, bytes free on the output's filesystem after the cleanup.
    """

    def __init__(self, code: int, message: str, path: Path, written: int, needed: int | None, free: int) -> None:
        super().__init__(code, message)
        self.path, self.written, self.needed, self.free = path, written, needed, free

    def __str__(self) -> str:
        return self.strerror


class BinarizeInterrupted(Interrupted):
    """SIGTERM or SIGINT arrived while ``binarize`` wrote (:func:`megadistill.stop.interruptible`).

    ``str(err)`` is one line naming the signal and the prefix; ``signum`` the signal number.
    """


class BinarizeResult(dict):
    """What :func:`binarize` returns: the provenance dict written to ``<prefix>.json``, plus the run's throughput.

    Compares equal to :func:`~megadistill.data.indexed.read_provenance` of the prefix; the
    throughput is kept off the file (it describes the run, not the data).

    Attributes:
        seconds: float, streaming time (window: see :class:`_Progress`).
        tokens_per_second: float, this dataset's tokens / ``seconds``: the last number the progress bar showed.
    """

    def __init__(self, meta: dict[str, Any], seconds: float, tokens_per_second: float) -> None:
        super().__init__(meta)
        self.seconds, self.tokens_per_second = seconds, tokens_per_second


@dataclass
class BinarizeOptions:
    """How ``binarize`` reads, filters, transforms and tokenizes (everything but the inputs and the tokenizer).

    Attributes:
        on_error: ``"skip"`` drops and counts malformed records; ``"fail"`` (``--strict``) stops at the first.
        processes: tokenizer worker processes; 0 (default) tokenizes in the calling process on
            the Rust tokenizer's thread pool (``RAYON_NUM_THREADS``; the CLI's ``--workers``).
        threads_per_process: tokenizer threads in each worker process.
        dedup: drop sentences (lines) seen before anywhere in this output; a document left empty is dropped.
        romanize: an ``indic-transliteration`` scheme (``iso``, ``iast``, ``itrans``, ``hk``, ...)
            to also write ``<prefix>.<scheme>``; None for native text only.
        romanize_only: write only the romanized dataset.
        text_field: column / JSON field with the text (tsv, jsonl, parquet, datasets).
        max_line_bytes: longer physical lines are dropped as ``line_too_long`` (bytes).
        block_bytes: raw bytes per unit of work sent to a tokenizer process (text formats).
        rows_per_block: rows per unit of work (parquet, datasets).
        hf_split, hf_config: split / configuration of ``hf:`` inputs.
    """

    on_error: str = "skip"
    processes: int = 0
    threads_per_process: int = 1
    dedup: bool = False
    romanize: str | None = None
    romanize_only: bool = False
    text_field: str = "text"
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    block_bytes: int = DEFAULT_BLOCK_BYTES
    rows_per_block: int = 1024
    hf_split: str = "train"
    hf_config: str | None = None

    def validate(self) -> None:
        """Check the counts and the flags.

        Raises:
            ValueError: a count that is not an int or below its minimum (``processes`` >= 0;
                ``threads_per_process``, ``block_bytes``, ``rows_per_block``, ``max_line_bytes`` >= 1),
                or ``romanize_only`` without ``romanize``; the message names the field.
        """
        minimum = {"processes": 0, "threads_per_process": 1, "block_bytes": 1, "rows_per_block": 1, "max_line_bytes": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"BinarizeOptions.{name} must be an integer >= {low}, got {value!r}")
        if self.romanize_only and not self.romanize:
            raise ValueError("BinarizeOptions.romanize_only needs a romanize scheme")


@dataclass
class _Totals:
    """Running counts of one ``binarize`` call (documents and tokens written, what was dropped or flagged)."""

    documents: int = 0
    characters: int = 0
    bytes_utf8: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    romanized_characters: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    mixed_script: int = 0
    mixed_examples: list[str] = field(default_factory=list)
    romanize: dict[str, int] = field(default_factory=dict)
    control_ids: int = 0  # control-token ids inside documents' text (tokenizers that cannot keep literals as text)
    control_documents: int = 0
    control_examples: list[str] = field(default_factory=list)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records dropped for ``reason``."""
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


class _Reader:
    """Blocks of all inputs in order (:func:`read_blocks`); remembers the input and raw size of each block in flight."""

    def __init__(self, inputs: list, options: BinarizeOptions) -> None:
        self.inputs, self.options = inputs, options
        self.stats = [SourceStats() for _ in inputs]  # per input: framing counts here + parse counts of its blocks
        self.block_inputs: deque[tuple[int, int]] = deque()  # (input index, raw line bytes; 0 for row formats)

    def blocks(self) -> Iterator[Block]:
        """Every input's blocks in order, noting each block's input and raw bytes in ``block_inputs``."""
        opts = self.options
        for i, path in enumerate(self.inputs):
            for block in read_blocks(path, on_error=opts.on_error, stats=self.stats[i], text_field=opts.text_field,
                                     max_line_bytes=opts.max_line_bytes, block_bytes=opts.block_bytes,
                                     rows_per_block=opts.rows_per_block,
                                     split=opts.hf_split, config_name=opts.hf_config):
                self.block_inputs.append((i, sum(len(line) for line in block.lines or () if line)))
                yield block

    def sources(self, kept: list[int]) -> list[dict[str, Any]]:
        """Provenance entries of the inputs; ValueError for an input that yielded no document."""
        for path, stats in zip(self.inputs, self.stats):
            if stats.documents == 0:
                raise no_documents_error(str(path), stats)
        return [_source_entry(path, stats, n) for path, stats, n in zip(self.inputs, self.stats, kept)]


def _source_entry(path, stats: SourceStats, kept: int) -> dict[str, Any]:
    """Provenance of one input: format, documents read / written, records read, record types."""
    entry = {"path": str(path), "format": corpus_format(path), "documents": kept,
             "documents_read": stats.documents, "lines_read": stats.lines_read}
    if stats.kinds:
        entry["types"] = dict(sorted(stats.kinds.items()))
    return entry


def _merge_stats(into: SourceStats, other: SourceStats) -> None:
    """Add a worker's block counters to an input's counters."""
    into.documents += other.documents
    into.lines_read += other.lines_read
    into.characters += other.characters
    for reason, n in other.dropped.items():
        into.drop(reason, n)
    for kind, n in other.kinds.items():
        into.kinds[kind] = into.kinds.get(kind, 0) + n


def _deduplicate(batch: EncodedBatch, seen: HashSet, encoder: DocumentEncoder, totals: _Totals) -> EncodedBatch:
    """Drop sentences seen before from the batch's documents (re-encoding only the documents that changed).

    Returns a batch with ``stats.documents`` / ``characters`` / ``bytes_utf8`` describing what is written.
    """
    changed: dict[int, str] = {}
    for i, (text, hashes) in enumerate(zip(batch.texts, batch.sentence_hashes)):
        fresh = [seen.add_new(int(h)) for h in hashes]
        if not all(fresh):
            totals.drop("duplicate_sentence", fresh.count(False))
            flags = iter(fresh)
            kept = "\n".join(line for line in text.split("\n") if not line.strip() or next(flags))
            changed[i] = kept if any(fresh) else ""
    if not changed:
        return batch
    rebuilt_texts = [t for t in changed.values() if t.strip()]
    rebuilt = encoder.encode_texts(rebuilt_texts)
    return _assemble(batch, changed, rebuilt, totals)


def _assemble(batch: EncodedBatch, changed: dict[int, str], rebuilt: EncodedBatch, totals: _Totals) -> EncodedBatch:
    """The batch with changed documents replaced by their re-encoded versions and emptied ones removed.

    Counts describe what is written, except ``romanize_stats`` and ``mixed_script``, which stay
    those of the documents as read.
    """
    old, new = _per_document(batch), _per_document(rebuilt)
    fresh = iter(range(len(rebuilt.lengths if rebuilt.lengths is not None else rebuilt.romanized_lengths)))
    rows, characters, utf8 = [], batch.stats.characters, batch.bytes_utf8
    for i, text in enumerate(batch.texts):
        if i not in changed:
            rows.append(old[i])
            continue
        characters += len(changed[i]) - len(text)
        utf8 += len(changed[i].encode("utf-8")) - len(text.encode("utf-8"))
        if changed[i].strip():
            rows.append(new[next(fresh)])
        else:
            totals.drop("duplicate_document")
    columns = list(zip(*rows)) if rows else [[], [], []]
    ids, lengths = _flat(columns[0]) if batch.lengths is not None else (None, None)
    rom_ids, rom_lengths = _flat(columns[1]) if batch.romanized_lengths is not None else (None, None)
    result = EncodedBatch(ids, lengths, rom_ids, rom_lengths, romanize_stats=batch.romanize_stats,
                          mixed_script=batch.mixed_script, locations=batch.locations, stats=batch.stats, bytes_utf8=utf8,
                          control_ids_in_text=batch.control_ids_in_text, control_documents=batch.control_documents,
                          control_locations=batch.control_locations)  # control counts: as read, like mixed_script
    if batch.romanized_char_counts is not None:
        result.romanized_char_counts = np.array(columns[2], dtype=np.int64)
        result.romanized_characters = int(result.romanized_char_counts.sum())
    result.stats.characters = characters
    return result


def _per_document(batch: EncodedBatch) -> list[tuple]:
    """``(ids, romanized_ids, romanized_characters)`` per document of a batch (None where absent)."""
    def split(ids, lengths):
        return np.split(ids, np.cumsum(lengths)[:-1]) if lengths is not None and len(lengths) else None

    native, romanized = split(batch.ids, batch.lengths), split(batch.romanized_ids, batch.romanized_lengths)
    n = len(native if native is not None else romanized or [])
    counts = batch.romanized_char_counts
    return [(native[i] if native is not None else None, romanized[i] if romanized is not None else None,
             int(counts[i]) if counts is not None else 0) for i in range(n)]


def _flat(docs: list[np.ndarray] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Concatenated ids and lengths of a list of per-document arrays (None stays None)."""
    if docs is None:
        return None, None
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    return (np.concatenate(docs) if docs else np.zeros(0, np.int64)), lengths


def binarize(
    inputs: list,
    tokenizer: Any,
    output_prefix: Path,
    options: BinarizeOptions | None = None,
    *,
    language: str | None = None,
    script: str | None = None,
    tokenizer_name: str | None = None,
    show_progress: bool = True,
) -> BinarizeResult:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (Megatron MMIDIDX) + ``.json`` provenance.

    One sequence per document: ``prefix_ids + tokenizer(text, add_special_tokens=False).input_ids +
    suffix_ids`` of :func:`~megadistill.data.framing.framing_for_tokenizer` (decoders: the
    tokenizer's BOS, if it adds one, and EOS; encoders: ``[CLS]``/``[SEP]`` or ``<s>``/``</s>``),
    recorded as ``"framing"`` in the provenance. Literal special-token strings in the text
    (``"<eos>"``) are encoded as text; control ids a tokenizer still produces inside a document
    are counted in ``"special_tokens_in_text"``. Token dtype is
    ``token_dtype_for_vocab(len(tokenizer))``. With ``options.romanize`` the romanized texts go
    to ``<output_prefix>.<scheme>`` (document ``i`` of both is the same source document).
    All files appear together or not at all (module docstring, :class:`_Staging`); while they
    are written, SIGTERM and SIGINT raise :class:`BinarizeInterrupted` (main thread only; the
    previous handlers are restored after).

    Args:
        inputs: corpus files (.tsv/.txt/.jsonl/.parquet, optionally .gz/.xz/.bz2) or ``hf:`` specs,
            see ``megadistill.data.sources``; read in order.
        tokenizer: Hugging Face tokenizer (fast preferably): a decoder's with an EOS token, or
            an encoder's (BERT, XLM-R) whose post-processor frames sequences with its SEP token.
        output_prefix: path without suffix; parent directories are created.
        options: see :class:`BinarizeOptions`; defaults when None.
        language, script: default from ``language_from_path(inputs[0])``.
        tokenizer_name: recorded in the provenance (defaults to ``tokenizer.name_or_path``).
        show_progress: tqdm bar on stderr over input bytes (percentage and ETA when every input
            is an uncompressed text file), with documents, tokens and tokens/s.
    Returns:
        The provenance dict written to ``<output_prefix>.json`` (of the romanized dataset with
        ``romanize_only``), as a :class:`BinarizeResult` carrying the throughput.
    Raises:
        FileNotFoundError: an input is missing.
        ValueError: no inputs, bad options (names the field), bad input (see ``read_documents``),
            a decoder tokenizer without EOS (:func:`~megadistill.data.framing.framing_for_tokenizer`),
            romanization without a known script or with an unknown scheme.
        DiskFullError: ENOSPC / EDQUOT while writing (an ``OSError``; one-line message).
        BinarizeInterrupted: SIGTERM or SIGINT while writing.
        OSError: any other I/O error (a failed rename, ...). In every error case the final
            names hold what they held before and no temporary file remains.
    """
    options = options or BinarizeOptions()
    options.validate()
    if not inputs:
        raise ValueError("binarize needs at least one input file")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    language, script = _language(inputs[0], language, script)
    framing = framing_for_tokenizer(tokenizer)
    encoder = DocumentEncoder(tokenizer, framing, script, _romanizer(language, script, options),
                              native=not options.romanize_only, dedup=options.dedup)
    prefixes = _output_prefixes(output_prefix, options)
    totals = _Totals(tokens={kind: 0 for kind in prefixes})
    reader = _Reader(list(inputs), options)
    dtype = token_dtype_for_vocab(len(tokenizer))
    progress = _Progress(prefixes, total=_input_bytes(inputs))
    try:
        with interruptible(f"while writing {output_prefix}; nothing was written under {output_prefix} "
                           "(a previous dataset there is unchanged)", BinarizeInterrupted) as guard:
            with guard.deferred():  # no signal between making the directory and the try that removes it
                staging = _Staging(output_prefix)
            try:
                sources = _write_tokens(encoder, reader, staging, totals, progress, dtype, show_progress)
                base = _provenance(tokenizer, tokenizer_name, totals, reader.stats, sources, dtype.name, framing,
                                   language, script, encoder.literal_kept_as_text)
                metas = {kind: _output_meta(base, kind, totals, prefixes, options) for kind in prefixes}
                _stage_provenance(metas, staging, progress)
                with guard.deferred():  # a signal now waits for the renames to finish or roll back
                    staging.commit(prefixes.values())
            finally:
                with guard.deferred():
                    staging.remove()
    except OSError as err:
        if err.errno in DISK_FULL_ERRNOS:
            raise _disk_full(err, progress, totals, dtype, output_prefix) from err
        raise
    _log_warnings(metas[next(iter(metas))], output_prefix)
    return BinarizeResult(metas[progress.main], progress.seconds, progress.tokens_per_second)


@dataclass
class _Progress:
    """Where a ``binarize`` call is: input bytes read of ``total``, the file being written, the throughput.

    Throughput window: from the start of streaming (just before the first block is read, after
    the tokenizer and the inputs were set up) to the moment the last batch was written to
    ``.bin``; index, provenance and renames are not in it. ``tokens`` are those of the returned
    dataset (``main``), so ``tokens_per_second`` is the number the progress bar shows and the
    CLI summary prints.

    Attributes:
        finals: ``{kind: final prefix}`` of the outputs (``"native"``, ``"romanized"``).
        total: int bytes of the inputs, or None when unknown (compressed, parquet, ``hf:``).
        consumed: int raw bytes of the input lines written so far.
        in_flight: ``(input bytes, tokens of all outputs)`` of the batch being written, (0, 0) between batches.
        writing: Path, the final name of the file being written (for error messages).
    """

    finals: dict[str, Path]
    total: int | None = None
    consumed: int = 0
    in_flight: tuple[int, int] = (0, 0)
    tokens: int = 0
    seconds: float = 0.0
    writing: Path | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def main(self) -> str:
        """The output whose provenance is returned: native, or romanized with ``romanize_only``."""
        return "native" if "native" in self.finals else "romanized"

    def at(self, kind: str, suffix: str) -> None:
        """Note that the ``suffix`` file of output ``kind`` is being written now."""
        self.writing = Path(f"{self.finals[kind]}{suffix}")

    def advance(self, nbytes: int, tokens: int) -> None:
        """Count ``nbytes`` more input bytes written; ``tokens`` of the main output so far."""
        self.consumed, self.tokens, self.in_flight = self.consumed + nbytes, tokens, (0, 0)
        self.seconds = time.perf_counter() - self.started

    @property
    def tokens_per_second(self) -> float:
        """Main-output tokens per second over the window (see the class docstring)."""
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def fraction(self) -> float | None:
        """Share of the input read, the batch in flight included (0..1); None when the input size is unknown."""
        return min((self.consumed + self.in_flight[0]) / self.total, 1.0) if self.total else None


def _input_bytes(inputs: list) -> int | None:
    """Total bytes of the inputs when all are uncompressed text files (tsv, txt, jsonl), else None.

    Only for those do the raw line bytes the reader hands out add up to the file sizes.
    """
    total = 0
    for path in inputs:
        try:
            if str(path).startswith(HF_PREFIX) or Path(path).suffix.lower() in COMPRESSION or corpus_format(path) == "parquet":
                return None
            total += Path(path).stat().st_size
        except (OSError, ValueError):  # missing or unknown: the reader raises the proper error later
            return None
    return total


def _write_tokens(encoder: DocumentEncoder, reader: _Reader, staging: "_Staging", totals: _Totals, progress: _Progress,
                  dtype: np.dtype, show_progress: bool) -> list[dict[str, Any]]:
    """Stream every input into finalized ``.bin``/``.idx`` files in the staging directory; returns the sources' provenance."""
    name = next(iter(progress.finals.values())).name
    with ExitStack() as stack:
        writers = {kind: stack.enter_context(IndexedDatasetWriter(staging.prefix(final), dtype))
                   for kind, final in progress.finals.items()}
        bar = stack.enter_context(tqdm(total=progress.total, unit="B", unit_scale=True, desc=name, file=sys.stderr,
                                       disable=not show_progress))
        kept = _stream(encoder, reader, writers, totals, bar, progress)
        sources = reader.sources(kept)
        if progress.total:  # tsv headers and over-long lines are not in the blocks' bytes
            progress.consumed = progress.total
            bar.update(max(progress.total - bar.n, 0))
        for kind, writer in writers.items():
            progress.at(kind, ".idx")  # finalize also flushes the last buffered tokens of .bin
            writer.finalize()
    return sources


def _stage_provenance(metas: dict[str, dict], staging: "_Staging", progress: _Progress) -> None:
    """Write each output's provenance into the staging directory and fsync it."""
    for kind, meta in metas.items():
        progress.at(kind, ".json")
        _fsync(write_provenance(staging.prefix(progress.finals[kind]), meta))


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk (directories: where the OS allows it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some filesystems refuse fsync on a directory; the renames still happened
            raise
    finally:
        os.close(fd)


class _Staging:
    """A hidden temporary directory beside the output (``.PREFIX.*.tmp``) that the datasets are written in.

    :meth:`commit` protocol: every staged file is complete and fsynced; each existing final file
    (a previous dataset) is moved aside into the staging directory; then each staged file is
    renamed to its final name, each dataset's ``.json`` after its ``.bin`` and ``.idx``; then the
    output directory is fsynced. If any step fails, the files already placed are removed and the
    previous ones moved back, so the final names hold exactly what they held before. Readers may
    see a prefix without its files for the microseconds of the renames, never a mix of two datasets
    once ``commit`` returned. :meth:`remove` deletes the directory with whatever it still holds
    (partial files, the writer's ``.tmp`` files, a replaced previous dataset).

    Args:
        output_prefix: the (first) output prefix; the directory is made in its parent.
    """

    def __init__(self, output_prefix: Path) -> None:
        self.parent = output_prefix.parent
        self.dir = Path(tempfile.mkdtemp(prefix=f".{output_prefix.name}.", suffix=".tmp", dir=self.parent))

    def prefix(self, final: Path) -> Path:
        """Where the dataset of final prefix ``final`` is staged."""
        return self.dir / final.name

    def commit(self, finals: Iterable[Path]) -> None:
        """Move the staged datasets to their final prefixes, all or none (see the class docstring)."""
        moves = [(self.dir / f"{p.name}{suffix}", Path(f"{p}{suffix}")) for p in finals for suffix in _SUFFIXES]
        aside = self.dir / "previous"
        aside.mkdir()
        moved, placed = [], []
        try:
            for _, final in moves:
                if os.path.lexists(final):
                    os.replace(final, aside / final.name)
                    moved.append(final)
            for staged, final in moves:
                os.replace(staged, final)
                placed.append(final)
            _fsync(self.parent)
        except BaseException:
            for final in placed:
                final.unlink(missing_ok=True)
            for final in moved:
                os.replace(aside / final.name, final)
            raise

    def remove(self) -> None:
        """Delete the staging directory and everything in it."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _disk_full(err: OSError, progress: _Progress, totals: _Totals, dtype: np.dtype, prefix: Path) -> DiskFullError:
    """The one-line :class:`DiskFullError` for ENOSPC/EDQUOT ``err`` (called after the staged files were removed)."""
    path = progress.writing or Path(err.filename or prefix)
    written = sum(totals.tokens.values()) * dtype.itemsize  # whole batches; the one in flight counts as unwritten
    read = (sum(totals.tokens.values()) + progress.in_flight[1]) * dtype.itemsize
    needed = _bytes_still_needed(read, written, totals.documents * len(progress.finals), len(progress.finals),
                                 progress.fraction)
    free = shutil.disk_usage(prefix.parent).free
    what = "disk full" if err.errno == errno.ENOSPC else "disk quota exceeded"
    rest = (f"about {needed:,} more bytes needed (estimated from the {progress.fraction:.0%} of the input read)"
            if needed is not None else "the space still needed is unknown (input size unknown)")
    message = (f"{what} writing {path}: {written:,} bytes of tokens written, {rest}; {free:,} bytes free on "
               f"{prefix.parent}; nothing was written under {prefix} (a previous dataset there is unchanged)")
    return DiskFullError(err.errno, message, path, written, needed, free)


def _bytes_still_needed(read: int, written: int, documents: int, outputs: int, fraction: float | None) -> int | None:
    """Estimated bytes left to write, None when the input size is unknown.

    ``read`` token bytes came from ``fraction`` of the input, ``written`` of them reached the
    disk; the rest of the input is assumed to tokenize at the same rate. Added: the indexes
    (MMIDIDX: 34 + 12 n + 8 (n + 1) bytes for n documents) and ~4 KB of provenance per output.
    """
    if not fraction:
        return None
    total = read / fraction + (42 * outputs + 20 * documents / fraction) + 4096 * outputs
    return max(int(total - written), 0)


def _stream(encoder: DocumentEncoder, reader: _Reader, writers: dict, totals: _Totals, bar: tqdm,
            progress: _Progress) -> list[int]:
    """Encode every block of ``reader`` in order into ``writers``; returns the documents written per input."""
    opts, kept = reader.options, [0] * len(reader.inputs)
    seen = HashSet() if opts.dedup else None
    progress.started = time.perf_counter()
    for batch in encode_batches(encoder, reader.blocks(), opts.processes, opts.threads_per_process):
        source, nbytes = reader.block_inputs.popleft()
        if seen is not None:
            batch = _deduplicate(batch, seen, encoder, totals)
        _merge_stats(reader.stats[source], batch.stats)
        progress.in_flight = (nbytes, sum(len(ids) for ids in (batch.ids, batch.romanized_ids) if ids is not None))
        kept[source] += _write_batch(batch, writers, totals, progress)
        progress.advance(nbytes, totals.tokens[progress.main])
        bar.update(nbytes)
        bar.set_postfix({"docs": f"{totals.documents:,}", "tokens": f"{progress.tokens:,}",
                         "tok/s": f"{progress.tokens_per_second:,.0f}"}, refresh=False)
    return kept


def _language(first_input, language: str | None, script: str | None) -> tuple[str | None, str | None]:
    """Explicit language/script, else what the first input's path says (``hin_Deva/...``)."""
    path_language, path_script = language_from_path(first_input)
    return language or path_language, script or path_script


def _romanizer(language: str | None, script: str | None, options: BinarizeOptions):
    """A Romanizer for ``options.romanize`` (None without one); ValueError if the script is unknown or unsupported."""
    if not options.romanize:
        return None
    if not script:
        raise ValueError("--romanize needs the source script: pass --script (e.g. Deva) or name inputs like hin_Deva/...")
    from megadistill.data.romanize import Romanizer

    return Romanizer(script, options.romanize, language)


def _output_prefixes(output_prefix: Path, options: BinarizeOptions) -> dict[str, Path]:
    """``{"native": prefix, "romanized": prefix.<scheme>}`` as requested by the options."""
    prefixes = {} if options.romanize_only else {"native": output_prefix}
    if options.romanize:
        from megadistill.data.romanize import resolve_scheme, romanized_prefix

        resolve_scheme(options.romanize)
        prefixes["romanized"] = romanized_prefix(output_prefix, options.romanize)
    return prefixes


def _write_batch(batch: EncodedBatch, writers: dict, totals: _Totals, progress: _Progress) -> int:
    """Append an encoded batch to the writers and fold its counters into ``totals``; returns documents written."""
    if "native" in writers:
        progress.at("native", ".bin")
        writers["native"].add_documents(batch.ids, batch.lengths)
        totals.tokens["native"] += len(batch.ids)
    if "romanized" in writers:
        progress.at("romanized", ".bin")
        writers["romanized"].add_documents(batch.romanized_ids, batch.romanized_lengths)
        totals.tokens["romanized"] += len(batch.romanized_ids)
        totals.romanized_characters += batch.romanized_characters
        for key, value in (batch.romanize_stats or {}).items():
            if isinstance(value, (int, float)):
                totals.romanize[key] = totals.romanize.get(key, 0) + value
    written = len(batch.lengths if batch.lengths is not None else batch.romanized_lengths)
    totals.documents += written
    totals.characters += batch.stats.characters
    totals.bytes_utf8 += batch.bytes_utf8
    totals.mixed_script += len(batch.mixed_script)
    room = max(_EXAMPLES - len(totals.mixed_examples), 0)
    totals.mixed_examples += batch.locations[:room]
    totals.control_ids += batch.control_ids_in_text
    totals.control_documents += len(batch.control_documents)
    totals.control_examples += batch.control_locations[:max(_EXAMPLES - len(totals.control_examples), 0)]
    return written


def _provenance(tokenizer, tokenizer_name, totals: _Totals, stats: list[SourceStats], sources: list, dtype: str,
                framing: Framing, language, script, literal_kept_as_text: bool) -> dict[str, Any]:
    """Provenance shared by the native and romanized outputs, in the documented key order.

    ``special_tokens_in_text``: ``count`` control ids found inside documents' text (0 unless the
    tokenizer cannot encode literal special-token strings as text, ``literal_kept_as_text``
    false), in ``documents`` documents, first ``examples`` as ``file:line``; counted over the
    documents as read (before deduplication), native and romanized together.
    """
    dropped = sum_counts([s.dropped for s in stats] + [totals.dropped])
    return {
        **provenance_header(tokenizer, tokenizer_name, framing, language, script),
        "sources": sources,
        "documents": totals.documents,
        "tokens": 0,
        "characters": totals.characters,
        "bytes_utf8": totals.bytes_utf8,
        "dtype": dtype,
        "dropped": dropped,
        "mixed_script_documents": {"count": totals.mixed_script, "examples": totals.mixed_examples},
        "special_tokens_in_text": {"count": totals.control_ids, "documents": totals.control_documents,
                                   "examples": totals.control_examples, "literal_kept_as_text": literal_kept_as_text},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "megadistill_version": __version__,
    }


def _output_meta(base: dict, kind: str, totals: _Totals, prefixes: dict[str, Path], options: BinarizeOptions) -> dict:
    """The provenance of one output: token count, and for a romanized one its scheme, report and native twin."""
    meta = dict(base, tokens=totals.tokens[kind])
    if kind == "romanized":
        from megadistill.data.romanize import resolve_scheme

        meta["characters"] = totals.romanized_characters  # of the romanized text (for its bits per character)
        counts = dict(totals.romanize)  # over the documents as read (before deduplication)
        fraction = counts.get("unmapped_characters", 0) / max(counts.get("native_characters", 0), 1)
        meta["romanization"] = {"scheme": options.romanize, "package_scheme": resolve_scheme(options.romanize),
                                **counts, "unmapped_fraction": fraction,
                                "paired_with": str(prefixes["native"]) if "native" in prefixes else None}
    elif "romanized" in prefixes:
        meta["romanized_as"] = str(prefixes["romanized"])
    return meta


def _log_warnings(meta: dict, prefix: Path) -> None:
    """Warn about mixed-script documents (kept) and control ids inside text, with the first locations."""
    mixed = meta["mixed_script_documents"]
    if mixed["count"]:
        logger.warning("%s: %d of %d documents are mostly not in script %s (kept), e.g. %s", prefix, mixed["count"],
                       meta["documents"], meta["script"], ", ".join(mixed["examples"]))
    special = meta["special_tokens_in_text"]
    if special["count"]:
        logger.warning("%s: the tokenizer encoded literal special-token text to %d control ids inside %d documents "
                       "(kept; it cannot encode them as text), e.g. %s", prefix, special["count"],
                       special["documents"], ", ".join(special["examples"]))


def group_by_language(inputs: list[str], output_dir: Path) -> dict[Path, list[str]]:
    """``{output_dir/<lang>_<Script>: inputs}`` from the inputs' paths, in first-seen order.

    Raises:
        ValueError: an input whose path names no ``xxx_Xxxx`` language code.
    """
    groups: dict[Path, list[str]] = {}
    for path in inputs:
        language, script = language_from_path(path)
        if language is None:
            raise ValueError(f"{path}: no language code in the path (hin_Deva, or IndicCorp/Sangraha style "
                             "hi.txt, hin/); use --output-prefix with --lang/--script")
        groups.setdefault(output_dir / f"{language}_{script}", []).append(path)
    return groups
