"""The reference model of the classifier: contract §2 (and §5, address groups; §6, staged
rules and failsafe traffic) semantics in plain Python, no kernel.

The kernel classifier is tested against this packet by packet, so everything here is written
to be obviously correct rather than fast (linear scans, no indexes).

In: a `PolicySet` and packets, either as `Packet` tuples or as raw Ethernet frames
(`parse_frame` mirrors the kernel parser), and the failsafe entries. Out: a `Decision`
(verdict and deciding rule; the staged view's verdict and rule where it differs; whether a
failsafe entry passed the flow).
`StatefulReference` adds the session table: a flow's verdict is taken on its first packet and
shared by both directions, and re-taken (on the flow's original packet) after a policy change.
It also models what the kernel keeps beside the verdicts: the TCP state machine and idle
timeouts per session (an expired entry, or a SYN on a finished connection, starts a new flow),
a table of fixed capacity (full: new flows are judged on every packet, not cached),
remembered first fragments (later ones follow them), related ICMP errors, and the kernel's
state counters under the same names (`StatefulReference.counters`), with the per-rule staged
counters (`StatefulReference.staged`).
"""

from __future__ import annotations

import ipaddress
import weakref
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from ipaddress import IPv4Address, IPv6Address
from typing import Final, Literal

from streamer.datapath.layout import (
    MS_ALLOW,
    MS_DENY,
    MS_DROP_FRAGMENT,
    MS_DROP_PARSE,
    MS_DROP_PRESSURE,
    MS_LOG,
    MS_PASS_L2,
    MS_PASS_RELATED,
    MS_TCP_CLOSE_WAIT,
    MS_TCP_CLOSED,
    MS_TCP_ESTABLISHED,
    MS_TCP_FIN_WAIT,
    MS_TCP_LAST_ACK,
    MS_TCP_NONE,
    MS_TCP_SYN_RECV,
    MS_TCP_SYN_SENT,
    MS_TCP_TIME_WAIT,
    MS_TO_FRAGMENT,
    MS_TO_ICMP,
    MS_TO_MAX,
    MS_TO_OTHER,
    MS_TO_UDP,
    MS_TO_UDP_STREAM,
)
from streamer.policy.failsafe import FailsafeRule
from streamer.policy.model import Group, IPNet, PolicySet, Rule
from streamer.vocabulary import PACKET_DIRECTIONS, Action, DefaultAction, Direction, Protocol

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
    "Timeouts",
    "Verdict",
    "failsafe_matches",
    "flow_key",
    "judge",
    "parse_frame",
    "rule_matches",
    "tcp_next",
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
# Errors that quote a packet: destination unreachable (incl. "fragmentation needed"), time
# exceeded; for ICMPv6 also packet too big.
ICMP_ERROR_TYPES: Final = frozenset({3, 11})
ICMPV6_ERROR_TYPES: Final = frozenset({1, 2, 3})
# Router solicitation/advertisement, neighbour solicitation/advertisement, redirect.
ICMPV6_ND_TYPES: Final = frozenset(range(133, 138))
# Multicast listener query, report (v1), done, report (v2): pass like ND when link-scoped.
ICMPV6_MLD_TYPES: Final = frozenset({130, 131, 132, 143})

_PORTED_PROTOCOLS: Final = frozenset({IPPROTO_TCP, IPPROTO_UDP})
_DIRECTIONS: Final = PACKET_DIRECTIONS


class Verdict(IntEnum):
    """What happens to a packet, under the kernel's numbers (MS_* in the layout)."""

    ALLOW = MS_ALLOW
    DENY = MS_DENY
    LOG = MS_LOG
    PASS_L2 = MS_PASS_L2  # ARP / IPv6 neighbour discovery / link-local MLD: always passes
    DROP_PARSE = MS_DROP_PARSE  # cannot be judged safely: dropped
    DROP_FRAGMENT = MS_DROP_FRAGMENT  # a fragment with no remembered first, overlapping, tiny
    PASS_RELATED = MS_PASS_RELATED  # an ICMP error quoting a packet of a live allowed flow
    DROP_PRESSURE = MS_DROP_PRESSURE  # a kernel resource failed (never produced by the model)


_PASSING: Final = frozenset({Verdict.ALLOW, Verdict.LOG, Verdict.PASS_L2, Verdict.PASS_RELATED})
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
    """A verdict and the rule that decided it (None: default action, or PASS_L2 / DROP_*).

    `staged`: the staged view's verdict where it differs from the enforced one (None: the
    views agree), `staged_rule` its rule (None: its default, or the views agree); `failsafe`:
    a failsafe entry passed the flow (verdict allow, no rule, no staged verdict)."""

    verdict: Verdict
    rule: Rule | None = None
    staged: Verdict | None = None
    staged_rule: Rule | None = None
    failsafe: bool = False

    @property
    def staged_rule_id(self) -> int:
        """The staged rule's id as the kernel holds it (0: none, or the default)."""
        return self.staged_rule.rule_id if self.staged_rule is not None else 0

    @property
    def reported(self) -> bool:
        """Events report the flow: either view does not simply allow it."""
        return self.verdict is not Verdict.ALLOW or self.staged not in (None, Verdict.ALLOW)

    @property
    def passes(self) -> bool:
        """True when the packet goes on (ALLOW, LOG, PASS_L2)."""
        return self.verdict in _PASSING


def _port_ok(ports: tuple[int, int] | None, port: int) -> bool:
    return ports is None or ports[0] <= port <= ports[1]


class _GroupIndex:
    """A group's members by (IP version, prefix length): the sets of their network values."""

    def __init__(self, group: Group) -> None:
        self.nets: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for _text, version, value, plen in group.addrs():
            self.nets[version].setdefault(plen, set()).add(value)

    def holds(self, addr: IPAddress) -> bool:
        bits = addr.max_prefixlen
        value = int(addr)
        for plen, values in self.nets[addr.version].items():
            host_bits = bits - plen
            if (value >> host_bits) << host_bits in values:
                return True
        return False


# Each group's index while the group lives (a dry run judges every live session by the set):
# by id, as a group of a million members is slow to hash.
_GROUP_INDEXES: dict[int, tuple[weakref.ref[Group], _GroupIndex]] = {}


def in_group(group: Group, addr: IPAddress) -> bool:
    """True when `addr` is in any member of `group` (an empty group holds no address)."""
    key = id(group)
    hit = _GROUP_INDEXES.get(key)
    if hit is None or hit[0]() is not group:
        index = _GroupIndex(group)
        ref = weakref.ref(group, lambda _ref: _GROUP_INDEXES.pop(key, None))
        _GROUP_INDEXES[key] = hit = (ref, index)
    return hit[1].holds(addr)


def _end_matches(
    name: str | None, net: IPNet | None, addr: IPAddress, groups: Mapping[str, Group], rule: Rule
) -> bool:
    if name is not None:
        group = groups.get(name)
        if group is None:
            raise ValueError(f"rule {rule.rule_id} names group {name!r}, not among the groups")
        return in_group(group, addr)
    return net is None or addr in net


def rule_matches(rule: Rule, pkt: Packet, groups: Mapping[str, Group] | None = None) -> bool:
    """True when every field of `rule` matches `pkt` (docs/contract.md §2); a group end
    (§5) matches an address in any of the group's members, found in `groups` (the policy
    set's)."""
    groups = {} if groups is None else groups
    if rule.direction is not Direction.ANY and rule.direction.value != pkt.direction:
        return False
    # icmp is only ICMP for IPv4, icmpv6 only for IPv6; "any" addresses match both families.
    if pkt.family not in rule.families:
        return False
    if rule.proto_number is not None and rule.proto_number != pkt.proto:
        return False
    if not _end_matches(rule.src_group, rule.src_net, pkt.src, groups, rule):
        return False
    if not _end_matches(rule.dst_group, rule.dst_net, pkt.dst, groups, rule):
        return False
    if rule.src_ports is not None or rule.dst_ports is not None:
        # A port condition is met only by TCP and UDP packets.
        if pkt.proto not in _PORTED_PROTOCOLS:
            return False
        if not (_port_ok(rule.src_ports, pkt.sport) and _port_ok(rule.dst_ports, pkt.dport)):
            return False
    return True


def failsafe_matches(entry: FailsafeRule, pkt: Packet) -> bool:
    """True when `pkt`, as a flow's first packet, is failsafe traffic by `entry` (contract
    §6): its direction (in: ingress, out: egress), protocol and destination port, and the
    remote end (in: the source, out: the destination) in the entry's CIDR if it has one."""
    inbound = entry.direction == "in"
    if pkt.direction != ("ingress" if inbound else "egress"):
        return False
    if pkt.proto != entry.proto_number or pkt.dport != entry.port:
        return False
    if entry.cidr is None:
        return True
    remote = pkt.src if inbound else pkt.dst
    return remote.version == entry.cidr.version and remote in entry.cidr


def judge(
    policy: PolicySet,
    pkt: Packet,
    failsafe: tuple[FailsafeRule, ...] | list[FailsafeRule] = (),
    staged_all: bool = False,
) -> Decision:
    """The stateless verdict of a flow's first packet: failsafe traffic passes before any
    rule; else the enforced view decides (the best matching enforce-mode rule by
    `Rule.score`, else the default) and the staged view (the best matching rule of either
    mode, else the default) is told where it differs: where its winner is a staged rule, or
    both defaults decide and differ. `staged_all` (--policy-mode staged): every rule is
    staged and the enforced default is allow."""
    if any(failsafe_matches(f, pkt) for f in failsafe):
        return Decision(Verdict.ALLOW, failsafe=True)
    matching = [rule for rule in policy.policies if rule_matches(rule, pkt, policy.groups)]
    best = max(matching, key=lambda rule: rule.score, default=None)
    default = _DEFAULT_VERDICT[policy.default_action]
    enforced_default = Verdict.ALLOW if staged_all else default
    if best is None:
        if enforced_default != default:
            return Decision(enforced_default, staged=default)
        return Decision(default)
    if not (staged_all or best.staged):
        return Decision(_ACTION_VERDICT[best.action], best)
    enforced = [r for r in matching if not (staged_all or r.staged)]
    e_best = max(enforced, key=lambda rule: rule.score, default=None)
    verdict = enforced_default if e_best is None else _ACTION_VERDICT[e_best.action]
    return Decision(verdict, e_best, staged=_ACTION_VERDICT[best.action], staged_rule=best)


TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
TCP_ACK: Final = 0x10


def tcp_next(state: int, d: int, flags: int, fins: int) -> tuple[int, int]:
    """The TCP state machine: (state, fins) after a packet with `flags` from side `d` (0: the
    flow's originator, 1: the responder). `fins` bits: 1 originator sent FIN, 2 responder
    sent FIN, 4 the first FIN was the responder's. RST closes at once; a SYN/ACK answers a
    SYN; the originator's ACK establishes; FIN, then the other side's ACK (CLOSE_WAIT), its
    FIN (LAST_ACK) and the last ACK (TIME_WAIT). Mirrors tcp_next in bpf/classifier.c."""
    if flags & TCP_RST:
        return MS_TCP_CLOSED, fins
    if flags & TCP_SYN:
        if flags & TCP_ACK:
            if state == MS_TCP_NONE or (state == MS_TCP_SYN_SENT and d == 1):
                return MS_TCP_SYN_RECV, fins
            return state, fins
        return (MS_TCP_SYN_SENT if state == MS_TCP_NONE else state), fins
    if flags & TCP_FIN:
        if state >= MS_TCP_TIME_WAIT:
            return state, fins
        if not fins & 3:
            fins |= 4 if d else 0
        fins |= 2 if d else 1
        if fins & 3 == 3:
            return MS_TCP_LAST_ACK, fins
        return (MS_TCP_CLOSE_WAIT if state == MS_TCP_CLOSE_WAIT else MS_TCP_FIN_WAIT), fins
    if flags & TCP_ACK:
        first_fin = 1 if fins & 4 else 0
        if state == MS_TCP_NONE or (state == MS_TCP_SYN_RECV and d == 0):
            return MS_TCP_ESTABLISHED, fins
        if state == MS_TCP_FIN_WAIT and d != first_fin:
            return MS_TCP_CLOSE_WAIT, fins
        if state == MS_TCP_LAST_ACK and d == first_fin:
            return MS_TCP_TIME_WAIT, fins
    return state, fins


def _half_open(state: int) -> bool:
    return state in (MS_TCP_SYN_SENT, MS_TCP_SYN_RECV)


@dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds (defaults: Linux conntrack's). A session idle for longer than
    its class allows is over: the reaper removes it, and its next packet starts a new flow.
    A TCP session without a state yet (its packets carried no SYN, ACK, FIN or RST) uses
    `tcp_syn_sent`; `fragment` is how long a first fragment's ports are remembered."""

    tcp_syn_sent: float = 120.0
    tcp_syn_recv: float = 60.0
    tcp_established: float = 432000.0
    tcp_fin_wait: float = 120.0
    tcp_close_wait: float = 60.0
    tcp_last_ack: float = 30.0
    tcp_time_wait: float = 120.0
    tcp_close: float = 10.0
    udp: float = 30.0
    udp_stream: float = 120.0  # a UDP flow that has seen a reply
    icmp: float = 30.0
    other: float = 600.0
    fragment: float = 30.0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not (isinstance(value, int | float) and 0 < value <= 10 * 365 * 86400):
                raise ValueError(
                    f"timeout {name} must be a number of seconds above 0 (at most ten years),"
                    f" not {value!r}"
                )

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """Every timeout the same (tests)."""
        return cls(*([seconds] * 13))

    def by_class_ns(self) -> list[int]:
        """The MS_TO_MAX timeouts in ns, indexed by timeout class (TCP states, then MS_TO_*)."""
        s = [
            self.tcp_syn_sent,
            self.tcp_syn_sent,
            self.tcp_syn_recv,
            self.tcp_established,
            self.tcp_fin_wait,
            self.tcp_close_wait,
            self.tcp_last_ack,
            self.tcp_time_wait,
            self.tcp_close,
            self.udp,
            self.udp_stream,
            self.icmp,
            self.other,
            self.fragment,
        ]
        return [int(x * 1e9) for x in s] + [int(self.other * 1e9)] * (MS_TO_MAX - len(s))


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
    first_seen: int = 0  # ns, on the caller's clock
    last_seen: int = 0
    replies: int = 0  # packets from the responder
    tcp_state: int = MS_TCP_NONE
    fins: int = 0
    tclass: int = 0  # timeout class

    def side(self, pkt: Packet) -> int:
        """0 when `pkt` goes the way the flow's first packet went, 1 for a reply."""
        return 0 if (pkt.src, pkt.sport) == (self.origin.src, self.origin.sport) else 1


@dataclass(frozen=True)
class _FragEntry:
    first_seen: int
    proto: int
    sport: int
    dport: int
    l4_end: int


@dataclass(frozen=True)
class Dissected:
    """What the parser found in a frame beyond its Packet: fragment and ICMP-error details.

    `frag` 0 none, 1 first fragment, 2 later fragment (its `packet` has ports 0 and the
    fragment key's protocol); `frag_key` (family, protocol, id); `frag_off` a later fragment's
    offset in bytes, or a first fragment's L4 header end from its fragmentable part's start;
    `quoted` the tuple an ICMP error quotes (family, proto, src, dst, sport, dport) when it
    can be read and goes back to the quoted packet's sender."""

    packet: Packet
    frag: int = 0
    frag_key: tuple[int, int, int] | None = None
    frag_off: int = 0
    icmp_err: bool = False
    quoted: Packet | None = None


@dataclass
class StatefulReference:
    """The reference classifier with its session table.

    A flow's verdict is taken on its first packet (either direction) and shared by every later
    packet of either direction. After `set_policy`, each session is judged again at its next
    packet, by the new set, on its original packet (original direction and tuple).
    `capacity` (None: unbounded) is the kernel table's size: when it is full a new flow's
    packet is judged alone and nothing is recorded. `now` arguments are ns on any clock that
    only moves forward; `timeouts` decides when sessions and remembered fragments expire.
    """

    policy: PolicySet
    generation: int = 0
    sessions: dict[FlowKey, Session] = field(default_factory=dict)
    capacity: int | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    frags: dict[tuple[object, ...], _FragEntry] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    failsafe: tuple[FailsafeRule, ...] = ()
    staged_all: bool = False
    # per staged rule (0: the staged view's default): [packets, bytes, flows] it would have
    # decided where the views differed, as the kernel's staged_* rule counters
    staged: dict[int, list[int]] = field(default_factory=dict)

    def _judge(self, pkt: Packet) -> Decision:
        return judge(self.policy, pkt, self.failsafe, self.staged_all)

    def _entered(self, new: Decision, old: Decision | None) -> None:
        """Count a flow newly judged (old None) or judged again into failsafe or into a
        staged difference of another rule, as the kernel does."""
        if new.failsafe and (old is None or not old.failsafe):
            self.counters["failsafe_flows"] += 1
        if new.staged is not None and (
            old is None or old.staged is None or old.staged_rule_id != new.staged_rule_id
        ):
            self.counters["staged_flows"] += 1
            self.staged.setdefault(new.staged_rule_id, [0, 0, 0])[2] += 1

    def _count_packet(self, d: Decision, pkt: Packet) -> None:
        if d.failsafe:
            self.counters["failsafe_passed"] += 1
        elif d.staged is not None:
            c = self.staged.setdefault(d.staged_rule_id, [0, 0, 0])
            c[0] += 1
            c[1] += pkt.length

    def set_policy(self, policy: PolicySet) -> None:
        """Replace the policy set; live sessions are re-judged lazily."""
        self.policy = policy
        self.generation += 1

    def clear_sessions(self) -> None:
        """Forget every session."""
        self.sessions.clear()

    def _expired(self, s: Session, now: int) -> bool:
        limit = self.timeouts.by_class_ns()[s.tclass]
        return now > s.last_seen and now - s.last_seen > limit

    def expire(self, now: int) -> tuple[int, int]:
        """What the reaper does at `now`: remove expired sessions and fragments; returns
        (open sessions removed, finished ones removed)."""
        gone = [k for k, s in self.sessions.items() if self._expired(s, now)]
        closed = sum(1 for k in gone if self.sessions[k].tcp_state >= MS_TCP_TIME_WAIT)
        for k in gone:
            del self.sessions[k]
        limit = self.timeouts.by_class_ns()[MS_TO_FRAGMENT]
        for fk in [
            k for k, f in self.frags.items() if now > f.first_seen and now - f.first_seen > limit
        ]:
            del self.frags[fk]
        return len(gone) - closed, closed

    def _account(self, s: Session, pkt: Packet, now: int) -> list[str]:
        """One packet on its session: counts, state, timeout class; the counters of the state
        transitions it made (for the caller to add)."""
        d = s.side(pkt)
        s.packets += 1
        if d:
            s.replies += 1
        s.last_seen = now
        out: list[str] = []
        if pkt.proto == IPPROTO_TCP:
            old = s.tcp_state
            s.tcp_state, s.fins = tcp_next(old, d, pkt.tcp_flags, s.fins)
            s.tclass = s.tcp_state
            new = s.tcp_state
            if _half_open(new) and not _half_open(old):
                out.append("half_open_opened")
            if _half_open(old) and not _half_open(new):
                out.append("half_open_left")
            if new >= MS_TCP_TIME_WAIT > old:
                out.append("closed_sessions")
        elif pkt.proto == IPPROTO_UDP:
            s.tclass = MS_TO_UDP_STREAM if s.replies else MS_TO_UDP
        elif pkt.proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            s.tclass = MS_TO_ICMP
        else:
            s.tclass = MS_TO_OTHER
        return out

    def process(self, pkt: Packet, now: int = 0) -> Decision:
        """The verdict for `pkt`, creating, refreshing or renewing its session."""
        key = flow_key(pkt)
        session = self.sessions.get(key)
        renew = 0
        if session is not None:
            if self._expired(session, now):
                renew = 1
            elif (
                pkt.proto == IPPROTO_TCP
                and session.tcp_state >= MS_TCP_TIME_WAIT
                and pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
            ):
                renew = 2
        if session is not None and not renew:
            if session.generation != self.generation:
                old = session.decision
                session.decision = self._judge(session.origin)
                session.generation = self.generation
                self._entered(session.decision, old)
            self.counters.update(self._account(session, pkt, now))
            self._count_packet(session.decision, pkt)
            return session.decision
        decision = self._judge(pkt)
        self._entered(decision, None)
        self._count_packet(decision, pkt)
        new = Session(pkt, decision, self.generation, first_seen=now)
        transitions = self._account(new, pkt, now)
        if session is not None:
            del self.sessions[key]
            self.counters["renewed_expired" if renew == 1 else "renewed_closed"] += 1
            if _half_open(session.tcp_state):
                self.counters["half_open_left"] += 1
        if self.capacity is None or len(self.sessions) < self.capacity:
            self.sessions[key] = new
            self.counters["new_sessions"] += 1
            if pkt.proto == IPPROTO_TCP and pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
                self.counters["syn_new_sessions"] += 1
            self.counters.update(transitions)
        else:
            self.counters["session_create_failed"] += 1
        return decision

    def _related(self, quoted: Packet, now: int) -> bool:
        s = self.sessions.get(flow_key(quoted))
        return (
            s is not None
            and s.generation == self.generation
            and not self._expired(s, now)
            and s.decision.verdict in (Verdict.ALLOW, Verdict.LOG)
        )

    def _drop_fragment(self, reason: str) -> Decision:
        self.counters["fragment_drops"] += 1
        self.counters[reason] += 1
        return _DROP_FRAGMENT

    def process_frame(
        self, frame: bytes, direction: PacketDirection, ifindex: int = 1, now: int = 0
    ) -> Decision:
        """Parse a frame and process it as the kernel does; PASS_L2 / DROP_* / PASS_RELATED
        frames create no session."""
        d = dissect(frame, direction, ifindex)
        if isinstance(d, Decision):
            if d.verdict is Verdict.DROP_FRAGMENT:
                return self._drop_fragment("fragment_drops_tiny")
            return d
        pkt = d.packet
        icmp_err = d.icmp_err
        if d.frag:
            fkey = (ifindex, d.frag_key, pkt.src, pkt.dst)
            entry = self.frags.get(fkey)
            limit = self.timeouts.by_class_ns()[MS_TO_FRAGMENT]
            if d.frag == 2:
                if entry is None or (now > entry.first_seen and now - entry.first_seen > limit):
                    return self._drop_fragment("fragment_drops_no_first")
                if d.frag_off < entry.l4_end:
                    return self._drop_fragment("fragment_drops_overlap")
                pkt = replace(
                    pkt, proto=entry.proto, sport=entry.sport, dport=entry.dport, tcp_flags=0
                )
                self.counters["fragments_followed"] += 1
            else:
                # judged by its own header; its later fragments follow the newest first
                self.frags[fkey] = _FragEntry(now, pkt.proto, pkt.sport, pkt.dport, d.frag_off)
                self.counters["fragments_first" if entry is None else "fragments_replaced"] += 1
            icmp_err = False
        if icmp_err and d.quoted is not None and self._related(d.quoted, now):
            self.counters["related_passed"] += 1
            return _RELATED
        return self.process(pkt, now)


_PASS_L2: Final = Decision(Verdict.PASS_L2)
_DROP_PARSE: Final = Decision(Verdict.DROP_PARSE)
_DROP_FRAGMENT: Final = Decision(Verdict.DROP_FRAGMENT)
_RELATED: Final = Decision(Verdict.PASS_RELATED)


def _u16(frame: bytes, offset: int) -> int:
    return (frame[offset] << 8) | frame[offset + 1]


def parse_frame(frame: bytes, direction: str, ifindex: int = 1) -> Packet | Decision:
    """Parse an Ethernet frame the way the kernel classifier does, without state.

    Returns the Packet to judge, or a Decision when the frame is not judged by the policy:
    PASS_L2 (ARP, IPv6 neighbour discovery, link-local MLD), DROP_PARSE (truncated, malformed,
    unknown ethertype, more than 2 VLAN tags or 8 IPv6 extension headers, headers reaching past
    MAX_L4_OFFSET), DROP_FRAGMENT (a tiny first fragment, or a later fragment: whether that
    one passes depends on its first, which only `StatefulReference` remembers). A first
    fragment is returned as its Packet. `length` is len(frame).
    """
    d = dissect(frame, direction, ifindex)
    if isinstance(d, Decision):
        return d
    if d.frag == 2:
        return _DROP_FRAGMENT
    return d.packet


def _l4_min(family: int, proto: int) -> int:
    if proto == IPPROTO_TCP:
        return 20
    if proto == IPPROTO_UDP:
        return 8
    if (proto == IPPROTO_ICMP and family == 4) or (proto == IPPROTO_ICMPV6 and family == 6):
        return 8
    return 0


def _quoted(
    frame: bytes, off: int, family: int, outer_dst: IPAddress, ifindex: int
) -> Packet | None:
    """The packet an ICMP error at `off` quotes (inner IP header and 8 bytes of L4), if it
    can be read and the error goes back to its sender (mirrors `related` in the kernel)."""
    end = len(frame)
    off += 8
    src: IPAddress
    dst: IPAddress
    if family == 4:
        if off + 20 > end:
            return None
        ihl = frame[off] & 0x0F
        if frame[off] >> 4 != 4 or ihl < 5 or _u16(frame, off + 6) & 0x1FFF:
            return None
        proto = frame[off + 9]
        src = IPv4Address(frame[off + 12 : off + 16])
        dst = IPv4Address(frame[off + 16 : off + 20])
        off += ihl * 4
    else:
        if off + 40 > end:
            return None
        if frame[off] >> 4 != 6:
            return None
        proto = frame[off + 6]
        src = IPv6Address(frame[off + 8 : off + 24])
        dst = IPv6Address(frame[off + 24 : off + 40])
        off += 40
    if outer_dst != src:
        return None
    if off + 8 > end:
        return None
    sport = dport = 0
    if proto in _PORTED_PROTOCOLS:
        sport, dport = _u16(frame, off), _u16(frame, off + 2)
    elif (proto == IPPROTO_ICMP and family == 4 and frame[off] in ICMP_ECHO_TYPES) or (
        proto == IPPROTO_ICMPV6 and family == 6 and frame[off] in ICMPV6_ECHO_TYPES
    ):
        sport = dport = _u16(frame, off + 4)
    return Packet(family, src, dst, proto, sport, dport, ifindex=ifindex)


def dissect(frame: bytes, direction: str, ifindex: int = 1) -> Dissected | Decision:
    """Parse an Ethernet frame exactly as the kernel classifier does: the Packet and its
    fragment and ICMP-error details, or the Decision of a frame no policy judges (PASS_L2,
    DROP_PARSE, DROP_FRAGMENT for a first fragment too short for its L4 header)."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    pdir: PacketDirection = "ingress" if direction == "ingress" else "egress"
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
    frag = 0
    frag_key: tuple[int, int, int] | None = None
    frag_off = 0
    if ethertype == ETH_P_IP:
        family = 4
        if offset + 20 > end:
            return _DROP_PARSE
        if frame[offset] >> 4 != 4:
            return _DROP_PARSE
        header_len = (frame[offset] & 0x0F) * 4
        if header_len < 20 or offset + header_len > end:
            return _DROP_PARSE
        total = _u16(frame, offset + 2)
        if total < header_len:
            return _DROP_PARSE
        proto = frame[offset + 9]
        src = IPv4Address(frame[offset + 12 : offset + 16])
        dst = IPv4Address(frame[offset + 16 : offset + 20])
        fo = _u16(frame, offset + 6)
        if fo & 0x3FFF:  # MF or an offset: a fragment
            frag_key = (4, proto, _u16(frame, offset + 4))
            if fo & 0x1FFF:
                later = Packet(family, src, dst, proto, 0, 0, pdir, ifindex, end)
                return Dissected(later, 2, frag_key, (fo & 0x1FFF) * 8)
            frag = 1
        ip_end = offset + total
        frag_start = offset + header_len
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
        ip_end = offset + 40 + _u16(frame, offset + 4)
        frag_start = 0
        offset += 40
        walked = 0
        while proto in IPV6_EXT_HEADERS:
            if walked == MAX_IPV6_EXT_HEADERS:
                return _DROP_PARSE
            walked += 1
            if offset > MAX_L4_OFFSET:
                return _DROP_PARSE
            if offset + 8 > end:  # cut short: in a first fragment, a tiny one
                return _DROP_FRAGMENT if frag else _DROP_PARSE
            if proto == IPV6_EXT_FRAGMENT:
                ext_len = 8
                fo = _u16(frame, offset + 2)
                ident = int.from_bytes(frame[offset + 4 : offset + 8], "big")
                if fo & 0xFFF8:
                    key = (6, frame[offset], ident)
                    later = Packet(family, src, dst, frame[offset], 0, 0, pdir, ifindex, end)
                    return Dissected(later, 2, key, fo & 0xFFF8)
                if fo & 1:  # offset 0 with M: a first fragment (without M: atomic, whole)
                    frag = 1
                    frag_key = (6, frame[offset], ident)
                    frag_start = offset + 8
            elif proto == IPV6_EXT_AH:
                ext_len = (frame[offset + 1] + 2) * 4
            else:
                ext_len = (frame[offset + 1] + 1) * 8
            proto = frame[offset]
            offset += ext_len
            if offset > MAX_L4_OFFSET:
                return _DROP_PARSE
            if offset > end:
                return _DROP_FRAGMENT if frag else _DROP_PARSE
    else:
        return _DROP_PARSE
    if offset > MAX_L4_OFFSET:
        return _DROP_PARSE

    sport = dport = tcp_flags = 0
    icmp_err = False
    quoted: Packet | None = None
    # An L4 header cut short by the frame's end: in a first fragment, a tiny fragment.
    short = _DROP_FRAGMENT if frag else _DROP_PARSE
    if proto == IPPROTO_TCP:
        if offset + 20 > end:
            return short
        sport, dport = _u16(frame, offset), _u16(frame, offset + 2)
        tcp_flags = frame[offset + 13]
    elif proto == IPPROTO_UDP:
        if offset + 8 > end:
            return short
        sport, dport = _u16(frame, offset), _u16(frame, offset + 2)
    elif (proto == IPPROTO_ICMP and family == 4) or (proto == IPPROTO_ICMPV6 and family == 6):
        # ICMP only in IPv4 and ICMPv6 only in IPv6: elsewhere they are just other protocols,
        # so an IPv4 packet cannot pass as neighbour discovery.
        if offset + 8 > end:
            return short
        icmp_type = frame[offset]
        if family == 6 and icmp_type in ICMPV6_ND_TYPES:
            return _PASS_L2
        if (
            family == 6
            and icmp_type in ICMPV6_MLD_TYPES
            and (src.is_link_local or src.is_unspecified)
        ):
            return _PASS_L2
        if icmp_type in (ICMP_ECHO_TYPES if family == 4 else ICMPV6_ECHO_TYPES):
            sport = dport = _u16(frame, offset + 4)
        elif icmp_type in (ICMP_ERROR_TYPES if family == 4 else ICMPV6_ERROR_TYPES):
            icmp_err = True
            quoted = _quoted(frame, offset, family, dst, ifindex)
    if frag == 1:
        need = _l4_min(family, proto)
        if offset + need > ip_end:
            return _DROP_FRAGMENT  # a tiny first fragment: its L4 header is not all there
        frag_off = offset - frag_start + need
    pkt = Packet(family, src, dst, proto, sport, dport, pdir, ifindex, end, tcp_flags)
    return Dissected(pkt, frag, frag_key, frag_off, icmp_err, quoted)
