"""Inspect a binarized dataset: every problem of its ``.bin``/``.idx``/``.json`` triple, token statistics, decoded documents.

The library core of ``tools/inspect_data.py``. Structure is checked by
:func:`megadistill.data.indexed.validate_index` (the parser :class:`~megadistill.data.indexed.IndexedDataset`
opens files with), from the raw bytes, so every problem is reported with its file and byte
offset rather than the first one raised. This module adds the checks that need the provenance:
its counts against the index, its ``framing`` record, and, on request (``check_ids``), a scan of
``.bin`` for token ids outside the vocabulary and for documents that do not carry their framing.
A pair without provenance (written by Megatron-LM itself) is a warning, not a problem: it is
valid data that ``tools/adopt_dataset.py`` can give a provenance to.

:func:`resolve_dataset` is the one place every tool (inspect, merge, adopt, the training stages)
turns a command-line or config path into a checked dataset prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megadistill.data.framing import Framing, framing_from_provenance
from megadistill.data.indexed import RawIndex, dataset_prefix, read_provenance, tokenizer_sha256, validate_index

CHUNK_TOKENS = 1 << 22  # tokens per read when scanning .bin for check_ids


@dataclass
class Inspection:
    """Raw index, problems (structural ones separately) and provenance of one prefix.

    Attributes:
        prefix: the dataset prefix.
        raw: the parsed ``.idx``.
        bin_bytes: size of ``.bin`` in bytes.
        meta: the ``.json`` provenance, or None when missing or unreadable.
        structural: problems of the ``.bin``/``.idx`` pair (and of its tokens with ``check_ids``).
        provenance: problems of the ``.json`` against the pair.
        warnings: what is not a problem but limits use: no ``.json`` at all (a Megatron-LM pair,
            see :func:`adopt_hint`), ids left unchecked for want of a vocabulary size.
    """

    prefix: Path
    raw: RawIndex
    bin_bytes: int
    meta: dict[str, Any] | None
    structural: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """All problems, structural first."""
        return self.structural + self.provenance


def files_of(prefix: str | Path) -> tuple[Path, Path, Path]:
    """``(<prefix>.idx, <prefix>.bin, <prefix>.json)``; suffixes are appended, never replaced."""
    return Path(f"{prefix}.idx"), Path(f"{prefix}.bin"), Path(f"{prefix}.json")


def adopt_hint(prefix: str | Path, tokenizer: str | None = None) -> str:
    """The command that gives a provenance to a pair written without one (Megatron-LM's own files)."""
    return f"python tools/adopt_dataset.py {prefix} --tokenizer {tokenizer or '<teacher>'}"


def resolve_dataset(arg: str | Path, field: str | None = None, provenance: bool = True,
                    tokenizer: str | None = None) -> Path:
    """The dataset prefix a command-line or config path names, after checking its files exist.

    Only file existence is checked (``stat``); contents are :func:`inspect_dataset`'s job.

    Args:
        arg: a prefix, or the path of its ``.bin``/``.idx``/``.json`` (the suffix is dropped, see
            :func:`megadistill.data.indexed.dataset_prefix`).
        field: what named the path (``"data.train_prefixes[0]"``), put before the message.
        provenance: also require ``<prefix>.json``.
        tokenizer: the teacher spec to name in the ``adopt_dataset`` hint (``<teacher>`` when None).
    Returns:
        The prefix, without suffix.
    Raises:
        FileNotFoundError: one line naming the prefix and the fix: ``.bin`` and ``.idx`` both missing
            ("dataset P not found (no P.bin/.idx)", binarize it), one of them missing, or (with
            ``provenance``) ``.json`` missing (adopt it with ``tools/adopt_dataset.py``).
    """
    prefix = dataset_prefix(arg)
    idx, bin_, json_path = files_of(prefix)
    where = f"{field}: " if field else ""
    missing = [p.suffix for p in (bin_, idx) if not p.is_file()]
    if len(missing) == 2:
        raise FileNotFoundError(f"{where}dataset {prefix} not found (no {prefix}.bin/.idx): create it with "
                                f"python tools/binarize.py --input ... --output-prefix {prefix}")
    if missing:
        raise FileNotFoundError(f"{where}dataset {prefix} is incomplete (no {prefix}{missing[0]}): re-create it with "
                                f"python tools/binarize.py --input ... --output-prefix {prefix}")
    if provenance and not json_path.is_file():
        raise FileNotFoundError(f"{where}dataset {prefix} has no provenance {json_path}; if Megatron-LM (or another "
                                f"tool) wrote it, check and record one with: {adopt_hint(prefix, tokenizer)}")
    return prefix


def inspect_dataset(prefix: str | Path, check_ids: bool = False, chunk_tokens: int = CHUNK_TOKENS,
                    vocab_size: int | None = None) -> Inspection:
    """Read and check one dataset from its raw bytes (see :func:`validate`).

    Args:
        prefix: dataset prefix (a ``.bin``/``.idx``/``.json`` suffix is dropped, :func:`resolve_dataset`).
        check_ids: scan ``.bin`` for ids outside the vocabulary and check the recorded framing.
        chunk_tokens: tokens per read while scanning.
        vocab_size: vocabulary size for ``check_ids`` when the provenance has none (or is missing),
            e.g. ``len(tokenizer)``; the provenance's ``tokenizer.vocab_size`` wins otherwise.
    Returns:
        The :class:`Inspection`; a missing ``.json`` is a warning, not a problem.
    Raises:
        FileNotFoundError: ``.idx`` or ``.bin`` missing (one line, :func:`resolve_dataset`).
    """
    report = validate_index(resolve_dataset(prefix, provenance=False))
    meta, error = _load_meta(report.prefix)
    result = Inspection(report.prefix, report.raw, report.bin_bytes, meta, structural=list(report.problems))
    if meta is None and error is None:
        result.warnings.append(f"{files_of(result.prefix)[2]}: no provenance (a pair written by Megatron-LM?); "
                               f"the tools refuse it until it has one: {adopt_hint(result.prefix)}")
    else:
        result.provenance = check_provenance(result.prefix, result.raw, meta, error)
    if check_ids:
        _scan(result, vocab_size_of(meta) or vocab_size, chunk_tokens, report.valid)
    return result


def _scan(result: Inspection, vocab_size: int | None, chunk_tokens: int, valid_pair: bool) -> None:
    """``check_ids`` scans into ``result``: ids against ``vocab_size``, documents against the recorded framing."""
    if result.meta is None and vocab_size is None:
        result.warnings.append("token ids not checked: no provenance and no tokenizer to take the vocabulary size from")
        return
    result.structural += check_token_ids(result.prefix, result.raw, vocab_size, chunk_tokens)
    framing = _recorded_framing(result.meta) if result.meta is not None else None
    if framing is not None and valid_pair:  # the scan reads through the pointers
        result.structural += check_framing(result.prefix, result.raw, framing)


def _recorded_framing(meta: dict[str, Any]) -> Framing | None:
    """The provenance's framing, or None when its record is malformed (reported by :func:`check_provenance`)."""
    try:
        return framing_from_provenance(meta)
    except ValueError:
        return None


def validate(prefix: str | Path, check_ids: bool = False, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """Every problem of the ``<prefix>.bin``/``.idx``/``.json`` triple, each naming a file (and byte offset).

    Args:
        prefix: dataset path without suffix.
        check_ids: also scan ``.bin`` for ids outside the provenance ``tokenizer.vocab_size``
            and check that every document starts and ends with the recorded framing ids.
        chunk_tokens: tokens per read while scanning.
    Returns:
        Problem messages; empty when the dataset is valid (a missing ``.json`` is only a warning,
        see :func:`inspect_dataset`).
    Raises:
        FileNotFoundError: ``.idx`` or ``.bin`` missing.
    """
    return inspect_dataset(prefix, check_ids, chunk_tokens).problems


def _load_meta(prefix: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(provenance, None)``, ``(None, problem message)`` for an unreadable one, ``(None, None)`` when there is none."""
    if not files_of(prefix)[2].is_file():
        return None, None
    try:
        return read_provenance(prefix), None
    except (FileNotFoundError, ValueError) as err:
        return None, str(err)


# ------------------------------------------------------------------------------ provenance checks


def check_provenance(prefix: Path, raw: RawIndex, meta: dict[str, Any] | None, error: str | None) -> list[str]:
    """Provenance documents / tokens / dtype must agree with the index, and its framing record must parse."""
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
    try:
        framing_from_provenance(meta, str(json_path))
    except ValueError as err:
        problems.append(str(err))
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


# --------------------------------------------------------------------------------- token scans


def check_token_ids(prefix: Path, raw: RawIndex, vocab_size: int | None, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """Every token id in ``0 .. vocab_size - 1``, streaming ``.bin`` in chunks; names the first bad id's byte."""
    _, bin_path, json_path = files_of(prefix)
    if vocab_size is None:
        return [f"{json_path}: no tokenizer.vocab_size in provenance; cannot check token ids"]
    dtype = raw.dtype
    if dtype is None:
        return []
    first, bad_total, position = None, 0, 0
    # Only the tokens the index describes; trailing bytes are reported by validate_index.
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


def check_framing(prefix: Path, raw: RawIndex, framing: Framing) -> list[str]:
    """Every document starts with ``framing.prefix_ids`` and ends with ``framing.suffix_ids``.

    Needs a structurally valid pair (reads through the pointers). Reads only the framed
    positions of each document (a memory map), so its cost grows with the document count.
    Returns one problem naming the first document that differs and how many do.
    """
    if not framing.special_ids or raw.sizes is None or not raw.sizes.sum(dtype=np.int64):
        return []
    ids = np.memmap(files_of(prefix)[1], dtype=raw.dtype, mode="r")
    starts = raw.pointers // raw.dtype.itemsize
    ends = starts + raw.sizes.astype(np.int64)
    bad = np.zeros(len(starts), dtype=bool)
    bad |= raw.sizes < len(framing.prefix_ids) + len(framing.suffix_ids)
    for offset, token in enumerate(framing.prefix_ids):
        bad |= ids[np.minimum(starts + offset, len(ids) - 1)] != token
    for offset, token in enumerate(framing.suffix_ids):
        bad |= ids[np.maximum(ends - len(framing.suffix_ids) + offset, 0)] != token
    if not bad.any():
        return []
    i = int(np.flatnonzero(bad)[0])
    doc = ids[starts[i]:ends[i]].tolist()
    return [f"{files_of(prefix)[1]}: byte {int(raw.pointers[i])}: sequence {i} is not framed as the provenance says "
            f"({framing.kind}: {list(framing.prefix_ids)} ... {list(framing.suffix_ids)}), it holds "
            f"{doc[:4]} ... {doc[-4:]}; {int(bad.sum())} sequences in all"]


# ------------------------------------------------------------------------------------- report


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
    if meta is None:
        return ["no provenance to compare the tokenizer with; decoded text may use the wrong vocabulary"]
    tok = meta.get("tokenizer")
    stored = tok.get("sha256") if isinstance(tok, dict) else None
    current = tokenizer_sha256(tokenizer)
    if not stored:
        return ["provenance records no tokenizer.sha256; decoded text may use the wrong vocabulary"]
    if stored != current:
        return [f"tokenizer hash {current[:12]} differs from the provenance's {stored[:12]}; decoded text may be wrong"]
    return []


def decode_documents(result: Inspection, tokenizer: Any, docs: int, max_chars: int) -> list[dict[str, Any]]:
    """The first ``docs`` documents decoded (special tokens skipped), text cut to ``max_chars`` characters.

    Returns:
        ``[{"document": int, "tokens": int, "text": str, "chars": int}]`` (``chars`` before cutting).
    """
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
    """Everything ``tools/inspect_data.py`` reports about one dataset, as a JSON-serializable dict.

    Keys: ``prefix``, ``files``, ``provenance`` (the ``.json`` dict or None), ``index`` (header
    and file sizes), ``tokens`` (per-document statistics), ``documents`` (decoded samples, only
    with a tokenizer and a structurally valid pair), ``warnings``, ``problems``, ``valid``.

    With ``check_ids`` and no provenance, ids are checked against ``len(tokenizer)`` when a
    tokenizer is given. A missing ``.json`` is a warning (``valid`` stays True when nothing else is wrong).

    Raises:
        FileNotFoundError: ``.idx`` or ``.bin`` missing.
    """
    result = inspect_dataset(prefix, check_ids, vocab_size=len(tokenizer) if tokenizer is not None else None)
    warnings = list(result.warnings)
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
