"""Differential test: the kernel classifier against the reference model, packet by packet.

Seeded random rule sets (hundreds of rules: CIDRs of every prefix length in both families,
"any" and family-specific any, address groups on either end (members of both families, empty
groups, 0.0.0.0/0 and ::/0), exact ports and ranges, every protocol, direction and action,
priorities from a small set so ties are common, both default actions, rules of both modes:
staged ones beside enforce ones, or every rule staged under staged_all) with random failsafe
entries (in/out, TCP/UDP, any remote end or a CIDR of either family) and thousands of
packets, most aimed at rules or failsafe entries (addresses at and just beyond a CIDR's or a
member's ends, ports at and just beyond a range's ends), some random, many the reply or repeat
of an earlier flow. The policy changes midway (groups' members and rules' modes too), so live
sessions are judged again. Every packet's verdict (allow, deny, log, L2 pass, drops, read from
the kernel's counters) must equal `StatefulReference`'s, and at the end of each phase the
kernel's session table must equal the reference's (each flow's verdict, rule, staged verdict
and rule, and whether failsafe passed it), and so must the failsafe and staged counters, per
rule too.

The seed is random unless PYTEST_SEED is set; it is printed, and every failure names it.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from support.packets import ETH_P_8021Q, frame, hbh_ext

from streamer.datapath.bindings import test_run as bpf_test_run
from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.layout import TC_ACT_OK, TC_ACT_SHOT
from streamer.datapath.reference import (
    Decision,
    Packet,
    StatefulReference,
    Timeouts,
    Verdict,
    flow_key,
    rule_matches,
)
from streamer.policy.failsafe import FailsafeRule
from streamer.policy.model import PolicySet, Rule, parse_policy_document

N_RULES = 300
PHASES = (2600, 1800, 1200)  # packets per policy set: the set changes between phases
MAX_REPORTED = 5  # mismatches described in full
MAX_MISMATCHES = 60  # stop early: later ones mostly follow from the first

V4_ANCHORS = [
    int(ipaddress.IPv4Address(a))
    for a in (
        "10.0.0.0",
        "10.1.2.0",
        "192.168.1.0",
        "172.16.5.0",
        "203.0.113.0",
        "0.0.0.0",
        "255.255.255.0",
        "100.64.0.0",
    )
]
V6_ANCHORS = [
    int(ipaddress.IPv6Address(a))
    for a in (
        "2001:db8::",
        "2001:db8:1::",
        "fe80::",
        "::",
        "ffff::",
        "2001:db8::8000:0",
        "fd00:1:2:3::",
        "::ffff:10.0.0.0",
    )
]
PORT_ANCHORS = [0, 1, 22, 53, 80, 443, 1023, 1024, 8080, 32767, 32768, 65534, 65535]
PRIORITIES = [50, 100, 100, 200]
N_GROUPS = 6
GROUP_END_SHARE = 0.2  # of rules that name a group
MEMBER_PLENS = {4: (8, 16, 24, 31, 32), 6: (32, 48, 64, 127, 128)}
ND_TYPES = (133, 134, 135, 136, 137)
MLD_TYPES = (130, 131, 132, 143)  # pass like ND only from a link-local or unspecified source

# Verdicts as the kernel counts them, by counter name.
_COUNTER_VERDICT = {
    "allowed_packets": Verdict.ALLOW,
    "denied_packets": Verdict.DENY,
    "logged_packets": Verdict.LOG,
    "l2_passed": Verdict.PASS_L2,
    "parse_drops": Verdict.DROP_PARSE,
    "fragment_drops": Verdict.DROP_FRAGMENT,
}


def _seed() -> int:
    env = os.environ.get("PYTEST_SEED")
    if env:
        return int(env, 0)
    return random.SystemRandom().randrange(2**32)


def _ip(value: int, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value)


@dataclass(frozen=True)
class Spec:
    """A frame to send: the packet as the frame builder takes it, plus what it needs."""

    pkt: Packet
    payload: bytes = b""
    icmp_type: int | None = None
    vlan: int | None = None
    ext: bool = False

    def frame(self) -> bytes:
        return frame(
            self.pkt,
            payload=self.payload,
            icmp_type=self.icmp_type,
            vlans=[(ETH_P_8021Q, self.vlan)] if self.vlan is not None else (),
            ext=[hbh_ext()] if self.ext else (),
        )

    def reply(self) -> Spec:
        t = self.icmp_type
        if t is not None:
            t = {8: 0, 0: 8, 128: 129, 129: 128}.get(t, t)
        return replace(self, pkt=self.pkt.reply(), icmp_type=t)


class Generator:
    """Random rules, policy sets, failsafe entries and packets from one seeded RNG."""

    def __init__(self, rng: random.Random, priorities: list[int], staged_share: float) -> None:
        self.rng = rng
        self.priorities = priorities
        self.staged_share = staged_share
        # Prefix lengths are dealt from a shuffled deck per family: every length turns up.
        self.decks: dict[int, list[int]] = {4: [], 6: []}
        self.used_ids: set[int] = set()
        self.groups: dict[str, list[str]] = {}

    # -- rules ---------------------------------------------------------------------------------

    def _plen(self, family: int) -> int:
        deck = self.decks[family]
        if not deck:
            deck.extend(range(33 if family == 4 else 129))
            self.rng.shuffle(deck)
        return deck.pop()

    def _address(self, family: int) -> int:
        bits = 32 if family == 4 else 128
        base = self.rng.choice(V4_ANCHORS if family == 4 else V6_ANCHORS)
        k = self.rng.choice([0, 4, 8, 16, 24, bits // 2, bits])
        return base ^ self.rng.getrandbits(k) if k else base

    def _cidr(self, family: int, plen: int | None = None) -> str:
        bits = 32 if family == 4 else 128
        plen = self._plen(family) if plen is None else plen
        value = self._address(family)
        value = value >> (bits - plen) << (bits - plen) if plen < bits else value
        return f"{_ip(value, family)}/{plen}"

    def _address_spec(self, family: int) -> str:
        if family == 0:
            return "any"
        r = self.rng.random()
        if r < 0.08:
            return "any"
        if r < 0.13:
            return "0.0.0.0/0" if family == 4 else "::/0"
        return self._cidr(family)

    def _member(self) -> str:
        r = self.rng.random()
        if r < 0.03:
            return self.rng.choice(["0.0.0.0/0", "::/0"])
        # Few prefix lengths: each member multiplies its rules' shapes by the other end's.
        family = self.rng.choice([4, 6])
        plens = MEMBER_PLENS[family]
        return self._cidr(family, self.rng.choice(plens))

    def _group_members(self) -> list[str]:
        if self.rng.random() < 0.15:
            return []  # an empty group: its rules match nothing
        return [self._member() for _ in range(self.rng.choice([1, 1, 2, 3, 5, 8]))]

    def _groups(self) -> dict[str, list[str]]:
        return {f"g{i}": self._group_members() for i in range(N_GROUPS)}

    def _ends(self, rule: dict[str, Any], family: int) -> None:
        """Make some rules name groups on one end or both. The other end of such a rule is
        then any address (of its family, if it has one), and its ports exact: members
        multiply a rule's shapes by the other end's prefix lengths and port blocks, and the
        classifier has 512 shapes per family."""
        rng = self.rng
        if rng.random() >= GROUP_END_SHARE:
            return
        for field in ("src_port", "dst_port"):
            port = rule.get(field)
            if isinstance(port, str):
                rule[field] = int(port.partition("-")[0]) or 1
        ends = rng.choice([("src",), ("dst",), ("src", "dst")])
        for end in ("src", "dst"):
            if end in ends:
                rule[f"{end}_ip"] = "any"
                rule[f"{end}_group"] = rng.choice(sorted(self.groups))
            else:
                rule[f"{end}_ip"] = {0: "any", 4: "0.0.0.0/0", 6: "::/0"}[family]

    def _port(self) -> int:
        if self.rng.random() < 0.7:
            return self.rng.choice(PORT_ANCHORS)
        return self.rng.randint(0, 65535)

    def _port_spec(self, ranged: bool) -> int | str:
        if not ranged:
            return self._port() or 1
        lo = self._port()
        hi = min(65535, lo + self.rng.randint(0, self.rng.choice([1, 3, 100, 5000, 65535])))
        return f"{lo}-{hi}"

    def rule_id(self) -> int:
        while True:
            rid = self.rng.choice([self.rng.randint(1, 1000), self.rng.randint(1, 2**32 - 1)])
            if rid not in self.used_ids:
                self.used_ids.add(rid)
                return rid

    def rule(self) -> dict[str, Any]:
        rng = self.rng
        family = rng.choice([0, 4, 4, 4, 4, 6, 6, 6, 6, 6])
        r = rng.random()
        if r < 0.3:
            protocol = "tcp"
        elif r < 0.55:
            protocol = "udp"
        elif r < 0.8:
            protocol = "any"
        else:
            protocol = {4: "icmp", 6: "icmpv6", 0: rng.choice(["icmp", "icmpv6"])}[family]
        rule: dict[str, Any] = {
            "rule_id": self.rule_id(),
            "src_ip": self._address_spec(family),
            "dst_ip": self._address_spec(family),
            "protocol": protocol,
            "action": rng.choice(["allow", "deny", "log"]),
            "priority": rng.choice(self.priorities),
            "direction": rng.choice(["ingress", "egress", "any"]),
        }
        if rng.random() < self.staged_share:
            rule["mode"] = "staged"
        if protocol in ("tcp", "udp", "any"):
            ranged = False  # at most one range a rule: ranges multiply into shapes
            for field in ("src_port", "dst_port"):
                x = rng.random()
                if x < 0.55:
                    continue
                want_range = x >= 0.85 and not ranged
                rule[field] = self._port_spec(want_range)
                ranged = ranged or want_range
            # A rule of no address, protocol or port would shadow everything below it.
            wild = family == 0 and protocol == "any"
            if wild and "src_port" not in rule and "dst_port" not in rule:
                rule["dst_port"] = self._port_spec(rng.random() < 0.5)
        self._ends(rule, family)
        return rule

    def _document(self, default: str, rules: list[dict[str, Any]]) -> PolicySet:
        return parse_policy_document(
            {
                "default_action": default,
                "groups": {n: {"members": m} for n, m in self.groups.items()},
                "policies": rules,
            }
        )

    def policy(self, n: int) -> PolicySet:
        self.used_ids.clear()
        self.groups = self._groups()
        return self._document(self.rng.choice(["allow", "deny"]), [self.rule() for _ in range(n)])

    def mutate(self, pol: PolicySet) -> PolicySet:
        """Keep most rules (some with another action or priority), drop some, add some."""
        rng = self.rng
        self.used_ids = {r.rule_id for r in pol.policies}
        rules: list[dict[str, Any]] = []
        for r in pol.policies:
            x = rng.random()
            if x < 0.15:
                continue
            doc = r.to_api()
            if x < 0.3:
                doc["action"] = rng.choice(["allow", "deny", "log"])
            elif x < 0.4:
                doc["priority"] = rng.choice(self.priorities)
            elif x < 0.5 and self.staged_share:
                # promoted, or staged again
                doc["mode"] = "enforce" if r.staged else "staged"
            rules.append(doc)
        # Groups change members (a rule using one is re-judged without being rewritten).
        for name, members in self.groups.items():
            x = rng.random()
            if x < 0.2:
                self.groups[name] = [*members, self._member()]
            elif x < 0.35 and members:
                self.groups[name] = members[1:]
            elif x < 0.45:
                self.groups[name] = self._group_members()
        rules += [self.rule() for _ in range(len(pol.policies) // 4)]
        default = pol.default_action.value
        if rng.random() < 0.5:
            default = "deny" if default == "allow" else "allow"
        return self._document(default, rules)

    # -- failsafe entries ----------------------------------------------------------------------

    def failsafe(self) -> tuple[FailsafeRule, ...]:
        """A few entries: ports the rules and packets use too, in and out, TCP and UDP, any
        remote end or a CIDR of either family."""
        rng = self.rng
        out: list[FailsafeRule] = []
        for _ in range(rng.choice([0, 1, 3, 5, 8])):
            cidr = None
            if rng.random() < 0.6:
                family = rng.choice([4, 6])
                plen = rng.choice([0, 8, 16, 24, 32] if family == 4 else [0, 32, 64, 128])
                cidr = ipaddress.ip_network(self._cidr(family, plen))
            entry = FailsafeRule(
                rng.choice(["tcp", "udp"]),
                rng.choice([22, 53, 67, 68, 80, 443, 8080]),
                rng.choice(["in", "out"]),
                cidr,
            )
            if entry not in out:
                out.append(entry)
        return tuple(out)

    def packet_for_failsafe(self, entry: FailsafeRule) -> Spec:
        """A first packet aimed at a failsafe entry (or just beside it)."""
        rng = self.rng
        net = entry.cidr
        family = net.version if net is not None else rng.choice([4, 6])
        remote = self._inside(net, family) if net is not None else self._address(family)
        local = self._address(family)
        inbound = entry.direction == "in"
        if rng.random() < 0.1:
            inbound = not inbound
        src, dst = (remote, local) if inbound else (local, remote)
        proto = entry.proto_number if rng.random() < 0.9 else rng.choice([6, 17])
        dport = entry.port if rng.random() < 0.85 else self._port()
        sport = self._port()
        return self._spec(family, src, dst, proto, sport, dport, "ingress" if inbound else "egress")

    # -- packets -------------------------------------------------------------------------------

    def _inside(self, net: Any, family: int) -> int:
        first, last = int(net.network_address), int(net.broadcast_address)
        top = 2 ** (32 if family == 4 else 128) - 1
        r = self.rng.random()
        if r < 0.2:
            return first
        if r < 0.4:
            return last
        if r < 0.5 and first > 0:
            return first - 1  # just outside
        if r < 0.6 and last < top:
            return last + 1
        return self.rng.randint(first, last)

    def _packet_port(self, ports: tuple[int, int] | None) -> int:
        if ports is None or self.rng.random() < 0.1:
            return self._port()
        lo, hi = ports
        edges = [lo, hi, lo, hi, lo - 1, hi + 1, lo + 1, hi - 1, self.rng.randint(lo, hi)]
        return min(65535, max(0, self.rng.choice(edges)))

    def _spec(
        self, family: int, src: int, dst: int, proto: int, sport: int, dport: int, direction: str
    ) -> Spec:
        rng = self.rng
        vlan = rng.randint(1, 4094) if rng.random() < 0.1 else None
        ext = family == 6 and rng.random() < 0.05
        a, b = _ip(src, family), _ip(dst, family)
        dirn: Any = direction
        if proto in (6, 17):
            flags = rng.choice([0x02, 0x12, 0x10, 0x18, 0x11, 0x04]) if proto == 6 else 0
            return Spec(
                Packet(family, a, b, proto, sport, dport, dirn, tcp_flags=flags), vlan=vlan, ext=ext
            )
        own_icmp = (family == 4 and proto == 1) or (family == 6 and proto == 58)
        if own_icmp:
            r = rng.random()
            if r < 0.7:  # echo: the identifier is both "ports"
                ident = sport
                t = rng.choice([8, 0] if family == 4 else [128, 129])
                return Spec(
                    Packet(family, a, b, proto, ident, ident, dirn), icmp_type=t, vlan=vlan, ext=ext
                )
            if family == 6 and r < 0.75:
                t = rng.choice(ND_TYPES + MLD_TYPES)
                return Spec(
                    Packet(family, a, b, proto, 0, 0, dirn),
                    icmp_type=t,
                    payload=bytes(16),
                    vlan=vlan,
                    ext=ext,
                )
            t = rng.choice([3, 11] if family == 4 else [1, 2, 3, 4])
            return Spec(
                Packet(family, a, b, proto, 0, 0, dirn),
                icmp_type=t,
                payload=bytes(28),
                vlan=vlan,
                ext=ext,
            )
        # Other protocols (GRE, SCTP, the other family's ICMP): no ports, raw payload whose
        # first byte may look like an ICMP type the parser must not read.
        first = rng.choice([0, 8, 128, 135, 136, rng.randrange(256)])
        payload = bytes([first]) + bytes(rng.choice([0, 3, 7, 15]))
        return Spec(Packet(family, a, b, proto, 0, 0, dirn), payload=payload, vlan=vlan, ext=ext)

    def _proto(self, family: int, rule: Rule | None) -> int:
        rng = self.rng
        if rule is not None and rule.proto_number is not None and rng.random() < 0.9:
            return rule.proto_number
        if rule is not None and (rule.src_ports or rule.dst_ports) and rng.random() < 0.8:
            return rng.choice([6, 17])
        own = 1 if family == 4 else 58
        other = 58 if family == 4 else 1
        return rng.choice([6, 6, 17, 17, own, own, 47, 132, other])

    def _end_net(self, net: Any, group: str | None, family: int) -> Any:
        """What a packet aimed at a rule end should fall into (or just miss): the end's
        network, or a member of its group of this family; None: anything."""
        if group is not None:
            members = [
                m for m in map(ipaddress.ip_network, self.groups[group]) if m.version == family
            ]
            return self.rng.choice(members) if members else None
        return net if net is not None and net.version == family else None

    def packet_for(self, rule: Rule) -> Spec:
        rng = self.rng
        fams = sorted(rule.families)
        family = rng.choice(fams)
        nets = [
            self._end_net(rule.src_net, rule.src_group, family),
            self._end_net(rule.dst_net, rule.dst_group, family),
        ]
        addrs = [self._inside(n, family) if n is not None else self._address(family) for n in nets]
        proto = self._proto(family, rule)
        sport = self._packet_port(rule.src_ports)
        dport = self._packet_port(rule.dst_ports)
        direction = rule.direction.value
        if direction == "any" or rng.random() < 0.1:
            direction = rng.choice(["ingress", "egress"])
        return self._spec(family, addrs[0], addrs[1], proto, sport, dport, direction)

    def random_packet(self) -> Spec:
        rng = self.rng
        family = rng.choice([4, 6])
        bits = 32 if family == 4 else 128
        src = self._address(family) if rng.random() < 0.7 else rng.getrandbits(bits)
        dst = self._address(family) if rng.random() < 0.7 else rng.getrandbits(bits)
        return self._spec(
            family,
            src,
            dst,
            self._proto(family, None),
            self._port(),
            self._port(),
            rng.choice(["ingress", "egress"]),
        )


# -- the kernel side ------------------------------------------------------------------------


class Kernel:
    """Sends frames through the classifier and reads each one's verdict from the counters."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.fds = {d: prog_fd(dp, d) for d in ("ingress", "egress")}
        self.last = dp.counters()

    def send(self, data: bytes, direction: str) -> tuple[int, Verdict | None]:
        rc = bpf_test_run(self.fds[direction], data)[0]
        now = self.dp.counters()
        changed = [v for name, v in _COUNTER_VERDICT.items() if now[name] != self.last[name]]
        self.last = now
        return rc, changed[0] if len(changed) == 1 else None


def _kernel_sessions(dp: Datapath) -> dict[Any, tuple[Any, ...]]:
    out = {}
    for s in dp.sessions():
        src, dst = ipaddress.ip_address(s.src_ip), ipaddress.ip_address(s.dst_ip)
        pkt = Packet(
            s.family,
            src,
            dst,
            s.protocol,
            s.src_port,
            s.dst_port,
            "ingress" if s.direction == "ingress" else "egress",
            s.ifindex,
        )
        out[flow_key(pkt)] = (
            s.verdict,
            s.rule_id,
            s.direction,
            s.src_ip,
            s.src_port,
            s.staged_verdict,
            s.staged_rule_id,
            s.failsafe,
        )
    return out


def _reference_sessions(ref: StatefulReference) -> dict[Any, tuple[Any, ...]]:
    out = {}
    for key, sess in ref.sessions.items():
        rule = sess.decision.rule
        o = sess.origin
        d = sess.decision
        out[key] = (
            d.verdict.name.lower(),
            rule.rule_id if rule else None,
            o.direction,
            str(o.src),
            o.sport,
            d.staged.name.lower() if d.staged is not None else None,
            (d.staged_rule_id or None) if d.staged is not None else None,
            d.failsafe,
        )
    return out


_FLOW_COUNTERS = ("failsafe_passed", "failsafe_flows", "staged_flows")


def _staged_counters(dp: Datapath, rule_ids: list[int]) -> dict[int, tuple[int, int, int]]:
    """The kernel's staged counters of these rules (0: the default's slot)."""
    out = {}
    for rid in rule_ids:
        c = dp.default_counters() if rid == 0 else dp.rule_counters(rid)
        out[rid] = (c.staged_packets, c.staged_bytes, c.staged_flows)
    return out


# -- reporting --------------------------------------------------------------------------------


def _rules_matching(pol: PolicySet, pkt: Packet) -> list[str]:
    hits = sorted(
        (r for r in pol.policies if rule_matches(r, pkt, pol.groups)), key=lambda r: -r.score
    )
    lines = [f"    {r.to_api()}" for r in hits[:8]]
    if len(hits) > 8:
        lines.append(f"    ... {len(hits) - 8} more")
    return lines or ["    (none: the default action)"]


def _describe(
    seed: int,
    where: str,
    spec: Spec,
    data: bytes,
    kernel: tuple[int, Any],
    want: Decision,
    session_origin: Packet | None,
    pol: PolicySet,
    dp: Datapath,
) -> str:
    parsed = spec.pkt
    ksess = _kernel_sessions(dp).get(flow_key(parsed))
    if ksess is None:
        kernel_line = "  kernel session: none"
    else:
        rule = pol.get(ksess[1]) if ksess[1] is not None else None
        kernel_line = (
            f"  kernel session: verdict {ksess[0]}, rule {ksess[1]}, first packet "
            f"{ksess[2]} from {ksess[3]} port {ksess[4]}"
            + (f"\n    that rule: {rule.to_api()}" if rule is not None else "")
        )
    lines = [
        f"seed {seed} ({where}): kernel rc={kernel[0]} verdict={kernel[1]!r}, "
        f"reference {want.verdict!r} by rule {want.rule.rule_id if want.rule else None}",
        f"  packet: {parsed}",
        f"  frame: {data.hex()}",
        kernel_line,
        f"  default_action: {pol.default_action.value}",
        f"  groups: {pol.to_api()['groups']}",
        "  rules matching this packet, best first:",
        *_rules_matching(pol, parsed),
    ]
    if session_origin is not None and session_origin != parsed:
        lines += [
            f"  reference session origin: {session_origin}",
            "  rules matching the origin, best first:",
            *_rules_matching(pol, session_origin),
        ]
    return "\n".join(lines)


# -- the test ----------------------------------------------------------------------------------


def _run_differential(
    dp: Datapath,
    seed: int,
    priorities: list[int],
    phases: tuple[int, ...],
    staged_share: float = 0.0,
) -> None:
    rng = random.Random(seed)
    gen = Generator(rng, priorities, staged_share)
    staged_all = dp.config.staged_all
    pol = gen.policy(N_RULES)
    failsafe = gen.failsafe()
    dp.set_failsafe(failsafe)
    dp.apply(compile_policy(pol, dp.config.max_shapes, staged_all))
    dp.clear_sessions()
    ref = StatefulReference(pol, failsafe=failsafe, staged_all=staged_all)
    kernel = Kernel(dp)
    base = dp.counters()
    flows: list[Spec] = []
    mismatches: list[str] = []
    count = 0
    sent = 0
    for phase, n in enumerate(phases):
        if phase:
            pol = gen.mutate(pol)
            dp.apply(compile_policy(pol, dp.config.max_shapes, staged_all))
            ref.set_policy(pol)
        rules = pol.policies
        watched = [0, *(r.rule_id for r in rules)]
        k_staged0 = _staged_counters(dp, watched)
        r_staged0 = {rid: tuple(c) for rid, c in ref.staged.items()}
        for i in range(n):
            r = rng.random()
            if flows and r < (0.25 if phase == 0 else 0.5):
                spec = rng.choice(flows)
                if rng.random() < 0.6:
                    spec = spec.reply()
            elif failsafe and r < 0.6 and rng.random() < 0.2:
                spec = gen.packet_for_failsafe(rng.choice(failsafe))
            elif r < 0.85 and rules:
                spec = gen.packet_for(rng.choice(rules))
            else:
                spec = gen.random_packet()
            data = spec.frame()
            direction = spec.pkt.direction
            existing = ref.sessions.get(flow_key(spec.pkt))
            want = ref.process_frame(data, direction)
            got = kernel.send(data, direction)
            sent += 1
            if len(flows) < 4000:
                flows.append(spec)
            want_rc = TC_ACT_OK if want.passes else TC_ACT_SHOT
            if got != (want_rc, want.verdict):
                count += 1
                if len(mismatches) < MAX_REPORTED:
                    origin = existing.origin if existing is not None else None
                    mismatches.append(
                        _describe(
                            seed,
                            f"phase {phase}, packet {i}",
                            spec,
                            data,
                            got,
                            want,
                            origin,
                            pol,
                            dp,
                        )
                    )
                if count >= MAX_MISMATCHES:
                    break
        if count:
            break
        # the whole session table, as the kernel and the reference hold it
        ks, rs = _kernel_sessions(dp), _reference_sessions(ref)
        if ks != rs:
            only_k = [f"    {k}: {ks[k]}" for k in list(set(ks) - set(rs))[:5]]
            only_r = [f"    {k}: {rs[k]}" for k in list(set(rs) - set(ks))[:5]]
            differ = [
                f"    {k}: kernel {ks[k]} reference {rs[k]}"
                for k in list(set(ks) & set(rs))
                if ks[k] != rs[k]
            ][:5]
            pytest.fail(
                f"seed {seed}: after phase {phase} the session tables differ "
                f"({len(ks)} kernel, {len(rs)} reference)\n  only in the kernel:\n"
                + "\n".join(only_k)
                + "\n  only in the reference:\n"
                + "\n".join(only_r)
                + "\n  different:\n"
                + "\n".join(differ)
                + f"\n  reproduce: PYTEST_SEED={seed}",
                pytrace=False,
            )
        now = dp.counters()
        flow_diffs = {
            name: (now[name] - base[name], ref.counters[name])
            for name in _FLOW_COUNTERS
            if now[name] - base[name] != ref.counters[name]
        }
        k_staged = _staged_counters(dp, watched)
        staged_diffs = {}
        for rid in watched:
            model = ref.staged.get(rid, [0, 0, 0])
            start = r_staged0.get(rid, (0, 0, 0))
            want = tuple(m - s0 for m, s0 in zip(model, start, strict=True))
            got = tuple(k - k0 for k, k0 in zip(k_staged[rid], k_staged0[rid], strict=True))
            if got != want:
                staged_diffs[rid] = (got, want)
        if flow_diffs or staged_diffs:
            pytest.fail(
                f"seed {seed}: after phase {phase} the counters differ (kernel, reference):"
                f" {flow_diffs}; staged (packets, bytes, flows) by rule:"
                f" {dict(list(staged_diffs.items())[:8])}\n  reproduce: PYTEST_SEED={seed}",
                pytrace=False,
            )
    dp.clear_sessions()
    dp.set_failsafe(dp.config.failsafe)
    # the run did exercise what it was given
    if staged_share or staged_all:
        assert ref.counters["staged_flows"] > 0, f"seed {seed}: no flow had a staged verdict"
    if failsafe:
        assert ref.counters["failsafe_flows"] > 0, f"seed {seed}: no failsafe flow"
    if count:
        pytest.fail(
            f"seed {seed}: {count} of {sent} packets judged differently by the kernel and the "
            f"reference (stopped at {MAX_MISMATCHES}); reproduce with PYTEST_SEED={seed}\n\n"
            + "\n\n".join(mismatches),
            pytrace=False,
        )
    assert sent == sum(phases)


@pytest.fixture
def long_timeouts(datapath: Datapath) -> Iterator[Datapath]:
    """The shared datapath with timeouts nothing reaches during a run (the model here has no
    clock: a slow run must not see a UDP flow expire in the kernel alone)."""
    datapath.set_timeouts(Timeouts.uniform(864_000.0))
    try:
        yield datapath
    finally:
        datapath.set_timeouts(datapath.config.timeouts)


def test_kernel_matches_reference(long_timeouts: Datapath) -> None:
    seed = _seed()
    print(f"differential seed: {seed} (PYTEST_SEED={seed} to repeat)")
    _run_differential(long_timeouts, seed, PRIORITIES, PHASES)


def test_kernel_matches_reference_staged(long_timeouts: Datapath) -> None:
    """A third of the rules staged (and modes changing between phases): both views."""
    seed = _seed()
    print(f"differential seed (staged): {seed} (PYTEST_SEED={seed} to repeat)")
    _run_differential(long_timeouts, seed, PRIORITIES, PHASES, staged_share=0.35)


def test_kernel_matches_reference_staged_all(staged_datapath: Datapath) -> None:
    """--policy-mode staged: every rule staged, the enforced default allow."""
    seed = _seed()
    print(f"differential seed (staged_all): {seed} (PYTEST_SEED={seed} to repeat)")
    staged_datapath.set_timeouts(Timeouts.uniform(864_000.0))
    try:
        _run_differential(staged_datapath, seed, PRIORITIES, (1500, 1000), staged_share=0.2)
    finally:
        staged_datapath.set_timeouts(staged_datapath.config.timeouts)


def test_kernel_matches_reference_all_tied(long_timeouts: Datapath) -> None:
    """Every rule at one priority: action rank and rule_id decide everything."""
    seed = _seed()
    print(f"differential seed (all tied): {seed} (PYTEST_SEED={seed} to repeat)")
    _run_differential(long_timeouts, seed, [100], (900, 600))
