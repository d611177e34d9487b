"""The admin API (streamer/api/app.py) in-process over the session's classifier
(support/apiapp.py): stats counting what the kernel judged, sessions and their filters,
Prometheus metrics (two apps on one registry), the OpenAPI document covering every route, and
the reload route."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.apiapp import Api, Factory, P, assert_error, full, passes, rule
from support.bpf import kernel_retval, loaded_datapath, unique_instance

from streamer.api.app import make_app
from streamer.datapath.compiler import compile_policy
from streamer.datapath.config import DatapathConfig
from streamer.datapath.layout import RULE_CTR
from streamer.datapath.maps import array_key
from streamer.datapath.reference import Packet
from streamer.policy.model import PolicySet
from streamer.policy.store import StoreError, WriteOptions

# ---- stats --------------------------------------------------------------------------------


async def test_stats_count_what_the_kernel_judged(api: Api) -> None:
    dp = api.dp
    doc = {
        "default_action": "allow",
        "policies": [
            rule(70, name="logged-web", dst_ip="10.70.0.1", dst_port=80, action="log"),
            rule(71, name="no-ssh", dst_ip="10.70.0.1", dst_port=22, action="deny"),
        ],
    }
    assert (await api.call("PUT", f"{P}/policies", doc))[0] == 200
    _, before, _ = await api.call("GET", f"{P}/stats")
    for _ in range(3):
        assert passes(dp, "10.70.0.1", 80)
    for _ in range(2):
        assert not passes(dp, "10.70.0.1", 22)
    for _ in range(2):
        assert passes(dp, "10.70.0.2", 443)
    status, after, _ = await api.call("GET", f"{P}/stats")
    assert status == 200
    for key in [
        "total_packets",
        "allowed_packets",
        "denied_packets",
        "new_sessions",
        "closed_sessions",
        "active_sessions",
        "policy_hits",
        "policy_misses",
        "logged_packets",
        "parse_drops",
        "fragment_drops",
        "events_sent",
        "events_lost",
        "session_hits",
        "rejudged_sessions",
    ]:
        assert isinstance(after[key], int), key
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int)}
    assert delta["total_packets"] == 7
    assert delta["logged_packets"] == 3
    assert delta["allowed_packets"] == 5  # log is allow and report: included
    assert delta["denied_packets"] == 2
    assert delta["policy_hits"] == 5 and delta["policy_misses"] == 2
    assert delta["new_sessions"] == 7
    assert delta["closed_sessions"] == 0
    assert after["active_sessions"] == dp.session_count() >= 7
    assert after["session_table_capacity"] == dp.config.session_entries
    ingress_before, ingress_after = (
        before["by_direction"]["ingress"],
        after["by_direction"]["ingress"],
    )
    assert ingress_after["log"] - ingress_before["log"] == 3
    assert ingress_after["deny"] - ingress_before["deny"] == 2

    status, packets, _ = await api.call("GET", f"{P}/stats/packets")
    assert status == 200
    total = packets["total_packets"]
    assert packets["allow_rate"] == pytest.approx(
        packets["allowed_packets"] / total * 100, abs=1e-3
    )
    assert packets["deny_rate"] == pytest.approx(packets["denied_packets"] / total * 100, abs=1e-3)

    status, pol, _ = await api.call("GET", f"{P}/stats/policies")
    assert status == 200
    hits, misses = pol["policy_hits"], pol["policy_misses"]
    assert pol["hit_rate"] == pytest.approx(hits / (hits + misses) * 100, abs=1e-3)
    assert pol["rule_count"] == 2
    assert [(x["rule_id"], x["packets"], x["action"]) for x in pol["rules"]] == [
        (70, 3, "log"),
        (71, 2, "deny"),
    ]
    assert pol["rules"][0]["name"] == "logged-web" and pol["rules"][0]["last_hit"].endswith("Z")
    assert pol["default"]["packets"] >= 2
    status, pol, _ = await api.call("GET", f"{P}/stats/policies?limit=1")
    assert [x["rule_id"] for x in pol["rules"]] == [70]
    for bad in ("-1", "x", "1000001"):
        status, body, _ = await api.call("GET", f"{P}/stats/policies?limit={bad}")
        assert_error(status, body, 400, "invalid", "limit")


async def test_extra_stats_are_merged(make_api: Factory) -> None:
    api = await make_api()
    _, before, _ = await api.call("GET", f"{P}/stats")
    api.ctx.extra_stats = lambda: {"events_lost": 5, "kafka_queue": 3, "sink": "kafka"}
    _, after, _ = await api.call("GET", f"{P}/stats")
    assert after["kafka_queue"] == 3 and after["sink"] == "kafka"
    assert after["events_lost"] >= before["events_lost"] + 5


# ---- sessions -------------------------------------------------------------------------------


async def test_sessions_and_filters(api: Api) -> None:
    dp = api.dp
    doc = {
        "default_action": "allow",
        "policies": [rule(80, dst_ip="10.80.0.2", dst_port=22, action="deny")],
    }
    assert (await api.call("PUT", f"{P}/policies", doc))[0] == 200
    dp.clear_sessions()
    flows = [
        Packet.of("10.80.0.1", "10.80.0.2", "tcp", 1111, 80),
        Packet.of("10.80.0.3", "10.80.0.4", "udp", 2222, 53),
        Packet.of("10.80.0.1", "10.80.0.2", "tcp", 3333, 22),
        Packet.of("fd00::1", "fd00::2", "icmpv6", 7, 7),
    ]
    for pkt in flows:
        kernel_retval(dp, pkt)
    status, body, _ = await api.call("GET", f"{P}/sessions")
    assert status == 200, body
    assert body["count"] == 4 and body["truncated"] is False
    by_port = {s["src_port"]: s for s in body["sessions"]}
    web_flow = by_port[1111]
    assert web_flow["src_ip"] == "10.80.0.1" and web_flow["dst_ip"] == "10.80.0.2"
    assert web_flow["dst_port"] == 80 and web_flow["protocol"] == "tcp"
    assert web_flow["verdict"] == "allow" and web_flow["rule_id"] is None
    assert web_flow["direction"] == "ingress" and web_flow["family"] == 4
    assert web_flow["policy_generation"] == api.store.generation
    assert web_flow["packets_out"] == 1 and web_flow["tcp_flags"] is not None
    assert web_flow["first_seen"].endswith("Z")
    assert by_port[3333]["verdict"] == "deny" and by_port[3333]["rule_id"] == 80
    assert by_port[2222]["tcp_flags"] is None

    async def ports(query: str) -> set[int]:
        status, body, _ = await api.call("GET", f"{P}/sessions?{query}")
        assert status == 200, body
        return {s["src_port"] for s in body["sessions"]}

    assert await ports("ip=10.80.0.2") == {1111, 3333}
    assert await ports("ip=10.80.0.4") == {2222}
    assert await ports("src_ip=10.80.0.0/16") == {1111, 2222, 3333}
    assert await ports("dst_ip=10.80.0.1") == set()
    assert await ports("ip=fd00::2") == {7}
    assert await ports("port=53") == {2222}
    assert await ports("dst_port=22") == {3333}
    assert await ports("src_port=22") == set()
    assert await ports("protocol=udp") == {2222}
    assert await ports("protocol=TCP") == {1111, 3333}
    assert await ports("protocol=any") == {1111, 2222, 3333, 7}
    assert await ports("verdict=deny") == {3333}
    assert await ports("ip=10.80.0.1&port=80&protocol=tcp&verdict=allow") == {1111}
    status, body, _ = await api.call("GET", f"{P}/sessions?limit=2")
    assert body["count"] == 2 and body["truncated"] is True
    status, body, _ = await api.call("GET", f"{P}/sessions?limit=4")
    assert body["count"] == 4 and body["truncated"] is False
    for query, word in [
        ("ip=nope", "ip"),
        ("src_ip=10.0.0.1/33", "src_ip"),
        ("port=65536", "port"),
        ("port=-1", "port"),
        ("protocol=sctp", "protocol"),
        ("verdict=maybe", "verdict"),
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=ten", "limit"),
    ]:
        status, body, _ = await api.call("GET", f"{P}/sessions?{query}")
        assert_error(status, body, 400, "invalid", word)


# ---- metrics, openapi -------------------------------------------------------------------


async def test_metrics(api: Api) -> None:
    assert (await api.call("POST", f"{P}/policies", rule(90)))[0] == 201
    assert (await api.call("GET", f"{P}/policies/90"))[0] == 200
    assert (await api.call("GET", f"{P}/policies/91"))[0] == 404
    assert (await api.call("GET", f"{P}/whatever/123"))[0] == 404
    status, text, headers = await api.call("GET", "/metrics", auth=False)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    for name in (
        "microseg_packets_total",
        "microseg_parse_drops_total",
        "microseg_fragment_drops_total",
        "microseg_sessions_active",
        "microseg_sessions_created_total",
        "microseg_session_table_capacity",
        'microseg_map_fill_ratio{map="sessions"}',
        "microseg_policy_rules",
        "microseg_policy_generation",
        'microseg_events_total{result="sent"}',
        'microseg_events_total{result="lost"}',
        "microseg_api_requests_total",
        "microseg_api_request_seconds_bucket",
    ):
        assert name in text, name
    samples = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    for verdict in ("allow", "deny", "log"):
        for direction in ("ingress", "egress"):
            assert value("microseg_packets_total", verdict=verdict, direction=direction) is not None
    assert value("microseg_policy_rules") == 1
    assert value("microseg_policy_generation") == api.store.generation
    assert value("microseg_session_table_capacity") == api.dp.config.session_entries
    requests = "microseg_api_requests_total"
    rule_route = "/api/v1/policies/{rule_id}"
    assert value(requests, route=rule_route, method="GET", status="200") == 1
    assert value(requests, route=rule_route, method="GET", status="404") == 1
    assert value(requests, route="unmatched", method="GET", status="404") == 1
    assert value(requests, route="/api/v1/policies", method="POST", status="201") == 1
    assert "/policies/90" not in text and "whatever" not in text


async def test_two_apps_on_one_registry(api: Api) -> None:
    # The lead may rebuild the app on the same registry: no duplicate-metric error.
    make_app(api.ctx)
    status, text, _ = await api.call("GET", "/metrics", auth=False)
    assert status == 200 and text.count("# TYPE microseg_policy_rules gauge") == 1


async def test_openapi_document_covers_every_route(api: Api) -> None:
    status, doc, _ = await api.call("GET", f"{P}/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1") and doc["info"]["version"] == "9.9.9"
    documented = {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }
    served = {
        (route.method, route.resource.canonical)
        for route in api.client.app.router.routes()
        if route.resource is not None
    }
    assert documented == served
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert "421" in op["responses"] and "500" in op["responses"], (method, path)
            public = path in (f"{P}/health", "/metrics")
            assert ("401" in op["responses"]) != public, (method, path)
    post = doc["paths"][f"{P}/policies"]["post"]
    assert {"201", "400", "403", "409", "413", "415", "503"} <= set(post["responses"])
    rule_schema = doc["components"]["schemas"]["Rule"]
    assert rule_schema["additionalProperties"] is False
    assert set(rule_schema["required"]) == {"rule_id", "protocol", "action"}


async def test_reload_route(api: Api) -> None:
    status, body, _ = await api.call("POST", f"{P}/policies/reload")
    assert_error(status, body, 404, "not_found", "no policy file")
    actors: list[str] = []
    file_set = PolicySet.model_validate({"default_action": "deny", "policies": [rule(99)]})

    async def reload(actor: str, opts: WriteOptions) -> Any:
        actors.append(actor)
        if len(actors) > 1:
            raise StoreError("invalid policy file /etc/x.json: policies[0]: protocol: required")
        return await api.store.replace(file_set, actor, opts=opts)

    api.ctx.reload = reload
    status, body, headers = await api.call("POST", f"{P}/policies/reload")
    assert status == 200, body
    assert body["added"] == [full(99)] and body["default_action_changed"] is True
    assert int(headers["X-Policy-Generation"]) == api.store.generation == api.dp.active()[0]
    assert actors == ["token"]
    gen = api.store.generation
    status, body, _ = await api.call("POST", f"{P}/policies/reload")
    assert_error(status, body, 400, "invalid", "/etc/x.json", "protocol")
    assert api.store.generation == gen
    status, body, _ = await api.call("POST", f"{P}/policies/reload?dry_run=1")
    assert_error(status, body, 400, "invalid", "dry_run")
    status, body, _ = await api.call(
        "POST", f"{P}/policies/reload", headers={"Origin": "http://evil.example"}
    )
    assert_error(status, body, 403, "forbidden")
    status, body, _ = await api.call("POST", f"{P}/policies/reload", auth=False)
    assert status == 401
    status, body, _ = await api.call("GET", f"{P}/policies/reload")
    assert_error(status, body, 400, "invalid", "rule_id")
    assert len(actors) == 2


# ---- staged counters and failsafe (contract §6) ----------------------------------------------


def _set_rule_counters(dp: Any, slot: int, values: tuple[int, ...]) -> bytes:
    """Write one per-rule counter slot (CPU 0 holds `values`: RULE_CTR's fields in order, the
    other CPUs zero); returns what it held, to put back."""
    old = b"".join(dp._maps.percpu("rule_stats", slot))
    ncpu = len(dp._maps.percpu("rule_stats", slot))
    raw = RULE_CTR.pack(*values) + bytes(RULE_CTR.size * (ncpu - 1))
    dp._maps.update_batch("rule_stats", [array_key(slot)], [raw])
    return old


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_staged_counters_are_read_beside_the_hit_counters(api: Api) -> None:
    """GET /policies/{id}, /stats/policies and /metrics read the per-rule staged counters the
    classifier keeps (written here into the rule's counter slot, as the kernel would), and
    /stats the failsafe and staged totals. /metrics has a staged rule's series from the start,
    another rule's only once it counted, the staged default's (rule_id "default") likewise."""
    doc = {
        "default_action": "allow",
        "policies": [
            rule(80, name="trial", dst_ip="10.80.0.1", action="deny", mode="staged"),
            rule(81, name="kept", dst_ip="10.80.0.2"),
            rule(82, name="quiet", dst_ip="10.80.0.3", action="deny", mode="staged"),
        ],
    }
    assert (await api.call("PUT", f"{P}/policies", doc))[0] == 200
    slot = api.dp._banks.slots[80]
    _set_rule_counters(api.dp, slot, (0, 0, 0, 5, 600, 2))
    old_default = _set_rule_counters(api.dp, 0, (0, 0, 0, 3, 180, 1))
    try:
        status, body, _ = await api.call("GET", f"{P}/policies/80")
        assert status == 200 and body["mode"] == "staged"
        assert (body["staged_packets"], body["staged_bytes"], body["staged_flows"]) == (5, 600, 2)
        assert (body["packets"], body["bytes"], body["last_hit"]) == (0, 0, None)
        status, body, _ = await api.call("GET", f"{P}/policies/81")
        assert "mode" not in body and body["staged_packets"] == body["staged_flows"] == 0

        status, pol, _ = await api.call("GET", f"{P}/stats/policies")
        assert status == 200
        by_id = {r["rule_id"]: r for r in pol["rules"]}
        assert by_id[80]["mode"] == "staged" and "mode" not in by_id[81]
        staged = ("staged_packets", "staged_bytes", "staged_flows")
        assert tuple(by_id[80][k] for k in staged) == (5, 600, 2)
        assert tuple(by_id[81][k] for k in staged) == (0, 0, 0)
        assert tuple(pol["default"][k] for k in staged) == (3, 180, 1)

        status, stats, _ = await api.call("GET", f"{P}/stats")
        for key in ("failsafe_passed", "failsafe_flows", "staged_flows"):
            assert isinstance(stats[key], int), key

        status, text, _ = await api.call("GET", "/metrics", auth=False)
        assert status == 200
        samples = _samples(text)

        def value(metric: str, **labels: str) -> float | None:
            return samples.get((metric, frozenset(labels.items())))

        for field, n in (("packets", 5), ("bytes", 600), ("flows", 2)):
            metric = f"microseg_rule_staged_{field}_total"
            assert value(metric, rule_id="80", name="trial") == n
            assert value(metric, rule_id="82", name="quiet") == 0
            assert value(metric, rule_id="81", name="kept") is None
        assert value("microseg_rule_staged_packets_total", rule_id="default", name="") == 3
        assert value("microseg_failsafe_passed_packets_total") == stats["failsafe_passed"]
        assert value("microseg_failsafe_flows_total") == stats["failsafe_flows"]
        assert value("microseg_staged_flows_total") == stats["staged_flows"]
    finally:
        api.dp._maps.update_batch("rule_stats", [array_key(0)], [old_default])


async def test_a_staged_rule_counts_what_it_would_have_decided(api: Api) -> None:
    """Needs the classifier's staged view (engineer A). A staged deny rule decides nothing:
    its flows pass by the default action, and its staged counters count them (new flows:
    staged_flows; their packets and bytes), as do /stats staged_flows and /metrics; an
    enforced rule's flows count nothing staged."""
    doc = {
        "default_action": "allow",
        "policies": [
            rule(
                83,
                name="would-deny",
                dst_ip="10.83.0.1",
                dst_port=8083,
                action="deny",
                mode="staged",
            ),
            rule(84, name="enforced", dst_ip="10.83.0.2", dst_port=8084, action="log"),
        ],
    }
    assert (await api.call("PUT", f"{P}/policies", doc))[0] == 200
    _, before, _ = await api.call("GET", f"{P}/stats")
    for _ in range(3):
        assert passes(api.dp, "10.83.0.1", 8083)
    assert passes(api.dp, "10.83.0.2", 8084)
    _, after, _ = await api.call("GET", f"{P}/stats")
    assert after["staged_flows"] - before["staged_flows"] == 3
    status, body, _ = await api.call("GET", f"{P}/policies/83")
    assert status == 200 and body["mode"] == "staged"
    assert (body["packets"], body["staged_packets"], body["staged_flows"]) == (0, 3, 3)
    assert body["staged_bytes"] > 3 * 40
    _, body, _ = await api.call("GET", f"{P}/policies/84")
    assert (body["packets"], body["staged_packets"], body["staged_flows"]) == (1, 0, 0)
    _, text, _ = await api.call("GET", "/metrics", auth=False)
    samples = _samples(text)
    key = frozenset({("rule_id", "83"), ("name", "would-deny")})
    assert samples[("microseg_rule_staged_flows_total", key)] == 3


async def test_failsafe_traffic_is_counted(make_api: Factory) -> None:
    """Needs the classifier's failsafe (engineer A) and DatapathConfig.failsafe (the lead).
    With a failsafe entry tcp:2222:in and a default-deny set, a new flow to tcp 2222 passes
    and is counted in /stats (failsafe_passed: its packets, failsafe_flows) and /metrics;
    another port is denied and not counted."""
    from streamer.policy.failsafe import parse_failsafe

    cfg = DatapathConfig(instance=unique_instance("fs"), failsafe=parse_failsafe("tcp:2222:in"))
    with loaded_datapath(cfg) as fdp:
        fdp.apply(compile_policy(PolicySet(default_action="deny"), fdp.config.max_shapes), None)
        api = await make_api(datapath=fdp)
        _, before, _ = await api.call("GET", f"{P}/stats")
        assert passes(fdp, "10.84.0.1", 2222)
        assert not passes(fdp, "10.84.0.1", 2223)
        _, after, _ = await api.call("GET", f"{P}/stats")
        assert after["failsafe_passed"] - before["failsafe_passed"] == 1
        assert after["failsafe_flows"] - before["failsafe_flows"] == 1
        _, text, _ = await api.call("GET", "/metrics", auth=False)
        samples = _samples(text)
        assert (
            samples[("microseg_failsafe_passed_packets_total", frozenset())]
            == (after["failsafe_passed"])
        )
