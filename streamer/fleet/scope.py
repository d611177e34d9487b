"""One host's share of a fleet policy (docs/contract.md §5, §7).

In: a fleet policy set (parsed with `fleet=True`: rules may carry a `hosts` selector, groups a
`select`), this host (`FleetHost`: name, labels, addresses) and the live fleet (every agent's
last status). Out: the host's local `PolicySet` (what its classifier enforces), plain: the
rules whose `hosts` select this host, without `hosts`; every label group resolved to its
members plus the addresses of every live host its `select` matches, without `select`. Rules for
other hosts are dropped. Also the rule_ids a host with given labels would run (per-host dry
runs) and the resolved label groups (for display).

Cheap on purpose (a fleet change re-scopes at once): rules and groups are not validated again;
a rule for every host is kept as it is, a host-scoped one copied with its match data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from streamer.policy.labels import check_host_name, check_labels, selector_matches
from streamer.policy.model import Group, PolicySet, parse_address

__all__ = [
    "MAX_HOST_ADDRESSES",
    "FleetHost",
    "rules_for_host",
    "scope_policy",
    "select_hosts",
    "select_members",
]

# An agent's status names the addresses of its attached interfaces: a few, rarely more than a
# handful; the bound keeps one bad record from growing every select group of the fleet.
MAX_HOST_ADDRESSES: Final = 1024


@dataclass(frozen=True)
class FleetHost:
    """An agent of the fleet as its status names it: host name, labels, and the canonical
    host addresses of its attached interfaces ("10.0.0.2", "fd00::2"; no CIDRs). Build it with
    `parse` from untrusted input; equal by all fields, hashed by name and addresses."""

    name: str
    labels: Mapping[str, str] = field(hash=False)
    addresses: tuple[str, ...]

    @classmethod
    def parse(cls, name: Any, labels: Any, addresses: Any) -> FleetHost:
        """A FleetHost from a status record's fields (or the agent's own flags): the name
        (1..253 characters, DNS-like), labels (streamer.policy.labels), addresses (a list of
        IPv4/IPv6 addresses, canonicalized, duplicates dropped, at most MAX_HOST_ADDRESSES).
        ValueError with every problem, a line each."""
        problems: list[str] = []
        try:
            name = check_host_name(name)
        except ValueError as exc:
            problems.append(f"host: {exc}")
        try:
            labels = check_labels(labels, "labels")
        except ValueError as exc:
            problems.extend(str(exc).split("\n"))
        try:
            addresses = _host_addresses(addresses)
        except ValueError as exc:
            problems.extend(str(exc).split("\n"))
        if problems:
            raise ValueError("\n".join(problems))
        return cls(name, labels, addresses)


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _host_addresses(values: Any) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)):
        raise ValueError("addresses: expected a list of IPv4/IPv6 addresses")
    if len(values) > MAX_HOST_ADDRESSES:
        raise ValueError(f"addresses: {len(values)}: at most {MAX_HOST_ADDRESSES} are allowed")
    out: dict[str, None] = {}
    problems: list[str] = []
    for index, text in enumerate(values):
        if text.__class__ is not str:
            problems.append(f"addresses[{index}]: {_show(text)} is not a string: use an IP address")
            continue
        try:
            canonical, version, _, _ = parse_address(text)
        except ValueError as exc:
            problems.append(f"addresses[{index}]: {exc}")
            continue
        if not version or "/" in text:
            problems.append(
                f"addresses[{index}]: {_show(text)} is not a host address: use an IPv4 or IPv6 "
                "address, without a prefix length"
            )
            continue
        out[canonical] = None
    if problems:
        raise ValueError("\n".join(problems[:20]))
    return tuple(out)


def _fleet_with(me: FleetHost, hosts: Iterable[FleetHost]) -> list[FleetHost]:
    """The live fleet with `me` in it once: this host's own view of itself wins over a status
    record of the same name (which may be older)."""
    return [me, *(host for host in hosts if host.name != me.name)]


def _resolve(group: Group, fleet: list[FleetHost]) -> tuple[str, ...]:
    """A label group's members: its own, then every matching host's addresses, each once."""
    selector = group.select
    members = dict.fromkeys(group.members)
    if selector is not None:
        for host in fleet:
            if selector_matches(selector, host.labels):
                members.update(dict.fromkeys(host.addresses))
    return tuple(members)


def scope_policy(fleet_policy: PolicySet, me: FleetHost, hosts: Iterable[FleetHost]) -> PolicySet:
    """The local policy set of host `me` under `fleet_policy`, given the live fleet `hosts`
    (which should hold `me`; it counts either way, as `me` says).

    Kept: every rule without `hosts`, and every rule whose `hosts` matches me.labels (its
    hosts removed); the other rules are dropped. A group with `select` gets as members its own
    plus the addresses of every matching host, deduplicated, and loses `select`; the other
    groups and the default action are kept. The result is a plain local set (no hosts, no
    select), built without validating again.
    """
    labels = me.labels
    fleet = _fleet_with(me, hosts)
    # Rules share a few selectors: each is matched once.
    verdicts: dict[frozenset[tuple[str, str]], bool] = {}
    policies = []
    for rule in fleet_policy.policies:
        selector = rule.__dict__["hosts"]
        if selector is None:
            policies.append(rule)
            continue
        key = frozenset(selector.items())
        selected = verdicts.get(key)
        if selected is None:
            selected = verdicts[key] = selector_matches(selector, labels)
        if selected:
            policies.append(rule.without_hosts())
    groups = {
        name: group
        if group.select is None
        else Group.model_construct(members=_resolve(group, fleet))
        for name, group in fleet_policy.groups.items()
    }
    return PolicySet.model_construct(
        default_action=fleet_policy.default_action, groups=groups, policies=policies
    )


def rules_for_host(fleet_policy: PolicySet, labels: Mapping[str, str]) -> list[int]:
    """The rule_ids (set order) that apply on a host with `labels`: those without `hosts`
    and those whose `hosts` matches."""
    return [
        rule.rule_id
        for rule in fleet_policy.policies
        if rule.hosts is None or selector_matches(rule.hosts, labels)
    ]


def select_members(fleet_policy: PolicySet, hosts: Iterable[FleetHost]) -> dict[str, list[str]]:
    """Every label group's name -> its resolved members (its own, then the matching hosts'
    addresses, each once), as scope_policy gives them; groups without select are left out."""
    fleet = list(hosts)
    return {
        name: list(_resolve(group, fleet))
        for name, group in fleet_policy.groups.items()
        if group.select is not None
    }


def select_hosts(fleet_policy: PolicySet, hosts: Iterable[FleetHost]) -> dict[str, list[str]]:
    """Every label group's name -> the names of the hosts its select matches (in the order
    given); groups without select are left out."""
    fleet = list(hosts)
    out: dict[str, list[str]] = {}
    for name, group in fleet_policy.groups.items():
        selector = group.select
        if selector is not None:
            out[name] = [h.name for h in fleet if selector_matches(selector, h.labels)]
    return out
