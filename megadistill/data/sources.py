"""Stream NFC-normalized documents out of raw corpus files (SIB-200 .tsv, IndicCorp .txt, .jsonl).

Files are read in binary and decoded line by line, so memory does not grow with file size
and an undecodable byte is reported as ``file:line``. Every dropped record is counted by
reason in a ``SourceStats`` that ``tools/binarize.py`` writes into the dataset provenance.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

FORMATS = {".tsv": "tsv", ".txt": "txt", ".jsonl": "jsonl"}
ON_ERROR = ("skip", "fail")
# FLORES-200 / SIB-200 language code: ISO 639-3 + "_" + ISO 15924 script (hin_Deva, sat_Olck).
_LANG_SCRIPT = re.compile(r"(?<![A-Za-z])([a-z]{3})_([A-Z][a-z]{3})(?![A-Za-z])")


@dataclass
class Document:
    """One document of a corpus file.

    Attributes:
        text: NFC-normalized text; IndicCorp sentences joined with ``"\\n"``.
        source: path of the file it came from (as given).
        line: 1-based line number of the document's first kept line in that file.
    """

    text: str
    source: str
    line: int


@dataclass
class SourceStats:
    """Counters filled while reading one or more files.

    Attributes:
        documents: documents yielded.
        lines_read: physical lines read (headers and blank lines included).
        characters: Unicode code points of the yielded texts, after NFC (for bits per character).
        dropped: reason -> records dropped: ``invalid_utf8``, ``empty_document``,
            ``missing_text_field``, ``bad_json``, ``bad_tsv_row``.
    """

    documents: int = 0
    lines_read: int = 0
    characters: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        """Count one dropped record under ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def language_from_path(path: str | Path) -> tuple[str | None, str | None]:
    """FLORES-style ``(language, script)`` found in the path, innermost component first.

    ``.../hin_Deva/train.tsv`` -> ``("hin", "Deva")``; ``sat_Olck.txt`` -> ``("sat", "Olck")``;
    no ``xxx_Xxxx`` component -> ``(None, None)``.
    """
    for part in reversed(Path(path).parts):
        match = _LANG_SCRIPT.search(part)
        if match:
            return match.group(1), match.group(2)
    return None, None


def read_documents(
    path: str | Path,
    fmt: str | None = None,
    *,
    on_error: str = "skip",
    stats: SourceStats | None = None,
) -> Iterator[Document]:
    """Yield the documents of one corpus file, lazily.

    Formats (inferred from the suffix unless ``fmt`` is given):
      * ``tsv``: header row with a ``text`` column, tab separated, no quoting (SIB-200, FLORES);
      * ``txt``: one sentence a line, a blank line between documents (IndicCorp);
      * ``jsonl``: one JSON object a line with a string field ``text`` (Sangraha).

    Texts are NFC-normalized; whitespace-only documents are dropped and counted.

    Args:
        path: corpus file.
        fmt: ``"tsv"``, ``"txt"`` or ``"jsonl"``; ``None`` infers it from the suffix.
        on_error: ``"skip"`` drops a malformed record (invalid UTF-8, bad JSON, missing
            ``text``) and counts it in ``stats.dropped``; ``"fail"`` raises on it.
        stats: counters updated in place while iterating.
    Raises:
        FileNotFoundError: ``path`` missing (at call time).
        ValueError: unknown format or ``on_error``, empty file (at call time); a tsv header
            without ``text``, a malformed record with ``on_error="fail"``, or a file that
            yields no document (while iterating). Messages start with ``file`` or ``file:line``.
    """
    path = Path(path)
    fmt = _resolve_format(path, fmt)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    stats = stats if stats is not None else SourceStats()
    reader = {"tsv": _tsv_documents, "txt": _txt_documents, "jsonl": _jsonl_documents}[fmt]
    return _counted(path, stats, reader(_Lines(path, on_error, stats)))


def _resolve_format(path: Path, fmt: str | None) -> str:
    """Format name from ``fmt`` or the file suffix; ValueError naming the supported ones."""
    resolved = fmt if fmt is not None else FORMATS.get(path.suffix.lower())
    if resolved not in FORMATS.values():
        supported = ", ".join(f"{s} ({f})" for s, f in FORMATS.items())
        raise ValueError(f"{path}: unknown corpus format {fmt or path.suffix!r}; supported: {supported}")
    return resolved


class _Lines:
    """Decoded lines of one file with their 1-based numbers; records drops in ``stats``."""

    def __init__(self, path: Path, on_error: str, stats: SourceStats) -> None:
        self.path, self.on_error, self.stats = path, on_error, stats

    def __iter__(self) -> Iterator[tuple[int, str | None]]:
        """``(line_number, text)``; text is ``None`` for a line dropped as invalid UTF-8."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                self.stats.lines_read += 1
                yield number, self._decode(number, raw)

    def _decode(self, number: int, raw: bytes) -> str | None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            self.reject(number, "invalid_utf8", f"invalid UTF-8 ({err.reason} at byte {err.start})")
            return None
        if number == 1:
            text = text.removeprefix("\ufeff")  # Windows editors prepend a BOM; it would hide the header
        return text.rstrip("\r\n")

    def reject(self, number: int, reason: str, detail: str) -> None:
        """Count a malformed record, or raise ``ValueError`` when ``on_error == "fail"``."""
        if self.on_error == "fail":
            raise ValueError(f"{self.path}:{number}: {detail}; rerun with --on-error skip to drop such lines")
        logger.debug("%s:%d: dropped (%s)", self.path, number, detail)
        self.stats.drop(reason)


def _counted(path: Path, stats: SourceStats, documents: Iterator[tuple[int, str]]) -> Iterator[Document]:
    """NFC-normalize, drop empty texts, update stats; ValueError if nothing was kept."""
    kept = 0
    for number, text in documents:
        text = unicodedata.normalize("NFC", text)
        if not text.strip():
            stats.drop("empty_document")
            continue
        kept += 1
        stats.documents += 1
        stats.characters += len(text)
        yield Document(text=text, source=str(path), line=number)
    if kept == 0:
        raise ValueError(f"{path}: no documents found ({stats.lines_read} lines read, dropped: {stats.dropped})")


def _tsv_documents(lines: _Lines) -> Iterator[tuple[int, str]]:
    """``text`` column of each row, split as ``csv`` QUOTE_NONE would: every tab separates.

    FLORES text holds bare ``"``, so quoting must be off. ``str.split`` gives the same fields as
    ``csv.reader(..., quoting=csv.QUOTE_NONE)`` but also accepts a stray ``\\r`` inside a field,
    which ``csv`` rejects as an error.
    """
    column, width = None, 0
    for number, line in lines:
        if line is None or (column is not None and not line):
            continue
        row = line.split("\t")
        if column is None:
            column, width = _text_column(lines.path, row), len(row)
        elif len(row) != width:
            lines.reject(number, "bad_tsv_row", f"{len(row)} tab-separated fields, header has {width}")
        else:
            yield number, row[column]


def _text_column(path: Path, header: list[str]) -> int:
    """Index of the ``text`` column; ValueError naming the file otherwise."""
    if "text" not in header:
        raise ValueError(f"{path}: no 'text' column in the tab-separated header {header}")
    return header.index("text")


def _txt_documents(lines: _Lines) -> Iterator[tuple[int, str]]:
    """Groups of consecutive non-blank lines, joined with ``"\\n"``; blank lines separate documents."""
    start, sentences = 0, []
    for number, line in lines:
        if line is None:
            continue  # a dropped sentence does not end its document
        if line.strip():
            start = start or number
            sentences.append(line)
        elif sentences:
            yield start, "\n".join(sentences)
            start, sentences = 0, []
    if sentences:
        yield start, "\n".join(sentences)


def _jsonl_documents(lines: _Lines) -> Iterator[tuple[int, str]]:
    """Field ``text`` of each JSON object; blank lines are skipped."""
    for number, line in lines:
        if line is None or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            lines.reject(number, "bad_json", f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            lines.reject(number, "missing_text_field", "no string field 'text'")
        elif not _encodable(text):
            lines.reject(number, "invalid_utf8", "invalid UTF-8 (lone surrogate escape in JSON)")
        else:
            yield number, text


def _encodable(text: str) -> bool:
    """False for strings with lone surrogates (JSON ``\\ud800``), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
