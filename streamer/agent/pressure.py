"""Pressure: the classifier's tables and flood signs, watched; alerts when they cross a line.

In: a reading of `Datapath.pressure()` every `interval` seconds (session gauges, the counters
to take rates of, drops by reason, the fill of every map). Out: `snapshot()` (the last reading
with rates and the active alerts: for `/api/v1/stats`, `/metrics` and `microseg monitor`) and
alert changes, each handed to `on_alert` (the agent puts them into the event stream as
`alert` records and logs them).

Alerts, each raised once when it starts and resolved once when it ends (with hysteresis, so a
value wobbling at the line does not flap):
- `syn_flood` (critical): half-open TCP sessions at or above `half_open_threshold`, or new
  TCP sessions opened by a SYN at or above `syn_rate_threshold` per second;
- `new_flow_rate` (warning): new sessions of any protocol at or above
  `new_flow_rate_threshold` per second (0: off);
- `map_fill` (one per map): warning at `fill_warning` (80 %), critical at `fill_critical`
  (95 %); a change of level is a new `firing` record with the new severity.
A rate needs two readings: the first reading raises only level alerts. A counter that went
backwards (a restarted classifier) restarts the rates.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("microseg.pressure")

WARNING, CRITICAL = "warning", "critical"
# Counters whose per-second rates the snapshot carries.
RATE_COUNTERS = ("new_sessions", "syn_new_sessions", "closed_sessions", "expired_sessions")


@dataclass(frozen=True)
class PressureConfig:
    """Thresholds; `clear_ratio`: a flood alert ends below this fraction of its threshold;
    `fill_margin`: a fill level ends this far (ratio) below its line."""

    interval: float = 1.0
    half_open_threshold: int = 2048
    syn_rate_threshold: float = 2000.0
    new_flow_rate_threshold: float = 50_000.0
    fill_warning: float = 0.80
    fill_critical: float = 0.95
    clear_ratio: float = 0.8
    fill_margin: float = 0.05

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("the pressure interval must be positive")
        if not 0 < self.fill_warning <= self.fill_critical <= 1:
            raise ValueError("fill thresholds must satisfy 0 < warning <= critical <= 1")
        if self.half_open_threshold < 0 or self.syn_rate_threshold < 0:
            raise ValueError("SYN flood thresholds must not be negative")
        if self.new_flow_rate_threshold < 0:
            raise ValueError("the new-flow rate threshold must not be negative")


@dataclass(frozen=True)
class AlertChange:
    """One alert starting, changing severity, or ending."""

    alert: str  # syn_flood | new_flow_rate | map_fill
    subject: str  # the map's name, or "tcp" / "all"
    state: str  # firing | resolved
    severity: str  # warning | critical (of the level that fired, or that ended)
    value: float
    threshold: float
    message: str

    def fields(self) -> dict[str, Any]:
        return {
            "alert": self.alert,
            "subject": self.subject,
            "state": self.state,
            "severity": self.severity,
            "value": round(self.value, 4),
            "threshold": round(self.threshold, 4),
            "message": self.message,
        }


@dataclass
class _Active:
    severity: str
    since: float
    value: float
    threshold: float
    message: str


@dataclass
class PressureWatch:
    """Pure logic (`observe`) plus the agent's polling loop (`run`)."""

    config: PressureConfig = field(default_factory=PressureConfig)
    on_alert: Callable[[AlertChange], None] | None = None
    raised: dict[str, int] = field(default_factory=dict)  # alert -> times it fired
    _active: dict[tuple[str, str], _Active] = field(default_factory=dict)
    _last: dict[str, Any] | None = None
    _last_at: float = 0.0
    _rates: dict[str, float] = field(default_factory=dict)
    _drop_rates: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- the logic ---------------------------------------------------------------------------

    def observe(self, sample: dict[str, Any], now: float) -> list[AlertChange]:
        """Take one reading (`Datapath.pressure()`) made at `now` (seconds, monotonic);
        return the alerts that started, changed or ended with it."""
        rates: dict[str, float] = {}
        drop_rates: dict[str, float] = {}
        last = self._last
        if last is not None and now > self._last_at:
            dt = now - self._last_at
            for k in RATE_COUNTERS:
                d = int(sample.get(k, 0)) - int(last.get(k, 0))
                if d >= 0:
                    rates[k] = d / dt
            for reason, n in sample.get("drops", {}).items():
                d = int(n) - int(last.get("drops", {}).get(reason, 0))
                if d >= 0:
                    drop_rates[reason] = d / dt
        changes: list[AlertChange] = []
        cfg = self.config
        half_open = int(sample.get("half_open_sessions", 0))
        syn_rate = rates.get("syn_new_sessions")
        flood, value, threshold, why = False, float(half_open), float(cfg.half_open_threshold), ""
        key = ("syn_flood", "tcp")
        active = key in self._active
        clear = cfg.clear_ratio if active else 1.0
        if cfg.half_open_threshold and half_open >= cfg.half_open_threshold * clear:
            flood, why = True, f"{half_open} half-open TCP sessions"
        if (
            cfg.syn_rate_threshold
            and syn_rate is not None
            and syn_rate >= cfg.syn_rate_threshold * clear
        ):
            if not flood:
                value, threshold = syn_rate, cfg.syn_rate_threshold
            flood = True
            why = ", ".join(x for x in (why, f"{syn_rate:.0f} new SYN sessions/s") if x)
        if syn_rate is None and active:
            flood = True  # no rate yet (a restarted counter): keep the state
        changes += self._level(
            key,
            CRITICAL if flood else None,
            value,
            threshold,
            f"SYN flood suspected: {why}" if flood else "SYN flood over",
            now,
        )
        new_rate = rates.get("new_sessions")
        if cfg.new_flow_rate_threshold and new_rate is not None:
            key = ("new_flow_rate", "all")
            clear = cfg.clear_ratio if key in self._active else 1.0
            high = new_rate >= cfg.new_flow_rate_threshold * clear
            changes += self._level(
                key,
                WARNING if high else None,
                new_rate,
                cfg.new_flow_rate_threshold,
                f"{new_rate:.0f} new flows/s" if high else "new-flow rate back to normal",
                now,
            )
        for name, fill in sample.get("fill", {}).items():
            ratio = float(fill.get("ratio", 0.0))
            key = ("map_fill", name)
            cur = self._active.get(key)
            level: str | None = None
            margin = cfg.fill_margin
            crit_line = cfg.fill_critical - (margin if cur and cur.severity == CRITICAL else 0)
            warn_line = cfg.fill_warning - (margin if cur else 0)
            if ratio >= crit_line:
                level = CRITICAL
            elif ratio >= warn_line:
                level = WARNING
            line = cfg.fill_critical if level == CRITICAL else cfg.fill_warning
            entries, capacity = fill.get("entries", 0), fill.get("capacity", 0)
            changes += self._level(
                key,
                level,
                ratio,
                line,
                f"map {name} is {ratio:.0%} full ({entries} of {capacity})",
                now,
            )
        with self._lock:
            self._last, self._last_at = sample, now
            self._rates, self._drop_rates = rates, drop_rates
        return changes

    def _level(
        self,
        key: tuple[str, str],
        level: str | None,
        value: float,
        threshold: float,
        message: str,
        now: float,
    ) -> list[AlertChange]:
        cur = self._active.get(key)
        alert, subject = key
        if cur is not None:
            cur.value = value
        if level is None:
            if cur is None:
                return []
            with self._lock:
                del self._active[key]
            return [
                AlertChange(alert, subject, "resolved", cur.severity, value, cur.threshold, message)
            ]
        if cur is not None and cur.severity == level:
            return []
        with self._lock:
            self._active[key] = _Active(level, now, value, threshold, message)
            self.raised[alert] = self.raised.get(alert, 0) + 1
        return [AlertChange(alert, subject, "firing", level, value, threshold, message)]

    # ---- readers -----------------------------------------------------------------------------

    def active(self) -> list[dict[str, Any]]:
        """The alerts firing now."""
        with self._lock:
            return [
                {
                    "alert": a,
                    "subject": s,
                    "severity": v.severity,
                    "since_seconds": round(time.monotonic() - v.since, 1),
                    "value": round(v.value, 4),
                    "threshold": round(v.threshold, 4),
                    "message": v.message,
                }
                for (a, s), v in sorted(self._active.items())
            ]

    def snapshot(self) -> dict[str, Any]:
        """The last reading, its rates (per second), the active alerts and how often each
        kind fired: `/api/v1/stats` shows it under `pressure`."""
        with self._lock:
            last = dict(self._last or {})
            rates = {f"{k}_per_s": round(v, 1) for k, v in self._rates.items()}
            drop_rates = {k: round(v, 1) for k, v in self._drop_rates.items()}
            raised = dict(self.raised)
        last.update(rates)
        last["drops_per_s"] = drop_rates
        last["alerts"] = self.active()
        last["alerts_raised"] = raised
        last["thresholds"] = {
            "half_open": self.config.half_open_threshold,
            "syn_per_s": self.config.syn_rate_threshold,
            "new_flows_per_s": self.config.new_flow_rate_threshold,
            "fill_warning": self.config.fill_warning,
            "fill_critical": self.config.fill_critical,
        }
        return last

    # ---- the agent's loop ----------------------------------------------------------------------

    async def run(self, read: Callable[[], dict[str, Any]]) -> None:
        """Every `interval`: `read()` in a worker thread (it walks a map), then `observe`;
        each change goes to the log and to `on_alert`. A failed reading is logged (once per
        kind of failure in a row) and the next one tried."""
        failing = ""
        while True:
            try:
                sample = await asyncio.to_thread(read)
            except Exception as e:
                if str(e) != failing:
                    log.warning("reading the classifier's pressure gauges failed: %s", e)
                    failing = str(e)
            else:
                failing = ""
                for change in self.observe(sample, time.monotonic()):
                    level = logging.INFO if change.state == "resolved" else logging.WARNING
                    log.log(
                        level,
                        "alert %s %s (%s): %s",
                        change.alert,
                        change.state,
                        change.severity,
                        change.message,
                    )
                    if self.on_alert is not None:
                        self.on_alert(change)
            await asyncio.sleep(self.config.interval)


class PressureCollector:
    """Rates and alerts (`microseg_rate_per_second`, `microseg_alert_active`,
    `microseg_alerts_total`) from `PressureWatch.snapshot()` at scrape time; the gauges
    themselves (map fill, half-open sessions, drops) are streamer.api.metrics'."""

    def __init__(self, watch: PressureWatch) -> None:
        self._watch = watch

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._watch.snapshot()
        if not s.get("fill") and "half_open_sessions" not in s:
            return  # no reading yet
        rates = GaugeMetricFamily(
            "microseg_rate_per_second",
            "Per-second rate over the last pressure interval",
            labels=["counter"],
        )
        for k in RATE_COUNTERS:
            if f"{k}_per_s" in s:
                rates.add_metric([k], s[f"{k}_per_s"])
        yield rates
        active = GaugeMetricFamily(
            "microseg_alert_active",
            "1 while an alert fires",
            labels=["alert", "subject", "severity"],
        )
        for a in s.get("alerts", []):
            active.add_metric([a["alert"], a["subject"], a["severity"]], 1)
        yield active
        raised = CounterMetricFamily(
            "microseg_alerts", "Alerts raised since start", labels=["alert"]
        )
        for name in ("syn_flood", "new_flow_rate", "map_fill"):
            raised.add_metric([name], s.get("alerts_raised", {}).get(name, 0))
        yield raised
