"""A stub admin API for the client tests (streamer/cli/: `policy`, `sessions`, `stats` and the
modules they use): no agent, no root.

A small real aiohttp server (in-memory rules, canned sessions and stats, contract §3 shapes and
error bodies), served on 127.0.0.1 and on a Unix socket from a background thread by
`ServerThread`; every request it gets is recorded in `Stub.requests`. The client commands run
through the real `microseg` parser (`streamer.cli.main.build_parser`: argv -> parser ->
`args.func(args)`); `Cli` is the type of the `run` and `cli` fixtures of tests/unit/conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

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


Result = tuple[int, str, str]
Cli = Callable[..., Result]


def last(stub: Stub) -> Seen:
    return stub.requests[-1]


def column_starts(header: str) -> list[int]:
    return [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]


def write_set(path: Path, default: str, rules: list[dict[str, Any]]) -> Path:
    """A policy set file (JSON) for `policy apply`."""
    path.write_text(json.dumps({"default_action": default, "policies": rules}))
    return path
