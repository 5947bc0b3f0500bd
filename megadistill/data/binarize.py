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
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from megadistill import __version__
from megadistill.data.dedup import HashSet
from megadistill.data.encode import DocumentEncoder, EncodedBatch, encode_batches
from megadistill.data.framing import Framing, framing_for_tokenizer
from megadistill.data.indexed import IndexedDatasetWriter, token_dtype_for_vocab, tokenizer_sha256, write_provenance
from megadistill.data.sources import (DEFAULT_BLOCK_BYTES, DEFAULT_MAX_LINE_BYTES, Block, SourceStats, corpus_format,
                                      language_from_path, no_documents_error, read_blocks, sum_counts)

logger = logging.getLogger(__name__)

FORMAT_NAME = "megatron-mmidindex-v1"
_EXAMPLES = 5  # locations listed per warning in the provenance


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
        """Raises ValueError naming the bad field."""
        if self.block_bytes < 1 or self.rows_per_block < 1:
            raise ValueError(f"block_bytes and rows_per_block must be >= 1, got {self.block_bytes}, {self.rows_per_block}")
        if self.processes < 0 or self.threads_per_process < 1:
            raise ValueError(f"need processes >= 0 and threads_per_process >= 1, got {self.processes}, {self.threads_per_process}")
        if self.romanize_only and not self.romanize:
            raise ValueError("romanize_only needs a romanize scheme")
        if self.max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be >= 1, got {self.max_line_bytes}")


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

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records dropped for ``reason``."""
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


class _Reader:
    """Blocks of all inputs in order (:func:`read_blocks`); remembers which input each block in flight came from."""

    def __init__(self, inputs: list, options: BinarizeOptions) -> None:
        self.inputs, self.options = inputs, options
        self.stats = [SourceStats() for _ in inputs]  # per input: framing counts here + parse counts of its blocks
        self.block_inputs: deque[int] = deque()

    def blocks(self) -> Iterator[Block]:
        """Every input's blocks in order, noting each block's input in ``block_inputs``."""
        opts = self.options
        for i, path in enumerate(self.inputs):
            for block in read_blocks(path, on_error=opts.on_error, stats=self.stats[i], text_field=opts.text_field,
                                     max_line_bytes=opts.max_line_bytes, block_bytes=opts.block_bytes,
                                     rows_per_block=opts.rows_per_block,
                                     split=opts.hf_split, config_name=opts.hf_config):
                self.block_inputs.append(i)
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
                          mixed_script=batch.mixed_script, locations=batch.locations, stats=batch.stats, bytes_utf8=utf8)
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
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (Megatron MMIDIDX) + ``.json`` provenance.

    One sequence per document: ``prefix_ids + tokenizer(text, add_special_tokens=False).input_ids +
    suffix_ids`` of :func:`~megadistill.data.framing.framing_for_tokenizer` (decoders: the
    tokenizer's BOS, if it adds one, and EOS; encoders: ``[CLS]``/``[SEP]`` or ``<s>``/``</s>``),
    recorded as ``"framing"`` in the provenance. Token dtype is
    ``token_dtype_for_vocab(len(tokenizer))``. With ``options.romanize`` the romanized texts go
    to ``<output_prefix>.<scheme>`` (document ``i`` of both is the same source document). Every
    ``.bin``/``.idx`` is written to a temporary name and renamed only after all inputs were read;
    stale ``.json`` files are removed first, so a crash never leaves new tokens beside old provenance.

    Args:
        inputs: corpus files (.tsv/.txt/.jsonl/.parquet, optionally .gz/.xz/.bz2) or ``hf:`` specs,
            see ``megadistill.data.sources``; read in order.
        tokenizer: Hugging Face tokenizer (fast preferably): a decoder's with an EOS token, or
            an encoder's (BERT, XLM-R) whose post-processor frames sequences with its SEP token.
        output_prefix: path without suffix; parent directories are created.
        options: see :class:`BinarizeOptions`; defaults when None.
        language, script: default from ``language_from_path(inputs[0])``.
        tokenizer_name: recorded in the provenance (defaults to ``tokenizer.name_or_path``).
        show_progress: tqdm bar on stderr (documents, documents/s, tokens, tokens/s).
    Returns:
        The provenance dict written to ``<output_prefix>.json`` (of the romanized dataset with
        ``romanize_only``).
    Raises:
        FileNotFoundError: an input is missing.
        ValueError: no inputs, bad input (see ``read_documents``), a decoder tokenizer without
            EOS (:func:`~megadistill.data.framing.framing_for_tokenizer`), romanization without a
            known script or with an unknown scheme.
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
    with ExitStack() as stack:
        writers = {kind: stack.enter_context(IndexedDatasetWriter(prefix, dtype)) for kind, prefix in prefixes.items()}
        bar = stack.enter_context(tqdm(unit="doc", file=sys.stderr, disable=not show_progress, desc=output_prefix.name))
        kept = _stream(encoder, reader, writers, totals, bar)
        sources = reader.sources(kept)
        for prefix in prefixes.values():
            Path(f"{prefix}.json").unlink(missing_ok=True)
    base = _provenance(tokenizer, tokenizer_name, totals, reader.stats, sources, dtype.name, framing, language, script)
    metas = {kind: _output_meta(base, kind, totals, prefixes, options) for kind in prefixes}
    for kind, prefix in prefixes.items():
        write_provenance(prefix, metas[kind])
    _log_warnings(metas[next(iter(metas))], output_prefix)
    return metas["native"] if "native" in metas else metas["romanized"]


def _stream(encoder: DocumentEncoder, reader: _Reader, writers: dict, totals: _Totals, bar: tqdm) -> list[int]:
    """Encode every block of ``reader`` in order into ``writers``; returns the documents written per input."""
    opts, kept = reader.options, [0] * len(reader.inputs)
    seen = HashSet() if opts.dedup else None
    started = time.perf_counter()
    for batch in encode_batches(encoder, reader.blocks(), opts.processes, opts.threads_per_process):
        source = reader.block_inputs.popleft()
        if seen is not None:
            batch = _deduplicate(batch, seen, encoder, totals)
        _merge_stats(reader.stats[source], batch.stats)
        kept[source] += _write_batch(batch, writers, totals)
        bar.update(batch.stats.documents)
        tok_s = sum(totals.tokens.values()) / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(tokens=f"{sum(totals.tokens.values()):,}", tok_s=f"{tok_s:,.0f}", refresh=False)
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


def _write_batch(batch: EncodedBatch, writers: dict, totals: _Totals) -> int:
    """Append an encoded batch to the writers and fold its counters into ``totals``; returns documents written."""
    if "native" in writers:
        writers["native"].add_documents(batch.ids, batch.lengths)
        totals.tokens["native"] += len(batch.ids)
    if "romanized" in writers:
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
    return written


def _provenance(tokenizer, tokenizer_name, totals: _Totals, stats: list[SourceStats], sources: list, dtype: str,
                framing: Framing, language, script) -> dict[str, Any]:
    """Provenance shared by the native and romanized outputs, in the documented key order."""
    dropped = sum_counts([s.dropped for s in stats] + [totals.dropped])
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return {
        "format": FORMAT_NAME,
        "tokenizer": {
            "name": tokenizer_name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
            "sha256": tokenizer_sha256(tokenizer),
            "vocab_size": len(tokenizer),
        },
        "bos_id": bos_id,
        "eos_id": getattr(tokenizer, "eos_token_id", None),
        "add_bos": bos_id is not None and framing.prefix_ids[:1] == (bos_id,),
        "framing": framing.as_dict(),
        "language": language,
        "script": script,
        "romanization": None,
        "sources": sources,
        "documents": totals.documents,
        "tokens": 0,
        "characters": totals.characters,
        "bytes_utf8": totals.bytes_utf8,
        "dtype": dtype,
        "dropped": dropped,
        "mixed_script_documents": {"count": totals.mixed_script, "examples": totals.mixed_examples},
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
    """Warn about mixed-script documents (kept) with the first locations."""
    mixed = meta["mixed_script_documents"]
    if mixed["count"]:
        logger.warning("%s: %d of %d documents are mostly not in script %s (kept), e.g. %s", prefix, mixed["count"],
                       meta["documents"], meta["script"], ", ".join(mixed["examples"]))


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
