"""Long fuzzing run: the properties of ``tests/test_fuzz.py`` with many more examples and a chosen seed.

Usage::

    python bench/fuzz.py                       # 2000 examples per property, seed 0
    python bench/fuzz.py --examples 20000 --seed 7 --property index --property sources

Prints, per property, the examples run, how they ended (a clean ``ValueError``, documents read,
a dataset written, a config accepted, ...), the wall time and the failures found; for a failure,
the exception and hypothesis' shrunk falsifying example. Exit status 1 when any property failed.
Unlike CI (``derandomize=True``, a fixed example budget per property) the examples depend on
``--seed``, so a new seed explores new inputs and the same seed repeats a run.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # megadistill, and test_fuzz / conftest (the tokenizer builders)

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis.errors import HypothesisDeprecationWarning  # noqa: E402

import test_fuzz  # noqa: E402


def run_property(name: str, examples: int, seed_value: int) -> tuple[collections.Counter, list[BaseException], float]:
    """Run property ``name`` for ``examples`` examples; returns (outcomes, failures, seconds).

    Failures are the distinct bugs hypothesis reports (``report_multiple_bugs``), each after shrinking.
    """
    strategy, check = test_fuzz.PROPERTIES[name]
    outcomes: collections.Counter = collections.Counter()

    def test(example) -> None:
        try:
            outcomes[check(example)] += 1
        except BaseException:
            outcomes["failed"] += 1
            raise

    runner = settings(deadline=None, database=None, derandomize=False, max_examples=examples, print_blob=False,
                      report_multiple_bugs=True,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                             HealthCheck.filter_too_much])(given(strategy())(test))
    runner = seed(seed_value)(runner)
    failures: list[BaseException] = []
    started = time.perf_counter()
    try:
        runner()
    except BaseExceptionGroup as group:  # noqa: F821 (Python >= 3.11)
        failures = list(group.exceptions)
    except Exception as err:  # noqa: BLE001 (every failure is reported, none stops the other properties)
        failures = [err]
    return outcomes, failures, time.perf_counter() - started


def describe(err: BaseException) -> str:
    """The exception, its last frame, and the falsifying example hypothesis attached as notes."""
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    notes = "\n".join(f"      {line}" for note in getattr(err, "__notes__", []) for line in note.splitlines())
    return f"    {type(err).__name__}{where}: {str(err)[:500]}\n{notes}"


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per property (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--property", action="append", choices=sorted(test_fuzz.PROPERTIES),
                        help="run only this property (repeatable; default: all)")
    args = parser.parse_args(argv)
    # st.recursive's check that extend() recurses draws a few values and can miss the nested ones: noise.
    warnings.filterwarnings("ignore", message=".*doesn't use it's argument", category=HypothesisDeprecationWarning)
    if args.examples < 1:
        parser.error("--examples must be >= 1")
    names = args.property or list(test_fuzz.PROPERTIES)
    print(f"fuzz: {args.examples} examples per property, seed {args.seed}; CI runs {test_fuzz.CI_EXAMPLES}")
    total_failures = 0
    for name in names:
        outcomes, failures, seconds = run_property(name, args.examples, args.seed)
        runs = sum(outcomes.values())
        detail = ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
        print(f"{name:17s} {runs:7d} examples run  {len(failures)} failure(s)  {seconds:7.1f} s  ({detail})", flush=True)
        for err in failures:
            print(describe(err), flush=True)
        total_failures += len(failures)
    print(f"total: {total_failures} failure(s)")
    return 1 if total_failures else 0


if __name__ == "__main__":
    sys.exit(main())
