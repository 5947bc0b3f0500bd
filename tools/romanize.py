"""Romanize Indic corpora (indic_transliteration) into a TSV or JSONL file, with a per-language report.

    python tools/romanize.py --input sib200/hin_Deva/dev.tsv sib200/tam_Taml/dev.tsv --scheme iso \\
        --output roman/dev.iso.tsv --paired
    python tools/romanize.py --input indiccorp/hi.txt.xz --script Deva --lang hin --scheme iast --output hi.iast.jsonl

Each input's script (and language) comes from its path (``hin_Deva/dev.tsv``) unless ``--script``
(``--lang``) is given; the output layout (``.tsv`` or ``.jsonl``, ``--paired`` adds the native
text) is described in :mod:`megadistill.data.romanize_corpus`, which does the work; this file
parses the command line and prints. The output is never left half-written. Exit code 2 with a
one-line ``romanize: error: ...`` on bad input (unknown scheme or script, missing file,
unsupported output suffix, malformed records with ``--strict``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/romanize.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.data.romanize import LATIN_SCHEMES, RomanizeStats, resolve_scheme
from megadistill.data.romanize_corpus import romanize_files
from megadistill.data.sources import SourceStats, sum_counts


def report(stats: dict[str, RomanizeStats], sources: list[SourceStats], output: Path, scheme: str) -> str:
    """Per-language table: documents, characters, source-script characters, unmapped ones and their fraction."""
    total = RomanizeStats()
    for s in stats.values():
        total.merge(s)
    lines = [f"romanize: wrote {output} ({total.documents:,} documents, scheme {resolve_scheme(scheme)})",
             f"{'language':<12} {'documents':>10} {'characters':>12} {'native':>12} {'unmapped':>10} {'fraction':>9}"]
    for key, s in stats.items():
        lines.append(f"{key:<12} {s.documents:>10,} {s.characters:>12,} {s.native_characters:>12,} "
                     f"{s.unmapped_characters:>10,} {s.unmapped_fraction():>9.4%}")
    dropped = sum_counts(source.dropped for source in sources)
    if dropped:
        lines.append("dropped records: " + ", ".join(f"{reason} {n:,}" for reason, n in dropped.items()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/romanize.py``."""
    parser = argparse.ArgumentParser(prog="romanize", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="corpora: .tsv (text column), .txt (IndicCorp), .jsonl, .parquet, optionally .gz/.xz/.bz2")
    parser.add_argument("--scheme", required=True, help=f"Latin scheme: {', '.join(LATIN_SCHEMES)} (iso = ISO 15919)")
    parser.add_argument("--script", help="ISO 15924 script of all inputs, e.g. Deva (default: from each input's path)")
    parser.add_argument("--lang", help="ISO 639-3 code of all inputs, e.g. asm (default: from each input's path)")
    parser.add_argument("--output", type=Path, required=True, help="OUT.tsv or OUT.jsonl")
    parser.add_argument("--paired", action="store_true", help="also write the native text beside the romanized one")
    parser.add_argument("--text-field", default="text", help="column / JSON field holding the text")
    parser.add_argument("--on-error", choices=("skip", "fail"), default="skip", help="malformed records: drop and count, or stop")
    parser.add_argument("--strict", action="store_true", help="same as --on-error fail")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with a one-line message on bad input)."""
    args = parse_args(argv)
    try:
        stats, sources = romanize_files(args.input, args.scheme, args.output, paired=args.paired, script=args.script,
                                        lang=args.lang, on_error="fail" if args.strict else args.on_error,
                                        text_field=args.text_field)
    except (ValueError, OSError) as err:
        print(f"romanize: error: {err}", file=sys.stderr)
        return 2
    print(report(stats, sources, args.output, args.scheme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
