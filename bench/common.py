"""What the benchmark modules share: their error and the command line's options.

In: argv (`parser().parse_args`). Out: the options of every suite (--quick, --only, --out and
each suite's own), and `BenchError`, which a suite raises when it cannot run or measured
something other than what it meant to. This module imports no other bench module: the suites
(bench.datapath, bench.api, bench.events, bench.compare, bench.fleet) import it, and
bench.__main__ imports them, so imports go one way.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"
# A deny verdict's event per new flow must fit the ring buffer (1 MiB, 88 bytes a record)
# between two drains, or the bench would time the cheaper "event lost" path.
MAX_PACKETS = 10_000
SUITES = ("datapath", "api", "events", "compare", "fleet")


class BenchError(RuntimeError):
    """The benchmark cannot run, or measured something other than what it meant to."""


# ---- command line ----------------------------------------------------------------------------


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {lo}..{hi:,}")
        return value

    return parse


def seconds_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(
                f"{value:g} is out of range: use {lo:g}..{hi:g} seconds"
            )
        return value

    return parse


seconds = seconds_in(0.1, 60)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Datapath micro-benchmarks of the microseg classifier (BPF_PROG_TEST_RUN)."
        " Needs root. Prints a table and writes JSON.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run (1 run, 10 and 1,000 rules, few packets) for smoke tests",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help=f"where to write the JSON results (default: {RESULTS})",
    )
    p.add_argument("--runs", type=int_in(1, 1000), help="runs per case (default 9; --quick 1)")
    p.add_argument(
        "--packets",
        type=int_in(16, MAX_PACKETS),
        help="distinct packets per new-flow run (default 2000; --quick 64)",
    )
    p.add_argument("--seed", type=int_in(0, 2**32), default=1, help="rule-set seed (default 1)")
    p.add_argument(
        "--only",
        choices=SUITES,
        help="run one suite only; the others' results already in --out are kept",
    )
    p.add_argument(
        "--api-requests",
        type=int_in(1, 100_000),
        help="rounds of single-rule writes (POST, PUT, DELETE) and of group member writes per"
        " row of the API suite (default 200; --quick 10)",
    )
    p.add_argument(
        "--api-budget",
        type=seconds_in(1, 3600),
        help="seconds one row of the API suite may run before it stops with fewer rounds"
        " (default 60; --quick 20)",
    )
    p.add_argument(
        "--compare-runs",
        type=int_in(1, 100),
        help="runs of each workload in the side-by-side suite (default 5; --quick 1)",
    )
    p.add_argument(
        "--compare-seconds",
        type=seconds,
        help="seconds one workload run lasts in the side-by-side suite (default 1; --quick 0.3)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        help="where the side-by-side suite writes its PNG (default docs/bench.png; with"
        " --quick: next to --out)",
    )
    p.add_argument(
        "--api-rules",
        type=int_in(2, 1_000_000),
        help="rules in the whole-set PUT, the memory and start-up measurements of the API"
        " suite (default 100,000; --quick 1,000)",
    )
    p.add_argument(
        "--fleet-counts",
        type=int_list(1, 50),
        help="agent counts of the fleet suite's one-rule rows, comma-separated (default"
        " 1,5,10,20; --quick 1,5); its big-set and label-group rows use at most the largest",
    )
    p.add_argument(
        "--fleet-changes",
        type=int_in(1, 1000),
        help="one-rule changes per agent count in the fleet suite (default 20; --quick 5)",
    )
    return p


def int_list(lo: int, hi: int) -> Callable[[str], tuple[int, ...]]:
    one = int_in(lo, hi)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(one(t.strip()) for t in text.split(",") if t.strip())
        if not values:
            raise argparse.ArgumentTypeError("give at least one number")
        return values

    return parse
