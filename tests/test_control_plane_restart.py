"""The control plane end to end, crashes and restarts: kill -9 during a bulk replace leaves the old
set or the new one, whole; a restart restores every rule and its generation. A real agent
process on the module's lab (each test starts its own: own pin instance, state dir and API
port), its admin API on a real socket, and real traffic from the peer namespace to echo servers
in the host namespace over IPv4 and IPv6 at once (support/netutil.py). A probe that must fail
waits out NEG_TIMEOUT; "enforced when the response arrives" means the probe runs right after the
response, with no retry or wait.

kill -9 test: the delays are drawn from a seed printed in the test output (run pytest with -s to
see it live); MICROSEG_KILL_SEED=<n> repeats a run.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

from support.agentapi import P1, P2, P3, Api, Reply, ids_of, start_agent
from support.agentproc import AgentFactory, rule, write_policy
from support.netutil import echo_server, expect_ports

from streamer.lab.lab import Lab
from streamer.policy.store import persisted_document

# ---- 4. kill -9 during a bulk replace: the old set or the new one, whole --------------------

BULK_RULES = 50_000
PA, PB = 8201, 8202
KILL_ROUNDS = 3  # random delays; two more kills land on the store's two steps


def bulk_set(n: int) -> dict[str, Any]:
    """Set B: default deny, `n` rules no lab packet matches, and one that allows PA."""
    fill = [
        {
            "rule_id": 100_000 + i,
            "protocol": "tcp",
            "action": "allow",
            "src_ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            "dst_port": 80,
        }
        for i in range(n)
    ]
    return {
        "default_action": "deny",
        "policies": [*fill, rule(1, "tcp", "allow", dst_port=PA, direction="ingress")],
    }


class BackgroundRequest(threading.Thread):
    """One request in a thread; `reply` or `error` once it ends (the agent may die under it)."""

    def __init__(self, api: Api, method: str, path: str, raw: bytes) -> None:
        super().__init__(name="background-request", daemon=True)
        self.api, self.method, self.path, self.raw = api, method, path, raw
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.reply = self.api.call(self.method, self.path, raw=self.raw, timeout=60)
        except Exception as e:  # the connection dies with the agent
            self.error = e


def test_kill9_during_bulk_replace_leaves_old_or_new_set_whole(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    seed = int(os.environ.get("MICROSEG_KILL_SEED", str(time.time_ns() % 2**31)))
    rng = random.Random(seed)
    set_a: dict[str, Any] = {
        "default_action": "allow",
        "policies": [rule(2, "tcp", "deny", dst_port=PA), rule(3, "udp", "allow", dst_port=53)],
    }
    set_b = bulk_set(BULK_RULES)
    sets = {"A": set_a, "B": set_b}
    traffic = {"A": {PA: False, PB: True}, "B": {PA: True, PB: False}}
    b_body = json.dumps(set_b).encode()
    with echo_server(lab.host_ns, (PA, PB)):
        agent, api = start_agent(agent_factory, lab, tmp_path, set_a["policies"], default="allow")
        expect_ports(lab, traffic["A"], "set A")
        # How long a whole PUT of B takes here: the kills land within that.
        t0 = time.monotonic()
        r = api.call("PUT", "/policies", raw=b_body)
        duration = time.monotonic() - t0
        assert r.status == 200, str(r)
        expect_ports(lab, traffic["B"], "set B")
        api.ok("PUT", "/policies", set_a)
        n_b = len(set_b["policies"])
        applied_b = rf"policy generation \d+ applied: {n_b} rules"
        saved_b = rf"replace set \({n_b} rules\)"
        # One random delay in each third of the PUT (early, middle, late), then two kills at
        # the riskiest moments: the kernel enforces B but the disk may not have it yet, and the
        # disk has B but the client has no answer yet.
        triggers: list[float | str] = [
            duration * (i + rng.random()) / KILL_ROUNDS for i in range(KILL_ROUNDS)
        ]
        triggers += [applied_b, saved_b]
        outcomes: list[str] = []
        for i, trigger in enumerate(triggers, 1):
            when = f"after {trigger:.3f} s" if isinstance(trigger, float) else f"at {trigger!r}"
            note = (
                f"kill -9 round {i}: {when} of a {duration:.3f} s PUT of {n_b:,} rules"
                f" (MICROSEG_KILL_SEED={seed})"
            )
            print(note)
            mark = agent.log_mark()
            request = BackgroundRequest(api, "PUT", "/policies", b_body)
            request.start()
            if isinstance(trigger, float):
                time.sleep(trigger)
            else:
                agent.wait_log(trigger, after=mark, timeout=60)
            agent.kill9()
            request.join(30)
            assert not request.is_alive(), note
            agent.start()
            agent.wait_api()
            killed_log = "\n".join(agent.previous_logs[-1].splitlines()[mark:])
            listed = api.policies()
            which = next(
                (
                    name
                    for name, s in sets.items()
                    if ids_of(listed["policies"]) == ids_of(s["policies"])
                    and listed["default_action"] == s["default_action"]
                ),
                None,
            )
            assert which is not None, (
                f"{note}: torn set after restart: {listed['count']} rules, default "
                f"{listed['default_action']}\n{agent.log[-3000:]}"
            )
            disk = persisted_document(agent.state_dir)
            assert disk is not None
            assert disk["generation"] == listed["generation"], note
            assert ids_of(disk["policies"]) == ids_of(listed["policies"]), note
            assert disk["default_action"] == listed["default_action"], note
            st = api.ok("GET", "/status")
            assert st["data_plane"]["status"] == "running", f"{note}: {st}"
            assert st["data_plane"]["generation"] == listed["generation"], f"{note}: {st}"
            expect_ports(lab, traffic[which], f"{note}: restored set {which}")
            answered = request.reply is not None and request.reply.status == 200
            kernel_had_b = re.search(applied_b, killed_log) is not None
            disk_had_b = re.search(saved_b, killed_log) is not None
            print(
                f"  -> restored set {which} (before the kill: kernel had B {kernel_had_b}, "
                f"saved {disk_had_b}, answered {answered})"
            )
            # The store saves B only after the kernel enforces it, and answers after saving.
            if answered or disk_had_b:
                assert which == "B", f"{note}: B was saved, yet A came back\n{killed_log}"
            if not kernel_had_b:
                assert which == "A", f"{note}: B came back though never applied\n{killed_log}"
            outcomes.append(which)
            if which == "B":
                api.ok("PUT", "/policies", set_a)
        print(f"kill -9 outcomes: {outcomes}")
        assert agent.stop() == 0


# ---- 5. a restart restores every rule and its generation ----------------------------------


def test_restart_restores_rules_and_generation(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2, P3)):
        agent, api = start_agent(
            agent_factory, lab, tmp_path, [rule(1, "tcp", "deny", dst_port=P1)], default="allow"
        )
        gen0 = api.policies()["generation"]
        api.ok("POST", "/policies", rule(2, "tcp", "deny", dst_port=P2), 201)
        api.ok("POST", "/policies", rule(3, "tcp", "deny", dst_port=P3, priority=300), 201)
        api.ok(
            "PUT",
            "/policies/2",
            {
                **rule(2, "tcp", "allow", dst_port=P2),
                "priority": 150,
                "name": "web-2",
                "direction": "ingress",
            },
        )
        api.ok(
            "POST",
            "/policies",
            rule(4, "udp", "allow", dst_port=53, src_ip=f"{lab.peer_v6}/128"),
            201,
        )
        api.ok("DELETE", "/policies/4")
        before = api.policies()
        gen = before["generation"]
        assert gen == gen0 + 5 and ids_of(before["policies"]) == {1, 2, 3}
        want = {P1: False, P2: True, P3: False}
        expect_ports(lab, want, "before the restart")
        # The policy file changes meanwhile: only SIGHUP or `policy load` apply it, never a start.
        write_policy(agent.policy_file, [rule(9, "tcp", "allow", dst_port=P3)], "allow")

        assert agent.stop() == 0
        expect_ports(lab, {P1: True, P3: True}, "after a clean exit (detached)")
        agent.start()
        agent.wait_api()
        agent.wait_log(rf"restoring 3 rules at generation {gen}\b", timeout=1)
        assert api.policies() == before
        st = api.ok("GET", "/status")
        assert st["policy_generation"] == gen and st["policy_count"] == 3, st
        assert st["data_plane"]["generation"] == gen and st["data_plane"]["status"] == "running"
        expect_ports(lab, want, "after the restart")
        # The next change goes on from the restored generation.
        r = api.call("DELETE", "/policies/3")
        assert r.status == 200 and int(r.headers["X-Policy-Generation"]) == gen + 1, str(r)
        expect_ports(lab, {P3: True}, "after a change following the restart")
        assert agent.stop() == 0
