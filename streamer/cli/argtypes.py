"""The argparse value types of the API clients, and the value domains behind them.

In: the text of one command-line value. Out: the typed value (int, float, str, an Endpoint for
`--api`) or argparse.ArgumentTypeError with the message the user sees after
`argument --flag: `. Nothing is dropped silently: a value is taken whole or refused.

Numbers of one shape come from the factories `bounded_int` and `bounded_float` (a bound, a
"not a number" wording and an "out of range" wording), seconds from `seconds_between`; the
named instances below are what the parsers use.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Final, TypeVar

from streamer.cli.endpoint import Endpoint, parse_api_address

__all__ = [
    "ACTIONS",
    "DIRECTIONS",
    "MAX_RULE_ID",
    "PROTOCOLS",
    "VERDICTS",
    "api_address",
    "bounded_float",
    "bounded_int",
    "limit",
    "port_number",
    "priority",
    "rule_id",
    "rule_port",
    "seconds_between",
]

MAX_RULE_ID: Final = 2**32 - 1
# The rule fields' domains (SPEC §2); `session list` filters by them too.
PROTOCOLS: Final = ("tcp", "udp", "icmp", "icmpv6", "any")
ACTIONS: Final = ("allow", "deny", "log")
DIRECTIONS: Final = ("ingress", "egress", "any")
VERDICTS: Final = ("allow", "deny", "log")

_N = TypeVar("_N", int, float)


# --------------------------------------------------------------------------- factories


def _checked(
    parse: Callable[[str], _N], in_range: Callable[[_N], bool], what: str, out_of_range: str
) -> Callable[[str], _N]:
    def check(value: str) -> _N:
        try:
            n = parse(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if not in_range(n):
            raise argparse.ArgumentTypeError(f"{value!r} {out_of_range}")
        return n

    return check


def _ascii_digits(value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise ValueError(value)
    return int(value)


def bounded_int(
    lo: int, hi: int | None, what: str, out_of_range: str | None = None, *, digits: bool = False
) -> Callable[[str], int]:
    """A whole number in lo..hi (hi None: no upper bound). Not a number: "'V' is not {what}";
    out of range: "'V' {out_of_range}", by default "is not {what}" as well. `digits`: ASCII
    digits only (no sign, spaces or underscores), as ports and counts are written in URLs."""
    return _checked(
        _ascii_digits if digits else int,
        lambda n: lo <= n and (hi is None or n <= hi),
        what,
        f"is not {what}" if out_of_range is None else out_of_range,
    )


def bounded_float(
    lo: float,
    hi: float,
    what: str,
    out_of_range: str,
    *,
    above_lo: bool = False,
    below_hi: bool = False,
    parse: Callable[[str], float] = float,
) -> Callable[[str], float]:
    """A number in lo..hi (`above_lo`, `below_hi`: the bound itself excluded); nan is out of
    every range. Not a number: "'V' is not {what}"; out of range: "'V' {out_of_range}"."""
    return _checked(
        parse,
        lambda n: (lo < n if above_lo else lo <= n) and (n < hi if below_hi else n <= hi),
        what,
        out_of_range,
    )


def seconds_between(lo: float, hi: float) -> Callable[[str], float]:
    """A number of seconds in lo..hi."""
    return bounded_float(
        lo, hi, "a number of seconds", f"must be between {lo:g} and {hi:g} seconds"
    )


# --------------------------------------------------------------------------- the API clients


def api_address(value: str) -> Endpoint:
    """`--api`: parse_api_address (streamer/cli/endpoint.py) as an argparse type."""
    try:
        return parse_api_address(value)
    except (TypeError, ValueError):
        # yarl refuses some hosts (e.g. with a quote) with a ValueError, which argparse words
        # with the type's name; users have seen this wording, so it stays.
        raise argparse.ArgumentTypeError(f"invalid _api_type value: {value!r}") from None


rule_id = bounded_int(1, MAX_RULE_ID, f"a rule id (1..{MAX_RULE_ID})")
priority = bounded_int(0, 65535, "a priority (0..65535)")
port_number = bounded_int(1, 65535, "a port (1..65535)", digits=True)
limit = bounded_int(1, None, "a limit (a whole number >= 1)", digits=True)


def rule_port(value: str) -> int | str:
    """An int 0..65535, or "lo-hi" (sent as the string, as SPEC §2 writes ranges)."""
    lo, sep, hi = value.partition("-")
    parts = [lo, hi] if sep else [lo]
    if not all(p.strip().isascii() and p.strip().isdigit() and int(p) <= 65535 for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: use 0..65535 or LO-HI")
    if sep:
        if int(lo) > int(hi):
            raise argparse.ArgumentTypeError(f"{value!r}: the range must be LO-HI with LO <= HI")
        return f"{int(lo)}-{int(hi)}"
    return int(lo)
