"""The API clients (streamer/cli/) against the stub admin API (support/stubapi.py):
`policy add` (from flags and files, bad values, duplicates, dry runs), `policy update` and
`policy delete`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from support.stubapi import Cli, Stub, last

# --------------------------------------------------------------------------- add


def test_policy_add_from_flags(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli(
        "policy",
        "add",
        "--rule-id",
        "2001",
        "--name",
        "api",
        "--dst-ip",
        "10.0.0.5",
        "--dst-port",
        "8080-8090",
        "--src-port",
        "1024",
        "--protocol",
        "TCP",
        "--action",
        "allow",
        "--priority",
        "300",
        "--direction",
        "ingress",
    )
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert (seen.method, seen.path, seen.query) == ("POST", "/api/v1/policies", {})
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {
        "rule_id": 2001,
        "name": "api",
        "dst_ip": "10.0.0.5",
        "dst_port": "8080-8090",
        "src_port": 1024,
        "protocol": "tcp",
        "action": "allow",
        "priority": 300,
        "direction": "ingress",
    }
    lines = out.splitlines()
    assert lines[0] == "added rule 2001"
    assert lines[1].split()[0] == "ID"
    assert lines[2].split() == [
        "2001",
        "api",
        "any",
        "1024",
        "10.0.0.5",
        "8080-8090",
        "tcp",
        "allow",
        "300",
        "ingress",
    ]
    assert 2001 in stub.rules


def test_policy_add_minimal_sends_only_given_fields(cli: Cli, stub: Stub) -> None:
    rc, _, _ = cli("policy", "add", "--rule-id", "9", "--protocol", "icmp", "--action", "log")
    assert rc == 0
    assert last(stub).body == {"rule_id": 9, "protocol": "icmp", "action": "log"}


def test_policy_add_json_output(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli(
        "policy", "add", "--rule-id", "9", "--protocol", "udp", "--action", "deny", "-o", "json"
    )
    assert rc == 0
    assert json.loads(out) == stub.rules[9]


def test_policy_add_from_file_with_flag_override(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "rule.yaml"
    f.write_text("rule_id: 3001\nname: dns\ndst_port: 53\nprotocol: udp\naction: allow\n")
    rc, out, err = cli("policy", "add", "--file", str(f), "--priority", "150")
    assert (rc, err) == (0, "")
    assert last(stub).body == {
        "rule_id": 3001,
        "name": "dns",
        "dst_port": 53,
        "protocol": "udp",
        "action": "allow",
        "priority": 150,
    }
    assert out.startswith("added rule 3001\n")


def test_policy_add_json_file(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "rule.json"
    f.write_text(json.dumps({"rule_id": 3002, "protocol": "tcp", "action": "deny"}))
    rc, _, _ = cli("policy", "add", "--file", str(f))
    assert rc == 0
    assert last(stub).body == {"rule_id": 3002, "protocol": "tcp", "action": "deny"}


def test_policy_add_file_problems(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    before = len(stub.requests)
    rc, _, err = cli("policy", "add", "--file", str(tmp_path / "missing.json"))
    assert rc == 2 and "missing.json: no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"rule_id": 1,\n "protocol": }')
    rc, _, err = cli("policy", "add", "--file", str(bad))
    assert rc == 2 and "bad.json: line 2 column 14: invalid JSON" in err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("rule_id: [1\n")
    rc, _, err = cli("policy", "add", "--file", str(bad_yaml))
    assert rc == 2 and "bad.yaml: line 2 column 1: invalid YAML" in err
    whole = tmp_path / "set.json"
    whole.write_text('{"default_action": "deny", "policies": []}')
    rc, _, err = cli("policy", "add", "--file", str(whole))
    assert rc == 2 and "use `microseg policy apply" in err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    rc, _, err = cli("policy", "add", "--file", str(scalar))
    assert rc == 2 and "expected one rule" in err
    assert len(stub.requests) == before  # nothing was sent
    assert "Traceback" not in err


def test_policy_add_missing_required_flags(cli: Cli, stub: Stub) -> None:
    rc, _, err = cli("policy", "add", "--name", "x", "--action", "allow")
    assert rc == 2
    assert err == "microseg: policy add: missing --rule-id, --protocol (or give --file)\n"
    assert stub.requests == []


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--dst-port", "70000", "is not a port"),
        ("--dst-port", "90-80", "LO <= HI"),
        ("--src-port", "http", "is not a port"),
        ("--priority", "65536", "is not a priority"),
        ("--protocol", "sctp", "invalid choice"),
        ("--action", "drop", "invalid choice"),
        ("--direction", "both", "invalid choice"),
    ],
)
def test_policy_add_bad_flag_values(cli: Cli, stub: Stub, flag: str, value: str, says: str) -> None:
    rc, _, err = cli(
        "policy", "add", "--rule-id", "5", "--protocol", "tcp", "--action", "allow", flag, value
    )
    assert rc == 2
    assert flag in err and says in err
    assert stub.requests == []


def test_policy_add_duplicate(cli: Cli) -> None:
    rc, out, err = cli(
        "policy", "add", "--rule-id", "1001", "--protocol", "tcp", "--action", "allow"
    )
    assert (rc, out) == (1, "")
    assert err == "microseg: rule_id 1001 already exists (HTTP 409 duplicate)\n"


def test_policy_add_rejected_by_api(cli: Cli, tmp_path: Path) -> None:
    f = tmp_path / "rule.json"
    f.write_text('{"rule_id": 5, "protocol": "sctp", "action": "allow"}')
    rc, _, err = cli("policy", "add", "--file", str(f))
    assert rc == 1
    assert err == "microseg: protocol: 'sctp' is not one of: tcp, udp (HTTP 400 invalid)\n"


def test_policy_add_dry_run(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli(
        "policy",
        "add",
        "--rule-id",
        "2001",
        "--name",
        "api",
        "--dst-port",
        "8080",
        "--protocol",
        "tcp",
        "--action",
        "deny",
        "--dry-run",
    )
    assert (rc, err) == (0, "")
    assert last(stub).query == {"dry_run": "1"}
    assert 2001 not in stub.rules
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        '+ 2001 "api": deny tcp any -> any port 8080, priority 100, direction any',
        "1 of 3 live sessions would change verdict",
    ]


def test_policy_add_dry_run_json(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli(
        "policy",
        "add",
        "--rule-id",
        "2001",
        "--protocol",
        "tcp",
        "--action",
        "deny",
        "--dry-run",
        "-o",
        "json",
    )
    assert rc == 0
    diff = json.loads(out)
    assert diff["dry_run"] is True
    assert diff["added"][0]["rule_id"] == 2001
    assert diff["sessions_changing_verdict"] == 1


# --------------------------------------------------------------------------- update / delete


def test_policy_update_merges_fields(cli: Cli, stub: Stub) -> None:
    before = copy.deepcopy(stub.rules[1001])
    rc, out, err = cli("policy", "update", "1001", "--dst-port", "8443", "--name", "")
    assert (rc, err) == (0, "")
    get, put = stub.requests[-2:]
    assert (get.method, get.path) == ("GET", "/api/v1/policies/1001")
    assert (put.method, put.path, put.query) == ("PUT", "/api/v1/policies/1001", {})
    # Every other field is the current rule's; the hit counters are not sent back.
    assert put.body == {**before, "dst_port": 8443, "name": ""}
    assert stub.rules[1001] == {**before, "dst_port": 8443, "name": ""}
    lines = out.splitlines()
    assert lines[0] == "updated rule 1001"
    assert lines[2].split()[:2] == ["1001", "-"]


def test_policy_update_from_file(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "patch.json"
    f.write_text('{"action": "log", "priority": 5}')
    rc, _, err = cli("policy", "update", "1002", "--file", str(f), "--priority", "6")
    assert (rc, err) == (0, "")
    assert stub.rules[1002]["action"] == "log"
    assert stub.rules[1002]["priority"] == 6
    assert stub.rules[1002]["dst_port"] == 22


def test_policy_update_cannot_renumber(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "patch.json"
    f.write_text('{"rule_id": 1005, "action": "log"}')
    rc, _, err = cli("policy", "update", "1002", "--file", str(f))
    assert rc == 2
    assert "a rule keeps its id" in err
    assert stub.requests == []


def test_policy_update_nothing_to_change(cli: Cli, stub: Stub) -> None:
    rc, _, err = cli("policy", "update", "1001")
    assert rc == 2
    assert "nothing to change" in err and "--dst-port" in err
    assert stub.requests == []


def test_policy_update_unknown_rule(cli: Cli, stub: Stub) -> None:
    rc, _, err = cli("policy", "update", "4242", "--action", "deny")
    assert rc == 1
    assert err == "microseg: no rule with rule_id 4242 (HTTP 404 not_found)\n"
    assert [r.method for r in stub.requests] == ["GET"]


def test_policy_update_dry_run(cli: Cli, stub: Stub) -> None:
    before = copy.deepcopy(stub.rules[1003])
    rc, out, err = cli(
        "policy", "update", "1003", "--action", "deny", "--dst-port", "80", "--dry-run"
    )
    assert (rc, err) == (0, "")
    assert last(stub).query == {"dry_run": "1"}
    assert stub.rules[1003] == before
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        "~ 1003: dst_port 80-443 -> 80; action allow -> deny",
        "1 of 3 live sessions would change verdict",
    ]


def test_policy_delete(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "delete", "1002")
    assert (rc, out, err) == (0, "deleted rule 1002\n", "")
    assert (last(stub).method, last(stub).path) == ("DELETE", "/api/v1/policies/1002")
    assert 1002 not in stub.rules
    rc, out, err = cli("policy", "delete", "1002")
    assert rc == 1 and "no rule with rule_id 1002 (HTTP 404 not_found)" in err


def test_policy_delete_json_no_body(cli: Cli) -> None:
    rc, out, err = cli("policy", "delete", "1002", "-o", "json")
    assert (rc, out, err) == (0, "", "")


def test_policy_delete_dry_run(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli("policy", "delete", "1002", "--dry-run")
    assert rc == 0
    assert 1002 in stub.rules
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        '- 1002 "no-ssh": deny tcp any -> any port 22, priority 200, direction ingress',
        "1 of 3 live sessions would change verdict",
    ]
