"""Pressure alerts (streamer/agent/pressure.py) on readings made up here: levels, rates,
hysteresis, a restarted counter, refused configurations; and `microseg monitor`'s screen
(streamer/cli/monitor.py) for a reading. The flags and a real agent under a SYN flood:
tests/test_pressure.py."""

from __future__ import annotations

from typing import Any

import pytest

from streamer.agent.pressure import AlertChange, PressureConfig, PressureWatch
from streamer.cli.monitor import render


def reading(
    *,
    half_open: int = 0,
    syn: int = 0,
    new: int = 0,
    fill: dict[str, float] | None = None,
    drops: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "half_open_sessions": half_open,
        "syn_new_sessions": syn,
        "new_sessions": new,
        "closed_sessions": 0,
        "expired_sessions": 0,
        "drops": drops or {"policy": 0, "parse": 0},
        "fill": {
            name: {"entries": int(r * 1000), "capacity": 1000, "ratio": r, "evictions": 0}
            for name, r in (fill or {}).items()
        },
    }


def kinds(changes: list[AlertChange]) -> list[tuple[str, str, str, str]]:
    return [(c.alert, c.subject, c.state, c.severity) for c in changes]


def test_syn_flood_by_half_open_sessions_fires_once_and_resolves_with_hysteresis() -> None:
    w = PressureWatch(PressureConfig(half_open_threshold=100, syn_rate_threshold=0))
    assert w.observe(reading(half_open=99), 0.0) == []
    assert kinds(w.observe(reading(half_open=100), 1.0)) == [
        ("syn_flood", "tcp", "firing", "critical")
    ]
    assert w.observe(reading(half_open=500), 2.0) == []  # still firing: not again
    assert w.observe(reading(half_open=85), 3.0) == []  # above 80 % of the line: holds
    assert kinds(w.observe(reading(half_open=79), 4.0)) == [
        ("syn_flood", "tcp", "resolved", "critical")
    ]
    assert w.raised == {"syn_flood": 1}
    assert w.active() == []


def test_syn_flood_by_rate_needs_two_readings() -> None:
    w = PressureWatch(PressureConfig(half_open_threshold=0, syn_rate_threshold=1000))
    assert w.observe(reading(syn=10_000), 0.0) == []  # no rate from one reading
    (c,) = w.observe(reading(syn=13_000), 2.0)  # 1,500/s
    assert (c.alert, c.state, c.value, c.threshold) == ("syn_flood", "firing", 1500.0, 1000)
    assert "1500 new SYN sessions/s" in c.message
    snap = w.snapshot()
    assert snap["syn_new_sessions_per_s"] == 1500.0
    assert [a["alert"] for a in snap["alerts"]] == ["syn_flood"]
    # A counter going backwards (the classifier was replaced) gives no rate: state kept.
    assert w.observe(reading(syn=5), 3.0) == []
    assert kinds(w.observe(reading(syn=105), 4.0)) == [("syn_flood", "tcp", "resolved", "critical")]


def test_new_flow_rate_alert_and_off_switch() -> None:
    w = PressureWatch(
        PressureConfig(new_flow_rate_threshold=100, half_open_threshold=0, syn_rate_threshold=0)
    )
    w.observe(reading(new=0), 0.0)
    assert kinds(w.observe(reading(new=500), 1.0)) == [
        ("new_flow_rate", "all", "firing", "warning")
    ]
    off = PressureWatch(PressureConfig(new_flow_rate_threshold=0))
    off.observe(reading(new=0), 0.0)
    assert off.observe(reading(new=10**9), 1.0) == []


def test_map_fill_levels_escalate_and_step_down() -> None:
    w = PressureWatch(PressureConfig())
    assert w.observe(reading(fill={"sessions": 0.79, "frags": 0.1}), 0.0) == []
    assert kinds(w.observe(reading(fill={"sessions": 0.80}), 1.0)) == [
        ("map_fill", "sessions", "firing", "warning")
    ]
    assert kinds(w.observe(reading(fill={"sessions": 0.96}), 2.0)) == [
        ("map_fill", "sessions", "firing", "critical")
    ]
    assert w.observe(reading(fill={"sessions": 0.92}), 3.0) == []  # within the margin
    assert kinds(w.observe(reading(fill={"sessions": 0.85}), 4.0)) == [
        ("map_fill", "sessions", "firing", "warning")
    ]
    assert w.observe(reading(fill={"sessions": 0.76}), 5.0) == []
    (c,) = w.observe(reading(fill={"sessions": 0.5}), 6.0)
    assert (c.state, c.severity) == ("resolved", "warning")
    assert "50% full (500 of 1000)" in c.message
    assert w.raised == {"map_fill": 3}


def test_drop_rates_and_snapshot_thresholds() -> None:
    w = PressureWatch(PressureConfig(half_open_threshold=7))
    w.observe(reading(drops={"policy": 10, "parse": 0}), 0.0)
    w.observe(reading(drops={"policy": 30, "parse": 4}), 2.0)
    snap = w.snapshot()
    assert snap["drops_per_s"] == {"policy": 10.0, "parse": 2.0}
    assert snap["thresholds"]["half_open"] == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0},
        {"fill_warning": 0.9, "fill_critical": 0.8},
        {"fill_warning": 0},
        {"half_open_threshold": -1},
        {"new_flow_rate_threshold": -5},
    ],
)
def test_bad_pressure_config_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PressureConfig(**kwargs)


def test_monitor_renders_a_reading() -> None:
    w = PressureWatch(PressureConfig(half_open_threshold=5))
    w.observe(reading(half_open=9, fill={"sessions": 0.97}), 0.0)
    stats = {
        "active_sessions": 970,
        "session_table_capacity": 1000,
        "events_sent": 12,
        "events_lost": 0,
        "drops": {"policy": 3, "parse": 0},
        "pressure": w.snapshot(),
    }
    screen = render(stats, "127.0.0.1:8080")
    assert "active 970 / 1,000 (97.0%)" in screen and "half-open 9" in screen
    assert "sessions" in screen and "97.0%" in screen and "!!" in screen
    assert "CRITICAL syn_flood [tcp]" in screen and "CRITICAL map_fill [sessions]" in screen
    assert "policy 3" in screen
