"""The admin API (streamer/api/app.py) in-process over the session's classifier
(support/apiapp.py): health and status, the token (required, its scheme, auth off, writes
logged with their actor), the Host (421) and Origin (403) checks, no CORS, and routing errors
(unknown routes and methods, bad rule ids, unknown query parameters)."""

from __future__ import annotations

import socket

import pytest
from support.apiapp import TOKEN, Api, Factory, P, assert_error, rule

# ---- health, status, auth ----------------------------------------------------------------


async def test_health_needs_no_token(api: Api) -> None:
    status, body, _ = await api.call("GET", f"{P}/health", auth=False)
    assert status == 200
    assert body == {"status": "ok", "message": "API server is healthy"}


async def test_status(api: Api) -> None:
    status, body, _ = await api.call("GET", f"{P}/status")
    assert status == 200, body
    for key in [
        "status",
        "version",
        "interface",
        "data_plane",
        "api",
        "statistics",
        "policy_count",
        "uptime_seconds",
        "interfaces",
        "policy_generation",
    ]:
        assert key in body
    assert body["status"] == "ok"
    assert body["version"] == "9.9.9"
    assert body["interface"] == "veth-test" and body["interfaces"] == ["veth-test"]
    assert body["data_plane"]["status"] == "running"
    assert body["data_plane"]["generation"] == api.dp.active()[0] == api.store.generation
    assert body["api"]["status"] == "running"
    assert body["policy_count"] == 0
    assert body["policy_generation"] == api.store.generation
    assert 0 <= body["uptime_seconds"] < 60
    assert "total_packets" in body["statistics"]


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (None, ["missing token", "Bearer"]),
        (f"Bearer {TOKEN}x", ["wrong token"]),
        (f"Bearer {TOKEN[:-1]}", ["wrong token"]),
        (f"Basic {TOKEN}", ["wrong token"]),
        ("Bearer", ["wrong token"]),
        ("Bearer ünïcödé", ["wrong token"]),
    ],
)
async def test_token_required(api: Api, header: str | None, words: list[str]) -> None:
    headers = {"Authorization": header} if header is not None else {}
    for method, path in [
        ("GET", f"{P}/status"),
        ("GET", f"{P}/policies"),
        ("POST", f"{P}/policies"),
        ("DELETE", f"{P}/policies/1"),
        ("GET", f"{P}/openapi.json"),
        ("GET", f"{P}/no-such-route"),
    ]:
        body = rule(1) if method == "POST" else None
        status, got, hdrs = await api.call(method, path, body, auth=False, headers=headers)
        assert_error(status, got, 401, "unauthorized", *words)
        assert hdrs["WWW-Authenticate"].startswith("Bearer")
    assert api.store.policy.policies == []


async def test_bearer_scheme_is_case_insensitive(api: Api) -> None:
    status, _, _ = await api.call(
        "GET", f"{P}/policies", auth=False, headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert status == 200


async def test_no_auth_mode(make_api: Factory) -> None:
    api = await make_api(token=None)
    status, body, _ = await api.call("POST", f"{P}/policies", rule(5), auth=False)
    assert status == 201, body
    status, _, _ = await api.call("GET", f"{P}/status", auth=False)
    assert status == 200
    assert api.changes()[-1]["actor"] == "no-auth"
    # The document then asks for no token.
    status, doc, _ = await api.call("GET", f"{P}/openapi.json", auth=False)
    assert "security" not in doc
    assert "401" not in doc["paths"][f"{P}/policies"]["post"]["responses"]


async def test_writes_by_token_are_logged_with_actor(api: Api) -> None:
    status, _, _ = await api.call("POST", f"{P}/policies", rule(6))
    assert status == 201
    last = api.changes()[-1]
    assert last["actor"] == "token"
    assert last["generation"] == api.store.generation


# ---- Host and Origin -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("localhost", True),
        ("localhost:8080", True),
        ("LOCALHOST.:8080", True),
        ("127.0.0.1:1", True),
        ("[::1]:8080", True),
        ("[::1]", True),
        ("agent.internal:8080", True),
        ("Agent.Internal", True),
        ("evil.example", False),
        ("evil.example:8080", False),
        ("127.0.0.1.evil.example", False),
        ("localhost:notaport", False),
        ("[::1", False),
        ("10.0.0.1:8080", False),
        ("", False),
    ],
)
async def test_host_check(make_api: Factory, host: str, ok: bool) -> None:
    api = await make_api(bind_hosts=("agent.internal",))
    status, body, _ = await api.call("GET", f"{P}/policies", headers={"Host": host})
    if ok:
        assert status == 200, body
    else:
        assert_error(status, body, 421, "misdirected_request", "Host")
    # Checked before the token, and on the public routes too.
    for path in (f"{P}/health", "/metrics"):
        status, _, _ = await api.call("GET", path, auth=False, headers={"Host": host})
        assert (status == 200) == ok


async def test_host_check_when_bound_to_every_address(make_api: Factory) -> None:
    api = await make_api(bind_hosts=("0.0.0.0",))
    for host, expected in [
        ("192.0.2.7:8080", 200),
        ("[2001:db8::1]:8080", 200),
        (socket.gethostname(), 200),
        ("evil.example", 421),
    ]:
        status, _, _ = await api.call("GET", f"{P}/policies", headers={"Host": host})
        assert status == expected, host


async def test_cross_site_writes_are_refused(api: Api) -> None:
    for origin in ("http://evil.example", "null", "https://127.0.0.1", f"{api.origin}.evil"):
        for method, path, body in [
            ("POST", f"{P}/policies", rule(7)),
            ("PUT", f"{P}/policies", {"default_action": "deny", "policies": []}),
            ("PUT", f"{P}/policies/7", rule(7)),
            ("DELETE", f"{P}/policies/7", None),
        ]:
            status, got, _ = await api.call(method, path, body, headers={"Origin": origin})
            assert_error(status, got, 403, "forbidden", "Origin")
    assert api.store.policy.policies == [] and api.store.policy.default_action == "allow"
    # Reads with a foreign Origin are answered (no CORS headers: the browser hides them).
    status, _, _ = await api.call("GET", f"{P}/policies", headers={"Origin": "http://evil.example"})
    assert status == 200
    # The API's own origin may write.
    status, _, _ = await api.call("POST", f"{P}/policies", rule(7), headers={"Origin": api.origin})
    assert status == 201


async def test_no_cors_headers_anywhere(api: Api) -> None:
    cors = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    for method, path in [
        ("OPTIONS", f"{P}/policies"),
        ("GET", f"{P}/policies"),
        ("GET", f"{P}/health"),
        ("POST", f"{P}/policies"),
        ("GET", "/metrics"),
    ]:
        status, _, headers = await api.call(method, path, headers=cors)
        assert not [h for h in headers if h.lower().startswith("access-control-")], headers
        if method == "OPTIONS":
            assert status == 405


# ---- routing errors ----------------------------------------------------------------------


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    status, body, _ = await api.call("GET", f"{P}/nothing")
    assert_error(status, body, 404, "not_found", "no such route")
    status, body, _ = await api.call("GET", "/nothing")  # (`/` is the flow viewer)
    assert_error(status, body, 404, "not_found")
    status, body, headers = await api.call("PATCH", f"{P}/policies/1", rule(1))
    assert_error(status, body, 405, "method_not_allowed", "PATCH")
    assert set(headers["Allow"].split(",")) == {"GET", "PUT", "DELETE"}
    status, body, _ = await api.call("POST", f"{P}/health", auth=False)
    assert_error(status, body, 405, "method_not_allowed")
    status, body, _ = await api.call("HEAD", f"{P}/status")
    assert status == 405
    # The flow feed is a WebSocket: a plain GET is told so.
    status, body, _ = await api.call("GET", f"{P}/flows")
    assert_error(status, body, 400, "invalid", "WebSocket")


@pytest.mark.parametrize(
    "raw", ["abc", "0", "-1", "1.5", "4294967296", "99999999999999999999", "1e3", "%20" + "1"]
)
async def test_bad_rule_id_in_path_is_400(api: Api, raw: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        body = rule(1) if method == "PUT" else None
        status, got, _ = await api.call(method, f"{P}/policies/{raw}", body)
        assert_error(status, got, 400, "invalid", "rule_id", "4294967295")


async def test_unknown_query_parameters_are_rejected(api: Api) -> None:
    status, body, _ = await api.call("POST", f"{P}/policies?dryrun=1", rule(8))
    assert_error(status, body, 400, "invalid", "dryrun", "dry_run")
    assert api.store.policy.policies == []  # the typo did not apply the change
    status, body, _ = await api.call("POST", f"{P}/policies?dry_run=maybe", rule(8))
    assert_error(status, body, 400, "invalid", "dry_run")
    status, body, _ = await api.call("POST", f"{P}/policies?dry_run=1&dry_run=0", rule(8))
    assert_error(status, body, 400, "invalid", "more than once")
    for path in ("policies?x=1", "status?x=1", "stats?verbose=1", "sessions?ipp=1.2.3.4"):
        status, body, _ = await api.call("GET", f"{P}/{path}")
        assert_error(status, body, 400, "invalid", "unknown query parameter")
