"""`python -m bench`: the datapath micro-benchmarks (bench.datapath), the admin API benchmarks
against a real agent (bench.api), flow events to Kafka (bench.events), then microseg side by
side with nftables and with no filter on real traffic (bench.compare), a fleet of agents
following one policy through Kafka (bench.fleet); `--only SUITE` runs one.

In: argv (options in bench.common). Out: each suite's table on stdout, progress on stderr, the
results of every suite run in one JSON file (--out); the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import SUITES, BenchError, parser


def _on_term(_signum: int, _frame: FrameType | None) -> None:
    # SystemExit unwinds through the finally that removes our pins.
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; returns the exit status (0 done, 1 error, 2 usage, 130 interrupted).

    Every suite by default (the datapath's, the admin API's: bench.api, the flow events' to
    Kafka: bench.events, side by side: bench.compare, the fleet: bench.fleet); `--only` picks
    one and keeps the others' sections of an existing --out file.
    """
    args = parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench: error: needs root (loading BPF programs, bpffs pins)", file=sys.stderr)
        return 1
    out: Path = args.out
    if out.parent and not out.parent.is_dir():
        print(f"bench: error: --out {out}: directory {out.parent} does not exist", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_term)
    res: dict[str, Any] = {}
    if args.only in (None, "datapath"):
        rc = _run_datapath(args, res)
        if rc:
            return rc
    if args.only in (None, "api"):
        rc = _run_api(args, res)
        if rc:
            return rc
    if args.only in (None, "events"):
        rc = _run_events(args, res)
        if rc:
            return rc
    if args.only in (None, "compare"):
        rc = _run_compare(args, res)
        if rc:
            return rc
    if args.only in (None, "fleet"):
        rc = _run_fleet(args, res)
        if rc:
            return rc
    if args.only is not None:
        _keep_other_suite(out, res, args.only)
    try:
        out.write_text(json.dumps(res, indent=1) + "\n")
    except OSError as e:
        print(f"bench: error: writing {out}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"results written to {out}")
    return 0


def _run_datapath(args: argparse.Namespace, res: dict[str, Any]) -> int:
    """The datapath suite (bench.datapath): prints its table, fills `res`; 0 or the status."""
    from bench.datapath import run_datapath, settings_for

    return run_datapath(settings_for(args.quick, args.runs, args.packets, args.seed), res)


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _suite(
    res: dict[str, Any],
    key: str,
    run: Callable[[], dict[str, Any]],
    render_it: Callable[[dict[str, Any]], str],
    errors: tuple[type[BaseException], ...],
) -> int:
    """Run one suite into res[key] and print its table; 0, or 1 for `errors`, 130 for Ctrl-C."""
    caught: tuple[type[BaseException], ...] = (BenchError, OSError, *errors)
    try:
        out = run()
    except caught as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    res[key] = out
    if len(res) > 1:
        print()
    print(render_it(out))
    return 0


def _run_api(args: argparse.Namespace, res: dict[str, Any]) -> int:
    """The admin API suite (bench.api): prints its table, fills res["api"]; 0 or the status."""
    from bench.api import run_api_bench, settings_for
    from bench.apireport import render_api
    from streamer.lab.netns import LabError

    settings = settings_for(
        args.quick, args.api_requests, args.api_rules, args.seed, args.api_budget
    )
    return _suite(res, "api", lambda: run_api_bench(settings, _progress), render_api, (LabError,))


def _run_events(args: argparse.Namespace, res: dict[str, Any]) -> int:
    """The flow-event suite (bench.events): prints its table, fills res["events"]; 0 or the
    exit status."""
    from bench.events import render_events, run_events_bench, settings_for

    return _suite(
        res,
        "events",
        lambda: run_events_bench(settings_for(args.quick), _progress),
        render_events,
        (),
    )


def _run_compare(args: argparse.Namespace, res: dict[str, Any]) -> int:
    """The side-by-side suite (bench.compare): prints its table, writes its plot, fills
    res["compare"]; 0 or the exit status."""
    from bench.compare import PLOT, plot_compare, render_compare, run_compare, settings_for
    from streamer.lab.netns import LabError

    settings = settings_for(args.quick, args.compare_runs, args.compare_seconds, args.seed)
    plot: Path = args.plot or (args.out.with_suffix(".png") if args.quick else PLOT)
    rc = _suite(
        res,
        "compare",
        lambda: run_compare(settings, _progress),
        lambda c: render_compare(c, res.get("events")),
        (LabError,),
    )
    if rc:
        return rc
    compare = res["compare"]
    try:
        plot_compare(compare, plot)
    except (ImportError, OSError, ValueError) as e:
        print(f"bench: error: the plot {plot}: {e}", file=sys.stderr)
        return 1
    compare["meta"]["plot"] = str(plot)
    print(f"plot written to {plot}")
    return 0


def _run_fleet(args: argparse.Namespace, res: dict[str, Any]) -> int:
    """The fleet suite (bench.fleet): prints its table, fills res["fleet"]; 0 or the status."""
    from bench.fleet import render_fleet, run_fleet_bench, settings_for

    settings = settings_for(args.quick, args.fleet_counts, args.fleet_changes, args.seed)
    return _suite(res, "fleet", lambda: run_fleet_bench(settings, _progress), render_fleet, ())


def _suite_of(key: str) -> str:
    """Which suite wrote a top-level key of the results file."""
    return key if key in ("api", "events", "compare", "fleet") else "datapath"


def _keep_other_suite(out: Path, res: dict[str, Any], only: str) -> None:
    """Copy the sections of the suites not run from an existing results file at `out` into `res`."""
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(old, dict):
        return
    kept = {k: v for k, v in old.items() if _suite_of(k) != only and k not in res}
    res.update(kept)
    for suite in SUITES:
        if suite != only and any(_suite_of(k) == suite for k in kept):
            print(f"kept the {suite} results already in {out}")


if __name__ == "__main__":
    raise SystemExit(main())
