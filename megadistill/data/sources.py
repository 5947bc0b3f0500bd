"""Stream NFC-normalized documents out of raw corpora: .tsv, IndicCorp .txt, .jsonl, parquet, HF datasets.

Text files may be compressed (``.gz``, ``.xz``, ``.bz2``); they are read in binary and decoded
line by line, so memory does not grow with file size, a line longer than ``max_line_bytes``
is skipped without being held in memory, and an undecodable byte is reported as
``file:line``. Parquet files (Sangraha) are read in record batches; a Hugging Face
``datasets`` split is read from a ``save_to_disk`` directory or, where the hub is reachable,
by name in streaming mode. Every dropped record is counted by reason in a ``SourceStats``
that :mod:`megadistill.data.binarize` writes into the dataset provenance.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import re
import unicodedata
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

FORMATS = {".tsv": "tsv", ".txt": "txt", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSION = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
HF_PREFIX = "hf:"
ON_ERROR = ("skip", "fail")
DEFAULT_MAX_LINE_BYTES = 4 * 2**20
"""Longest accepted physical line (bytes); longer lines are skipped unread (a corrupt or non-text file)."""
DEFAULT_BLOCK_BYTES = 2**20
"""Raw bytes per :class:`Block` (text formats): the unit of work shipped to a tokenizer process."""
_MAX_DOCUMENT_BYTES = 64 * 2**20
# FLORES-200 / SIB-200 language code: ISO 639-3 + "_" + ISO 15924 script (hin_Deva, sat_Olck).
_LANG_SCRIPT = re.compile(r"(?<![A-Za-z])([a-z]{3})_([A-Z][a-z]{3})(?![A-Za-z])")
# Bare ISO 639-1 / 639-2/3 codes as IndicCorp v2 names its files (hi.txt, sat.txt) and Sangraha its
# folders (verified/hin/, ori/), each with the script FLORES-200 uses for the language. Languages
# written in several scripts (kas, snd, mni, sat) get FLORES's; pass --script for another one, and
# the mixed-script check in binarize counts documents that disagree.
CORPUS_LANGUAGE_CODES: dict[str, tuple[str, str]] = {
    code: flores
    for codes, flores in [
        (("hi", "hin"), ("hin", "Deva")), (("bn", "ben"), ("ben", "Beng")), (("as", "asm"), ("asm", "Beng")),
        (("or", "ori", "ory"), ("ory", "Orya")), (("ta", "tam"), ("tam", "Taml")), (("te", "tel"), ("tel", "Telu")),
        (("kn", "kan"), ("kan", "Knda")), (("ml", "mal"), ("mal", "Mlym")), (("mr", "mar"), ("mar", "Deva")),
        (("gu", "guj"), ("guj", "Gujr")), (("pa", "pan"), ("pan", "Guru")), (("ur", "urd"), ("urd", "Arab")),
        (("ne", "nep", "npi"), ("npi", "Deva")), (("sa", "san"), ("san", "Deva")), (("sat",), ("sat", "Olck")),
        (("mai",), ("mai", "Deva")), (("ks", "kas"), ("kas", "Arab")), (("sd", "snd"), ("snd", "Arab")),
        (("mni",), ("mni", "Beng")), (("gom",), ("gom", "Deva")), (("brx",), ("brx", "Deva")),
        (("doi",), ("doi", "Deva")), (("bho",), ("bho", "Deva")), (("mag",), ("mag", "Deva")),
        (("awa",), ("awa", "Deva")), (("hne",), ("hne", "Deva")), (("en", "eng"), ("eng", "Latn")),
    ]
    for code in codes
}


@dataclass
class Document:
    """One document of a corpus.

    Attributes:
        text: NFC-normalized text; IndicCorp sentences joined with ``"\\n"``.
        source: path of the file it came from (as given), or ``hf:<name>`` for a datasets split.
        line: 1-based line number of the document's first kept line (text files) or 1-based
            row number (parquet, datasets).
        doc_id: the record's ``doc_id`` field where the source has one (Sangraha), else None.
        kind: the record's ``type`` field where present (Sangraha: verified / synthetic / ...).
    """

    text: str
    source: str
    line: int
    doc_id: str | None = None
    kind: str | None = None


@dataclass
class SourceStats:
    """Counters filled while reading one or more files.

    Attributes:
        documents: documents yielded.
        lines_read: physical lines (text files) or rows (parquet, datasets) read.
        characters: Unicode code points of the yielded texts, after NFC (for bits per character).
        dropped: reason -> records dropped: ``invalid_utf8``, ``nul_byte``, ``line_too_long``,
            ``empty_document``, ``missing_text_field``, ``bad_json``, ``bad_tsv_row``.
        kinds: record ``type`` -> documents yielded (Sangraha provenance); empty for other sources.
    """

    documents: int = 0
    lines_read: int = 0
    characters: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` dropped records under ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + n


def sum_counts(counts) -> dict[str, int]:
    """``{reason: count}`` summed over an iterable of such dicts, sorted by reason (e.g. dropped-record counts)."""
    total: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            total[reason] = total.get(reason, 0) + int(n)
    return dict(sorted(total.items()))


def language_from_path(path: str | Path) -> tuple[str | None, str | None]:
    """``(language, script)`` named by the path, innermost component first.

    A FLORES-style ``xxx_Xxxx`` code anywhere in the path wins: ``.../hin_Deva/train.tsv`` ->
    ``("hin", "Deva")``, ``sat_Olck.txt`` -> ``("sat", "Olck")``. Otherwise a whole component that is
    a bare code of :data:`CORPUS_LANGUAGE_CODES` (IndicCorp v2 ``hi.txt.xz``, Sangraha
    ``verified/ori/part-0.parquet``) gives that code's FLORES language and script. Nothing found
    -> ``(None, None)``.
    """
    parts = Path(str(path).removeprefix(HF_PREFIX)).parts
    for part in reversed(parts):
        match = _LANG_SCRIPT.search(part)
        if match:
            return match.group(1), match.group(2)
    for i, part in enumerate(reversed(parts)):
        name = part.split(".", 1)[0] if i == 0 else part  # hi.txt.xz -> hi; folders as they are
        if name.lower() in CORPUS_LANGUAGE_CODES:
            return CORPUS_LANGUAGE_CODES[name.lower()]
    return None, None


def corpus_format(path: str | Path, fmt: str | None = None) -> str:
    """Format name of a corpus path: ``fmt`` if given, else from the suffix under any compression suffix.

    ``x.txt.gz`` -> ``"txt"``; ``hf:...`` -> ``"hf"``.
    Raises:
        ValueError: unknown suffix or format (the message lists the supported ones).
    """
    if str(path).startswith(HF_PREFIX):
        return "hf"
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    resolved = fmt if fmt is not None else FORMATS.get(suffixes[-1] if suffixes else "")
    if resolved not in FORMATS.values():
        supported = ", ".join(f"{s} ({f})" for s, f in FORMATS.items())
        raise ValueError(
            f"{path}: unknown corpus format {fmt or ''.join(suffixes)!r}; supported: {supported}, "
            f"optionally compressed ({', '.join(COMPRESSION)}), or hf:<dataset dir or name>"
        )
    return resolved


def read_documents(
    path: str | Path,
    fmt: str | None = None,
    *,
    on_error: str = "skip",
    stats: SourceStats | None = None,
    text_field: str = "text",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    split: str = "train",
    config_name: str | None = None,
) -> Iterator[Document]:
    """Yield the documents of one corpus, lazily (:func:`read_blocks` then :func:`parse_block`).

    Formats (inferred from the suffix, under an optional ``.gz``/``.xz``/``.bz2``, unless ``fmt`` is given):
      * ``tsv``: header row with a ``text`` column, tab separated, no quoting (SIB-200, FLORES);
      * ``txt``: one sentence a line, a blank line between documents (IndicCorp v2);
      * ``jsonl``: one JSON object a line with a string field ``text``; ``doc_id`` and ``type`` kept;
      * ``parquet``: column ``text`` (Sangraha), ``doc_id`` and ``type`` kept when present;
      * ``hf:<dir or name>``: a ``datasets`` split, from ``load_from_disk(dir)`` or
        ``load_dataset(name, config_name, split=split, streaming=True)``.

    Texts are NFC-normalized; whitespace-only documents are dropped and counted.

    Args:
        path: corpus file, or ``hf:`` + a ``save_to_disk`` directory or hub dataset name.
        fmt: a format name; ``None`` infers it.
        on_error: ``"skip"`` drops a malformed record (invalid UTF-8, NUL byte, over-long line,
            bad JSON, missing ``text``) and counts it in ``stats.dropped``; ``"fail"`` raises on it.
        stats: counters updated in place while iterating.
        text_field: column / JSON field holding the text (tsv, jsonl, parquet, datasets).
        max_line_bytes: longest physical line accepted, in bytes (text formats).
        split, config_name: which split / configuration of a datasets source.
    Raises:
        FileNotFoundError: ``path`` missing (at call time).
        ValueError: unknown format or ``on_error``, empty file (at call time); a header
            without the text field, a malformed record with ``on_error="fail"``, a truncated
            compressed file, or a corpus that yields no document (while iterating).
            Messages start with ``file`` or ``file:line``.
    """
    stats = stats if stats is not None else SourceStats()
    blocks = read_blocks(path, fmt, on_error=on_error, stats=stats, text_field=text_field,
                         max_line_bytes=max_line_bytes, split=split, config_name=config_name)
    return _all_documents(str(path), blocks, stats)


def _all_documents(source: str, blocks: Iterator["Block"], stats: SourceStats) -> Iterator[Document]:
    before = stats.documents
    for block in blocks:
        yield from parse_block(block, stats)
    if stats.documents == before:
        raise no_documents_error(source, stats)


def no_documents_error(source: str, stats: SourceStats) -> ValueError:
    """The error for a corpus that yielded no document (names the file and what was dropped)."""
    return ValueError(f"{source}: no documents found ({stats.lines_read} lines read, dropped: {stats.dropped})")


@dataclass
class Block:
    """Consecutive undecoded records of one corpus: the unit a tokenizer process parses and encodes.

    Text formats carry raw lines, cut only between documents (after a blank line for ``txt``),
    so :func:`parse_block` needs nothing but the block; parquet and datasets carry dict rows.

    Attributes:
        source: the corpus path or ``hf:`` spec, as given.
        fmt: format name (see :func:`corpus_format`).
        first_line: 1-based line (or row) number of the first entry.
        lines: raw lines with their newline; ``None`` stands for an over-long line already
            dropped by the reader (numbering stays right). ``None`` for row formats.
        rows: dict records (parquet, datasets), else ``None``.
        column, width: text column index and field count of the tsv header (tsv only).
        on_error, text_field: as :func:`read_documents`.
    """

    source: str
    fmt: str
    first_line: int
    lines: list[bytes | None] | None = None
    rows: list[dict] | None = None
    column: int = 0
    width: int = 0
    on_error: str = "skip"
    text_field: str = "text"


def read_blocks(
    path: str | Path,
    fmt: str | None = None,
    *,
    on_error: str = "skip",
    stats: SourceStats | None = None,
    text_field: str = "text",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    rows_per_block: int = 1024,
    split: str = "train",
    config_name: str | None = None,
) -> Iterator[Block]:
    """Cut a corpus into :class:`Block` s of about ``block_bytes`` raw bytes (or ``rows_per_block`` rows), lazily.

    Only framing happens here (lines, the tsv header, over-long lines, decompression); decoding,
    parsing and NFC happen in :func:`parse_block`, which may run in another process. A ``txt``
    document longer than 64 MiB is split at a line boundary (with a warning) to bound memory.

    Args and raises: as :func:`read_documents`; ``block_bytes`` is the target block size in bytes.
    """
    fmt = corpus_format(path, fmt)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    stats = stats if stats is not None else SourceStats()
    base = dict(source=str(path), fmt=fmt, on_error=on_error, text_field=text_field)
    if fmt == "hf":
        return _row_blocks(_hf_records(str(path)[len(HF_PREFIX):], split, config_name, text_field), base, rows_per_block)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    if fmt == "parquet":
        return _row_blocks(_parquet_records(path, text_field, rows_per_block), base, rows_per_block)
    return _line_blocks(path, base, stats, max_line_bytes, block_bytes)


def _row_blocks(rows: Iterator[tuple[int, dict]], base: dict, rows_per_block: int) -> Iterator[Block]:
    """Blocks of ``rows_per_block`` consecutive rows."""
    chunk: list[dict] = []
    first = 1
    for number, row in rows:
        if not chunk:
            first = number
        chunk.append(row)
        if len(chunk) == rows_per_block:
            yield Block(first_line=first, rows=chunk, **base)
            chunk = []
    if chunk:
        yield Block(first_line=first, rows=chunk, **base)


def _line_blocks(path: Path, base: dict, stats: SourceStats, max_line_bytes: int, block_bytes: int) -> Iterator[Block]:
    """Blocks of raw lines, cut between documents once ``block_bytes`` are gathered."""
    lines: list[bytes | None] = []
    first, size = 1, 0
    for number, raw in _raw_lines(path, base["on_error"], stats, max_line_bytes):
        if base["fmt"] == "tsv" and "column" not in base:
            base["column"], base["width"] = _tsv_header(path, raw, base["text_field"])
            stats.lines_read += 1
            continue
        if not lines:
            first, size = number, 0
        lines.append(raw)
        size += len(raw or b"")
        if size >= block_bytes and _can_cut(base["fmt"], raw, size, path, number):
            yield Block(first_line=first, lines=lines, **base)
            lines = []
    if lines:
        yield Block(first_line=first, lines=lines, **base)


def _can_cut(fmt: str, raw: bytes | None, size: int, path: Path, number: int) -> bool:
    """Whether a block may end after this line: any line, but for ``txt`` only a blank one (a document end)."""
    if fmt != "txt" or (raw is not None and not raw.strip()):
        return True
    if size >= _MAX_DOCUMENT_BYTES:
        logger.warning("%s:%d: document longer than %d MiB; split here", path, number, _MAX_DOCUMENT_BYTES // 2**20)
        return True
    return False


def _tsv_header(path: Path, raw: bytes | None, text_field: str) -> tuple[int, int]:
    """``(column, width)`` of the tsv header line; ValueError if it is unreadable or lacks the text field."""
    try:
        header = (raw or b"").decode("utf-8").removeprefix("\ufeff").rstrip("\r\n").split("\t")
    except UnicodeDecodeError:
        raise ValueError(f"{path}:1: the tab-separated header is not valid UTF-8") from None
    if text_field not in header:
        raise ValueError(f"{path}: no {text_field!r} column in the tab-separated header {header}")
    return header.index(text_field), len(header)


def _raw_lines(path: Path, on_error: str, stats: SourceStats, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """``(number, raw line)`` of a possibly compressed file; ``None`` for a line over ``max_line_bytes`` (dropped unread).

    Raises:
        ValueError: ``<path>:<line>: cannot read compressed data (...)`` for a truncated or corrupt
            ``.gz``/``.xz``/``.bz2`` stream (``EOFError``, ``OSError``, ``lzma.LZMAError`` and ``zlib.error``
            alike: a damaged deflate stream raises ``zlib.error``, which is not an ``OSError``);
            an over-long line with ``on_error="fail"``.
    """
    opener = COMPRESSION.get(path.suffix.lower(), open)
    number = 0
    try:
        with opener(path, "rb") as f:
            while raw := f.readline(max_line_bytes + 1):
                number += 1
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    size = len(raw) + _skip_rest(f)
                    _reject(path, number, "line_too_long", f"line of {size:,} bytes exceeds max_line_bytes={max_line_bytes:,}",
                            on_error, stats)
                    raw = None
                yield number, raw
    except (EOFError, OSError, lzma.LZMAError, zlib.error) as err:  # truncated or corrupt compressed stream
        raise ValueError(f"{path}:{number + 1}: cannot read compressed data ({err}); the file is truncated or corrupt") from None


def _skip_rest(f) -> int:
    """Consume the rest of an over-long line without keeping it; returns the bytes skipped."""
    skipped = 0
    while True:
        chunk = f.readline(2**20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def parse_block(block: Block, stats: SourceStats) -> Iterator[Document]:
    """Decode, parse and NFC-normalize the records of a block; counts go to ``stats``.

    Raises:
        ValueError: a malformed record when ``block.on_error == "fail"`` (message ``file:line: ...``).
    """
    if block.rows is not None:
        stats.lines_read += len(block.rows)
        rows = enumerate(block.rows, start=block.first_line)
        return _counted(block.source, stats, _record_documents(block, rows, stats))
    stats.lines_read += len(block.lines)
    lines = _decoded_lines(block, stats)
    parser = {"tsv": _tsv_documents, "txt": _txt_documents, "jsonl": _jsonl_documents}[block.fmt]
    return _counted(block.source, stats, parser(block, lines, stats))


def _decoded_lines(block: Block, stats: SourceStats) -> Iterator[tuple[int, str | None]]:
    """``(number, text)`` of the block's lines; text is ``None`` for a dropped line."""
    for number, raw in enumerate(block.lines, start=block.first_line):
        yield number, None if raw is None else _decode(block, number, raw, stats)


def _decode(block: Block, number: int, raw: bytes, stats: SourceStats) -> str | None:
    """UTF-8 text of a raw line without its newline (BOM removed on line 1); None if dropped."""
    if b"\x00" in raw:
        column = raw.index(b"\x00") + 1
        _reject(block.source, number, "nul_byte", f"NUL byte at column {column} (binary data?)", block.on_error, stats)
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        _reject(block.source, number, "invalid_utf8", f"invalid UTF-8 ({err.reason} at byte {err.start})", block.on_error, stats)
        return None
    if number == 1:
        text = text.removeprefix("\ufeff")  # Windows editors prepend a BOM
    return text.rstrip("\r\n")


def _reject(source, number: int, reason: str, detail: str, on_error: str, stats: SourceStats) -> None:
    """Count a malformed record under ``reason``, or raise ``ValueError`` naming ``source:number``."""
    if on_error == "fail":
        raise ValueError(f"{source}:{number}: {detail}; rerun with --on-error skip to drop such records")
    logger.debug("%s:%d: dropped (%s)", source, number, detail)
    stats.drop(reason)


_Record = tuple[int, str, Any, Any]  # (line or row number, raw text, doc_id, type)


def _counted(source: str, stats: SourceStats, records: Iterator[_Record]) -> Iterator[Document]:
    """NFC-normalize, drop empty texts, update stats."""
    for number, text, doc_id, kind in records:
        text = unicodedata.normalize("NFC", text)
        if not text.strip():
            stats.drop("empty_document")
            continue
        stats.documents += 1
        stats.characters += len(text)
        if kind is not None:
            stats.kinds[str(kind)] = stats.kinds.get(str(kind), 0) + 1
        yield Document(text, source, number, None if doc_id is None else str(doc_id), None if kind is None else str(kind))


def _tsv_documents(block: Block, lines, stats: SourceStats) -> Iterator[_Record]:
    """Text column of each row, split as ``csv`` QUOTE_NONE would: every tab separates.

    FLORES text holds bare ``"``, so quoting must be off. ``str.split`` gives the same fields as
    ``csv.reader(..., quoting=csv.QUOTE_NONE)`` but also accepts a stray ``\\r`` inside a field,
    which ``csv`` rejects as an error.
    """
    for number, line in lines:
        if not line:
            continue
        row = line.split("\t")
        if len(row) != block.width:
            _reject(block.source, number, "bad_tsv_row", f"{len(row)} tab-separated fields, header has {block.width}",
                    block.on_error, stats)
        else:
            yield number, row[block.column], None, None


def _txt_documents(block: Block, lines, stats: SourceStats) -> Iterator[_Record]:
    """Groups of consecutive non-blank lines, joined with ``"\\n"``; blank lines separate documents."""
    start, sentences = 0, []
    for number, line in lines:
        if line is None:
            continue  # a dropped sentence does not end its document
        if line.strip():
            start = start or number
            sentences.append(line)
        elif sentences:
            yield start, "\n".join(sentences), None, None
            start, sentences = 0, []
    if sentences:
        yield start, "\n".join(sentences), None, None


def _jsonl_documents(block: Block, lines, stats: SourceStats) -> Iterator[_Record]:
    """JSON objects of the non-blank lines, as records for :func:`_record_documents`.

    A line ``json`` cannot parse is a ``bad_json`` record (dropped, or ``ValueError`` naming
    ``file:line`` with ``on_error="fail"``): invalid JSON, but also JSON nested too deeply for the
    parser (``RecursionError``) and an integer of more digits than Python converts (a ``ValueError``
    that is not a ``JSONDecodeError``).
    """
    def records() -> Iterator[tuple[int, Any]]:
        for number, line in lines:
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as err:
                _reject(block.source, number, "bad_json", _json_problem(err), block.on_error, stats)
            else:
                yield number, record

    return _record_documents(block, records(), stats)


def _json_problem(err: ValueError | RecursionError) -> str:
    """What is wrong with a JSON line, for :func:`_reject`."""
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg} at column {err.colno})"
    if isinstance(err, RecursionError):
        return "JSON nested too deeply to parse"
    return f"unreadable JSON ({' '.join(str(err).split())[:120]})"  # e.g. an integer of over 4300 digits


def _record_documents(block: Block, records, stats: SourceStats) -> Iterator[_Record]:
    """Text, ``doc_id`` and ``type`` of dict records; a record without a string text field is dropped."""
    field_name, source, on_error = block.text_field, block.source, block.on_error
    for number, record in records:
        text = record.get(field_name) if isinstance(record, dict) else None
        if not isinstance(text, str):
            _reject(source, number, "missing_text_field", f"no string field {field_name!r}", on_error, stats)
        elif "\x00" in text:
            _reject(source, number, "nul_byte", "NUL character in the text", on_error, stats)
        elif not _encodable(text):
            _reject(source, number, "invalid_utf8", "invalid UTF-8 (lone surrogate)", on_error, stats)
        else:
            yield number, text, record.get("doc_id"), record.get("type")


def _parquet_records(path: Path, text_field: str, batch_rows: int) -> Iterator[tuple[int, dict]]:
    """Rows of a parquet file as dicts of the text, ``doc_id`` and ``type`` columns, one record batch at a time."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError subclasses for non-parquet data
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no {text_field!r} column in the parquet schema {names}")
    columns = [c for c in (text_field, "doc_id", "type") if c in names]
    number = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _hf_records(name: str, split: str, config_name: str | None, text_field: str) -> Iterator[tuple[int, dict]]:
    """Rows of a ``datasets`` split: ``load_from_disk`` for a directory, else streaming ``load_dataset``."""
    dataset = _open_hf_split(name, split, config_name)
    if dataset.column_names is not None and text_field not in dataset.column_names:
        raise ValueError(f"hf:{name} [{split}]: no {text_field!r} column (columns: {dataset.column_names})")
    columns = [c for c in (text_field, "doc_id", "type") if c in (dataset.column_names or [text_field])]
    yield from enumerate(dataset.select_columns(columns), start=1)


def _open_hf_split(name: str, split: str, config_name: str | None):
    """The ``split`` of a saved dataset directory or hub dataset (streaming)."""
    import datasets

    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"hf:{name}: no split {split!r} (splits: {sorted(loaded)})")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=True)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"hf:{name}: not a local dataset directory and not loadable by name ({err})") from None


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates (JSON ``\\ud800``), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
