"""The control plane end to end: a real agent process, its admin API on a real socket (TCP and
Unix), the `microseg` CLI, and real traffic across the lab's veth showing what the kernel does.

Every test starts its own agent (own pin instance, state dir and API port) on the module's lab.
Traffic runs from the peer namespace to echo servers in the host namespace (the agent's side),
over IPv4 and IPv6 at once. A probe that must fail waits out NEG_TIMEOUT; "enforced when the
response arrives" means the probe runs right after the response, with no retry or wait.

kill -9 test: the delays are drawn from a seed printed in the test output (run pytest with -s
to see it live); MICROSEG_KILL_SEED=<n> repeats a run.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.agentproc import AgentProcess, free_port, write_policy
from support.netutil import TcpConn, echo_server, tcp_exchange

from streamer.lab.lab import Lab

AgentFactory = Callable[..., AgentProcess]

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/api/v1"
FAMILIES = ("v4", "v6")
NEG_TIMEOUT = 0.6  # a blocked probe's wait: replies on a veth take microseconds
POS_TIMEOUT = 2.0


def host(lab: Lab, fam: str) -> str:
    return lab.host_v4 if fam == "v4" else lab.host_v6


def rule(rule_id: int, protocol: str, action: str, **fields: Any) -> dict[str, Any]:
    return {
        "rule_id": rule_id,
        "name": f"r{rule_id}",
        "protocol": protocol,
        "action": action,
        **fields,
    }


# ---- HTTP to the agent ----------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw) if self.raw.strip() else None

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.raw[:600]!r}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(str(self._path))
        self.sock = s


class Api:
    """Synchronous requests to one agent's admin API, over TCP (`addr` HOST:PORT) or a Unix
    socket (`unix`). `token` is sent unless a call says `token=None`; paths are under /api/v1
    except /metrics."""

    def __init__(
        self, addr: str | None = None, token: str | None = None, unix: Path | None = None
    ) -> None:
        assert (addr is None) != (unix is None)
        self.addr, self.token, self.unix = addr, token, unix

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.unix is not None:
            return _UnixConnection(self.unix, timeout)
        assert self.addr is not None
        hostname, _, port = self.addr.rpartition(":")
        return http.client.HTTPConnection(hostname, int(port), timeout=timeout)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | bool | None = True,
        headers: Mapping[str, str] | None = None,
        raw: bytes | None = None,
        content_type: str | None = "application/json",
        timeout: float = 60.0,
    ) -> Reply:
        url = path if path.startswith("/metrics") else PREFIX + path
        hdrs: dict[str, str] = {}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None and content_type is not None:
            hdrs["Content-Type"] = content_type
        tok = self.token if token is True else (token or None)
        if tok:
            hdrs["Authorization"] = f"Bearer {tok}"
        hdrs.update(headers or {})
        conn = self._connection(timeout)
        try:
            conn.request(method, url, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.call("GET", path, **kw)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        """The JSON of a call that must answer `status`."""
        r = self.call(method, path, body)
        assert r.status == status, f"{method} {path}: {r}"
        return r.body

    def policies(self) -> dict[str, Any]:
        data: dict[str, Any] = self.ok("GET", "/policies")
        return data


def api_of(agent: AgentProcess) -> Api:
    assert agent.api is not None
    return Api(agent.api, agent.token())


def ids_of(policies: Iterable[Mapping[str, Any]]) -> set[int]:
    return {int(p["rule_id"]) for p in policies}


def by_id(policies: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(p["rule_id"]): dict(p) for p in policies}


def assert_error(r: Reply, status: int, code: str, *words: str) -> None:
    """`r` is the JSON error `status`/`code` whose message names each of `words`."""
    assert r.status == status, str(r)
    body = r.body
    assert set(body) >= {"error", "message"}, body
    assert body["error"] == code, body
    assert b"Traceback" not in r.raw
    for w in words:
        assert w.lower() in body["message"].lower(), f"{w!r} not named in: {body['message']!r}"


# ---- traffic ------------------------------------------------------------------------------


def reach(
    lab: Lab, ports: Iterable[int], timeout: float = NEG_TIMEOUT
) -> dict[tuple[str, int], bool]:
    """Connect + echo from the peer to the host on each port, both families, concurrently."""
    todo = [(fam, port) for port in ports for fam in FAMILIES]
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as ex:
        got = ex.map(lambda fp: tcp_exchange(lab.peer_ns, host(lab, fp[0]), fp[1], timeout), todo)
        return dict(zip(todo, got, strict=True))


def expect_ports(lab: Lab, want: Mapping[int, bool], what: str) -> None:
    """Every port in `want` passes (True) or is blocked (False), in both families."""
    got = reach(lab, want)
    wrong = [
        f"  {fam} port {port}: expected {'pass' if want[port] else 'blocked'}"
        for (fam, port), ok in got.items()
        if ok != want[port]
    ]
    assert not wrong, f"{what}: traffic not as the policy says:\n" + "\n".join(wrong)


def start_agent(
    agent_factory: AgentFactory,
    lab: Lab,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    default: str = "deny",
    *,
    unix: Path | None = None,
    no_auth: bool = False,
    name: str = "policy.json",
) -> tuple[AgentProcess, Api]:
    """An agent enforcing `rules` from a fresh policy file, its API on a free loopback port
    (and on `unix`, if given), ready to answer; and an Api client with its token."""
    extra: list[str] = []
    if unix is not None:
        extra += ["--api", f"unix:{unix}"]
    if no_auth:
        extra.append("--no-auth")
    policy = write_policy(tmp_path / name, rules, default)
    agent = agent_factory(lab, policy, api=f"127.0.0.1:{free_port()}", extra_args=extra)
    agent.start()
    agent.wait_api()
    return agent, api_of(agent)


# ---- 1. each accepted change is enforced when its response arrives --------------------------

P1, P2, P3 = 8101, 8102, 8103


def test_each_change_is_enforced_when_its_response_arrives(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2, P3)):
        agent, api = start_agent(
            agent_factory,
            lab,
            tmp_path,
            [rule(1, "tcp", "allow", dst_port=P3, direction="ingress")],
            default="allow",
        )
        expect_ports(lab, {P1: True, P2: True, P3: True}, "before any change")
        gen = api.policies()["generation"]

        # POST a deny: the next connection is refused by the kernel.
        r = api.call("POST", "/policies", rule(10, "tcp", "deny", dst_port=P1))
        assert r.status == 201, str(r)
        expect_ports(lab, {P1: False}, "right after POST 201")
        assert r.headers["Location"] == f"{PREFIX}/policies/10"
        assert int(r.headers["X-Policy-Generation"]) == gen + 1
        expect_ports(lab, {P2: True, P3: True}, "after POST, other ports")

        # DELETE it: the very next connection passes.
        r = api.call("DELETE", "/policies/10")
        assert r.status == 200 and r.body["rule_id"] == 10, str(r)
        expect_ports(lab, {P1: True}, "right after DELETE")
        assert int(r.headers["X-Policy-Generation"]) == gen + 2

        # PUT one rule allow -> deny: a live connection is cut at its next exchange.
        api.ok("POST", "/policies", rule(20, "tcp", "allow", dst_port=P2, priority=200), 201)
        conns = {
            fam: TcpConn(lab.peer_ns, host(lab, fam), P2, timeout=POS_TIMEOUT) for fam in FAMILIES
        }
        try:
            for fam, conn in conns.items():
                assert conn.exchange(), f"{fam}: allowed connection does not work"
            r = api.call("PUT", "/policies/20", rule(20, "tcp", "deny", dst_port=P2, priority=200))
            assert r.status == 200 and r.body["action"] == "deny", str(r)
            cut = {fam: conn.exchange(NEG_TIMEOUT) for fam, conn in conns.items()}
            assert cut == {"v4": False, "v6": False}, f"live connections not cut: {cut}"
        finally:
            for conn in conns.values():
                conn.close()
        expect_ports(lab, {P2: False, P1: True}, "after PUT allow->deny")

        # PUT the whole set: default deny, only P1 allowed, at once.
        new_set = {
            "default_action": "deny",
            "policies": [rule(30, "tcp", "allow", dst_port=P1, direction="ingress")],
        }
        r = api.call("PUT", "/policies", new_set)
        assert r.status == 200, str(r)
        expect_ports(lab, {P1: True, P2: False, P3: False}, "right after PUT /policies")
        diff = r.body
        assert ids_of(diff["added"]) == {30} and ids_of(diff["removed"]) == {1, 20}, diff
        assert diff["default_action_changed"] is True and diff["dry_run"] is False
        listed = api.policies()
        assert ids_of(listed["policies"]) == {30} and listed["default_action"] == "deny"
        assert listed["generation"] == int(r.headers["X-Policy-Generation"]) == gen + 5
        assert agent.running


def test_dry_run_changes_nothing_and_counts_sessions(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    allow1 = rule(1, "tcp", "allow", dst_port=P1, direction="ingress")
    allow2 = rule(2, "tcp", "allow", dst_port=P2, direction="ingress")
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [allow1, allow2])
        before = api.policies()
        changes_log = agent.state_dir / "changes.log"
        log_before = changes_log.read_bytes() if changes_log.exists() else b""
        conns = {
            fam: TcpConn(lab.peer_ns, host(lab, fam), P1, timeout=POS_TIMEOUT) for fam in FAMILIES
        }
        try:
            for conn in conns.values():
                assert conn.exchange()
            # Each of these would deny the live connections to P1 (one per family).
            cutting: list[tuple[str, str, Any, Callable[[dict[str, Any]], bool]]] = [
                (
                    "POST",
                    "/policies?dry_run=1",
                    rule(40, "tcp", "deny", dst_port=P1, priority=200),
                    lambda d: ids_of(d["added"]) == {40} and not d["removed"],
                ),
                (
                    "PUT",
                    "/policies/1?dry_run=1",
                    {**allow1, "action": "deny"},
                    lambda d: [c["after"]["action"] for c in d["changed"]] == ["deny"],
                ),
                (
                    "DELETE",
                    "/policies/1?dry_run=1",
                    None,
                    lambda d: ids_of(d["removed"]) == {1} and not d["added"],
                ),
                (
                    "PUT",
                    "/policies?dry_run=1",
                    {"default_action": "deny", "policies": [allow2]},
                    lambda d: ids_of(d["removed"]) == {1},
                ),
            ]
            for method, path, body, diff_ok in cutting:
                r = api.call(method, path, body)
                assert r.status == 200, f"{method} {path}: {r}"
                d = r.body
                assert d["dry_run"] is True and diff_ok(d), f"{method} {path}: {d}"
                assert d["generation"] == before["generation"], d
                assert int(r.headers["X-Policy-Generation"]) == before["generation"]
                assert d["sessions_changing_verdict"] >= 2, f"{method} {path}: {d}"
                assert d["sessions_checked"] >= d["sessions_changing_verdict"]
                # Nothing applied: the live connections and new ones still pass.
                for fam, conn in conns.items():
                    assert conn.exchange(), f"{fam}: {method} {path} cut a live connection"
                expect_ports(lab, {P1: True, P2: True}, f"after {method} {path}")
                assert api.policies() == before, f"{method} {path} changed the set"
            # A change that touches no live session says so.
            r = api.call("POST", "/policies?dry_run=1", rule(41, "tcp", "deny", dst_port=9))
            assert r.status == 200 and r.body["sessions_changing_verdict"] == 0, str(r)
            # A dry run is checked like the real thing.
            assert_error(api.call("POST", "/policies?dry_run=1", allow1), 409, "conflict", "1")
            assert_error(api.call("DELETE", "/policies/77?dry_run=1"), 404, "not_found", "77")
        finally:
            for conn in conns.values():
                conn.close()
        assert api.policies() == before
        assert (changes_log.read_bytes() if changes_log.exists() else b"") == log_before
        assert agent.running


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


# ---- 3. 100 concurrent writes: API, disk and kernel agree ----------------------------------


def test_concurrent_writes_agree_everywhere(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    old = [rule(1000 + i, "tcp", "deny", dst_port=9000 + i) for i in range(50)]
    new = [rule(2000 + i, "tcp", "deny", dst_port=9100 + i) for i in range(50)]
    agent, api = start_agent(agent_factory, lab, tmp_path, old, default="allow")
    gen0 = api.policies()["generation"]

    async def hammer() -> list[tuple[str, int, int]]:
        writes: list[tuple[str, str, Any]] = [("POST", "/policies", r) for r in new]
        writes += [("DELETE", f"/policies/{r['rule_id']}", None) for r in old]
        random.Random(3).shuffle(writes)
        headers = {"Authorization": f"Bearer {api.token}"}
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(
            f"http://{agent.api}", headers=headers, timeout=timeout
        ) as session:

            async def one(method: str, path: str, body: Any) -> tuple[str, int, int]:
                async with session.request(method, PREFIX + path, json=body) as resp:
                    await resp.read()
                    return path, resp.status, int(resp.headers.get("X-Policy-Generation", -1))

            return await asyncio.gather(*(one(*w) for w in writes))

    results = asyncio.run(hammer())
    wrong = [x for x in results if x[1] not in (200, 201)]
    assert not wrong, wrong
    assert sorted(g for _, _, g in results) == list(range(gen0 + 1, gen0 + 101))

    listed = api.policies()
    gen = listed["generation"]
    assert gen == gen0 + 100 and listed["default_action"] == "allow"
    assert ids_of(listed["policies"]) == {r["rule_id"] for r in new}, listed

    # Disk: the state file holds exactly this set and generation.
    disk = json.loads((agent.state_dir / "policy.json").read_text())
    assert disk["generation"] == gen and disk["default_action"] == "allow"
    assert by_id(disk["policies"]) == by_id(listed["policies"])
    # Each write was logged once, with its generation.
    log_lines = [json.loads(x) for x in (agent.state_dir / "changes.log").read_text().splitlines()]
    assert sorted(x["generation"] for x in log_lines[-100:]) == list(range(gen0 + 1, gen + 1))
    # Kernel: it enforces that generation, and traffic follows the set.
    st = api.ok("GET", "/status")
    assert st["data_plane"]["status"] == "running", st
    assert st["data_plane"]["generation"] == gen == st["policy_generation"]
    sample_old, sample_new = [9000, 9013, 9049], [9100, 9127, 9149]
    with echo_server(lab.host_ns, sample_old + sample_new):
        expect_ports(
            lab,
            {**dict.fromkeys(sample_old, True), **dict.fromkeys(sample_new, False)},
            "after 100 concurrent writes",
        )
    assert agent.running


# ---- 4. kill -9 during a bulk replace: the old set or the new one, whole --------------------

BULK_RULES = 50_000
PA, PB = 8201, 8202
KILL_ROUNDS = 3  # random delays; two more kills land on the store's two steps


def bulk_set(n: int) -> dict[str, Any]:
    """Set B: default deny, `n` rules no lab packet matches, and one that allows PA."""
    fill = [
        {
            "rule_id": 100_000 + i,
            "protocol": "tcp",
            "action": "allow",
            "src_ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            "dst_port": 80,
        }
        for i in range(n)
    ]
    return {
        "default_action": "deny",
        "policies": [*fill, rule(1, "tcp", "allow", dst_port=PA, direction="ingress")],
    }


class BackgroundRequest(threading.Thread):
    """One request in a thread; `reply` or `error` once it ends (the agent may die under it)."""

    def __init__(self, api: Api, method: str, path: str, raw: bytes) -> None:
        super().__init__(name="background-request", daemon=True)
        self.api, self.method, self.path, self.raw = api, method, path, raw
        self.reply: Reply | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.reply = self.api.call(self.method, self.path, raw=self.raw, timeout=60)
        except Exception as e:  # the connection dies with the agent
            self.error = e


def test_kill9_during_bulk_replace_leaves_old_or_new_set_whole(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    seed = int(os.environ.get("MICROSEG_KILL_SEED", str(time.time_ns() % 2**31)))
    rng = random.Random(seed)
    set_a: dict[str, Any] = {
        "default_action": "allow",
        "policies": [rule(2, "tcp", "deny", dst_port=PA), rule(3, "udp", "allow", dst_port=53)],
    }
    set_b = bulk_set(BULK_RULES)
    sets = {"A": set_a, "B": set_b}
    traffic = {"A": {PA: False, PB: True}, "B": {PA: True, PB: False}}
    b_body = json.dumps(set_b).encode()
    with echo_server(lab.host_ns, (PA, PB)):
        agent, api = start_agent(agent_factory, lab, tmp_path, set_a["policies"], default="allow")
        expect_ports(lab, traffic["A"], "set A")
        # How long a whole PUT of B takes here: the kills land within that.
        t0 = time.monotonic()
        r = api.call("PUT", "/policies", raw=b_body)
        duration = time.monotonic() - t0
        assert r.status == 200, str(r)
        expect_ports(lab, traffic["B"], "set B")
        api.ok("PUT", "/policies", set_a)
        n_b = len(set_b["policies"])
        applied_b = rf"policy generation \d+ applied: {n_b} rules"
        saved_b = rf"replace set \({n_b} rules\)"
        # One random delay in each third of the PUT (early, middle, late), then two kills at
        # the riskiest moments: the kernel enforces B but the disk may not have it yet, and the
        # disk has B but the client has no answer yet.
        triggers: list[float | str] = [
            duration * (i + rng.random()) / KILL_ROUNDS for i in range(KILL_ROUNDS)
        ]
        triggers += [applied_b, saved_b]
        outcomes: list[str] = []
        for i, trigger in enumerate(triggers, 1):
            when = f"after {trigger:.3f} s" if isinstance(trigger, float) else f"at {trigger!r}"
            note = (
                f"kill -9 round {i}: {when} of a {duration:.3f} s PUT of {n_b:,} rules"
                f" (MICROSEG_KILL_SEED={seed})"
            )
            print(note)
            mark = agent.log_mark()
            request = BackgroundRequest(api, "PUT", "/policies", b_body)
            request.start()
            if isinstance(trigger, float):
                time.sleep(trigger)
            else:
                agent.wait_log(trigger, after=mark, timeout=60)
            agent.kill9()
            request.join(30)
            assert not request.is_alive(), note
            agent.start()
            agent.wait_api()
            killed_log = "\n".join(agent.previous_logs[-1].splitlines()[mark:])
            listed = api.policies()
            which = next(
                (
                    name
                    for name, s in sets.items()
                    if ids_of(listed["policies"]) == ids_of(s["policies"])
                    and listed["default_action"] == s["default_action"]
                ),
                None,
            )
            assert which is not None, (
                f"{note}: torn set after restart: {listed['count']} rules, default "
                f"{listed['default_action']}\n{agent.log[-3000:]}"
            )
            disk = json.loads((agent.state_dir / "policy.json").read_text())
            assert disk["generation"] == listed["generation"], note
            assert ids_of(disk["policies"]) == ids_of(listed["policies"]), note
            assert disk["default_action"] == listed["default_action"], note
            st = api.ok("GET", "/status")
            assert st["data_plane"]["status"] == "running", f"{note}: {st}"
            assert st["data_plane"]["generation"] == listed["generation"], f"{note}: {st}"
            expect_ports(lab, traffic[which], f"{note}: restored set {which}")
            answered = request.reply is not None and request.reply.status == 200
            kernel_had_b = re.search(applied_b, killed_log) is not None
            disk_had_b = re.search(saved_b, killed_log) is not None
            print(
                f"  -> restored set {which} (before the kill: kernel had B {kernel_had_b}, "
                f"saved {disk_had_b}, answered {answered})"
            )
            # The store saves B only after the kernel enforces it, and answers after saving.
            if answered or disk_had_b:
                assert which == "B", f"{note}: B was saved, yet A came back\n{killed_log}"
            if not kernel_had_b:
                assert which == "A", f"{note}: B came back though never applied\n{killed_log}"
            outcomes.append(which)
            if which == "B":
                api.ok("PUT", "/policies", set_a)
        print(f"kill -9 outcomes: {outcomes}")
        assert agent.stop() == 0


# ---- 5. a restart restores every rule and its generation ----------------------------------


def test_restart_restores_rules_and_generation(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, (P1, P2, P3)):
        agent, api = start_agent(
            agent_factory, lab, tmp_path, [rule(1, "tcp", "deny", dst_port=P1)], default="allow"
        )
        gen0 = api.policies()["generation"]
        api.ok("POST", "/policies", rule(2, "tcp", "deny", dst_port=P2), 201)
        api.ok("POST", "/policies", rule(3, "tcp", "deny", dst_port=P3, priority=300), 201)
        api.ok(
            "PUT",
            "/policies/2",
            {
                **rule(2, "tcp", "allow", dst_port=P2),
                "priority": 150,
                "name": "web-2",
                "direction": "ingress",
            },
        )
        api.ok(
            "POST",
            "/policies",
            rule(4, "udp", "allow", dst_port=53, src_ip=f"{lab.peer_v6}/128"),
            201,
        )
        api.ok("DELETE", "/policies/4")
        before = api.policies()
        gen = before["generation"]
        assert gen == gen0 + 5 and ids_of(before["policies"]) == {1, 2, 3}
        want = {P1: False, P2: True, P3: False}
        expect_ports(lab, want, "before the restart")
        # The policy file changes meanwhile: only SIGHUP or `policy load` apply it, never a start.
        write_policy(agent.policy_file, [rule(9, "tcp", "allow", dst_port=P3)], "allow")

        assert agent.stop() == 0
        expect_ports(lab, {P1: True, P3: True}, "after a clean exit (detached)")
        agent.start()
        agent.wait_api()
        agent.wait_log(rf"restoring 3 rules at generation {gen}\b", timeout=1)
        assert api.policies() == before
        st = api.ok("GET", "/status")
        assert st["policy_generation"] == gen and st["policy_count"] == 3, st
        assert st["data_plane"]["generation"] == gen and st["data_plane"]["status"] == "running"
        expect_ports(lab, want, "after the restart")
        # The next change goes on from the restored generation.
        r = api.call("DELETE", "/policies/3")
        assert r.status == 200 and int(r.headers["X-Policy-Generation"]) == gen + 1, str(r)
        expect_ports(lab, {P3: True}, "after a change following the restart")
        assert agent.stop() == 0


# ---- 6. the CLI against the real agent ----------------------------------------------------


def cli(
    agent: AgentProcess,
    *args: str,
    api: str | None = None,
    state_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`microseg ARGS --api .. --state-dir ..` (the agent's by default), output captured."""
    argv = [
        sys.executable,
        "-m",
        "streamer",
        *args,
        "--api",
        api or str(agent.api),
        "--state-dir",
        str(state_dir or agent.state_dir),
    ]
    environ = {k: v for k, v in os.environ.items() if k != "MICROSEG_TOKEN"}
    environ.update(env or {})
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=ROOT, env=environ, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_json(agent: AgentProcess, *args: str) -> Any:
    p = cli(agent, *args, "-o", "json")
    assert p.returncode == 0, f"{args}: exit {p.returncode}: {p.stderr}"
    return json.loads(p.stdout)


def cli_fails(p: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert p.returncode == status, f"exit {p.returncode}: {p.stdout}{p.stderr}"
    assert p.stderr.startswith("microseg: ") or status == 2, p.stderr
    for w in words:
        assert w.lower() in p.stderr.lower(), f"{w!r} not in: {p.stderr}"


def test_cli_against_real_agent(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    sock = tmp_path / "api.sock"
    web = rule(1, "tcp", "allow", dst_port=P1, direction="ingress")
    with echo_server(lab.host_ns, (P1, P2, P3)):
        agent, api = start_agent(agent_factory, lab, tmp_path, [web], unix=sock)
        gen0 = api.policies()["generation"]

        data = cli_json(agent, "policy", "list")
        assert ids_of(data["policies"]) == {1} and data["generation"] == gen0
        p = cli(agent, "policy", "list")
        assert p.returncode == 0 and p.stdout.split()[:2] == ["ID", "NAME"], p.stdout
        assert f"1 rule, default action deny, generation {gen0}" in p.stdout

        # add: enforced when the command returns
        added = cli_json(
            agent,
            "policy",
            "add",
            "--rule-id",
            "10",
            "--protocol",
            "tcp",
            "--action",
            "allow",
            "--dst-port",
            str(P2),
            "--direction",
            "ingress",
            "--name",
            "cli-web",
        )
        expect_ports(lab, {P2: True}, "after `policy add`")
        assert added["rule_id"] == 10 and added["name"] == "cli-web", added
        got = cli_json(agent, "policy", "get", "10")
        assert got["action"] == "allow" and got["packets"] >= 2 and got["last_hit"], got
        p = cli(agent, "policy", "get", "10")
        assert p.returncode == 0 and "cli-web" in p.stdout and "packets" in p.stdout

        p = cli(agent, "policy", "update", "10", "--action", "deny")
        expect_ports(lab, {P2: False, P1: True}, "after `policy update`")
        assert p.returncode == 0 and "updated rule 10" in p.stdout, p.stdout + p.stderr
        assert cli_json(agent, "policy", "get", "10")["action"] == "deny"

        # The API's refusals, printed, exit 1; bad arguments exit 2.
        cli_fails(
            cli(
                agent,
                "policy",
                "add",
                "--rule-id",
                "11",
                "--protocol",
                "icmp",
                "--action",
                "allow",
                "--dst-port",
                "22",
            ),
            1,
            "port",
            "HTTP 400",
        )
        cli_fails(
            cli(agent, "policy", "add", "--rule-id", "10", "--protocol", "tcp", "--action", "deny"),
            1,
            "already exists",
            "HTTP 409",
        )
        cli_fails(cli(agent, "policy", "get", "777"), 1, "777", "HTTP 404")
        cli_fails(cli(agent, "policy", "get", "abc"), 2, "rule_id")
        cli_fails(cli(agent, "policy", "add", "--rule-id", "12"), 2, "--protocol", "--action")

        deleted = cli_json(agent, "policy", "delete", "10")
        assert deleted["rule_id"] == 10
        cli_fails(cli(agent, "policy", "delete", "10"), 1, "no rule with rule_id 10", "HTTP 404")

        # apply: a whole set from a file, dry run first
        f = tmp_path / "apply.json"
        write_policy(f, [web, rule(20, "tcp", "allow", dst_port=P3, direction="ingress")])
        p = cli(agent, "policy", "apply", str(f), "--dry-run")
        assert p.returncode == 0 and "nothing was applied" in p.stdout, p.stdout + p.stderr
        assert "+ 20" in p.stdout
        expect_ports(lab, {P3: False}, "after `policy apply --dry-run`")
        p = cli(agent, "policy", "apply", str(f))
        expect_ports(lab, {P3: True}, "after `policy apply`")
        assert p.returncode == 0 and "applied: now generation" in p.stdout, p.stdout + p.stderr

        # load: the agent re-reads its own policy file
        write_policy(
            agent.policy_file, [web, rule(30, "tcp", "allow", dst_port=P2, direction="ingress")]
        )
        diff = cli_json(agent, "policy", "load")
        expect_ports(lab, {P2: True, P3: False}, "after `policy load`")
        assert ids_of(diff["added"]) == {30} and ids_of(diff["removed"]) == {20}, diff

        with TcpConn(lab.peer_ns, lab.host_v4, P2, timeout=POS_TIMEOUT) as conn:
            assert conn.exchange()
            sport = conn.sock.getsockname()[1]
            ses = cli_json(agent, "session", "list", "--port", str(sport), "--protocol", "tcp")
            assert ses["count"] == 1, ses
            s = ses["sessions"][0]
            assert (s["dst_port"], s["verdict"], s["rule_id"]) == (P2, "allow", 30), s
            p = cli(agent, "session", "list", "--port", str(sport))
            assert p.returncode == 0 and f"{lab.peer_v4}:{sport}" in p.stdout, p.stdout
            assert "1 session" in p.stdout

        stats = cli_json(agent, "stats")
        assert stats["total_packets"] > 0 and stats["denied_packets"] > 0, stats
        assert "allow_rate" in cli_json(agent, "stats", "--packets")
        p = cli(agent, "stats", "--policies")
        assert p.returncode == 0 and "hit_rate" in p.stdout and "%" in p.stdout, p.stdout

        # The Unix socket needs no token; a wrong token or no agent: exit 1 with the reason.
        nowhere = tmp_path / "no-state"
        p = cli(agent, "policy", "list", "-o", "json", api=f"unix:{sock}", state_dir=nowhere)
        assert p.returncode == 0, p.stderr
        assert ids_of(json.loads(p.stdout)["policies"]) == {1, 30}
        cli_fails(
            cli(agent, "policy", "list", env={"MICROSEG_TOKEN": "wrong"}),
            1,
            "wrong token",
            "HTTP 401",
        )
        cli_fails(
            cli(agent, "policy", "list", state_dir=nowhere),
            1,
            "HTTP 401",
            str(nowhere / "api-token"),
        )
        cli_fails(cli(agent, "stats", api=f"127.0.0.1:{free_port()}"), 1, "not reachable")


# ---- 7. a bad policy file, on SIGHUP or `policy load`, keeps the set ------------------------


def test_bad_policy_file_keeps_the_set(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    good = [rule(1, "tcp", "allow", dst_port=P1, direction="ingress")]
    with echo_server(lab.host_ns, (P1, P2)):
        agent, api = start_agent(agent_factory, lab, tmp_path, good)
        before = api.policies()
        gen0 = before["generation"]
        policy = agent.policy_file
        also = rule(2, "tcp", "allow", dst_port=P2, direction="ingress")
        bad: dict[str, tuple[Callable[[], object], list[str]]] = {
            # A valid rule next to an invalid one: the valid one must not be applied either.
            "invalid rule": (
                lambda: write_policy(policy, [*good, also, rule(3, "icmp", "allow", dst_port=5)]),
                ["port", "icmp"],
            ),
            "duplicate rule_id": (
                lambda: write_policy(policy, [*good, also, {**also, "name": "x"}]),
                ["rule_id", "2"],
            ),
            "bad default": (
                lambda: write_policy(policy, [*good, also], "maybe"),
                ["default_action"],
            ),
            "not JSON": (lambda: policy.write_text('{"policies": [ {"rule_id": 2,'), [policy.name]),
            "missing file": (lambda: policy.unlink(), [policy.name]),
        }
        for what, (make_bad, words) in bad.items():
            make_bad()
            line = agent.reload(expect_applied=False)
            assert f"generation {gen0} stays" in line, f"{what}: {line}"
            assert_error(api.call("POST", "/policies/reload"), 400, "invalid", *words)
            cli_fails(cli(agent, "policy", "load"), 1, "HTTP 400", *words)
            assert api.policies() == before, what
            expect_ports(lab, {P1: True, P2: False}, f"after a {what} reload")
        write_policy(policy, [*good, also])
        p = cli(agent, "policy", "load")
        expect_ports(lab, {P1: True, P2: True}, "after a good `policy load`")
        assert p.returncode == 0 and "reloaded the agent's policy file" in p.stdout, p.stderr
        assert api.policies()["generation"] == gen0 + 1
        assert agent.stop() == 0
