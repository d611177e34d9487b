"""The filters of `flows observe` and `fleet observe` (streamer/cli/observe.py's ObserveConfig),
applied here as the agent applies its own (streamer.events.sinks.websocket.FlowFilter): the
flags parsed by the real parser, then `matches` on records."""

from __future__ import annotations

import io
from typing import Any

import pytest

from streamer.cli.main import build_parser
from streamer.cli.observe import ObserveConfig, Printer
from streamer.events.sinks.websocket import FlowFilter


def rec(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "flow",
        "seq": 1,
        "time": "2026-11-22T10:01:02.123456789Z",
        "host": "node-a",
        "direction": "ingress",
        "verdict": "deny",
        "src_ip": "10.0.0.7",
        "dst_ip": "10.0.0.5",
        "src_port": 51234,
        "dst_port": 22,
        "protocol": "tcp",
        "packets": 1,
        "bytes": 60,
        "rule": {"rule_id": 1002, "name": "no-ssh", "priority": 200, "action": "deny"},
    }
    base.update(fields)
    return base


def fleet_cfg(*flags: str) -> ObserveConfig:
    args = build_parser().parse_args(["fleet", "observe", "--fleet", "127.0.0.1:9092", *flags])
    return ObserveConfig.from_args(args, io.StringIO(), host_column=True)


RECORDS = [
    rec(),
    rec(host="node-b", verdict="log", dst_port=5432, rule={"rule_id": 1005, "name": "audit"}),
    rec(host="node-c", protocol="udp", dst_port=53, rule=None, src_ip="fd00::7", dst_ip="fd00::5"),
    rec(host="node-b", staged={"verdict": "allow", "rule": None}),
    {"type": "lost", "seq": 9, "host": "node-a", "lost": 3, "stage": "kernel"},
]


@pytest.mark.parametrize(
    ("flags", "kept"),
    [
        ((), [0, 1, 2, 3, 4]),
        (("--verdict", "log"), [1, 4]),
        (("--protocol", "udp"), [2, 4]),
        (("--port", "5432,53"), [1, 2, 4]),
        (("--ip", "fd00::/64"), [2, 4]),
        (("--ip", "10.0.0.5"), [0, 1, 3, 4]),
        (("--rule", "1005"), [1, 4]),
        (("--rule", "audit"), [1, 4]),
        (("--rule", "default"), [2, 4]),
        (("--rule", "audit", "--rule", "1002"), [0, 1, 3, 4]),
        (("--staged",), [3, 4]),
        (("--staged-verdict", "deny"), [4]),
        (("--host", "node-b"), [1, 3]),
        (("--host", "node-a,node-c"), [0, 2, 4]),
        (("--host", "node-b", "--verdict", "deny"), [3]),
    ],
)
def test_matches_applies_every_filter_like_the_agent(
    flags: tuple[str, ...], kept: list[int]
) -> None:
    cfg = fleet_cfg(*flags)
    assert [i for i, r in enumerate(RECORDS) if cfg.matches(r)] == kept


def test_the_agents_filters_and_the_local_ones_agree() -> None:
    """What `flows observe` has the agent filter (params) is what `matches` applies."""
    cfg = fleet_cfg("--verdict", "deny", "--port", "22")
    agent = FlowFilter.parse(cfg.params)
    for r in RECORDS:
        assert cfg.matches(r) == agent.matches(r)


def test_the_host_column_is_in_the_table_and_compact_lines() -> None:
    out = io.StringIO()
    Printer(fleet_cfg("--last", "5"), out).batch([(r, None) for r in RECORDS[:2]])
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:3] == ["TIME", "HOST", "VERDICT"]
    assert [ln.split()[1] for ln in lines[1:]] == ["node-a", "node-b"]

    out = io.StringIO()
    Printer(fleet_cfg("-o", "compact", "-f"), out).one(RECORDS[2], None)
    assert out.getvalue().startswith("node-c 10:01:02.123 DENY")

    out = io.StringIO()
    Printer(fleet_cfg("-f"), out).one(RECORDS[1], None)
    header, row = out.getvalue().splitlines()
    assert header.split()[:2] == ["TIME", "HOST"] and row.split()[1] == "node-b"
