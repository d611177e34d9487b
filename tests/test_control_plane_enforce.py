"""The control plane end to end, enforcement: each accepted change is enforced when its response
arrives; 100 concurrent writes leave the API, the disk and the kernel agreeing. A real agent
process on the module's lab (each test starts its own: own pin instance, state dir and API
port), its admin API on a real socket, and real traffic from the peer namespace to echo servers
in the host namespace over IPv4 and IPv6 at once (support/netutil.py). A probe that must fail
waits out NEG_TIMEOUT; "enforced when the response arrives" means the probe runs right after the
response, with no retry or wait."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from support.agentapi import (
    P1,
    P2,
    P3,
    PREFIX,
    assert_error,
    by_id,
    ids_of,
    start_agent,
)
from support.agentproc import AgentFactory, rule
from support.netutil import (
    FAMILIES,
    NEG_TIMEOUT,
    POS_TIMEOUT,
    TcpConn,
    echo_server,
    expect_ports,
    host,
)

from streamer.lab.lab import Lab
from streamer.policy.store import persisted_document

# ---- 1. each accepted change is enforced when its response arrives --------------------------


def test_each_change_is_enforced_when_its_response_arrives(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2, P3)):
        agent, api = start_agent(
            agent_factory,
            lab,
            tmp_path,
            [rule(1, "tcp", "allow", dst_port=P3, direction="ingress")],
            default="allow",
        )
        expect_ports(lab, {P1: True, P2: True, P3: True}, "before any change")
        gen = api.policies()["generation"]

        # POST a deny: the next connection is refused by the kernel.
        r = api.call("POST", "/policies", rule(10, "tcp", "deny", dst_port=P1))
        assert r.status == 201, str(r)
        expect_ports(lab, {P1: False}, "right after POST 201")
        assert r.headers["Location"] == f"{PREFIX}/policies/10"
        assert int(r.headers["X-Policy-Generation"]) == gen + 1
        expect_ports(lab, {P2: True, P3: True}, "after POST, other ports")

        # DELETE it: the very next connection passes.
        r = api.call("DELETE", "/policies/10")
        assert r.status == 200 and r.body["rule_id"] == 10, str(r)
        expect_ports(lab, {P1: True}, "right after DELETE")
        assert int(r.headers["X-Policy-Generation"]) == gen + 2

        # PUT one rule allow -> deny: a live connection is cut at its next exchange.
        api.ok("POST", "/policies", rule(20, "tcp", "allow", dst_port=P2, priority=200), 201)
        conns = {
            fam: TcpConn(lab.peer_ns, host(lab, fam), P2, timeout=POS_TIMEOUT) for fam in FAMILIES
        }
        try:
            for fam, conn in conns.items():
                assert conn.exchange(), f"{fam}: allowed connection does not work"
            r = api.call("PUT", "/policies/20", rule(20, "tcp", "deny", dst_port=P2, priority=200))
            assert r.status == 200 and r.body["action"] == "deny", str(r)
            cut = {fam: conn.exchange(NEG_TIMEOUT) for fam, conn in conns.items()}
            assert cut == {"v4": False, "v6": False}, f"live connections not cut: {cut}"
        finally:
            for conn in conns.values():
                conn.close()
        expect_ports(lab, {P2: False, P1: True}, "after PUT allow->deny")

        # PUT the whole set: default deny, only P1 allowed, at once.
        new_set = {
            "default_action": "deny",
            "policies": [rule(30, "tcp", "allow", dst_port=P1, direction="ingress")],
        }
        r = api.call("PUT", "/policies", new_set)
        assert r.status == 200, str(r)
        expect_ports(lab, {P1: True, P2: False, P3: False}, "right after PUT /policies")
        diff = r.body
        assert ids_of(diff["added"]) == {30} and ids_of(diff["removed"]) == {1, 20}, diff
        assert diff["default_action_changed"] is True and diff["dry_run"] is False
        listed = api.policies()
        assert ids_of(listed["policies"]) == {30} and listed["default_action"] == "deny"
        assert listed["generation"] == int(r.headers["X-Policy-Generation"]) == gen + 5
        assert agent.running


def test_dry_run_changes_nothing_and_counts_sessions(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    allow1 = rule(1, "tcp", "allow", dst_port=P1, direction="ingress")
    allow2 = rule(2, "tcp", "allow", dst_port=P2, direction="ingress")
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [allow1, allow2])
        before = api.policies()
        changes_log = agent.state_dir / "changes.log"
        log_before = changes_log.read_bytes() if changes_log.exists() else b""
        conns = {
            fam: TcpConn(lab.peer_ns, host(lab, fam), P1, timeout=POS_TIMEOUT) for fam in FAMILIES
        }
        try:
            for conn in conns.values():
                assert conn.exchange()
            # Each of these would deny the live connections to P1 (one per family).
            cutting: list[tuple[str, str, Any, Callable[[dict[str, Any]], bool]]] = [
                (
                    "POST",
                    "/policies?dry_run=1",
                    rule(40, "tcp", "deny", dst_port=P1, priority=200),
                    lambda d: ids_of(d["added"]) == {40} and not d["removed"],
                ),
                (
                    "PUT",
                    "/policies/1?dry_run=1",
                    {**allow1, "action": "deny"},
                    lambda d: [c["after"]["action"] for c in d["changed"]] == ["deny"],
                ),
                (
                    "DELETE",
                    "/policies/1?dry_run=1",
                    None,
                    lambda d: ids_of(d["removed"]) == {1} and not d["added"],
                ),
                (
                    "PUT",
                    "/policies?dry_run=1",
                    {"default_action": "deny", "policies": [allow2]},
                    lambda d: ids_of(d["removed"]) == {1},
                ),
            ]
            for method, path, body, diff_ok in cutting:
                r = api.call(method, path, body)
                assert r.status == 200, f"{method} {path}: {r}"
                d = r.body
                assert d["dry_run"] is True and diff_ok(d), f"{method} {path}: {d}"
                assert d["generation"] == before["generation"], d
                assert int(r.headers["X-Policy-Generation"]) == before["generation"]
                assert d["sessions_changing_verdict"] >= 2, f"{method} {path}: {d}"
                assert d["sessions_checked"] >= d["sessions_changing_verdict"]
                # Nothing applied: the live connections and new ones still pass.
                for fam, conn in conns.items():
                    assert conn.exchange(), f"{fam}: {method} {path} cut a live connection"
                expect_ports(lab, {P1: True, P2: True}, f"after {method} {path}")
                assert api.policies() == before, f"{method} {path} changed the set"
            # A change that touches no live session says so.
            r = api.call("POST", "/policies?dry_run=1", rule(41, "tcp", "deny", dst_port=9))
            assert r.status == 200 and r.body["sessions_changing_verdict"] == 0, str(r)
            # A dry run is checked like the real thing.
            assert_error(api.call("POST", "/policies?dry_run=1", allow1), 409, "conflict", "1")
            assert_error(api.call("DELETE", "/policies/77?dry_run=1"), 404, "not_found", "77")
        finally:
            for conn in conns.values():
                conn.close()
        assert api.policies() == before
        assert (changes_log.read_bytes() if changes_log.exists() else b"") == log_before
        assert agent.running


# ---- 3. 100 concurrent writes: API, disk and kernel agree ----------------------------------


def test_concurrent_writes_agree_everywhere(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    old = [rule(1000 + i, "tcp", "deny", dst_port=9000 + i) for i in range(50)]
    new = [rule(2000 + i, "tcp", "deny", dst_port=9100 + i) for i in range(50)]
    agent, api = start_agent(agent_factory, lab, tmp_path, old, default="allow")
    gen0 = api.policies()["generation"]

    async def hammer() -> list[tuple[str, int, int]]:
        writes: list[tuple[str, str, Any]] = [("POST", "/policies", r) for r in new]
        writes += [("DELETE", f"/policies/{r['rule_id']}", None) for r in old]
        random.Random(3).shuffle(writes)
        headers = {"Authorization": f"Bearer {api.token}"}
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(
            f"http://{agent.api}", headers=headers, timeout=timeout
        ) as session:

            async def one(method: str, path: str, body: Any) -> tuple[str, int, int]:
                async with session.request(method, PREFIX + path, json=body) as resp:
                    await resp.read()
                    return path, resp.status, int(resp.headers.get("X-Policy-Generation", -1))

            return await asyncio.gather(*(one(*w) for w in writes))

    results = asyncio.run(hammer())
    wrong = [x for x in results if x[1] not in (200, 201)]
    assert not wrong, wrong
    assert sorted(g for _, _, g in results) == list(range(gen0 + 1, gen0 + 101))

    listed = api.policies()
    gen = listed["generation"]
    assert gen == gen0 + 100 and listed["default_action"] == "allow"
    assert ids_of(listed["policies"]) == {r["rule_id"] for r in new}, listed

    # Disk: the state file holds exactly this set and generation.
    disk = persisted_document(agent.state_dir)
    assert disk is not None
    assert disk["generation"] == gen and disk["default_action"] == "allow"
    assert by_id(disk["policies"]) == by_id(listed["policies"])
    # Each write was logged once, with its generation.
    log_lines = [json.loads(x) for x in (agent.state_dir / "changes.log").read_text().splitlines()]
    assert sorted(x["generation"] for x in log_lines[-100:]) == list(range(gen0 + 1, gen + 1))
    # Kernel: it enforces that generation, and traffic follows the set.
    st = api.ok("GET", "/status")
    assert st["data_plane"]["status"] == "running", st
    assert st["data_plane"]["generation"] == gen == st["policy_generation"]
    sample_old, sample_new = [9000, 9013, 9049], [9100, 9127, 9149]
    with echo_server(lab.host_ns, sample_old + sample_new):
        expect_ports(
            lab,
            {**dict.fromkeys(sample_old, True), **dict.fromkeys(sample_new, False)},
            "after 100 concurrent writes",
        )
    assert agent.running
