"""The metric names deploy/ uses, and the ones a real agent serves, for tests/test_deploy_*.

Import as `from support.promql import ...`. `expr_names(expr)` reads PromQL loosely: every
identifier starting `microseg_`, and `up`, outside string literals (label values) — enough for
our own rules and panels, not a PromQL parser. `sample_names(text)` are the sample names of a
Prometheus text exposition (`_total`, `_bucket`, `_sum`, `_count` as served).
`full_agent_exposition()` starts an agent with every part that has metrics (the API, the Kafka
sink, the fleet follower after one applied generation, the pressure watch after a reading) and
returns its /metrics text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.kafkabroker import KafkaBroker
from streamer.lab.lab import Lab
from support.agentapi import api_of
from support.agentproc import AgentFactory, free_port
from support.fleet import Fleet
from support.netutil import wait_until

__all__ = ["expr_names", "full_agent_exposition", "missing_names", "sample_names"]

# Prometheus's own series (a scrape's `up`), not the agent's.
SYNTHETIC = frozenset({"up"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)")


def expr_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana target's, `$var` left alone)."""
    bare = _STRING.sub('""', expr)
    return {
        name for name in _IDENT.findall(bare) if name.startswith("microseg_") or name in SYNTHETIC
    }


# The sample names a family of each type serves (a family may have no sample right now:
# `microseg_alert_active` has one only while an alert fires).
_SUFFIXES = {
    "gauge": ("",),
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def sample_names(exposition: str) -> set[str]:
    """Names of the samples in a Prometheus text exposition, also those a declared family
    (`# TYPE`) would serve when it has none at the moment."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names.update(family + suffix for suffix in _SUFFIXES.get(kind.strip(), ("",)))
            continue
        if not line or line.startswith("#"):
            continue
        m = re.match(r"[a-zA-Z_:][\w:]*", line)
        if m is not None:
            names.add(m.group(0))
    return names


def missing_names(used: Iterable[str], exposed: set[str]) -> set[str]:
    """The names of `used` that neither the agent serves nor Prometheus makes itself."""
    return {n for n in used if n not in exposed and n not in SYNTHETIC}


def full_agent_exposition(
    broker: KafkaBroker, agent_factory: AgentFactory, lab: Lab, tmp_path: Path
) -> str:
    """/metrics of a real fleet agent (flow events to Kafka, the API on loopback) once every
    family it can serve is there: one fleet generation applied (its enforce latency), an API
    request answered (the latency histogram), a pressure reading taken."""
    fleet = Fleet(broker, agent_factory, tmp_path)
    gen = fleet.apply(
        {
            "default_action": "allow",
            "policies": [{"rule_id": 1, "protocol": "tcp", "dst_port": 9, "action": "deny"}],
        }
    )
    agent = fleet.agent(
        lab,
        "prom-1",
        {"role": "test"},
        api=f"127.0.0.1:{free_port()}",
        extra=["--pressure-interval", "0.2"],
    )
    agent.start()
    agent.wait_api()
    fleet.wait_converged(["prom-1"], gen)
    api = api_of(agent)
    wanted = (
        "microseg_fleet_enforce_latency_seconds",
        "microseg_kafka_up",
        "microseg_rate_per_second",
        "microseg_api_request_seconds_bucket",
    )
    seen: dict[str, Any] = {}

    def complete() -> bool:
        api.ok("GET", "/status")
        r = api.get("/metrics")
        assert r.status == 200, str(r)
        seen["text"] = r.raw.decode()
        return all(w in sample_names(seen["text"]) for w in wanted)

    assert wait_until(complete, timeout=30, interval=0.3), (
        f"the agent's /metrics never had all of {wanted}:\n{seen.get('text')}"
    )
    text: str = seen["text"]
    return text
