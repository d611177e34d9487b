"""The datapath: one classifier instance, loaded, fed policies, read and attached.

In: a DatapathConfig (which instance, table sizes, idle timeouts) and compiled policies. Out:
programs attached at the TC ingress and egress hooks (tcx links, or clsact filters on kernels
without tcx), a policy bank switched atomically per apply, counters, sessions (with their TCP
state), per-rule hits, a ring buffer of flow events, and the programs' fds for
BPF_PROG_TEST_RUN. Under load: `reap_expired` (call it periodically: it removes sessions past
their idle timeout and stale first fragments), `pressure`, `map_fill`, `session_gauges` and
`drops_by_reason` (exact gauges from counters; no walk of the session table).

Maps (and tcx links) are pinned under <pin_root>/<instance>/ so enforcement outlives the agent:
programs stay attached when the process dies, and the next start adopts the same maps (sessions,
rules, counters) and swaps its programs in atomically (a link update, or `tc filter replace`).

`Datapath` composes the parts, each a module of this package: loader (the build, pins), banks
(apply, the flip, retiring the old bank), tables (reading), reaper (timeouts, removals),
attach (TC hooks), maps and bindings (raw libbpf access), layout (the kernel's structs).
`with Datapath(cfg) as dp:` loads it and closes it on leaving (pins stay: `remove_pins`).
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from streamer.datapath import attach as attaching
from streamer.datapath import loader, reaper
from streamer.datapath.banks import Banks
from streamer.datapath.compiler import CompiledPolicy
from streamer.datapath.config import DatapathConfig, DatapathError
from streamer.datapath.maps import Maps, Ring
from streamer.datapath.reference import Timeouts
from streamer.datapath.ruletables import RuleTables, TableChange
from streamer.datapath.tables import IPAddress, MapFill, RuleCounters, Session, Tables
from streamer.policy.failsafe import FailsafeRule

log = logging.getLogger("microseg.datapath")


class Datapath:
    """One loaded classifier instance. `apply` serializes itself (a lock) and may run in a worker
    thread while readers (counters, sessions) run on the loop; the old bank is retired beside it.
    A failure retiring it is raised by the next `apply` or `close` if a retry fails too."""

    def __init__(self, config: DatapathConfig) -> None:
        self.config = config
        self._maps = Maps()
        self._progs: dict[str, loader.Program] = {}
        self._banks = Banks(self._maps, config)
        self._reaper = reaper.Reaper(self._maps, config)
        self._tables = Tables(self._maps, config, self._banks, self._reaper)
        self.adopted = False  # the pinned maps held an applied generation when we loaded
        self.attached_as: dict[str, str] = {}  # interface -> "tcx" or "tc", as attach chose
        self.compiled = False  # the last load compiled the classifier (no cached build)

    # ---- life --------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the classifier (built first when the cache has no build of it), adopting
        pinned maps of a compatible layout."""
        loaded = loader.load_classifier(self.config, self._maps)
        self._progs, self.compiled = loaded.progs, loaded.compiled
        # the timeouts and the failsafe entries, before a packet of ours is judged
        before = self._reaper.read_settings()
        self.set_timeouts(self.config.timeouts)
        self._reaper.read_reaped()
        self.adopted = self._banks.adopt()
        if self.adopted and before is not None and before != self._reaper.read_settings():
            # Live sessions were judged under other failsafe entries (or timeouts): the
            # generation the pins hold must not be kept, or a flow the old list passed would
            # stay passed until the next policy change.
            log.info("the failsafe entries or timeouts changed since the pins were written")
            self.adopted = False

    @property
    def loaded(self) -> bool:
        return bool(self._progs)

    def close(self) -> None:
        """Release our references; pinned maps and attached filters stay. Waits for the old
        bank's retirement first (and raises its failure, once our references are gone)."""
        try:
            self._banks.close()
        finally:
            loader.release(self._maps, self._progs)

    def __enter__(self) -> Datapath:
        """Load; close on leaving, or at once when loading fails half way."""
        try:
            self.load()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def remove_pins(self) -> None:
        """Delete this instance's pin directory (after detaching everywhere)."""
        loader.remove_tree(self.config.instance_dir)

    # ---- policy (streamer.datapath.banks) ------------------------------------------------

    def active(self) -> tuple[int, int]:
        """(generation, bank) in force; generation 0 means no policy was ever applied."""
        return self._banks.active()

    def apply(
        self, compiled: CompiledPolicy, generation: int | None = None, keep: bool = False
    ) -> int:
        """Switch the classifier to a whole compiled set in one step; returns the new
        generation (`keep`: stay at `generation` when it is the live one: a restart rewriting
        what the pinned maps enforce). On failure the live bank is untouched."""
        return self.apply_tables(
            RuleTables.build(compiled, self.config.max_shapes), generation, keep
        )

    def apply_tables(
        self, tables: RuleTables, generation: int | None = None, keep: bool = False
    ) -> int:
        """`apply` of tables already built (streamer.datapath.ruletables.RuleTables.build)."""
        return self._banks.apply_tables(tables, generation, keep)

    @property
    def tables(self) -> RuleTables | None:
        """The live rule tables (None before the first apply of this instance)."""
        return self._banks.tables

    def begin_change(self) -> TableChange:
        """A change of the live tables to build up and give to `apply_change`."""
        tables = self._banks.tables
        if tables is None:
            raise DatapathError("no policy applied yet: apply a whole set first")
        return tables.begin()

    def apply_change(self, change: TableChange, generation: int | None = None) -> int:
        """Switch the classifier to the live tables with `change` made, writing only what it
        touches; returns the new generation. On failure nothing changed."""
        return self._banks.apply_change(change, generation)

    def settle(self) -> None:
        """Wait until the bank retired by the last apply is cleared (tests, shutdown)."""
        self._banks.settle()

    # ---- reading (streamer.datapath.tables) ------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Global counters summed over CPUs, packets by direction and verdict, and the session
        gauges derived from them (see `session_gauges`)."""
        return self._tables.counters()

    def session_gauges(self) -> dict[str, int]:
        """Exact session-table gauges, cheap (no walk): `active_sessions` (entries in the table:
        inserted minus renewed, reaped and cleared), `half_open_sessions` (SYN_SENT/SYN_RECV),
        `expired_sessions`, `closed_sessions_removed`, `cleared_sessions`."""
        return self._tables.session_gauges()

    def drops_by_reason(self) -> dict[str, int]:
        """Dropped packets by reason (see streamer.datapath.tables.drops_by_reason)."""
        return self._tables.drops_by_reason()

    def rule_counters(self, rule_id: int) -> RuleCounters:
        """Hits of one rule (packets and bytes of the flows it decided), or zeros if unknown."""
        return self._tables.rule_counters(rule_id)

    def default_counters(self) -> RuleCounters:
        """Packets and bytes decided by the default action."""
        return self._tables.default_counters()

    def failsafe_counters(self) -> RuleCounters:
        """Packets and bytes of failsafe flows (their per-rule counter slot)."""
        return self._tables.failsafe_counters()

    def all_rule_counters(self) -> dict[int, RuleCounters]:
        return self._tables.all_rule_counters()

    def sessions(self, limit: int | None = None) -> Iterator[Session]:
        """Session table entries (a snapshot walk: entries may come and go meanwhile)."""
        return self._tables.sessions(limit)

    def session_of(
        self, ifindex: int, proto: int, src: IPAddress, dst: IPAddress, sport: int, dport: int
    ) -> Session | None:
        """The session a packet of this 5-tuple on `ifindex` belongs to (either direction):
        one lookup by key, no walk. None when there is none."""
        return self._tables.session_of(ifindex, proto, src, dst, sport, dport)

    def session_count(self) -> int:
        """Entries in the session table: exact, from counters (no walk)."""
        return self._tables.session_count()

    def map_fill(self, counters: dict[str, int] | None = None) -> dict[str, MapFill]:
        """Entries, capacity and fill ratio of every map that fills up (see Tables.map_fill).
        `counters`: a `counters()` reading to use instead of taking one."""
        return self._tables.map_fill(counters)

    def pressure(self) -> dict[str, Any]:
        """What the operator watches under load, in one read: the session gauges, the
        counters to take rates of (new_sessions, syn_new_sessions), drops by reason and the
        fill of every map (`fill`: name -> {entries, capacity, ratio, evictions})."""
        return self._tables.pressure()

    # ---- state: timeouts, the reaper (streamer.datapath.reaper) ---------------------------

    def clear_sessions(self) -> None:
        """Remove every session (counted as `cleared_sessions`)."""
        self._reaper.clear_sessions()

    def clear_fragments(self) -> None:
        """Forget every remembered first fragment (counted as `fragments_expired`)."""
        self._reaper.clear_fragments()

    @property
    def timeouts(self) -> Timeouts:
        return self._reaper.timeouts

    def set_timeouts(self, timeouts: Timeouts) -> None:
        """Idle timeouts the classifier and the reaper use from now on (live sessions too)."""
        self._reaper.set_timeouts(timeouts)

    @property
    def failsafe(self) -> tuple[FailsafeRule, ...]:
        """The failsafe entries in force (the config's, unless `set_failsafe` changed them)."""
        return self._reaper.failsafe

    def set_failsafe(self, failsafe: tuple[FailsafeRule, ...]) -> None:
        """Failsafe entries from now on: checked when a flow is judged (a new flow, or a live
        one after the next policy change), before any rule."""
        self._reaper.set_failsafe(failsafe)

    @staticmethod
    def now_ns() -> int:
        """The classifier's clock (CLOCK_MONOTONIC, coarse), in ns."""
        return reaper.now_ns()

    def reap_expired(self, now_ns: int | None = None) -> dict[str, int]:
        """Remove sessions idle beyond their timeout (finished TCP sessions after their short
        linger) and first fragments older than theirs; returns how many of each went:
        `expired` (open sessions), `closed` (TIME_WAIT/CLOSED), `fragments`.

        Call it periodically (the agent does, every few seconds). `now_ns` is on `now_ns()`'s
        clock (tests pass one to look into the future)."""
        return self._reaper.reap_expired(now_ns)

    # ---- events ------------------------------------------------------------------------------

    def open_events(self, callback: Callable[[bytes], bool | None]) -> int:
        """Route ring-buffer records (raw struct ms_event bytes, copied) to callback, in
        place of any callback before.

        A callback returning False ends the current consume_events() after that record (the
        rest stays in the ring for the next call). Returns the epoll fd to watch; call
        consume_events() when it is readable.
        """
        ring = Ring(self._maps.fds["events"], callback)
        if self._maps.ring is not None:
            self._maps.ring.close()
        self._maps.ring = ring
        return ring.epoll_fd()

    def consume_events(self) -> None:
        if self._maps.ring is not None:
            self._maps.ring.consume()

    def events_ring(self) -> tuple[int, int]:
        """The ring buffer's map fd and its data size in bytes (a power of two), for a reader
        that maps it itself (streamer.events.source.RingReader) instead of `open_events`."""
        return self._maps.fds["events"], self.config.ringbuf_pages * mmap.PAGESIZE

    # ---- attaching (streamer.datapath.attach) ----------------------------------------------

    def attach(self, ifname: str, netns: str | None = None) -> int:
        """Attach (or atomically replace) our programs on the TC ingress and egress hooks of
        ifname: as pinned tcx links, or as filters on a clsact qdisc (`attach_mode`).

        Returns the interface index. An attachment of ours in the other form goes only once
        the new one judges, so no packet passes unjudged. Records the mode and whether it
        created the clsact qdisc, so detach removes only what we added.
        """
        index, mode = attaching.attach(self.config, self._progs, ifname, netns)
        self.attached_as[ifname] = mode
        return index


def prog_fd(dp: Datapath, direction: str) -> int:
    """The fd of the ingress or egress program, for streamer.datapath.bindings.test_run."""
    return dp._progs["ms_ingress" if direction == "ingress" else "ms_egress"].fd
