"""Address groups end to end (docs/contract.md §5): a real agent process on the module's lab,
started from a policy file with groups, changed through `microseg group ...` and `microseg
policy ...` (support/cli.py), judged by real traffic from the peer namespace to echo servers in
the host namespace over IPv4 and IPv6 (support/netutil.py). An empty group matches nothing and
a member add makes its rule match at once; a deny by group is reported with the group's name in
the event's rule; groups survive a restart; `policy export` gives back what `policy apply`
takes; bad input is refused with the agent's message and the set kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from support.agentapi import P1, P2, P3, api_of, assert_error
from support.agentproc import AgentFactory, AgentProcess, flows, free_port, rule
from support.cli import cli, cli_fails, cli_json
from support.events import valid
from support.netutil import echo_server, expect_ports, wait_until

from streamer.lab.lab import Lab


def _start(agent_factory: AgentFactory, lab: Lab, tmp_path: Path, doc: dict[str, Any]) -> Any:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    agent = agent_factory(lab, path, api=f"127.0.0.1:{free_port()}")
    agent.start()
    agent.wait_api()
    return agent


def _ok(agent: AgentProcess, *args: str) -> str:
    p = cli(agent, *args)
    assert p.returncode == 0, f"{args}: exit {p.returncode}: {p.stdout}{p.stderr}"
    return p.stdout


def test_groups_through_the_cli_with_real_traffic(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    peers = [lab.peer_v4, f"{lab.peer_v6}/128"]
    doc = {
        "default_action": "deny",
        "groups": {"peers": {"members": []}, "blocked": {"members": []}},
        "policies": [
            rule(1, "tcp", "allow", src_group="peers", dst_port=P1, direction="ingress"),
            rule(2, "tcp", "allow", dst_port=P2, direction="ingress"),
            rule(3, "tcp", "deny", src_group="blocked", priority=300, direction="ingress"),
        ],
    }
    with echo_server(lab.host_ns, (P1, P2, P3)):
        agent = _start(agent_factory, lab, tmp_path, doc)
        expect_ports(lab, {P1: False, P2: True}, "the empty group matches nothing")

        out = _ok(agent, "group", "add", "peers", *peers)
        assert "2 members added" in out and "used by rule 1" in out, out
        expect_ports(lab, {P1: True, P2: True, P3: False}, "right after group add")

        out = _ok(agent, "group", "add", "peers", lab.peer_v4)
        assert "changed nothing (already in group peers)" in out and "no change" in out, out
        listed = cli_json(agent, "group", "list")
        assert listed == {
            "groups": [
                {"name": "blocked", "member_count": 0, "rules": [3]},
                {"name": "peers", "member_count": 2, "rules": [1]},
            ],
            "count": 2,
        }
        table = _ok(agent, "group", "list")
        assert table.splitlines()[0].split() == ["NAME", "MEMBERS", "RULES"], table
        got = cli_json(agent, "group", "get", "peers")
        assert got["members"] == [lab.peer_v4, lab.peer_v6], got
        assert lab.peer_v6 in _ok(agent, "group", "get", "peers")
        assert "group:peers" in _ok(agent, "policy", "list")

        # A deny by group: enforced at once, and its events name the group.
        members_file = tmp_path / "blocked.txt"
        members_file.write_text(f"# the peer\n{lab.peer_v4}\n\n{lab.peer_v6}\n")
        dry = _ok(agent, "group", "set", "blocked", "--file", str(members_file), "--dry-run")
        assert "dry run" in dry and "2 members would be added" in dry, dry
        expect_ports(lab, {P2: True}, "after a dry run")
        _ok(agent, "group", "set", "blocked", "--file", str(members_file))
        expect_ports(lab, {P1: False, P2: False}, "right after group set")

        def denied_by_3() -> list[dict[str, Any]]:
            return [e for e in flows(agent) if (e.get("rule") or {}).get("rule_id") == 3]

        assert wait_until(lambda: bool(denied_by_3()), timeout=10), flows(agent)
        event = denied_by_3()[0]
        valid(event)
        assert event["rule"] == {
            "rule_id": 3,
            "name": "r3",
            "priority": 300,
            "action": "deny",
            "src_group": "blocked",
        }, event

        # Errors: the agent's message, exit 1 (2 for a name the client refuses), nothing lost.
        gen = api_of(agent).policies()["generation"]
        cli_fails(cli(agent, "group", "delete", "peers"), 1, "in_use", "rule 1")
        cli_fails(cli(agent, "group", "add", "nope", "10.0.0.1"), 1, "no group", "404")
        cli_fails(cli(agent, "group", "add", "peers", "10.0.0.1/8"), 1, "host bits", "members[0]")
        cli_fails(cli(agent, "group", "get", "no/pe"), 2, "group name")
        cli_fails(cli(agent, "group", "add", "peers"), 2, "give members")
        cli_fails(
            cli(
                agent,
                "policy",
                "add",
                "--rule-id",
                "9",
                "--protocol",
                "tcp",
                "--action",
                "allow",
                "--src-group",
                "nope",
            ),
            1,
            "src_group",
            "no group",
        )
        cli_fails(
            cli(
                agent,
                "policy",
                "add",
                "--rule-id",
                "9",
                "--protocol",
                "tcp",
                "--action",
                "allow",
                "--src-group",
                "peers",
                "--src-ip",
                "10.0.0.1",
            ),
            1,
            "not both",
        )
        assert api_of(agent).policies()["generation"] == gen

        # update: a new address replaces an end's group.
        _ok(agent, "policy", "update", "3", "--src-ip", "192.0.2.1")
        r3 = cli_json(agent, "policy", "get", "3")
        assert r3["src_ip"] == "192.0.2.1" and "src_group" not in r3, r3
        expect_ports(lab, {P1: True, P2: True}, "rule 3 no longer by group")
        _ok(agent, "policy", "delete", "3")
        out = _ok(agent, "group", "delete", "blocked")
        assert "group blocked deleted" in out, out

        # export | apply: the same set, nothing changes.
        exported = tmp_path / "export.json"
        exported.write_text(_ok(agent, "policy", "export"))
        doc_out = json.loads(exported.read_text())
        assert set(doc_out) == {"default_action", "groups", "policies"}
        assert doc_out["groups"] == {"peers": {"members": [lab.peer_v4, lab.peer_v6]}}
        diff = cli_json(agent, "policy", "apply", str(exported))
        assert diff["added"] == diff["removed"] == diff["changed"] == [], diff
        assert diff["groups_added"] == diff["groups_removed"] == diff["groups_changed"] == []
        yaml_out = _ok(agent, "policy", "export", "--format", "yaml")
        assert "groups:" in yaml_out and "peers:" in yaml_out


def test_groups_survive_a_restart(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    doc = {
        "default_action": "deny",
        "groups": {"peers": {"members": []}},
        "policies": [rule(1, "tcp", "allow", src_group="peers", dst_port=P1)],
    }
    with echo_server(lab.host_ns, (P1, P2)):
        agent = _start(agent_factory, lab, tmp_path, doc)
        api = api_of(agent)
        r = api.call("POST", "/groups/peers/members", {"members": [lab.peer_v4, lab.peer_v6]})
        assert r.status == 200, str(r)
        r = api.call("PUT", "/groups/other", {"members": ["10.99.0.0/16"]})
        assert r.status == 201, str(r)
        before = api.policies()
        groups_before = api.ok("GET", "/groups")
        expect_ports(lab, {P1: True, P2: False}, "before the restart")

        assert agent.stop() == 0
        agent.start()
        agent.wait_api()
        assert api.policies() == before
        assert api.ok("GET", "/groups") == groups_before
        expect_ports(lab, {P1: True, P2: False}, "after the restart")
        # Still a group the rules use: refused; changes go on from the restored generation.
        r = api.call("DELETE", "/groups/peers")
        assert_error(r, 409, "in_use")
        r = api.call("DELETE", "/groups/peers/members", {"members": [lab.peer_v4, lab.peer_v6]})
        assert r.status == 200 and int(r.headers["X-Policy-Generation"]) == (
            before["generation"] + 1
        ), str(r)
        expect_ports(lab, {P1: False}, "after emptying the group")
        assert agent.stop() == 0
