"""deploy/prometheus/alerts.yml: the alerting rules, for real.

- `promtool check rules` and `promtool test rules` (deploy/prometheus/alerts_test.yml) pass;
  every alert follows the conventions (one group, the Microseg prefix, severity, summary,
  description, a runbook_url whose anchor docs/runbook.md has) and has promtool tests that see
  it firing and not firing.
- Every metric the rules and the dashboard (deploy/grafana/microseg.json) read is served by a
  real agent (fleet mode, Kafka sink, API: every part that has metrics).
- A real Prometheus server scraping a real agent every second, with the rules (their `for:`
  shortened to 1 s), sees MicrosegPolicyApplyFailures fire after a policy the classifier cannot
  hold is refused, and MicrosegAgentDown once the agent is stopped; neither before.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from support import REPO
from support.agentapi import start_agent
from support.agentproc import AgentFactory
from support.prometheus import PrometheusServer, quick_rules
from support.promql import expr_names, full_agent_exposition, missing_names, sample_names

from bench.kafkabroker import KafkaBroker
from streamer.lab.lab import Lab

RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "microseg.json"
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/microseg/microseg/blob/main/docs/runbook.md"
SEVERITIES = {"critical", "warning", "info"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: run `make setup` (Debian's prometheus)"
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    rules: list[dict[str, Any]] = [r for g in doc["groups"] for r in g["rules"]]
    return rules


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to dashes."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*$", line)
        if m is not None:
            text = re.sub(r"[^\w\- ]", "", m[1].lower())
            out.add(text.replace(" ", "-"))
    return out


def dashboard_exprs(variables: bool = True) -> list[str]:
    """Every PromQL query of the dashboard's panels, and (`variables`) its template variables'
    queries (Grafana's `label_values(...)`, not PromQL)."""
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    if variables:
        for var in doc["templating"]["list"]:
            if var.get("type") == "query":
                q = var["query"]
                exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


# ---- promtool ----------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout, proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = _promtool("test", "rules", str(RULES_TEST))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout, proc.stdout


def test_the_rules_follow_the_conventions() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert [g["name"] for g in doc["groups"]] == ["microseg"]
    anchors = _anchors(RUNBOOK.read_text())
    names = [r["alert"] for r in _alerts()]
    assert len(names) == len(set(names)), names
    for rule in _alerts():
        name = rule["alert"]
        assert re.fullmatch(r"Microseg[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, rule
        ann = rule["annotations"]
        assert set(ann) == {"summary", "description", "runbook_url"}, rule
        assert "$labels" in ann["description"] or "$value" in ann["description"], rule
        assert ann["runbook_url"] == f"{RUNBOOK_URL}#{name.lower()}", rule
        assert name.lower() in anchors, f"docs/runbook.md has no section {name}"


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(RULES_TEST.read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    names = {r["alert"] for r in _alerts()}
    assert names - firing == set(), "never seen firing"
    assert names - quiet == set(), "never seen not firing"


# ---- the names, against a real agent -----------------------------------------------------


def test_every_metric_of_the_rules_and_the_dashboard_exists_on_a_real_agent(
    kafka_broker: KafkaBroker, agent_factory: AgentFactory, lab: Lab, tmp_path: Path
) -> None:
    exposed = sample_names(full_agent_exposition(kafka_broker, agent_factory, lab, tmp_path))
    used_by_rules = {n for r in _alerts() for n in expr_names(r["expr"])}
    used_by_dashboard = {n for e in dashboard_exprs() for n in expr_names(e)}
    # The reading is loose: make sure it reads something.
    assert {"up", "microseg_fleet_generation", "microseg_kafka_up"} <= used_by_rules
    assert "microseg_api_request_seconds_bucket" in used_by_dashboard
    assert missing_names(used_by_rules, exposed) == set()
    assert missing_names(used_by_dashboard, exposed) == set()


def test_expr_names_reads_promql_loosely() -> None:
    expr = (
        'sum by (stage) (rate(microseg_pipeline_events_total{result=~"dropped|x",'
        'stage!="microseg_not_a_metric"}[5m])) / on(instance) up{job="microseg"}'
        ' - histogram_quantile(0.99, microseg_api_request_seconds_bucket{instance=~"$instance"})'
    )
    assert expr_names(expr) == {
        "microseg_pipeline_events_total",
        "up",
        "microseg_api_request_seconds_bucket",
    }
    text = "# TYPE microseg_alert_active gauge\n# TYPE microseg_x counter\nmicroseg_x_total 1.0\n"
    assert sample_names(text) == {"microseg_alert_active", "microseg_x_total"}


# ---- a real Prometheus server -------------------------------------------------------------

# Four distinct IPv4 rule shapes: more than an agent started with --max-shapes 2 can hold.
TOO_MANY_SHAPES = {
    "default_action": "allow",
    "policies": [
        {"rule_id": 1, "protocol": "tcp", "dst_port": 80, "action": "allow"},
        {"rule_id": 2, "protocol": "any", "src_ip": "10.0.0.0/8", "action": "deny"},
        {
            "rule_id": 3,
            "protocol": "udp",
            "dst_ip": "10.1.0.0/16",
            "src_port": 53,
            "action": "deny",
        },
        {"rule_id": 4, "protocol": "any", "dst_ip": "10.2.0.1", "action": "deny"},
    ],
}


def test_a_real_prometheus_scraping_a_real_agent_fires_the_alerts(
    agent_factory: AgentFactory, lab: Lab, tmp_path: Path
) -> None:
    agent, api = start_agent(
        agent_factory, lab, tmp_path, [], default="allow", extra_args=["--max-shapes", "2"]
    )
    assert agent.api is not None
    rules = quick_rules(RULES, tmp_path / "alerts-quick.yml")
    with PrometheusServer([agent.api], rules) as prom:
        assert prom.rule_names() == {r["alert"] for r in _alerts()}
        prom.wait_targets_up()
        # A few evaluations with the agent up and nothing refused: neither alert.
        prom.wait_evaluations(3)
        assert prom.firing("MicrosegAgentDown") == []
        assert prom.firing("MicrosegPolicyApplyFailures") == []
        # Every dashboard query parses and evaluates here, as Grafana would send it.
        for expr in dashboard_exprs(variables=False):
            grafana = {"$instance": ".*", "$host": ".*", "$__rate_interval": "5s"}
            for var, value in grafana.items():
                expr = expr.replace(var, value)
            prom.query(expr)
        assert prom.query("microseg_packets_total")["result"], "the agent's series are not in"

        r = api.call("PUT", "/policies", TOO_MANY_SHAPES)
        assert r.status == 400 and "rule shapes" in r.body["message"], str(r)
        fired = prom.wait_firing("MicrosegPolicyApplyFailures")
        assert fired[0]["labels"]["instance"] == agent.api
        assert fired[0]["labels"]["severity"] == "warning"
        assert fired[0]["annotations"]["runbook_url"].endswith("#microsegpolicyapplyfailures")
        assert prom.firing("MicrosegAgentDown") == []

        assert agent.stop() == 0
        down = prom.wait_firing("MicrosegAgentDown")
        assert [a["labels"]["instance"] for a in down] == [agent.api]
        assert down[0]["labels"]["severity"] == "critical"
        assert agent.api in down[0]["annotations"]["description"]
