"""HTTP to a running agent's admin API (`microseg run` as a subprocess, support/agentproc.py).

`Api` sends synchronous requests over TCP (`addr` HOST:PORT) or the Unix socket (`unix`), with
the agent's token unless a call says otherwise; paths are under /api/v1 except /metrics, and
`send` takes a path as it is (the viewer's pages). A `Reply` is whatever came back, any
status, never followed. `api_of(agent)` is the client for an agent's TCP API and
`request(url)` one request to any URL an agent serves; `api_stats` and `api_metrics` read an
agent's stats and metrics; `start_agent` starts an agent enforcing some rules and gives its
client. `ids_of`, `by_id` and `assert_error` read replies.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from streamer.lab.lab import Lab
from support.agentproc import AgentFactory, AgentProcess, free_port, write_policy

PREFIX = "/api/v1"
# The ports of the host's echo servers that the control-plane tests open and close by policy.
P1, P2, P3 = 8101, 8102, 8103


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
        return self.send(method, url, data, hdrs, timeout)

    def send(
        self,
        method: str,
        target: str,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> Reply:
        """One request for `target` (path and query, as it is), whatever it answers."""
        conn = self._connection(timeout)
        try:
            conn.request(method, target, body=data, headers=dict(headers or {}))
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


def request(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """One request to any URL an agent serves (its token only if `headers` has it): (status,
    body text), whatever the status."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    r = Api(parts.netloc).send(method, target, headers=headers, timeout=10)
    return r.status, r.raw.decode()


def api_stats(agent: AgentProcess) -> dict[str, Any]:
    """GET /api/v1/stats of the agent, with its token; it must answer 200."""
    out: dict[str, Any] = api_of(agent).ok("GET", "/stats")
    return out


def api_metrics(agent: AgentProcess) -> str:
    """GET /metrics of the agent (the Prometheus text), with its token; it must answer 200."""
    r = api_of(agent).get("/metrics")
    assert r.status == 200, str(r)
    return r.raw.decode()


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
    **agent_kwargs: Any,
) -> tuple[AgentProcess, Api]:
    """An agent enforcing `rules` from a fresh policy file, its API on a free loopback port
    (and on `unix`, if given), ready to answer; and an Api client with its token.
    `agent_kwargs` go to the AgentProcess (`extra_args` after the flags above)."""
    extra: list[str] = []
    if unix is not None:
        extra += ["--api", f"unix:{unix}"]
    if no_auth:
        extra.append("--no-auth")
    policy = write_policy(tmp_path / name, rules, default)
    extra += agent_kwargs.pop("extra_args", ())
    agent = agent_factory(
        lab, policy, api=f"127.0.0.1:{free_port()}", extra_args=extra, **agent_kwargs
    )
    agent.start()
    agent.wait_api()
    return agent, api_of(agent)
