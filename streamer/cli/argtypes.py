"""Every argparse value type of the `microseg` command, and the value domains behind them.

In: the text of one command-line value. Out: the typed value (int, float, str, a list for the
comma-separated filters of `flows observe`, an Endpoint for `--api`) or
argparse.ArgumentTypeError with the message the user sees after `argument --flag: `. Nothing is
dropped silently: a value is taken whole or refused.

Numbers of one shape come from the factories `bounded_int` and `bounded_float` (a bound, a
"not a number" wording and an "out of range" wording), seconds from `seconds_between`; the
named instances below are what the parsers use.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Final, TypeVar

from streamer.cli.endpoint import Endpoint, parse_api_address
from streamer.policy.failsafe import FailsafeError, FailsafeRule, parse_failsafe
from streamer.policy.labels import check_host_name, parse_label
from streamer.policy.model import GROUP_NAME_PATTERN

__all__ = [
    "MAX_RULE_ID",
    "RECENT_MAX",
    "api_address",
    "bounded_float",
    "bounded_int",
    "choice_list",
    "class_seconds",
    "fraction",
    "group_name",
    "host_label",
    "host_name",
    "ifname",
    "instance_name",
    "ip_list",
    "kafka_servers",
    "kafka_topic",
    "limit",
    "monitor_count",
    "monitor_interval",
    "name_matching",
    "non_negative_int",
    "per_second",
    "port_list",
    "port_number",
    "positive_int",
    "priority",
    "recent_count",
    "rule_id",
    "rule_list",
    "rule_port",
    "seconds",
    "seconds_between",
    "size",
]

MAX_RULE_ID: Final = 2**32 - 1
RECENT_MAX: Final = 10_000  # the agent's cap on /flows/recent?limit=
# The rule fields' domains (docs/contract.md §2); `session list` filters by them too.

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


def name_matching(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    """A name that `pattern` matches, never "." or ".." (path components); else "'V' is not
    {what}"."""

    def check(value: str) -> str:
        # fullmatch: `$` alone would let a trailing newline through.
        if not pattern.fullmatch(value) or value in (".", ".."):
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}")
        return value

    return check


def class_seconds(names: Sequence[str]) -> Callable[[str], tuple[str, float]]:
    """`NAME=SECONDS` with NAME one of `names` -> (NAME, seconds); the seconds are not bounded
    here (the config they go to checks them)."""
    known = list(names)

    def check(value: str) -> tuple[str, float]:
        name, sep, seconds = value.partition("=")
        if not sep or name.strip() not in known:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not CLASS=SECONDS with CLASS one of {', '.join(known)}"
            )
        try:
            return name.strip(), float(seconds)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: {seconds!r} is not a number") from None

    return check


# --------------------------------------------------------------------------- `microseg run`

positive_int = bounded_int(1, None, "a whole number", "must be greater than 0")
non_negative_int = bounded_int(0, None, "a whole number", "must be 0 or more")
seconds = seconds_between(0, 86400)
per_second = bounded_float(0, 1e12, "a number per second", "must be 0 (off) or more", below_hi=True)


def _ratio(value: str) -> float:
    return float(value.rstrip("%")) / (100 if value.endswith("%") else 1)


fraction = bounded_float(
    0,
    1,
    "a fraction (0.8 or 80%)",
    "must be above 0 and at most 1 (100%)",
    above_lo=True,
    parse=_ratio,
)
ifname = name_matching(
    re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$"), "an interface name (1-15 characters)"
)
kafka_topic = name_matching(
    re.compile(r"^[A-Za-z0-9._-]{1,249}$"),
    "a Kafka topic name (letters, digits, '.', '_', '-'; up to 249)",
)
# docs/contract.md §5: such a name needs no quoting in a URL path; the agent checks it again.
group_name = name_matching(
    re.compile(GROUP_NAME_PATTERN),
    'a group name (1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit)',
)
instance_name = name_matching(
    re.compile(r"^[A-Za-z0-9_-]{1,64}$"),
    "an instance name (letters, digits, - and _, up to 64)",
)


def host_label(value: str) -> tuple[str, str]:
    """`--host-label KEY=VALUE` (contract §7; the syntax of streamer.policy.labels) ->
    (key, value); the value may be empty."""
    try:
        return parse_label(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def host_name(value: str) -> str:
    """`--host-name NAME`: the agent's name in the fleet (1..253 characters, DNS-like; the
    key of its status record)."""
    try:
        return check_host_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_SIZE = re.compile(r"^(\d+)\s*([kKmMgG]i?[bB]?|[bB])?$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(value: str) -> int:
    """Bytes: a whole number, optionally with K, M or G (powers of 1024)."""
    m = _SIZE.match(value.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a size: use bytes, or a number with K, M or G (e.g. 256M)"
        )
    return int(m[1]) * _SIZE_UNITS[(m[2] or "")[:1].lower()]


def kafka_servers(value: str) -> str:
    """HOST:PORT, or several separated by commas (the bootstrap servers)."""
    servers = [v.strip() for v in value.split(",")]
    for v in servers:
        host, sep, port = v.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{v!r} is not HOST:PORT (e.g. 127.0.0.1:9092)")
    return ",".join(servers)


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
    """An int 0..65535, or "lo-hi" (sent as the string, as contract §2 writes ranges)."""
    lo, sep, hi = value.partition("-")
    parts = [lo, hi] if sep else [lo]
    if not all(p.strip().isascii() and p.strip().isdigit() and int(p) <= 65535 for p in parts):
        raise argparse.ArgumentTypeError(f"{value!r} is not a port: use 0..65535 or LO-HI")
    if sep:
        if int(lo) > int(hi):
            raise argparse.ArgumentTypeError(f"{value!r}: the range must be LO-HI with LO <= HI")
        return f"{int(lo)}-{int(hi)}"
    return int(lo)


# --------------------------------------------------------------------------- `flows observe`

recent_count = bounded_int(0, RECENT_MAX, f"a count 0..{RECENT_MAX}", digits=True)


def _split_values(value: str, check: Callable[[str], str]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give a value")
    return [check(v) for v in items]


def choice_list(options: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """Comma-separated alternatives among `options` (any case) -> lowercase list."""

    def check_one(v: str) -> str:
        if v.lower() not in options:
            raise argparse.ArgumentTypeError(f"{v!r} is not a {what}: use {', '.join(options)}")
        return v.lower()

    return lambda value: _split_values(value, check_one)


def ip_list(value: str) -> list[str]:
    """Comma-separated addresses or CIDRs -> their network texts."""

    def check_one(v: str) -> str:
        try:
            return str(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not an IPv4/IPv6 address or CIDR") from None

    return _split_values(value, check_one)


def port_list(value: str) -> list[str]:
    """Comma-separated ports 1..65535 -> their decimal texts."""
    return _split_values(value, lambda v: str(port_number(v)))


def rule_list(value: str) -> list[str]:
    """Comma-separated rule ids (1..MAX_RULE_ID) or rule names, as written."""

    def check_one(v: str) -> str:
        if v.isascii() and v.isdigit() and not 0 < int(v) <= MAX_RULE_ID:
            raise argparse.ArgumentTypeError(f"{v!r} is not a rule_id (1..{MAX_RULE_ID})")
        return v

    return _split_values(value, check_one)


# --------------------------------------------------------------------------- `monitor`

monitor_interval = seconds_between(0.1, 3600)
monitor_count = bounded_int(0, None, "a whole number", "must be 0 (until stopped) or more")


def failsafe_list(value: str) -> tuple[FailsafeRule, ...]:
    """--failsafe: PROTO:PORT:in|out[@CIDR],... or none (streamer.policy.failsafe)."""
    try:
        return parse_failsafe(value)
    except FailsafeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
