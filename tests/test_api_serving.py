"""The admin API (streamer/api/) failing and served: an unexpected failure is a generic 500, a
kernel failure a 503 that changes nothing, a policy change whose request is cancelled is awaited
as the API closes, a failing flow-feed client task is logged; `start_api` on TCP and a Unix
socket (the socket file's mode is the access control; a second agent on the socket is
refused)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from support.apiapp import (
    AUTH,
    TOKEN,
    Factory,
    P,
    assert_error,
    live_sessions,
    make_store,
    rule,
)

from streamer.api.app import make_app
from streamer.api.context import ApiContext, ApiSetupError
from streamer.api.serve import start_api
from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.events.sinks.websocket import WebSocketHub
from streamer.policy.model import PolicySet
from streamer.policy.store import PolicyStore

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
    # Both refusals are counted on /metrics (the alert MicrosegPolicyApplyFailures).
    _, text, _ = await api.call("GET", "/metrics", auth=False)
    assert "\nmicroseg_policy_apply_failures_total 2.0\n" in text, text


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
        store=store,
        datapath=dp,
        interfaces=[],
        version="9.9.9",
        started_monotonic=time.monotonic(),
        token=None,
        bind_hosts=set(),
        registry=CollectorRegistry(),
    )
    runner = web.AppRunner(make_app(ctx), shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    async def post() -> None:
        with contextlib.suppress(aiohttp.ClientError):
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"http://127.0.0.1:{port}{P}/policies", json=rule(7)) as resp,
            ):
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
        store=store,
        datapath=dp,
        interfaces=[],
        version="9.9.9",
        started_monotonic=time.monotonic(),
        token=None,
        bind_hosts=set(),
        registry=CollectorRegistry(),
        flows=BuggyHub(),
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
