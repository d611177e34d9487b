"""Failsafe traffic (contract §6): flows that pass before any rule, so a policy can never cut
a host off from its management path (SSH in, DHCP, DNS out).

In: `--failsafe` text, a comma-separated list of `PROTO:PORT:in|out[@CIDR]` or `none`.
Out: a tuple of FailsafeRule, each once, in the order given. A flow is failsafe when its
first packet crosses an attached interface in the rule's direction (`in`: ingress, `out`:
egress) with the rule's protocol and destination port, and its remote end (the source of an
`in` flow, the destination of an `out` one) is in the CIDR when one is given (else any
address of either family). Bad text: FailsafeError, saying which entry and why.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

DEFAULT_FAILSAFE: Final = "tcp:22:in,udp:68:in,udp:67:out,udp:53:out,tcp:53:out"
MAX_FAILSAFE: Final = 16  # entries the classifier holds (MS_MAX_FAILSAFE)
_PROTOCOLS: Final = {"tcp": 6, "udp": 17}
_DIRECTIONS: Final = ("in", "out")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class FailsafeError(ValueError):
    """A --failsafe list that cannot be used; the message names the entry."""


@dataclass(frozen=True)
class FailsafeRule:
    """One failsafe entry: `protocol` "tcp"/"udp", destination `port` (1..65535), `direction`
    "in"/"out", and the remote end's `cidr` (None: any)."""

    protocol: str
    port: int
    direction: str
    cidr: IPNetwork | None = None

    @property
    def proto_number(self) -> int:
        return _PROTOCOLS[self.protocol]

    def __str__(self) -> str:
        text = f"{self.protocol}:{self.port}:{self.direction}"
        return f"{text}@{self.cidr}" if self.cidr is not None else text


def parse_failsafe(text: str) -> tuple[FailsafeRule, ...]:
    """The entries of a --failsafe value; `none` (any case) gives none. FailsafeError."""
    text = text.strip()
    if text.lower() == "none":
        return ()
    if not text:
        raise FailsafeError(
            "the failsafe list is empty: give PROTO:PORT:in|out[@CIDR] entries, or `none`"
        )
    out: list[FailsafeRule] = []
    for raw in text.split(","):
        entry = _entry(raw.strip())
        if entry not in out:
            out.append(entry)
    if len(out) > MAX_FAILSAFE:
        raise FailsafeError(f"{len(out)} failsafe entries: at most {MAX_FAILSAFE}")
    return tuple(out)


def _entry(raw: str) -> FailsafeRule:
    where = f"failsafe entry {raw!r}"
    body, at, cidr_text = raw.partition("@")
    parts = body.split(":")
    if len(parts) != 3:
        raise FailsafeError(f"{where}: expected PROTO:PORT:in|out[@CIDR], e.g. tcp:22:in")
    proto, port_text, direction = (p.strip().lower() for p in parts)
    if proto not in _PROTOCOLS:
        raise FailsafeError(f"{where}: protocol {proto!r} is not tcp or udp")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise FailsafeError(f"{where}: port {port_text!r} is not an int 1..65535")
    if direction not in _DIRECTIONS:
        raise FailsafeError(f"{where}: direction {direction!r} is not in or out")
    cidr: IPNetwork | None = None
    if at:
        try:
            cidr = ipaddress.ip_network(cidr_text.strip(), strict=False)
        except ValueError:
            raise FailsafeError(
                f"{where}: {cidr_text!r} is not an IPv4 or IPv6 address or CIDR"
            ) from None
    return FailsafeRule(proto, int(port_text), direction, cidr)
