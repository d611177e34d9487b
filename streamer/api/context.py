"""What every part of the admin API shares: the context it serves from, its errors and answers.

In: the agent's store, datapath and settings, as an `ApiContext` the application keeps under
`CTX`. Out: `ApiError` (raised by checks and handlers, turned into `{"error": code, "message":
text}` by the dispatch in streamer/api/app.py), `ApiSetupError` (the API cannot start), the JSON
answers `json_response` and `error_response`, and the text and time formatting the handlers share
(`short`, `wall_time`). Nothing here reads a request; lists of errors beyond 100 are dropped from
an answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from streamer.api.signin import ViewerAuth
from streamer.policy.failsafe import FailsafeRule
from streamer.policy.store import ChangeResult, PolicyStore, WriteOptions
from streamer.vocabulary import Mode

__all__ = [
    "ACTOR",
    "API_PREFIX",
    "CTX",
    "FLOWS_PATH",
    "STATUS_CODES",
    "ApiContext",
    "ApiError",
    "ApiSetupError",
    "error_response",
    "json_response",
    "short",
    "wall_time",
]

API_PREFIX: Final = "/api/v1"
# The feed's path: authentication takes its token from the query there (streamer/api/auth.py).
FLOWS_PATH: Final = f"{API_PREFIX}/flows"
_MAX_LISTED_ERRORS: Final = 100
STATUS_CODES: Final[dict[int, str]] = {
    400: "invalid",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    421: "misdirected_request",
    500: "internal",
    503: "unavailable",
}


class ApiSetupError(RuntimeError):
    """The API cannot start (token file, listen address); the message is for the operator."""


@dataclass
class ApiContext:
    """What the API serves from. `token` None means --no-auth.

    `bind_hosts`: host names/addresses the API is reachable by (`start_api` adds the listen
    hosts); localhost, 127.0.0.1 and ::1 are always accepted in `Host`.
    `extra_stats`: more counters for /stats and /metrics (the event pipeline's).
    `reload(actor, opts)`: re-apply the agent's policy file as a whole-set replace (`POST
    /api/v1/policies/reload`, `microseg policy load`); None: that route answers 404.
    `flows`: the live flow feed (a `streamer.events.sinks.websocket.WebSocketHub`) behind
    `GET /api/v1/flows`; None: that route answers 503.
    `fleet_flows`: the fleet feed (another WebSocketHub, fed by streamer.events.fleetfeed
    from the fleet's flows topic) behind `?source=fleet` of the same routes; None: no fleet.
    `policy_mode` and `failsafe`: what the agent was started with (`--policy-mode`,
    `--failsafe`).
    `lockout`: the lockout guard (streamer.policy.lockout.LockoutGuard) every write from a
    connection crossing an attached interface is checked by; None: no check.
    """

    store: PolicyStore
    datapath: Any
    interfaces: list[str]
    version: str
    started_monotonic: float
    token: str | None
    bind_hosts: set[str]
    registry: CollectorRegistry
    extra_stats: Callable[[], dict[str, Any]] | None = None
    reload: Callable[[str, WriteOptions], Awaitable[ChangeResult]] | None = None
    flows: Any = None
    fleet_flows: Any = None
    # --policy-mode and --failsafe (contract §6): /status, dry runs and promote show them.
    policy_mode: Mode = Mode.ENFORCE
    failsafe: tuple[FailsafeRule, ...] = ()
    lockout: Any = None
    # Fleet mode (contract §7): the follower (streamer.fleet.follower.Follower), for /status.
    fleet: Any = None
    # The browser viewer's one-time sign-in codes and sessions (streamer/api/signin.py).
    viewer: ViewerAuth = field(default_factory=lambda: ViewerAuth(), repr=False)


CTX: Final = web.AppKey("microseg_ctx", ApiContext)
ACTOR: Final = web.RequestKey("microseg_actor", str)


class ApiError(Exception):
    """An answer other than success; becomes `{"error": code, "message": message}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        errors: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or STATUS_CODES.get(status, f"http_{status}")
        self.message = message
        self.errors = errors
        self.headers = headers


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int,
    code: str,
    message: str,
    errors: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {"error": code, "message": message}
    if errors is not None and len(errors) > 1:
        body["errors"] = errors[:_MAX_LISTED_ERRORS]
    return json_response(body, status, headers)


def short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def wall_time(monotonic_ns: int) -> str | None:
    """A CLOCK_MONOTONIC stamp as RFC 3339 UTC (millisecond precision: the kernel's clock is
    coarse); None for 0 (never)."""
    if monotonic_ns <= 0:
        return None
    wall = time.time() - (time.monotonic() - monotonic_ns / 1e9)
    return (
        datetime.fromtimestamp(wall, tz=UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
