"""The browser viewer's sign-in: one-time codes, the sessions they open, and the session cookie.

In: codes minted for a person (`ViewerAuth.mint`) and the codes and cookies browsers bring back.
Out: a session id for a good code (`redeem`), whether a cookie's session is live (`session_ok`),
and the cookie's name for a request (`cookie_name`). Codes and sessions live in this process's
memory, bounded: an agent restart signs every browser out, and beyond the bounds the ones closest
to expiry are dropped. The pages and routes that use them are in streamer/api/viewer.py.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Final

from aiohttp import web

__all__ = ["VIEWER_COOKIE", "ViewerAuth", "cookie_name"]

VIEWER_COOKIE: Final = "microseg_session"


class ViewerAuth:
    """One-time sign-in codes and the browser sessions they open; in memory, bounded.

    `mint()` -> a new code, valid `code_ttl` seconds. `redeem(code)` -> a new session id, or None
    for a code that is unknown, used or expired (a code works once, whatever the outcome).
    `session_ok(sid)` -> whether a cookie's session is live. Beyond `max_codes`/`max_sessions`
    the ones closest to expiry are dropped. Only hashes are kept, so a memory dump or a timing
    difference in the lookup gives nothing away.
    """

    def __init__(
        self,
        code_ttl: float = 1800.0,
        session_ttl: float = 12 * 3600.0,
        max_codes: int = 64,
        max_sessions: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.code_ttl = code_ttl
        self.session_ttl = session_ttl
        self._max_codes = max_codes
        self._max_sessions = max_sessions
        self._clock = clock
        self._codes: dict[bytes, float] = {}
        self._sessions: dict[bytes, float] = {}

    @staticmethod
    def _key(secret: str) -> bytes:
        return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()

    def _make_room(self, table: dict[bytes, float], limit: int) -> None:
        now = self._clock()
        for key in [k for k, expiry in table.items() if expiry <= now]:
            del table[key]
        while len(table) >= limit:
            del table[min(table, key=table.__getitem__)]

    def mint(self) -> str:
        self._make_room(self._codes, self._max_codes)
        code = secrets.token_urlsafe(24)
        self._codes[self._key(code)] = self._clock() + self.code_ttl
        return code

    def redeem(self, code: str) -> str | None:
        expiry = self._codes.pop(self._key(code), None)
        if expiry is None or expiry <= self._clock():
            return None
        self._make_room(self._sessions, self._max_sessions)
        sid = secrets.token_urlsafe(32)
        self._sessions[self._key(sid)] = self._clock() + self.session_ttl
        return sid

    def session_ok(self, sid: str | None) -> bool:
        if not sid or len(sid) > 128:
            return False
        expiry = self._sessions.get(self._key(sid))
        return expiry is not None and expiry > self._clock()


def cookie_name(request: web.BaseRequest) -> str:
    # Browsers share cookies across the ports of one host: one name per port keeps two
    # agents on one machine (say, on 8080 and 8081) from signing each other's browsers out.
    try:
        port = request.url.port
    except ValueError:
        port = None
    return f"{VIEWER_COOKIE}_{port}" if port else VIEWER_COOKIE
