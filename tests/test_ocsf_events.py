"""OCSF output end to end: a real agent on a lab with `--events-file-format ocsf` and
`--kafka-format ocsf`, real traffic, a real Kafka broker read back with kcat. Every record of
both sinks is a valid OCSF 1.3.0 event (the published schema, tests/support/ocsf.py): denied
flows (by a rule and by the default action, TCP and UDP, both families), a logged flow, a
staged would-denial of an allowed flow, and the pressure alert the traffic raises."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from support.agentproc import AgentFactory, free_port, rule, write_policy
from support.netutil import FAMILIES, TcpConn, echo_server, host, peer, tcp_attempt, udp_to
from support.netutil import wait_until as wait_for
from support.ocsf import ocsf_valid

from bench.kafkabroker import KafkaBroker, kcat_consume, unique_topic
from streamer.lab.lab import Lab

# (activity_id, action_id, disposition_id, firewall_rule uid) each flow should map to.
DENY_RULE = (5, 2, 2, "82")
DENY_DEFAULT = (5, 2, 2, "default")
LOG = (6, 1, 17, "81")
WOULD_DENY = (6, 1, 15, "83")


def _traffic(lab: Lab) -> dict[tuple[str, int, str], tuple[int, int, int, str]]:
    """Each flow made, by (source ip, source port, protocol): what its OCSF event should say."""
    want: dict[tuple[str, int, str], tuple[int, int, int, str]] = {}
    for fam in FAMILIES:
        h, src = host(lab, fam), peer(lab, fam)
        ok, sport = tcp_attempt(lab.peer_ns, h, 22, 0.6)
        assert not ok
        want[(src, sport, "tcp")] = DENY_RULE
        ok, sport = tcp_attempt(lab.peer_ns, h, 81, 0.6)
        assert not ok
        want[(src, sport, "tcp")] = DENY_DEFAULT
        # Allowed, and denied by the staged rule: reported as a would-denial.
        ok, sport = tcp_attempt(lab.peer_ns, h, 80, 2.0)
        assert ok, f"{fam}: the allowed connection failed"
        want[(src, sport, "tcp")] = WOULD_DENY
        conn = TcpConn(lab.peer_ns, h, 5432)
        try:
            want[(src, conn.sock.getsockname()[1], "tcp")] = LOG
            assert conn.exchange(), "the logged connection failed"
        finally:
            conn.close()
    # New allowed sessions, fast enough for the new-flow-rate alert (threshold 1/s).
    for _ in range(20):
        tcp_attempt(lab.peer_ns, lab.host_v4, 80, 2.0)
        time.sleep(0.05)
    return want


def _key(ev: dict[str, Any]) -> tuple[str, int, str]:
    return (
        ev["src_endpoint"]["ip"],
        ev["src_endpoint"].get("port", 0),
        ev["connection_info"].get("protocol_name", ""),
    )


def test_both_sinks_write_valid_ocsf(
    module_lab: Lab, agent_factory: AgentFactory, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    lab = module_lab
    topic = unique_topic("ocsf")
    rules = [
        rule(80, "tcp", "allow", dst_port=80, direction="ingress"),
        rule(81, "tcp", "log", dst_port=5432, direction="ingress"),
        rule(82, "tcp", "deny", dst_port=22, priority=200),
        {**rule(83, "tcp", "deny", dst_port=80, priority=200), "mode": "staged"},
    ]
    policy = write_policy(tmp_path / "policy.json", rules, "deny")
    flags = ["--kafka", kafka_broker.bootstrap, "--kafka-topic", topic]
    flags += ["--kafka-format", "ocsf", "--events-file-format", "ocsf"]
    flags += ["--pressure-interval", "0.5", "--new-flow-rate-alert", "1"]
    with echo_server(lab.host_ns, (22, 80, 81, 5432)):
        agent = agent_factory(lab, policy, api=f"127.0.0.1:{free_port()}", extra_args=flags).start()
        agent.wait_api()
        agent.wait_log(r"Kafka: streaming to topic", timeout=30)
        want = _traffic(lab)
        for fam in FAMILIES:
            # UDP denied by the default action; its source port is the socket's, so found below.
            udp_to(lab, fam, [9999])

        def complete() -> bool:
            evs = agent.events()
            keys = {_key(e) for e in evs if e["class_uid"] == 4001}
            udp = [e for e in evs if e.get("connection_info", {}).get("protocol_num") == 17]
            alert = any(e["class_uid"] == 2004 for e in evs)
            return all(k in keys for k in want) and len(udp) >= 2 and alert

        assert wait_for(complete, 20), agent.events()
        assert agent.stop() == 0
    events = agent.events()
    kafka = kcat_consume(kafka_broker.bootstrap, topic, count=len(events), timeout=20)
    assert [json.loads(r["value"]) for r in kafka] == events  # the same events, in order
    for ev in events:
        ocsf_valid(ev)
        assert ev["metadata"]["product"]["name"] == "microseg"
        assert ev["metadata"]["version"] == "1.3.0"
    flows = [e for e in events if e["class_uid"] == 4001]
    for key, (activity, action, disposition, rule_uid) in want.items():
        mine = [e for e in flows if _key(e) == key]
        assert mine, key
        new = [e for e in mine if e["unmapped"]["kind"] == "new"]
        assert len(new) == 1, mine
        ev = new[0]
        assert (ev["activity_id"], ev["action_id"], ev["disposition_id"]) == (
            activity,
            action,
            disposition,
        ), ev
        assert ev["firewall_rule"]["uid"] == rule_uid, ev
        assert ev["type_uid"] == 400100 + activity
        assert ev["connection_info"]["direction_id"] == 1  # ingress
        assert ev["dst_endpoint"]["interface_name"] == lab.host_if
        assert ev["device"]["hostname"] and "security_control" in ev["metadata"]["profiles"]
    udp = [e for e in flows if e["connection_info"].get("protocol_num") == 17]
    assert {e["dst_endpoint"]["port"] for e in udp} == {9999}
    assert all(e["disposition_id"] == 2 and e["firewall_rule"]["uid"] == "default" for e in udp)
    alerts = [e for e in events if e["class_uid"] == 2004]
    assert alerts[0]["finding_info"]["types"] == ["new_flow_rate"]
    assert alerts[0]["activity_id"] == 1 and alerts[0]["status_id"] == 1
    # Kafka keys stay the microseg ones: addresses for flows, alert@<host> for alerts.
    for r, ev in zip(kafka, events, strict=True):
        if ev["class_uid"] == 4001:
            assert r["key"] == f"{ev['src_endpoint']['ip']}->{ev['dst_endpoint']['ip']}"
        elif ev["class_uid"] == 2004:
            assert r["key"] == f"alert@{ev['device']['hostname']}"
