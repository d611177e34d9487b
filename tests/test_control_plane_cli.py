"""The control plane end to end, the `microseg` CLI against the real agent, and a bad policy file
(on SIGHUP or `policy load`) keeping the live set. A real agent process on the module's lab
(each test starts its own: own pin instance, state dir and API port), its admin API on a real
socket, and real traffic from the peer namespace to echo servers in the host namespace over IPv4
and IPv6 at once (support/netutil.py). A probe that must fail waits out NEG_TIMEOUT; "enforced
when the response arrives" means the probe runs right after the response, with no retry or wait."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from support.agentapi import P1, P2, P3, assert_error, ids_of, start_agent
from support.agentproc import AgentFactory, free_port, rule, write_policy
from support.cli import cli, cli_fails, cli_json
from support.netutil import POS_TIMEOUT, TcpConn, echo_server, expect_ports

from streamer.lab.lab import Lab

# ---- 6. the CLI against the real agent ----------------------------------------------------


def test_cli_against_real_agent(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    sock = tmp_path / "api.sock"
    web = rule(1, "tcp", "allow", dst_port=P1, direction="ingress")
    with echo_server(lab.host_ns, (P1, P2, P3)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [web], unix=sock)
        gen0 = api.policies()["generation"]

        data = cli_json(agent, "policy", "list")
        assert ids_of(data["policies"]) == {1} and data["generation"] == gen0
        p = cli(agent, "policy", "list")
        assert p.returncode == 0 and p.stdout.split()[:2] == ["ID", "NAME"], p.stdout
        assert f"1 rule, default action deny, generation {gen0}" in p.stdout

        # add: enforced when the command returns
        added = cli_json(
            agent,
            "policy",
            "add",
            "--rule-id",
            "10",
            "--protocol",
            "tcp",
            "--action",
            "allow",
            "--dst-port",
            str(P2),
            "--direction",
            "ingress",
            "--name",
            "cli-web",
        )
        expect_ports(lab, {P2: True}, "after `policy add`")
        assert added["rule_id"] == 10 and added["name"] == "cli-web", added
        got = cli_json(agent, "policy", "get", "10")
        assert got["action"] == "allow" and got["packets"] >= 2 and got["last_hit"], got
        p = cli(agent, "policy", "get", "10")
        assert p.returncode == 0 and "cli-web" in p.stdout and "packets" in p.stdout

        p = cli(agent, "policy", "update", "10", "--action", "deny")
        expect_ports(lab, {P2: False, P1: True}, "after `policy update`")
        assert p.returncode == 0 and "updated rule 10" in p.stdout, p.stdout + p.stderr
        assert cli_json(agent, "policy", "get", "10")["action"] == "deny"

        # The API's refusals, printed, exit 1; bad arguments exit 2.
        cli_fails(
            cli(
                agent,
                "policy",
                "add",
                "--rule-id",
                "11",
                "--protocol",
                "icmp",
                "--action",
                "allow",
                "--dst-port",
                "22",
            ),
            1,
            "port",
            "HTTP 400",
        )
        cli_fails(
            cli(agent, "policy", "add", "--rule-id", "10", "--protocol", "tcp", "--action", "deny"),
            1,
            "already exists",
            "HTTP 409",
        )
        cli_fails(cli(agent, "policy", "get", "777"), 1, "777", "HTTP 404")
        cli_fails(cli(agent, "policy", "get", "abc"), 2, "rule_id")
        cli_fails(cli(agent, "policy", "add", "--rule-id", "12"), 2, "--protocol", "--action")

        deleted = cli_json(agent, "policy", "delete", "10")
        assert deleted["rule_id"] == 10
        cli_fails(cli(agent, "policy", "delete", "10"), 1, "no rule with rule_id 10", "HTTP 404")

        # apply: a whole set from a file, dry run first
        f = tmp_path / "apply.json"
        write_policy(f, [web, rule(20, "tcp", "allow", dst_port=P3, direction="ingress")])
        p = cli(agent, "policy", "apply", str(f), "--dry-run")
        assert p.returncode == 0 and "nothing was applied" in p.stdout, p.stdout + p.stderr
        assert "+ 20" in p.stdout
        expect_ports(lab, {P3: False}, "after `policy apply --dry-run`")
        p = cli(agent, "policy", "apply", str(f))
        expect_ports(lab, {P3: True}, "after `policy apply`")
        assert p.returncode == 0 and "applied: now generation" in p.stdout, p.stdout + p.stderr

        # load: the agent re-reads its own policy file
        write_policy(
            agent.policy_file, [web, rule(30, "tcp", "allow", dst_port=P2, direction="ingress")]
        )
        diff = cli_json(agent, "policy", "load")
        expect_ports(lab, {P2: True, P3: False}, "after `policy load`")
        assert ids_of(diff["added"]) == {30} and ids_of(diff["removed"]) == {20}, diff

        with TcpConn(lab.peer_ns, lab.host_v4, P2, timeout=POS_TIMEOUT) as conn:
            assert conn.exchange()
            sport = conn.sock.getsockname()[1]
            ses = cli_json(agent, "session", "list", "--port", str(sport), "--protocol", "tcp")
            assert ses["count"] == 1, ses
            s = ses["sessions"][0]
            assert (s["dst_port"], s["verdict"], s["rule_id"]) == (P2, "allow", 30), s
            p = cli(agent, "session", "list", "--port", str(sport))
            assert p.returncode == 0 and f"{lab.peer_v4}:{sport}" in p.stdout, p.stdout
            assert "1 session" in p.stdout

        stats = cli_json(agent, "stats")
        assert stats["total_packets"] > 0 and stats["denied_packets"] > 0, stats
        assert "allow_rate" in cli_json(agent, "stats", "--packets")
        p = cli(agent, "stats", "--policies")
        assert p.returncode == 0 and "hit_rate" in p.stdout and "%" in p.stdout, p.stdout

        # The Unix socket needs no token; a wrong token or no agent: exit 1 with the reason.
        nowhere = tmp_path / "no-state"
        p = cli(agent, "policy", "list", "-o", "json", api=f"unix:{sock}", state_dir=nowhere)
        assert p.returncode == 0, p.stderr
        assert ids_of(json.loads(p.stdout)["policies"]) == {1, 30}
        cli_fails(
            cli(agent, "policy", "list", env={"MICROSEG_TOKEN": "wrong"}),
            1,
            "wrong token",
            "HTTP 401",
        )
        cli_fails(
            cli(agent, "policy", "list", state_dir=nowhere),
            1,
            "HTTP 401",
            str(nowhere / "api-token"),
        )
        cli_fails(cli(agent, "stats", api=f"127.0.0.1:{free_port()}"), 1, "not reachable")


# ---- 7. a bad policy file, on SIGHUP or `policy load`, keeps the set ------------------------


def test_bad_policy_file_keeps_the_set(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    good = [rule(1, "tcp", "allow", dst_port=P1, direction="ingress")]
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = start_agent(agent_factory, lab, tmp_path, good)
        before = api.policies()
        gen0 = before["generation"]
        policy = agent.policy_file
        also = rule(2, "tcp", "allow", dst_port=P2, direction="ingress")
        bad: dict[str, tuple[Callable[[], object], list[str]]] = {
            # A valid rule next to an invalid one: the valid one must not be applied either.
            "invalid rule": (
                lambda: write_policy(policy, [*good, also, rule(3, "icmp", "allow", dst_port=5)]),
                ["port", "icmp"],
            ),
            "duplicate rule_id": (
                lambda: write_policy(policy, [*good, also, {**also, "name": "x"}]),
                ["rule_id", "2"],
            ),
            "bad default": (
                lambda: write_policy(policy, [*good, also], "maybe"),
                ["default_action"],
            ),
            "not JSON": (lambda: policy.write_text('{"policies": [ {"rule_id": 2,'), [policy.name]),
            "missing file": (lambda: policy.unlink(), [policy.name]),
        }
        for what, (make_bad, words) in bad.items():
            make_bad()
            line = agent.reload(expect_applied=False)
            assert f"generation {gen0} stays" in line, f"{what}: {line}"
            assert_error(api.call("POST", "/policies/reload"), 400, "invalid", *words)
            cli_fails(cli(agent, "policy", "load"), 1, "HTTP 400", *words)
            assert api.policies() == before, what
            expect_ports(lab, {P1: True, P2: False}, f"after a {what} reload")
        write_policy(policy, [*good, also])
        p = cli(agent, "policy", "load")
        expect_ports(lab, {P1: True, P2: True}, "after a good `policy load`")
        assert p.returncode == 0 and "reloaded the agent's policy file" in p.stdout, p.stderr
        assert api.policies()["generation"] == gen0 + 1
        assert agent.stop() == 0
