"""The admin API (streamer/api/) through aiohttp's test client, against a real PolicyStore in
tmp_path and the real classifier (the session's `datapath`), so "enforced when answered" is
checked with BPF_PROG_TEST_RUN verdicts right after each response.

Covers every route and error status, auth on and off, the Host (421) and Origin (403) checks,
body limits (a 100,000-rule PUT fits), dry runs, 100 concurrent writes (set == disk ==
kernel), metrics, Unix sockets and the token file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support.bpf import kernel_retval

from streamer.api.app import make_app
from streamer.api.context import ApiContext, ApiSetupError
from streamer.api.listen import ListenAddress, parse_listen
from streamer.api.params import SMALL_BODY_LIMIT
from streamer.api.serve import start_api
from streamer.api.tokens import load_or_create_token
from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import TC_ACT_OK
from streamer.datapath.reference import Packet
from streamer.events.sinks.websocket import WebSocketHub
from streamer.policy.model import PolicySet
from streamer.policy.store import LiveSession, PolicyStore, StoreError

TOKEN = "test-token-0123456789abcdefghijklmnop"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
P = "/api/v1"


def rule(rule_id: Any, **fields: Any) -> dict[str, Any]:
    """A rule document: tcp allow unless given."""
    return {"rule_id": rule_id, "protocol": "tcp", "action": "allow", **fields}


def full(rule_id: int, **fields: Any) -> dict[str, Any]:
    """The canonical form the API returns for `rule(rule_id, **fields)`."""
    out = {
        "rule_id": rule_id,
        "name": "",
        "src_ip": "any",
        "dst_ip": "any",
        "src_port": 0,
        "dst_port": 0,
        "protocol": "tcp",
        "action": "allow",
        "priority": 100,
        "direction": "any",
    }
    out.update(fields)
    return out


_sport = iter(range(20000, 60000))


def passes(dp: Datapath, dst: str, dport: int, proto: str = "tcp", src: str = "10.1.1.1") -> bool:
    """Does the classifier pass a new flow (fresh source port) to dst:dport?"""
    sport = next(_sport) if proto in ("tcp", "udp") else 0
    return kernel_retval(dp, Packet.of(src, dst, proto, sport, dport)) == TC_ACT_OK


def live_sessions(dp: Datapath) -> Callable[[], Iterator[LiveSession]]:
    return dp.sessions


@dataclass
class Api:
    client: TestClient[web.Request, web.Application]
    ctx: ApiContext
    store: PolicyStore
    dp: Datapath
    state_dir: Path

    @property
    def origin(self) -> str:
        return f"http://{self.client.host}:{self.client.port}"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: bool = True,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        """(status, parsed JSON body or text, headers)."""
        hdrs = {**(AUTH if auth else {}), **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=data, headers=hdrs) as resp:
            raw = await resp.read()
            if resp.content_type == "application/json" and raw:
                return resp.status, json.loads(raw), resp.headers
            return resp.status, raw.decode(), resp.headers

    def disk(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.store.path.read_text())
        return doc

    def changes(self) -> list[dict[str, Any]]:
        path = self.state_dir / "changes.log"
        return [json.loads(line) for line in path.read_text().splitlines()]


Factory = Callable[..., Awaitable[Api]]


@pytest.fixture
def dp(datapath: Datapath) -> Datapath:
    datapath.clear_sessions()
    return datapath


def make_store(dp: Datapath, state_dir: Path, fail: list[bool] | None = None) -> PolicyStore:
    def applier(policy: PolicySet, generation: int | None) -> int:
        if fail and fail[0]:
            raise RuntimeError("injected kernel failure")
        return dp.apply(compile_policy(policy, dp.config.max_shapes), generation)

    store = PolicyStore(state_dir, applier, sessions=live_sessions(dp))
    store.restore(PolicySet(), 0)
    return store


@pytest.fixture
async def make_api(dp: Datapath, tmp_path: Path) -> AsyncIterator[Factory]:
    """make_api(token=TOKEN, bind_hosts=(), datapath=dp, fail=None) -> a served Api."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(
        token: str | None = TOKEN,
        bind_hosts: tuple[str, ...] = (),
        datapath: Any = None,
        fail: list[bool] | None = None,
    ) -> Api:
        state_dir = tmp_path / f"state-{len(clients)}"
        store = make_store(dp, state_dir, fail)
        ctx = ApiContext(
            store=store,
            datapath=datapath if datapath is not None else dp,
            interfaces=["veth-test"],
            version="9.9.9",
            started_monotonic=time.monotonic(),
            token=token,
            bind_hosts=set(bind_hosts),
            registry=CollectorRegistry(),
        )
        client = TestClient(TestServer(make_app(ctx)))
        await client.start_server()
        clients.append(client)
        return Api(client, ctx, store, dp, state_dir)

    try:
        yield make
    finally:
        for c in clients:
            await c.close()


@pytest.fixture
async def api(make_api: Factory) -> Api:
    return await make_api()


def assert_error(status: int, body: Any, expected: int, code: str, *words: str) -> None:
    assert status == expected, body
    assert set(body) <= {"error", "message", "errors"}, body
    assert body["error"] == code, body
    for word in words:
        assert word in body["message"], (word, body["message"])
    assert "Traceback" not in body["message"]


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


# ---- policy CRUD -------------------------------------------------------------------------


ORIGINAL_EXAMPLE = {
    "rule_id": 1001,
    "src_ip": "0.0.0.0/0",
    "dst_ip": "10.0.0.5",
    "dst_port": 443,
    "protocol": "tcp",
    "action": "allow",
    "priority": 100,
}


async def test_crud_is_enforced_when_answered(api: Api) -> None:
    dp = api.dp
    status, body, _ = await api.call(
        "PUT", f"{P}/policies", {"default_action": "deny", "policies": []}
    )
    assert status == 200, body
    assert not passes(dp, "10.0.0.5", 443)

    # POST: the original design's example rule.
    gen = api.store.generation
    status, body, headers = await api.call("POST", f"{P}/policies", ORIGINAL_EXAMPLE)
    assert status == 201, body
    assert body == full(1001, src_ip="0.0.0.0/0", dst_ip="10.0.0.5", dst_port=443)
    assert headers["Location"] == f"{P}/policies/1001"
    assert int(headers["X-Policy-Generation"]) == gen + 1 == dp.active()[0]
    assert passes(dp, "10.0.0.5", 443)
    assert not passes(dp, "10.0.0.5", 80)

    status, body, _ = await api.call("GET", f"{P}/policies")
    assert status == 200
    assert body == {
        "policies": [full(1001, src_ip="0.0.0.0/0", dst_ip="10.0.0.5", dst_port=443)],
        "count": 1,
        "default_action": "deny",
        "generation": api.store.generation,
    }

    # PUT one: rule_id may be left out of the body.
    update = {k: v for k, v in ORIGINAL_EXAMPLE.items() if k != "rule_id"}
    update.update(dst_port="80-90", name="web")
    status, body, headers = await api.call("PUT", f"{P}/policies/1001", update)
    assert status == 200, body
    assert body["dst_port"] == "80-90" and body["name"] == "web"
    assert int(headers["X-Policy-Generation"]) == api.store.generation
    assert passes(dp, "10.0.0.5", 85)
    assert not passes(dp, "10.0.0.5", 443)
    # ... or equal the path's.
    status, body, _ = await api.call("PUT", f"{P}/policies/1001", {**update, "rule_id": 1001})
    assert status == 200, body

    # DELETE answers with the deleted rule.
    status, body, _ = await api.call("DELETE", f"{P}/policies/1001")
    assert status == 200, body
    assert body["rule_id"] == 1001 and body["name"] == "web"
    assert not passes(dp, "10.0.0.5", 85)
    status, body, _ = await api.call("GET", f"{P}/policies/1001")
    assert_error(status, body, 404, "not_found", "1001")
    status, body, _ = await api.call("DELETE", f"{P}/policies/1001")
    assert_error(status, body, 404, "not_found", "1001")
    status, body, _ = await api.call("PUT", f"{P}/policies/1001", update)
    assert_error(status, body, 404, "not_found", "1001")

    disk = api.disk()
    assert disk["policies"] == [] and disk["default_action"] == "deny"
    assert disk["generation"] == api.store.generation == dp.active()[0]


async def test_duplicate_rule_id_is_409(api: Api) -> None:
    assert (await api.call("POST", f"{P}/policies", rule(10)))[0] == 201
    gen = api.store.generation
    status, body, _ = await api.call("POST", f"{P}/policies", rule(10, action="deny"))
    assert_error(status, body, 409, "conflict", "10")
    assert api.store.generation == gen and api.store.policy.policies[0].action == "allow"


async def test_put_one_body_rule_id_must_match_path(api: Api) -> None:
    assert (await api.call("POST", f"{P}/policies", rule(11)))[0] == 201
    for other in (12, "11", True, None, 11.0):
        status, body, _ = await api.call("PUT", f"{P}/policies/11", {**rule(11), "rule_id": other})
        assert_error(status, body, 400, "invalid", "rule_id", "path")


async def test_rule_hit_counters(api: Api) -> None:
    dp = api.dp
    await api.call("PUT", f"{P}/policies", {"default_action": "deny", "policies": []})
    assert (await api.call("POST", f"{P}/policies", rule(20, dst_ip="10.20.0.1")))[0] == 201
    status, body, _ = await api.call("GET", f"{P}/policies/20")
    assert status == 200
    assert (body["packets"], body["bytes"], body["last_hit"]) == (0, 0, None)
    for _ in range(3):
        assert passes(dp, "10.20.0.1", 80)
    status, body, _ = await api.call("GET", f"{P}/policies/20")
    assert status == 200
    assert body == {
        **full(20, dst_ip="10.20.0.1"),
        **{k: body[k] for k in ("packets", "bytes", "last_hit")},
    }
    assert body["packets"] == 3 and body["bytes"] > 3 * 40
    last_hit = datetime.fromisoformat(body["last_hit"])
    assert body["last_hit"].endswith("Z")
    assert abs((datetime.now(UTC) - last_hit).total_seconds()) < 5


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (rule(1, dst_port=70000), ["dst_port", "70000", "65535"]),
        (rule(1, src_ip="10.0.0.300"), ["src_ip", "10.0.0.300", "CIDR"]),
        (rule(1, dst_ip="10.0.0.1/24"), ["dst_ip", "host bits", "10.0.0.0/24"]),
        (rule(1, protocol="sctp"), ["protocol", "sctp", "tcp, udp, icmp, icmpv6, any"]),
        (rule(1, action="accept"), ["action", "accept", "allow, deny, log"]),
        (rule(1, priority=-1), ["priority", "0..65535"]),
        (rule(1, colour="red"), ["colour", "unknown field", "allowed fields"]),
        (rule(1, protocol="icmp", dst_port=80), ["dst_port", "icmp", "tcp"]),
        (rule(1, name="a\nb"), ["name", "control characters"]),
        (rule(0), ["rule_id", "1..4294967295"]),
        (rule(2**32), ["rule_id", "1..4294967295"]),
        (rule(True), ["rule_id"]),
        (rule(1.5), ["rule_id"]),
        (rule(10**30), ["rule_id"]),
        ({"rule_id": 1, "action": "allow"}, ["protocol", "required field is missing"]),
        ([rule(1)], ["not a rule", "object"]),
        (None, ["not a rule", "object"]),
        ("x", ["not a rule"]),
        (12, ["not a rule"]),
    ],
)
async def test_invalid_rule_says_what_is_wrong(api: Api, doc: Any, words: list[str]) -> None:
    status, body, _ = await api.call(
        "POST",
        f"{P}/policies",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert_error(status, body, 400, "invalid", *words)
    assert api.store.policy.policies == []


async def test_whole_set_errors_name_the_rule(api: Api) -> None:
    doc = {
        "default_action": "deny",
        "policies": [rule(1), rule(2), rule(3), rule(4, dst_port="90-80"), rule(5, action="x")],
    }
    status, body, _ = await api.call("PUT", f"{P}/policies", doc)
    assert_error(
        status,
        body,
        400,
        "invalid",
        "policies[3] (rule_id 4): dst_port",
        "90-80",
        "policies[4] (rule_id 5): action",
    )
    assert len(body["errors"]) == 2
    duplicate = {"default_action": "deny", "policies": [rule(1), rule(2), rule(1)]}
    status, body, _ = await api.call("PUT", f"{P}/policies", duplicate)
    assert_error(status, body, 400, "invalid", "policies[2] (rule_id 1): rule_id: duplicate")
    bad: Any
    for bad, words in [
        ({"default_action": "block", "policies": []}, ["default_action", "allow, deny"]),
        ({"default_action": "deny", "policies": [], "extra": 1}, ["extra", "unknown field"]),
        ({"default_action": "deny", "policies": 5}, ["policies", "not a list"]),
        ([rule(1)], ["top level is a list"]),
    ]:
        status, body, _ = await api.call("PUT", f"{P}/policies", bad)
        assert_error(status, body, 400, "invalid", *words)
    assert api.store.policy.policies == [] and api.store.policy.default_action == "allow"


async def test_whole_set_reads_like_a_policy_file(api: Api) -> None:
    # A missing default_action is allow and missing policies are none, as in a policy file.
    status, body, _ = await api.call("PUT", f"{P}/policies", {"default_action": "deny"})
    assert status == 200, body
    assert api.store.policy.default_action == "deny" and api.store.policy.policies == []
    status, body, _ = await api.call("PUT", f"{P}/policies", {"policies": [rule(3)]})
    assert status == 200, body
    assert body["default_action_changed"] is True and body["added"] == [full(3)]
    assert api.store.policy.default_action == "allow"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"rule_id": 1,', ["not valid JSON", "line 1 column"]),
        (b'{"rule_id": 1,\n "protocol": tcp}', ["not valid JSON", "line 2 column"]),
        (b"", ["empty"]),
        (b"   \n", ["empty"]),
        (b"\xff\xfe{}", ["not valid JSON"]),
        (b'{"rule_id": 1e400}', ["not valid JSON"]),
        (b"[" * 5000 + b"]" * 5000, ["not valid JSON"]),
        (b'{"name": "\\ud800", "rule_id": 1, "protocol": "tcp", "action": "allow"}', []),
        (b'{"rule_id": 1, "protocol": "tcp", "action": "allow", "rule_id": "x"}', ["rule_id"]),
        (b'{"rule_id": 1, "protocol": "tcp", "action": "allow", "name": "\\u0000"}', ["name"]),
        (b"NaN", ["not valid JSON"]),
    ],
)
async def test_bad_json_is_400_never_500(api: Api, data: bytes, words: list[str]) -> None:
    for method, path in [
        ("POST", f"{P}/policies"),
        ("PUT", f"{P}/policies"),
        ("PUT", f"{P}/policies/1"),
    ]:
        status, body, _ = await api.call(
            method, path, data=data, headers={"Content-Type": "application/json"}
        )
        assert_error(status, body, 400, "invalid", *words)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/jsonx",
    ],
)
async def test_body_must_be_json_415(api: Api, content_type: str | None) -> None:
    data = json.dumps(rule(30)).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path in [
        ("POST", f"{P}/policies"),
        ("PUT", f"{P}/policies/30"),
        ("PUT", f"{P}/policies"),
    ]:
        async with api.client.request(
            method, path, data=data, headers={**AUTH, **headers}, skip_auto_headers=["Content-Type"]
        ) as resp:
            body = await resp.json()
            assert_error(resp.status, body, 415, "unsupported_media_type", "application/json")
    status, body, _ = await api.call(
        "POST",
        f"{P}/policies",
        data=data,
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert status == 201, body


async def test_body_limits(api: Api) -> None:
    big = rule(40, name="x" * SMALL_BODY_LIMIT)
    for method, path in [("POST", f"{P}/policies"), ("PUT", f"{P}/policies/40")]:
        status, body, _ = await api.call(method, path, big)
        assert_error(status, body, 413, "too_large", "64 KiB")

    # Without Content-Length (chunked), the limit holds as the body arrives.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"rule_id": 41, "protocol": "tcp", "action": "allow", "name": "'
        for _ in range(SMALL_BODY_LIMIT // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    async with api.client.post(
        f"{P}/policies", data=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
    assert api.store.policy.policies == []
    # The whole-set limit is 64 MiB: announce more and it is refused before reading.
    async with api.client.put(
        f"{P}/policies",
        data=b" " * (64 * 1024 * 1024 + 1),
        headers={**AUTH, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"


async def test_bulk_replace_of_100000_rules(api: Api) -> None:
    dp = api.dp
    n = 100_000
    doc = {
        "default_action": "deny",
        "policies": [
            {
                "rule_id": i + 1,
                "name": f"rule-{i + 1}",
                "src_ip": "any",
                "dst_ip": f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}",
                "src_port": 0,
                "dst_port": 80,
                "protocol": "tcp",
                "action": "allow",
                "priority": 100,
                "direction": "any",
            }
            for i in range(n)
        ],
    }
    data = json.dumps(doc).encode()
    assert len(data) > SMALL_BODY_LIMIT * 100
    started = time.monotonic()
    status, body, headers = await api.call(
        "PUT", f"{P}/policies", data=data, headers={"Content-Type": "application/json"}
    )
    elapsed = time.monotonic() - started
    assert status == 200, body
    assert len(body["added"]) == n and body["removed"] == [] and not body["dry_run"]
    assert int(headers["X-Policy-Generation"]) == dp.active()[0] == api.store.generation
    print(f"PUT of {n} rules ({len(data) / 2**20:.1f} MiB): {elapsed:.2f} s")
    assert passes(dp, "10.100.0.0", 80)
    assert passes(dp, "10.101.134.159", 80)  # rule 100000
    assert not passes(dp, "10.101.134.160", 80)
    assert not passes(dp, "10.100.0.0", 81)
    status, body, _ = await api.call("GET", f"{P}/policies")
    assert status == 200 and body["count"] == n
    assert len(api.disk()["policies"]) == n
    status, body, _ = await api.call("GET", f"{P}/policies/{n}")
    assert status == 200 and body["dst_ip"] == "10.101.134.159"
    # Back to nothing (the shared classifier's slots are freed).
    status, body, _ = await api.call(
        "PUT", f"{P}/policies", {"default_action": "allow", "policies": []}
    )
    assert status == 200 and len(body["removed"]) == n


# ---- dry runs -----------------------------------------------------------------------------


async def test_dry_run_returns_the_diff_and_changes_nothing(api: Api) -> None:
    dp = api.dp
    setup = {
        "default_action": "deny",
        "policies": [rule(50, dst_ip="10.50.0.1"), rule(51, dst_ip="10.50.0.2")],
    }
    assert (await api.call("PUT", f"{P}/policies", setup))[0] == 200
    assert passes(dp, "10.50.0.1", 80)  # a live session decided by rule 50
    gen = dp.active()[0]
    disk = api.store.path.read_bytes()
    changes = api.changes()

    async def unchanged() -> None:
        assert dp.active()[0] == gen == api.store.generation
        assert api.store.path.read_bytes() == disk
        assert api.changes() == changes
        assert [r.rule_id for r in api.store.policy.policies] == [50, 51]

    status, body, headers = await api.call("POST", f"{P}/policies?dry_run=1", rule(52))
    assert status == 200, body
    assert body["dry_run"] is True and body["generation"] == gen
    assert int(headers["X-Policy-Generation"]) == gen
    assert body["added"] == [full(52)] and body["removed"] == [] and body["changed"] == []
    await unchanged()

    status, body, _ = await api.call(
        "PUT", f"{P}/policies/50?dry_run=true", rule(50, dst_ip="10.50.0.1", action="deny")
    )
    assert status == 200, body
    assert body["changed"] == [
        {
            "before": full(50, dst_ip="10.50.0.1"),
            "after": full(50, dst_ip="10.50.0.1", action="deny"),
        }
    ]
    assert body["sessions_changing_verdict"] >= 1 and body["sessions_checked"] >= 1
    await unchanged()

    status, body, _ = await api.call("DELETE", f"{P}/policies/51?dry_run=1")
    assert status == 200, body
    assert body["removed"] == [full(51, dst_ip="10.50.0.2")]
    await unchanged()

    status, body, _ = await api.call(
        "PUT",
        f"{P}/policies?dry_run=1",
        {"default_action": "allow", "policies": [rule(51, dst_ip="10.50.0.2")]},
    )
    assert status == 200, body
    assert body["default_action_changed"] is True
    assert [r["rule_id"] for r in body["removed"]] == [50]
    await unchanged()
    assert passes(dp, "10.50.0.1", 80) and not passes(dp, "10.50.0.9", 80)

    # dry_run=0 is a real write.
    status, body, _ = await api.call("DELETE", f"{P}/policies/51?dry_run=0")
    assert status == 200 and body["rule_id"] == 51
    assert dp.active()[0] == gen + 1


# ---- concurrency -----------------------------------------------------------------------------


async def test_100_concurrent_writes_agree_with_disk_and_kernel(api: Api) -> None:
    dp = api.dp

    def r(i: int) -> dict[str, Any]:
        return rule(i, dst_ip=f"10.60.0.{i}", dst_port=80)

    setup = {"default_action": "deny", "policies": [r(i) for i in range(1, 51)]}
    assert (await api.call("PUT", f"{P}/policies", setup))[0] == 200
    gen0 = api.store.generation
    ops: list[tuple[str, str, Any]] = [("POST", f"{P}/policies", r(i)) for i in range(51, 101)]
    ops += [("DELETE", f"{P}/policies/{i}", None) for i in range(1, 41)]
    ops += [("POST", f"{P}/policies", r(i)) for i in range(51, 61)]  # duplicates: one wins
    random.Random(7).shuffle(ops)
    assert len(ops) == 100
    results = await asyncio.gather(*(api.call(m, p, b) for m, p, b in ops))
    statuses = [s for s, _, _ in results]
    assert statuses.count(201) == 50, statuses
    assert statuses.count(200) == 40, statuses
    assert statuses.count(409) == 10, statuses
    # Every accepted write was one generation, none lost or merged.
    assert api.store.generation == gen0 + 90 == dp.active()[0]
    gens = sorted(int(h["X-Policy-Generation"]) for s, _, h in results if s in (200, 201))
    assert gens == list(range(gen0 + 1, gen0 + 91))

    expected = set(range(41, 101))
    _, body, _ = await api.call("GET", f"{P}/policies")
    assert {p["rule_id"] for p in body["policies"]} == expected and body["count"] == 60
    disk = api.disk()
    assert {p["rule_id"] for p in disk["policies"]} == expected
    assert disk["generation"] == api.store.generation
    kernel = {i for i in range(1, 101) if passes(dp, f"10.60.0.{i}", 80)}
    assert kernel == expected
    assert len(api.changes()) >= 90


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


# ---- failures ------------------------------------------------------------------------------


class BrokenDatapath:
    """The real datapath, except that reading counters fails."""

    def __init__(self, dp: Datapath) -> None:
        self._dp = dp
        self.config = dp.config

    def counters(self) -> dict[str, int]:
        raise RuntimeError("secret internals /etc/shadow")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dp, name)


async def test_unexpected_failure_is_a_generic_500(
    make_api: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    api = await make_api()
    api.ctx.datapath = BrokenDatapath(api.dp)
    status, body, _ = await api.call("GET", f"{P}/stats")
    assert_error(status, body, 500, "internal", "log")
    assert "secret" not in json.dumps(body)
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


async def test_kernel_failure_is_503_and_changes_nothing(make_api: Factory) -> None:
    fail = [False]
    api = await make_api(fail=fail)
    assert (await api.call("POST", f"{P}/policies", rule(95)))[0] == 201
    gen = api.store.generation
    disk = api.store.path.read_bytes()
    fail[0] = True
    status, body, _ = await api.call("POST", f"{P}/policies", rule(96))
    assert_error(status, body, 503, "apply_failed", "nothing changed")
    status, body, _ = await api.call("DELETE", f"{P}/policies/95")
    assert status == 503
    assert api.store.generation == gen == api.dp.active()[0]
    assert api.store.path.read_bytes() == disk
    assert [r.rule_id for r in api.store.policy.policies] == [95]


async def test_a_write_whose_request_is_cancelled_is_awaited_as_the_api_closes(
    dp: Datapath, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The API closes while a policy change is in the kernel: its request is cancelled, the
    change goes on (the store stays consistent), and closing the API waits for it, so the
    datapath it writes to is not closed under it; its failure, with nobody left to answer,
    is logged."""
    entered, release = threading.Event(), threading.Event()

    def slow_failing_kernel(policy: PolicySet, generation: int | None) -> int:
        if generation == 0:  # the store's restore, below
            return dp.apply(compile_policy(policy, dp.config.max_shapes), generation)
        entered.set()
        release.wait(20)
        raise RuntimeError("injected kernel failure")

    store = PolicyStore(tmp_path / "state", slow_failing_kernel, sessions=live_sessions(dp))
    store.restore(PolicySet(), 0)
    gen = store.generation
    ctx = ApiContext(
        store=store, datapath=dp, interfaces=[], version="9.9.9",
        started_monotonic=time.monotonic(), token=None, bind_hosts=set(),
        registry=CollectorRegistry(),
    )
    runner = web.AppRunner(make_app(ctx), shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def post() -> None:
        with contextlib.suppress(aiohttp.ClientError):
            async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}{P}/policies", json=rule(7)
            ) as resp:
                await resp.read()

    caplog.set_level(logging.WARNING, logger="microseg.api")
    client = asyncio.create_task(post())
    assert await asyncio.to_thread(entered.wait, 20)
    closing = asyncio.create_task(runner.cleanup())
    await asyncio.sleep(1.0)  # well past the shutdown timeout: the handler is cancelled
    assert not closing.done()
    release.set()
    await asyncio.wait_for(closing, 20)
    await asyncio.wait_for(client, 20)
    assert store.generation == gen and store.policy.policies == []
    assert any(
        "a policy change whose request was cancelled was refused" in r.getMessage()
        and "injected kernel failure" in r.getMessage()
        for r in caplog.records
    ), caplog.text


async def test_a_failure_in_a_flow_feed_client_task_is_logged_not_swallowed(
    dp: Datapath, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a feed client's send task ends that client's connection and reaches the
    route's handler, which logs it (was: gathered and dropped); the client is closed."""

    class BuggyHub(WebSocketHub):
        async def _pump(self, c: Any, ws: web.WebSocketResponse) -> None:
            await ws.send_str('{"hello":1}')
            raise ValueError("a bug in the feed's pump")

    store = make_store(dp, tmp_path / "state")
    ctx = ApiContext(
        store=store, datapath=dp, interfaces=[], version="9.9.9",
        started_monotonic=time.monotonic(), token=None, bind_hosts=set(),
        registry=CollectorRegistry(), flows=BuggyHub(),
    )
    caplog.set_level(logging.ERROR, logger="microseg.api")
    client = TestClient(TestServer(make_app(ctx)))
    await client.start_server()
    try:
        async with client.ws_connect(f"{P}/flows") as ws:
            assert (await ws.receive(timeout=5)).data == '{"hello":1}'
            assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
        deadline = time.monotonic() + 5
        while "a bug in the feed's pump" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        await client.close()
    assert f"GET {P}/flows failed" in caplog.text and "a bug in the feed's pump" in caplog.text
    assert ctx.flows.stats()["clients"] == 0


# ---- serving: TCP, Unix socket, token -------------------------------------------------------


async def test_start_api_on_tcp_and_unix_socket(dp: Datapath, tmp_path: Path) -> None:
    store = make_store(dp, tmp_path / "state")
    ctx = ApiContext(
        store=store,
        datapath=dp,
        interfaces=["lo"],
        version="1",
        started_monotonic=time.monotonic(),
        token=TOKEN,
        bind_hosts=set(),
        registry=CollectorRegistry(),
    )
    path = tmp_path / "run" / "api.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: what a killed agent leaves
    runner = await start_api(ctx, [f"unix:{path}", "127.0.0.1:0"])
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660 and stat.S_ISSOCK(path.stat().st_mode)
        assert "127.0.0.1" in ctx.bind_hosts
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        # Unix socket: the socket file's mode is the access control; no token.
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as s:
            async with s.get(f"http://localhost{P}/status") as resp:
                assert resp.status == 200
            async with s.post(f"http://localhost{P}/policies", json=rule(97)) as resp:
                assert resp.status == 201, await resp.text()
            async with s.post(
                f"http://localhost{P}/policies",
                json=rule(98),
                headers={"Origin": "http://evil.example"},
            ) as resp:
                assert resp.status == 403
        last = json.loads((tmp_path / "state" / "changes.log").read_text().splitlines()[-1])
        assert last["actor"] == "unix-socket"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}{P}/status") as resp:
                assert resp.status == 401
            async with s.get(f"http://127.0.0.1:{port}{P}/policies", headers=AUTH) as resp:
                assert resp.status == 200
                assert (await resp.json())["count"] == 1
        # A second agent on the same socket is refused, the live one untouched.
        with pytest.raises(ApiSetupError, match="another process is serving"):
            await start_api(ctx, [f"unix:{path}"])
    finally:
        await runner.cleanup()
    other = tmp_path / "plain-file"
    other.write_text("x")
    with pytest.raises(ApiSetupError, match="not a socket"):
        await start_api(ctx, [f"unix:{other}"])
    with pytest.raises(ApiSetupError, match="HOST:PORT"):
        await start_api(ctx, ["localhost"])


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ListenAddress(host="127.0.0.1", port=8080)
    assert parse_listen("[::1]:8080") == ListenAddress(host="::1", port=8080)
    assert parse_listen("localhost:0") == ListenAddress(host="localhost", port=0)
    assert parse_listen("unix:/run/x.sock") == ListenAddress(path=Path("/run/x.sock"))
    assert str(parse_listen("[::1]:80")) == "[::1]:80"
    for bad in (
        "8080",
        "::1:8080",
        "[::1]",
        "[nope]:80",
        "host:99999",
        "host:",
        ":80",
        "unix:",
        "host:http",
    ):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_token_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    token = load_or_create_token(state)
    path = state / "api-token"
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token
    assert load_or_create_token(state) == token
    os.chmod(path, 0o640)
    with pytest.raises(ApiSetupError, match="chmod 600"):
        load_or_create_token(state)
    os.chmod(path, 0o604)
    with pytest.raises(ApiSetupError, match="group or others"):
        load_or_create_token(state)
    os.chmod(path, 0o600)
    path.write_text("\n")
    with pytest.raises(ApiSetupError, match="empty"):
        load_or_create_token(state)
    path.unlink()
    (tmp_path / "elsewhere").write_text("abc")
    os.chmod(tmp_path / "elsewhere", 0o600)
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ApiSetupError, match="not a regular file"):
        load_or_create_token(state)
