"""Address groups (docs/contract.md §5), pure logic: the model (members of every form, bad
members, names, a rule end with an address and a group, unknown groups, `select` refused,
dumps unchanged for rules without groups, a million members), the compiler's expansion, the
reference model's matching (an empty group matches nothing), the store's group changes over a
recording applier (no kernel), and how the CLI shows groups."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pydantic
import pytest
from support.tables import probe

from streamer.cli.output import render_diff, rules_table
from streamer.datapath.compiler import compile_policy
from streamer.datapath.reference import Packet, judge, rule_matches
from streamer.policy.model import (
    FLEET_CONTEXT,
    GROUP_END,
    Group,
    PolicyError,
    PolicySet,
    Rule,
    parse_address,
    parse_members,
    parse_policy_document,
)
from streamer.policy.store import (
    GroupInUse,
    GroupNotFound,
    PolicyStore,
    StoreError,
)


def doc_errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy_document(doc)
    return info.value.errors


def one(doc: dict[str, Any]) -> str:
    errors = doc_errors(doc)
    assert len(errors) == 1, errors
    return errors[0]


def r(rule_id: int, **fields: Any) -> dict[str, Any]:
    return {"rule_id": rule_id, "protocol": "any", "action": "allow", **fields}


# ---- the model -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("10.0.0.5", "10.0.0.5"),
        ("10.0.0.5/32", "10.0.0.5"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("::/0", "::/0"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("2001:db8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8::1/128", "2001:db8::1"),
        ("::ffff:10.0.0.1", "::ffff:a00:1"),
    ],
)
def test_member_forms_are_canonical(given: str, stored: str) -> None:
    assert Group.model_validate({"members": [given]}).members == (stored,)


def test_members_deduplicated_in_first_order_both_families() -> None:
    g = Group.model_validate(
        {
            "members": [
                "10.0.1.0/24",
                "fd00:1::/64",
                "10.0.1.0/24",
                "FD00:1::/64",
                "10.0.0.1/32",
                "10.0.0.1",
            ]
        }
    )
    assert g.members == ("10.0.1.0/24", "fd00:1::/64", "10.0.0.1")
    assert g.addrs() == [parse_address(m) for m in g.members]
    assert g.addrs()[1][1:] == (6, int.from_bytes(bytes.fromhex("fd000001") + bytes(12)), 64)
    assert Group().members == () and Group.model_validate({}).members == ()
    assert g.to_api() == {"members": ["10.0.1.0/24", "fd00:1::/64", "10.0.0.1"]}


@pytest.mark.parametrize(
    ("member", "words"),
    [
        ("any", ('"any" is not a member', "0.0.0.0/0")),
        ("ANY", ("is not a member",)),
        ("10.0.0.1/8", ("host bits set", "10.0.0.0/8")),
        ("2001:db8::1/32", ("host bits set", "2001:db8::/32")),
        ("fe80::1%eth0", ("scoped IPv6",)),
        ("10.0.0.256", ("is not an IP address or CIDR",)),
        (" 10.0.0.1", ("is not an IP address or CIDR",)),
        ("10.0.0.0/33", ("is not an IP address or CIDR",)),
        ("", ("is not an IP address or CIDR",)),
        (5, ("5 is not a string",)),
        (None, ("null is not a string",)),
    ],
)
def test_bad_members(member: Any, words: tuple[str, ...]) -> None:
    message = one({"groups": {"db": {"members": ["10.0.0.0/8", member]}}})
    assert message.startswith("groups.db.members[1]: "), message
    for w in words:
        assert w in message, message


def test_many_bad_members_are_counted_not_all_listed() -> None:
    errors = doc_errors({"groups": {"g": {"members": [f"10.0.0.{i}/8" for i in range(1, 50)]}}})
    assert len(errors) == 21 and errors[-1] == "groups.g.members: ... and 29 more bad members"
    with pytest.raises(ValueError, match=r"^\[0\]: "):
        parse_members(["x"])


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            {"groups": {"db": {"members": "10.0.0.1"}}},
            'groups.db.members: "10.0.0.1" is not a list: expected a list of addresses and CIDRs',
        ),
        (
            {"groups": {"db": 5}},
            'groups.db: 5 is not a group: expected an object {"members": [...]}',
        ),
        (
            {"groups": {"db": {"members": [], "x": 1}}},
            'groups.db: "x": unknown field; allowed fields are: members',
        ),
        (
            {"groups": []},
            "groups: [] is not a map of groups: expected an object "
            '{"NAME": {"members": [...]}, ...}',
        ),
        (
            {"groups": {"web": {"members": [], "select": {"role": "web"}}}},
            "groups.web: select: label groups (select) need fleet mode, "
            "which this agent does not run: list the group's members instead",
        ),
    ],
)
def test_bad_group_shapes(doc: dict[str, Any], expected: str) -> None:
    assert one(doc) == expected


@pytest.mark.parametrize("name", ["db", "a", "A-b_c.d", "0", "x" * 63, "10.0.0.0"])
def test_good_group_names(name: str) -> None:
    pol = parse_policy_document({"groups": {name: {}}, "policies": [r(1, dst_group=name)]})
    assert pol.groups[name].members == ()


@pytest.mark.parametrize("name", ["", "-x", ".x", "_x", "a b", "a/b", "x" * 64, "é", "a\n"])
def test_bad_group_names(name: str) -> None:
    message = one({"groups": {name: {}}})
    assert message.startswith("groups: ") and "is not a group name" in message, message
    message = one({"groups": {}, "policies": [r(4, src_group=name)]})
    assert message.startswith("policies[0] (rule_id 4): src_group: "), message
    assert "is not a group name" in message, message


def test_a_rule_end_is_an_address_or_a_group() -> None:
    for ip in ("10.0.0.1", "0.0.0.0/0", "::/0"):
        message = one({"groups": {"g": {}}, "policies": [r(4, src_ip=ip, src_group="g")]})
        assert message == (
            "policies[0] (rule_id 4): src_ip and src_group: a rule end is an address or a "
            'group, not both: remove src_ip (or make it "any") or src_group'
        )
    message = one({"groups": {"g": {}}, "policies": [r(4, dst_ip="::1", dst_group="g")]})
    assert "dst_ip and dst_group" in message
    # "any" is no address: with a group it is the group's end.
    pol = parse_policy_document(
        {"groups": {"g": {}}, "policies": [r(4, src_ip="any", src_group="g")]}
    )
    assert pol.policies[0].to_api()["src_group"] == "g"


def test_unknown_groups_are_named() -> None:
    errors = doc_errors(
        {"groups": {"db": {}}, "policies": [r(4, src_group="web"), r(5, dst_group="x")]}
    )
    assert errors == [
        'policies[0] (rule_id 4): src_group: no group named "web" (the groups are: db)',
        'policies[1] (rule_id 5): dst_group: no group named "x" (the groups are: db)',
    ]
    assert one({"policies": [r(4, src_group="web")]}) == (
        'policies[0] (rule_id 4): src_group: no group named "web" (there are no groups: define '
        "it under groups first)"
    )


def test_match_data_and_families_of_group_rules() -> None:
    rule = Rule.model_validate(r(1, src_group="g", dst_ip="10.0.0.1", protocol="tcp"))
    src, dst, *_, families, _score = rule.match_data()
    assert src == ("g", GROUP_END, 0, 0) and dst == parse_address("10.0.0.1")
    assert families == frozenset({4}) and rule.src_net is None
    both = Rule.model_validate(r(2, src_group="g", dst_group="h"))
    assert both.families == frozenset({4, 6})
    icmp6 = Rule.model_validate(r(3, src_group="g", protocol="icmpv6"))
    assert icmp6.families == frozenset({6})
    message = one(
        {
            "groups": {"g": {}},
            "policies": [r(4, src_group="g", dst_ip="10.0.0.1", protocol="icmpv6")],
        }
    )
    assert "icmpv6 is ICMP for IPv6" in message


def test_dumps_of_rules_without_groups_are_unchanged() -> None:
    plain = Rule.model_validate(r(1))
    assert "src_group" not in plain.to_api() and "src_group" not in plain.model_dump()
    grouped = Rule.model_validate(r(1, dst_group="g"))
    assert grouped.to_api()["dst_group"] == "g" and "src_group" not in grouped.to_api()
    assert Rule.model_validate(grouped.to_api()) == grouped
    pol = parse_policy_document({"policies": [r(1)]})
    assert pol.to_api() == {"default_action": "allow", "groups": {}, "policies": [plain.to_api()]}
    assert parse_policy_document(pol.to_api()) == pol


def test_group_users_and_member_changes() -> None:
    pol = parse_policy_document(
        {
            "groups": {"a": {"members": ["10.0.0.1"]}, "b": {}},
            "policies": [r(1, src_group="a", dst_group="a"), r(2, dst_group="b"), r(3)],
        }
    )
    assert pol.rules_using("a") == [1] and pol.rules_using("b") == [2]
    assert pol.group_users() == {"a": [1], "b": [2]}
    a = pol.groups["a"]
    a2, added, unchanged = a.with_members(parse_members(["10.0.0.1/32", "10.0.0.2"]))
    assert (a2.members, added, unchanged) == (("10.0.0.1", "10.0.0.2"), ["10.0.0.2"], ["10.0.0.1"])
    assert a.with_members(("10.0.0.1",))[0] is a
    a3, removed, missing = a2.without_members(("10.0.0.1", "10.9.9.9"))
    assert (a3.members, removed, missing) == (("10.0.0.2",), ["10.0.0.1"], ["10.9.9.9"])


def test_a_million_members_validate() -> None:
    members = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(500_000)]
    members += [f"2001:db8::{i >> 16:x}:{i & 0xFFFF:x}/128" for i in range(500_000)]
    pol = parse_policy_document({"groups": {"big": {"members": members}}})
    assert len(pol.groups["big"].members) == 1_000_000
    assert pol.groups["big"].members[-1] == "2001:db8::7:a11f"


# ---- label groups (select): fleet documents only ---------------------------------------------


def test_select_accepted_in_fleet_mode() -> None:
    doc = {
        "groups": {
            "web": {"members": ["10.0.9.0/24"], "select": {"role": "web"}},
            "all": {"select": {}},
            "db": {"members": ["10.0.1.1"]},
        },
        "policies": [r(1, src_group="web", dst_group="all")],
    }
    pol = parse_policy_document(doc, fleet=True)
    assert pol.groups["web"] == Group.model_validate(
        {"members": ["10.0.9.0/24"], "select": {"role": "web"}}, context=FLEET_CONTEXT
    )
    assert pol.groups["all"].select == {}
    assert pol.groups["db"].select is None
    assert pol.to_api()["groups"] == {
        "web": {"members": ["10.0.9.0/24"], "select": {"role": "web"}},
        "all": {"members": [], "select": {}},
        "db": {"members": ["10.0.1.1"]},
    }
    assert parse_policy_document(pol.to_api(), fleet=True) == pol
    assert "select" not in pol.groups["db"].model_dump()
    assert len({pol.groups["web"], pol.groups["web"].model_copy()}) == 1  # hashable


def test_select_kept_by_member_changes() -> None:
    pol = parse_policy_document({"groups": {"web": {"select": {"role": "web"}}}}, fleet=True)
    grown, added, _ = pol.groups["web"].with_members(["10.0.0.1"])
    assert (grown.members, grown.select, added) == (("10.0.0.1",), {"role": "web"}, ["10.0.0.1"])
    shrunk, removed, _ = grown.without_members(["10.0.0.1"])
    assert (shrunk.members, shrunk.select, removed) == ((), {"role": "web"}, ["10.0.0.1"])


def test_select_refused_outside_fleet_mode() -> None:
    with pytest.raises(pydantic.ValidationError, match="need fleet mode"):
        Group.model_validate({"select": {"role": "web"}})
    assert Group.model_validate({"select": None}).select is None
    assert one({"groups": {"web": {"select": {}}}}) == (
        "groups.web: select: label groups (select) need fleet mode, "
        "which this agent does not run: list the group's members instead"
    )


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        ({"role": 5}, 'groups.web.select: role: 5 is not a string (write it as a string: "5")'),
        ("role=web", 'groups.web.select: "role=web" is not a map of labels'),
        ({"a/b/c": "x"}, 'groups.web.select: "a/b/c" is not a label key'),
    ],
)
def test_bad_select_in_fleet_mode(select: Any, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_document({"groups": {"web": {"select": select}}}, fleet=True)
    (message,) = info.value.errors
    assert message.startswith(expected), message


def test_fleet_mode_lists_select_among_a_groups_fields() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_document({"groups": {"db": {"x": 1}}}, fleet=True)
    assert info.value.errors == [
        'groups.db: "x": unknown field; allowed fields are: members, select'
    ]


# ---- the compiler and the reference model ----------------------------------------------------


def _policy(groups: dict[str, list[str]], *rules: dict[str, Any]) -> PolicySet:
    return parse_policy_document(
        {
            "default_action": "deny",
            "groups": {n: {"members": m} for n, m in groups.items()},
            "policies": list(rules),
        }
    )


def test_an_empty_group_matches_nothing() -> None:
    pol = _policy({"g": []}, r(1, src_group="g"), r(2, dst_group="g", action="deny"))
    compiled = compile_policy(pol, 64)
    assert compiled.entry_count == 0 and compiled.rule_ids == [1, 2]
    for pkt in (Packet.of("10.0.0.1", "10.0.0.2"), Packet.of("::1", "::2", "udp", 1, 2)):
        assert judge(pol, pkt).rule is None and probe(compiled, pkt) is None
        assert not rule_matches(pol.policies[0], pkt, pol.groups)


def test_group_members_expand_into_entries() -> None:
    pol = _policy(
        {"src": ["10.1.0.0/16", "2001:db8::/32"], "dst": ["10.2.0.1", "10.3.0.0/24"]},
        r(1, src_group="src", dst_group="dst", dst_port=80, protocol="tcp", direction="ingress"),
    )
    compiled = compile_policy(pol, 64)
    # One IPv4 source x two IPv4 destinations; the IPv6 source has no IPv6 destination.
    assert compiled.v4.entry_count == 2 and compiled.v6.entry_count == 0
    assert sorted(s.dst_plen for s in compiled.v4.shapes) == [24, 32]
    with pytest.raises(ValueError, match="not among the groups"):
        rule_matches(pol.policies[0], Packet.of("10.1.0.1", "10.2.0.1", "tcp", 1, 80))


def test_groups_judge_like_the_reference() -> None:
    rng = random.Random(18)
    members = {
        "a": ["10.1.0.0/16", "10.2.3.4", "2001:db8:1::/48", "0.0.0.0/0"][: rng.randint(1, 3)],
        "b": ["10.1.2.0/24", "2001:db8:1:2::/64", "::/0", "10.9.0.0/16"],
        "e": [],
    }
    rules = [
        r(1, src_group="a", dst_port=22, protocol="tcp", action="deny", priority=200),
        r(2, dst_group="b", action="log"),
        r(3, src_group="b", dst_group="a", protocol="udp"),
        r(4, src_group="e", action="deny", priority=300),
        r(5, src_ip="10.1.2.3", dst_group="b", protocol="tcp", action="deny"),
    ]
    pol = _policy(members, *rules)
    compiled = compile_policy(pol, 64)
    addrs4 = ["10.1.2.3", "10.1.9.9", "10.2.3.4", "10.9.1.1", "192.0.2.1"]
    addrs6 = ["2001:db8:1:2::5", "2001:db8:1:3::1", "2001:db8:2::1", "::1"]
    for _ in range(2000):
        fam = rng.choice([addrs4, addrs6])
        pkt = Packet.of(
            rng.choice(fam),
            rng.choice(fam),
            rng.choice(["tcp", "udp"]),
            rng.randint(1, 3),
            rng.choice([22, 53, 80]),
            rng.choice(["ingress", "egress"]),
        )
        want = judge(pol, pkt).rule
        got = probe(compiled, pkt)
        assert (got.rule_id if got else None) == (want.rule_id if want else None), pkt


# ---- the store -------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.applied: list[PolicySet] = []

    def __call__(self, policy: PolicySet, generation: int | None) -> int:
        self.applied.append(policy)
        return len(self.applied)


def _store(tmp_path: Path) -> tuple[PolicyStore, Recorder]:
    rec = Recorder()
    store = PolicyStore(tmp_path, rec)
    store.restore(_policy({"db": []}, r(1, dst_group="db")), 0)
    return store, rec


def test_store_group_changes(tmp_path: Path) -> None:
    store, rec = _store(tmp_path)

    async def main() -> None:
        res = await store.add_members("db", ["10.0.0.0/8", "10.0.0.0/8", "::1"], "t")
        assert (res.members_added, res.members_unchanged) == (["10.0.0.0/8", "::1"], [])
        assert (res.group, res.member_count, res.group_rules, res.generation) == ("db", 2, [1], 2)
        assert res.groups_changed == ["db"] and res.added == []
        # Idempotent: nothing new, nothing applied, the generation stays.
        res = await store.add_members("db", ["10.0.0.0/8"], "t")
        assert res.members_added == [] and res.members_unchanged == ["10.0.0.0/8"]
        assert res.generation == 2 and len(rec.applied) == 2
        res = await store.remove_members("db", ["::1", "::2"], "t")
        assert (res.members_removed, res.members_unchanged) == (["::1"], ["::2"])
        res = await store.remove_members("db", ["::2"], "t")
        assert res.generation == 3 and res.members_removed == []
        res = await store.set_group("web", Group(members=("10.1.0.0/16",)), "t")
        assert res.group_created and res.groups_added == ["web"] and res.group_rules == []
        res = await store.set_group("web", Group(members=("10.2.0.0/16",)), "t", dry_run=True)
        assert res.dry_run and not res.group_created and res.members_removed == ["10.1.0.0/16"]
        assert store.policy.groups["web"].members == ("10.1.0.0/16",)
        with pytest.raises(GroupInUse, match="rule 1") as info:
            await store.delete_group("db", "t")
        assert (info.value.status, info.value.code) == (409, "in_use")
        with pytest.raises(GroupNotFound) as nf:
            await store.add_members("nope", ["10.0.0.1"], "t")
        assert (nf.value.status, nf.value.code) == (404, "not_found")
        with pytest.raises(StoreError, match=r"members\[1\]: .*host bits"):
            await store.add_members("db", ["10.0.0.1", "10.0.0.1/8"], "t")
        with pytest.raises(StoreError, match="is not a group name"):
            await store.set_group("a b", Group(), "t")
        with pytest.raises(StoreError, match='no group named "zz"'):
            await store.add(Rule.model_validate(r(7, src_group="zz")), "t")
        with pytest.raises(StoreError, match="dst_group"):
            await store.update(Rule.model_validate(r(1, dst_group="zz")), "t")
        res = await store.delete_group("web", "t")
        assert res.group_deleted and res.groups_removed == ["web"]
        assert res.members_removed == ["10.1.0.0/16"]

    asyncio.run(main())
    # What is on disk comes back whole.
    restored = store.read_persisted()
    assert restored is not None and restored[0] == store.policy
    assert restored[0].groups["db"].members == ("10.0.0.0/8",)


# ---- the CLI's rendering ---------------------------------------------------------------------


def test_cli_shows_group_ends_and_group_diffs() -> None:
    rule = Rule.model_validate(r(1, src_group="web", dst_ip="10.0.0.1")).to_api()
    table = rules_table([rule])
    assert "group:web" in table and "10.0.0.1" in table
    text = render_diff(
        {
            "dry_run": False,
            "generation": 4,
            "added": [rule],
            "removed": [],
            "changed": [],
            "groups_added": ["web"],
            "groups_removed": ["old"],
            "groups_changed": ["db"],
        }
    )
    assert "+ 1: allow any group:web -> 10.0.0.1" in text
    assert "+ group web (added)" in text and "- group old (removed)" in text
    assert "~ group db (members changed)" in text
