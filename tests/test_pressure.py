"""Pressure alerts (streamer/agent/pressure.py) and `microseg monitor` (streamer/cli/monitor.py)
with the real agent: bad pressure and timeout flags are refused at start, then a real agent in
the netns lab: a bounded SYN flood from the lab peer raises `syn_flood` (in the events file,
/api/v1/stats and /metrics) and fills a small session table past its 80 % line (`map_fill`);
`microseg monitor` shows it. The alert logic on made-up readings:
tests/unit/test_pressure_watch.py.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from support.agentapi import api_metrics, api_stats
from support.agentproc import AgentProcess, free_port, write_policy
from support.events import SCHEMA
from support.netutil import wait_until

from streamer.lab.lab import Lab
from streamer.lab.netns import netns_socket


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fill-warning", "1.5"], "must be above 0 and at most 1"),
        (["--fill-warning", "90%", "--fill-critical", "85%"], "warning <= critical"),
        (["--syn-flood-rate", "lots"], "is not a number per second"),
        (["--syn-flood-half-open", "-3"], "must be 0 or more"),
        (["--pressure-interval", "0"], "pressure interval must be positive"),
        (["--timeout", "udp=0"], "timeout udp must be a number of seconds above 0"),
        (["--timeout", "tcp=5"], "is not CLASS=SECONDS with CLASS one of tcp_syn_sent"),
        (["--timeout", "icmp=soon"], "'soon' is not a number"),
    ],
)
def test_bad_pressure_and_timeout_flags_are_refused(flags: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "streamer", "run", "--iface", "lo", "--api", "none", *flags],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


# ---- a real agent -------------------------------------------------------------------------


def _syn_flood(lab: Lab, port: int, n: int) -> Iterator[socket.socket]:
    """`n` TCP connection attempts from the lab peer to the host, left pending (their SYNs
    are denied, so each stays a half-open session): a bounded SYN flood."""
    for _ in range(n):
        s = netns_socket(lab.peer_ns, socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((lab.host_v4, port))
        yield s


@pytest.fixture
def pressured_agent(
    module_lab: Lab, agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> AgentProcess:
    policy = write_policy(tmp_path / "policy.json", [], default="deny")
    agent = agent_factory(
        module_lab,
        policy,
        api=f"127.0.0.1:{free_port()}",
        extra_args=[
            "--syn-flood-half-open",
            "100",
            "--syn-flood-rate",
            "0",
            "--session-table-size",
            "512",
            "--pressure-interval",
            "0.2",
            "--timeout",
            "tcp_syn_sent=2",
        ],
    )
    agent.start()
    agent.wait_api()
    return agent


def test_a_syn_flood_from_the_peer_raises_alerts_everywhere(
    pressured_agent: AgentProcess, module_lab: Lab
) -> None:
    agent = pressured_agent
    with ExitStack() as stack:
        for s in _syn_flood(module_lab, 9, 450):  # 450 of 512 sessions: past 80 %
            stack.callback(s.close)

        def alerts() -> dict[tuple[str, str], dict[str, Any]]:
            return {
                (e["alert"], e["subject"]): e for e in agent.events() if e.get("type") == "alert"
            }

        assert wait_until(
            lambda: ("syn_flood", "tcp") in alerts() and ("map_fill", "sessions") in alerts(),
            timeout=20,
        ), agent.log
        got = alerts()
        flood = got[("syn_flood", "tcp")]
        assert (flood["state"], flood["severity"], flood["threshold"]) == (
            "firing",
            "critical",
            100,
        )
        assert flood["value"] >= 100 and "half-open" in flood["message"]
        fill = got[("map_fill", "sessions")]
        assert fill["state"] == "firing" and fill["value"] >= 0.8
        for e in got.values():
            jsonschema.validate(e, SCHEMA)
        stats = api_stats(agent)
        assert stats["half_open_sessions"] >= 100
        assert {a["alert"] for a in stats["pressure"]["alerts"]} >= {"syn_flood", "map_fill"}
        assert stats["pressure"]["fill"]["sessions"]["ratio"] >= 0.8
        assert stats["drops"]["policy"] >= 450
        metrics = api_metrics(agent)
        assert (
            'microseg_alert_active{alert="syn_flood",severity="critical",subject="tcp"} 1.0'
            in metrics
        )
        assert 'microseg_alerts_total{alert="syn_flood"} 1.0' in metrics
        assert 'microseg_map_fill_ratio{map="sessions"}' in metrics
        assert 'microseg_drops_total{reason="policy"}' in metrics
        # The terminal view shows the same, once.
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "streamer",
                "monitor",
                "--once",
                "--api",
                agent.api or "",
                "--state-dir",
                str(agent.state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        assert out.returncode == 0, out.stderr
        assert "CRITICAL syn_flood [tcp]" in out.stdout and "sessions" in out.stdout
        js = subprocess.run(
            [
                sys.executable,
                "-m",
                "streamer",
                "monitor",
                "--count",
                "2",
                "--interval",
                "0.2",
                "-o",
                "json",
                "--api",
                agent.api or "",
                "--state-dir",
                str(agent.state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        lines = [json.loads(x) for x in js.stdout.splitlines()]
        assert len(lines) == 2 and lines[0]["half_open_sessions"] >= 100

    # The half-open sessions expire (--timeout tcp_syn_sent=2) and are reaped: both alerts
    # end, each with one `resolved` record.
    def resolved() -> set[tuple[str, str]]:
        return {
            (e["alert"], e["subject"])
            for e in agent.events()
            if e.get("type") == "alert" and e["state"] == "resolved"
        }

    assert wait_until(
        lambda: resolved() >= {("syn_flood", "tcp"), ("map_fill", "sessions")}, timeout=30
    ), agent.log
    stats = api_stats(agent)
    assert stats["half_open_sessions"] == 0 and stats["pressure"]["alerts"] == []
    assert stats["expired_sessions"] >= 450
