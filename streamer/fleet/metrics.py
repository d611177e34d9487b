"""The fleet's part of /metrics: which fleet generation this agent enforces and how long a
generation took from its publication to its enforcement here.

In: the agent's Follower (read at scrape time). Out: `microseg_fleet_generation`,
`microseg_fleet_connected`, `microseg_fleet_enforce_latency_seconds` (the last generation's)
and the summary `microseg_fleet_enforce_seconds` (count and sum over every generation applied
since start). The latency uses the writer's clock at publication and ours at enforcement:
clocks that disagree shift it by their difference.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from streamer.fleet.follower import Follower

__all__ = ["FleetCollector"]


class FleetCollector(Collector):
    def __init__(self, follower: Follower) -> None:
        self._follower = follower

    def collect(self) -> Iterator[Metric]:
        f = self._follower
        host = f.config.host
        g = GaugeMetricFamily(
            "microseg_fleet_generation", "Fleet policy generation enforced here", labels=["host"]
        )
        g.add_metric([host], f.generation)
        yield g
        c = GaugeMetricFamily(
            "microseg_fleet_connected", "1 while the fleet's brokers are reached", labels=["host"]
        )
        c.add_metric([host], 1.0 if f.connected else 0.0)
        yield c
        if f.last_latency_s is not None:
            last = GaugeMetricFamily(
                "microseg_fleet_enforce_latency_seconds",
                "Publication to enforcement here of the last fleet generation applied",
                labels=["host"],
            )
            last.add_metric([host], f.last_latency_s)
            yield last
        s = SummaryMetricFamily(
            "microseg_fleet_enforce_seconds",
            "Publication to enforcement here, over the fleet generations applied since start",
            labels=["host"],
        )
        s.add_metric([host], count_value=f.applies, sum_value=f.latency_sum_s)
        yield s
