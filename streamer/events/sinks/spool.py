"""A bounded first-in first-out spool of records on disk (the Kafka sink's, while the broker
is unreachable).

In: records (anything with a sequence number, a weight = events it stands for, a key and the
data: a `Rec` or the fan-out's `Item`). Out: `Rec`s, oldest first, via `take`. Records live
in segment files `seg-<n>.spool` in one directory (each record: a 20-byte header, the key, the
data); `head` names the first segment
and how much of it was taken, so a restarted agent resumes where the last one stopped (a record
taken but not yet delivered when the process died is lost with it; one taken and handed back
with `prepend` is kept). When appending would take the spool past `max_bytes`, the oldest
segments are deleted and what they held is returned as `Dropped`, for the caller to count and
report; nothing else is ever dropped.

Not thread-safe: one owner (the sink's task) calls everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple, Protocol

from streamer.events.fanout import LOST_KEY_PREFIX

log = logging.getLogger("microseg.spool")

HEADER = struct.Struct("<IIQI")  # key length, value length, seq, weight
_SEG_RE = re.compile(r"^seg-(\d{12})\.spool$")
_BASE_SEGMENT = 10**11  # room below for segments put in front (prepend)
_READ_CHUNK = 1 << 20
MIN_SEGMENT_BYTES = 4096


class Record(Protocol):
    """What the spool stores of a record."""

    @property
    def seq(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def key(self) -> bytes: ...
    @property
    def data(self) -> bytes: ...
    @property
    def is_lost(self) -> bool: ...
    @property
    def spooled(self) -> bool: ...  # read back from a spool


class Rec(NamedTuple):
    """One record: ordered by `seq` (unique within a stream)."""

    seq: int
    weight: int
    key: bytes
    data: bytes
    spooled: bool = False  # came out of the spool (for "replayed" accounting)

    @property
    def is_lost(self) -> bool:
        return self.key.startswith(LOST_KEY_PREFIX)


# Rec(...) without its Python-level __new__ (the spool reads back many records at a time).
_new_rec = tuple.__new__


@dataclass
class Dropped:
    """What `append` deleted to make room: `records` records standing for `weight` events,
    sequence numbers `first_seq`..`last_seq`."""

    records: int
    weight: int
    first_seq: int
    last_seq: int


@dataclass
class _Seg:
    no: int
    path: Path
    size: int = 0  # bytes in the file
    records: int = 0  # records not yet taken
    weight: int = 0
    first_seq: int = 0  # of the first record not yet taken (0: none seen)
    last_seq: int = 0
    read_off: int = 0  # bytes already taken


class SpoolError(RuntimeError):
    """The spool directory cannot be used; the message says why."""


class Spool:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        if max_bytes <= 0:
            raise SpoolError(f"spool size must be positive, not {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = max(MIN_SEGMENT_BYTES, segment_bytes or min(8 << 20, max_bytes // 8))
        self._segs: deque[_Seg] = deque()
        self._writer: IO[bytes] | None = None
        self._writer_no = -1
        self._floor_no = _BASE_SEGMENT
        self._bytes = 0
        self._records = 0
        self._weight = 0
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._recover()
        except OSError as e:
            raise SpoolError(f"spool directory {directory}: {e.strerror or e}") from e

    # ---- sizes ----------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of records not yet taken."""
        return self._bytes

    @property
    def records(self) -> int:
        return self._records

    @property
    def weight(self) -> int:
        """Events the records not yet taken stand for."""
        return self._weight

    @property
    def empty(self) -> bool:
        return self._records == 0

    # ---- recovery ---------------------------------------------------------------------------

    def _seg_path(self, no: int) -> Path:
        return self.directory / f"seg-{no:012d}.spool"

    def _recover(self) -> None:
        head_no, offsets = self._read_head()
        nos = sorted(int(m[1]) for p in self.directory.iterdir() if (m := _SEG_RE.match(p.name)))
        self._floor_no = max(_BASE_SEGMENT, head_no or 0, nos[-1] + 1 if nos else 0)
        for no in nos:
            path = self._seg_path(no)
            if head_no is not None and no < head_no:
                path.unlink(missing_ok=True)  # taken before the last stop
                continue
            seg = _Seg(no, path)
            start = offsets.get(no, 0)
            self._scan(seg, start)
            if seg.records == 0 and seg.size <= seg.read_off:
                path.unlink(missing_ok=True)
                continue
            self._segs.append(seg)
            self._bytes += seg.size - seg.read_off
            self._records += seg.records
            self._weight += seg.weight
        if self._records:
            log.info(
                "spool %s holds %d records (%d bytes) from an earlier run",
                self.directory,
                self._records,
                self._bytes,
            )

    def _scan(self, seg: _Seg, start: int) -> None:
        """Count the records of a segment file from `start`; a torn last record (a crash
        mid-write) is cut off."""
        size = seg.path.stat().st_size
        start = min(start, size)
        good = start
        with seg.path.open("rb") as f:
            f.seek(start)
            buf = b""
            pos = start
            while True:
                chunk = f.read(_READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                off = 0
                while len(buf) - off >= HEADER.size:
                    klen, vlen, seq, weight = HEADER.unpack_from(buf, off)
                    end = off + HEADER.size + klen + vlen
                    if end > len(buf):
                        break
                    if seg.records == 0:
                        seg.first_seq = seq
                    seg.records += 1
                    seg.weight += weight
                    seg.last_seq = seq
                    off = end
                buf = buf[off:]
                pos += off
                good = pos
        if good < size:
            log.warning("spool segment %s: cutting a torn record at byte %d", seg.path, good)
            with seg.path.open("r+b") as f:
                f.truncate(good)
        seg.size = good
        seg.read_off = start

    def _read_head(self) -> tuple[int | None, dict[int, int]]:
        """(the first segment still wanted, bytes already taken per segment)."""
        try:
            lines = (self.directory / "head").read_text().splitlines()
            pairs = [tuple(int(x) for x in line.split()) for line in lines if line.strip()]
            return pairs[0][0], {p[0]: p[1] for p in pairs}
        except (OSError, ValueError, IndexError):
            return None, {}

    def _write_head(self) -> None:
        # The first segment, then every partly taken one (after a prepend, the segment
        # behind the prepended one may be partly taken too).
        if self._segs:
            first = self._segs[0]
            lines = [f"{first.no} {first.read_off}"]
            lines += [f"{s.no} {s.read_off}" for s in list(self._segs)[1:] if s.read_off]
            text = "\n".join(lines) + "\n"
        else:
            text = f"{self._next_no()} 0\n"
        tmp = self.directory / "head.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.directory / "head")

    def _next_no(self) -> int:
        """A number after every segment there is or was (the head file may name one)."""
        return max(self._floor_no, self._segs[-1].no + 1 if self._segs else 0)

    # ---- writing ------------------------------------------------------------------------------

    def _tail_writer(self) -> tuple[_Seg, IO[bytes]]:
        tail = self._segs[-1] if self._segs else None
        if tail is None or tail.size >= self.segment_bytes:
            no = self._next_no()
            tail = _Seg(no, self._seg_path(no))
            self._segs.append(tail)
            self._floor_no = no + 1
        if self._writer is None or self._writer_no != tail.no:
            self._close_writer()
            self._writer = tail.path.open("ab")
            self._writer_no = tail.no
        return tail, self._writer

    def _close_writer(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None

    def append(self, recs: Sequence[Record]) -> Dropped | None:
        """Write `recs` after everything spooled; if that passes `max_bytes`, delete the
        oldest segments and return what they held. OSError if the disk refuses."""
        pack, hsize = HEADER.pack, HEADER.size
        i, n = 0, len(recs)
        while i < n:
            # One write per segment: the records that go into the tail before it is full
            # (a segment is full once it holds segment_bytes; the record that fills it may
            # go past).
            tail, w = self._tail_writer()
            parts: list[bytes] = []
            size, limit = tail.size, self.segment_bytes
            weight = 0
            j = i
            while j < n and (size < limit or j == i):
                rec = recs[j]
                key, data = rec.key, rec.data
                parts += (pack(len(key), len(data), rec.seq, rec.weight), key, data)
                size += hsize + len(key) + len(data)
                weight += rec.weight
                j += 1
            w.write(b"".join(parts))
            added = size - tail.size
            if tail.records == 0:
                tail.first_seq = recs[i].seq
            tail.size = size
            tail.records += j - i
            tail.weight += weight
            tail.last_seq = recs[j - 1].seq
            self._bytes += added
            self._records += j - i
            self._weight += weight
            i = j
        return self._enforce_limit()

    def _enforce_limit(self) -> Dropped | None:
        dropped: Dropped | None = None
        while self._bytes > self.max_bytes and len(self._segs) > 1:
            seg = self._segs.popleft()
            if seg.no == self._writer_no:
                self._close_writer()
            seg.path.unlink(missing_ok=True)
            self._bytes -= seg.size - seg.read_off
            self._records -= seg.records
            self._weight -= seg.weight
            if seg.records:
                if dropped is None:
                    dropped = Dropped(seg.records, seg.weight, seg.first_seq, seg.last_seq)
                else:
                    dropped.records += seg.records
                    dropped.weight += seg.weight
                    dropped.first_seq = min(dropped.first_seq, seg.first_seq)
                    dropped.last_seq = max(dropped.last_seq, seg.last_seq)
        if dropped is not None:
            self._write_head()
        return dropped

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def prepend(self, recs: Sequence[Record]) -> None:
        """Put `recs` (in order) before everything spooled: records taken and not delivered,
        handed back. They may take the spool past `max_bytes` (they are few: at most one
        send window), and are not dropped for it."""
        if not recs:
            return
        if not self._segs:
            self.append(recs)
            self.flush()
            return
        no = self._segs[0].no - 1
        seg = _Seg(no, self._seg_path(no))
        with seg.path.open("wb") as f:
            for rec in recs:
                f.write(HEADER.pack(len(rec.key), len(rec.data), rec.seq, rec.weight))
                f.write(rec.key)
                f.write(rec.data)
                seg.size += HEADER.size + len(rec.key) + len(rec.data)
                seg.weight += rec.weight
                seg.last_seq = rec.seq
        seg.records = len(recs)
        seg.first_seq = recs[0].seq
        self._segs.appendleft(seg)
        self._bytes += seg.size
        self._records += seg.records
        self._weight += seg.weight
        self._write_head()

    # ---- reading ------------------------------------------------------------------------------

    def take(self, max_records: int, max_bytes: int = 1 << 20) -> list[Rec]:
        """Remove and return the oldest records: at most `max_records`, and no more than
        `max_bytes` unless the first record alone is larger."""
        out: list[Rec] = []
        nbytes = 0
        while self._segs and len(out) < max_records and nbytes < max_bytes:
            seg = self._segs[0]
            if seg.no == self._writer_no:
                self.flush()
            if seg.read_off >= seg.size:
                if seg.no == self._writer_no:
                    break  # the live tail, fully taken: appends continue in it
                self._segs.popleft()
                seg.path.unlink(missing_ok=True)
                continue
            want = max(HEADER.size, min(max_bytes - nbytes, seg.size - seg.read_off))
            with seg.path.open("rb") as f:
                f.seek(seg.read_off)
                buf = f.read(want)
                off = 0
                while len(out) < max_records:
                    if len(buf) - off < HEADER.size:
                        break
                    klen, vlen, seq, weight = HEADER.unpack_from(buf, off)
                    end = off + HEADER.size + klen + vlen
                    if end > len(buf):
                        if off > 0 or out:
                            break
                        # The first record alone is larger than asked for: read it whole.
                        buf += f.read(end - len(buf))
                        if end > len(buf):
                            raise OSError(f"spool segment {seg.path} is truncated")
                    k0 = off + HEADER.size
                    out.append(
                        _new_rec(
                            Rec, (seq, weight, buf[k0 : k0 + klen], buf[k0 + klen : end], True)
                        )
                    )
                    seg.records -= 1
                    seg.weight -= weight
                    self._records -= 1
                    self._weight -= weight
                    off = end
            seg.read_off += off
            self._bytes -= off
            nbytes += off
            if seg.records == 0:
                seg.first_seq = 0
            elif out:
                seg.first_seq = out[-1].seq + 1
            if off == 0:
                break
        if out:
            self._write_head()
        return out

    def close(self) -> None:
        self._close_writer()
        with contextlib.suppress(OSError):
            self._write_head()
