"""The words every part of microseg uses for what the classifier decides, in one place.

Policies, events, the API, the CLI and the metrics name actions, verdicts, directions and
protocols with these values; the kernel's numeric codes for them live in the datapath's layout
module (held against bpf/classifier.h by a test). Parsing is case-insensitive ("TCP" -> tcp).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Final


class LowerEnum(StrEnum):
    """A string enum that also accepts its values in any letter case ("TCP" -> tcp)."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if isinstance(value, str):
            lowered = value.lower()
            for member in cls:
                if member.value == lowered:
                    return member
        return None


class Action(LowerEnum):
    """What a rule does with the flows it matches; also a flow's verdict."""

    ALLOW = "allow"
    DENY = "deny"
    LOG = "log"


class DefaultAction(LowerEnum):
    """What happens to a flow no rule matches."""

    ALLOW = "allow"
    DENY = "deny"


class Direction(LowerEnum):
    """A rule's direction, as the packet crosses the attached interface."""

    INGRESS = "ingress"
    EGRESS = "egress"
    ANY = "any"


class Mode(LowerEnum):
    """A rule's mode (and an agent's --policy-mode): `staged` rules are judged like any but
    decide nothing; the flow's staged verdict says what they would have done."""

    ENFORCE = "enforce"
    STAGED = "staged"


class Protocol(LowerEnum):
    """A rule's protocol."""

    TCP = "tcp"
    UDP = "udp"
    ICMP = "icmp"
    ICMPV6 = "icmpv6"
    ANY = "any"


# A flow's verdict: the action that decided it.
VERDICTS: Final = tuple(a.value for a in Action)
# A packet's direction (a packet has one; a rule may say "any").
PACKET_DIRECTIONS: Final = (Direction.INGRESS.value, Direction.EGRESS.value)
# IP protocol numbers of the named protocols (`any` has none).
PROTOCOL_NUMBERS: Final[dict[str, int]] = {
    Protocol.TCP.value: 6,
    Protocol.UDP.value: 17,
    Protocol.ICMP.value: 1,
    Protocol.ICMPV6.value: 58,
}
PROTOCOL_NAMES: Final[dict[int, str]] = {n: name for name, n in PROTOCOL_NUMBERS.items()}
