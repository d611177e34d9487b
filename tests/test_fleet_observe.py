"""`microseg fleet observe` against a real Kafka broker: records of three hosts written by hand
to a topic of their own (kcat), read back by the command as a real subprocess: the host column,
`--host`, the filters of `flows observe`, `-o json`, `--follow` seeing a new record, a record
that is not JSON skipped and counted, and the brokers away (exit 1) or bad arguments (exit 2).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from support import REPO

from bench.kafkabroker import KafkaBroker, free_port, kcat_produce, unique_topic

HOSTS = ("node-a", "node-b", "node-c")


def flow(host: str, seq: int, **fields: Any) -> dict[str, Any]:
    """A contract §4 flow record of `host` (a denial of tcp/22 unless `fields` say else)."""
    rec: dict[str, Any] = {
        "schema": "microseg.flow/v1",
        "type": "flow",
        "seq": seq,
        "time": f"2026-11-22T10:01:{seq:02d}.123456789Z",
        "host": host,
        "iface": "eth0",
        "direction": "ingress",
        "verdict": "deny",
        "src_ip": "10.0.0.7",
        "dst_ip": f"10.0.1.{HOSTS.index(host) + 1 if host in HOSTS else 99}",
        "src_port": 40000 + seq,
        "dst_port": 22,
        "protocol": "tcp",
        "tcp_flags": "SYN",
        "packets": 1,
        "bytes": 60,
        "kind": "new",
        "rule": {"rule_id": 1002, "name": "no-ssh", "priority": 200, "action": "deny"},
        "policy_generation": 3,
    }
    rec.update(fields)
    return rec


def produce(broker: KafkaBroker, topic: str, records: list[dict[str, Any] | str]) -> None:
    kcat_produce(
        broker.bootstrap,
        topic,
        [(r if isinstance(r, str) else json.dumps(r, separators=(",", ":"))) for r in records],
    )


def microseg(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


@pytest.fixture(scope="module")
def fleet_topic(kafka_broker: KafkaBroker) -> Iterator[str]:
    """A topic with 3 hosts' records (seq 1..9 over time): denials, a log, a udp one, a lost
    record, and one record that is not JSON."""
    topic = unique_topic("fleetobs")
    records: list[dict[str, Any] | str] = []
    seq = 0
    for i in range(3):
        for host in HOSTS:
            seq += 1
            if i == 1 and host == "node-b":
                records.append(
                    flow(
                        host,
                        seq,
                        verdict="log",
                        dst_port=5432,
                        rule={"rule_id": 1005, "name": "audit-pg", "priority": 100},
                    )
                )
            elif i == 2 and host == "node-c":
                records.append(flow(host, seq, protocol="udp", dst_port=53, tcp_flags=None))
            else:
                records.append(flow(host, seq))
    records.insert(4, "this is not json {")
    records.append(
        {
            "schema": "microseg.flow/v1",
            "type": "lost",
            "seq": 20,
            "time": "2026-11-22T10:01:20.000000000Z",
            "host": "node-a",
            "lost": 3,
            "stage": "kernel",
        }
    )
    produce(kafka_broker, topic, records)
    yield topic


def observe(broker: KafkaBroker, topic: str, *args: str) -> subprocess.CompletedProcess[str]:
    return microseg("fleet", "observe", "--fleet", broker.bootstrap, "--flows-topic", topic, *args)


def test_last_n_prints_every_hosts_records_with_a_host_column(
    kafka_broker: KafkaBroker, fleet_topic: str
) -> None:
    p = observe(kafka_broker, fleet_topic, "--last", "20")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:3] == ["TIME", "HOST", "VERDICT"]
    body = lines[1:]
    assert len(body) == 10  # 9 flows and the lost record, in time order
    assert [ln.split()[1] for ln in body[:9]] == list(HOSTS) * 3
    assert "LOST" in body[9] and body[9].split()[1] == "node-a"
    assert "skipped 1 records" in p.stderr and "not JSON" in p.stderr

    p = observe(kafka_broker, fleet_topic, "--last", "2", "-o", "compact")
    assert p.returncode == 0, p.stderr
    got = p.stdout.splitlines()
    assert len(got) == 2 and got[0].startswith("node-c ") and " udp " in got[0]
    assert got[1].startswith("node-a ") and "LOST 3 events at kernel" in got[1]


def test_host_and_flow_filters_apply_with_flows_observes_semantics(
    kafka_broker: KafkaBroker, fleet_topic: str
) -> None:
    def objs(*args: str) -> list[dict[str, Any]]:
        p = observe(kafka_broker, fleet_topic, "--last", "50", "-o", "json", *args)
        assert p.returncode == 0, p.stderr
        return [json.loads(ln) for ln in p.stdout.splitlines()]

    every = objs()
    assert len(every) == 10 and {o["host"] for o in every} == set(HOSTS)
    assert [o["seq"] for o in every] == [*range(1, 10), 20]

    only_b = objs("--host", "node-b")
    assert [o["seq"] for o in only_b] == [2, 5, 8]  # node-a's lost record is not b's
    assert {o["host"] for o in objs("--host", "node-b,node-c")} == {"node-b", "node-c"}
    assert {o["host"] for o in objs("--host", "node-a", "--host", "node-c")} == {
        "node-a",
        "node-c",
    }

    logged = objs("--verdict", "log")
    assert [(o["host"], o["verdict"]) for o in logged if o["type"] == "flow"] == [("node-b", "log")]
    assert [o["type"] for o in logged].count("lost") == 1  # lost records pass the filters
    assert [o["dst_port"] for o in objs("--protocol", "udp") if o["type"] == "flow"] == [53]
    assert {o["dst_port"] for o in objs("--port", "5432") if o["type"] == "flow"} == {5432}
    by_name = [o for o in objs("--rule", "audit-pg") if o["type"] == "flow"]
    assert [o["rule"]["rule_id"] for o in by_name] == [1005]
    by_id = [o for o in objs("--rule", "1002", "--host", "node-c") if o["type"] == "flow"]
    assert len(by_id) == 3 and {o["host"] for o in by_id} == {"node-c"}
    in_net = [o for o in objs("--ip", "10.0.1.2/32") if o["type"] == "flow"]
    assert {o["host"] for o in in_net} == {"node-b"}

    # The last N are the last N that match, however far back they are.
    last_a = objs("--host", "node-a", "--verdict", "deny", "--last", "2")
    assert [o["seq"] for o in last_a] == [7, 20]


def test_json_lines_are_the_records_as_they_are_on_the_topic(
    kafka_broker: KafkaBroker, fleet_topic: str
) -> None:
    p = observe(kafka_broker, fleet_topic, "--last", "1", "--host", "node-b", "-o", "json")
    assert p.returncode == 0, p.stderr
    assert p.stdout == json.dumps(flow("node-b", 8), separators=(",", ":")) + "\n"


def test_follow_prints_new_records_after_the_last_ones(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("fleetfollow")
    produce(kafka_broker, topic, [flow("node-a", 1), flow("node-b", 2)])
    argv = [sys.executable, "-m", "streamer", "fleet", "observe", "--fleet"]
    argv += [kafka_broker.bootstrap, "--flows-topic", topic, "--last", "2", "-f", "-o", "json"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        first = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [o["host"] for o in first] == ["node-a", "node-b"]
        # Printed the last ones: it now follows. Records of any host, one not JSON between.
        produce(kafka_broker, topic, ["not json", flow("node-c", 3), flow("node-a", 4)])
        new = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [(o["host"], o["seq"]) for o in new] == [("node-c", 3), ("node-a", 4)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr is not None and "skipped 1 records" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_brokers_away_or_topic_missing_exit_1_and_bad_arguments_exit_2(
    kafka_broker: KafkaBroker,
) -> None:
    away = f"127.0.0.1:{free_port()}"
    p = microseg("fleet", "observe", "--fleet", away, "--last", "5")
    assert p.returncode == 1 and f"cannot reach the fleet's brokers at {away}" in p.stderr
    assert "Traceback" not in p.stderr

    missing = unique_topic("nosuch")
    p = observe(kafka_broker, missing, "--last", "5")
    assert p.returncode == 1 and f"no topic {missing!r}" in p.stderr

    for bad in (
        ["--verdict", "maybe"],
        ["--last", "0"],
        ["--port", "70000"],
        ["--host", ","],
        ["--fleet", "nohostport"],
    ):
        p = microseg("fleet", "observe", "--fleet", kafka_broker.bootstrap, *bad)
        assert p.returncode == 2, (bad, p.stderr)
    p = microseg("fleet", "observe")
    assert p.returncode == 2 and "--fleet" in p.stderr
