"""The admin API (streamer/api/app.py) served in-process through aiohttp's test client, over a
real PolicyStore and the session's classifier: `Api` is one served app (`call` a route; the
store's file on disk; the change log), `make_store` the store over a datapath (optionally
failing like a kernel that refuses), `passes` a BPF_PROG_TEST_RUN verdict for a new flow, and
`rule`/`full` a rule document and the canonical form the API returns for it. The conftest's
`make_api` and `api` fixtures serve them.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from streamer.api.context import ApiContext
from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import TC_ACT_OK
from streamer.datapath.reference import Packet
from streamer.policy.model import PolicySet
from streamer.policy.store import LiveSession, PolicyStore, persisted_document
from support.bpf import kernel_retval

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
        doc = persisted_document(self.state_dir)
        assert doc is not None
        return doc

    def changes(self) -> list[dict[str, Any]]:
        path = self.state_dir / "changes.log"
        return [json.loads(line) for line in path.read_text().splitlines()]


Factory = Callable[..., Awaitable[Api]]


def make_store(dp: Datapath, state_dir: Path, fail: list[bool] | None = None) -> PolicyStore:
    def applier(policy: PolicySet, generation: int | None) -> int:
        if fail and fail[0]:
            raise RuntimeError("injected kernel failure")
        return dp.apply(compile_policy(policy, dp.config.max_shapes), generation)

    store = PolicyStore(state_dir, applier, sessions=live_sessions(dp))
    store.restore(PolicySet(), 0)
    return store


def assert_error(status: int, body: Any, expected: int, code: str, *words: str) -> None:
    assert status == expected, body
    assert set(body) <= {"error", "message", "errors"}, body
    assert body["error"] == code, body
    for word in words:
        assert word in body["message"], (word, body["message"])
    assert "Traceback" not in body["message"]
