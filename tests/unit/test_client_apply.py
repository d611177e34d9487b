"""The API clients (streamer/cli/) against the stub admin API (support/stubapi.py):
`policy apply` and `policy load` (JSON, YAML, stdin, dry runs, rejections), and the pure
output helpers (`format_table`, `render_diff`, `ClientError`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.stubapi import SEED_RULES, Cli, Stub, last, write_set

from streamer.cli.errors import ClientError
from streamer.cli.output import format_table, render_diff

# --------------------------------------------------------------------------- apply / load


def test_policy_apply_json(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    rules = [
        {**SEED_RULES[0], "dst_port": 8443},
        {"rule_id": 1009, "name": "dns", "dst_port": 53, "protocol": "udp", "action": "allow"},
    ]
    f = write_set(tmp_path / "set.json", "allow", rules)
    rc, out, err = cli("policy", "apply", str(f))
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert (seen.method, seen.path, seen.query) == ("PUT", "/api/v1/policies", {})
    assert seen.body == {"default_action": "allow", "policies": rules}
    assert out.splitlines() == [
        "applied: now generation 8",
        '+ 1009 "dns": allow udp any -> any port 53, priority 100, direction any',
        '- 1002 "no-ssh": deny tcp any -> any port 22, priority 200, direction ingress',
        "- 1003: allow tcp any -> 198.18.0.0/15 port 80-443, priority 100, direction any",
        '~ 1001 "https-to-web": dst_port 443 -> 8443',
        "~ default action changed to allow",
    ]
    assert sorted(stub.rules) == [1001, 1009]
    assert stub.default_action == "allow"


def test_policy_apply_yaml_dry_run(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "set.yaml"
    f.write_text(
        "default_action: deny\n"
        "policies:\n"
        + "".join(f"  - {json.dumps(r)}\n" for r in SEED_RULES)
        + "  - {rule_id: 1010, name: 2024-01-01, protocol: icmp, action: allow}\n"
    )
    rc, out, err = cli("policy", "apply", str(f), "--dry-run")
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert seen.query == {"dry_run": "1"}
    assert seen.body["policies"][-1]["name"] == "2024-01-01"  # a YAML date, sent as text
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        '+ 1010 "2024-01-01": allow icmp any -> any, priority 100, direction any',
        "1 of 3 live sessions would change verdict",
    ]
    assert 1010 not in stub.rules


def test_policy_apply_no_changes(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = write_set(tmp_path / "same.json", "deny", SEED_RULES)
    rc, out, _ = cli("policy", "apply", str(f), "--dry-run")
    assert rc == 0
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        "no changes",
        "1 of 3 live sessions would change verdict",  # the stub's canned count
    ]


def test_policy_apply_from_stdin(cli: Cli, stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("default_action: allow\npolicies: []\n"))
    rc, out, err = cli("policy", "apply", "-")
    assert (rc, err) == (0, "")
    assert out.splitlines()[0] == "applied: now generation 8"
    assert last(stub).body == {"default_action": "allow", "policies": []}
    assert stub.rules == {}


def test_policy_apply_rejected(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = write_set(tmp_path / "dup.json", "deny", [SEED_RULES[0], SEED_RULES[0]])
    rc, out, err = cli("policy", "apply", str(f))
    assert (rc, out) == (1, "")
    assert err == "microseg: policies[1]: rule_id: duplicate (HTTP 400 invalid)\n"
    assert stub.generation == 7


def test_policy_apply_top_level_must_be_an_object(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "list.json"
    f.write_text("[]")
    rc, _, err = cli("policy", "apply", str(f))
    assert rc == 2
    assert "the top level is list: expected an object" in err
    assert stub.requests == []


def test_policy_apply_json_output(cli: Cli, tmp_path: Path) -> None:
    f = write_set(tmp_path / "set.json", "deny", SEED_RULES[:1])
    rc, out, _ = cli("policy", "apply", str(f), "-o", "json")
    assert rc == 0
    diff = json.loads(out)
    assert diff["dry_run"] is False
    assert [r["rule_id"] for r in diff["removed"]] == [1002, 1003]
    assert "sessions_checked" not in diff


def test_policy_load(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "load")
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert (seen.method, seen.path, seen.body) == ("POST", "/api/v1/policies/reload", None)
    assert out.splitlines() == [
        "reloaded the agent's policy file",
        "applied: now generation 8",
        "- 1003: allow tcp any -> 198.18.0.0/15 port 80-443, priority 100, direction any",
    ]


def test_policy_load_file_is_apply(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = write_set(tmp_path / "set.json", "deny", SEED_RULES[:2])
    rc, out, _ = cli("policy", "load", "--file", str(f))
    assert (rc, out.splitlines()[0]) == (0, "applied: now generation 8")
    assert (last(stub).method, last(stub).path, last(stub).query) == ("PUT", "/api/v1/policies", {})
    assert sorted(stub.rules) == [1001, 1002]


# --------------------------------------------------------------------------- pure helpers


def test_format_table() -> None:
    text = format_table(["A", "LONG", "N"], [["xx", "y", "5"], ["z", "", "123"]], right=(2,))
    assert text.splitlines() == [
        "A   LONG    N",
        "xx  y       5",
        "z         123",
    ]


def test_render_diff_changed_fields_and_default() -> None:
    diff = {
        "dry_run": True,
        "generation": 3,
        "added": [],
        "removed": [],
        "changed": [
            {
                "before": {**SEED_RULES[1]},
                "after": {**SEED_RULES[1], "priority": 50, "direction": "any"},
            }
        ],
        "default_action_changed": True,
        "sessions_checked": 10,
        "sessions_changing_verdict": 4,
    }
    assert render_diff(diff, "allow").splitlines() == [
        "dry run against generation 3: nothing was applied",
        '~ 1002 "no-ssh": priority 200 -> 50; direction ingress -> any',
        "~ default action would change to allow",
        "4 of 10 live sessions would change verdict",
    ]


def test_client_error_text() -> None:
    assert str(ClientError("x")) == "x"
    assert ClientError("x").exit_status == 1
