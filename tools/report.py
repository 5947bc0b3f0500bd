"""Print (and optionally write) the markdown result table of a study directory.

    python tools/report.py own-tokenizer runs/own_tokenizer_study [--output table.md]
    python tools/report.py post runs/post_study [--output table.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadistill.files import atomic_write_text  # noqa: E402
from megadistill.report import own_tokenizer_table, post_table  # noqa: E402

TABLES = {"own-tokenizer": own_tokenizer_table, "post": post_table}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="report", description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=sorted(TABLES), help="which study's table")
    parser.add_argument("directory", help="the study's output directory")
    parser.add_argument("--output", help="also write the table to this file (atomically)")
    args = parser.parse_args(argv)
    table = TABLES[args.study](args.directory)
    print(table)
    if args.output:
        atomic_write_text(args.output, table + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        sys.exit(2)
