"""Merge binarized shards into one Megatron MMIDIDX dataset (``.bin``/``.idx``/``.json``), streaming.

    python tools/merge_datasets.py --input corpus/shards/hin_Deva.00 corpus/shards/hin_Deva.01 \\
        --output-prefix corpus/hin_Deva
    python tools/merge_datasets.py --input-glob 'corpus/shards/hin_Deva.*' --output-prefix corpus/hin_Deva

Shards are concatenated in the order given (``--input-glob`` sorts the matches), so merging the
shards of one input list in order reproduces the bytes of a single ``tools/binarize.py`` run.
The shards must share the tokenizer (provenance hash), special tokens, dtype, language and
script (``--allow-mixed-languages`` lifts the last two), and their framing. A pair without
``.json`` (written by Megatron-LM) is refused until ``tools/adopt_dataset.py`` records one. This
file parses the command line and prints; :func:`megadistill.data.merge.merge_datasets` does the work.

Exit status: 0 merged, 2 bad input (one line naming the shard and the field).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run as `python tools/merge_datasets.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import megadistill  # noqa: F401

from megadistill.data.indexed import dataset_prefix
from megadistill.data.merge import merge_datasets, prefixes_matching

PROG = "merge_datasets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of ``tools/merge_datasets.py``."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="shard prefixes (without .bin/.idx), merged in this order")
    source.add_argument("--input-glob", help="a glob of .idx files or prefixes; matches are merged in sorted order")
    parser.add_argument("--output-prefix", type=Path, required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--allow-mixed-languages", action="store_true",
                        help="merge shards of several languages/scripts (blending needs one dataset per language)")
    return parser.parse_args(argv)


def shard_prefixes(args: argparse.Namespace) -> list[str]:
    """The shard prefixes to merge: ``--input`` as given, or the sorted ``--input-glob`` matches, without suffixes.

    Raises:
        FileNotFoundError: the glob matches no ``.idx`` file.
    """
    if args.input:
        return [str(dataset_prefix(p)) for p in args.input]
    return prefixes_matching(args.input_glob)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns the exit code (2 with a one-line message on bad input)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        prefixes = shard_prefixes(args)
        started = time.perf_counter()
        meta = merge_datasets(prefixes, args.output_prefix, allow_mixed_languages=args.allow_mixed_languages)
    except (ValueError, FileNotFoundError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"{PROG}: {len(prefixes)} shards -> {args.output_prefix}: {meta['documents']:,} documents, "
          f"{meta['tokens']:,} tokens, dtype {meta['dtype']}, in {seconds:.1f} s; "
          f"wrote {args.output_prefix}.bin, .idx, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
