"""Write romanized copies of Indic corpora as TSV or JSONL text files, atomically, with per-language counts.

The library core of ``tools/romanize.py``. Inputs are read with
:func:`megadistill.data.sources.read_documents`; each input's script (and language) comes from
its path (``hin_Deva/dev.tsv``) unless given. Output, chosen by the suffix of the output path:

* ``.tsv``: a header, then one row per document: ``source, line, text`` or, paired,
  ``source, line, native, romanized``. Tabs and line breaks inside a text become spaces (so a
  multi-line IndicCorp document loses its line breaks: use ``.jsonl`` to keep them). The file
  reads back with ``read_documents`` (text field ``text`` or ``romanized``).
* ``.jsonl``: one object per document, ``{"source", "line", "text"}`` or, paired,
  ``{"source", "line", "native", "romanized"}``; texts unchanged.

The output is written to a temporary file beside it and renamed only when every input was read.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from megadistill.data.romanize import Romanizer, RomanizeStats, resolve_scheme
from megadistill.data.sources import SourceStats, language_from_path, read_documents

OUTPUT_FORMATS = (".tsv", ".jsonl")
# Everything str.splitlines() breaks on, and the tab: they would break a TSV row.
_TSV_BREAKS = re.compile("[\t\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def tsv_field(text: str) -> str:
    """``text`` with tabs and line breaks replaced by spaces (one TSV field)."""
    return _TSV_BREAKS.sub(" ", text)


def output_format(path: Path) -> str:
    """``"tsv"`` or ``"jsonl"`` from the suffix of ``path``; ValueError for any other suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"{path}: output must end with {' or '.join(OUTPUT_FORMATS)}, not {suffix or 'no suffix'!r}")
    return suffix[1:]


def romanizer_for(path: str, scheme: str, script: str | None = None, lang: str | None = None) -> tuple[str, Romanizer]:
    """``(language key, Romanizer)`` of one input: ``--script``/``--lang`` if given, else its path.

    The key is ``<lang>_<Script>`` (or the script alone when no language is known).
    Raises:
        ValueError: no script given nor found in the path; unsupported script; unknown scheme.
    """
    path_lang, path_script = language_from_path(path)
    script, lang = script or path_script, lang or path_lang
    if not script:
        raise ValueError(f"{path}: cannot tell the script from the path (expected e.g. hin_Deva/...); pass --script")
    return (f"{lang}_{script}" if lang else script), Romanizer(script, scheme, lang)


class _Writer:
    """Writes one document a line in the TSV or JSONL layout (see the module docstring)."""

    def __init__(self, f: IO[str], fmt: str, paired: bool) -> None:
        self.f, self.fmt, self.paired = f, fmt, paired
        if fmt == "tsv":
            f.write("\t".join(self._names()) + "\n")

    def _names(self) -> tuple[str, ...]:
        return ("source", "line", "native", "romanized") if self.paired else ("source", "line", "text")

    def write(self, source: str, line: int, native: str, romanized: str) -> None:
        """Append one document."""
        values = (source, line, native, romanized) if self.paired else (source, line, romanized)
        if self.fmt == "jsonl":
            self.f.write(json.dumps(dict(zip(self._names(), values)), ensure_ascii=False) + "\n")
        else:
            self.f.write("\t".join(tsv_field(str(v)) for v in values) + "\n")


@contextmanager
def atomic_output(path: Path) -> Iterator[IO[str]]:
    """A text file that becomes ``path`` (``os.replace``) only if the block finishes; else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def romanize_files(
    inputs: list[str],
    scheme: str,
    output: Path,
    *,
    paired: bool = False,
    script: str | None = None,
    lang: str | None = None,
    on_error: str = "skip",
    text_field: str = "text",
) -> tuple[dict[str, RomanizeStats], list[SourceStats]]:
    """Romanize every document of ``inputs`` into ``output`` (see the module docstring for the layout).

    Args:
        inputs: corpus files, read in order with ``read_documents``.
        scheme: Latin scheme (``iso``, ``iast``, ...); script, lang: override what the paths say.
        output: ``.tsv`` or ``.jsonl`` path; written atomically.
        paired: write the native text beside the romanized one.
        on_error, text_field: passed to ``read_documents``.
    Returns:
        ``({language key: RomanizeStats}, [SourceStats per input])``.
    Raises:
        FileNotFoundError: a missing input (checked before anything is written).
        ValueError: unknown scheme or script, bad output suffix, bad records with ``on_error="fail"``.
    """
    fmt = output_format(output)
    resolve_scheme(scheme)
    romanizers = [romanizer_for(path, scheme, script, lang) for path in inputs]
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: input file not found")
    stats: dict[str, RomanizeStats] = {}
    sources: list[SourceStats] = []
    with atomic_output(Path(output)) as f:
        writer = _Writer(f, fmt, paired)
        for path, (key, romanizer) in zip(inputs, romanizers):
            source_stats = SourceStats()
            sources.append(source_stats)
            counts = stats.setdefault(key, RomanizeStats())
            for doc in read_documents(path, on_error=on_error, stats=source_stats, text_field=text_field):
                writer.write(doc.source, doc.line, doc.text, romanizer.romanize(doc.text, counts))
    return stats, sources
