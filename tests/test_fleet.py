"""The fleet end to end (docs/contract.md §7): one real Kafka broker, real agent processes each
on its own lab end, real traffic from the labs' peer namespaces, `microseg fleet` as a user
runs it.

- Five agents with different labels and one `fleet apply` of host-scoped rules and a `select`
  group: each host enforces exactly its part; the select group holds the addresses of the
  agents whose labels match; an agent of the group stopping removes its addresses from it
  everywhere (no new generation); local API writes answer 409 managed; /status and /metrics
  show the fleet generation.
- An agent down during three generations catches up when it comes back; the broker stopped:
  nothing changes, an agent restarted meanwhile enforces from its state dir, applies fail
  cleanly, and all catch up when the broker is back.
- Two concurrent applies from the same base: exactly one wins, the other exits 3 `stale`.
- Bad input: a document that fails validation is refused before anything is published; a bad
  record written by hand on the topic is reported by every agent and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from support.agentapi import P1, P2, P3, api_metrics, api_of, assert_error
from support.agentproc import REPO, AgentFactory, free_port
from support.fleet import HEARTBEAT_S, Fleet
from support.netutil import echo_server, expect_ports, wait_until

from bench.kafkabroker import KafkaBroker, kcat_produce
from streamer.fleet.topic import PolicyWriter
from streamer.lab.lab import Lab

PORTS = (P1, P2, P3)


@pytest.fixture
def labs() -> Iterator[list[Lab]]:
    """Three fresh labs, destroyed afterwards whatever happens."""
    with ExitStack() as stack:
        yield [stack.enter_context(Lab.create()) for _ in range(3)]


@pytest.fixture
def fleet(kafka_broker: KafkaBroker, agent_factory: AgentFactory, tmp_path: Path) -> Fleet:
    return Fleet(kafka_broker, agent_factory, tmp_path)


def _scoped_doc(extra_rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "default_action": "allow",
        "groups": {"clients": {"members": [], "select": {"role": "client"}}},
        "policies": [
            {
                "rule_id": 10,
                "name": "clients-to-db",
                "hosts": {"role": "db"},
                "protocol": "tcp",
                "dst_port": P1,
                "src_group": "clients",
                "action": "allow",
                "priority": 200,
                "direction": "ingress",
            },
            {
                "rule_id": 11,
                "name": "db-closed",
                "hosts": {"role": "db"},
                "protocol": "tcp",
                "dst_port": P1,
                "action": "deny",
                "direction": "ingress",
            },
            {
                "rule_id": 20,
                "name": "web-closed",
                "hosts": {"role": "web"},
                "protocol": "tcp",
                "dst_port": P2,
                "action": "deny",
                "direction": "ingress",
            },
            {
                "rule_id": 30,
                "name": "closed-everywhere",
                "protocol": "tcp",
                "dst_port": P3,
                "action": "deny",
                "direction": "ingress",
            },
            *(extra_rules or []),
        ],
    }


def test_five_agents_enforce_their_part_and_select_groups_follow_the_members(
    labs: list[Lab], fleet: Fleet
) -> None:
    lab1, lab2, lab3 = labs
    with ExitStack() as stack:
        for lab in labs:
            stack.enter_context(echo_server(lab.host_ns, PORTS))
        gen = fleet.apply(_scoped_doc())
        db = fleet.agent(
            lab1, "db-1", {"role": "db", "env": "prod"}, api=f"127.0.0.1:{free_port()}"
        )
        client = fleet.agent(lab1, "client-1", {"role": "client"}, side="peer")
        web = fleet.agent(lab2, "web-1", {"role": "web"})
        other = fleet.agent(lab2, "other-1", {"role": "other"}, side="peer")
        cache = fleet.agent(lab3, "cache-1", {"role": "cache"})
        agents = [db, client, web, other, cache]
        for a in agents:
            a.start()
        hosts = ["db-1", "client-1", "web-1", "other-1", "cache-1"]
        fleet.wait_converged(hosts, gen)
        status = fleet.agents()
        assert status["client-1"]["addresses"] == sorted([lab1.peer_v4, lab1.peer_v6]) or set(
            status["client-1"]["addresses"]
        ) == {lab1.peer_v4, lab1.peer_v6}, status["client-1"]
        assert status["db-1"]["labels"] == {"role": "db", "env": "prod"}

        def db_admits_clients() -> bool:
            return all(ok for ok in _reach(lab1, P1).values())

        # The select group resolves once the client agent's status is read: then P1 opens.
        assert wait_until(db_admits_clients, timeout=15), "db never admitted the client agent"
        expect_ports(lab1, {P1: True, P2: True, P3: False}, "db: clients admitted, P3 closed")
        expect_ports(lab2, {P1: True, P2: False, P3: False}, "web: P2 and P3 closed")
        expect_ports(lab3, {P1: True, P2: True, P3: False}, "cache: only P3 closed")

        # A fleet dry run: per host the rules that would apply, the select group's members;
        # nothing is published.
        proc = fleet.cli("apply", str(fleet.write(_scoped_doc())), "--dry-run", "-o", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        dry_fleet = json.loads(proc.stdout)
        assert dry_fleet["dry_run"] and dry_fleet["newest"] == gen, dry_fleet
        rules = {h["host"]: h["rules"] for h in dry_fleet["hosts"]}
        assert rules["db-1"] == [10, 11, 30] and rules["web-1"] == [20, 30], rules
        assert rules["cache-1"] == [30], rules
        assert set(dry_fleet["select"]["clients"]) == {lab1.peer_v4, lab1.peer_v6}, dry_fleet
        assert json.loads(fleet.cli("get", "-o", "json").stdout)["generation"] == gen
        # In fleet mode the local API reads but does not write.
        api = api_of(db)
        r = api.call("POST", "/policies", {"rule_id": 99, "protocol": "tcp", "action": "deny"})
        assert_error(r, 409, "managed", "fleet apply")
        listed = {p["rule_id"] for p in api.policies()["policies"]}
        assert listed == {10, 11, 30}, listed
        # A dry run there takes the fleet form and answers for this host's part of it.
        doc = _scoped_doc(
            [{"rule_id": 40, "hosts": {"role": "web"}, "protocol": "udp", "action": "deny"}]
        )
        doc["policies"] = [p for p in doc["policies"] if p["rule_id"] != 11]
        dry = api.ok("PUT", "/policies?dry_run=1", doc)
        assert [r["rule_id"] for r in dry["removed"]] == [11] and dry["added"] == [], dry
        fleet_status = api.ok("GET", "/status")["fleet"]
        assert fleet_status["host"] == "db-1" and fleet_status["generation"] == gen
        metrics = api_metrics(db)
        assert f'microseg_fleet_generation{{host="db-1"}} {float(gen)}' in metrics, metrics

        # The client agent stops: it leaves the group everywhere, without a new generation.
        assert client.stop() == 0
        assert wait_until(lambda: not any(_reach(lab1, P1).values()), timeout=15), (
            "the stopped client's addresses still open the db"
        )
        status = fleet.agents()
        assert "client-1" not in status, status
        assert status["db-1"]["generation"] == gen
        proc = fleet.cli("status")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "db-1" in proc.stdout and "client-1" not in proc.stdout
        for a in (db, web, other, cache):
            assert a.stop() == 0


def _reach(lab: Lab, port: int) -> dict[Any, bool]:
    from support.netutil import reach

    return {fam: ok for (fam, _), ok in reach(lab, {port: True}).items()}


# Generation 1 of the two-agent tests: TCP to P1 denied on every host.
DENY_P1: dict[str, Any] = {
    "rule_id": 1,
    "protocol": "tcp",
    "dst_port": P1,
    "action": "deny",
    "direction": "ingress",
}


def _pair(stack: ExitStack, fleet: Fleet, lab1: Lab, lab2: Lab) -> tuple[Any, Any, int]:
    """Echo servers on both labs' hosts, agents `a` and `b` on them enforcing generation 1
    (DENY_P1): (a, b, 1's generation)."""
    for lab in (lab1, lab2):
        stack.enter_context(echo_server(lab.host_ns, PORTS))
    a = fleet.agent(lab1, "a", {"n": "1"})
    b = fleet.agent(lab2, "b", {"n": "2"})
    a.start()
    b.start()
    g1 = fleet.apply({"default_action": "allow", "policies": [DENY_P1]})
    fleet.wait_converged(["a", "b"], g1)
    return a, b, g1


def test_catch_up_after_downtime_and_a_broker_outage(
    labs: list[Lab], fleet: Fleet, kafka_broker: KafkaBroker
) -> None:
    lab1, lab2, _ = labs
    rule = DENY_P1
    with ExitStack() as stack:
        a, b, _ = _pair(stack, fleet, lab1, lab2)
        expect_ports(lab2, {P1: False, P2: True}, "generation 1")

        # b is down (killed: its pins enforce on) during three generations; it catches up on
        # the newest when back.
        b.kill9()
        for port in (P2, P3):
            fleet.apply(
                {
                    "default_action": "allow",
                    "policies": [rule, {**rule, "rule_id": port, "dst_port": port}],
                }
            )
        g4 = fleet.apply({"default_action": "allow", "policies": [{**rule, "dst_port": P2}]})
        fleet.wait_converged(["a"], g4)
        expect_ports(lab2, {P1: False, P2: True}, "b down: its pins keep generation 1")
        b.start()
        fleet.wait_converged(["a", "b"], g4)
        expect_ports(lab2, {P1: True, P2: False}, "b caught up on generation 4")
        b.wait_log(r"fleet generation 4 enforced")
        assert "fleet generation 2 enforced" not in b.log, "b applied a generation already replaced"

        # The broker goes away: enforcement stays, a restarted agent restores from its state
        # dir, an apply fails cleanly; when it is back everyone catches up.
        def denials_of_a() -> int:
            return sum(
                1
                for e in fleet.flows("--host", "a", "--verdict", "deny")
                if e.get("dst_port") == P2
            )

        expect_ports(lab1, {P1: True, P2: False}, "a on generation 4")
        assert wait_until(lambda: denials_of_a() > 0, timeout=15), "a's denials never reached Kafka"
        before = denials_of_a()
        with kafka_broker.outage():
            time.sleep(3 * HEARTBEAT_S)
            expect_ports(lab1, {P1: True, P2: False}, "broker away: a keeps generation 4")
            b.stop()
            b.start()
            b.wait_log(r"fleet generation 4 restored")
            expect_ports(lab2, {P1: True, P2: False}, "broker away: b restarted on generation 4")
            proc = fleet.cli("apply", str(fleet.write({"policies": []})), "--timeout", "5")
            assert proc.returncode == 1, proc.stdout + proc.stderr
            assert "cannot be used" in proc.stderr, proc.stderr
        g5 = fleet.apply({"default_action": "allow", "policies": [{**rule, "dst_port": P3}]})
        assert g5 == g4 + 1, "the failed apply must not have published anything"
        fleet.wait_converged(["a", "b"], g5, timeout=60)
        # Nothing lost: the flow events of the outage were spooled and arrive now.
        assert wait_until(lambda: denials_of_a() > before, timeout=30), (before, denials_of_a())
        expect_ports(lab1, {P1: True, P2: True, P3: False}, "a after the outage")
        expect_ports(lab2, {P1: True, P2: True, P3: False}, "b after the outage")
        a.stop()
        b.stop()


def test_concurrent_applies_from_one_base_exactly_one_wins(fleet: Fleet) -> None:
    base = fleet.apply({"policies": []})
    docs = [
        fleet.write({"policies": [{"rule_id": i, "protocol": "udp", "action": "deny"}]})
        for i in (1, 2)
    ]
    argv = [sys.executable, "-m", "streamer", "fleet", "apply"]
    procs = [
        subprocess.Popen(
            [*argv, str(d), "--base", str(base), *fleet.topic_args()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for d in docs
    ]
    outs = [p.communicate(timeout=90) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 3], outs
    loser = outs[[p.returncode for p in procs].index(3)]
    assert f"stale: newest is {base + 1}" in loser[1], loser
    got = json.loads(fleet.cli("get", "-o", "json").stdout)
    assert got["generation"] == base + 1
    # A stale base given by hand is refused the same way, and nothing is published.
    proc = fleet.cli("apply", str(docs[0]), "--base", str(base))
    assert proc.returncode == 3 and f"stale: newest is {base + 1}" in proc.stderr, proc.stderr
    assert json.loads(fleet.cli("get", "-o", "json").stdout)["generation"] == base + 1


def test_bad_documents_and_bad_records(
    labs: list[Lab], fleet: Fleet, kafka_broker: KafkaBroker
) -> None:
    lab1, lab2, _ = labs
    rule = DENY_P1
    with ExitStack() as stack:
        a, b, g1 = _pair(stack, fleet, lab1, lab2)
        # Refused before anything is published: the CLI names the problem.
        unknown = {"rule_id": 2, "protocol": "tcp", "action": "allow", "src_group": "nope"}
        for bad, words in (
            ({"policies": [{**rule, "protocol": "tcpx"}]}, ("protocol", "tcpx")),
            ({"policies": [unknown]}, ("src_group", "nope")),
            ({"policies": [{**rule, "hosts": {"bad key!": "x"}}]}, ("hosts",)),
            ({"policies": [rule, rule]}, ("duplicate",)),
        ):
            proc = fleet.cli("apply", str(fleet.write(bad)))
            assert proc.returncode == 1, proc.stdout + proc.stderr
            for word in (*words, "nothing was published"):
                assert word in proc.stderr, proc.stderr
        assert json.loads(fleet.cli("get", "-o", "json").stdout)["generation"] == g1

        # A record written by hand that no writer of ours could have written.
        kcat_produce(
            kafka_broker.bootstrap, fleet.policy_topic, [("policy", "this is not a policy")]
        )
        for agent in (a, b):
            agent.wait_log(r"fleet policy topic: .*changes nothing here", timeout=15)
        assert wait_until(
            lambda: all(x["state"] == "error" and x["error"] for x in fleet.agents().values()),
            timeout=10,
        ), fleet.agents()
        expect_ports(lab1, {P1: False, P2: True}, "a after the bad record: generation 1 stays")
        expect_ports(lab2, {P1: False, P2: True}, "b after the bad record: generation 1 stays")

        # A generation no agent can take (a writer that skipped validation): refused by each,
        # reported, nothing changes.
        async def publish_invalid() -> int:
            async with PolicyWriter(
                fleet.bootstrap, fleet.policy_topic, agents_topic=fleet.agents_topic
            ) as w:
                doc = {"policies": [{**rule, "src_group": "nowhere"}]}
                return (await w.publish(doc, base=None, actor="test")).generation

        bad_gen = asyncio.run(publish_invalid())
        for agent in (a, b):
            agent.wait_log(rf"fleet generation {bad_gen}: .*nowhere", timeout=15)
        assert wait_until(
            lambda: all(
                x["generation"] == g1 and x["state"] == "error" and "nowhere" in (x["error"] or "")
                for x in fleet.agents().values()
            ),
            timeout=10,
        ), fleet.agents()
        expect_ports(lab2, {P1: False, P2: True}, "b after the invalid generation: 1 stays")
        # The next good generation clears it.
        g2 = fleet.apply({"default_action": "allow", "policies": [{**rule, "dst_port": P2}]})
        fleet.wait_converged(["a", "b"], g2)
        expect_ports(lab2, {P1: True, P2: False}, "b on generation 2")
        a.stop()
        b.stop()


def test_run_flags_for_the_fleet_are_checked(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamer", "run", "--iface", "lo", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )

    policy = tmp_path / "p.json"
    policy.write_text('{"policies": []}')
    proc = run("--fleet", "127.0.0.1:9", "--policy-file", str(policy))
    assert proc.returncode == 2 and "the fleet's topic is the policy" in proc.stderr, proc.stderr
    proc = run("--host-label", "role=db")
    assert proc.returncode == 2 and "need --fleet" in proc.stderr, proc.stderr
    proc = run("--fleet", "127.0.0.1:9", "--host-label", "not a label")
    assert proc.returncode == 2 and "--host-label" in proc.stderr, proc.stderr
    proc = run("--fleet", "127.0.0.1:9", "--host-label", "a=1", "--host-label", "a=2")
    assert proc.returncode == 2 and "twice" in proc.stderr, proc.stderr


def test_fleet_commands_without_brokers_or_with_bad_flags(tmp_path: Path) -> None:
    env_less = subprocess.run(
        [sys.executable, "-m", "streamer", "fleet", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
        env={k: v for k, v in __import__("os").environ.items() if k != "MICROSEG_FLEET"},
    )
    assert env_less.returncode == 2 and "--fleet" in env_less.stderr, env_less.stderr
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamer",
            "fleet",
            "get",
            "--fleet",
            f"127.0.0.1:{port}",
            "--timeout",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 1 and "cannot be used" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_confirm_reverts_on_an_agent_the_change_cut_off_from_the_broker(
    lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """The broker lives in the lab's peer namespace; the victim agent runs in the host
    namespace, so its connection to the broker crosses the interface it enforces on. A
    `--confirm` apply that denies that connection there is not confirmed (the victim cannot
    report it): the victim reverts by itself, the writer publishes the previous document
    again, and everyone converges on that. A confirm that every agent reports is kept."""
    broker = KafkaBroker(netns=lab.peer_ns, host=lab.peer_v4)
    with ExitStack() as stack:
        stack.callback(broker.destroy)
        broker.start()
        stack.enter_context(echo_server(lab.host_ns, PORTS))
        fleet = Fleet(broker, agent_factory, tmp_path, netns=lab.peer_ns)

        def in_ns(ns: str) -> tuple[str, ...]:
            return ("ip", "netns", "exec", ns, sys.executable, "-m", "streamer")

        victim = fleet.agent(lab, "victim", {"role": "victim"}, command=in_ns(lab.host_ns))
        bystander = fleet.agent(
            lab, "bystander", {"role": "peer"}, side="peer", command=in_ns(lab.peer_ns)
        )
        deny = {"protocol": "tcp", "action": "deny", "direction": "ingress"}
        doc1 = {"default_action": "allow", "policies": [{"rule_id": 1, "dst_port": P1, **deny}]}
        g1 = fleet.apply(doc1)
        victim.start()
        bystander.start()
        fleet.wait_converged(["victim", "bystander"], g1)

        # Confirmed: every agent reported it in time.
        doc2 = {"policies": [*doc1["policies"], {"rule_id": 2, "dst_port": P2, **deny}]}
        doc2["default_action"] = "allow"
        proc = fleet.cli("apply", str(fleet.write(doc2)), "--confirm", "20")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "confirmed: all 2 agents" in proc.stdout, proc.stdout
        victim.wait_log(r"fleet generation 2 confirmed", timeout=10)
        expect_ports(lab, {P1: False, P2: False, P3: True}, "generation 2, confirmed")

        # Not confirmed: the new generation cuts the victim off from the broker.
        cut = {
            "rule_id": 50,
            "hosts": {"role": "victim"},
            "protocol": "tcp",
            "dst_port": broker.port,
            "action": "deny",
            "direction": "egress",
        }
        doc3 = {
            "default_action": "allow",
            "policies": [{"rule_id": 3, "dst_port": P3, **deny}, cut],
        }
        proc = fleet.cli("apply", str(fleet.write(doc3)), "--confirm", "8")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "generation 3 not confirmed: victim did not report it" in proc.stderr, proc.stderr
        assert "generation 4 puts generation 2's document back" in proc.stderr, proc.stderr
        victim.wait_log(r"fleet generation 3 reverted by this agent", timeout=30)
        fleet.wait_converged(["victim", "bystander"], 4, timeout=60)
        expect_ports(lab, {P1: False, P2: False, P3: True}, "back on generation 2's document")
        assert victim.stop() == 0
        assert bystander.stop() == 0
