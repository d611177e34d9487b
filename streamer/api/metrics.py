"""Counters for people and for Prometheus: one reading of the datapath, two renderings.

In: the datapath (duck-typed: `counters()`, `map_fill()`, `all_rule_counters()`,
`default_counters()`, `config.session_entries`), the policy store and optional extra counters
(the event pipeline's). Out: `read_stats()`, the dict behind `/api/v1/stats`, and
`MicrosegCollector`, a prometheus-client collector that reads the same numbers at scrape time;
`ApiMetrics` counts API requests. Everything is registered on an injected `CollectorRegistry`,
never the process-global one.

`allowed_packets` counts every packet passed by a verdict, `log` included (`log` = allow and
report); `logged_packets` is the `log` part of it. `total_packets` also counts packets no verdict
was taken for (parse drops, ARP and neighbour discovery), so allowed + denied <= total.
`failsafe_passed` counts the packets of flows the failsafe list passed before any rule, and
`staged_flows` the flows whose staged verdict differs from the enforced one (contract §6); per
rule, `microseg_rule_staged_{packets,bytes,flows}_total{rule_id,name}` say what it would have
decided there.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from streamer.datapath.tables import drops_by_reason
from streamer.policy.store import PolicyStore
from streamer.vocabulary import PACKET_DIRECTIONS, VERDICTS

__all__ = [
    "ApiMetrics",
    "MicrosegCollector",
    "api_metrics",
    "read_stats",
    "register_collector",
    "register_datapath_metrics",
]

DIRECTIONS = PACKET_DIRECTIONS

# Kernel counters reported under the same name in /stats.
_PLAIN = (
    "total_packets",
    "denied_packets",
    "logged_packets",
    "new_sessions",
    "session_hits",
    "policy_hits",
    "policy_misses",
    "parse_drops",
    "fragment_drops",
    "l2_passed",
    "events_sent",
    "events_lost",
    "session_create_failed",
    "total_bytes",
    "failsafe_passed",
    "failsafe_flows",
    "staged_flows",
)


# Session gauges the classifier keeps exact, reported under the same names.
SESSION_GAUGES = (
    "active_sessions",
    "closed_sessions",
    "half_open_sessions",
    "expired_sessions",
    "related_passed",
)


def read_stats(datapath: Any, extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The `/api/v1/stats` object: kernel counters renamed for people, plus `extra()`.

    Extra counters are added; one named like a kernel counter is added to it when both are
    numbers (so the pipeline reports its own `events_lost` and the total covers both), else
    it replaces it.
    """
    c: dict[str, int] = datapath.counters()
    out: dict[str, Any] = {name: int(c.get(name, 0)) for name in _PLAIN}
    # log = allow and report: a logged packet was allowed.
    out["allowed_packets"] = int(c.get("allowed_packets", 0)) + out["logged_packets"]
    # The classifier keeps these exact (inserts minus removals): no walk of the table.
    for name in SESSION_GAUGES:
        out[name] = int(c.get(name, 0))
    out["drops"] = drops_by_reason(c)
    out["rejudged_sessions"] = int(c.get("rejudged_sessions", 0))
    out["session_table_capacity"] = int(datapath.config.session_entries)
    out["by_direction"] = {
        d: {v: int(c.get(f"{d}_{v}_packets", 0)) for v in VERDICTS} for d in DIRECTIONS
    }
    if extra is not None:
        for key, value in extra().items():
            old = out.get(key)
            if isinstance(old, int) and isinstance(value, int) and not isinstance(value, bool):
                out[key] = old + value
            else:
                out[key] = value
    return out


class MicrosegCollector(Collector):
    """Reads the datapath and the store at scrape time into `microseg_*` metrics."""

    def __init__(
        self,
        datapath: Any,
        store: PolicyStore,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._datapath = datapath
        self._store = store
        self._extra = extra

    def describe(self) -> list[Metric]:
        # Registering must not read the datapath: the names are fixed, nothing to check.
        return []

    def collect(self) -> Iterator[Metric]:
        s = read_stats(self._datapath, self._extra)
        packets = CounterMetricFamily(
            "microseg_packets",
            "Packets judged, by verdict and by direction across the attached interface",
            labels=["verdict", "direction"],
        )
        for d in DIRECTIONS:
            for v in VERDICTS:
                packets.add_metric([v, d], s["by_direction"][d][v])
        yield packets
        yield CounterMetricFamily(
            "microseg_parse_drops", "Packets dropped as malformed", value=s["parse_drops"]
        )
        yield CounterMetricFamily(
            "microseg_fragment_drops",
            "IP fragments dropped (no first seen, overlapping its L4 header, tiny)",
            value=s["fragment_drops"],
        )
        yield GaugeMetricFamily(
            "microseg_sessions_active", "Entries in the session table", value=s["active_sessions"]
        )
        yield CounterMetricFamily(
            "microseg_sessions_created", "Sessions created", value=s["new_sessions"]
        )
        capacity = s["session_table_capacity"]
        yield GaugeMetricFamily(
            "microseg_session_table_capacity", "Size of the session table", value=capacity
        )
        yield from self._maps()
        drops = CounterMetricFamily(
            "microseg_drops", "Packets dropped, by reason", labels=["reason"]
        )
        for reason, n in s["drops"].items():
            drops.add_metric([reason], n)
        yield drops
        if "half_open_sessions" in s:
            yield GaugeMetricFamily(
                "microseg_sessions_half_open",
                "TCP sessions in SYN_SENT or SYN_RECV",
                value=s["half_open_sessions"],
            )
            ended = CounterMetricFamily(
                "microseg_sessions_ended",
                "Sessions removed, by why: closed (TCP finished) or expired (idle)",
                labels=["reason"],
            )
            ended.add_metric(["closed"], s["closed_sessions"])
            ended.add_metric(["expired"], s["expired_sessions"])
            yield ended
        decisions = CounterMetricFamily(
            "microseg_policy_decisions",
            "Flows judged, by whether a rule or the default action decided",
            labels=["result"],
        )
        decisions.add_metric(["rule"], s["policy_hits"])
        decisions.add_metric(["default"], s["policy_misses"])
        yield decisions
        policy, generation = self._store.policy, self._store.generation
        yield GaugeMetricFamily(
            "microseg_policy_rules", "Rules in the applied policy set", value=len(policy.policies)
        )
        yield GaugeMetricFamily(
            "microseg_policy_generation", "Generation of the applied policy set", value=generation
        )
        yield CounterMetricFamily(
            "microseg_policy_apply_failures",
            "Policy changes the kernel, the classifier's compiler or the disk refused (nothing "
            "changed); requests refused as invalid are not counted",
            value=self._store.apply_failures,
        )
        events = CounterMetricFamily(
            "microseg_events", "Flow events, sent or lost anywhere", labels=["result"]
        )
        events.add_metric(["sent"], s["events_sent"])
        events.add_metric(["lost"], s["events_lost"])
        yield events
        yield CounterMetricFamily(
            "microseg_failsafe_passed_packets",
            "Packets of failsafe flows, passed before any rule",
            value=s["failsafe_passed"],
        )
        yield CounterMetricFamily(
            "microseg_failsafe_flows", "Flows the failsafe list passed", value=s["failsafe_flows"]
        )
        yield CounterMetricFamily(
            "microseg_staged_flows",
            "Flows whose staged verdict differs from the enforced one",
            value=s["staged_flows"],
        )
        yield from self._staged(policy)

    def _staged(self, policy: Any) -> Iterator[Metric]:
        """Per rule, what it would have decided where the staged view differs: every staged
        rule (zeros too, so a dashboard sees it from the start), any other rule that has such
        counts (under --policy-mode staged every rule is judged staged), and the default action
        (rule_id "default") once it has."""
        per_rule = self._datapath.all_rule_counters()
        default = self._datapath.default_counters()
        families = {
            field: CounterMetricFamily(
                f"microseg_rule_staged_{field}",
                f"{what} of the flows a rule would have decided where the staged view differs "
                "from the enforced one (rule_id default: the staged default action)",
                labels=["rule_id", "name"],
            )
            for field, what in (("packets", "Packets"), ("bytes", "Bytes"), ("flows", "Number"))
        }
        rows: list[tuple[str, str, Any]] = []
        for r in policy.policies:
            c = per_rule.get(r.rule_id)
            if c is None:
                continue
            if r.staged or c.staged_packets or c.staged_flows:
                rows.append((str(r.rule_id), r.name, c))
        if default.staged_packets or default.staged_flows:
            rows.append(("default", "", default))
        for rule_id, name, c in rows:
            families["packets"].add_metric([rule_id, name], c.staged_packets)
            families["bytes"].add_metric([rule_id, name], c.staged_bytes)
            families["flows"].add_metric([rule_id, name], c.staged_flows)
        yield from families.values()

    def _maps(self) -> Iterator[Metric]:
        """Fill, entries, capacity and evictions of every map (`Datapath.map_fill()`)."""
        fill = GaugeMetricFamily(
            "microseg_map_fill_ratio", "Used fraction of a kernel map (0..1)", labels=["map"]
        )
        maps = self._datapath.map_fill()
        entries = GaugeMetricFamily(
            "microseg_map_entries", "Entries in a kernel map", labels=["map"]
        )
        evictions = CounterMetricFamily(
            "microseg_map_evictions", "Entries a kernel map dropped to make room", labels=["map"]
        )
        cap = GaugeMetricFamily("microseg_map_capacity", "Capacity of a kernel map", labels=["map"])
        for name, f in sorted(maps.items()):
            fill.add_metric([name], f.ratio)
            entries.add_metric([name], f.entries)
            cap.add_metric([name], f.capacity)
            evictions.add_metric([name], f.evictions)
        yield from (fill, entries, cap, evictions)


class ApiMetrics:
    """`microseg_api_requests_total{route,method,status}` and `microseg_api_request_seconds`.

    `route` is a route's canonical path (`/api/v1/policies/{rule_id}`) or "unmatched", so the
    number of series stays bounded whatever URLs clients send.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "microseg_api_requests",
            "API requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "microseg_api_request_seconds",
            "Time to answer an API request",
            ["route", "method"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.seconds.labels(route, method).observe(seconds)


# One set of request metrics per registry: a second app on the same registry shares it
# (registering the names twice would fail).
_API_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ApiMetrics] = weakref.WeakKeyDictionary()
_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, MicrosegCollector] = (
    weakref.WeakKeyDictionary()
)
_REG_LOCK = threading.Lock()


def api_metrics(registry: CollectorRegistry) -> ApiMetrics:
    """The request metrics registered on `registry` (created on first use)."""
    with _REG_LOCK:
        metrics = _API_METRICS.get(registry)
        if metrics is None:
            metrics = _API_METRICS[registry] = ApiMetrics(registry)
        return metrics


def register_collector(registry: CollectorRegistry, collector: MicrosegCollector) -> None:
    """Register `collector` on `registry`, replacing one registered here before."""
    with _REG_LOCK:
        old = _COLLECTORS.get(registry)
        if old is not None:
            registry.unregister(old)
        registry.register(collector)
        _COLLECTORS[registry] = collector


def register_datapath_metrics(
    registry: CollectorRegistry,
    datapath: Any,
    store: PolicyStore,
    extra: Callable[[], dict[str, Any]] | None = None,
) -> MicrosegCollector:
    """Register the `microseg_*` datapath and policy metrics on `registry` (before or without
    the API; `make_app` later replaces this collector with one sharing the API's caches)."""
    collector = MicrosegCollector(datapath, store, extra)
    register_collector(registry, collector)
    return collector
