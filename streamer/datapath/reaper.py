"""Removing state: idle timeouts, the reaper, and clearing sessions and fragments.

In: Timeouts (written to the classifier's `settings` with the failsafe entries, which live
there too, and used here) and the loaded maps.
Out: sessions past their idle timeout and first fragments past theirs removed
(`reap_expired`, called periodically), or every session or fragment (`clear_*`); every
removal counted in struct ms_reaped (`reaped`), which userspace alone writes and which the
gauges subtract, so active = inserted - renewed - removed stays exact without a table walk.
"""

from __future__ import annotations

import struct
import threading
import time

from streamer.datapath.config import DatapathConfig
from streamer.datapath.layout import (
    FRAG_KEY,
    FRAG_VAL,
    MS_TCP_SYN_RECV,
    MS_TCP_SYN_SENT,
    MS_TCP_TIME_WAIT,
    MS_TO_FRAGMENT,
    MS_TO_MAX,
    REAPED,
    SESS_KEY,
    SESS_VAL,
    SETTINGS,
)
from streamer.datapath.maps import Maps, array_key
from streamer.datapath.reference import Timeouts
from streamer.datapath.settings import pack_settings
from streamer.policy.failsafe import FailsafeRule

CLOCK_MONOTONIC_COARSE = 6  # bpf_ktime_get_coarse_ns() reads this clock
_LAST_SEEN_OFF = SESS_VAL.offset("last_seen")
_TCP_STATE_OFF = SESS_VAL.offset("tcp_state")
_TCLASS_OFF = SESS_VAL.offset("tclass")
_PROTO_OFF = SESS_KEY.offset("proto")
_HALF_OPEN = (MS_TCP_SYN_SENT, MS_TCP_SYN_RECV)
_FV_FIRST_SEEN = FRAG_VAL.index("first_seen")
# positions of struct ms_reaped's counters in `Reaper.reaped`
R_EXPIRED, R_CLOSED, R_HALF_OPEN, R_CLEARED, R_FRAGS = (
    REAPED.index(f) for f in ("expired", "closed", "half_open", "cleared", "frags")
)


def proto_is_tcp(sess_key: bytes) -> bool:
    """Whether a raw struct ms_sess_key is a TCP flow's."""
    return sess_key[_PROTO_OFF] == 6


def _expired(val: bytes, timeouts_ns: list[int], now: int) -> bool:
    last: int = struct.unpack_from("<Q", val, _LAST_SEEN_OFF)[0]
    return now > last and now - last > timeouts_ns[val[_TCLASS_OFF] & (MS_TO_MAX - 1)]


def now_ns() -> int:
    """The classifier's clock (CLOCK_MONOTONIC, coarse), in ns."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


class Reaper:
    """Timeouts and removals of one classifier; `reaped` is struct ms_reaped as last written."""

    def __init__(self, maps: Maps, config: DatapathConfig) -> None:
        self._maps = maps
        self._config = config
        self.timeouts = config.timeouts
        self.failsafe: tuple[FailsafeRule, ...] = config.failsafe
        self.reaped: list[int] = [0] * len(REAPED.unpack(bytes(REAPED.size)))
        self._lock = threading.Lock()

    def read_reaped(self) -> None:
        """Take up the counts a previous agent left in the pinned map."""
        raw = self._maps.lookup("reaped", array_key(0), REAPED.size)
        self.reaped = list(REAPED.unpack(raw)) if raw else [0] * len(self.reaped)

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Idle timeouts the classifier and the reaper use from now on (live sessions too)."""
        self._write_settings(timeouts, self.failsafe)
        self.timeouts = timeouts

    def set_failsafe(self, failsafe: tuple[FailsafeRule, ...]) -> None:
        """Failsafe entries flows are judged by from now on (live sessions at their next
        judgement: a new flow, or after a policy change)."""
        self._write_settings(self.timeouts, failsafe)
        self.failsafe = failsafe

    def read_settings(self) -> bytes | None:
        """The settings value the classifier holds (None: never written)."""
        raw = self._maps.lookup("settings", array_key(0), SETTINGS.size)
        return raw if raw and any(raw) else None

    def _write_settings(self, timeouts: Timeouts, failsafe: tuple[FailsafeRule, ...]) -> None:
        # One value: the timeouts and the failsafe entries are always written together.
        raw = pack_settings(self._config.event_interval_ns, timeouts, failsafe)
        self._maps.write("settings", array_key(0), raw)

    def clear_sessions(self) -> None:
        """Remove every session (counted as `cleared_sessions`)."""
        maps = self._maps
        with self._lock:
            cleared = half = 0
            for k in list(maps.keys("sessions", SESS_KEY.size)):
                raw = maps.lookup("sessions", k, SESS_VAL.size)
                if maps.delete("sessions", k):
                    cleared += 1
                    if proto_is_tcp(k) and raw is not None and raw[_TCP_STATE_OFF] in _HALF_OPEN:
                        half += 1
            self._count(cleared=cleared, half_open=half)

    def clear_fragments(self) -> None:
        """Forget every remembered first fragment (counted as `fragments_expired`)."""
        with self._lock:
            n = 0
            for k in list(self._maps.keys("frags", FRAG_KEY.size)):
                if self._maps.delete("frags", k):
                    n += 1
            self._count(frags=n)

    def _count(
        self,
        expired: int = 0,
        closed: int = 0,
        half_open: int = 0,
        cleared: int = 0,
        frags: int = 0,
    ) -> None:
        if not (expired or closed or half_open or cleared or frags):
            return
        r = self.reaped
        r[R_EXPIRED] += expired
        r[R_CLOSED] += closed
        r[R_HALF_OPEN] += half_open
        r[R_CLEARED] += cleared
        r[R_FRAGS] += frags
        self._maps.write("reaped", array_key(0), REAPED.pack(*r))

    def reap_expired(self, now: int | None = None) -> dict[str, int]:
        """Remove sessions idle beyond their timeout (finished TCP sessions after their short
        linger) and first fragments older than theirs; returns how many of each went:
        `expired` (open sessions), `closed` (TIME_WAIT/CLOSED), `fragments`.

        Each candidate is read again just before it is deleted, so a flow that woke up
        meanwhile stays; one that wakes in the microseconds between that read and the delete
        is judged as new at its next packet. `now` is on `now_ns()`'s clock."""
        now = now_ns() if now is None else now
        to = self.timeouts.by_class_ns()
        maps = self._maps
        with self._lock:
            candidates = [
                (k, v[_LAST_SEEN_OFF : _LAST_SEEN_OFF + 8])
                for k, v in maps.walk("sessions", SESS_KEY.size, SESS_VAL.size)
                if _expired(v, to, now)
            ]
            expired = closed = half = 0
            for k, seen in candidates:
                v = maps.lookup("sessions", k, SESS_VAL.size)
                if v is None or v[_LAST_SEEN_OFF : _LAST_SEEN_OFF + 8] != seen:
                    continue
                if not maps.delete("sessions", k):
                    continue
                state = v[_TCP_STATE_OFF] if proto_is_tcp(k) else 0
                if state >= MS_TCP_TIME_WAIT:
                    closed += 1
                else:
                    expired += 1
                if state in _HALF_OPEN:
                    half += 1
            limit = to[MS_TO_FRAGMENT]
            old = [
                k
                for k, v in maps.walk("frags", FRAG_KEY.size, FRAG_VAL.size)
                if now > FRAG_VAL.unpack(v)[_FV_FIRST_SEEN]
                and now - FRAG_VAL.unpack(v)[_FV_FIRST_SEEN] > limit
            ]
            frags = sum(1 for k in old if maps.delete("frags", k))
            self._count(expired=expired, closed=closed, half_open=half, frags=frags)
        return {"expired": expired, "closed": closed, "fragments": frags}
