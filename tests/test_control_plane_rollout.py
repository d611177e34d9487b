"""Confirm or revert and the lockout guard end to end (contract §6): real agent processes on the
module's lab, their admin API on real sockets, real traffic from the peer namespace to echo
servers in the host namespace.

- A change made with a confirm window that is not confirmed is reverted by the agent itself:
  the traffic it cut flows again, an `alert` record `policy_reverted` reaches the events file,
  changes.log has the revert (actor `revert`); one confirmed in time stays.
- Bad input (a confirm window out of range, a confirmation of another generation, a bad body,
  a second write while one is pending) answers a clear 4xx and changes nothing.
- An agent SIGKILLed with a pending change reverts it at start when the deadline has passed
  (before the API answers), and resumes the timer when it has not.
- The API served on the lab host's address (the agent in the host namespace) and called from
  the peer namespace: a write that would deny that very connection answers 409 `lockout` and
  changes nothing; with `force=1` it applies and the connection dies.
- The CLI's `--confirm`: confirmed over a new connection; cut off, exit 1 saying the agent
  reverts the change, which it then does.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import REPO
from support.agentapi import P1, P2, Api, Reply, assert_error, ids_of, start_agent
from support.agentproc import AgentFactory, AgentProcess, free_port, rule, write_policy
from support.cli import cli
from support.netutil import echo_server, expect_ports, tcp_connect, wait_until

from streamer.lab.lab import Lab
from streamer.lab.netns import netns_socket

WEB = rule(1, "tcp", "allow", dst_port=P1, direction="ingress")
CUT = {"default_action": "deny", "policies": []}  # P1 closes


def _changes(agent: AgentProcess) -> list[dict[str, Any]]:
    path = agent.state_dir / "changes.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _alerts(agent: AgentProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in agent.events() if e.get("type") == "alert" and e.get("alert") == name]


def _generation(api: Api) -> int:
    gen: int = api.policies()["generation"]
    return gen


# ---- an unconfirmed change reverts; bad input changes nothing -------------------------------


def test_an_unconfirmed_change_is_reverted(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [WEB])
        gen0 = _generation(api)
        before = api.policies()
        for bad, words in (("0", ["out of range", "1..3600"]), ("3601", ["1..3600"])):
            r = api.call("PUT", f"/policies?confirm_within={bad}", CUT)
            assert_error(r, 400, "invalid", "confirm_within", *words)
        assert_error(
            api.call("PUT", "/policies?confirm_within=abc", CUT), 400, "invalid", "whole number"
        )
        assert_error(
            api.call("POST", "/policies/confirm", {"generation": gen0}), 409, "not_pending"
        )
        assert api.policies() == before
        # A dry run with a window is answered and pends nothing.
        dry = api.ok("PUT", "/policies?dry_run=1&confirm_within=3", CUT)
        assert dry["dry_run"] and "pending" not in dry
        assert api.ok("GET", "/status")["pending"] is None

        changed = api.ok("PUT", "/policies?confirm_within=3", CUT)
        gen1 = changed["generation"]
        assert changed["pending"]["generation"] == gen1 and gen1 > gen0, changed
        assert changed["pending"]["deadline"].endswith("Z")
        expect_ports(lab, {P1: False}, "under the pending change")
        status = api.ok("GET", "/status")["pending"]
        assert status["generation"] == gen1 and status["confirm_within"] == 3, status

        # Meanwhile: another write is refused, a wrong generation or a bad body too.
        r = api.call("POST", "/policies", rule(2, "tcp", "allow", dst_port=P2))
        assert_error(r, 409, "pending", f"generation {gen1}", "confirm")
        assert_error(api.call("DELETE", "/groups/nope"), 409, "pending")
        r = api.call("POST", "/policies/confirm", {"generation": gen1 + 9})
        assert_error(r, 409, "not_pending", str(gen1 + 9), f"generation {gen1} is")
        for body, words in (
            ({}, ["missing"]),
            ({"generation": "x"}, ["not a generation"]),
            ({"generation": gen1, "extra": 1}, ["unknown field"]),
            ([gen1], ["not an object"]),
        ):
            assert_error(api.call("POST", "/policies/confirm", body), 400, "invalid", *words)
        assert_error(
            api.call("POST", "/policies/confirm", raw=b"gen", content_type="text/plain"),
            415,
            "unsupported_media_type",
        )
        assert _generation(api) == gen1

        assert wait_until(lambda: _generation(api) == gen1 + 1, timeout=15), agent.log
        expect_ports(lab, {P1: True}, "after the revert")
        after = api.policies()
        assert after["policies"] == before["policies"] and after["default_action"] == "deny"
        assert api.ok("GET", "/status")["pending"] is None
        last = _changes(agent)[-1]
        assert last["actor"] == "revert" and last["generation"] == gen1 + 1, last
        assert last["reverted"] == gen1
        assert wait_until(lambda: bool(_alerts(agent, "policy_reverted")), timeout=10), agent.log
        alert = _alerts(agent, "policy_reverted")[0]
        assert alert["generation"] == gen1 and alert["policy_generation"] == gen1 + 1, alert
        assert alert["severity"] == "warning" and "not confirmed" in alert["message"]
        agent.wait_log(rf"generation {gen1} .* was not confirmed")
        # The revert was the pending change's end: a confirmation now is too late.
        assert_error(
            api.call("POST", "/policies/confirm", {"generation": gen1}), 409, "not_pending"
        )


def test_a_confirmed_change_stays(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [WEB])
        opened = rule(2, "tcp", "allow", dst_port=P2, direction="ingress")
        added = api.ok("POST", "/policies?confirm_within=3", opened, status=201)
        assert added["rule_id"] == 2 and "pending" in added, added
        gen = added["pending"]["generation"]
        assert api.ok("POST", "/policies/confirm", {"generation": gen}) == {
            "generation": gen,
            "confirmed": True,
        }
        assert api.ok("GET", "/status")["pending"] is None
        time.sleep(4)  # past the deadline it would have had
        assert _generation(api) == gen and ids_of(api.policies()["policies"]) == {1, 2}
        expect_ports(lab, {P1: True, P2: True}, "after the confirmed change")
        assert not _alerts(agent, "policy_reverted")
        assert _changes(agent)[-1]["change"] == f"confirm generation {gen}"
        # Group writes pend as well.
        r = api.ok("PUT", "/groups/g?confirm_within=30", {"members": ["10.9.0.0/16"]}, 201)
        assert r["pending"]["generation"] == r["generation"]
        assert api.ok("POST", "/policies/confirm", {"generation": r["generation"]})["confirmed"]


# ---- a restart with a pending change ------------------------------------------------------


def test_a_pending_change_survives_a_kill(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1,)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [WEB])
        gen0 = _generation(api)
        gen1 = api.ok("PUT", "/policies?confirm_within=2", CUT)["generation"]
        agent.kill9()
        expect_ports(lab, {P1: False}, "the killed agent's pinned change")
        time.sleep(2.5)  # the deadline passes while the agent is down
        agent.start()
        agent.wait_api()
        # Reverted before the API answered.
        assert _generation(api) == gen1 + 1
        assert api.ok("GET", "/status")["pending"] is None
        expect_ports(lab, {P1: True}, "after the revert at start")
        last = _changes(agent)[-1]
        assert last["actor"] == "revert" and last["reverted"] == gen1, last
        assert wait_until(lambda: bool(_alerts(agent, "policy_reverted")), timeout=10)
        assert ids_of(api.policies()["policies"]) == {1} and gen0 < gen1

        # Not yet due at start: the timer resumes.
        gen2 = api.ok("PUT", "/policies?confirm_within=8", CUT)["generation"]
        agent.kill9()
        agent.start()
        agent.wait_api()
        pending = api.ok("GET", "/status")["pending"]
        assert pending is not None and pending["generation"] == gen2, pending
        expect_ports(lab, {P1: False}, "the pending change, restored")
        assert wait_until(lambda: _generation(api) == gen2 + 1, timeout=20), agent.log
        expect_ports(lab, {P1: True}, "after the resumed timer's revert")
        assert agent.stop() == 0


# ---- the lockout guard: the agent in the host namespace, the caller in the peer's -----------


class PeerApi(Api):
    """An Api whose TCP connections are made from network namespace `ns`."""

    def __init__(self, ns: str, addr: str, token: str | None) -> None:
        super().__init__(addr, token)
        self.ns = ns

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        host, _, port = str(self.addr).rpartition(":")
        ns = self.ns

        class Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                s = netns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(timeout)
                s.connect((host, int(port)))
                self.sock = s

        return Conn(host, int(port), timeout=timeout)


def _host_agent(
    agent_factory: AgentFactory, lab: Lab, tmp_path: Path, rules: list[dict[str, Any]]
) -> tuple[AgentProcess, Api, PeerApi, int]:
    """An agent running in the lab's host namespace, its API on the host's address and on a
    Unix socket; its rules plus one allowing the API port in."""
    port = free_port()
    sock = tmp_path / "api.sock"
    policy = write_policy(
        tmp_path / "policy.json",
        [rule(100, "tcp", "allow", dst_port=port, direction="ingress", name="api"), *rules],
        "deny",
    )
    agent = agent_factory(
        lab,
        policy,
        api=f"{lab.host_v4}:{port}",
        extra_args=["--api", f"unix:{sock}"],
        command=["nsenter", f"--net=/run/netns/{lab.host_ns}", sys.executable, "-m", "streamer"],
    )
    agent.start()
    agent.wait_api()
    local = Api(unix=sock, token=agent.token())
    return agent, local, PeerApi(lab.peer_ns, f"{lab.host_v4}:{port}", agent.token()), port


def test_a_write_that_would_lock_the_caller_out_is_refused(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    agent, local, peer, port = _host_agent(agent_factory, lab, tmp_path, [WEB])
    before = local.policies()
    conn = f"tcp {lab.peer_v4}:"
    # The whole set without the API's rule: the default denies.
    r = peer.call("PUT", "/policies", {"default_action": "deny", "policies": [WEB]})
    assert_error(r, 409, "lockout", conn, f"{lab.host_v4}:{port}", "default action", "force=1")
    # A rule denying the port.
    block = rule(5, "tcp", "deny", dst_port=port, priority=500, name="no-api")
    assert_error(peer.call("POST", "/policies", block), 409, "lockout", "rule 5 'no-api'")
    assert_error(peer.call("DELETE", "/policies/100"), 409, "lockout", "ingress on")
    update = {**rule(100, "tcp", "allow", dst_port=port + 1, direction="ingress")}
    assert_error(peer.call("PUT", "/policies/100", update), 409, "lockout")
    # A group write: the API's rule allows only members of a group holding the caller.
    assert local.ok("PUT", "/groups/admins", {"members": [lab.peer_v4]}, 201)
    via_group = rule(100, "tcp", "allow", dst_port=port, direction="ingress", src_group="admins")
    assert local.ok("PUT", "/policies/100", via_group)["src_group"] == "admins"
    r = peer.call("DELETE", "/groups/admins/members", {"members": [lab.peer_v4]})
    assert_error(r, 409, "lockout", conn)
    assert_error(peer.call("PUT", "/groups/admins", {"members": []}), 409, "lockout")
    held = local.policies()
    assert held["generation"] == before["generation"] + 2  # only the local writes
    # Harmless writes from the peer pass; a dry run is only a dry run.
    assert peer.ok("POST", "/policies", rule(6, "udp", "allow", dst_port=9), 201)["rule_id"] == 6
    assert peer.ok("PUT", "/policies?dry_run=1", {"default_action": "deny"})["dry_run"]
    # Unix-socket callers cross no interface: not guarded.
    assert local.ok("POST", "/groups/admins/members", {"members": ["10.77.0.1"]})

    # force=1: applied, and the connection it came on dies with it.
    gen = local.policies()["generation"]
    with pytest.raises((TimeoutError, OSError, http.client.HTTPException)):
        peer.call("PUT", "/policies?force=1", {"default_action": "deny", "policies": []}, timeout=3)
    assert local.policies()["generation"] == gen + 1
    assert local.policies()["policies"] == []
    assert not tcp_connect(lab.peer_ns, lab.host_v4, port, timeout=1.0)
    assert agent.stop() == 0


# ---- the CLI's --confirm ----------------------------------------------------------------


def _peer_cli(
    lab: Lab, agent: AgentProcess, port: int, *args: str
) -> subprocess.CompletedProcess[str]:
    argv = ["nsenter", f"--net=/run/netns/{lab.peer_ns}", sys.executable, "-m", "streamer"]
    argv += [*args, "--api", f"{lab.host_v4}:{port}", "--state-dir", str(agent.state_dir)]
    env = {k: v for k, v in os.environ.items() if k != "MICROSEG_TOKEN"}
    p = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=REPO, env=env)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_cli_confirm(module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path) -> None:
    lab = module_lab
    agent, local, _, port = _host_agent(agent_factory, lab, tmp_path, [WEB])
    gen0 = local.policies()["generation"]

    # From the peer, a change that keeps the API reachable: applied and confirmed.
    p = _peer_cli(
        lab,
        agent,
        port,
        "policy",
        "add",
        "--rule-id",
        "7",
        "--protocol",
        "udp",
        "--action",
        "allow",
        "--dst-port",
        "53",
        "--confirm",
        "30",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"generation {gen0 + 1} confirmed over a new connection" in p.stdout
    assert local.ok("GET", "/status")["pending"] is None

    # One that cuts the CLI off (forced past the guard): exit 1, then the agent reverts it.
    p = _peer_cli(lab, agent, port, "policy", "delete", "100", "--confirm", "2", "--force")
    assert p.returncode == 1, p.stdout + p.stderr
    # Cut off before the answer, or the confirmation getting through only after the revert:
    # either way the command says so.
    assert (
        "reverts it by itself within 2 s" in p.stderr
        or "the agent has reverted it" in p.stderr
        or "the agent reverts it at" in p.stderr
    ), p.stderr
    assert wait_until(lambda: local.policies()["generation"] == gen0 + 3, timeout=20), agent.log
    assert 100 in ids_of(local.policies()["policies"])
    assert _changes(agent)[-1]["actor"] == "revert"
    assert tcp_connect(lab.peer_ns, lab.host_v4, port, timeout=2.0)

    # Without --force the guard refuses it, and nothing pends.
    p = _peer_cli(lab, agent, port, "policy", "delete", "100", "--confirm", "2")
    assert p.returncode == 1 and "HTTP 409 lockout" in p.stderr, p.stderr
    assert local.ok("GET", "/status")["pending"] is None

    # `policy confirm` by hand, over the Unix socket.
    r: Reply = local.call("PUT", "/groups/ops?confirm_within=60", {"members": ["10.1.0.0/16"]})
    gen = r.body["generation"]
    p = cli(agent, "policy", "confirm", str(gen), api=f"unix:{tmp_path / 'api.sock'}")
    assert p.returncode == 0 and f"generation {gen} confirmed" in p.stdout, p.stderr
    p = cli(agent, "policy", "confirm", str(gen), api=f"unix:{tmp_path / 'api.sock'}")
    assert p.returncode == 1 and "not_pending" in p.stderr
