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
Next to the pair sits ``<prefix>.json``: provenance (tokenizer hash, counts, language).
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import struct
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

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
        os.replace(self._bin_tmp, self._bin_path)
        os.replace(self._idx_tmp, self._idx_path)
        logger.debug("wrote %s (%d documents)", self._idx_path, len(self._lengths))

    def abort(self) -> None:
        """Close and delete the temp files; any previous ``.bin``/``.idx`` stays as it was."""
        self._done = True
        self._bin.close()
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
        ValueError: wrong magic, unsupported version, unknown dtype code, truncated ``.idx``,
            ``.bin`` size not ``sum(sizes) * itemsize``, pointers inconsistent with sizes,
            malformed document indices.
    """

    def __init__(self, prefix: str | Path) -> None:
        self._prefix = Path(prefix)
        self._bin_path, self._idx_path = _paths(prefix)
        _require_files(self._bin_path, self._idx_path)
        self._dtype, count, doc_count = _read_header(self._idx_path)
        self._idx = np.memmap(self._idx_path, dtype=np.uint8, mode="r")
        self._sizes, self._pointers, self._doc_index = _index_arrays(self._idx, self._idx_path, count, doc_count)
        _validate_index(self._idx_path, self._sizes, self._pointers, self._doc_index, self._dtype)
        self._bin = _map_bin(self._bin_path, int(self._sizes.sum(dtype=np.int64)) * self._dtype.itemsize)

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


def _require_files(bin_path: Path, idx_path: Path) -> None:
    """FileNotFoundError naming whichever of ``.idx``/``.bin`` is missing."""
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing {path.suffix} file of the indexed dataset; "
                "create it with: python tools/binarize.py --input ... --output-prefix ..."
            )


def _read_header(idx_path: Path) -> tuple[np.dtype, int, int]:
    """``(dtype, sequence_count, document_count)`` from the first 34 bytes of ``.idx``."""
    with open(idx_path, "rb") as f:
        raw = f.read(_HEADER.size)
    if raw[: len(MMIDIDX_MAGIC)] != MMIDIDX_MAGIC:
        raise ValueError(f"{idx_path}: not a Megatron MMIDIDX index (magic {raw[:9]!r})")
    if len(raw) < _HEADER.size:
        raise ValueError(f"{idx_path}: truncated .idx ({len(raw)} bytes, header needs {_HEADER.size})")
    _, version, code, count, doc_count = _HEADER.unpack(raw)
    if version != MMIDIDX_VERSION:
        raise ValueError(f"{idx_path}: unsupported MMIDIDX version {version} (supported: {MMIDIDX_VERSION})")
    if code not in DTYPE_CODES:
        raise ValueError(f"{idx_path}: unknown dtype code {code} (Megatron codes: {sorted(DTYPE_CODES)})")
    return DTYPE_CODES[code], count, doc_count


def _index_arrays(idx: np.ndarray, idx_path: Path, count: int, doc_count: int) -> tuple[np.ndarray, ...]:
    """Views of sizes (int32), pointers (int64), document indices (int64) inside the mapped ``.idx``."""
    needed = _HEADER.size + 12 * count + 8 * doc_count
    if len(idx) < needed:
        raise ValueError(
            f"{idx_path}: truncated .idx ({len(idx)} bytes, header promises {needed} for "
            f"{count} sequences and {doc_count} document indices)"
        )
    offset = _HEADER.size
    sizes = np.frombuffer(idx, dtype="<i4", count=count, offset=offset)
    pointers = np.frombuffer(idx, dtype="<i8", count=count, offset=offset + 4 * count)
    doc_index = np.frombuffer(idx, dtype="<i8", count=doc_count, offset=offset + 12 * count)
    return sizes, pointers, doc_index


def _validate_index(idx_path: Path, sizes: np.ndarray, pointers: np.ndarray, doc_index: np.ndarray, dtype: np.dtype) -> None:
    """ValueError if sizes, pointers and document indices do not describe one contiguous ``.bin``."""
    if len(sizes) and int(sizes.min()) < 0:
        raise ValueError(f"{idx_path}: negative sequence length in .idx")
    if not np.array_equal(pointers, _pointers_from_sizes(sizes, dtype.itemsize)):
        raise ValueError(f"{idx_path}: sequence pointers are not consistent with sequence lengths")
    if len(doc_index) == 0 or doc_index[0] != 0 or doc_index[-1] != len(sizes) or np.any(np.diff(doc_index) < 0):
        raise ValueError(f"{idx_path}: document indices must rise from 0 to the sequence count {len(sizes)}")
    if len(doc_index) != len(sizes) + 1:
        logger.warning("%s: %d documents hold %d sequences; items are sequences", idx_path, len(doc_index) - 1, len(sizes))


def _map_bin(bin_path: Path, expected_bytes: int) -> np.ndarray | bytes:
    """Memory-map ``.bin`` as uint8 after checking its size against the index."""
    actual = bin_path.stat().st_size
    if actual != expected_bytes:
        raise ValueError(
            f"{bin_path}: .bin has {actual} bytes but the .idx describes {expected_bytes}; "
            "the pair is from different runs or truncated: re-run tools/binarize.py"
        )
    # mmap refuses empty files; an empty dataset is still a valid one.
    return np.memmap(bin_path, dtype=np.uint8, mode="r") if actual else b""


def _provenance_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


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
        raise FileNotFoundError(
            f"{path}: provenance file missing; re-binarize with: python tools/binarize.py --output-prefix {prefix} ..."
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


def open_checked_datasets(prefixes: Sequence[str | Path], tokenizer: Any) -> list["IndexedDataset"]:
    """Open indexed datasets, refusing any binarized with another tokenizer (:func:`check_tokenizer_matches`).

    Raises:
        FileNotFoundError / ValueError: as :class:`IndexedDataset` and :func:`check_tokenizer_matches`.
    """
    datasets = []
    for prefix in prefixes:
        check_tokenizer_matches(prefix, tokenizer)
        datasets.append(IndexedDataset(prefix))
    return datasets


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
