"""How an API client of the `microseg` command reaches the agent, and runs one command.

In: the connection flags (`--api`, `--state-dir`, `--token`; see `add_connection_args`), the
MICROSEG_TOKEN environment variable or `<state-dir>/api-token`, and a command's `action`. Out:
one aiohttp session to the admin API (contract §3), requests sent with the bearer token and answers
decoded from JSON; failures become `ClientError`s (streamer/cli/errors.py) printed as one line
on stderr with the exit status. Proxy settings in the environment are ignored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from streamer.cli import argtypes
from streamer.cli.endpoint import API_PREFIX, DEFAULT_API, Endpoint, parse_api_address
from streamer.cli.errors import ApiError, ClientError

__all__ = [
    "DEFAULT_STATE_DIR",
    "TIMEOUT",
    "TOKEN_ENV",
    "Api",
    "add_connection_args",
    "common_parser",
    "expect_dict",
    "run_client",
    "run_command",
    "unreachable",
]

DEFAULT_STATE_DIR: Final = Path("/var/lib/microseg")
TOKEN_FILE: Final = "api-token"
TOKEN_ENV: Final = "MICROSEG_TOKEN"
TIMEOUT: Final = 10.0
MAX_TOKEN_BYTES: Final = 4096


# --------------------------------------------------------------------------- token


@dataclass(frozen=True)
class _Token:
    value: str | None
    missing_file: Path | None  # set when no token was found: named in a 401 hint


def _resolve_token(args: argparse.Namespace) -> _Token:
    """--token, else MICROSEG_TOKEN, else <state-dir>/api-token. A missing file is not an
    error (the agent may run with --no-auth); an unreadable one is."""
    given = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    if given is not None:
        return _Token(_check_token(given, "--token" if args.token is not None else TOKEN_ENV), None)
    path = Path(args.state_dir) / TOKEN_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        return _Token(None, path)
    except PermissionError:
        raise ClientError(
            f"cannot read the API token file {path}: permission denied; run as root "
            f"(or a user that can read it), or pass --token / set {TOKEN_ENV}"
        ) from None
    except OSError as e:
        raise ClientError(
            f"cannot read the API token file {path}: {e.strerror or e}; "
            f"pass --token / set {TOKEN_ENV}, or --state-dir"
        ) from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ClientError(f"the API token file {path} is too large to be a token")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ClientError(f"the API token file {path} does not hold a token (not ASCII)") from None
    return _Token(_check_token(text, str(path)), None)


def _check_token(text: str, source: str) -> str:
    token = text.strip()
    if not token:
        raise ClientError(f"the API token from {source} is empty")
    # Header injection and garbage guard: a token is one printable word.
    if any(not (33 <= ord(c) <= 126) for c in token):
        raise ClientError(f"the API token from {source} is not a token (one printable word)")
    return token


# --------------------------------------------------------------------------- HTTP


class Api:
    """One aiohttp session to the admin API. Use as `async with Api(...) as api`."""

    def __init__(self, endpoint: Endpoint, token: _Token, timeout: float) -> None:
        self.endpoint = endpoint
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        connector: aiohttp.BaseConnector | None = None
        if self.endpoint.unix_path is not None:
            connector = aiohttp.UnixConnector(path=self.endpoint.unix_path)
        headers = {"Accept": "application/json"}
        if self.token.value is not None:
            headers["Authorization"] = f"Bearer {self.token.value}"
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            # Proxies would break the loopback-only, Host-checked API; ignore *_PROXY.
            trust_env=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request to /api/v1{path}; return the decoded JSON (None for no body).
        `timeout` bounds this request instead of the session's.

        Raises ApiError for an error status, ClientError when the agent cannot be reached,
        times out or answers something that is not JSON.
        """
        assert self._session is not None, "use `async with Api(...)`"
        url = self.endpoint.base_url.with_path(
            self.endpoint.base_url.path.rstrip("/") + API_PREFIX + path
        )
        if params:
            url = url.with_query(dict(params))
        data: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            data = _dump_body(body)
            headers["Content-Type"] = "application/json"
        where = self.endpoint.display
        limit = self.timeout if timeout is None else timeout
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as resp:
                raw = await resp.read()
                status, reason = resp.status, resp.reason or ""
        except aiohttp.ClientConnectorError as e:
            raise ClientError(unreachable(where, e.os_error, self.endpoint)) from None
        except TimeoutError:
            raise ClientError(f"the agent at {where} did not answer within {limit:g} s") from None
        except aiohttp.ServerDisconnectedError:
            raise ClientError(
                f"the agent at {where} closed the connection without an answer"
            ) from None
        except aiohttp.ClientError as e:
            raise ClientError(f"talking to the agent at {where} failed: {e}") from None
        decoded = _decode(raw)
        if status >= 400:
            raise _api_error(status, reason, raw, decoded, self.token)
        if decoded is _NOT_JSON:
            raise ClientError(
                f"the agent at {where} answered HTTP {status} with something that is not JSON;"
                " is --api pointing at a microseg agent?"
            )
        return decoded


_NOT_JSON: Final[Any] = object()


def _dump_body(body: Any) -> bytes:
    try:
        # default=str: YAML turns `name: 2024-01-01` into a date; the user meant the text.
        return json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")
    except ValueError as e:  # e.g. circular YAML anchors
        raise ClientError(f"cannot send this as JSON: {e}") from None


def _decode(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _api_error(status: int, reason: str, raw: bytes, decoded: Any, token: _Token) -> ApiError:
    if isinstance(decoded, dict) and isinstance(decoded.get("message"), str):
        code = decoded.get("error")
        err = ApiError(status, code if isinstance(code, str) else None, decoded["message"])
    else:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        first = text[0][:200] if text else ""
        err = ApiError(status, None, first or reason or "error")
    if status == 401 and token.missing_file is not None:
        err.message += (
            f"\nmicroseg: no token was sent: {token.missing_file} does not exist; pass "
            f"--state-dir (the agent's), --token, or set {TOKEN_ENV}"
        )
    return err


def unreachable(where: str, error: OSError, endpoint: Endpoint) -> str:
    """The message for an agent that could not be connected to at all."""
    if isinstance(error, ConnectionRefusedError):
        why = "connection refused"
    elif isinstance(error, FileNotFoundError) and endpoint.unix_path:
        why = "no such socket"
    elif isinstance(error, PermissionError) and endpoint.unix_path:
        why = "permission denied on the socket; run as root or as a member of its group"
    else:
        why = error.strerror or str(error) or type(error).__name__
    return f"the agent is not reachable at {where} ({why}); is `microseg run` running?"


def run_command(
    args: argparse.Namespace,
    action: Callable[[Api, argparse.Namespace], Awaitable[int]],
    timeout: float | None = None,
) -> int:
    """Resolve the token, open a session, run `action` (with `timeout`, default TIMEOUT, for
    the whole of each request); errors -> stderr and exit status."""
    limit = TIMEOUT if timeout is None else timeout
    try:
        token = _resolve_token(args)

        async def main() -> int:
            async with Api(args.api, token, limit) as api:
                return await action(api, args)

        return asyncio.run(main())
    except ClientError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        # The request may or may not have reached the agent; say so rather than guess.
        print(
            "microseg: interrupted (a write may still have been applied; check with "
            "`microseg policy list`)",
            file=sys.stderr,
        )
        return 130


def run_client(
    args: argparse.Namespace, action: Callable[[Api], Awaitable[int]], timeout: float
) -> int:
    """For commands that only read and may run until Ctrl-C (`flows observe`, `monitor`):
    `action` with an open Api (`timeout` bounds each request); errors -> stderr and exit
    status; Ctrl-C -> 0."""
    try:
        token = _resolve_token(args)

        async def main() -> int:
            async with Api(args.api, token, timeout) as api:
                return await action(api)

        return asyncio.run(main())
    except ClientError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 0


def expect_dict(data: Any, api: Api, what: str) -> dict[str, Any]:
    """`data` if the answer to `what` is a JSON object, else a ClientError saying so."""
    if not isinstance(data, dict):
        raise ClientError(
            f"the agent at {api.endpoint.display} answered {what} with unexpected JSON "
            f"({type(data).__name__}, expected an object)"
        )
    return data


# --------------------------------------------------------------------------- flags


def add_connection_args(g: Any) -> None:
    """--api, --state-dir and --token on a parser or an argument group."""
    g.add_argument(
        "--api",
        type=argtypes.api_address,
        default=parse_api_address(DEFAULT_API),
        metavar="ADDR",
        help=f"the agent's API: HOST:PORT, http://HOST:PORT or unix:/PATH (default {DEFAULT_API})",
    )
    g.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help=f"the agent's state dir, where {TOKEN_FILE} is read (default {DEFAULT_STATE_DIR})",
    )
    g.add_argument(
        "--token",
        help=f"API token (default: ${TOKEN_ENV}, else <state-dir>/{TOKEN_FILE}); "
        "visible to other users in the process list, prefer the variable",
    )


def common_parser() -> argparse.ArgumentParser:
    """A parent parser for the table/json clients: the connection flags and `-o`."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    add_connection_args(g)
    g.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json: the API's answer unchanged",
    )
    return p
