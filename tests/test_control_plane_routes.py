"""The control plane end to end, the API: every route and error code, over TCP and the Unix socket,
against a real agent. A real agent process on the module's lab (each test starts its own: own
pin instance, state dir and API port), its admin API on a real socket, and real traffic from the
peer namespace to echo servers in the host namespace over IPv4 and IPv6 at once
(support/netutil.py). A probe that must fail waits out NEG_TIMEOUT; "enforced when the response
arrives" means the probe runs right after the response, with no retry or wait."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from support.agentapi import P1, P2, PREFIX, Api, assert_error, ids_of, start_agent
from support.agentproc import AgentFactory, rule
from support.netutil import POS_TIMEOUT, TcpConn, echo_server, expect_ports, reach

from streamer.lab.lab import Lab

# ---- 2. every route and error code, over TCP and the Unix socket -----------------------------

GUARDED_READS = (
    "/status",
    "/policies",
    "/policies/1",
    "/stats",
    "/stats/packets",
    "/stats/policies",
    "/sessions",
    "/openapi.json",
)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_routes_and_errors(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path, transport: str
) -> None:
    lab = module_lab
    sock = tmp_path / "api.sock"
    base = [
        rule(1, "tcp", "allow", dst_port=P1, direction="ingress"),
        rule(2, "udp", "allow", dst_port=53),
    ]
    with echo_server(lab.host_ns, (P1, P2)):
        agent, tcp_api = start_agent(agent_factory, lab, tmp_path, base, unix=sock)
        token = agent.token()
        assert token and stat.S_IMODE((agent.state_dir / "api-token").stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.stat().st_mode) == 0o660
        unix = transport == "unix"
        api = Api(unix=sock, token=token) if unix else tcp_api
        assert reach(lab, [P1], POS_TIMEOUT) == {("v4", P1): True, ("v6", P1): True}
        start_gen = api.policies()["generation"]

        # Public: health and metrics, no token.
        r = api.get("/health", token=None)
        assert r.status == 200 and r.body["status"] == "ok", str(r)
        r = api.get("/metrics", token=None)
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain"), str(r)
        text = r.raw.decode()
        for name in (
            "microseg_packets_total",
            "microseg_policy_generation",
            "microseg_policy_rules",
            "microseg_api_requests_total",
        ):
            assert name in text, f"{name} missing from /metrics"

        # Everything else needs the token on TCP; on the socket its mode (0660) decides.
        for path in GUARDED_READS:
            r = api.get(path, token=None)
            if unix:
                assert r.status == 200, f"{path} over the socket: {r}"
            else:
                assert_error(r, 401, "unauthorized", "token")
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert_error(api.get(path, token="wrong-token"), 401, "unauthorized", "token")
        for method, path, body in (
            ("POST", "/policies", rule(9, "tcp", "deny", dst_port=P1)),
            ("PUT", "/policies", {"policies": []}),
            ("PUT", "/policies/1", {**base[0], "action": "deny"}),
            ("DELETE", "/policies/1", None),
            ("POST", "/policies/reload", None),
        ):
            if not unix:
                assert_error(api.call(method, path, body, token=None), 401, "unauthorized")
        assert api.policies()["generation"] == start_gen
        expect_ports(lab, {P1: True}, "after refused writes")

        # Every route, with the token.
        st = api.ok("GET", "/status")
        assert set(st) >= {
            "status",
            "version",
            "interface",
            "data_plane",
            "api",
            "statistics",
            "policy_count",
            "uptime_seconds",
        }, st
        assert st["status"] == "ok" and st["data_plane"]["status"] == "running", st
        assert st["interface"] == lab.host_if and st["policy_count"] == 2
        assert st["data_plane"]["generation"] == start_gen == st["policy_generation"]
        listed = api.policies()
        assert set(listed) >= {"policies", "count", "default_action", "generation"}
        assert listed["count"] == 2 and ids_of(listed["policies"]) == {1, 2}

        r = api.call("POST", "/policies", rule(50, "tcp", "allow", dst_port=P2))
        assert r.status == 201 and r.body["rule_id"] == 50, str(r)
        assert r.headers["Location"] == f"{PREFIX}/policies/50"
        assert r.headers["Content-Type"].startswith("application/json")
        expect_ports(lab, {P2: True}, "after POST over " + transport)
        one = api.ok("GET", "/policies/50")
        assert one["action"] == "allow" and one["dst_port"] == P2
        assert one["packets"] >= 2 and one["bytes"] > 0 and one["last_hit"], one
        api.ok("PUT", "/policies/50", rule(50, "tcp", "deny", dst_port=P2))
        assert api.ok("GET", "/policies/50")["action"] == "deny"
        expect_ports(lab, {P2: False}, "after PUT over " + transport)
        assert api.ok("DELETE", "/policies/50")["rule_id"] == 50
        expect_ports(lab, {P2: False, P1: True}, "after DELETE (default deny)")

        stats = api.ok("GET", "/stats")
        assert set(stats) >= {
            "total_packets",
            "allowed_packets",
            "denied_packets",
            "new_sessions",
            "closed_sessions",
            "active_sessions",
            "policy_hits",
            "policy_misses",
        }, stats
        assert stats["total_packets"] > 0 and stats["denied_packets"] > 0
        pk = api.ok("GET", "/stats/packets")
        assert 0 < pk["allow_rate"] < 100 and 0 < pk["deny_rate"] < 100, pk
        pol = api.ok("GET", "/stats/policies")
        assert 0 <= pol["hit_rate"] <= 100 and pol["rule_count"] == 2, pol
        with TcpConn(lab.peer_ns, lab.host_v6, P1, timeout=POS_TIMEOUT) as conn:
            assert conn.exchange()
            sport = conn.sock.getsockname()[1]
            ses = api.ok("GET", f"/sessions?protocol=tcp&port={sport}&verdict=allow")
            assert ses["count"] == 1 and ses["truncated"] is False, ses
            s = ses["sessions"][0]
            assert s["dst_port"] == P1 and s["rule_id"] == 1 and s["family"] == 6, s
            one_only = api.ok("GET", "/sessions?limit=1")
            assert one_only["count"] == 1
            assert api.ok("GET", f"/sessions?ip={lab.peer_v6}&protocol=udp")["count"] == 0
        doc = api.ok("GET", "/openapi.json")
        assert "openapi" in doc and f"{PREFIX}/policies/{{rule_id}}" in doc["paths"]

        big = {
            "default_action": "deny",
            "policies": [
                *base,
                *(
                    rule(
                        1000 + i, "tcp", "allow", src_ip=f"10.9.{i // 256}.{i % 256}", dst_port=443
                    )
                    for i in range(1000)
                ),
            ],
        }
        assert len(json.dumps(big)) > 64 * 1024  # PUT /policies takes more than 64 KiB
        d = api.ok("PUT", "/policies", big)
        assert len(d["added"]) == 1000 and not d["removed"]
        d = api.ok("POST", "/policies/reload")  # back to the agent's policy file
        assert len(d["removed"]) == 1000 and api.policies()["count"] == 2
        expect_ports(lab, {P1: True, P2: False}, "after reload")

        # Errors.
        gen = api.policies()["generation"]
        for method in ("GET", "PUT", "DELETE"):
            body = rule(999999, "tcp", "deny") if method == "PUT" else None
            assert_error(api.call(method, "/policies/999999", body), 404, "not_found", "999999")
        assert_error(api.get("/nope"), 404, "not_found")
        assert_error(
            api.call("POST", "/policies", {**base[0], "name": "again"}), 409, "conflict", "1"
        )
        invalid: list[tuple[Any, str]] = [
            ({**rule(60, "tcp", "allow"), "dst_port": 70000}, "dst_port"),
            (rule(60, "sctp", "allow"), "protocol"),
            ({"rule_id": 60, "protocol": "tcp"}, "action"),
            ({**rule(60, "tcp", "allow"), "colour": "red"}, "colour"),
            (rule(0, "tcp", "allow"), "rule_id"),
            (rule(60, "icmp", "allow", dst_port=22), "port"),
            (rule(60, "tcp", "allow", src_ip="10.0.0.300"), "src_ip"),
            ([rule(60, "tcp", "allow")], "object"),
        ]
        for body, field in invalid:
            assert_error(api.call("POST", "/policies", body), 400, "invalid", field)
        assert_error(api.call("POST", "/policies", raw=b'{"rule_id": 60,'), 400, "invalid", "JSON")
        assert_error(
            api.call("PUT", "/policies/1", {**base[0], "rule_id": 2}), 400, "invalid", "rule_id"
        )
        assert_error(
            api.call("PUT", "/policies", {"policies": [rule(60, "tcp", "maybe")]}),
            400,
            "invalid",
            "action",
        )
        assert_error(
            api.call("POST", "/policies?dryrun=1", rule(60, "tcp", "deny")),
            400,
            "invalid",
            "dryrun",
        )
        assert_error(api.get("/sessions?verdict=maybe"), 400, "invalid", "verdict")
        assert_error(api.get("/policies/abc"), 400, "invalid", "rule_id")
        huge = {**rule(61, "tcp", "deny"), "name": "x" * (70 * 1024)}
        assert_error(api.call("POST", "/policies", huge), 413, "too_large", "KiB")
        assert_error(api.call("PUT", "/policies/1", huge), 413, "too_large")
        for ctype in ("text/plain", None):
            r = api.call("POST", "/policies", rule(62, "tcp", "deny"), content_type=ctype)
            assert_error(r, 415, "unsupported_media_type", "application/json")

        # DNS rebinding: a foreign Host is refused on TCP; the socket has no browser.
        r = api.get("/policies", headers={"Host": "evil.example"})
        if unix:
            assert r.status == 200, str(r)
        else:
            assert_error(r, 421, "misdirected_request", "evil.example")
            port = str(agent.api).rpartition(":")[2]
            assert api.get("/policies", headers={"Host": f"localhost:{port}"}).status == 200
        # CSRF: a write with a foreign Origin is refused; a read is answered without CORS.
        r = api.call(
            "POST",
            "/policies",
            rule(63, "tcp", "deny", dst_port=P1),
            headers={"Origin": "http://evil.example"},
        )
        assert_error(r, 403, "forbidden", "evil.example")
        assert_error(
            api.call("DELETE", "/policies/1", headers={"Origin": "http://evil.example"}),
            403,
            "forbidden",
        )
        r = api.get("/policies", headers={"Origin": "http://evil.example"})
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
        assert api.policies()["generation"] == gen, "a refused request changed the set"
        expect_ports(lab, {P1: True}, "after the refused requests")
        if not unix:
            r = api.call(
                "POST",
                "/policies",
                rule(64, "tcp", "deny", dst_port=P2),
                headers={"Origin": f"http://{agent.api}"},
            )
            assert r.status == 201, f"same-origin write refused: {r}"
        assert agent.running


def test_no_auth_agent_accepts_requests_without_token(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1,)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [], default="allow", no_auth=True)
        assert api.token is None and not (agent.state_dir / "api-token").exists()
        assert api.get("/status", token=None).status == 200
        r = api.call("POST", "/policies", rule(5, "tcp", "deny", dst_port=P1), token=None)
        expect_ports(lab, {P1: False}, "after POST without a token")
        assert r.status == 201, str(r)
        # The other protections stay on.
        assert_error(
            api.get("/status", headers={"Host": "evil.example"}), 421, "misdirected_request"
        )
        assert_error(
            api.call("DELETE", "/policies/5", headers={"Origin": "http://x.example"}),
            403,
            "forbidden",
        )
