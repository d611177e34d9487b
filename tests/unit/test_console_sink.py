"""The console sink's lines (`--print-events`): flow records name their rule as every other
output does, lost and alert records print too (an alert used to stop the sink)."""

from __future__ import annotations

import asyncio
import io

from streamer.events.fanout import Channel, make_item
from streamer.events.sinks.console import ConsoleSink

FLOW = {
    "schema": "microseg.flow/v1",
    "type": "flow",
    "seq": 7,
    "time": "2026-12-07T10:01:02.123456789Z",
    "host": "h",
    "iface": "eth0",
    "direction": "ingress",
    "verdict": "deny",
    "src_ip": "10.0.0.7",
    "dst_ip": "10.0.0.5",
    "src_port": 51234,
    "dst_port": 22,
    "protocol": "tcp",
    "tcp_flags": "SYN",
    "packets": 1,
    "bytes": 60,
    "kind": "new",
    "rule": {"rule_id": 1002, "name": "no-ssh", "priority": 200, "action": "deny"},
    "policy_generation": 3,
}


def _print(*records: dict[str, object]) -> list[str]:
    out = io.StringIO()
    sink = ConsoleSink(out)

    async def go() -> None:
        ch = Channel(
            "console",
            100,
            lambda n, stage, first, last: make_item(
                {"type": "lost", "seq": last, "lost": n, "stage": stage}, n
            ),
        )
        ch.offer_batch([make_item(dict(r)) for r in records])
        ch.close()
        await sink.run(ch)

    asyncio.run(go())
    assert sink.printed == len(records)
    return out.getvalue().splitlines()


def test_a_flow_line_names_its_rule() -> None:
    default = {**FLOW, "seq": 8, "rule": None, "verdict": "log"}
    assert _print(FLOW, default) == [
        "10:01:02.123 DENY  ingress 10.0.0.7:51234 -> 10.0.0.5:22 tcp SYN rule=1002:no-ssh"
        " pkts=1 bytes=60 new",
        "10:01:02.123 LOG   ingress 10.0.0.7:51234 -> 10.0.0.5:22 tcp SYN rule=default"
        " pkts=1 bytes=60 new",
    ]


def test_lost_and_alert_records_print() -> None:
    lost = {"type": "lost", "seq": 9, "time": FLOW["time"], "lost": 5, "stage": "kernel"}
    alert = {
        "type": "alert",
        "seq": 10,
        "time": FLOW["time"],
        "alert": "syn_flood",
        "state": "firing",
        "severity": "warning",
        "message": "half-open 512",
    }
    assert _print(lost, alert) == [
        "10:01:02.123 LOST 5 events at kernel",
        "10:01:02.123 ALERT syn_flood firing (warning): half-open 512",
    ]
