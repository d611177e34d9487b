"""One host's share of a fleet policy (`streamer.fleet.scope`, docs/contract.md §5, §7):
FleetHost's checks, rules kept or dropped by their `hosts` selector (matching, not matching,
absent), label groups resolved from several hosts (both families, a host without addresses,
this host missing from the fleet list or stale in it), and the result: a plain local set that
validates again, compiles and judges like the reference model."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import pytest
from support.tables import probe

from streamer.datapath.compiler import compile_policy
from streamer.datapath.reference import Packet, Verdict, judge
from streamer.fleet.scope import (
    MAX_HOST_ADDRESSES,
    FleetHost,
    rules_for_host,
    scope_policy,
    select_hosts,
    select_members,
)
from streamer.policy.model import PolicySet, parse_policy_document
from streamer.vocabulary import DefaultAction

MAX_SHAPES = 1024

DB1 = FleetHost.parse("db-1", {"role": "db", "env": "prod"}, ["10.0.1.1", "fd00:1::1"])
DB2 = FleetHost.parse("db-2", {"role": "db", "env": "test"}, ["10.0.1.2"])
WEB1 = FleetHost.parse("web-1", {"role": "web", "env": "prod"}, ["10.0.2.1", "fd00:2::1"])
WEB2 = FleetHost.parse("web-2", {"role": "web", "env": "prod"}, ["fd00:2::2"])
BARE = FleetHost.parse("bare", {"role": "web"}, [])  # no attached interface has an address
FLEET = [DB1, DB2, WEB1, WEB2, BARE]


def r(rule_id: int, **fields: Any) -> dict[str, Any]:
    return {"rule_id": rule_id, "protocol": "tcp", "action": "allow", **fields}


DOC: dict[str, Any] = {
    "default_action": "deny",
    "groups": {
        "web": {"members": ["192.0.2.0/24"], "select": {"role": "web"}},
        "prod": {"select": {"env": "prod"}},
        "everyone": {"select": {}},
        "nobody": {"select": {"role": "none"}},
        "admins": {"members": ["10.9.0.0/16", "fd00:9::/48"]},
    },
    "policies": [
        r(1, src_group="web", dst_port=5432, hosts={"role": "db"}),
        r(2, src_group="admins", dst_port=22),
        r(3, dst_port=443, hosts={"role": "web"}),
        r(4, dst_port=9100, src_group="prod", hosts={}),
        r(5, dst_port=5433, hosts={"role": "db", "env": "prod"}),
        r(6, src_group="everyone", protocol="udp", dst_port=53, action="log"),
        r(7, src_group="nobody", action="deny", priority=200),
    ],
}
FLEET_POLICY = parse_policy_document(DOC, fleet=True)


def ids(policy: PolicySet) -> list[int]:
    return [rule.rule_id for rule in policy.policies]


# ---- FleetHost -------------------------------------------------------------------------------


def test_fleet_host_parse_canonicalizes() -> None:
    host = FleetHost.parse(
        "h1", {"role": "db"}, ["fd00:0:0::0002", "10.0.0.2", "FD00::2", "10.0.0.2"]
    )
    assert host == FleetHost("h1", {"role": "db"}, ("fd00::2", "10.0.0.2"))
    assert hash(host) == hash(FleetHost("h1", {"other": "x"}, ("fd00::2", "10.0.0.2")))
    assert FleetHost.parse("h", {}, ()).addresses == ()


@pytest.mark.parametrize(
    ("name", "labels", "addresses", "expected"),
    [
        ("-h", {}, [], ['host: "-h" is not a host name']),
        ("h", {"-x": "y"}, [], ['labels: "-x" is not a label key']),
        ("h", ["role=db"], [], ['labels: ["role=db"] is not a map of labels']),
        ("h", {}, "10.0.0.1", ["addresses: expected a list"]),
        ("h", {}, ["10.0.0.0/24"], ['addresses[0]: "10.0.0.0/24" is not a host address']),
        ("h", {}, ["10.0.0.1/32"], ['addresses[0]: "10.0.0.1/32" is not a host address']),
        ("h", {}, ["any"], ['addresses[0]: "any" is not a host address']),
        ("h", {}, ["10.0.0.1", 5], ["addresses[1]: 5 is not a string"]),
        ("h", {}, ["fe80::1%eth0"], ['addresses[0]: "fe80::1%eth0": scoped IPv6']),
        ("h", {}, ["10.0.0.300"], ['addresses[0]: "10.0.0.300" is not an IP address']),
        (
            "h",
            {},
            [f"10.0.{i >> 8}.{i & 255}" for i in range(MAX_HOST_ADDRESSES + 1)],
            ["addresses: 1025: at most 1024 are allowed"],
        ),
        (
            "",
            {"a": 1},
            ["x"],
            ['host: "" is not a host name', "labels: a: 1 is not a string", "addresses[0]: "],
        ),
    ],
)
def test_fleet_host_parse_refuses(
    name: Any, labels: Any, addresses: Any, expected: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        FleetHost.parse(name, labels, addresses)
    lines = str(info.value).split("\n")
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), line


# ---- rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "kept"),
    [
        (DB1, [1, 2, 4, 5, 6, 7]),  # role=db, env=prod: 5 as well
        (DB2, [1, 2, 4, 6, 7]),
        (WEB1, [2, 3, 4, 6, 7]),
        (BARE, [2, 3, 4, 6, 7]),
        (FleetHost.parse("plain", {}, []), [2, 4, 6, 7]),  # no labels: rules for every host
    ],
)
def test_rules_kept_by_their_hosts(host: FleetHost, kept: list[int]) -> None:
    local = scope_policy(FLEET_POLICY, host, FLEET)
    assert ids(local) == kept
    assert rules_for_host(FLEET_POLICY, host.labels) == kept
    assert all(rule.hosts is None for rule in local.policies)
    # A rule for every host is the fleet's own object; a host-scoped one a copy without hosts.
    fleet_rules = {rule.rule_id: rule for rule in FLEET_POLICY.policies}
    for rule in local.policies:
        if fleet_rules[rule.rule_id].hosts is None:
            assert rule is fleet_rules[rule.rule_id]
        else:
            assert rule.to_api() == {
                k: v for k, v in fleet_rules[rule.rule_id].to_api().items() if k != "hosts"
            }
    assert local.default_action is DefaultAction.DENY
    assert FLEET_POLICY.policies[0].hosts == {"role": "db"}  # the fleet set is unchanged


# ---- label groups ----------------------------------------------------------------------------


def test_select_groups_resolve_across_the_fleet() -> None:
    local = scope_policy(FLEET_POLICY, DB1, FLEET)
    groups = {name: list(group.members) for name, group in local.groups.items()}
    assert groups == {
        # own members first, then each matching host's addresses in fleet order (me first)
        "web": ["192.0.2.0/24", "10.0.2.1", "fd00:2::1", "fd00:2::2"],
        "prod": ["10.0.1.1", "fd00:1::1", "10.0.2.1", "fd00:2::1", "fd00:2::2"],
        "everyone": ["10.0.1.1", "fd00:1::1", "10.0.1.2", "10.0.2.1", "fd00:2::1", "fd00:2::2"],
        "nobody": [],
        "admins": ["10.9.0.0/16", "fd00:9::/48"],
    }
    assert all(group.select is None for group in local.groups.values())
    assert local.groups["admins"] is FLEET_POLICY.groups["admins"]
    assert select_members(FLEET_POLICY, FLEET) == {
        name: members for name, members in groups.items() if name != "admins"
    } | {"everyone": ["10.0.1.1", "fd00:1::1", "10.0.1.2", "10.0.2.1", "fd00:2::1", "fd00:2::2"]}
    assert select_hosts(FLEET_POLICY, FLEET) == {
        "web": ["web-1", "web-2", "bare"],
        "prod": ["db-1", "web-1", "web-2"],
        "everyone": ["db-1", "db-2", "web-1", "web-2", "bare"],
        "nobody": [],
    }


def test_me_counts_even_when_missing_or_stale() -> None:
    others = [DB2, WEB2]
    local = scope_policy(FLEET_POLICY, WEB1, others)
    assert local.groups["web"].members == ("192.0.2.0/24", "10.0.2.1", "fd00:2::1", "fd00:2::2")
    # A stale record of this host (old labels and addresses) yields to what the host says.
    stale = FleetHost.parse("web-1", {"role": "db"}, ["10.0.7.7"])
    local = scope_policy(FLEET_POLICY, WEB1, [stale, *others])
    assert "10.0.7.7" not in local.groups["everyone"].members
    assert local.groups["web"].members == ("192.0.2.0/24", "10.0.2.1", "fd00:2::1", "fd00:2::2")


def test_duplicate_addresses_are_kept_once() -> None:
    twin = FleetHost.parse("web-3", {"role": "web"}, ["10.0.2.1", "192.0.2.5"])
    doc = {"groups": {"web": {"members": ["10.0.2.1"], "select": {"role": "web"}}}}
    local = scope_policy(parse_policy_document(doc, fleet=True), WEB1, [twin])
    assert local.groups["web"].members == ("10.0.2.1", "fd00:2::1", "192.0.2.5")


def test_an_empty_fleet_and_a_policy_without_fleet_fields() -> None:
    plain = parse_policy_document({"groups": {"g": {"members": ["10.0.0.1"]}}, "policies": [r(1)]})
    local = scope_policy(plain, DB1, [])
    assert local.policies == plain.policies and local.groups == plain.groups
    assert scope_policy(PolicySet(), DB1, []).to_api() == PolicySet().to_api()


# ---- the result ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", FLEET)
def test_result_is_a_plain_local_set_that_compiles(host: FleetHost) -> None:
    local = scope_policy(FLEET_POLICY, host, FLEET)
    again = parse_policy_document(local.to_api())  # local form: no hosts, no select
    assert again == local
    assert again.to_api() == local.to_api()
    compiled = compile_policy(local, MAX_SHAPES)
    assert compiled.rule_ids == ids(local)


@pytest.mark.parametrize(
    ("src", "dport", "proto", "db1", "web1"),
    [
        ("10.0.2.1", 5432, 6, Verdict.ALLOW, Verdict.DENY),  # web-1 -> db: on db hosts only
        ("fd00:2::2", 5432, 6, Verdict.ALLOW, Verdict.DENY),  # web-2 (IPv6 only)
        ("10.0.1.2", 5432, 6, Verdict.DENY, Verdict.DENY),  # db-2 is not a web host
        ("192.0.2.77", 5432, 6, Verdict.ALLOW, Verdict.DENY),  # a member of its own
        ("203.0.113.1", 443, 6, Verdict.DENY, Verdict.ALLOW),  # rule 3: web hosts only
        ("10.0.1.1", 5433, 6, Verdict.ALLOW, Verdict.DENY),  # rule 5: db and prod
        ("fd00:1::1", 9100, 6, Verdict.ALLOW, Verdict.ALLOW),  # rule 4 (hosts {}): prod src
        ("10.0.1.2", 9100, 6, Verdict.DENY, Verdict.DENY),  # db-2 is test, not prod
        ("10.0.1.2", 53, 17, Verdict.LOG, Verdict.LOG),  # everyone
        ("198.51.100.1", 53, 17, Verdict.DENY, Verdict.DENY),  # not in the fleet
    ],
)
def test_scoped_sets_judge_per_host(
    src: str, dport: int, proto: int, db1: Verdict, web1: Verdict
) -> None:
    family = ip_address(src).version
    dst = "10.0.0.9" if family == 4 else "fd00::9"
    pkt = Packet(family, ip_address(src), ip_address(dst), proto, 40000, dport)
    for host, want in ((DB1, db1), (WEB1, web1)):
        local = scope_policy(FLEET_POLICY, host, FLEET)
        decision = judge(local, pkt)
        assert decision.verdict is want, (host.name, decision)
        entry = probe(compile_policy(local, MAX_SHAPES), pkt)
        assert (entry.rule_id if entry else None) == (
            decision.rule.rule_id if decision.rule else None
        )
