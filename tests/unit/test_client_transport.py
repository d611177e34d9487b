"""The API clients (streamer/cli/) against the stub admin API (support/stubapi.py):
--api addresses, TCP and the Unix socket, refused and missing endpoints, timeouts, the token
(flag, environment, file) and its problems, a success body that is no JSON."""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.agentproc import free_port
from support.stubapi import TOKEN, Cli, Stub, last, write_set

from streamer.cli import connection, policy
from streamer.cli.connection import TOKEN_ENV
from streamer.cli.endpoint import parse_api_address

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
