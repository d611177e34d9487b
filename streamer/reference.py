"""The reference model of the classifier: SPEC §2 semantics in plain Python, no kernel.

The kernel classifier is tested against this packet by packet, so everything here is written
to be obviously correct rather than fast (linear scans, no indexes).

In: a `PolicySet` and packets, either as `Packet` tuples or as raw Ethernet frames
(`parse_frame` mirrors the kernel parser). Out: a `Decision` (verdict and deciding rule).
`StatefulReference` adds the session table: a flow's verdict is taken on its first packet and
shared by both directions, and re-taken (on the flow's original packet) after a policy change.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Literal

from streamer.policy import Action, DefaultAction, Direction, PolicySet, Protocol, Rule

__all__ = [
    "ETH_P_8021AD",
    "ETH_P_8021Q",
    "ETH_P_ARP",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "MAX_IPV6_EXT_HEADERS",
    "MAX_L4_OFFSET",
    "MAX_VLAN_TAGS",
    "Decision",
    "FlowKey",
    "Packet",
    "Session",
    "StatefulReference",
    "Verdict",
    "flow_key",
    "judge",
    "parse_frame",
    "rule_matches",
]

IPAddress = IPv4Address | IPv6Address
PacketDirection = Literal["ingress", "egress"]

ETH_P_IP: Final = 0x0800
ETH_P_ARP: Final = 0x0806
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
ETH_P_8021AD: Final = 0x88A8
MAX_VLAN_TAGS: Final = 2
MAX_IPV6_EXT_HEADERS: Final = 8
# The kernel parser gives up (DROP_PARSE) on an L4 header, or an IPv6 extension header, that
# starts further than this into the frame: its bounded loops need a bound.
MAX_L4_OFFSET: Final = 1024

IPPROTO_ICMP: Final = 1
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
IPPROTO_ICMPV6: Final = 58
# IPv6 extension headers the parser walks: hop-by-hop, routing, fragment, AH, dest. options.
IPV6_EXT_HOPOPTS: Final = 0
IPV6_EXT_ROUTING: Final = 43
IPV6_EXT_FRAGMENT: Final = 44
IPV6_EXT_AH: Final = 51
IPV6_EXT_DSTOPTS: Final = 60
IPV6_EXT_HEADERS: Final = frozenset(
    {IPV6_EXT_HOPOPTS, IPV6_EXT_ROUTING, IPV6_EXT_FRAGMENT, IPV6_EXT_AH, IPV6_EXT_DSTOPTS}
)

ICMP_ECHO_TYPES: Final = frozenset({0, 8})
ICMPV6_ECHO_TYPES: Final = frozenset({128, 129})
# Router solicitation/advertisement, neighbour solicitation/advertisement, redirect.
ICMPV6_ND_TYPES: Final = frozenset(range(133, 138))

_PORTED_PROTOCOLS: Final = frozenset({IPPROTO_TCP, IPPROTO_UDP})
_DIRECTIONS: Final = ("ingress", "egress")


class Verdict(IntEnum):
    """What happens to a packet. The numbers are shared with the kernel: do not change them."""

    ALLOW = 0
    DENY = 1
    LOG = 2
    PASS_L2 = 3  # ARP / IPv6 neighbour discovery: always passes, no policy
    DROP_PARSE = 4  # cannot be judged safely: dropped
    DROP_FRAGMENT = 5  # non-first fragment: dropped for now


_PASSING: Final = frozenset({Verdict.ALLOW, Verdict.LOG, Verdict.PASS_L2})
_ACTION_VERDICT: Final[dict[Action, Verdict]] = {
    Action.ALLOW: Verdict.ALLOW,
    Action.DENY: Verdict.DENY,
    Action.LOG: Verdict.LOG,
}
_DEFAULT_VERDICT: Final[dict[DefaultAction, Verdict]] = {
    DefaultAction.ALLOW: Verdict.ALLOW,
    DefaultAction.DENY: Verdict.DENY,
}


@dataclass(frozen=True, slots=True)
class Packet:
    """What the classifier sees of a packet: the 5-tuple, where and how it crosses.

    For ICMP/ICMPv6 echo request/reply both ports hold the echo identifier; for other
    non-TCP/UDP packets they are 0. `length` is the frame length in bytes.
    """

    family: int
    src: IPAddress
    dst: IPAddress
    proto: int
    sport: int = 0
    dport: int = 0
    direction: PacketDirection = "ingress"
    ifindex: int = 1
    length: int = 0
    tcp_flags: int = 0

    def __post_init__(self) -> None:
        # Catches test mistakes early: a Packet must be something the parser could produce.
        if self.family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {self.family!r}")
        if self.src.version != self.family or self.dst.version != self.family:
            raise ValueError(f"src {self.src} and dst {self.dst} must both be IPv{self.family}")
        if not 0 <= self.proto <= 255:
            raise ValueError(f"proto must be 0..255, not {self.proto}")
        if not (0 <= self.sport <= 0xFFFF and 0 <= self.dport <= 0xFFFF):
            raise ValueError(f"ports must be 0..65535, not {self.sport}, {self.dport}")
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"direction must be ingress or egress, not {self.direction!r}")

    @classmethod
    def of(
        cls,
        src: str | IPAddress,
        dst: str | IPAddress,
        proto: int | str = IPPROTO_TCP,
        sport: int = 0,
        dport: int = 0,
        direction: PacketDirection = "ingress",
        **kw: int,
    ) -> Packet:
        """A packet from address strings and a protocol number or name ("tcp", "icmpv6")."""
        src_addr = ipaddress.ip_address(src)
        dst_addr = ipaddress.ip_address(dst)
        if isinstance(proto, str):
            number = _PROTO_BY_NAME.get(proto.lower())
            if number is None:
                raise ValueError(f"unknown protocol name {proto!r}")
            proto = number
        return cls(src_addr.version, src_addr, dst_addr, proto, sport, dport, direction, **kw)

    def reply(self) -> Packet:
        """The same flow in the other direction (addresses and ports swapped)."""
        other: PacketDirection = "egress" if self.direction == "ingress" else "ingress"
        return Packet(
            self.family,
            self.dst,
            self.src,
            self.proto,
            self.dport,
            self.sport,
            other,
            self.ifindex,
            self.length,
            self.tcp_flags,
        )


_PROTO_BY_NAME: Final[dict[str, int]] = {
    Protocol.TCP.value: IPPROTO_TCP,
    Protocol.UDP.value: IPPROTO_UDP,
    Protocol.ICMP.value: IPPROTO_ICMP,
    Protocol.ICMPV6.value: IPPROTO_ICMPV6,
}


@dataclass(frozen=True)
class Decision:
    """A verdict and the rule that decided it (None: default action, or PASS_L2 / DROP_*)."""

    verdict: Verdict
    rule: Rule | None = None

    @property
    def passes(self) -> bool:
        """True when the packet goes on (ALLOW, LOG, PASS_L2)."""
        return self.verdict in _PASSING


def _port_ok(ports: tuple[int, int] | None, port: int) -> bool:
    return ports is None or ports[0] <= port <= ports[1]


def rule_matches(rule: Rule, pkt: Packet) -> bool:
    """True when every field of `rule` matches `pkt` (SPEC §2)."""
    if rule.direction is not Direction.ANY and rule.direction.value != pkt.direction:
        return False
    # icmp is only ICMP for IPv4, icmpv6 only for IPv6; "any" addresses match both families.
    if pkt.family not in rule.families:
        return False
    if rule.proto_number is not None and rule.proto_number != pkt.proto:
        return False
    if rule.src_net is not None and pkt.src not in rule.src_net:
        return False
    if rule.dst_net is not None and pkt.dst not in rule.dst_net:
        return False
    if rule.src_ports is not None or rule.dst_ports is not None:
        # A port condition is met only by TCP and UDP packets.
        if pkt.proto not in _PORTED_PROTOCOLS:
            return False
        if not (_port_ok(rule.src_ports, pkt.sport) and _port_ok(rule.dst_ports, pkt.dport)):
            return False
    return True


def judge(policy: PolicySet, pkt: Packet) -> Decision:
    """The stateless verdict: the best matching rule by `Rule.score`, else the default."""
    matching = [rule for rule in policy.policies if rule_matches(rule, pkt)]
    best = max(matching, key=lambda rule: rule.score, default=None)
    if best is None:
        return Decision(_DEFAULT_VERDICT[policy.default_action])
    return Decision(_ACTION_VERDICT[best.action], best)


FlowKey = tuple[int, int, int, tuple[tuple[IPAddress, int], tuple[IPAddress, int]]]


def flow_key(pkt: Packet) -> FlowKey:
    """A session key that is the same for both directions of a flow.

    (ifindex, family, proto, sorted pair of (address, port) endpoints).
    """
    a = (pkt.src, pkt.sport)
    b = (pkt.dst, pkt.dport)
    pair = (a, b) if a <= b else (b, a)
    return pkt.ifindex, pkt.family, pkt.proto, pair


@dataclass
class Session:
    """One flow in the session table."""

    origin: Packet  # the packet that created it: its direction and tuple are re-judged
    decision: Decision
    generation: int  # the policy generation `decision` was taken under
    packets: int = 0


@dataclass
class StatefulReference:
    """The reference classifier with its session table.

    A flow's verdict is taken on its first packet (either direction) and shared by every later
    packet of either direction. After `set_policy`, each session is judged again at its next
    packet, by the new set, on its original packet (original direction and tuple).
    """

    policy: PolicySet
    generation: int = 0
    sessions: dict[FlowKey, Session] = field(default_factory=dict)

    def set_policy(self, policy: PolicySet) -> None:
        """Replace the policy set; live sessions are re-judged lazily."""
        self.policy = policy
        self.generation += 1

    def clear_sessions(self) -> None:
        """Forget every session."""
        self.sessions.clear()

    def process(self, pkt: Packet) -> Decision:
        """The verdict for `pkt`, creating or refreshing its session."""
        key = flow_key(pkt)
        session = self.sessions.get(key)
        if session is None:
            session = Session(pkt, judge(self.policy, pkt), self.generation)
            self.sessions[key] = session
        elif session.generation != self.generation:
            session.decision = judge(self.policy, session.origin)
            session.generation = self.generation
        session.packets += 1
        return session.decision

    def process_frame(self, frame: bytes, direction: PacketDirection, ifindex: int = 1) -> Decision:
        """Parse a frame and process it; PASS_L2 / DROP_* frames create no session."""
        parsed = parse_frame(frame, direction, ifindex)
        if isinstance(parsed, Decision):
            return parsed
        return self.process(parsed)


_PASS_L2: Final = Decision(Verdict.PASS_L2)
_DROP_PARSE: Final = Decision(Verdict.DROP_PARSE)
_DROP_FRAGMENT: Final = Decision(Verdict.DROP_FRAGMENT)


def _u16(frame: bytes, offset: int) -> int:
    return (frame[offset] << 8) | frame[offset + 1]


def parse_frame(frame: bytes, direction: str, ifindex: int = 1) -> Packet | Decision:
    """Parse an Ethernet frame the way the kernel classifier does.

    Returns the Packet to judge, or a Decision when the frame is not judged by the policy:
    PASS_L2 (ARP, IPv6 neighbour discovery), DROP_PARSE (truncated, malformed, unknown
    ethertype, more than 2 VLAN tags or 8 IPv6 extension headers, headers reaching past
    MAX_L4_OFFSET), DROP_FRAGMENT (a non-first fragment). `length` is len(frame).
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    end = len(frame)
    if end < 14:
        return _DROP_PARSE
    ethertype = _u16(frame, 12)
    offset = 14
    tags = 0
    while ethertype in (ETH_P_8021Q, ETH_P_8021AD):
        if tags == MAX_VLAN_TAGS:
            return _DROP_PARSE
        if offset + 4 > end:
            return _DROP_PARSE
        ethertype = _u16(frame, offset + 2)  # after the 2-byte TCI
        offset += 4
        tags += 1
    if ethertype == ETH_P_ARP:
        return _PASS_L2

    src: IPAddress
    dst: IPAddress
    if ethertype == ETH_P_IP:
        family = 4
        if offset + 20 > end:
            return _DROP_PARSE
        if frame[offset] >> 4 != 4:
            return _DROP_PARSE
        header_len = (frame[offset] & 0x0F) * 4
        if header_len < 20 or offset + header_len > end:
            return _DROP_PARSE
        if _u16(frame, offset + 2) < header_len:
            return _DROP_PARSE
        if _u16(frame, offset + 6) & 0x1FFF:
            return _DROP_FRAGMENT  # MF with offset 0 is a first fragment: parsed on
        proto = frame[offset + 9]
        src = IPv4Address(frame[offset + 12 : offset + 16])
        dst = IPv4Address(frame[offset + 16 : offset + 20])
        offset += header_len
    elif ethertype == ETH_P_IPV6:
        family = 6
        if offset + 40 > end:
            return _DROP_PARSE
        if frame[offset] >> 4 != 6:
            return _DROP_PARSE
        proto = frame[offset + 6]
        src = IPv6Address(frame[offset + 8 : offset + 24])
        dst = IPv6Address(frame[offset + 24 : offset + 40])
        offset += 40
        walked = 0
        while proto in IPV6_EXT_HEADERS:
            if walked == MAX_IPV6_EXT_HEADERS:
                return _DROP_PARSE
            walked += 1
            if proto == IPV6_EXT_FRAGMENT:
                ext_len = 8
            else:
                if offset + 2 > end:
                    return _DROP_PARSE
                if proto == IPV6_EXT_AH:
                    ext_len = (frame[offset + 1] + 2) * 4
                else:
                    ext_len = (frame[offset + 1] + 1) * 8
            if offset + ext_len > end:
                return _DROP_PARSE
            if proto == IPV6_EXT_FRAGMENT and _u16(frame, offset + 2) >> 3:
                return _DROP_FRAGMENT
            proto = frame[offset]
            offset += ext_len
            if offset > MAX_L4_OFFSET:
                return _DROP_PARSE
    else:
        return _DROP_PARSE
    if offset > MAX_L4_OFFSET:
        return _DROP_PARSE

    sport = dport = tcp_flags = 0
    if proto == IPPROTO_TCP:
        if offset + 20 > end:
            return _DROP_PARSE
        sport, dport = _u16(frame, offset), _u16(frame, offset + 2)
        tcp_flags = frame[offset + 13]
    elif proto == IPPROTO_UDP:
        if offset + 8 > end:
            return _DROP_PARSE
        sport, dport = _u16(frame, offset), _u16(frame, offset + 2)
    elif (proto == IPPROTO_ICMP and family == 4) or (proto == IPPROTO_ICMPV6 and family == 6):
        # ICMP only in IPv4 and ICMPv6 only in IPv6: elsewhere they are just other protocols,
        # so an IPv4 packet cannot pass as neighbour discovery.
        if offset + 8 > end:
            return _DROP_PARSE
        icmp_type = frame[offset]
        if family == 6 and icmp_type in ICMPV6_ND_TYPES:
            return _PASS_L2
        if icmp_type in (ICMP_ECHO_TYPES if family == 4 else ICMPV6_ECHO_TYPES):
            sport = dport = _u16(frame, offset + 4)
    return Packet(
        family,
        src,
        dst,
        proto,
        sport,
        dport,
        "ingress" if direction == "ingress" else "egress",
        ifindex,
        end,
        tcp_flags,
    )
