"""OCSF 1.3.0 output (`streamer.events.ocsf`): every kind of record the stream carries, made by
the real Enricher, mapped and validated against the published OCSF 1.3.0 schema
(`ocsf-json-schema`'s bundled copy, with `jsonschema`: tests/support/ocsf.py); the sinks'
`format`, and the `microseg run` flags that choose it."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from support.events import lost_factory, tcp_rule, valid
from support.ocsf import ocsf_errors, ocsf_valid

from streamer import __version__
from streamer.agent.pressure import AlertChange
from streamer.events.decode import FlowEvent
from streamer.events.enrich import Enricher
from streamer.events.fanout import Channel, make_item
from streamer.events.ocsf import epoch_ms, ocsf_items, to_ocsf, to_ocsf_bytes
from streamer.events.sinks.file import FileSink, FileSinkConfig
from streamer.events.sinks.kafka import KafkaSinkConfig
from streamer.policy.model import parse_policy_document

# ---- records, made as the agent makes them ------------------------------------------------------

TCP = dict(protocol=6, src_port=51234, dst_port=22, tcp_flags=0x12)  # SYN|ACK
UDP = dict(protocol=17, src_port=5353, dst_port=53, tcp_flags=0)
ICMP = dict(protocol=1, src_port=77, dst_port=77, tcp_flags=0)  # echo: the id in both ports
ICMP6 = dict(protocol=58, src_port=0, dst_port=0, tcp_flags=0, family=6)
GRE = dict(protocol=47, src_port=0, dst_port=0, tcp_flags=0)
PROTOCOLS = {"tcp": TCP, "udp": UDP, "icmp": ICMP, "icmpv6": ICMP6, "gre": GRE}


def enricher() -> Enricher:
    en = Enricher({1: "eth0", 2: "veth-a"}, host="node-a")
    policy = parse_policy_document(
        {
            "groups": {"web": {"members": ["10.0.0.0/24"]}, "db": {}},
            "policies": [
                tcp_rule(1, name="no-ssh"),
                tcp_rule(2, name="audit", action="log"),
                tcp_rule(3, name="trial", mode="staged"),
                tcp_rule(4, name="web-db", action="allow", src_group="web", dst_group="db"),
                tcp_rule(5, name="trial-log", action="log", mode="staged"),
            ],
        }
    )
    en.add_generation(7, policy)
    return en


def event(proto: str = "tcp", **over: Any) -> FlowEvent:
    p = dict(PROTOCOLS[proto])
    family = p.pop("family", 4)
    ev = FlowEvent(
        ts_ns=1_000_000_000,
        packets=3,
        bytes=180,
        ifindex=1,
        rule_id=1,
        generation=7,
        family=family,
        protocol=p["protocol"],
        direction="ingress",
        verdict="deny",
        src_ip="10.0.0.7" if family == 4 else "fd00::7",
        dst_ip="10.0.0.5" if family == 4 else "fd00::5",
        src_port=p["src_port"],
        dst_port=p["dst_port"],
        tcp_flags=p["tcp_flags"],
        kind="new",
    )
    return replace(ev, **over)


# Every flow outcome the stream carries (contract §4, §6): the enforced verdict, the staged one.
FLOWS: dict[str, dict[str, Any]] = {
    "deny": dict(verdict="deny", rule_id=1),
    "deny-default": dict(verdict="deny", rule_id=None),
    "log": dict(verdict="log", rule_id=2),
    "would-deny": dict(verdict="allow", rule_id=4, staged_verdict="deny", staged_rule_id=3),
    "would-deny-default": dict(verdict="allow", rule_id=None, staged_verdict="deny"),
    "log-would-deny": dict(verdict="log", rule_id=2, staged_verdict="deny", staged_rule_id=3),
    "would-log": dict(verdict="allow", rule_id=4, staged_verdict="log", staged_rule_id=5),
    "deny-would-allow": dict(verdict="deny", rule_id=1, staged_verdict="allow", staged_rule_id=4),
}
# (activity_id, action_id, disposition_id) each outcome maps to (SPEC §8; README "OCSF").
OUTCOMES = {
    "deny": (5, 2, 2),
    "deny-default": (5, 2, 2),
    "log": (6, 1, 17),
    "would-deny": (6, 1, 15),
    "would-deny-default": (6, 1, 15),
    "log-would-deny": (6, 1, 15),
    "would-log": (6, 1, 1),
    "deny-would-allow": (5, 2, 2),
}


def alert_records(en: Enricher) -> dict[str, dict[str, Any]]:
    """One of each alert kind the agent sends (streamer.agent.pressure, streamer.agent.rollback),
    both states."""
    out: dict[str, dict[str, Any]] = {}
    for alert, subject, severity in (
        ("syn_flood", "tcp", "critical"),
        ("new_flow_rate", "all", "warning"),
        ("map_fill", "sessions", "warning"),
        ("map_fill", "sessions", "critical"),
    ):
        for state in ("firing", "resolved"):
            change = AlertChange(alert, subject, state, severity, 2500.5, 2048, f"{alert} {state}")
            out[f"{alert}-{severity}-{state}"] = en.alert_record(change.fields())
    for alert, severity in (("policy_reverted", "warning"), ("policy_revert_failed", "critical")):
        fields: dict[str, Any] = {
            "alert": alert,
            "subject": "policy",
            "state": "firing",
            "severity": severity,
            "value": 12.5,
            "threshold": 60.0,
            "message": f"{alert}: not confirmed in time",
            "generation": 9,
            "restored_generation": 8,
            "deadline": "2026-11-22T10:01:02Z",
            "actor": "alice",
            "change": "PUT /api/v1/policies",
        }
        if alert == "policy_reverted":
            fields["policy_generation"] = 10
        out[alert] = en.alert_record(fields)
    return out


def without_host(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "host"}


# ---- flows ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [True, False], ids=["host", "no-host"])
@pytest.mark.parametrize("proto", list(PROTOCOLS))
@pytest.mark.parametrize("outcome", list(FLOWS))
def test_every_flow_outcome_is_a_valid_network_activity(
    outcome: str, proto: str, host: bool
) -> None:
    en = enricher()
    record = en.enrich(event(proto, **FLOWS[outcome]))
    valid(record)  # a real contract §4 record
    if not host:
        record = without_host(record)
    before = orjson.dumps(record)
    ev = to_ocsf(record)
    assert orjson.dumps(record) == before, "to_ocsf changed the record"
    ocsf_valid(ev)
    activity = OUTCOMES[outcome][0]
    assert (ev["class_uid"], ev["category_uid"]) == (4001, 4)
    assert (ev["activity_id"], ev["action_id"], ev["disposition_id"]) == OUTCOMES[outcome]
    assert ev["type_uid"] == 4001 * 100 + activity
    meta = ev["metadata"]
    assert meta["version"] == "1.3.0" and meta["sequence"] == record["seq"]
    assert meta["product"] == {
        "name": "microseg",
        "vendor_name": "microseg",
        "version": __version__,
    }
    assert meta["profiles"] == (["security_control", "host"] if host else ["security_control"])
    assert meta["original_time"] == record["time"]
    assert ev["time"] == epoch_ms(record["time"])
    if host:
        assert ev["device"]["hostname"] == "node-a"
    else:
        assert "device" not in ev
    # The flow's originator is the source; the interface is the host's side (ingress: dst).
    assert ev["src_endpoint"]["ip"] == record["src_ip"]
    assert ev["dst_endpoint"]["ip"] == record["dst_ip"]
    assert ev["dst_endpoint"]["interface_name"] == "eth0"
    assert "interface_name" not in ev["src_endpoint"]
    conn = ev["connection_info"]
    assert conn["direction_id"] == 1
    assert conn["protocol_num"] == PROTOCOLS[proto]["protocol"]
    assert ev["traffic"] == {"packets": 3, "bytes": 180}
    assert (
        ev["unmapped"]["policy_generation"] == 7
        and ev["unmapped"]["verdict"] == FLOWS[outcome]["verdict"]
    )
    if "staged_verdict" in FLOWS[outcome]:
        assert ev["unmapped"]["staged"] == record["staged"]
    else:
        assert "staged" not in ev["unmapped"]


def test_flow_fields_land_where_the_readme_says() -> None:
    en = enricher()
    deny = to_ocsf(en.enrich(event("tcp")))
    assert deny["src_endpoint"] == {"ip": "10.0.0.7", "port": 51234}
    assert deny["dst_endpoint"] == {"ip": "10.0.0.5", "port": 22, "interface_name": "eth0"}
    assert deny["connection_info"] == {
        "direction_id": 1,
        "direction": "Inbound",
        "protocol_num": 6,
        "protocol_name": "tcp",
        "tcp_flags": 0x12,
    }
    assert deny["firewall_rule"] == {"uid": "1", "name": "no-ssh", "desc": "deny, priority 100"}
    assert deny["unmapped"]["rule"]["name"] == "no-ssh" and deny["unmapped"]["kind"] == "new"
    assert (deny["severity_id"], deny["status_id"]) == (1, 1)
    assert deny["activity_name"] == "Refuse" and deny["disposition"] == "Blocked"
    # Egress: the interface is the source's; outbound.
    out = to_ocsf(en.enrich(event("udp", direction="egress", ifindex=2)))
    assert out["src_endpoint"]["interface_name"] == "veth-a"
    assert "interface_name" not in out["dst_endpoint"]
    assert out["connection_info"]["direction_id"] == 2
    assert "tcp_flags" not in out["connection_info"]
    # ICMP: the echo identifier is no port.
    icmp = to_ocsf(en.enrich(event("icmp")))
    assert "port" not in icmp["src_endpoint"] and icmp["unmapped"]["icmp_echo_id"] == 77
    # A protocol without a name: its number only.
    gre = to_ocsf(en.enrich(event("gre")))
    assert gre["connection_info"]["protocol_num"] == 47
    assert "protocol_name" not in gre["connection_info"]
    # The default action: a firewall_rule of its own (no rule id can be "default").
    dflt = to_ocsf(en.enrich(event("tcp", rule_id=None)))
    assert dflt["firewall_rule"]["uid"] == "default" and dflt["unmapped"]["rule"] is None
    # A would-denial names the staged rule that would deny (the enforced one in unmapped).
    would = to_ocsf(en.enrich(event("tcp", **FLOWS["would-deny"])))
    assert would["firewall_rule"]["uid"] == "3" and would["firewall_rule"]["type"] == "staged"
    assert would["unmapped"]["rule"]["name"] == "web-db"
    group = to_ocsf(en.enrich(event("tcp", verdict="allow", rule_id=4, staged_verdict="log")))
    assert group["firewall_rule"]["desc"] == "allow, priority 100, from group web, to group db"


def test_time_is_milliseconds_since_the_epoch() -> None:
    assert epoch_ms("2026-11-22T10:01:02.123456789Z") == int(
        datetime(2026, 11, 22, 10, 1, 2, tzinfo=UTC).timestamp() * 1000 + 123
    )
    assert epoch_ms("2026-11-22T10:01:03.999999999Z") == epoch_ms("2026-11-22T10:01:02.0Z") + 1999
    assert epoch_ms("1970-01-01T00:00:00Z") == 0


# ---- lost and alert records ---------------------------------------------------------------------


@pytest.mark.parametrize("host", [True, False], ids=["host", "no-host"])
def test_lost_records_are_valid_base_events(host: bool) -> None:
    en = enricher()
    records = [
        en.lost_record(12, "kernel"),
        en.lost_record(1, "decode"),
        en.lost_record(40, "file", first_seq=3, last_seq=42),
        en.lost_record(7, "kafka-spool", first_seq=50, last_seq=56),
    ]
    for record in records:
        valid(record)
        ev = to_ocsf(record if host else without_host(record))
        ocsf_valid(ev)
        assert (ev["class_uid"], ev["category_uid"], ev["activity_id"]) == (0, 0, 99)
        assert ev["type_uid"] == 99 and ev["activity_name"] == "Events Lost"
        assert ev["severity_id"] == 3 and ev["metadata"]["profiles"] == []
        um = ev["unmapped"]
        assert (um["type"], um["lost"], um["stage"], um["seq"]) == (
            "lost",
            record["lost"],
            record["stage"],
            record["seq"],
        )
        assert um.get("first_seq") == record.get("first_seq")
        assert um.get("host") == ("node-a" if host else None)
    assert to_ocsf(records[2])["message"] == "40 flow events lost at file (seq 3..42)"


@pytest.mark.parametrize("host", [True, False], ids=["host", "no-host"])
def test_every_alert_is_a_valid_detection_finding(host: bool) -> None:
    en = enricher()
    alerts = alert_records(en)
    for name, record in alerts.items():
        valid(record)
        record = record if host else without_host(record)
        ev = to_ocsf(record)
        ocsf_valid(ev)
        assert (ev["class_uid"], ev["category_uid"]) == (2004, 2), name
        firing = record["state"] == "firing"
        assert (ev["activity_id"], ev["status_id"]) == ((1, 1) if firing else (3, 4)), name
        assert ev["type_uid"] == 200400 + ev["activity_id"]
        assert ev["severity_id"] == {"warning": 3, "critical": 5}[record["severity"]]
        assert ev["finding_info"]["types"] == [record["alert"]]
        assert ev["message"] == record["message"] == ev["finding_info"]["desc"]
        assert ev["metadata"]["profiles"] == (["host"] if host else [])
        assert ("device" in ev) == host
        # Whatever has no OCSF place is kept, by its microseg name.
        assert "host" not in ev["unmapped"]  # device.hostname has it
        for key in set(record) - {"schema", "type", "seq", "time", "host", "severity", "message"}:
            assert ev["unmapped"][key] == record[key], (name, key)
    # The records of one alert share a finding uid: a SIEM pairs the firing and the resolution.
    a, b = alerts["syn_flood-critical-firing"], alerts["syn_flood-critical-resolved"]
    assert to_ocsf(a)["finding_info"]["uid"] == to_ocsf(b)["finding_info"]["uid"]
    assert to_ocsf(a)["finding_info"]["uid"] == "node-a/syn_flood/tcp"


def test_a_record_of_an_unknown_type_is_kept_whole() -> None:
    en = enricher()
    record = {**en.lost_record(1, "kernel"), "type": "future"}
    ev = to_ocsf(record)
    ocsf_valid(ev)
    assert ev["class_uid"] == 0 and ev["unmapped"] == record


def test_the_validator_rejects_what_is_not_ocsf() -> None:
    """The check is real: a missing required attribute, a wrong enum value, an attribute of a
    profile the event does not declare all fail."""
    en = enricher()
    good = to_ocsf(en.enrich(event("tcp")))
    assert ocsf_errors(good) == []
    assert ocsf_errors({k: v for k, v in good.items() if k != "dst_endpoint"})
    assert ocsf_errors({**good, "disposition_id": 1000})
    assert ocsf_errors({**good, "connection_info": {"protocol_num": 6}})  # no direction_id
    undeclared = {**good, "metadata": {**good["metadata"], "profiles": ["security_control"]}}
    assert any("device" in e for e in ocsf_errors(undeclared))


# ---- the sinks ----------------------------------------------------------------------------------


def test_ocsf_items_keep_order_keys_and_weights_and_leave_the_originals() -> None:
    en = enricher()
    items = [
        make_item(en.enrich(event("tcp"))),
        make_item(en.lost_record(5, "kernel"), 5),
        make_item(alert_records(en)["syn_flood-critical-firing"], 0),
    ]
    data = [i.data for i in items]
    out = ocsf_items(items)
    assert [i.data for i in items] == data
    assert [(i.seq, i.weight, i.key, i.is_lost) for i in out] == [
        (i.seq, i.weight, i.key, i.is_lost) for i in items
    ]
    for i in out:
        ocsf_valid(json.loads(i.data))


def test_sink_configs_take_only_known_formats(tmp_path: Path) -> None:
    assert FileSinkConfig(tmp_path / "f").format == "microseg"
    assert KafkaSinkConfig("127.0.0.1:9092", tmp_path, format="ocsf").format == "ocsf"
    with pytest.raises(ValueError, match="format"):
        FileSinkConfig(tmp_path / "f", format="cef")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format"):
        KafkaSinkConfig("127.0.0.1:9092", tmp_path, format="json")  # type: ignore[arg-type]


async def test_the_file_sink_writes_ocsf_events_lost_records_included(tmp_path: Path) -> None:
    """A sink's own lost record (its queue overflowed) comes out as OCSF too."""
    en = enricher()
    path = tmp_path / "events.jsonl"
    sink = FileSink(FileSinkConfig(path, format="ocsf"))
    ch = Channel("file", 3, lost_factory(en))
    for _ in range(5):  # 2 dropped: a lost record owed
        ch.offer(make_item(en.enrich(event("tcp"))))
    task = asyncio.create_task(sink.run(ch))
    while sink.written < 3:
        await asyncio.sleep(0.01)
    ch.offer(make_item(en.enrich(event("udp", verdict="log", rule_id=2))))
    ch.close()
    await task
    lines = [json.loads(x) for x in path.read_bytes().splitlines()]
    for ev in lines:
        ocsf_valid(ev)
    assert [ev["class_uid"] for ev in lines] == [4001, 4001, 4001, 0, 4001]
    assert lines[3]["unmapped"] == {
        "type": "lost",
        "lost": 2,
        "stage": "file",
        "first_seq": 4,
        "seq": 5,
        "host": "node-a",
    }
    assert lines[-1]["disposition_id"] == 17


# ---- the flags ----------------------------------------------------------------------------------


def run_config(monkeypatch: pytest.MonkeyPatch, *flags: str) -> Any:
    """The AgentConfig `microseg run FLAGS` would run with (the agent itself not started)."""
    from streamer.agent import service
    from streamer.cli.main import main

    got: list[Any] = []
    monkeypatch.setattr(service, "run_agent", lambda cfg: got.append(cfg) or 0)
    assert main(["run", "--iface", "lo", "--api", "none", *flags]) == 0
    return got[0]


def test_event_format_flags(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    cfg = run_config(monkeypatch)
    assert (cfg.events_file_format, cfg.kafka_format) == ("microseg", "microseg")
    cfg = run_config(monkeypatch, "--event-format", "ocsf")
    assert (cfg.events_file_format, cfg.kafka_format) == ("ocsf", "ocsf")
    cfg = run_config(monkeypatch, "--event-format", "ocsf", "--kafka-format", "microseg")
    assert (cfg.events_file_format, cfg.kafka_format) == ("ocsf", "microseg")
    cfg = run_config(monkeypatch, "--events-file-format", "ocsf", "--events-file", "/tmp/x")
    assert (cfg.events_file_format, cfg.kafka_format) == ("ocsf", "microseg")
    pc = replace(cfg, kafka="127.0.0.1:9", kafka_format="ocsf")
    from streamer.agent.service import Agent

    # The sinks' configs get the formats (Agent.pipeline_config, without starting an agent).
    sinks = Agent.pipeline_config(SimpleNamespace(config=pc))  # type: ignore[arg-type]
    assert sinks.file is not None and sinks.file.format == "ocsf"
    assert sinks.kafka is not None and sinks.kafka.format == "ocsf"
    from streamer.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--iface", "lo", "--kafka-format", "cef"])
    assert e.value.code == 2
    # The fleet's flows topic stays microseg: `fleet observe` and the fleet view read it.
    rc = main(["run", "--iface", "lo", "--fleet", "127.0.0.1:9", "--kafka-format", "ocsf"])
    assert rc == 2 and "--kafka-format ocsf with --fleet" in capsys.readouterr().err


@pytest.mark.parametrize("host", [True, False], ids=["host", "no-host"])
def test_the_serialized_event_is_to_ocsfs_whatever_the_path(host: bool) -> None:
    """`to_ocsf_bytes` (what the sinks write: templates for TCP and UDP flows) is byte for byte
    `orjson.dumps(to_ocsf(record))`, for every record kind, also once its template exists."""
    en = enricher()
    records = [
        en.enrich(event(proto, **FLOWS[outcome], src_port=1000 + n, packets=n))
        for n, (proto, outcome) in enumerate(
            (p, o) for p in PROTOCOLS for o in FLOWS for _ in range(2)
        )
    ]
    en.add_interfaces({3: "v%d"})  # a '%' in the template's text stays as it is
    records += [en.enrich(event("udp", direction="egress", ifindex=3))]
    records += [en.lost_record(3, "kernel"), *alert_records(en).values()]
    for record in records:
        record = record if host else without_host(record)
        text = to_ocsf_bytes(record)
        assert text == orjson.dumps(to_ocsf(record)), record
        ocsf_valid(json.loads(text))
