"""A microseg policy document rendered as nftables scripts: NL (linear) and NS (expert).

In: a policy document (the dict `bench.rulesets` makes and the agent accepts), the device to
hook, and which rule ids to mark (their packets are counted by the named counter `hit`; with
no marked rule the packets that fall through to the default action are). Out: the text of an
`nft -f` script creating one table `netdev <table>` on that device's ingress hook, and how
many rule evaluations / set lookups a packet falls through at most.

Both keep microseg's semantics for the packets they judge (ingress): the highest priority
wins, then deny before log before allow, then the lowest rule_id; `log` becomes `accept`
(nftables' `log` would write a kernel log line per packet, microseg reports a flow once).
ARP and IPv6 neighbour discovery always pass, as in microseg. Rules with direction `egress`
are left out: only the ingress hook is filtered (that is where the measured traffic's rules
judge it; replies leave unfiltered, where microseg's egress program does a session lookup).

- NL: one rule per microseg rule, in judging order, in one chain: what a straight translation
  gives. A packet walks the chain until a rule matches.
- NS: what an expert writes. Rules with the same match fields and prefix lengths (microseg's
  "shape") and the same priority and verdict go into one set keyed by a concatenation
  (`ip saddr . ip daddr . meta l4proto . th dport`), with `flags interval` where a field is
  a prefix or a range. Within one such group the elements are identical or disjoint, as nft's
  interval sets require. Sets are looked up tier by tier (priority descending; drop sets
  before accept sets within a tier), so first match still equals microseg's verdict; a verdict
  map on `meta protocol` jumps to the family's chain. A packet does one lookup per set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Doc = dict[str, Any]
HIT_COUNTER = "hit"
_ACTION_RANK = {"deny": 0, "log": 1, "allow": 2}
_VERDICT = {"deny": "drop", "log": "accept", "allow": "accept"}
_PROTOS = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "ipv6-icmp"}
_ND = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect"


class RenderError(ValueError):
    """The document holds something this renderer cannot express; the message says what."""


@dataclass(frozen=True)
class _Rule:
    """One rule reduced to what the ingress hook matches on."""

    rule_id: int
    family: int  # 4, 6, or 0 (no address: both families)
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    protos: tuple[str, ...]  # nft l4proto names; () = any protocol
    sport: tuple[int, int] | None
    dport: tuple[int, int] | None
    priority: int
    action: str

    @property
    def order(self) -> tuple[int, int, int]:
        return (-self.priority, _ACTION_RANK[self.action], self.rule_id)


def _net(text: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if text in (None, "any"):
        return None
    return ipaddress.ip_network(str(text), strict=False)


def _ports(value: Any) -> tuple[int, int] | None:
    if value in (None, 0):
        return None
    if isinstance(value, int):
        return (value, value)
    lo, _, hi = str(value).partition("-")
    return (int(lo), int(hi or lo))


def _rules(doc: Doc) -> list[_Rule]:
    """The document's ingress rules in judging order (RenderError for what cannot be said)."""
    out: list[_Rule] = []
    for r in doc.get("policies", []):
        if r.get("direction", "any") == "egress":
            continue
        src, dst = _net(r.get("src_ip")), _net(r.get("dst_ip"))
        fams = {n.version for n in (src, dst) if n is not None}
        if len(fams) > 1:
            raise RenderError(f"rule {r['rule_id']}: addresses of two families")
        family = fams.pop() if fams else 0
        sport, dport = _ports(r.get("src_port")), _ports(r.get("dst_port"))
        proto = r["protocol"]
        if proto == "any":
            protos: tuple[str, ...] = ("tcp", "udp") if sport or dport else ()
        elif proto in _PROTOS:
            protos = (_PROTOS[proto],)
        else:
            raise RenderError(f"rule {r['rule_id']}: protocol {proto!r}")
        out.append(
            _Rule(
                int(r["rule_id"]), family, src, dst, protos, sport, dport,
                int(r.get("priority", 100)), str(r["action"]),
            )
        )  # fmt: skip
    out.sort(key=lambda x: x.order)
    return out


def _pfx(fam: int) -> str:
    return "ip" if fam == 4 else "ip6"


def _span(p: tuple[int, int]) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}-{p[1]}"


def _header(table: str, device: str, default_action: str) -> list[str]:
    policy = "drop" if default_action == "deny" else "accept"
    return [
        f"table netdev {table} {{",
        f"  counter {HIT_COUNTER} {{ }}",
        "  chain ingress {",
        f'    type filter hook ingress device "{device}" priority 0; policy {policy};',
        "    meta protocol arp accept",
        f"    icmpv6 type {{ {_ND} }} accept",
    ]


def _counter(marked: bool) -> str:
    return f'counter name "{HIT_COUNTER}"' if marked else "counter"


@dataclass
class Rendered:
    """An `nft -f` script and the most rule evaluations or set lookups a packet makes."""

    script: str
    rules: int  # nft rules carrying the policy (NL: one per ingress rule; NS: one per set)
    max_steps: dict[int, int] = field(default_factory=dict)  # per family


def render_linear(doc: Doc, table: str, device: str, marked: Iterable[int] = ()) -> Rendered:
    """NL: one nft rule per ingress rule, in judging order, then the default."""
    mark = set(marked)
    rules = _rules(doc)
    lines = _header(table, device, doc.get("default_action", "allow"))
    for r in rules:
        m: list[str] = []
        if r.src is not None:
            m.append(f"{_pfx(r.family)} saddr {r.src.with_prefixlen}")
        if r.dst is not None:
            m.append(f"{_pfx(r.family)} daddr {r.dst.with_prefixlen}")
        if len(r.protos) == 1:
            m.append(f"meta l4proto {r.protos[0]}")
        elif r.protos:
            m.append(f"meta l4proto {{ {', '.join(r.protos)} }}")
        if r.sport:
            m.append(f"th sport {_span(r.sport)}")
        if r.dport:
            m.append(f"th dport {_span(r.dport)}")
        lines.append(f"    {' '.join(m)} {_counter(r.rule_id in mark)} {_VERDICT[r.action]}")
    if not mark:
        lines.append(f'    counter name "{HIT_COUNTER}"')
    lines += ["  }", "}", ""]
    steps = {
        fam: sum(1 for r in rules if r.family in (0, fam)) for fam in (4, 6)
    }  # fmt: skip
    return Rendered("\n".join(lines), len(rules), steps)


@dataclass
class _Group:
    """Rules sharing match fields, prefix lengths, port form, priority and verdict: one set."""

    family: int
    fields: tuple[str, ...]  # "saddr", "daddr", "l4proto", "sport", "dport"
    interval: bool
    priority: int
    verdict: str
    marked: bool
    elements: dict[str, None] = field(default_factory=dict)  # ordered, deduplicated


def _group_key(r: _Rule, fam: int, marked: bool) -> tuple[Any, ...]:
    def port_form(p: tuple[int, int] | None) -> str:
        return "-" if p is None else "1" if p[0] == p[1] else _span(p)

    return (
        fam,
        r.src.prefixlen if r.src is not None else None,
        r.dst.prefixlen if r.dst is not None else None,
        bool(r.protos),
        port_form(r.sport),
        port_form(r.dport),
        r.priority,
        _VERDICT[r.action],
        r.rule_id if marked else 0,
    )


def _addr(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    # A host is written as an address: a set without `flags interval` refuses prefixes.
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return net.with_prefixlen


def _elements(r: _Rule) -> list[str]:
    parts: list[list[str]] = []
    if r.src is not None:
        parts.append([_addr(r.src)])
    if r.dst is not None:
        parts.append([_addr(r.dst)])
    if r.protos:
        parts.append(list(r.protos))
    if r.sport:
        parts.append([_span(r.sport)])
    if r.dport:
        parts.append([_span(r.dport)])
    out = [""]
    for options in parts:
        out = [f"{o} . {x}" if o else x for o in out for x in options]
    return out


_TYPES = {
    "saddr4": "ipv4_addr", "daddr4": "ipv4_addr", "saddr6": "ipv6_addr", "daddr6": "ipv6_addr",
    "l4proto": "inet_proto", "sport": "inet_service", "dport": "inet_service",
}  # fmt: skip


def render_sets(doc: Doc, table: str, device: str, marked: Iterable[int] = ()) -> Rendered:
    """NS: per family a chain of set lookups, tier by tier; see the module docstring."""
    mark = set(marked)
    rules = _rules(doc)
    chains: dict[int, list[_Group]] = {4: [], 6: []}
    for fam in (4, 6):
        groups: dict[tuple[Any, ...], _Group] = {}
        for r in rules:
            if r.family not in (0, fam):
                continue
            key = _group_key(r, fam, r.rule_id in mark)
            g = groups.get(key)
            if g is None:
                fields = tuple(
                    name
                    for name, present in (
                        ("saddr", r.src is not None), ("daddr", r.dst is not None),
                        ("l4proto", bool(r.protos)), ("sport", r.sport is not None),
                        ("dport", r.dport is not None),
                    )
                    if present
                )  # fmt: skip
                full = 32 if fam == 4 else 128
                interval = any(n is not None and n.prefixlen < full for n in (r.src, r.dst)) or any(
                    p is not None and p[0] != p[1] for p in (r.sport, r.dport)
                )
                g = groups[key] = _Group(
                    fam, fields, interval, r.priority, _VERDICT[r.action], r.rule_id in mark
                )
            for e in _elements(r):
                # The first rule in judging order owns an element; a later identical key
                # (lower priority, or same priority and verdict) can never decide.
                g.elements.setdefault(e, None)
        ordered = sorted(
            groups.values(), key=lambda g: (-g.priority, g.verdict != "drop", not g.marked)
        )
        chains[fam] = [g for g in ordered if g.fields]
        # A rule with no field at all (protocol any, no address, no port) matches everything.
        chains[fam] += [g for g in ordered if not g.fields]
    lines = _header(table, device, doc.get("default_action", "allow"))
    lines.append("    meta protocol vmap { ip : jump v4, ip6 : jump v6 }")
    if not mark:
        lines.append(f'    counter name "{HIT_COUNTER}"')
    lines.append("  }")
    sets: list[str] = []
    nrules = 0
    for fam in (4, 6):
        lines.append(f"  chain v{fam} {{")
        for i, g in enumerate(chains[fam]):
            if not g.fields:
                lines.append(f"    {_counter(g.marked)} {g.verdict}")
                nrules += 1
                continue
            name = f"s{fam}_{i}"
            types = " . ".join(
                _TYPES[f + str(fam)] if f in ("saddr", "daddr") else _TYPES[f] for f in g.fields
            )
            flags = " flags interval;" if g.interval else ""
            sets.append(f"  set {name} {{ type {types};{flags}")
            elems = list(g.elements)
            for j in range(0, len(elems), 500):
                sets.append(f"    elements = {{ {', '.join(elems[j : j + 500])} }}")
            sets.append("  }")
            match = " . ".join(
                f"{_pfx(fam)} {f}"
                if f in ("saddr", "daddr")
                else "meta l4proto"
                if f == "l4proto"
                else f"th {f}"
                for f in g.fields
            )
            lines.append(f"    {match} @{name} {_counter(g.marked)} {g.verdict}")
            nrules += 1
        lines.append("  }")
    script = "\n".join(lines[:1] + sets + lines[1:]) + "\n}\n"
    steps = {fam: len(chains[fam]) for fam in (4, 6)}
    return Rendered(script, nrules, steps)
