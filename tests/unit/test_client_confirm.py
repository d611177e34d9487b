"""`--confirm SECONDS`, `--force` and `policy confirm` of the `microseg` client (contract §6)
against a small agent stand-in: the write carries confirm_within (and force), the confirmation
goes over a new connection once the answer says the change is pending, a failed confirmation
exits 1 saying the agent reverts the change at its deadline, and a write without an answer
says the same. Bad --confirm values are argument errors (exit 2) and send nothing."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.stubapi import TOKEN, Cli

DEADLINE = "2099-01-01T00:00:00Z"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    peer: Any


@dataclass
class Agent:
    """Answers writes with a pending generation 7; confirm answers `confirm_status`."""

    confirm_status: int = 200
    write_delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            assert request.headers.get("Authorization") == f"Bearer {TOKEN}"
            body = await request.json() if request.can_read_body else None
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.seen.append(Seen(request.method, request.path, dict(request.query), body, peer))
            if request.path.endswith("/confirm"):
                if self.confirm_status == 409:
                    return web.json_response(
                        {"error": "not_pending", "message": "generation 7 is not pending"},
                        status=409,
                    )
                if self.confirm_status != 200:
                    return web.json_response(
                        {"error": "unavailable", "message": "the disk is full"},
                        status=self.confirm_status,
                    )
                return web.json_response({"generation": 7, "confirmed": True})
            await asyncio.sleep(self.write_delay)
            answer: dict[str, Any] = {"rule_id": 5, "protocol": "tcp", "action": "deny"}
            if "confirm_within" in request.query and request.query.get("dry_run") != "1":
                answer["pending"] = {"generation": 7, "deadline": DEADLINE}
            return web.json_response(answer, status=201)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
def agent() -> Iterator[Agent]:
    the = Agent()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(the.app(), shutdown_timeout=0.2)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        the.port = next(a[1] for a in runner.addresses if isinstance(a, tuple))

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield the
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _add(run: Cli, agent: Agent, state_dir: Path, *extra: str) -> tuple[int, str, str]:
    return run(
        "policy",
        "add",
        "--rule-id",
        "5",
        "--protocol",
        "tcp",
        "--action",
        "deny",
        *extra,
        "--api",
        f"127.0.0.1:{agent.port}",
        "--state-dir",
        str(state_dir),
    )


def test_confirm_goes_over_a_new_connection(run: Cli, agent: Agent, state_dir: Path) -> None:
    rc, out, err = _add(run, agent, state_dir, "--confirm", "30", "--force")
    assert rc == 0, err
    write, conf = agent.seen
    assert write.query == {"confirm_within": "30", "force": "1"}
    assert conf.path == "/api/v1/policies/confirm" and conf.body == {"generation": 7}
    assert write.peer != conf.peer  # another TCP connection
    assert "generation 7 confirmed over a new connection" in out


def test_no_confirmation_without_pending(run: Cli, agent: Agent, state_dir: Path) -> None:
    rc, _, err = _add(run, agent, state_dir, "--confirm", "30", "--dry-run")
    assert rc == 0, err
    assert [s.path for s in agent.seen] == ["/api/v1/policies"]
    assert agent.seen[0].query == {"dry_run": "1", "confirm_within": "30"}


def test_a_failed_confirmation_says_the_change_is_reverted(
    run: Cli, agent: Agent, state_dir: Path
) -> None:
    agent.confirm_status = 503
    rc, _, err = _add(run, agent, state_dir, "--confirm", "30", "-o", "json")
    assert rc == 1
    assert "applied as generation 7" in err and f"reverts it at {DEADLINE}" in err, err
    agent.confirm_status = 409  # too late: reverted already
    rc, _, err = _add(run, agent, state_dir, "--confirm", "30")
    assert rc == 1 and "no longer pending" in err and "has reverted it" in err, err


def test_a_write_without_an_answer_says_the_change_is_reverted(
    run: Cli, agent: Agent, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamer.cli import rollout

    monkeypatch.setattr(rollout, "TIMEOUT", 0.3)  # the answer is awaited window + TIMEOUT s
    agent.write_delay = 3.0
    rc, _, err = _add(run, agent, state_dir, "--confirm", "1")
    assert rc == 1
    assert "did not answer" in err and "reverts it by itself within 1 s" in err, err
    assert [s.path for s in agent.seen] == ["/api/v1/policies"]


@pytest.mark.parametrize("bad", ["0", "3601", "abc", "-5", "1.5"])
def test_bad_confirm_values_send_nothing(run: Cli, agent: Agent, state_dir: Path, bad: str) -> None:
    rc, _, err = _add(run, agent, state_dir, "--confirm", bad)
    assert rc == 2 and "--confirm" in err and "1..3600" in err, err
    assert agent.seen == []


def test_policy_confirm(run: Cli, agent: Agent, state_dir: Path) -> None:
    api = ["--api", f"127.0.0.1:{agent.port}", "--state-dir", str(state_dir)]
    rc, out, err = run("policy", "confirm", "7", *api)
    assert rc == 0 and "generation 7 confirmed" in out, err
    assert agent.seen[0].body == {"generation": 7}
    rc, out, _ = run("policy", "confirm", "7", "-o", "json", *api)
    assert rc == 0 and json.loads(out) == {"generation": 7, "confirmed": True}
    agent.confirm_status = 409
    rc, _, err = run("policy", "confirm", "7", *api)
    assert rc == 1 and "HTTP 409 not_pending" in err
    rc, _, err = run("policy", "confirm", "zero", *api)
    assert rc == 2 and "generation" in err
    agent.confirm_status = 200
    for words in (["group", "set", "g", "10.0.0.1"], ["group", "delete", "g"]):
        rc, _, err = run(*words, "--confirm", "9", *api)
        assert rc == 0, err
    assert agent.seen[-1].path == "/api/v1/policies/confirm"
