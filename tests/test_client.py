"""Unit tests of the API clients (streamer/cli/: `policy`, `sessions`, `stats` and the modules
they use) against a stub admin API.

The stub is a small real aiohttp server defined here (in-memory rules, canned sessions and
stats, SPEC §3 shapes and error bodies), served on 127.0.0.1 and on a Unix socket from a
background thread; every request it gets is recorded. The client commands run as `microseg`
would run them (argv -> parser -> `args.func(args)`), with stdout/stderr captured.
End-to-end tests against the real agent live elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import pathlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from streamer.cli import connection, policy
from streamer.cli.connection import TOKEN_ENV
from streamer.cli.endpoint import parse_api_address
from streamer.cli.errors import ClientError
from streamer.cli.main import build_parser
from streamer.cli.output import format_table, render_diff

TOKEN = "s3cret-token"
RULE_DEFAULTS: dict[str, Any] = {
    "name": "",
    "src_ip": "any",
    "dst_ip": "any",
    "src_port": 0,
    "dst_port": 0,
    "priority": 100,
    "direction": "any",
}
RULE_KEYS = {"rule_id", "protocol", "action", *RULE_DEFAULTS}

SEED_RULES: list[dict[str, Any]] = [
    {
        "rule_id": 1001,
        "name": "https-to-web",
        "src_ip": "0.0.0.0/0",
        "dst_ip": "10.0.0.5",
        "src_port": 0,
        "dst_port": 443,
        "protocol": "tcp",
        "action": "allow",
        "priority": 100,
        "direction": "any",
    },
    {
        "rule_id": 1002,
        "name": "no-ssh",
        "src_ip": "any",
        "dst_ip": "any",
        "src_port": 0,
        "dst_port": 22,
        "protocol": "tcp",
        "action": "deny",
        "priority": 200,
        "direction": "ingress",
    },
    {
        "rule_id": 1003,
        "name": "",
        "src_ip": "any",
        "dst_ip": "198.18.0.0/15",
        "src_port": 0,
        "dst_port": "80-443",
        "protocol": "tcp",
        "action": "allow",
        "priority": 100,
        "direction": "any",
    },
]

SESSIONS: list[dict[str, Any]] = [
    {
        "src_ip": "10.0.0.7",
        "dst_ip": "10.0.0.5",
        "src_port": 51234,
        "dst_port": 443,
        "protocol": "tcp",
        "direction": "egress",
        "verdict": "allow",
        "rule_id": 1001,
        "packets_out": 12,
        "bytes_out": 3400,
        "packets_in": 10,
        "bytes_in": 120000,
        "state": "established",
    },
    {
        "src_ip": "fd6d:7365:67::1",
        "dst_ip": "fd6d:7365:67::2",
        "src_port": 40000,
        "dst_port": 22,
        "protocol": "tcp",
        "direction": "ingress",
        "verdict": "deny",
        "rule_id": 1002,
        "packets_out": 1,
        "bytes_out": 80,
        "packets_in": 0,
        "bytes_in": 0,
    },
    {
        "src_ip": "10.0.0.7",
        "dst_ip": "10.0.0.9",
        "src_port": 0,
        "dst_port": 0,
        "protocol": "icmp",
        "direction": "egress",
        "verdict": "allow",
        "rule_id": None,
        "packets_out": 3,
        "bytes_out": 252,
        "packets_in": 3,
        "bytes_in": 252,
    },
]

STATS: dict[str, Any] = {
    "total_packets": 1000,
    "allowed_packets": 900,
    "denied_packets": 100,
    "new_sessions": 40,
    "closed_sessions": 10,
    "active_sessions": 30,
    "policy_hits": 950,
    "policy_misses": 50,
    "events": {"emitted": 70, "lost": 0},
}


@dataclass
class Seen:
    """One request the stub received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


@dataclass
class Stub:
    """The in-memory state behind the stub API, and what it saw."""

    rules: dict[int, dict[str, Any]] = field(
        default_factory=lambda: {r["rule_id"]: dict(r) for r in SEED_RULES}
    )
    default_action: str = "deny"
    generation: int = 7
    requests: list[Seen] = field(default_factory=list)
    delay: float = 0.0
    tcp_port: int = 0
    unix_path: str | None = None

    # ---- helpers

    def listing(self) -> dict[str, Any]:
        rules = [self.rules[k] for k in sorted(self.rules)]
        return {
            "policies": rules,
            "count": len(rules),
            "default_action": self.default_action,
            "generation": self.generation,
        }

    def diff(
        self, new_rules: dict[int, dict[str, Any]], new_default: str, dry: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dry_run": dry,
            "generation": self.generation,
            "added": [r for k, r in sorted(new_rules.items()) if k not in self.rules],
            "removed": [r for k, r in sorted(self.rules.items()) if k not in new_rules],
            "changed": [
                {"before": self.rules[k], "after": r}
                for k, r in sorted(new_rules.items())
                if k in self.rules and self.rules[k] != r
            ],
            "default_action_changed": new_default != self.default_action,
        }
        if dry:
            out["sessions_checked"] = len(SESSIONS)
            out["sessions_changing_verdict"] = 1
        return out


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def full_rule(body: Any) -> dict[str, Any] | web.Response:
    """A complete rule from a request body, or the 400 the real API would give."""
    if not isinstance(body, dict):
        return error(400, "invalid", "expected a rule object")
    unknown = sorted(set(body) - RULE_KEYS)
    if unknown:
        return error(400, "invalid", f"{unknown[0]}: unknown field")
    for required in ("rule_id", "protocol", "action"):
        if required not in body:
            return error(400, "invalid", f"{required}: required field is missing")
    if body["protocol"] not in ("tcp", "udp", "icmp", "icmpv6", "any"):
        return error(400, "invalid", f"protocol: {body['protocol']!r} is not one of: tcp, udp")
    return {**RULE_DEFAULTS, **body}


def make_app(stub: Stub) -> web.Application:
    @web.middleware
    async def record_and_auth(request: web.Request, handler: Any) -> web.StreamResponse:
        raw = await request.read()
        stub.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                json.loads(raw) if raw else None,
            )
        )
        if stub.delay:
            await asyncio.sleep(stub.delay)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return error(401, "unauthorized", "missing or wrong API token")
        if raw and request.content_type != "application/json":
            return error(415, "unsupported_media_type", "send JSON")
        response: web.StreamResponse = await handler(request)
        return response

    def dry(request: web.Request) -> bool:
        return request.query.get("dry_run") in ("1", "true")

    async def list_policies(request: web.Request) -> web.Response:
        return web.json_response(stub.listing())

    async def add_policy(request: web.Request) -> web.Response:
        rule = full_rule(await request.json())
        if isinstance(rule, web.Response):
            return rule
        if rule["rule_id"] in stub.rules:
            return error(409, "duplicate", f"rule_id {rule['rule_id']} already exists")
        if dry(request):
            new = {**stub.rules, rule["rule_id"]: rule}
            return web.json_response(stub.diff(new, stub.default_action, True))
        stub.rules[rule["rule_id"]] = rule
        stub.generation += 1
        return web.json_response(rule, status=201)

    async def replace_policies(request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("policies"), list):
            return error(400, "invalid", "policies: required field is missing")
        new: dict[int, dict[str, Any]] = {}
        for index, item in enumerate(body["policies"]):
            rule = full_rule(item)
            if isinstance(rule, web.Response):
                return rule
            if rule["rule_id"] in new:
                return error(400, "invalid", f"policies[{index}]: rule_id: duplicate")
            new[rule["rule_id"]] = rule
        default = body.get("default_action", "allow")
        result = stub.diff(new, default, dry(request))
        if not dry(request):
            stub.rules, stub.default_action = new, default
            stub.generation += 1
            result["generation"] = stub.generation
        return web.json_response(result)

    async def reload_policies(request: web.Request) -> web.Response:
        new = {k: v for k, v in stub.rules.items() if k != 1003}
        result = stub.diff(new, stub.default_action, False)
        stub.rules = new
        stub.generation += 1
        result["generation"] = stub.generation
        return web.json_response(result)

    def lookup(request: web.Request) -> int | web.Response:
        text = request.match_info["rule_id"]
        if not text.isdigit():
            return error(400, "invalid", f"rule_id: {text!r} is not an int")
        rule_id = int(text)
        if rule_id == 666:  # a proxy in the way: plain-text error page
            return web.Response(status=502, text="Bad Gateway\nupstream went away")
        if rule_id not in stub.rules:
            return error(404, "not_found", f"no rule with rule_id {rule_id}")
        return rule_id

    async def get_policy(request: web.Request) -> web.Response:
        found = lookup(request)
        if isinstance(found, web.Response):
            return found
        hits = {
            "packets": 42,
            "bytes": 4200,
            "last_hit": None if found == 1003 else "2026-11-22T10:01:02Z",
        }
        return web.json_response({**stub.rules[found], **hits})

    async def put_policy(request: web.Request) -> web.Response:
        found = lookup(request)
        if isinstance(found, web.Response):
            return found
        rule = full_rule(await request.json())
        if isinstance(rule, web.Response):
            return rule
        if rule["rule_id"] != found:
            return error(400, "invalid", "rule_id: does not match the path")
        if dry(request):
            new = {**stub.rules, found: rule}
            return web.json_response(stub.diff(new, stub.default_action, True))
        stub.rules[found] = rule
        stub.generation += 1
        return web.json_response(rule)

    async def delete_policy(request: web.Request) -> web.Response:
        found = lookup(request)
        if isinstance(found, web.Response):
            return found
        if dry(request):
            new = {k: v for k, v in stub.rules.items() if k != found}
            return web.json_response(stub.diff(new, stub.default_action, True))
        del stub.rules[found]
        stub.generation += 1
        return web.Response(status=204)

    async def sessions(request: web.Request) -> web.Response:
        q = request.query
        found = [
            s
            for s in SESSIONS
            if ("ip" not in q or q["ip"] in (s["src_ip"], s["dst_ip"]))
            and ("port" not in q or int(q["port"]) in (s["src_port"], s["dst_port"]))
            and ("protocol" not in q or q["protocol"] == s["protocol"])
            and ("verdict" not in q or q["verdict"] == s["verdict"])
        ]
        limit = int(q.get("limit", "1000"))
        return web.json_response(
            {
                "sessions": found[:limit],
                "count": len(found[:limit]),
                "truncated": len(found) > limit,
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(STATS)

    async def stats_packets(request: web.Request) -> web.Response:
        return web.json_response({**STATS, "allow_rate": 90.0, "deny_rate": 10.0})

    async def stats_policies(request: web.Request) -> web.Response:
        return web.json_response({"policy_hits": 950, "policy_misses": 50, "hit_rate": 95.0})

    app = web.Application(middlewares=[record_and_auth])
    p = "/api/v1"
    app.router.add_get(f"{p}/policies", list_policies)
    app.router.add_post(f"{p}/policies", add_policy)
    app.router.add_put(f"{p}/policies", replace_policies)
    app.router.add_post(f"{p}/policies/reload", reload_policies)
    app.router.add_get(f"{p}/policies/{{rule_id}}", get_policy)
    app.router.add_put(f"{p}/policies/{{rule_id}}", put_policy)
    app.router.add_delete(f"{p}/policies/{{rule_id}}", delete_policy)
    app.router.add_get(f"{p}/sessions", sessions)
    app.router.add_get(f"{p}/stats", stats)
    app.router.add_get(f"{p}/stats/packets", stats_packets)
    app.router.add_get(f"{p}/stats/policies", stats_policies)
    return app


class ServerThread:
    """The stub app on 127.0.0.1:<free port> and a Unix socket, in its own loop and thread."""

    def __init__(self, stub: Stub, unix_path: Path) -> None:
        self.stub = stub
        self.unix_path = unix_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    async def _start(self) -> None:
        self.runner = web.AppRunner(make_app(self.stub), shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        await web.UnixSite(self.runner, str(self.unix_path)).start()
        for address in self.runner.addresses:
            if isinstance(address, tuple):
                self.stub.tcp_port = address[1]
        self.stub.unix_path = str(self.unix_path)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Stub]:
    the_stub = Stub()
    server = ServerThread(the_stub, tmp_path / "api.sock")
    try:
        server.start()
        yield the_stub
    finally:
        server.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    (d / "api-token").write_text(TOKEN + "\n")
    (d / "api-token").chmod(0o600)
    return d


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


Result = tuple[int, str, str]
Cli = Callable[..., Result]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    """run(*argv) -> (exit status, stdout, stderr); argparse exits become the status."""

    def go(*argv: str) -> Result:
        parser = build_parser()
        try:
            args = parser.parse_args(list(argv))
            rc = args.func(args)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return rc, out, err

    return go


@pytest.fixture
def cli(run: Cli, stub: Stub, state_dir: Path) -> Cli:
    """run() with --api and --state-dir pointing at the stub."""

    def go(*argv: str) -> Result:
        return run(*argv, "--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(state_dir))

    return go


def last(stub: Stub) -> Seen:
    return stub.requests[-1]


def column_starts(header: str) -> list[int]:
    return [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "url", "unix"),
    [
        ("127.0.0.1:8080", "http://127.0.0.1:8080", None),
        ("localhost", "http://localhost:8080", None),
        ("[::1]:9000", "http://[::1]:9000", None),
        ("::1", "http://[::1]:8080", None),
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081", None),
        ("http://127.0.0.1:8081/api/v1/", "http://127.0.0.1:8081", None),
        ("https://agent.example:8443/proxy", "https://agent.example:8443/proxy", None),
        ("unix:/run/microseg/api.sock", "http://localhost", "/run/microseg/api.sock"),
        ("unix:///run/microseg/api.sock", "http://localhost", "/run/microseg/api.sock"),
    ],
)
def test_parse_api_address(text: str, url: str, unix: str | None) -> None:
    endpoint = parse_api_address(text)
    assert str(endpoint.base_url) == url
    assert endpoint.unix_path == unix
    assert endpoint.display == text


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty address"),
        ("127.0.0.1:0", "port must be 1..65535"),
        ("127.0.0.1:http", "port must be 1..65535"),
        ("host:99999", "port must be 1..65535"),
        ("unix:relative.sock", "absolute path"),
        ("ftp://host:21", "only http:// and https://"),
        ("[::1", "is not an address"),
        ("a b:80", "is not an address"),
    ],
)
def test_parse_api_address_rejects(text: str, says: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse_api_address(text)


def test_bad_api_flag_is_a_usage_error(run: Cli) -> None:
    rc, out, err = run("policy", "list", "--api", "unix:nope")
    assert (rc, out) == (2, "")
    assert "--api" in err and "absolute path" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- policy list / get


def test_policy_list_table(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "list")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == [
        "ID",
        "NAME",
        "SRC",
        "SPORT",
        "DST",
        "DPORT",
        "PROTO",
        "ACTION",
        "PRIO",
        "DIR",
    ]
    assert lines[-1] == "3 rules, default action deny, generation 7"
    rows = lines[1:-1]
    assert [r.split()[0] for r in rows] == ["1001", "1002", "1003"]
    # Aligned: text columns start where their header does, numbers (ID, PRIO) end there.
    starts = column_starts(header)
    for row in rows:
        for index, start in enumerate(starts):
            if index in (0, 8):
                end = start + len(header.split()[index])
                assert row[end - 1] != " " and row[end] == " ", (row, index)
            else:
                assert row[start - 1] == " " and row[start] != " ", (row, index)
    assert rows[0].split() == [
        "1001",
        "https-to-web",
        "0.0.0.0/0",
        "any",
        "10.0.0.5",
        "443",
        "tcp",
        "allow",
        "100",
        "any",
    ]
    assert rows[2].split()[1] == "-"  # empty name
    assert rows[2].split()[5] == "80-443"
    assert not any(line != line.rstrip() for line in lines)
    seen = last(stub)
    assert (seen.method, seen.path) == ("GET", "/api/v1/policies")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["Host"] == f"127.0.0.1:{stub.tcp_port}"
    assert "Origin" not in seen.headers


def test_policy_list_json_is_the_api_answer(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "list", "-o", "json")
    assert (rc, err) == (0, "")
    assert json.loads(out) == stub.listing()
    assert out.startswith("{\n  ")  # pretty


def test_policy_list_empty(cli: Cli, stub: Stub) -> None:
    stub.rules.clear()
    rc, out, _ = cli("policy", "list")
    assert rc == 0
    assert out == "0 rules, default action deny, generation 7\n"


def test_policy_get_shows_counters(cli: Cli) -> None:
    rc, out, err = cli("policy", "get", "1001")
    assert (rc, err) == (0, "")
    pairs = dict(line.split(None, 1) for line in out.splitlines())
    assert pairs["rule_id"] == "1001"
    assert pairs["dst_port"] == "443"
    assert pairs["packets"] == "42"
    assert pairs["bytes"] == "4200"
    assert pairs["last_hit"] == "2026-11-22T10:01:02Z"
    assert list(pairs)[:3] == ["rule_id", "name", "src_ip"]
    rc, out, _ = cli("policy", "get", "1003")
    pairs = dict(line.split(None, 1) for line in out.splitlines())
    assert pairs["last_hit"] == "never"
    assert pairs["name"] == '""'
    assert len({line.index(line.split()[1]) for line in out.splitlines()}) == 1  # aligned


def test_policy_get_json(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli("policy", "get", "1002", "-o", "json")
    assert rc == 0
    assert json.loads(out) == {
        **stub.rules[1002],
        "packets": 42,
        "bytes": 4200,
        "last_hit": "2026-11-22T10:01:02Z",
    }


def test_policy_get_unknown_rule(cli: Cli) -> None:
    rc, out, err = cli("policy", "get", "7")
    assert rc == 1
    assert out == ""
    assert err == "microseg: no rule with rule_id 7 (HTTP 404 not_found)\n"


@pytest.mark.parametrize("bad", ["0", "-1", "abc", str(2**32)])
def test_policy_get_bad_rule_id_is_a_usage_error(run: Cli, bad: str) -> None:
    rc, _, err = (
        run("policy", "get", "--", bad) if bad.startswith("-") else run("policy", "get", bad)
    )
    assert rc == 2
    assert "not a rule id" in err


def test_non_json_error_body(cli: Cli) -> None:
    rc, _, err = cli("policy", "get", "666")
    assert rc == 1
    assert err == "microseg: Bad Gateway (HTTP 502)\n"


# --------------------------------------------------------------------------- add


def test_policy_add_from_flags(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli(
        "policy",
        "add",
        "--rule-id",
        "2001",
        "--name",
        "api",
        "--dst-ip",
        "10.0.0.5",
        "--dst-port",
        "8080-8090",
        "--src-port",
        "1024",
        "--protocol",
        "TCP",
        "--action",
        "allow",
        "--priority",
        "300",
        "--direction",
        "ingress",
    )
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert (seen.method, seen.path, seen.query) == ("POST", "/api/v1/policies", {})
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == {
        "rule_id": 2001,
        "name": "api",
        "dst_ip": "10.0.0.5",
        "dst_port": "8080-8090",
        "src_port": 1024,
        "protocol": "tcp",
        "action": "allow",
        "priority": 300,
        "direction": "ingress",
    }
    lines = out.splitlines()
    assert lines[0] == "added rule 2001"
    assert lines[1].split()[0] == "ID"
    assert lines[2].split() == [
        "2001",
        "api",
        "any",
        "1024",
        "10.0.0.5",
        "8080-8090",
        "tcp",
        "allow",
        "300",
        "ingress",
    ]
    assert 2001 in stub.rules


def test_policy_add_minimal_sends_only_given_fields(cli: Cli, stub: Stub) -> None:
    rc, _, _ = cli("policy", "add", "--rule-id", "9", "--protocol", "icmp", "--action", "log")
    assert rc == 0
    assert last(stub).body == {"rule_id": 9, "protocol": "icmp", "action": "log"}


def test_policy_add_json_output(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli(
        "policy", "add", "--rule-id", "9", "--protocol", "udp", "--action", "deny", "-o", "json"
    )
    assert rc == 0
    assert json.loads(out) == stub.rules[9]


def test_policy_add_from_file_with_flag_override(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "rule.yaml"
    f.write_text("rule_id: 3001\nname: dns\ndst_port: 53\nprotocol: udp\naction: allow\n")
    rc, out, err = cli("policy", "add", "--file", str(f), "--priority", "150")
    assert (rc, err) == (0, "")
    assert last(stub).body == {
        "rule_id": 3001,
        "name": "dns",
        "dst_port": 53,
        "protocol": "udp",
        "action": "allow",
        "priority": 150,
    }
    assert out.startswith("added rule 3001\n")


def test_policy_add_json_file(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "rule.json"
    f.write_text(json.dumps({"rule_id": 3002, "protocol": "tcp", "action": "deny"}))
    rc, _, _ = cli("policy", "add", "--file", str(f))
    assert rc == 0
    assert last(stub).body == {"rule_id": 3002, "protocol": "tcp", "action": "deny"}


def test_policy_add_file_problems(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    before = len(stub.requests)
    rc, _, err = cli("policy", "add", "--file", str(tmp_path / "missing.json"))
    assert rc == 2 and "missing.json: no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"rule_id": 1,\n "protocol": }')
    rc, _, err = cli("policy", "add", "--file", str(bad))
    assert rc == 2 and "bad.json: line 2 column 14: invalid JSON" in err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("rule_id: [1\n")
    rc, _, err = cli("policy", "add", "--file", str(bad_yaml))
    assert rc == 2 and "bad.yaml: line 2 column 1: invalid YAML" in err
    whole = tmp_path / "set.json"
    whole.write_text('{"default_action": "deny", "policies": []}')
    rc, _, err = cli("policy", "add", "--file", str(whole))
    assert rc == 2 and "use `microseg policy apply" in err
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    rc, _, err = cli("policy", "add", "--file", str(scalar))
    assert rc == 2 and "expected one rule" in err
    assert len(stub.requests) == before  # nothing was sent
    assert "Traceback" not in err


def test_policy_add_missing_required_flags(cli: Cli, stub: Stub) -> None:
    rc, _, err = cli("policy", "add", "--name", "x", "--action", "allow")
    assert rc == 2
    assert err == "microseg: policy add: missing --rule-id, --protocol (or give --file)\n"
    assert stub.requests == []


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--dst-port", "70000", "is not a port"),
        ("--dst-port", "90-80", "LO <= HI"),
        ("--src-port", "http", "is not a port"),
        ("--priority", "65536", "is not a priority"),
        ("--protocol", "sctp", "invalid choice"),
        ("--action", "drop", "invalid choice"),
        ("--direction", "both", "invalid choice"),
    ],
)
def test_policy_add_bad_flag_values(cli: Cli, stub: Stub, flag: str, value: str, says: str) -> None:
    rc, _, err = cli(
        "policy", "add", "--rule-id", "5", "--protocol", "tcp", "--action", "allow", flag, value
    )
    assert rc == 2
    assert flag in err and says in err
    assert stub.requests == []


def test_policy_add_duplicate(cli: Cli) -> None:
    rc, out, err = cli(
        "policy", "add", "--rule-id", "1001", "--protocol", "tcp", "--action", "allow"
    )
    assert (rc, out) == (1, "")
    assert err == "microseg: rule_id 1001 already exists (HTTP 409 duplicate)\n"


def test_policy_add_rejected_by_api(cli: Cli, tmp_path: Path) -> None:
    f = tmp_path / "rule.json"
    f.write_text('{"rule_id": 5, "protocol": "sctp", "action": "allow"}')
    rc, _, err = cli("policy", "add", "--file", str(f))
    assert rc == 1
    assert err == "microseg: protocol: 'sctp' is not one of: tcp, udp (HTTP 400 invalid)\n"


def test_policy_add_dry_run(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli(
        "policy",
        "add",
        "--rule-id",
        "2001",
        "--name",
        "api",
        "--dst-port",
        "8080",
        "--protocol",
        "tcp",
        "--action",
        "deny",
        "--dry-run",
    )
    assert (rc, err) == (0, "")
    assert last(stub).query == {"dry_run": "1"}
    assert 2001 not in stub.rules
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        '+ 2001 "api": deny tcp any -> any port 8080, priority 100, direction any',
        "1 of 3 live sessions would change verdict",
    ]


def test_policy_add_dry_run_json(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli(
        "policy",
        "add",
        "--rule-id",
        "2001",
        "--protocol",
        "tcp",
        "--action",
        "deny",
        "--dry-run",
        "-o",
        "json",
    )
    assert rc == 0
    diff = json.loads(out)
    assert diff["dry_run"] is True
    assert diff["added"][0]["rule_id"] == 2001
    assert diff["sessions_changing_verdict"] == 1


# --------------------------------------------------------------------------- update / delete


def test_policy_update_merges_fields(cli: Cli, stub: Stub) -> None:
    before = copy.deepcopy(stub.rules[1001])
    rc, out, err = cli("policy", "update", "1001", "--dst-port", "8443", "--name", "")
    assert (rc, err) == (0, "")
    get, put = stub.requests[-2:]
    assert (get.method, get.path) == ("GET", "/api/v1/policies/1001")
    assert (put.method, put.path, put.query) == ("PUT", "/api/v1/policies/1001", {})
    # Every other field is the current rule's; the hit counters are not sent back.
    assert put.body == {**before, "dst_port": 8443, "name": ""}
    assert stub.rules[1001] == {**before, "dst_port": 8443, "name": ""}
    lines = out.splitlines()
    assert lines[0] == "updated rule 1001"
    assert lines[2].split()[:2] == ["1001", "-"]


def test_policy_update_from_file(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "patch.json"
    f.write_text('{"action": "log", "priority": 5}')
    rc, _, err = cli("policy", "update", "1002", "--file", str(f), "--priority", "6")
    assert (rc, err) == (0, "")
    assert stub.rules[1002]["action"] == "log"
    assert stub.rules[1002]["priority"] == 6
    assert stub.rules[1002]["dst_port"] == 22


def test_policy_update_cannot_renumber(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "patch.json"
    f.write_text('{"rule_id": 1005, "action": "log"}')
    rc, _, err = cli("policy", "update", "1002", "--file", str(f))
    assert rc == 2
    assert "a rule keeps its id" in err
    assert stub.requests == []


def test_policy_update_nothing_to_change(cli: Cli, stub: Stub) -> None:
    rc, _, err = cli("policy", "update", "1001")
    assert rc == 2
    assert "nothing to change" in err and "--dst-port" in err
    assert stub.requests == []


def test_policy_update_unknown_rule(cli: Cli, stub: Stub) -> None:
    rc, _, err = cli("policy", "update", "4242", "--action", "deny")
    assert rc == 1
    assert err == "microseg: no rule with rule_id 4242 (HTTP 404 not_found)\n"
    assert [r.method for r in stub.requests] == ["GET"]


def test_policy_update_dry_run(cli: Cli, stub: Stub) -> None:
    before = copy.deepcopy(stub.rules[1003])
    rc, out, err = cli(
        "policy", "update", "1003", "--action", "deny", "--dst-port", "80", "--dry-run"
    )
    assert (rc, err) == (0, "")
    assert last(stub).query == {"dry_run": "1"}
    assert stub.rules[1003] == before
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        "~ 1003: dst_port 80-443 -> 80; action allow -> deny",
        "1 of 3 live sessions would change verdict",
    ]


def test_policy_delete(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "delete", "1002")
    assert (rc, out, err) == (0, "deleted rule 1002\n", "")
    assert (last(stub).method, last(stub).path) == ("DELETE", "/api/v1/policies/1002")
    assert 1002 not in stub.rules
    rc, out, err = cli("policy", "delete", "1002")
    assert rc == 1 and "no rule with rule_id 1002 (HTTP 404 not_found)" in err


def test_policy_delete_json_no_body(cli: Cli) -> None:
    rc, out, err = cli("policy", "delete", "1002", "-o", "json")
    assert (rc, out, err) == (0, "", "")


def test_policy_delete_dry_run(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli("policy", "delete", "1002", "--dry-run")
    assert rc == 0
    assert 1002 in stub.rules
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        '- 1002 "no-ssh": deny tcp any -> any port 22, priority 200, direction ingress',
        "1 of 3 live sessions would change verdict",
    ]


# --------------------------------------------------------------------------- apply / load


def write_set(path: Path, default: str, rules: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"default_action": default, "policies": rules}))
    return path


def test_policy_apply_json(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    rules = [
        {**SEED_RULES[0], "dst_port": 8443},
        {"rule_id": 1009, "name": "dns", "dst_port": 53, "protocol": "udp", "action": "allow"},
    ]
    f = write_set(tmp_path / "set.json", "allow", rules)
    rc, out, err = cli("policy", "apply", str(f))
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert (seen.method, seen.path, seen.query) == ("PUT", "/api/v1/policies", {})
    assert seen.body == {"default_action": "allow", "policies": rules}
    assert out.splitlines() == [
        "applied: now generation 8",
        '+ 1009 "dns": allow udp any -> any port 53, priority 100, direction any',
        '- 1002 "no-ssh": deny tcp any -> any port 22, priority 200, direction ingress',
        "- 1003: allow tcp any -> 198.18.0.0/15 port 80-443, priority 100, direction any",
        '~ 1001 "https-to-web": dst_port 443 -> 8443',
        "~ default action changed to allow",
    ]
    assert sorted(stub.rules) == [1001, 1009]
    assert stub.default_action == "allow"


def test_policy_apply_yaml_dry_run(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "set.yaml"
    f.write_text(
        "default_action: deny\n"
        "policies:\n"
        + "".join(f"  - {json.dumps(r)}\n" for r in SEED_RULES)
        + "  - {rule_id: 1010, name: 2024-01-01, protocol: icmp, action: allow}\n"
    )
    rc, out, err = cli("policy", "apply", str(f), "--dry-run")
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert seen.query == {"dry_run": "1"}
    assert seen.body["policies"][-1]["name"] == "2024-01-01"  # a YAML date, sent as text
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        '+ 1010 "2024-01-01": allow icmp any -> any, priority 100, direction any',
        "1 of 3 live sessions would change verdict",
    ]
    assert 1010 not in stub.rules


def test_policy_apply_no_changes(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = write_set(tmp_path / "same.json", "deny", SEED_RULES)
    rc, out, _ = cli("policy", "apply", str(f), "--dry-run")
    assert rc == 0
    assert out.splitlines() == [
        "dry run against generation 7: nothing was applied",
        "no changes",
        "1 of 3 live sessions would change verdict",  # the stub's canned count
    ]


def test_policy_apply_from_stdin(cli: Cli, stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("default_action: allow\npolicies: []\n"))
    rc, out, err = cli("policy", "apply", "-")
    assert (rc, err) == (0, "")
    assert out.splitlines()[0] == "applied: now generation 8"
    assert last(stub).body == {"default_action": "allow", "policies": []}
    assert stub.rules == {}


def test_policy_apply_rejected(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = write_set(tmp_path / "dup.json", "deny", [SEED_RULES[0], SEED_RULES[0]])
    rc, out, err = cli("policy", "apply", str(f))
    assert (rc, out) == (1, "")
    assert err == "microseg: policies[1]: rule_id: duplicate (HTTP 400 invalid)\n"
    assert stub.generation == 7


def test_policy_apply_top_level_must_be_an_object(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = tmp_path / "list.json"
    f.write_text("[]")
    rc, _, err = cli("policy", "apply", str(f))
    assert rc == 2
    assert "the top level is list: expected an object" in err
    assert stub.requests == []


def test_policy_apply_json_output(cli: Cli, tmp_path: Path) -> None:
    f = write_set(tmp_path / "set.json", "deny", SEED_RULES[:1])
    rc, out, _ = cli("policy", "apply", str(f), "-o", "json")
    assert rc == 0
    diff = json.loads(out)
    assert diff["dry_run"] is False
    assert [r["rule_id"] for r in diff["removed"]] == [1002, 1003]
    assert "sessions_checked" not in diff


def test_policy_load(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "load")
    assert (rc, err) == (0, "")
    seen = last(stub)
    assert (seen.method, seen.path, seen.body) == ("POST", "/api/v1/policies/reload", None)
    assert out.splitlines() == [
        "reloaded the agent's policy file",
        "applied: now generation 8",
        "- 1003: allow tcp any -> 198.18.0.0/15 port 80-443, priority 100, direction any",
    ]


def test_policy_load_file_is_apply(cli: Cli, stub: Stub, tmp_path: Path) -> None:
    f = write_set(tmp_path / "set.json", "deny", SEED_RULES[:2])
    rc, out, _ = cli("policy", "load", "--file", str(f))
    assert (rc, out.splitlines()[0]) == (0, "applied: now generation 8")
    assert (last(stub).method, last(stub).path, last(stub).query) == ("PUT", "/api/v1/policies", {})
    assert sorted(stub.rules) == [1001, 1002]


# --------------------------------------------------------------------------- sessions, stats


def test_session_list_table(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("session", "list")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "PROTO",
        "SRC",
        "DST",
        "DIR",
        "VERDICT",
        "RULE",
        "PKTS_OUT",
        "BYTES_OUT",
        "PKTS_IN",
        "BYTES_IN",
    ]
    assert lines[1].split() == [
        "tcp",
        "10.0.0.7:51234",
        "10.0.0.5:443",
        "egress",
        "allow",
        "1001",
        "12",
        "3400",
        "10",
        "120000",
    ]
    assert lines[2].split()[1:3] == ["[fd6d:7365:67::1]:40000", "[fd6d:7365:67::2]:22"]
    assert lines[3].split()[:6] == ["icmp", "10.0.0.7", "10.0.0.9", "egress", "allow", "default"]
    assert lines[-1] == "3 sessions"
    # Counters are right-aligned: each ends where its header ends.
    end = lines[0].index("BYTES_IN") + len("BYTES_IN")
    assert all(len(line) == end for line in lines[:-1])
    assert last(stub).query == {}


def test_session_list_filters(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli(
        "session",
        "list",
        "--ip",
        "10.0.0.7",
        "--port",
        "443",
        "--protocol",
        "TCP",
        "--verdict",
        "allow",
        "--limit",
        "5",
    )
    assert rc == 0
    assert last(stub).query == {
        "ip": "10.0.0.7",
        "port": "443",
        "protocol": "tcp",
        "verdict": "allow",
        "limit": "5",
    }
    assert out.splitlines()[-1] == "1 session"


def test_session_list_truncated_and_json(cli: Cli) -> None:
    rc, out, _ = cli("session", "list", "--limit", "1")
    assert rc == 0
    assert out.splitlines()[-1] == "1 session (truncated: narrow the filters or raise --limit)"
    rc, out, _ = cli("session", "list", "--limit", "1", "-o", "json")
    assert json.loads(out) == {"sessions": SESSIONS[:1], "count": 1, "truncated": True}


def test_session_list_none(cli: Cli) -> None:
    rc, out, _ = cli("session", "list", "--verdict", "log")
    assert (rc, out) == (0, "0 sessions\n")


@pytest.mark.parametrize(
    ("flag", "value"), [("--port", "0"), ("--port", "x"), ("--limit", "0"), ("--verdict", "drop")]
)
def test_session_list_bad_filters(cli: Cli, stub: Stub, flag: str, value: str) -> None:
    rc, _, err = cli("session", "list", flag, value)
    assert rc == 2 and flag in err
    assert stub.requests == []


def test_stats(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("stats")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["total_packets", "1000"]
    pairs = dict(line.split() for line in lines)
    assert pairs["events.lost"] == "0" and pairs["events.emitted"] == "70"
    assert len({line.index(line.split()[1], len(line.split()[0])) for line in lines}) == 1
    assert last(stub).path == "/api/v1/stats"


def test_stats_packets_and_policies(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli("stats", "--packets")
    assert rc == 0 and last(stub).path == "/api/v1/stats/packets"
    pairs = dict(line.split() for line in out.splitlines())
    assert pairs["allow_rate"] == "90.00%" and pairs["deny_rate"] == "10.00%"
    rc, out, _ = cli("stats", "--policies", "-o", "json")
    assert rc == 0 and last(stub).path == "/api/v1/stats/policies"
    assert json.loads(out) == {"policy_hits": 950, "policy_misses": 50, "hit_rate": 95.0}
    rc, _, err = cli("stats", "--packets", "--policies")
    assert rc == 2 and "not allowed with" in err


# --------------------------------------------------------------------------- transport, token


def test_unix_socket(run: Cli, stub: Stub, state_dir: Path) -> None:
    rc, out, err = run(
        "policy", "list", "--api", f"unix:{stub.unix_path}", "--state-dir", str(state_dir)
    )
    assert (rc, err) == (0, "")
    assert out.splitlines()[-1] == "3 rules, default action deny, generation 7"
    assert last(stub).headers["Host"] == "localhost"


def test_http_url_form(run: Cli, stub: Stub, state_dir: Path) -> None:
    rc, _, err = run(
        "stats", "--api", f"http://127.0.0.1:{stub.tcp_port}/api/v1", "--state-dir", str(state_dir)
    )
    assert (rc, err) == (0, "")
    assert last(stub).path == "/api/v1/stats"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused(run: Cli, state_dir: Path) -> None:
    port = free_port()
    rc, out, err = run(
        "policy", "list", "--api", f"127.0.0.1:{port}", "--state-dir", str(state_dir)
    )
    assert (rc, out) == (1, "")
    assert err == (
        f"microseg: the agent is not reachable at 127.0.0.1:{port} "
        "(connection refused); is `microseg run` running?\n"
    )


def test_unix_socket_missing(run: Cli, state_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "nothing.sock"
    rc, _, err = run("stats", "--api", f"unix:{path}", "--state-dir", str(state_dir))
    assert rc == 1
    assert err == (
        f"microseg: the agent is not reachable at unix:{path} (no such socket); "
        "is `microseg run` running?\n"
    )


def test_timeout(cli: Cli, stub: Stub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "TIMEOUT", 0.2)
    stub.delay = 1.0
    rc, _, err = cli("policy", "list")
    assert rc == 1
    assert err == f"microseg: the agent at 127.0.0.1:{stub.tcp_port} did not answer within 0.2 s\n"


def test_apply_has_its_own_timeout(
    cli: Cli, stub: Stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert policy.APPLY_TIMEOUT >= 60 and connection.TIMEOUT == 10
    monkeypatch.setattr(connection, "TIMEOUT", 30.0)
    monkeypatch.setattr(policy, "APPLY_TIMEOUT", 0.2)
    stub.delay = 1.0
    f = write_set(tmp_path / "set.json", "deny", [])
    rc, _, err = cli("policy", "apply", str(f))
    assert rc == 1 and "did not answer within 0.2 s" in err


def test_token_override_and_env(
    run: Cli, stub: Stub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = ("--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(tmp_path / "none"))
    rc, _, err = run("stats", *api, "--token", TOKEN)
    assert (rc, err) == (0, "")
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    rc, _, err = run("stats", *api)
    assert (rc, err) == (0, "")
    rc, _, err = run("stats", *api, "--token", "wrong")  # the flag beats the variable
    assert rc == 1
    assert err == "microseg: missing or wrong API token (HTTP 401 unauthorized)\n"


def test_wrong_token_in_file(run: Cli, stub: Stub, state_dir: Path) -> None:
    (state_dir / "api-token").write_text("not-the-token\n")
    rc, _, err = run("stats", "--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(state_dir))
    assert rc == 1
    assert err == "microseg: missing or wrong API token (HTTP 401 unauthorized)\n"


def test_missing_token_file_hint_on_401(run: Cli, stub: Stub, tmp_path: Path) -> None:
    state = tmp_path / "empty-state"
    rc, _, err = run("stats", "--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(state))
    assert rc == 1
    assert "Authorization" not in last(stub).headers
    assert err.splitlines() == [
        "microseg: missing or wrong API token (HTTP 401 unauthorized)",
        f"microseg: no token was sent: {state / 'api-token'} does not exist; pass --state-dir "
        f"(the agent's), --token, or set {TOKEN_ENV}",
    ]


def test_unreadable_token_file(
    run: Cli, stub: Stub, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = state_dir / "api-token"
    real_open = pathlib.Path.open

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == token_file:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    # The suite runs as root, which may read any file: make this one unreadable by hand.
    monkeypatch.setattr(pathlib.Path, "open", deny)
    rc, out, err = run(
        "policy", "list", "--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(state_dir)
    )
    assert (rc, out) == (1, "")
    assert err == (
        f"microseg: cannot read the API token file {token_file}: permission denied;"
        f" run as root (or a user that can read it), or pass --token / set "
        f"{TOKEN_ENV}\n"
    )
    assert stub.requests == []


def test_token_file_is_a_directory(run: Cli, stub: Stub, tmp_path: Path) -> None:
    (tmp_path / "s" / "api-token").mkdir(parents=True)
    rc, _, err = run(
        "stats", "--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(tmp_path / "s")
    )
    assert rc == 1
    assert err.startswith(f"microseg: cannot read the API token file {tmp_path / 's'}/api-token:")
    assert "--token" in err


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"\n", "is empty"), (b"two words\n", "not a token"), (b"\xff\xfe", "not ASCII")],
)
def test_token_file_garbage(
    run: Cli, stub: Stub, state_dir: Path, content: bytes, says: str
) -> None:
    (state_dir / "api-token").write_bytes(content)
    rc, _, err = run("stats", "--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(state_dir))
    assert rc == 1 and says in err and str(state_dir / "api-token") in err
    assert stub.requests == []


def test_not_json_success_body(run: Cli, state_dir: Path) -> None:
    """Something else listening on the port: a clear message, not a traceback."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/api/v1/stats", hello)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:

        async def start() -> int:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return int(runner.addresses[0][1])

        port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        rc, _, err = run("stats", "--api", f"127.0.0.1:{port}", "--state-dir", str(state_dir))
        assert rc == 1
        assert "with something that is not JSON" in err and "microseg agent" in err
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --------------------------------------------------------------------------- pure helpers


def test_format_table() -> None:
    text = format_table(["A", "LONG", "N"], [["xx", "y", "5"], ["z", "", "123"]], right=(2,))
    assert text.splitlines() == [
        "A   LONG    N",
        "xx  y       5",
        "z         123",
    ]


def test_render_diff_changed_fields_and_default() -> None:
    diff = {
        "dry_run": True,
        "generation": 3,
        "added": [],
        "removed": [],
        "changed": [
            {
                "before": {**SEED_RULES[1]},
                "after": {**SEED_RULES[1], "priority": 50, "direction": "any"},
            }
        ],
        "default_action_changed": True,
        "sessions_checked": 10,
        "sessions_changing_verdict": 4,
    }
    assert render_diff(diff, "allow").splitlines() == [
        "dry run against generation 3: nothing was applied",
        '~ 1002 "no-ssh": priority 200 -> 50; direction ingress -> any',
        "~ default action would change to allow",
        "4 of 10 live sessions would change verdict",
    ]


def test_client_error_text() -> None:
    assert str(ClientError("x")) == "x"
    assert ClientError("x").exit_status == 1
