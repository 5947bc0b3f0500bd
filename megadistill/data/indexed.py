"""Write and memory-map token corpora in Megatron-LM's MMIDIDX ``.bin``/``.idx`` format.

The byte layout follows Megatron-LM ``megatron/core/datasets/indexed_dataset.py``
(``_IndexWriter``/``_IndexReader``), so files written here load in Megatron and the
other way round. Layout of ``<prefix>.idx`` (little endian)::

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          <Q        1
    dtype code       <B        see DTYPE_CODES
    sequence count   <Q        n
    document count   <Q        d (= number of documents + 1)
    sequence_lengths int32[n]  tokens per sequence
    sequence_ptrs    int64[n]  byte offset of each sequence in .bin
    document_indices int64[d]  sequence index where each document starts; 0 ... n

``<prefix>.bin`` is the raw concatenation of all token ids in the dtype of the header.
megadistill stores one sequence per document (``document_indices == arange(n + 1)``).
Next to the pair sits ``<prefix>.json``: provenance (tokenizer hash, document framing, counts,
language). :func:`validate_index` parses the raw bytes and reports every inconsistency; the
reader (:class:`IndexedDataset`) opens only a pair it finds none in.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from megadistill.data.framing import Framing, FramingKind, framing_from_provenance
from megadistill.files import atomic_write_text

logger = logging.getLogger(__name__)

MMIDIDX_MAGIC = b"MMIDIDX\x00\x00"
MMIDIDX_VERSION = 1

# Megatron-LM's table (``DType`` enum). Pinned on purpose: forks disagree, and a wrong
# table silently reinterprets every token. GPT-NeoX swaps 6 and 7 (6 float32, 7 float64);
# DeepSpeed's data_sampling indexed dataset maps 8 to uint64 instead of uint16.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF_DTYPE = {dtype: code for code, dtype in DTYPE_CODES.items()}

# magic, version, dtype code, sequence count, document count; "<" means no padding (34 bytes).
_HEADER = struct.Struct("<9sQBQQ")

# Megatron's threshold is 65500, not 65536, leaving headroom below the uint16 limit.
_UINT16_VOCAB_LIMIT = 65500


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest on-disk dtype Megatron uses for token ids of a vocabulary.

    Args:
        vocab_size: number of token ids (``len(tokenizer)``), ids are ``0 .. vocab_size - 1``.
    Returns:
        ``np.dtype(uint16)`` when ``vocab_size < 65500``, else ``np.dtype(int32)``
        (Megatron-LM ``DType.optimal_dtype``).
    Raises:
        ValueError: ``vocab_size`` is not positive.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < _UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def _paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(<prefix>.bin, <prefix>.idx)``; suffixes are appended, never replaced (``hin_Deva.iast``)."""
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def dataset_prefix(arg: str | Path) -> Path:
    """The dataset prefix a command-line argument names: ``x.idx``/``x.bin``/``x.json`` mean ``x``
    (unless ``x.idx.idx`` exists, i.e. the prefix itself ends in ``.idx``); anything else is the prefix."""
    path = Path(arg)
    if path.suffix in (".idx", ".bin", ".json") and not Path(f"{path}.idx").exists():
        return path.with_suffix("")
    return path


def _dtype_code(dtype: np.dtype) -> int:
    """Megatron dtype code of ``dtype``; ValueError if Megatron's table lacks it."""
    code = _CODE_OF_DTYPE.get(np.dtype(dtype))
    if code is None:
        names = ", ".join(d.name for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {np.dtype(dtype).name} is not in Megatron's MMIDIDX table ({names})")
    return code


class IndexedDatasetWriter:
    """Stream documents of token ids into ``<prefix>.bin``/``<prefix>.idx`` atomically.

    Tokens go straight to ``<prefix>.bin.tmp``; only one int64 length per document is kept
    in memory. ``finalize()`` writes ``<prefix>.idx.tmp`` and renames both temp files over the
    final names, so readers see either the previous complete output or the new one. Used as a
    context manager, the writer finalizes on a clean exit and, on an exception, deletes its
    temp files and leaves any previous output untouched. Format: Megatron-LM
    ``megatron/core/datasets/indexed_dataset.py`` (one sequence per document).

    Args:
        prefix: output path without suffix; parent directory must exist.
        dtype: integer token dtype from ``DTYPE_CODES`` (see ``token_dtype_for_vocab``).
    Raises:
        ValueError: dtype is not an integer dtype of Megatron's table.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        if self.dtype.kind not in "iu":
            raise ValueError(f"token ids need an integer dtype, got {self.dtype.name}")
        self.prefix = Path(prefix)
        self._bin_path, self._idx_path = _paths(prefix)
        self._bin_tmp = Path(f"{self._bin_path}.tmp")
        self._idx_tmp = Path(f"{self._idx_path}.tmp")
        self._lengths = array.array("q")  # 8 bytes per document, not a Python int object
        self._bin = open(self._bin_tmp, "wb")
        self._done = False

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.finalize()

    @property
    def num_documents(self) -> int:
        """Documents added so far."""
        return len(self._lengths)

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document of token ids (1-D, any integer type) to ``.bin``.

        Raises:
            ValueError: document empty or not 1-D, ids not integers, an id negative or
                above the dtype's maximum (the message names the document and the id).
            RuntimeError: the writer was already finalized or aborted.
        """
        if self._done:
            raise RuntimeError(f"writer for {self.prefix} is already closed")
        tokens = self._checked_tokens(ids)
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(len(tokens))

    def add_documents(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: ``ids`` is their tokens concatenated, ``lengths`` their sizes.

        Args:
            ids: 1-D integer array of ``lengths.sum()`` token ids.
            lengths: 1-D integer array, tokens per document (each >= 1).
        Raises:
            ValueError: as :meth:`add_document`, for the batch; lengths that do not sum to ``len(ids)``.
            RuntimeError: the writer was already finalized or aborted.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        if len(lengths) == 0:
            return
        if self._done:
            raise RuntimeError(f"writer for {self.prefix} is already closed")
        if int(lengths.sum()) != len(ids) or int(lengths.min()) < 1:
            raise ValueError(f"documents {len(self._lengths)}..: lengths must be >= 1 and sum to {len(ids)} ids")
        tokens = self._checked_tokens(ids)
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.extend(lengths.tolist())

    def add_dataset(self, dataset: "IndexedDataset", chunk_bytes: int = 64 << 20) -> None:
        """Append every document of ``dataset`` by copying its ``.bin`` bytes (no token parsing).

        Memory stays at ``chunk_bytes`` plus 8 bytes per document. Used to merge shards.

        Args:
            dataset: an open dataset in this writer's dtype, one sequence per document.
            chunk_bytes: bytes copied per read (default 64 MiB).
        Raises:
            ValueError: the dtypes differ, or ``dataset`` has several sequences per document
                (Megatron ``--split-sentences`` output: its document boundaries cannot be kept).
            RuntimeError: the writer was already finalized or aborted.
        """
        if self._done:
            raise RuntimeError(f"writer for {self.prefix} is already closed")
        if dataset.dtype != self.dtype:
            raise ValueError(f"{dataset.prefix}.idx: token dtype {dataset.dtype.name}, the output is {self.dtype.name}")
        if len(dataset.document_indices) != len(dataset) + 1:
            raise ValueError(
                f"{dataset.prefix}.idx: {len(dataset.document_indices) - 1} documents hold {len(dataset)} sequences; "
                "merging keeps one sequence per document, so sentence-split Megatron files are refused"
            )
        with open(Path(f"{dataset.prefix}.bin"), "rb") as src:
            while chunk := src.read(chunk_bytes):
                self._bin.write(chunk)
        self._lengths.frombytes(dataset.sizes.astype(np.int64).tobytes())  # native int64, as array('q')

    def _checked_tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """``ids`` as a 1-D integer array after range checks against ``self.dtype``."""
        doc = len(self._lengths)
        tokens = np.asarray(ids)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"document {doc}: expected a non-empty 1-D list of token ids, got shape {tokens.shape}")
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"document {doc}: token ids must be integers, got dtype {tokens.dtype}")
        if tokens.size > np.iinfo(np.int32).max:
            raise ValueError(f"document {doc}: {tokens.size} tokens exceed the int32 length field of MMIDIDX")
        low, high = int(tokens.min()), int(tokens.max())
        info = np.iinfo(self.dtype)
        if low < 0:
            raise ValueError(f"document {doc}: negative token id {low}")
        if high > info.max:
            raise ValueError(
                f"document {doc}: token id {high} does not fit {self.dtype.name} (max {info.max}); "
                "use token_dtype_for_vocab(len(tokenizer)) to pick the dtype"
            )
        return tokens

    def finalize(self) -> None:
        """Write the index and move ``.bin``/``.idx`` into place (``os.replace``, atomic per file).

        Raises:
            RuntimeError: called twice or after ``abort()``.
        """
        if self._done:
            raise RuntimeError(f"writer for {self.prefix} is already closed")
        self._done = True
        try:
            self._close_bin()
            self._write_index(self._idx_tmp)
        except BaseException:
            self._remove_temp_files()
            raise
        # .idx last: a reader that finds the new .idx also finds the matching new .bin.
        try:
            os.replace(self._bin_tmp, self._bin_path)
            os.replace(self._idx_tmp, self._idx_path)
        except BaseException:
            self._remove_temp_files()  # a failed rename leaves no .tmp behind
            raise
        logger.debug("wrote %s (%d documents)", self._idx_path, len(self._lengths))

    def abort(self) -> None:
        """Close and delete the temp files; any previous ``.bin``/``.idx`` stays as it was."""
        self._done = True
        try:
            self._bin.close()  # flushing may fail again on a full disk: the temp files go regardless
        except OSError:
            pass
        finally:
            self._remove_temp_files()

    def _close_bin(self) -> None:
        """Flush the token stream to disk before the rename makes it visible."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()

    def _write_index(self, path: Path) -> None:
        """Header + lengths + pointers + document indices, as Megatron's ``_IndexWriter``."""
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else np.zeros(0, np.int64)
        count = len(lengths)
        with open(path, "wb") as f:
            f.write(_HEADER.pack(MMIDIDX_MAGIC, MMIDIDX_VERSION, self._code, count, count + 1))
            f.write(lengths.astype("<i4").tobytes())
            f.write(_pointers_from_sizes(lengths, self.dtype.itemsize).astype("<i8").tobytes())
            f.write(np.arange(count + 1, dtype="<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())

    def _remove_temp_files(self) -> None:
        for tmp in (self._bin_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)


def _pointers_from_sizes(sizes: np.ndarray, itemsize: int) -> np.ndarray:
    """Byte offset of each sequence in ``.bin``: exclusive cumulative sum of sizes * itemsize (int64)."""
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


# ------------------------------------------------------------------ parsing and validating the bytes


@dataclass
class RawIndex:
    """What the bytes of an ``.idx`` file say, nothing assumed consistent (see the module docstring).

    Attributes:
        path: the ``.idx`` file.
        nbytes: its length in bytes.
        magic: its first (up to) 9 bytes.
        version, code, count, doc_count: header fields (MMIDIDX version, Megatron dtype code,
            sequence count ``n``, document-index count ``d``); None when the header is truncated.
        sizes: int32 [n] tokens per sequence; pointers: int64 [n] byte offsets into ``.bin``;
            doc_index: int64 [d] first sequence of each document. Each is a read-only view of
            the mapped file, or None when the file ends before the array does.
    """

    path: Path
    nbytes: int
    magic: bytes = b""
    version: int | None = None
    code: int | None = None
    count: int | None = None
    doc_count: int | None = None
    sizes: np.ndarray | None = None
    pointers: np.ndarray | None = None
    doc_index: np.ndarray | None = None

    @property
    def dtype(self) -> np.dtype | None:
        """Token dtype of the header's dtype code; None when the code is unknown or absent."""
        return DTYPE_CODES.get(self.code) if self.code is not None else None

    @property
    def sizes_offset(self) -> int:
        """Byte offset of ``sequence_lengths`` (int32[n])."""
        return _HEADER.size

    @property
    def pointers_offset(self) -> int:
        """Byte offset of ``sequence_ptrs`` (int64[n])."""
        return _HEADER.size + 4 * (self.count or 0)

    @property
    def doc_index_offset(self) -> int:
        """Byte offset of ``document_indices`` (int64[d])."""
        return _HEADER.size + 12 * (self.count or 0)

    @property
    def expected_nbytes(self) -> int | None:
        """Length the header promises: 34 + 12 n + 8 d bytes; None without a complete header."""
        if self.count is None or self.doc_count is None:
            return None
        return _HEADER.size + 12 * self.count + 8 * self.doc_count


def read_raw_index(idx_path: str | Path) -> RawIndex:
    """Parse the header and the arrays of an ``.idx`` file as far as its bytes reach (memory-mapped, no copy).

    Raises:
        FileNotFoundError: the file is missing.
    """
    idx_path = Path(idx_path)
    nbytes = idx_path.stat().st_size
    raw = RawIndex(idx_path, nbytes)
    data = np.memmap(idx_path, dtype=np.uint8, mode="r") if nbytes else np.zeros(0, np.uint8)
    raw.magic = bytes(data[: len(MMIDIDX_MAGIC)])
    if nbytes < _HEADER.size:
        return raw
    _, raw.version, raw.code, raw.count, raw.doc_count = _HEADER.unpack(bytes(data[: _HEADER.size]))
    raw.sizes = _array_at(data, raw.sizes_offset, "<i4", raw.count)
    raw.pointers = _array_at(data, raw.pointers_offset, "<i8", raw.count)
    raw.doc_index = _array_at(data, raw.doc_index_offset, "<i8", raw.doc_count)
    return raw


def _array_at(data: np.ndarray, offset: int, dtype: str, count: int) -> np.ndarray | None:
    """``count`` items of ``dtype`` at byte ``offset``, or None if the bytes end before the last one."""
    if offset + np.dtype(dtype).itemsize * count > len(data):
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset)


def _header_problems(raw: RawIndex) -> list[str]:
    """Magic, header length, version and dtype code (each with its byte offset)."""
    p, problems = raw.path, []
    if raw.magic != MMIDIDX_MAGIC:
        problems.append(f"{p}: byte 0: bad magic {raw.magic!r}, expected {MMIDIDX_MAGIC!r} (not a Megatron MMIDIDX index)")
    if raw.nbytes < _HEADER.size:
        return problems + [f"{p}: truncated .idx: {raw.nbytes} bytes, the header alone needs {_HEADER.size}"]
    if raw.version != MMIDIDX_VERSION:
        problems.append(f"{p}: byte 9: unsupported MMIDIDX version {raw.version}, expected {MMIDIDX_VERSION}")
    if raw.code not in DTYPE_CODES:
        table = ", ".join(f"{c} {d.name}" for c, d in DTYPE_CODES.items())
        problems.append(f"{p}: byte 17: unknown dtype code {raw.code} (Megatron codes: {table})")
    return problems


def _length_problems(raw: RawIndex) -> list[str]:
    """``.idx`` length against the 34 + 12 n + 8 d bytes the header promises."""
    expected = raw.expected_nbytes
    if expected is None or raw.nbytes == expected:
        return []
    promise = f"the header promises {expected} for {raw.count} sequences and {raw.doc_count} document indices"
    if raw.nbytes < expected:
        return [f"{raw.path}: byte {raw.nbytes}: truncated .idx: {raw.nbytes} bytes, {promise}"]
    return [f"{raw.path}: byte {expected}: {raw.nbytes - expected} trailing bytes after the index ({promise})"]


def _size_problems(raw: RawIndex) -> list[str]:
    """Sequence lengths must be non-negative (first offender named)."""
    bad = np.flatnonzero(raw.sizes < 0) if raw.sizes is not None else []
    if len(bad) == 0:
        return []
    i = int(bad[0])
    return [f"{raw.path}: byte {raw.sizes_offset + 4 * i}: sequence {i} has negative length {int(raw.sizes[i])}"
            f" ({len(bad)} negative lengths in all)"]


def _pointer_problems(raw: RawIndex) -> list[str]:
    """Pointers equal the exclusive cumsum of sizes * itemsize (start at 0) and never decrease."""
    ptrs, problems = raw.pointers, []
    if ptrs is None or len(ptrs) == 0:
        return []
    if raw.sizes is not None and raw.dtype is not None:
        expected = _pointers_from_sizes(raw.sizes, raw.dtype.itemsize)
        if np.array_equal(ptrs, expected):
            return []  # and so monotonic, lengths being checked apart (one pass over a large index, not three)
        bad = np.flatnonzero(ptrs != expected)
        i = int(bad[0])
        problems.append(f"{raw.path}: byte {raw.pointers_offset + 8 * i}: pointers are not consistent with the "
                        f"sequence lengths: pointer of sequence {i} is {int(ptrs[i])}, expected {int(expected[i])} "
                        f"(= sum of earlier lengths x {raw.dtype.itemsize} bytes); {len(bad)} wrong pointers in all")
    elif ptrs[0] != 0:
        problems.append(f"{raw.path}: byte {raw.pointers_offset}: pointer of sequence 0 is {int(ptrs[0])}, expected 0")
    down = np.flatnonzero(np.diff(ptrs) < 0)
    if len(down):
        i = int(down[0]) + 1
        problems.append(f"{raw.path}: byte {raw.pointers_offset + 8 * i}: pointers not monotonic: sequence {i} "
                        f"starts at {int(ptrs[i])}, before sequence {i - 1} at {int(ptrs[i - 1])}")
    return problems


def _doc_index_problems(raw: RawIndex) -> list[str]:
    """Document indices start at 0, end at the sequence count and never decrease."""
    docs, base, p, n = raw.doc_index, raw.doc_index_offset, raw.path, raw.count
    if docs is None:
        return []
    if len(docs) == 0:
        return [f"{p}: byte 26: document count 0; the document indices need at least [0 ... {n}]"]
    problems = []
    if docs[0] != 0:
        problems.append(f"{p}: byte {base}: document index 0 is {int(docs[0])}, expected 0")
    if docs[-1] != n:
        last = len(docs) - 1
        problems.append(f"{p}: byte {base + 8 * last}: last document index ({last}) is {int(docs[-1])}, "
                        f"expected the sequence count {n}")
    down = np.flatnonzero(np.diff(docs) < 0)
    if len(down):
        i = int(down[0]) + 1
        problems.append(f"{p}: byte {base + 8 * i}: document indices decrease: index {i} is {int(docs[i])} "
                        f"after {int(docs[i - 1])}")
    return problems


def _bin_size_problems(raw: RawIndex, bin_path: Path, bin_bytes: int) -> list[str]:
    """``.bin`` size must be ``sum(sizes) * itemsize``; names the first sequence a short file cuts."""
    if raw.sizes is None or raw.dtype is None:
        return []
    tokens = int(raw.sizes.sum(dtype=np.int64))
    expected = tokens * raw.dtype.itemsize
    if bin_bytes == expected:
        return []
    sizes = raw.sizes.astype(np.int64)
    what = (f".bin has {bin_bytes} bytes but the .idx describes {expected} ({tokens} tokens of "
            f"{raw.dtype.name}); the pair is from different runs or truncated: re-run tools/binarize.py")
    if bin_bytes > expected:
        return [f"{bin_path}: byte {expected}: {bin_bytes - expected} trailing bytes; {what}"]
    first = int(np.searchsorted(np.cumsum(sizes * raw.dtype.itemsize), bin_bytes, side="right"))
    return [f"{bin_path}: byte {bin_bytes}: truncated .bin, sequence {first} onwards is cut; {what}"]


@dataclass
class IndexReport:
    """Result of :func:`validate_index`: the parsed index, the ``.bin`` size and every structural problem.

    Attributes:
        prefix: the dataset prefix.
        raw: the parsed ``.idx`` (:class:`RawIndex`).
        bin_bytes: size of ``.bin`` in bytes.
        problems: one message per problem, each naming the file and the byte offset; empty when valid.
    """

    prefix: Path
    raw: RawIndex
    bin_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def require_dataset_files(prefix: str | Path) -> None:
    """FileNotFoundError naming every missing ``.idx``/``.bin`` of ``prefix`` (one line, with the fix)."""
    bin_path, idx_path = _paths(prefix)
    missing = [str(p) for p in (idx_path, bin_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)}: file not found (dataset prefix {prefix}); create the dataset "
                                "with: python tools/binarize.py --input ... --output-prefix ...")


def validate_index(prefix: str | Path) -> IndexReport:
    """Check a ``<prefix>.idx``/``.bin`` pair from its raw bytes, reporting every problem (not just the first).

    Checks: magic, version, dtype code, ``.idx`` length, sequence lengths, pointers, document
    indices and ``.bin`` size. Reads the header and maps the arrays; ``.bin`` is only stat'ed.

    Raises:
        FileNotFoundError: ``.idx`` or ``.bin`` missing (:func:`require_dataset_files`).
    """
    require_dataset_files(prefix)
    bin_path, idx_path = _paths(prefix)
    raw = read_raw_index(idx_path)
    report = IndexReport(Path(prefix), raw, bin_path.stat().st_size)
    report.problems = (_header_problems(raw) + _length_problems(raw) + _size_problems(raw) + _pointer_problems(raw)
                       + _doc_index_problems(raw) + _bin_size_problems(raw, bin_path, report.bin_bytes))
    return report


# ------------------------------------------------------------------------------------- reading


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron MMIDIDX ``<prefix>.bin``/``<prefix>.idx`` pair.

    Item ``i`` is sequence ``i`` as a 1-D array in the on-disk dtype (no copy). Files written
    by megadistill hold one sequence per document, so items are documents; a Megatron file
    with several sequences per document (``--split-sentences``) is read sequence by sequence,
    with a warning. Follows Megatron-LM ``megatron/core/datasets/indexed_dataset.py``.

    Args:
        prefix: path without ``.bin``/``.idx``.
    Raises:
        FileNotFoundError: ``.idx`` or ``.bin`` missing (message names the file).
        ValueError: any problem :func:`validate_index` finds (wrong magic, unsupported version,
            unknown dtype code, truncated ``.idx`` or trailing bytes, ``.bin`` size not
            ``sum(sizes) * itemsize``, pointers inconsistent with sizes, malformed document
            indices); the message is the first problem and how many there are.
    """

    def __init__(self, prefix: str | Path) -> None:
        self._prefix = Path(prefix)
        self._bin_path, self._idx_path = _paths(prefix)
        report = validate_index(prefix)
        if report.problems:
            raise ValueError(f"{report.problems[0]} ({len(report.problems)} problem(s) in all, listed by: "
                             f"python tools/inspect_data.py {prefix}; re-binarize to repair)")
        raw = report.raw
        self._dtype, self._sizes, self._pointers, self._doc_index = raw.dtype, raw.sizes, raw.pointers, raw.doc_index
        if len(self._doc_index) != len(self._sizes) + 1:
            logger.warning("%s: %d documents hold %d sequences; items are sequences", self._idx_path,
                           len(self._doc_index) - 1, len(self._sizes))
        # mmap refuses empty files; an empty dataset is still a valid one.
        self._bin = np.memmap(self._bin_path, dtype=np.uint8, mode="r") if report.bin_bytes else b""

    # np.memmap pickles by copying the whole array; DataLoader workers reopen the files instead.
    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": str(self._prefix)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset .. offset + length`` of sequence ``i`` (1-D, on-disk dtype, read-only view).

        Args:
            i: sequence index; negative counts from the end.
            offset: first token, in tokens from the start of the sequence.
            length: number of tokens; ``None`` means up to the end of the sequence.
        Raises:
            IndexError: ``i`` out of range, or the token window leaves the sequence.
        """
        n = len(self._sizes)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences in {self._idx_path}")
        i = int(i) % n
        size = int(self._sizes[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {i} of {size} tokens")
        start = int(self._pointers[i]) + offset * self._dtype.itemsize
        return np.frombuffer(self._bin, dtype=self._dtype, count=length, offset=start)

    @property
    def prefix(self) -> Path:
        """Path prefix the dataset was opened with."""
        return self._prefix

    @property
    def dtype(self) -> np.dtype:
        """On-disk token dtype (from the header's Megatron dtype code)."""
        return self._dtype

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sequence (= per document here), int32 array of shape ``(len(self),)``."""
        return self._sizes

    @property
    def pointers(self) -> np.ndarray:
        """Byte offset of each sequence in ``.bin``, int64 array of shape ``(len(self),)``."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """Sequence index where each document starts, int64 array ``(num_documents + 1,)``."""
        return self._doc_index

    @property
    def num_tokens(self) -> int:
        """Total tokens in ``.bin``."""
        return int(self._sizes.sum(dtype=np.int64))


def _provenance_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


PROVENANCE_FORMAT = "megatron-mmidindex-v1"
"""The ``format`` of every provenance ``.json`` this project writes (binarized and adopted datasets)."""


def provenance_header(tokenizer: Any, tokenizer_name: str | None, framing, language: str | None,
                      script: str | None) -> dict[str, Any]:
    """The keys every provenance starts with, in the documented order: format, tokenizer (name, SHA-256,
    vocabulary size), BOS/EOS ids, ``add_bos``, the framing record, language, script, romanization (None).

    ``framing`` is a :class:`megadistill.data.framing.Framing`. One builder for the binarizer and
    ``tools/adopt_dataset.py``, so the two never drift apart.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return {
        "format": PROVENANCE_FORMAT,
        "tokenizer": {"name": tokenizer_name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
                      "sha256": tokenizer_sha256(tokenizer), "vocab_size": len(tokenizer)},
        "bos_id": bos_id,
        "eos_id": getattr(tokenizer, "eos_token_id", None),
        "add_bos": bos_id is not None and framing.prefix_ids[:1] == (bos_id,),
        "framing": framing.as_dict(),
        "language": language,
        "script": script,
        "romanization": None,
    }


def write_provenance(prefix: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``meta`` as pretty UTF-8 JSON to ``<prefix>.json`` (tmp file + ``os.replace``).

    Returns:
        The path written.
    Raises:
        TypeError: ``meta`` is not JSON serializable (nothing is left behind).
    """
    text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(_provenance_path(prefix), text)


def read_provenance(prefix: str | Path) -> dict[str, Any]:
    """Provenance dict from ``<prefix>.json``.

    Raises:
        FileNotFoundError: the sidecar is missing (says how to recreate it).
        ValueError: the sidecar is not a JSON object.
    """
    path = _provenance_path(prefix)
    if not path.is_file():
        if not _paths(prefix)[1].is_file():
            raise FileNotFoundError(f"dataset {prefix} not found (no {prefix}.bin/.idx): create it with "
                                    f"python tools/binarize.py --input ... --output-prefix {prefix}")
        raise FileNotFoundError(
            f"{path}: no provenance; if Megatron-LM (or another tool) wrote {prefix}.bin/.idx, check and record one with: "
            f"python tools/adopt_dataset.py {prefix} --tokenizer <teacher>; else re-binarize with python tools/binarize.py"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def tokenizer_sha256(tokenizer: Any) -> str:
    """SHA-256 (hex, 64 chars) of a canonical serialization of a Hugging Face tokenizer.

    Fast tokenizers hash ``backend_tokenizer.to_str()`` re-dumped with sorted keys, minus the
    ``truncation``/``padding`` entries: calling the tokenizer with ``truncation=True`` changes
    them without changing any id. Other tokenizers hash the sorted vocabulary plus the special
    tokens. The hash can change across ``tokenizers`` versions that add serialized fields.
    Hashing a 262k-entry vocabulary takes ~1.5 s, so the result is remembered per tokenizer
    object and recomputed when its length changes (``add_tokens``); checking 20 datasets or
    binarizing 20 languages then pays it once.
    """
    try:
        cached = _SHA_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        return _tokenizer_sha256(tokenizer)
    if cached is not None and cached[0] == len(tokenizer):
        return cached[1]
    digest = _tokenizer_sha256(tokenizer)
    _SHA_CACHE[tokenizer] = (len(tokenizer), digest)
    return digest


_SHA_CACHE: "weakref.WeakKeyDictionary[Any, tuple[int, str]]" = weakref.WeakKeyDictionary()


def _tokenizer_sha256(tokenizer: Any) -> str:
    """Uncached :func:`tokenizer_sha256`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        data.pop("truncation", None)
        data.pop("padding", None)
    else:
        data = {"vocab": tokenizer.get_vocab(), "special_tokens": _special_tokens(tokenizer)}
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _special_tokens(tokenizer: Any) -> dict[str, str]:
    return {name: str(value) for name, value in tokenizer.special_tokens_map.items()}


def read_framing(dataset: "IndexedDataset | str | Path") -> Framing:
    """The :class:`~megadistill.data.framing.Framing` of a dataset (or prefix), from its ``.json`` provenance.

    Provenance without a ``framing`` record (written before encoder support) means decoder framing.

    Raises:
        FileNotFoundError: ``<prefix>.json`` missing.
        ValueError: a malformed ``framing`` record (names the file and the field).
    """
    prefix = dataset.prefix if isinstance(dataset, IndexedDataset) else dataset
    return framing_from_provenance(read_provenance(prefix), f"{prefix}.json")


def open_checked_datasets(prefixes: Sequence[str | Path], tokenizer: Any,
                          framing_kind: FramingKind | None = None) -> list["IndexedDataset"]:
    """Open indexed datasets, refusing any binarized with another tokenizer or framed otherwise than the rest.

    Decoder (``[BOS] text EOS``) and encoder (``[CLS] text [SEP]``, ``<s> text </s>``) datasets
    are both accepted; all of one call must share one framing (:func:`read_framing`).

    Args:
        prefixes: dataset prefixes.
        tokenizer: the teacher tokenizer (:func:`check_tokenizer_matches`).
        framing_kind: ``"decoder"`` or ``"encoder"`` to also refuse datasets framed for the
            other kind of model (a masked-LM stage passes ``"encoder"``); None accepts either.
    Raises:
        FileNotFoundError / ValueError: as :class:`IndexedDataset`, :func:`check_tokenizer_matches`
            and :func:`read_framing`; ValueError for a dataset of another framing kind than
            ``framing_kind`` or another framing than the first dataset, or whose provenance
            ``dtype`` / ``documents`` / ``tokens`` disagree with the index (:func:`check_provenance_counts`),
            or whose index holds floats (Megatron's codes 6 and 7) instead of token ids.
    """
    datasets, framings = [], []
    for prefix in prefixes:
        check_tokenizer_matches(prefix, tokenizer)
        framings.append(read_framing(prefix))
        _check_framing(prefix, framings[-1], framings[0], prefixes[0], framing_kind)
        datasets.append(IndexedDataset(prefix))
        check_provenance_counts(datasets[-1], read_provenance(prefix))
        if datasets[-1].dtype.kind == "f":  # a valid MMIDIDX file, but not token ids
            raise ValueError(f"{prefix}.idx: dtype {datasets[-1].dtype.name} holds no token ids (integer dtypes only); "
                             "re-binarize with python tools/binarize.py")
    return datasets


def check_provenance_counts(dataset: "IndexedDataset", meta: dict[str, Any]) -> None:
    """Refuse a dataset whose ``.json`` provenance disagrees with its index on ``dtype``, ``documents`` or ``tokens``.

    The one header corruption the bytes of a pair cannot reveal is a dtype code changed to another
    dtype of the same width (uint16 <-> int16, int32 <-> float32, ...): every length stays consistent
    and every token is silently reinterpreted. The provenance written by binarize records the dtype
    name, so the reader can catch it; the counts catch a ``.bin``/``.idx`` pair replaced under an old
    ``.json``. Keys missing from the provenance (Megatron files, hand-written records) are not checked.

    Raises:
        ValueError: ``<prefix>.json: "<key>" is <stored> but <prefix>.idx holds <actual>; ...``.
    """
    actual = {"dtype": dataset.dtype.name, "documents": len(dataset.document_indices) - 1,
              "tokens": dataset.num_tokens}
    for key, value in actual.items():
        if key in meta and meta[key] != value:
            raise ValueError(f"{dataset.prefix}.json: \"{key}\" is {meta[key]!r} but {dataset.prefix}.idx holds "
                             f"{value!r}; the .idx header is damaged or the pair and its provenance come from "
                             f"different runs: re-binarize (python tools/inspect_data.py {dataset.prefix} lists every problem)")


def _check_framing(prefix, framing: Framing, first: Framing, first_prefix, kind: FramingKind | None) -> None:
    """ValueError when ``framing`` is not of ``kind`` or differs from the first dataset's."""
    if kind is not None and framing.kind != kind:
        raise ValueError(f"{prefix}.json: documents are framed for {framing.kind} models ({framing.as_dict()}) but "
                         f"this run needs {kind} framing; binarize the text with the {kind} teacher's tokenizer")
    if framing != first:
        raise ValueError(f"{prefix}.json: framing {framing.as_dict()} differs from {first_prefix}.json's "
                         f"{first.as_dict()}; binarize all datasets of a run with the same tokenizer and binarize version")


def check_tokenizer_matches(prefix: str | Path, tokenizer: Any) -> None:
    """Refuse a dataset binarized with another tokenizer (token ids would mean other strings).

    Raises:
        FileNotFoundError: ``<prefix>.json`` missing.
        ValueError: the provenance has no tokenizer hash, or it differs from
            ``tokenizer_sha256(tokenizer)``; one line with both hashes and the fix.
    """
    meta = read_provenance(prefix)
    stored = meta.get("tokenizer", {}).get("sha256") if isinstance(meta.get("tokenizer"), dict) else None
    if not stored:
        raise ValueError(f"{prefix}.json: no tokenizer.sha256 in provenance; re-binarize with python tools/binarize.py")
    current = tokenizer_sha256(tokenizer)
    if stored != current:
        raise ValueError(
            f"dataset {prefix} was binarized with tokenizer {stored[:12]} but the teacher tokenizer is "
            f"{current[:12]}; re-binarize with the teacher tokenizer: python tools/binarize.py "
            f"--input ... --tokenizer <teacher> --output-prefix {prefix}"
        )
