"""Source: the ring buffer's records, drained on the event loop (no thread).

In: a loaded Datapath. Out: batches of raw records (bytes, one struct ms_event each) handed
synchronously to `handle`, and increases of the kernel's `events_lost` counter (ring-buffer
reservations that failed) handed to `on_lost`. The ring buffer's epoll fd is watched with
`loop.add_reader`; the callback only copies each record into the current batch, so the kernel
can reuse the space at once. `handle` must not block: what follows it is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("microseg.source")


@dataclass(frozen=True)
class SourceConfig:
    lost_poll_interval: float = 0.5  # how often the kernel's lost counter is read
    # Records per drain: a larger backlog is taken in several drains with the event loop
    # free in between, so one burst never monopolises it (and queues downstream stay sane).
    max_batch: int = 4096
    # After a drain that did not fill a batch, the ring buffer is left alone this long, so
    # events arriving at a moderate rate are taken (and sent on) in batches rather than one
    # wakeup each; at a high rate every drain is full and there is no pause. The ring buffer
    # must hold this long's events (256 pages hold ~12,000).
    min_drain_interval: float = 0.002


class Source:
    def __init__(
        self,
        datapath: Any,
        handle: Callable[[list[bytes]], None],
        on_lost: Callable[[int], None],
        config: SourceConfig | None = None,
        *,
        drain_mark: Callable[[], int] | None = None,
        drained: Callable[[int], None] | None = None,
    ) -> None:
        """`drain_mark()` is called before each drain and its value given to `drained()`
        after it (the enricher retires policy generations this way)."""
        self.datapath = datapath
        self.config = config or SourceConfig()
        self._handle = handle
        self._on_lost = on_lost
        self._drain_mark = drain_mark
        self._drained = drained
        self._batch: list[bytes] = []
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused: asyncio.TimerHandle | None = None
        self._lost_base = 0
        self.received = 0
        self.drains = 0
        self.max_batch = 0
        self.kernel_lost = 0  # since start
        self.handle_errors = 0
        self.busy_ns = 0  # time spent draining and handling

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open the ring buffer and watch it; the lost counter's baseline is read now (an
        adopted classifier's counters carry earlier runs' losses)."""
        self._lost_base = int(self.datapath.counters().get("events_lost", 0))
        self._fd = self.datapath.open_events(self._take)
        self._loop = loop
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        n = self.consume()
        if n < self.config.max_batch and self.config.min_drain_interval > 0:
            assert self._loop is not None and self._fd is not None
            self._loop.remove_reader(self._fd)
            self._paused = self._loop.call_later(self.config.min_drain_interval, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self._fd is not None and self._loop is not None:
            self._loop.add_reader(self._fd, self._readable)

    def _take(self, record: bytes) -> bool:
        self._batch.append(record)
        return len(self._batch) < self.config.max_batch

    def consume(self) -> int:
        """Drain up to max_batch records now and hand them on; returns how many.

        What is left stays readable, so the loop calls this again after other work."""
        t0 = time.monotonic_ns()
        mark = self._drain_mark() if self._drain_mark is not None else 0
        self.datapath.consume_events()
        batch = self._batch[:]
        self._batch.clear()
        self.drains += 1
        if batch:
            self.received += len(batch)
            self.max_batch = max(self.max_batch, len(batch))
            try:
                self._handle(batch)
            except Exception:
                # A bug downstream must not stop the draining (the kernel would start
                # losing events); the stages count what they dropped.
                self.handle_errors += 1
                log.exception("handling %d flow events failed", len(batch))
        if self._drained is not None:
            self._drained(mark)
        self.busy_ns += time.monotonic_ns() - t0
        return len(batch)

    def drain(self, max_rounds: int = 1024) -> None:
        """Everything in the ring buffer now (bounded), for the lost check and the stop."""
        for _ in range(max_rounds):
            if self.consume() < self.config.max_batch:
                return

    def check_lost(self) -> int:
        """Report an increase of the kernel's lost counter (after draining what did make it,
        so the lost record lands after those events)."""
        self.drain()
        total = int(self.datapath.counters().get("events_lost", 0)) - self._lost_base
        delta = total - self.kernel_lost
        if delta > 0:
            self.kernel_lost = total
            self._on_lost(delta)
        return max(delta, 0)

    async def run(self) -> None:
        """Poll the lost counter until cancelled."""
        while True:
            await asyncio.sleep(self.config.lost_poll_interval)
            try:
                self.check_lost()
            except Exception as e:  # a map read failing must not end the polling
                log.warning("reading the kernel's lost-event counter failed: %s", e)

    def stop(self) -> None:
        """Stop watching; a last drain and lost check first."""
        if self._fd is not None and self._loop is not None:
            if self._paused is not None:
                self._paused.cancel()
                self._paused = None
            self._loop.remove_reader(self._fd)
            try:
                self.check_lost()
            except Exception as e:
                log.warning("last drain of the ring buffer failed: %s", e)
            self._fd = None

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "drains": self.drains,
            "max_batch": self.max_batch,
            "kernel_lost": self.kernel_lost,
            "handle_errors": self.handle_errors,
            "busy_seconds": round(self.busy_ns / 1e9, 3),
        }
