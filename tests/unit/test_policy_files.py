"""The policy model (`streamer.policy.model`), files: policy files in JSON and YAML, what a
bad or unreadable file says, a file refused whole; and validating 100,000 rules in bulk."""

from __future__ import annotations

import copy
import gc
import json
import time
from pathlib import Path
from typing import Any

import pytest

from streamer.policy.model import PolicyError, PolicySet, load_policy_file, parse_policy_document
from streamer.vocabulary import DefaultAction

# --- files ------------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "default_action": "deny",
    "policies": [
        {"rule_id": 1001, "name": "web", "dst_port": 80, "protocol": "tcp", "action": "allow"},
        {
            "rule_id": 1002,
            "name": "no-ssh",
            "dst_port": 22,
            "protocol": "tcp",
            "action": "deny",
            "priority": 200,
        },
    ],
}


def test_load_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(GOOD), encoding="utf-8")
    ps = load_policy_file(path)
    assert ps.default_action is DefaultAction.DENY
    assert [r.name for r in ps.policies] == ["web", "no-ssh"]
    assert load_policy_file(str(path)) == ps


def test_load_fleet_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "groups: {web: {select: {role: web}}}\n"
        "policies:\n"
        "  - {rule_id: 1, protocol: tcp, action: allow, src_group: web, hosts: {role: db}}\n",
        encoding="utf-8",
    )
    ps = load_policy_file(path, fleet=True)
    assert ps.policies[0].hosts == {"role": "db"}
    assert ps.groups["web"].select == {"role": "web"}
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert str(info.value).startswith(f"invalid policy file {path}:")
    assert [e.split(": ")[1] for e in info.value.errors] == ["select", "hosts"]


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_load_yaml(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"p{suffix}"
    path.write_text(
        "default_action: deny\n"
        "policies:\n"
        "  - rule_id: 1001\n"
        "    name: web\n"
        "    dst_port: 80\n"
        "    protocol: tcp\n"
        "    action: allow\n"
        "  - {rule_id: 1002, name: no-ssh, dst_port: 22, protocol: tcp, action: deny,"
        " priority: 200}\n",
        encoding="utf-8",
    )
    assert load_policy_file(path) == parse_policy_document(GOOD)


def test_yaml_port_range_and_bad_rule(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "policies:\n"
        "  - {rule_id: 1, protocol: udp, action: allow, dst_port: 5000-5010}\n"
        "  - {rule_id: 2, protocol: udp, action: allow, dst_port: yes}\n",
        encoding="utf-8",
    )
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert info.value.source == str(path)
    assert info.value.errors == [
        'policies[1] (rule_id 2): dst_port: true is not a port: use an int 0..65535 or "lo-hi"'
    ]
    assert str(info.value).startswith(f"invalid policy file {path}: policies[1]")


def test_bad_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{\n  "policies": [\n    {"rule_id": 1,,}\n  ]\n}\n', encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert info.value.errors[0].startswith("line 3 column ")
    assert "invalid JSON" in info.value.errors[0]


def test_bad_yaml_names_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yml"
    path.write_text("policies:\n  - rule_id: 1\n  bad: [\n", encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert info.value.errors[0].startswith("line ")
    assert "invalid YAML" in info.value.errors[0]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        load_policy_file(tmp_path / "missing.json")
    assert info.value.errors == ["cannot read it: no such file"]
    with pytest.raises(PolicyError) as info:
        load_policy_file(tmp_path)  # a directory
    assert info.value.errors[0].startswith("cannot read it:")
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PolicyError) as info:
        load_policy_file(binary)
    assert "not UTF-8" in info.value.errors[0]


@pytest.mark.parametrize(("content", "kind"), [("[]", "a list"), ("5", "5"), ("", None)])
def test_wrong_top_level_in_files(tmp_path: Path, content: str, kind: str | None) -> None:
    path = tmp_path / ("p.yaml" if kind is None else "p.json")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert "expected an object" in info.value.errors[0]


def test_whole_file_rejected(tmp_path: Path) -> None:
    doc = copy.deepcopy(GOOD)
    doc["policies"].append({"rule_id": 3, "protocol": "tcp", "action": "allow", "src_ip": "x"})
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(PolicyError) as info:
        load_policy_file(path)
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("policies[2] (rule_id 3): src_ip: ")


# --- bulk -------------------------------------------------------------------------------


def _bulk_document(count: int) -> dict[str, Any]:
    protocols = ["tcp", "udp", "any", "icmp"]
    policies = []
    for i in range(count):
        proto = protocols[i % 4]
        item: dict[str, Any] = {
            "rule_id": i + 1,
            "name": f"rule-{i}",
            "src_ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
            "dst_ip": f"192.168.{i % 200}.0/24" if i % 7 else f"2001:db8:{i % 999:x}::/48",
            "protocol": proto,
            "action": ["allow", "deny", "log"][i % 3],
            "priority": i % 1000,
            "direction": ["ingress", "egress", "any"][i % 3],
        }
        if i % 7 == 0:
            item["src_ip"] = f"2001:db8::{i >> 16:x}:{i & 0xFFFF:x}"
            if proto == "icmp":
                item["protocol"] = "icmpv6"
        if proto in ("tcp", "udp"):
            item["dst_port"] = i % 65536 if i % 2 else f"{i % 1000}-{i % 1000 + 100}"
        policies.append(item)
    return {"default_action": "deny", "policies": policies}


def test_bulk_100k_validation_time(capsys: pytest.CaptureFixture[str]) -> None:
    doc = _bulk_document(100_000)
    gc.collect()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        ps = PolicySet.model_validate(doc)
        times.append(time.perf_counter() - start)
    assert len(ps.policies) == 100_000
    assert ps.policies[7].families == frozenset({6})
    assert gc.isenabled()
    with capsys.disabled():
        print(
            f"\n[bulk] PolicySet.model_validate of 100,000 rules: best {min(times):.3f} s "
            f"(runs: {', '.join(f'{t:.3f}' for t in times)})"
        )


def test_a_validated_rule_costs_under_1100_bytes() -> None:
    """What a rule holds once validated (100,000 are kept by an agent): the shared set of the
    fields given, a dict of the class's shared keys and shared port ranges keep it near
    800 bytes (it was 1,650)."""
    import tracemalloc

    doc = _bulk_document(20_000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ps = PolicySet.model_validate(doc)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(ps.policies) == 20_000
    assert held / 20_000 < 1100, f"{held / 20_000:.0f} bytes per rule"
