"""The admin API (streamer/api/app.py) in-process over the session's classifier
(support/apiapp.py): stats counting what the kernel judged, sessions and their filters,
Prometheus metrics (two apps on one registry), the OpenAPI document covering every route, and
the reload route."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.apiapp import Api, Factory, P, assert_error, full, passes, rule
from support.bpf import kernel_retval

from streamer.api.app import make_app
from streamer.datapath.reference import Packet
from streamer.policy.model import PolicySet
from streamer.policy.store import StoreError

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
    assert after["closed_sessions"] == 0
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

    async def reload(actor: str) -> Any:
        actors.append(actor)
        if len(actors) > 1:
            raise StoreError("invalid policy file /etc/x.json: policies[0]: protocol: required")
        return await api.store.replace(file_set, actor)

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
