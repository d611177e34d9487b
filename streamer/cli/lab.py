"""`microseg lab up|down|show|traffic`: the lab command's parser and handlers.

In: the parsed flags (and the lab state file they name). Out: a lab created, shown, driven
with demo traffic or removed, its description on stdout, errors as one `microseg lab:
error:` line on stderr, and the exit status. The lab itself is `streamer.lab.lab`, the
demo traffic `streamer.lab.traffic`. `python -m streamer.cli.lab ...` runs the
same commands without the rest of `microseg`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from streamer.cli.output import into_pipe
from streamer.lab.lab import DEFAULT_STATE_FILE, LAB_SLOTS, Lab
from streamer.lab.netns import LabError
from streamer.lab.traffic import run_traffic


def _err(msg: str) -> int:
    print(f"microseg lab: error: {msg}", file=sys.stderr)
    return 1


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < 10**7:
        raise argparse.ArgumentTypeError(f"must be > 0 (and sane): {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _slot(text: str) -> int:
    value = _count(text)
    if value >= LAB_SLOTS:
        raise argparse.ArgumentTypeError(f"must be 0..{LAB_SLOTS - 1}: {text!r}")
    return value


def add_lab_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `lab up|down|show|traffic` on an argparse subparsers object.

    Each leaf parser sets `func` to its `cmd_lab_*` handler (call `args.func(args)`,
    which returns the process exit code). Returns the `lab` parser.
    """
    lab: argparse.ArgumentParser = subparsers.add_parser(
        "lab",
        help="the demo lab (two netns joined by a veth pair)",
        description="Create, inspect, drive and remove the demo lab.",
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="{up,down,show,traffic}")
    sub.required = True

    def state_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-file",
            type=Path,
            default=DEFAULT_STATE_FILE,
            help=f"where the lab is recorded (default {DEFAULT_STATE_FILE})",
        )

    up = sub.add_parser("up", help="create the lab (no-op if the recorded one is up)")
    state_opt(up)
    up.add_argument("--prefix", help="name prefix, 1-13 chars (default: random ms<hex>)")
    up.add_argument("--slot", type=_slot, help="address slot 0-511 (default: random)")
    up.add_argument("--json", action="store_true", help="print the lab as JSON")
    up.set_defaults(func=cmd_lab_up)

    down = sub.add_parser("down", help="remove the recorded lab (no-op if none)")
    state_opt(down)
    down.set_defaults(func=cmd_lab_down)

    show = sub.add_parser("show", help="print the recorded lab")
    state_opt(show)
    show.add_argument("--json", action="store_true", help="print the lab as JSON")
    show.add_argument(
        "--field",
        choices=[f.name for f in dataclasses.fields(Lab)],
        help="print only this field's value (for scripts)",
    )
    show.set_defaults(func=cmd_lab_show)

    traffic = sub.add_parser(
        "traffic",
        help="demo traffic: peer -> host, TCP 22/80/443/5432, UDP 53, ping",
        description="Serve TCP 22, 80, 443, 5432 and UDP 53 in the lab's host namespace and "
        "connect to them (and ping) from the peer namespace, over IPv4 and "
        "IPv6, once per interval; one line per attempt: ok or blocked.",
    )
    state_opt(traffic)
    traffic.add_argument(
        "--duration",
        type=_positive,
        default=3600.0,
        help="stop after this many seconds (default 3600)",
    )
    traffic.add_argument(
        "--count",
        type=_count,
        default=0,
        help="stop after this many rounds (default 0: until --duration)",
    )
    traffic.add_argument(
        "--interval", type=_positive, default=2.0, help="seconds between rounds (default 2)"
    )
    traffic.add_argument(
        "--timeout",
        type=_positive,
        default=1.0,
        help="seconds before an attempt counts as blocked (default 1)",
    )
    traffic.set_defaults(func=cmd_lab_traffic)
    return lab


def _live_lab(state_file: Path) -> Lab | None:
    """The recorded lab if it is still there; None if nothing (alive) is recorded."""
    if not state_file.exists():
        return None
    lab = Lab.load(state_file)
    return lab if lab.exists() else None


def cmd_lab_up(args: argparse.Namespace) -> int:
    """`lab up`: create and record a lab, or report the recorded one if it is alive."""
    state_file: Path = args.state_file
    try:
        lab = _live_lab(state_file)
        if lab is not None:
            print(f"lab already up (recorded in {state_file})", file=sys.stderr)
        else:
            if state_file.exists():
                # A stale record: clear whatever of it is left before building anew.
                with contextlib.suppress(LabError):
                    Lab.load(state_file).destroy()
            lab = Lab.create(prefix=args.prefix, slot=args.slot)
            try:
                lab.save(state_file)
            except OSError as e:
                lab.destroy()
                return _err(f"cannot write {state_file}: {e.strerror}")
    except (LabError, ValueError) as e:
        return _err(str(e))
    print(json.dumps(lab.to_dict(), indent=2) if args.json else lab.describe())
    return 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    """`lab down`: remove the recorded lab and its record; fine if there is none."""
    state_file: Path = args.state_file
    if not state_file.exists():
        print(f"no lab recorded in {state_file}; nothing to do", file=sys.stderr)
        return 0
    try:
        lab = Lab.load(state_file)
        lab.destroy()
        state_file.unlink(missing_ok=True)
    except (LabError, OSError) as e:
        return _err(str(e))
    print(f"lab {lab.name} removed")
    return 0


def cmd_lab_show(args: argparse.Namespace) -> int:
    """`lab show`: print the recorded lab (human, --json, or one --field); 1 if none is up."""
    try:
        lab = _live_lab(args.state_file)
    except LabError as e:
        return _err(str(e))
    if lab is None:
        return _err(f"no lab is up (state file {args.state_file}); run `microseg lab up`")
    if args.field:
        print(getattr(lab, args.field))
    elif args.json:
        print(json.dumps(lab.to_dict(), indent=2))
    else:
        print(lab.describe())
    return 0


def cmd_lab_traffic(args: argparse.Namespace) -> int:
    """`lab traffic`: run the demo traffic against the recorded lab until done or signalled."""
    try:
        lab = _live_lab(args.state_file)
    except LabError as e:
        return _err(str(e))
    if lab is None:
        return _err(f"no lab is up (state file {args.state_file}); run `microseg lab up`")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        totals = run_traffic(
            lab,
            duration=args.duration,
            count=args.count,
            interval=args.interval,
            timeout=args.timeout,
            out=lambda line: print(line, flush=True),
            stop=stop,
        )
    except OSError as e:
        # e.g. a demo port already taken in the host namespace by something else.
        return _err(f"cannot run traffic in lab {lab.name}: {e}")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(f"traffic done: {totals['ok']} ok, {totals['blocked']} blocked", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m streamer.cli.lab up|down|show|traffic ...` (same as `microseg lab ...`)."""
    parser = argparse.ArgumentParser(prog="python -m streamer.cli.lab")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    if os.geteuid() != 0:
        return _err("the lab needs root (network namespaces, raw sockets)")
    return into_pipe(lambda: int(args.func(args)))


if __name__ == "__main__":
    sys.exit(main())
