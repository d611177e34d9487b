"""The file sink: one JSON object per line, rotated by size.

In: a channel of Items. Out: `<path>` (each record as it is, or as an OCSF event with
`format="ocsf"`: streamer.events.ocsf), and when it would grow past `max_bytes`, the older
lines move to `<path>.1` (`.1` to `.2`, ... up to `.keep`; beyond that they are deleted).
Each batch taken from the queue is written and flushed at once (one write call when the
batch is big). A write that fails (disk full, file removed under us) drops the
batch, counts it, logs (rate-limited), and leaves a `lost` record for when writing works again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from streamer.events.fanout import Channel, Item, RateLimitedLog
from streamer.events.ocsf import EVENT_FORMATS, EventFormat, ocsf_items

log = logging.getLogger("microseg.sink.file")

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_KEEP = 5


@dataclass(frozen=True)
class FileSinkConfig:
    path: Path
    max_bytes: int = DEFAULT_MAX_BYTES  # 0: never rotate
    keep: int = DEFAULT_KEEP  # rotated files kept beside the live one
    format: EventFormat = "microseg"  # ocsf: each record as an OCSF 1.3.0 event

    def __post_init__(self) -> None:
        if self.format not in EVENT_FORMATS:
            raise ValueError(f"events file format {self.format!r}: not one of {EVENT_FORMATS}")


class FileSink:
    name = "file"

    def __init__(self, config: FileSinkConfig) -> None:
        self.config = config
        self.written = 0  # events
        self.lost_written = 0  # lost records
        self.failed = 0  # events whose write failed
        self.rotations = 0
        self.bytes = 0
        self._out: IO[bytes] | None = None
        self._size = 0
        self._ratelog = RateLimitedLog(log)
        self._ocsf = config.format == "ocsf"

    def _open(self) -> IO[bytes]:
        if self._out is None:
            path = self.config.path
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = path.open("ab")
            self._size = self._out.tell()
        return self._out

    def _close(self) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            self._out = None

    def _rotate(self) -> None:
        self._close()
        path, keep = self.config.path, self.config.keep
        if keep <= 0:
            path.unlink(missing_ok=True)
        else:
            Path(f"{path}.{keep}").unlink(missing_ok=True)
            for i in range(keep - 1, 0, -1):
                older = Path(f"{path}.{i}")
                if older.exists():
                    os.replace(older, f"{path}.{i + 1}")
            if path.exists():
                os.replace(path, f"{path}.1")
        self.rotations += 1
        log.info("rotated %s (%d rotated files kept)", path, keep)

    def write(self, items: list[Item]) -> None:
        """Write and flush `items` as lines (rotating as needed); OSError: none of them
        counts as written, and the file is closed (reopened at the next batch)."""
        limit = self.config.max_bytes
        out = self._open()
        events = nbytes = 0
        for item in items:
            line = item.data + b"\n"
            if limit > 0 and self._size > 0 and self._size + len(line) > limit:
                out.flush()
                self._rotate()
                out = self._open()
            out.write(line)
            self._size += len(line)
            nbytes += len(line)
            events += not item.is_lost
        out.flush()
        self.written += events
        self.lost_written += len(items) - events
        self.bytes += nbytes

    async def run(self, channel: Channel) -> None:
        try:
            try:
                self._open()  # the file exists from the start, events or not
            except OSError as e:
                self._ratelog(logging.ERROR, "open", "events file %s: %s", self.config.path, e)
            while True:
                items = await channel.get_batch(4096)
                if not items:
                    break
                if self._ocsf:
                    items = ocsf_items(items)
                try:
                    self.write(items)
                except OSError as e:
                    self._failed(channel, items, e)
        finally:
            self._close()

    def _failed(self, channel: Channel, items: list[Item], e: OSError) -> None:
        # What sits in the buffer is lost with the file object: count the whole batch (the
        # buffer holds at most what this batch added since the last flush).
        self._close()
        events = [i for i in items if not i.is_lost]
        self.failed += len(events)
        channel.report_lost(
            sum(i.weight for i in items), min(i.seq for i in items), max(i.seq for i in items)
        )
        self._ratelog(
            logging.ERROR,
            "write",
            "events file %s: writing %d events failed: %s (counted as lost)",
            self.config.path,
            len(events),
            e.strerror or e,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "delivered": self.written,
            "failed": self.failed,
            "dropped": self.failed,
            "lost_records_written": self.lost_written,
            "bytes": self.bytes,
            "rotations": self.rotations,
            "path": str(self.config.path),
        }
