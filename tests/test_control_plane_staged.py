"""Staged rules and failsafe end to end (docs/contract.md §6): a real agent process on the
module's lab, real traffic from the peer namespace to echo servers in the host namespace.

- A staged deny on a live connection: traffic goes on, the flow's events carry the staged
  verdict and rule, the rule counts what it would have decided; `microseg policy promote`
  answers with those counts and the connection stops at its next packet.
- Staged rules under default allow and default deny; `--policy-mode staged` drops nothing
  and reports every flow the policy would deny.
- Failsafe: under default deny with no rules, a TCP listener on port 22 of the host is
  reachable from the peer while failsafe is on (counted as `failsafe_passed`), and not with
  `--failsafe none`; a CIDR that does not hold the peer does not exempt it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.agentapi import P1, P2, P3, Api, api_stats, start_agent
from support.agentproc import AgentFactory, AgentProcess, flows, free_port, rule
from support.cli import cli, cli_json
from support.netutil import TcpConn, echo_server, expect_ports, wait_until

from streamer.lab.lab import Lab

SSH = 22


def _agent(
    agent_factory: AgentFactory,
    lab: Lab,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    default: str = "deny",
    **kwargs: Any,
) -> tuple[AgentProcess, Api]:
    """support.agentapi.start_agent with a policy file of its own (a test starts several)."""
    name = f"policy-{free_port()}.json"
    return start_agent(agent_factory, lab, tmp_path, rules, default, name=name, **kwargs)


def _staged_events(agent: AgentProcess, port: int) -> list[dict[str, Any]]:
    return [e for e in flows(agent) if e.get("dst_port") == port and "staged" in e]


def test_a_staged_deny_reports_then_promote_enforces(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = _agent(
            agent_factory,
            lab,
            tmp_path,
            [rule(1, "tcp", "allow", dst_port=f"{P1}-{P2}", direction="ingress")],
        )
        with TcpConn(lab.peer_ns, lab.host_v4, P1) as conn:
            assert conn.exchange()
            staged = rule(
                7, "tcp", "deny", dst_port=P1, priority=300, direction="ingress", mode="staged"
            )
            api.ok("POST", "/policies", staged, 201)
            # Staged: the live connection goes on, and a new one is allowed too.
            for _ in range(5):
                assert conn.exchange(), "a staged deny cut the connection"
            expect_ports(lab, {P1: True, P2: True}, "with the staged deny")
            assert wait_until(lambda: bool(_staged_events(agent, P1)), timeout=10), flows(agent)
            event = _staged_events(agent, P1)[0]
            assert event["verdict"] == "allow" and event["rule"]["rule_id"] == 1, event
            assert event["staged"]["verdict"] == "deny", event
            assert event["staged"]["rule"]["rule_id"] == 7, event
            assert event["staged"]["rule"]["mode"] == "staged", event
            assert not _staged_events(agent, P2), "a port the staged rule does not name"
            got = api.ok("GET", "/policies/7")
            assert got["mode"] == "staged" and got["staged_flows"] >= 2, got
            assert got["staged_packets"] >= 5 and got["staged_bytes"] > 0, got

            # Promote: the answer says what it decided while staged; then it enforces.
            p = cli(agent, "policy", "promote", "7", "--dry-run")
            assert p.returncode == 0 and "dry run" in p.stdout, p.stdout + p.stderr
            assert conn.exchange(), "a dry run changed enforcement"
            promoted = cli_json(agent, "policy", "promote", "7")
            assert [q["rule_id"] for q in promoted["promoted"]] == [7], promoted
            assert promoted["promoted"][0]["staged_flows"] >= 2, promoted
            assert not conn.exchange(), "the promoted deny did not cut the live connection"
        expect_ports(lab, {P1: False, P2: True}, "after promote")
        assert "mode" not in api.ok("GET", "/policies/7")


def test_staged_rules_under_both_default_actions(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2, P3)):
        # Default allow: a staged deny drops nothing; a staged allow changes nothing either.
        agent, _ = _agent(
            agent_factory,
            lab,
            tmp_path,
            [rule(3, "tcp", "deny", dst_port=P3, direction="ingress", mode="staged")],
            default="allow",
        )
        expect_ports(lab, {P1: True, P3: True}, "default allow with a staged deny")
        assert wait_until(lambda: bool(_staged_events(agent, P3)), timeout=10)
        assert not _staged_events(agent, P1)
        agent.stop()
        # Default deny: a staged allow passes nothing, and the would-be allow is reported
        # beside the real deny.
        agent, _ = _agent(
            agent_factory,
            lab,
            tmp_path,
            [rule(4, "tcp", "allow", dst_port=P2, direction="ingress", mode="staged")],
        )
        expect_ports(lab, {P1: False, P2: False}, "default deny with a staged allow")

        def staged_allow() -> list[dict[str, Any]]:
            return [e for e in _staged_events(agent, P2) if e["verdict"] == "deny"]

        assert wait_until(lambda: bool(staged_allow()), timeout=10), flows(agent)
        event = staged_allow()[0]
        assert event["rule"] is None and event["staged"]["verdict"] == "allow", event
        assert event["staged"]["rule"]["rule_id"] == 4, event


def test_policy_mode_staged_drops_nothing_and_reports_every_denial(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = _agent(
            agent_factory,
            lab,
            tmp_path,
            [rule(5, "tcp", "deny", dst_port=P1, direction="ingress")],
            extra_args=["--policy-mode", "staged"],
        )
        expect_ports(lab, {P1: True, P2: True}, "--policy-mode staged")
        for port, rid in ((P1, 5), (P2, None)):
            assert wait_until(lambda p=port: bool(_staged_events(agent, p)), timeout=10)
            event = _staged_events(agent, port)[0]
            assert event["verdict"] == "allow", event
            assert event["staged"]["verdict"] == "deny", event
            got = event["staged"]["rule"]
            assert (got or {}).get("rule_id") == rid, event
        assert api.ok("GET", "/status")["policy_mode"] == "staged"
        r = api.call("POST", "/policies/5/promote")
        assert r.status == 409 and r.body["error"] == "staged_agent", r


def test_failsafe_keeps_ssh_open_under_default_deny(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (SSH, P1)):
        agent, api = _agent(agent_factory, lab, tmp_path, [], failsafe=None)
        expect_ports(lab, {SSH: True, P1: False}, "default deny, failsafe on (the default)")
        assert api_stats(agent)["failsafe_passed"] > 0
        status = api.ok("GET", "/status")
        assert "tcp:22:in" in status["failsafe"], status
        listed = cli(agent, "policy", "list").stdout
        assert "failsafe (passes before any rule): tcp:22:in" in listed, listed
        agent.stop()

        agent, api = _agent(agent_factory, lab, tmp_path, [], failsafe="none")
        expect_ports(lab, {SSH: False, P1: False}, "--failsafe none")
        assert api.ok("GET", "/status")["failsafe"] == []
        agent.stop()

        # Scoped to a network the peer is not in: no exemption; to the peer's: SSH passes.
        agent, _ = _agent(agent_factory, lab, tmp_path, [], failsafe="tcp:22:in@192.0.2.0/24")
        expect_ports(lab, {SSH: False}, "failsafe scoped away from the peer")
        agent.stop()
        scoped = f"tcp:22:in@{lab.peer_v4}/32,tcp:22:in@{lab.peer_v6}/128"
        agent, _ = _agent(agent_factory, lab, tmp_path, [], failsafe=scoped)
        expect_ports(lab, {SSH: True, P1: False}, "failsafe scoped to the peer")


def test_a_restart_with_another_failsafe_list_judges_live_flows_again(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """The pins outlive the agent (SIGKILL): a connection that only the old failsafe list
    passed is cut once the agent is back with `--failsafe none`, not at the next change."""
    lab = module_lab
    with echo_server(lab.host_ns, (SSH,)):
        agent, _ = _agent(agent_factory, lab, tmp_path, [], failsafe="tcp:22:in")
        conn = TcpConn(lab.peer_ns, lab.host_v4, SSH)
        try:
            assert conn.exchange(), "failsafe SSH under default deny"
            agent.kill9()
            assert conn.exchange(), "the pins enforce on while the agent is down"
            agent.failsafe = "none"
            agent.start()
            agent.wait_log(r"failsafe entries or timeouts changed", timeout=5)
            assert not conn.exchange(), "a flow only the old failsafe list passed goes on"
        finally:
            conn.close()
        assert agent.stop() == 0
