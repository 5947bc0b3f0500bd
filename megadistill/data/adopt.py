"""Adopt a ``.bin``/``.idx`` pair written without provenance (by Megatron-LM itself): check it, record a ``.json``.

Megatron-LM's ``tools/preprocess_data.py`` writes the same MMIDIDX bytes as
:class:`~megadistill.data.indexed.IndexedDatasetWriter` but no ``<prefix>.json``, and every
megadistill tool needs that provenance (tokenizer hash, framing, counts) before it trusts the
ids. :func:`adopt_dataset` checks what the provenance would vouch for, from the bytes:

* the index is consistent (:func:`~megadistill.data.indexed.validate_index`) and holds one
  integer sequence per document (``--split-sentences`` output is refused, as merging does);
* every token id is below the tokenizer's vocabulary size (``.bin`` streamed in chunks);
* which of the tokenizer's frame ids (BOS/EOS, ``[CLS]``/``[SEP]``) every document carries,

then writes the provenance in the format ``tools/binarize.py`` writes, marked ``"adopted": true``
with the pair it was taken from, atomically (:func:`megadistill.data.indexed.write_provenance`).
"""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path
from typing import Any

from megadistill import __version__
from megadistill.data.framing import Framing, framing_for_tokenizer
from megadistill.data.indexed import RawIndex, provenance_header, validate_index, write_provenance
from megadistill.data.inspect import CHUNK_TOKENS, check_framing, check_token_ids, files_of, resolve_dataset
from megadistill.data.sources import language_from_path

__all__ = ["adopt_dataset", "adopted_provenance", "observed_framing"]


def adopt_dataset(prefix: str | Path, tokenizer: Any, *, tokenizer_name: str | None = None,
                  language: str | None = None, script: str | None = None, source: str | None = None,
                  force: bool = False, chunk_tokens: int = CHUNK_TOKENS) -> tuple[dict[str, Any], list[str]]:
    """Check a provenance-less pair against ``tokenizer`` and write ``<prefix>.json``.

    Args:
        prefix: the dataset prefix (or its ``.bin``/``.idx`` path).
        tokenizer: the Hugging Face tokenizer the ids were made with (``len(tokenizer)`` ids).
        tokenizer_name: recorded as ``tokenizer.name`` (default ``tokenizer.name_or_path``).
        language, script: recorded as such (default: what the path names, e.g. ``hin_Deva``).
        source: what the pair was made from, recorded in ``sources`` (default the ``.bin`` path).
        force: replace an existing ``<prefix>.json`` (refused otherwise: it may be binarize's own).
        chunk_tokens: tokens per read of the id scan (memory: ``chunk_tokens`` x itemsize bytes).
    Returns:
        ``(provenance written, warnings)``; a warning per frame id the documents lack.
    Raises:
        FileNotFoundError: ``.bin`` or ``.idx`` missing.
        ValueError: ``.json`` exists (without ``force``), the index is inconsistent, its dtype is
            not an integer one, several sequences per document, or an id is ``>= len(tokenizer)``;
            one line naming the file and what to do.
    """
    prefix = resolve_dataset(prefix, provenance=False)
    json_path = files_of(prefix)[2]
    if json_path.is_file() and not force:
        raise ValueError(f"{json_path} exists already; inspect it with python tools/inspect_data.py {prefix}, "
                         "or pass --force to replace it")
    raw = _checked_index(prefix)
    ids = check_token_ids(prefix, raw, len(tokenizer), chunk_tokens)
    if ids:
        raise ValueError(f"{ids[0]}: not ids of tokenizer {_name(tokenizer, tokenizer_name)} ({len(tokenizer)} ids); "
                         "adopt the pair with the tokenizer that wrote it")
    framing, warnings = observed_framing(prefix, raw, tokenizer)
    path_language, path_script = language_from_path(prefix)
    meta = adopted_provenance(prefix, raw, tokenizer, framing, tokenizer_name=tokenizer_name, source=source,
                              language=language or path_language, script=script or path_script)
    write_provenance(prefix, meta)
    return meta, warnings


def _checked_index(prefix: Path) -> RawIndex:
    """The parsed index of a consistent pair of integer ids, one sequence per document; ValueError otherwise."""
    report = validate_index(prefix)
    if report.problems:
        raise ValueError(f"{report.problems[0]} ({len(report.problems)} problem(s) in all, listed by: "
                         f"python tools/inspect_data.py {prefix}); an inconsistent pair cannot be adopted")
    raw = report.raw
    if raw.dtype.kind not in "iu":
        raise ValueError(f"{raw.path}: token dtype {raw.dtype.name} is not an integer dtype; not a token dataset")
    if raw.doc_count != raw.count + 1:
        raise ValueError(f"{raw.path}: {raw.doc_count - 1} documents hold {raw.count} sequences (Megatron "
                         "--split-sentences); megadistill needs one sequence per document: re-run "
                         "preprocess_data.py without --split-sentences")
    return raw


def observed_framing(prefix: Path, raw: RawIndex, tokenizer: Any) -> tuple[Framing, list[str]]:
    """The part of ``tokenizer``'s frame (:func:`framing_for_tokenizer`) that every document of the pair carries.

    Tries the whole frame, then without its prefix ids, without its suffix ids, then neither (each
    check reads the framed positions of every document through a memory map).

    Returns:
        ``(framing, warnings)``: a warning names each part of the frame the documents lack
        (Megatron's ``preprocess_data.py`` adds EOS only with ``--append-eod``).
    Raises:
        ValueError: as :func:`framing_for_tokenizer` (a tokenizer without EOS or SEP).
    """
    full = framing_for_tokenizer(tokenizer)
    for prefix_ids, suffix_ids in itertools.product((full.prefix_ids, ()), (full.suffix_ids, ())):
        framing = Framing(full.kind, prefix_ids, suffix_ids)
        if not check_framing(prefix, raw, framing):
            break
    lacking = [f"{what} ids {list(ids)}" for what, ids, kept in (("prefix", full.prefix_ids, framing.prefix_ids),
                                                                  ("suffix", full.suffix_ids, framing.suffix_ids))
               if ids and not kept]
    if not lacking:
        return framing, []
    return framing, [f"{files_of(prefix)[1]}: not every document carries the tokenizer's {full.kind} frame "
                     f"({' and '.join(lacking)}); recorded framing {framing.as_dict()}"]


def adopted_provenance(prefix: Path, raw: RawIndex, tokenizer: Any, framing: Framing, *,
                       tokenizer_name: str | None = None, source: str | None = None,
                       language: str | None = None, script: str | None = None) -> dict[str, Any]:
    """The provenance ``tools/binarize.py`` would write for the pair, from its index and ``tokenizer``.

    Counts come from the index (``documents``, ``tokens``); what only the text would tell
    (``characters``, ``bytes_utf8``, dropped records) is None or empty. ``"adopted": true`` and
    ``"adopted_from"`` (the prefix) tell it apart from a binarized dataset.
    """
    documents = int(raw.doc_count) - 1
    return {
        **provenance_header(tokenizer, _name(tokenizer, tokenizer_name), framing, language, script),
        "sources": [{"path": source or str(files_of(prefix)[1]), "format": "mmidx", "documents": documents}],
        "documents": documents,
        "tokens": int(raw.sizes.sum(dtype="int64")),
        "characters": None,
        "bytes_utf8": None,
        "dtype": raw.dtype.name,
        "dropped": {},
        "mixed_script_documents": {"count": 0, "examples": []},
        "adopted": True,
        "adopted_from": str(prefix),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "megadistill_version": __version__,
    }


def _name(tokenizer: Any, name: str | None) -> str:
    """The tokenizer's recorded name: ``name``, else its ``name_or_path``, else its class name."""
    return name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
