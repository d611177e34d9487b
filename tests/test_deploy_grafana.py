"""deploy/grafana/microseg.json: a Grafana dashboard that imports as it is.

Its structure (schema version, the datasource and agent/host template variables, panels with
unique ids and a place on the grid, every target a PromQL `expr` on the `${datasource}`
variable) and the panels the README promises. That every metric it reads exists on a real
agent is tests/test_deploy_prometheus.py's (one real agent for the rules and the dashboard),
and that every query parses is checked there against the real Prometheus server.
"""

from __future__ import annotations

import json
from typing import Any

from support import REPO
from support.promql import expr_names

DASHBOARD = REPO / "deploy" / "grafana" / "microseg.json"
DS_REF = {"type": "prometheus", "uid": "${datasource}"}

# What the dashboard shows (README "Alerts and dashboard"): a title, and a metric it must read.
PROMISED = {
    "Packets by verdict and direction": "microseg_packets_total",
    "Drops by reason": "microseg_drops_total",
    "Sessions": "microseg_sessions_active",
    "Map fill": "microseg_map_fill_ratio",
    "Events and losses per stage": "microseg_pipeline_events_total",
    "Kafka up": "microseg_kafka_up",
    "Kafka spool": "microseg_kafka_spool_bytes",
    "API latency": "microseg_api_request_seconds_bucket",
    "Policy generation per host": "microseg_fleet_generation",
    "Fleet enforce latency": "microseg_fleet_enforce_latency_seconds",
}


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def test_the_dashboard_has_its_variables() -> None:
    doc = _dashboard()
    assert 36 <= doc["schemaVersion"] <= 41
    assert doc["uid"] and doc["title"] and doc["id"] is None
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name, metric in (
        ("instance", "microseg_packets_total"),
        ("host", "microseg_fleet_generation"),
    ):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"] == DS_REF, var
        assert var["query"]["query"] == f"label_values({metric}, {name})", var
        assert var["includeAll"] and var["multi"], var


def test_every_panel_queries_prometheus_through_the_variable() -> None:
    panels = _dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    for p in panels:
        assert p["type"] in {"timeseries", "stat"}, p["title"]
        assert p["datasource"] == DS_REF, p["title"]
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        assert p["targets"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS_REF, p["title"]
            assert t["expr"].strip() and expr_names(t["expr"]), (p["title"], t["expr"])
            assert '$instance"' in t["expr"], (p["title"], t["expr"])


def test_no_two_panels_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in _dashboard()["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]


def test_the_promised_panels_are_there() -> None:
    by_title = {p["title"]: p for p in _dashboard()["panels"]}
    for title, metric in PROMISED.items():
        assert title in by_title, title
        names = {n for t in by_title[title]["targets"] for n in expr_names(t["expr"])}
        assert metric in names, (title, names)
