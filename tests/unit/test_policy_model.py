"""The policy model (`streamer.policy.model`): fields, defaults and canonical forms, derived
data, validation rules and their messages. Policy files: test_policy_files.py."""

from __future__ import annotations

import copy
import json
import pickle
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import pydantic
import pytest
from pydantic import TypeAdapter

from streamer.policy.model import (
    PROTOCOL_NUMBERS,
    PolicyError,
    PolicySet,
    Rule,
    format_validation_error,
    parse_policy_document,
)
from streamer.vocabulary import Action, DefaultAction, Direction, Protocol


def rule(**fields: Any) -> Rule:
    base: dict[str, Any] = {"rule_id": 1, "protocol": "tcp", "action": "allow"}
    base.update(fields)
    return Rule.model_validate(base)


def rule_errors(**fields: Any) -> list[str]:
    """The messages for one invalid rule, validated inside a document at position 0."""
    base: dict[str, Any] = {"rule_id": 7, "protocol": "tcp", "action": "allow"}
    base.update(fields)
    with pytest.raises(PolicyError) as info:
        parse_policy_document({"policies": [base]})
    return info.value.errors


def one_error(**fields: Any) -> str:
    errors = rule_errors(**fields)
    assert len(errors) == 1, errors
    return errors[0]


# --- fields, defaults, canonical forms -------------------------------------------------


def test_defaults() -> None:
    r = Rule(rule_id=5, protocol=Protocol.UDP, action=Action.LOG)
    assert r.name == ""
    assert (r.src_ip, r.dst_ip) == ("any", "any")
    assert (r.src_port, r.dst_port) == (0, 0)
    assert r.priority == 100
    assert r.direction is Direction.ANY
    assert PolicySet().default_action is DefaultAction.ALLOW
    assert PolicySet().policies == []


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
        ("any", "any"),
        ("ANY", "any"),
        ("Any", "any"),
        ("::ffff:10.0.0.1", "::ffff:a00:1"),
    ],
)
def test_ip_canonical(given: str, stored: str) -> None:
    assert rule(src_ip=given).src_ip == stored
    assert rule(dst_ip=given).dst_ip == stored


def test_ip_fast_path_agrees_with_ipaddress() -> None:
    """Canonical text and network equal ipaddress's for many random addresses and CIDRs."""
    rng = random.Random(7)
    for _ in range(3000):
        if rng.random() < 0.5:
            value = rng.getrandbits(32)
            bits, text = 32, str(IPv4Address(value))
            if rng.random() < 0.2:
                text = text.replace(".", ".0", 1)  # leading zero: rejected
        else:
            groups = [rng.choice([0, 0, 0, 1, 0xFFFF, rng.getrandbits(16)]) for _ in range(8)]
            value = int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big")
            bits = 128
            text = IPv6Address(value).exploded if rng.random() < 0.3 else str(IPv6Address(value))
            if rng.random() < 0.2:
                text = text.upper()
        if rng.random() < 0.5:
            prefix = rng.randrange(bits + 1)
            if rng.random() < 0.8:
                value &= ~((1 << (bits - prefix)) - 1)  # mostly without host bits
                text = str(ip_address(value) if bits == 32 else IPv6Address(value))
            text = f"{text}/{prefix}"
        try:
            expected = ip_network(text, strict=True)
        except ValueError:
            with pytest.raises(pydantic.ValidationError):
                rule(src_ip=text)
            continue
        got = rule(src_ip=text)
        canonical = (
            str(expected.network_address)
            if expected.prefixlen == expected.max_prefixlen
            else str(expected)
        )
        assert got.src_ip == canonical, text
        assert got.src_net == expected, text
        assert got.families == frozenset({expected.version})


def test_ip_nets_and_families() -> None:
    r = rule(src_ip="10.0.0.5")
    assert r.src_net == IPv4Network("10.0.0.5/32")
    assert r.dst_net is None
    assert r.families == frozenset({4})
    r = rule(dst_ip="2001:db8::/32")
    assert r.dst_net == IPv6Network("2001:db8::/32")
    assert r.families == frozenset({6})
    r = rule(src_ip="0.0.0.0/0")
    assert r.src_net == IPv4Network("0.0.0.0/0")
    assert r.families == frozenset({4})
    r = rule(src_ip="::/0", dst_ip="any")
    assert r.families == frozenset({6})
    assert rule().families == frozenset({4, 6})
    assert rule(src_ip="10.0.0.0/8", dst_ip="10.1.0.0/16").families == frozenset({4})


@pytest.mark.parametrize(
    ("given", "stored", "ports"),
    [
        (0, 0, None),
        (80, 80, (80, 80)),
        (65535, 65535, (65535, 65535)),
        ("80-80", 80, (80, 80)),
        ("1000-2000", "1000-2000", (1000, 2000)),
        ("0-65535", "0-65535", (0, 65535)),
        ("0-0", "0-0", (0, 0)),
        ("0-10", "0-10", (0, 10)),
    ],
)
def test_ports(given: int | str, stored: int | str, ports: tuple[int, int] | None) -> None:
    r = rule(src_port=given, dst_port=given)
    assert r.src_port == stored
    assert r.dst_port == stored
    assert r.src_ports == ports
    assert r.dst_ports == ports


def test_protocol_numbers() -> None:
    assert PROTOCOL_NUMBERS == {
        Protocol.TCP: 6,
        Protocol.UDP: 17,
        Protocol.ICMP: 1,
        Protocol.ICMPV6: 58,
        Protocol.ANY: None,
    }
    for proto, number in PROTOCOL_NUMBERS.items():
        assert rule(protocol=proto.value).proto_number == number
    assert rule(protocol="icmp").families == frozenset({4})
    assert rule(protocol="icmpv6").families == frozenset({6})
    assert rule(protocol="any").families == frozenset({4, 6})


def test_enums_accept_any_case() -> None:
    r = rule(protocol="TCP", action="Deny", direction="INGRESS")
    assert (r.protocol, r.action, r.direction) == (Protocol.TCP, Action.DENY, Direction.INGRESS)
    assert PolicySet.model_validate({"default_action": "DENY"}).default_action == "deny"


def test_score_encodes_tie_break() -> None:
    r = rule(rule_id=1002, priority=200, action="deny")
    assert r.score == (200 << 34) | (2 << 32) | (0xFFFFFFFF - 1002)
    assert rule(action="log").score & (3 << 32) == 1 << 32
    assert rule(action="allow").score & (3 << 32) == 0
    # priority first, then deny > log > allow, then the lowest rule_id
    assert rule(priority=101, action="allow", rule_id=9).score > rule(action="deny").score
    assert rule(action="deny", rule_id=9).score > rule(action="log", rule_id=1).score
    assert rule(action="log", rule_id=9).score > rule(action="allow", rule_id=1).score
    assert rule(rule_id=1).score > rule(rule_id=2).score
    top = rule(rule_id=0xFFFFFFFF, priority=65535, action="deny")
    assert top.score == (65535 << 34) | (2 << 32)


def test_to_api_is_canonical_json() -> None:
    r = rule(
        rule_id=3,
        name="web",
        src_ip="10.0.0.5/32",
        dst_ip="2001:DB8::/32".replace("2001:DB8::/32", "any"),
        dst_port="443-443",
        src_port="1024-65535",
        protocol="TCP",
        action="log",
        priority=7,
        direction="egress",
    )
    api = r.to_api()
    assert api == {
        "rule_id": 3,
        "name": "web",
        "src_ip": "10.0.0.5",
        "dst_ip": "any",
        "src_port": "1024-65535",
        "dst_port": 443,
        "protocol": "tcp",
        "action": "log",
        "priority": 7,
        "direction": "egress",
    }
    assert json.loads(json.dumps(api)) == api
    assert Rule.model_validate(api) == r
    assert json.loads(r.model_dump_json()) == api


def test_rules_frozen_equal_hashable_copyable() -> None:
    a = rule(src_ip="10.0.0.0/8")
    b = rule(src_ip="10.0.0.0/8")
    _ = a.src_net  # building the network object lazily must not change equality
    assert a == b
    assert hash(a) == hash(b)
    assert a != rule(src_ip="10.0.0.0/16")
    with pytest.raises(pydantic.ValidationError):
        a.priority = 5
    for clone in (pickle.loads(pickle.dumps(a)), copy.deepcopy(a), a.model_copy()):
        assert clone == a
        assert clone.src_net == a.src_net
        assert clone.score == a.score


def test_model_copy_with_update_revalidates() -> None:
    r = rule(rule_id=4, priority=1, src_ip="10.0.0.0/8")
    changed = r.model_copy(update={"priority": 9, "src_ip": "2001:DB8::/32"})
    assert changed.priority == 9
    assert changed.score == rule(rule_id=4, priority=9).score
    assert changed.src_ip == "2001:db8::/32"
    assert changed.families == frozenset({6})
    with pytest.raises(pydantic.ValidationError):
        r.model_copy(update={"dst_port": "x"})
    assert r.model_copy() == r


def test_policy_set_round_trip() -> None:
    doc = {
        "default_action": "deny",
        "policies": [
            {"rule_id": 1, "protocol": "tcp", "action": "allow", "dst_port": 22},
            {"rule_id": 2, "protocol": "icmp", "action": "log"},
        ],
    }
    ps = parse_policy_document(doc)
    assert ps.default_action is DefaultAction.DENY
    assert [r.rule_id for r in ps.policies] == [1, 2]
    assert ps.get(2) is ps.policies[1]
    assert ps.get(3) is None
    assert parse_policy_document(ps.to_api()) == ps
    # Rule objects are taken as they are
    assert PolicySet(policies=ps.policies).policies[0] is ps.policies[0]


# --- validation messages --------------------------------------------------------------


def test_example_message_from_the_brief() -> None:
    doc = {
        "policies": [
            {"rule_id": 1, "protocol": "tcp", "action": "allow"},
            {"rule_id": 2, "protocol": "tcp", "action": "allow"},
            {"rule_id": 3, "protocol": "tcp", "action": "allow"},
            {"rule_id": 1002, "protocol": "tcp", "action": "deny", "dst_port": "70000"},
        ]
    }
    with pytest.raises(PolicyError) as info:
        parse_policy_document(doc)
    assert info.value.errors == [
        'policies[3] (rule_id 1002): dst_port: "70000" is not a port: '
        'use an int 0..65535 or "lo-hi"'
    ]


@pytest.mark.parametrize("value", [True, False, "5", 5.0, 0, -1, 2**32, None])
def test_rule_id_invalid(value: Any) -> None:
    message = one_error(rule_id=value)
    assert message.startswith("policies[0]")
    assert "rule_id" in message
    assert "1..4294967295" in message
    assert "(rule_id" not in message  # not a usable id: not named as one


def test_rule_id_bounds_ok() -> None:
    assert rule(rule_id=1).rule_id == 1
    assert rule(rule_id=2**32 - 1).rule_id == 2**32 - 1


@pytest.mark.parametrize("value", [True, "100", 1.5, -1, 65536])
def test_priority_invalid(value: Any) -> None:
    message = one_error(priority=value)
    assert message.startswith("policies[0] (rule_id 7): priority: ")
    assert "0..65535" in message


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("80", 'use an int 0..65535 or "lo-hi"'),
        ("70000", 'use an int 0..65535 or "lo-hi"'),
        (70000, 'use an int 0..65535 or "lo-hi"'),
        (-1, 'use an int 0..65535 or "lo-hi"'),
        (True, 'use an int 0..65535 or "lo-hi"'),
        (80.0, 'use an int 0..65535 or "lo-hi"'),
        (None, 'use an int 0..65535 or "lo-hi"'),
        ([80], 'use an int 0..65535 or "lo-hi"'),
        ("80 - 90", 'use an int 0..65535 or "lo-hi"'),
        (" 80-90", 'use an int 0..65535 or "lo-hi"'),
        ("80-90 ", 'use an int 0..65535 or "lo-hi"'),
        ("80-", 'use an int 0..65535 or "lo-hi"'),
        ("-80", 'use an int 0..65535 or "lo-hi"'),
        ("a-b", 'use an int 0..65535 or "lo-hi"'),
        ("1-2-3", 'use an int 0..65535 or "lo-hi"'),
        ("90-80", "the range is empty"),
        ("1-65536", "above 65535"),
        ("1-99999", "above 65535"),
    ],
)
def test_port_invalid(value: Any, hint: str) -> None:
    for field in ("src_port", "dst_port"):
        message = one_error(**{field: value})
        assert message.startswith(f"policies[0] (rule_id 7): {field}: "), message
        assert hint in message
        assert json.dumps(value) in message


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
        ("2001:db8::1/32", "did you mean 2001:db8::/32?"),
        ("10.0.0.256", "is not an IP address or CIDR"),
        ("10.0.0", "is not an IP address or CIDR"),
        ("010.0.0.1", "is not an IP address or CIDR"),
        ("10.0.0.0/33", "is not an IP address or CIDR"),
        ("10.0.0.0/-1", "is not an IP address or CIDR"),
        (" 10.0.0.1", "is not an IP address or CIDR"),
        ("10.0.0.1 ", "is not an IP address or CIDR"),
        ("", "is not an IP address or CIDR"),
        ("anything", "is not an IP address or CIDR"),
        ("fe80::1%eth0", "scoped"),
        (167772161, "is not a string"),
        (None, "is not a string"),
    ],
)
def test_ip_invalid(value: Any, hint: str) -> None:
    for field in ("src_ip", "dst_ip"):
        message = one_error(**{field: value})
        assert message.startswith(f"policies[0] (rule_id 7): {field}: "), message
        assert hint in message


def test_mixed_families_rejected() -> None:
    message = one_error(src_ip="10.0.0.0/8", dst_ip="2001:db8::/32")
    assert message == (
        "policies[0] (rule_id 7): src_ip is IPv4 but dst_ip is IPv6; a rule matches one "
        'family: use addresses of one family, or "any"'
    )
    assert "src_ip is IPv6 but dst_ip is IPv4" in one_error(src_ip="::/0", dst_ip="0.0.0.0/0")


def test_icmp_family_mismatch_rejected() -> None:
    message = one_error(protocol="icmp", dst_ip="2001:db8::1")
    assert message.startswith("policies[0] (rule_id 7): protocol: ")
    assert "icmpv6" in message
    message = one_error(protocol="icmpv6", src_ip="10.0.0.1")
    assert "use icmp with IPv4" in message
    # matching families are fine
    assert rule(protocol="icmp", src_ip="10.0.0.0/8").families == frozenset({4})
    assert rule(protocol="icmpv6", dst_ip="::/0").families == frozenset({6})


@pytest.mark.parametrize("protocol", ["icmp", "icmpv6"])
@pytest.mark.parametrize("field", ["src_port", "dst_port"])
@pytest.mark.parametrize("value", [22, "1-2", "0-65535", "0-0"])
def test_port_condition_with_icmp_rejected(protocol: str, field: str, value: Any) -> None:
    message = one_error(protocol=protocol, **{field: value})
    assert message.startswith(f"policies[0] (rule_id 7): {field}: a port condition is invalid")
    assert protocol in message


def test_port_condition_with_any_protocol_ok() -> None:
    r = rule(protocol="any", dst_port="0-65535")
    assert r.dst_ports == (0, 65535)
    assert r.proto_number is None


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("protocol", "tcpp", "is not one of: tcp, udp, icmp, icmpv6, any"),
        ("protocol", 6, "is not one of: tcp, udp, icmp, icmpv6, any"),
        ("action", "drop", "is not one of: allow, deny, log"),
        ("direction", "in", "is not one of: ingress, egress, any"),
        ("name", 5, "is not a string"),
        ("name", "x" * 129, "at most 128"),
        ("name", "a\nb", "control characters"),
    ],
)
def test_other_fields_invalid(field: str, value: Any, hint: str) -> None:
    message = one_error(**{field: value})
    assert message.startswith(f"policies[0] (rule_id 7): {field}: "), message
    assert hint in message


def test_name_limits() -> None:
    assert rule(name="x" * 128).name == "x" * 128
    assert rule(name="web → db ünïcode").name == "web → db ünïcode"


def test_missing_and_unknown_fields() -> None:
    errors = rule_errors(protocol=None, action=None)
    assert errors == [
        "policies[0] (rule_id 7): protocol: null is not one of: tcp, udp, icmp, icmpv6, any",
        "policies[0] (rule_id 7): action: null is not one of: allow, deny, log",
    ]
    with pytest.raises(PolicyError) as info:
        parse_policy_document({"policies": [{"rule_id": 4, "src": "10.0.0.1"}]})
    assert info.value.errors[:2] == [
        "policies[0] (rule_id 4): protocol: required field is missing",
        "policies[0] (rule_id 4): action: required field is missing",
    ]
    assert info.value.errors[2].startswith('policies[0] (rule_id 4): "src": unknown field;')
    assert "src_ip" in info.value.errors[2]


def test_all_errors_reported_together() -> None:
    doc = {
        "default_action": "maybe",
        "extra": 1,
        "policies": [
            {"rule_id": 1, "protocol": "tcp", "action": "allow", "src_port": "x"},
            {"rule_id": 2, "protocol": "tcp", "action": "allow"},
            {"rule_id": 3, "protocol": "udp", "action": "nope", "dst_ip": "1.2.3.4/8"},
            "not a rule",
        ],
    }
    with pytest.raises(PolicyError) as info:
        parse_policy_document(doc)
    errors = info.value.errors
    assert errors[0] == 'default_action: "maybe" is not one of: allow, deny'
    assert errors[1].startswith('policies[0] (rule_id 1): src_port: "x" is not a port')
    assert errors[2].startswith('policies[2] (rule_id 3): dst_ip: "1.2.3.4/8" has host bits')
    assert errors[3] == 'policies[2] (rule_id 3): action: "nope" is not one of: allow, deny, log'
    assert errors[4] == (
        'policies[3]: "not a rule" is not a rule: expected an object (a JSON mapping)'
    )
    assert errors[5].startswith('"extra": unknown field; allowed fields are: default_action')
    assert len(errors) == 6
    text = str(info.value)
    assert text.startswith("invalid policy:\n  default_action")


def test_duplicate_rule_ids() -> None:
    doc = {
        "policies": [
            {"rule_id": 5, "protocol": "tcp", "action": "allow"},
            {"rule_id": 6, "protocol": "tcp", "action": "allow"},
            {"rule_id": 5, "protocol": "udp", "action": "deny"},
        ]
    }
    with pytest.raises(PolicyError) as info:
        parse_policy_document(doc)
    assert info.value.errors == [
        "policies[2] (rule_id 5): rule_id: duplicate: rule_id 5 is already used by policies[0]"
    ]


def test_top_level_must_be_an_object() -> None:
    data: Any
    for data in ([], None, "x", 5):
        with pytest.raises(PolicyError) as info:
            parse_policy_document(data)
        assert "expected an object" in info.value.errors[0]
    with pytest.raises(PolicyError) as info:
        parse_policy_document({"policies": {"rule_id": 1}})
    assert info.value.errors == ['policies: {"rule_id": 1} is not a list: expected a list of rules']


def test_format_validation_error_for_one_rule_and_lists() -> None:
    data = {"rule_id": 9, "protocol": "icmp", "action": "allow", "dst_port": 80}
    with pytest.raises(pydantic.ValidationError) as info:
        Rule.model_validate(data)
    assert format_validation_error(info.value, data) == [
        "dst_port: a port condition is invalid with protocol icmp (only tcp and udp have "
        "ports): use 0, or protocol tcp, udp or any"
    ]
    listed = [{"rule_id": 1, "protocol": "tcp", "action": "allow"}, {"rule_id": 2}]
    with pytest.raises(pydantic.ValidationError) as info:
        TypeAdapter(list[Rule]).validate_python(listed)
    assert format_validation_error(info.value, listed) == [
        "policies[1] (rule_id 2): protocol: required field is missing",
        "policies[1] (rule_id 2): action: required field is missing",
    ]


def test_braces_in_input_do_not_break_messages() -> None:
    message = one_error(src_ip="{reason}")
    assert '"{reason}" is not an IP address' in message


# --- fleet documents: hosts (contract §7) ----------------------------------------------

NO_HOSTS = (
    "hosts: host-scoped rules need fleet mode (microseg fleet apply), which a local policy "
    "does not use: remove hosts (a rule of this agent's own policy applies to this host)"
)


def fleet_doc(**fields: Any) -> dict[str, Any]:
    return {"policies": [{"rule_id": 7, "protocol": "tcp", "action": "allow", **fields}]}


def test_hosts_refused_outside_fleet_mode() -> None:
    assert one_error(hosts={"role": "db"}) == f"policies[0] (rule_id 7): {NO_HOSTS}"
    assert one_error(hosts={}) == f"policies[0] (rule_id 7): {NO_HOSTS}"
    with pytest.raises(pydantic.ValidationError, match="host-scoped rules need fleet mode"):
        rule(hosts={"role": "db"})
    with pytest.raises(pydantic.ValidationError, match="host-scoped rules need fleet mode"):
        TypeAdapter(list[Rule]).validate_python([fleet_doc(hosts={"a": "b"})["policies"][0]])


def test_hosts_null_is_absent_in_either_mode() -> None:
    for fleet in (False, True):
        (r,) = parse_policy_document(fleet_doc(hosts=None), fleet=fleet).policies
        assert r.hosts is None
        assert "hosts" not in r.to_api()


def test_hosts_accepted_in_fleet_mode() -> None:
    (r,) = parse_policy_document(fleet_doc(hosts={"role": "db", "env": ""}), fleet=True).policies
    assert r.hosts == {"role": "db", "env": ""}
    assert r.to_api()["hosts"] == {"role": "db", "env": ""}
    assert r.model_dump(mode="json")["hosts"] == {"role": "db", "env": ""}
    assert hash(r) == hash(r.model_copy())
    (every,) = parse_policy_document(fleet_doc(hosts={}), fleet=True).policies
    assert every.hosts == {}


def test_rules_without_hosts_dump_as_before() -> None:
    r = rule()
    assert "hosts" not in r.to_api()
    assert "hosts" not in r.model_dump()
    assert "hosts" not in json.loads(r.model_dump_json())


@pytest.mark.parametrize(
    ("hosts", "expected"),
    [
        ({"role": 1}, 'hosts: role: 1 is not a string (write it as a string: "1")'),
        ({"-role": "db"}, 'hosts: "-role" is not a label key'),
        ({"role": "a b"}, 'hosts: role: "a b" is not a label value'),
        (["role=db"], 'hosts: ["role=db"] is not a map of labels'),
        ({f"k{i}": "v" for i in range(33)}, "hosts: 33 labels: at most 32 are allowed"),
    ],
)
def test_bad_hosts_in_fleet_mode(hosts: Any, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_document(fleet_doc(hosts=hosts), fleet=True)
    (message,) = info.value.errors
    assert message.startswith(f"policies[0] (rule_id 7): {expected}"), message


def test_fleet_mode_lists_hosts_among_the_fields() -> None:
    local = rule_errors(colour="red")
    assert "hosts" not in local[0]
    with pytest.raises(PolicyError) as info:
        parse_policy_document(fleet_doc(colour="red"), fleet=True)
    assert info.value.errors[0].endswith(", mode, hosts")


def test_without_hosts() -> None:
    plain = rule(dst_port=443, src_ip="10.0.0.0/8")
    assert plain.without_hosts() is plain
    (scoped,) = parse_policy_document(
        fleet_doc(dst_port=443, src_ip="10.0.0.0/8", hosts={"role": "db"}), fleet=True
    ).policies
    local = scoped.without_hosts()
    assert local.hosts is None
    assert local.to_api() == plain.to_api() | {"rule_id": 7}
    assert local == Rule.model_validate(local.to_api())
    assert local.match_data() == scoped.match_data()
    assert local.src_net == IPv4Network("10.0.0.0/8")
    assert "hosts" not in local.model_fields_set
    assert pickle.loads(pickle.dumps(local)) == local
    assert scoped.hosts == {"role": "db"}  # the fleet rule is unchanged


def test_model_copy_of_a_host_scoped_rule() -> None:
    (scoped,) = parse_policy_document(fleet_doc(hosts={"role": "db"}), fleet=True).policies
    assert scoped.model_copy(update={"priority": 5}).hosts == {"role": "db"}
    assert scoped.model_copy(update={"hosts": None}).hosts is None
    with pytest.raises(pydantic.ValidationError, match="host-scoped"):
        rule().model_copy(update={"hosts": {"role": "db"}})
