#!/usr/bin/env python
"""Run an experiment grid (languages x cells) into one output directory; rerunning skips finished cells.

    python tools/run_experiments.py megadistill/recipes/experiments/seed.yaml --out runs/seed \\
        [--langs hin_Deva ory_Orya] [--cells no_teacher kl_t1] [--set train.max_steps=4 ...] \\
        [--teacher PATH] [--data-dir DIR] [--ranks N] [--dry-run] [--keep-going]

Per language: binarize (and romanize a view), evaluate the teacher on dev, build each offline
teacher cache once, then train and evaluate the cells in grid order, each in its own process
(``<out>/<lang>/<cell>/run.log``). ``--dry-run`` prints every command and runs nothing. The grid
format and the output layout are described in :mod:`megadistill.experiments`; the table:
``python tools/report.py grid OUT``.

Exit codes: 0 done; 1 a step failed (its log's last lines and path are printed); 2 a bad grid,
selection or output directory (one line ``run_experiments: error: ...``, before anything runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megadistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.experiments import GridError, run_grid


class _OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (``run_experiments: error: ...``, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = _OneLineParser(prog="run_experiments", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid YAML file (e.g. megadistill/recipes/experiments/seed.yaml)")
    p.add_argument("--out", required=True, help="output directory (reused: finished cells are skipped)")
    p.add_argument("--langs", nargs="+", help="languages to run (default: the grid's)")
    p.add_argument("--cells", nargs="+", help="cells to run, kept in grid order (default: all)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", nargs="+",
                   help="overrides after the grid's common ones (before each cell's own), e.g. train.max_steps=4")
    p.add_argument("--teacher", help="teacher.path of every cell (default: the grid's)")
    p.add_argument("--data-dir", help="directory of <lang>/train.tsv and dev.tsv (default: the grid's data_dir, "
                                      "else $MEGADISTILL_SIB200)")
    p.add_argument("--ranks", type=int, help="processes per run (1: python; more: the deepspeed launcher)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its commands, run nothing")
    p.add_argument("--keep-going", action="store_true", help="after a failed cell, run the others (exit code still 1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit code (0, 1 a failed step, 2 bad input with a one-line message)."""
    args = parse_args(argv)
    try:
        return run_grid(args.grid, args.out, langs=args.langs, cells=args.cells,
                        sets=[s for group in args.sets for s in group], teacher=args.teacher, data_dir=args.data_dir,
                        ranks=args.ranks, dry_run=args.dry_run, keep_going=args.keep_going,
                        echo=lambda line: print(line, flush=True))
    except GridError as err:
        print(f"run_experiments: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
