"""Print (and optionally write) the markdown result table of a study directory.

    python tools/report.py own-tokenizer runs/own_tokenizer_study [--output table.md]
    python tools/report.py post runs/post_study [--output table.md]
    python tools/report.py grid runs/grid [--output table.md] [--plots DIR]

``grid`` reads the experiment grid's ``grid.json`` and per-language run directories
(:mod:`megadistill.report`) and also writes its PNGs (bits/char bars, training curves, dev CE vs
tokens) into ``--plots`` (default: the study directory), printing their paths after the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.files import atomic_write_text  # noqa: E402
from megadistill.report import grid_plots, grid_table, own_tokenizer_table, post_table  # noqa: E402

TABLES = {"own-tokenizer": own_tokenizer_table, "post": post_table, "grid": grid_table}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="report", description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(TABLES), help="which study's table")
    parser.add_argument("directory", help="the study's output directory")
    parser.add_argument("--output", help="also write the table to this file (atomically)")
    parser.add_argument("--plots", metavar="DIR", help="grid: write the PNGs here (default: the study directory)")
    args = parser.parse_args(argv)
    if args.plots and args.study != "grid":
        parser.error("--plots applies to the grid study only")
    table = TABLES[args.study](args.directory)
    print(table)
    if args.output:
        atomic_write_text(args.output, table + "\n")
    if args.study == "grid":
        for path in grid_plots(args.directory, args.plots or args.directory):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        sys.exit(2)
