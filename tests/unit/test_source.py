"""The memory-mapped ring-buffer reader's block copy (`RingReader.read_packed`) on a ring
buffer laid out by hand in a memfd (no kernel producer): committed records of the event size
come out as one `Packed` block that decodes like the records one by one; a record still being
written ends the block (and the read); a discarded one or one of another size is left to the
record-by-record reader, which skips or returns it.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from streamer.datapath.layout import EVENT
from streamer.events.decode import FlowEvent, Packed, decode, decode_batch, encode
from streamer.events.source import RingReader

PAGE = mmap.PAGESIZE
SIZE = 8192  # ring data bytes
BUSY, DISCARD = 1 << 31, 1 << 30
EVENT_SIZE = EVENT.size
STRIDE = (EVENT_SIZE + 8 + 7) & ~7


def _event(i: int) -> bytes:
    return encode(
        FlowEvent(
            1000 + i,
            1,
            60,
            1,
            None,
            1,
            4,
            6,
            "ingress",
            "deny",
            f"10.0.0.{i}",
            "10.0.0.254",
            40000 + i,
            80,
            2,
            "new",
        )
    )


class _Ring:
    """A ring buffer's three parts in one memfd: consumer page, producer page, data."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("ms-test-ring")
        os.ftruncate(self.fd, 2 * PAGE + 2 * SIZE)
        self.mem = mmap.mmap(self.fd, 2 * PAGE + 2 * SIZE)
        self.pos = 0

    def put(self, data: bytes, flags: int = 0) -> int:
        """Append a record (header flags as given); returns its position."""
        at = self.pos
        off = 2 * PAGE + (at & (SIZE - 1))
        self.mem[off : off + 8] = struct.pack("=II", len(data) | flags, 0)
        self.mem[off + 8 : off + 8 + len(data)] = data
        self.pos += (len(data) + 8 + 7) & ~7
        self.mem[PAGE : PAGE + 8] = struct.pack("=Q", self.pos)
        return at

    def commit(self, at: int) -> None:
        off = 2 * PAGE + (at & (SIZE - 1))
        (word,) = struct.unpack_from("=I", self.mem, off)
        struct.pack_into("=I", self.mem, off, word & ~BUSY)

    def consumer_pos(self) -> int:
        return int(struct.unpack_from("=Q", self.mem, 0)[0])

    def close(self) -> None:
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def ring() -> Iterator[_Ring]:
    r = _Ring()
    yield r
    r.close()


def test_committed_records_come_as_one_block_up_to_one_being_written(ring: _Ring) -> None:
    reader = RingReader(ring.fd, SIZE)
    try:
        evs = [_event(i) for i in range(5)]
        for e in evs[:3]:
            ring.put(e)
        busy = ring.put(evs[3], BUSY)
        ring.put(evs[4])
        got = reader.read_packed(100, EVENT_SIZE)
        assert isinstance(got, Packed) and len(got) == 3
        assert list(got) == evs[:3]
        rows, bad = decode_batch(got)
        assert bad == 0 and rows == decode_batch(evs[:3])[0]
        assert ring.consumer_pos() == 3 * STRIDE  # their space is the kernel's again
        assert reader.read_packed(100, EVENT_SIZE) == []  # the busy one ends the read
        ring.commit(busy)
        got = reader.read_packed(100, EVENT_SIZE)
        assert list(got) == evs[3:] and ring.consumer_pos() == 5 * STRIDE
        assert reader.read_packed(1, EVENT_SIZE) == []  # nothing left
    finally:
        reader.close()


def test_discarded_and_odd_sized_records_go_through_the_record_reader(ring: _Ring) -> None:
    reader = RingReader(ring.fd, SIZE)
    try:
        evs = [_event(i) for i in range(4)]
        ring.put(evs[0])
        ring.put(evs[1], DISCARD)
        ring.put(b"x" * 13)
        ring.put(evs[2])
        ring.put(evs[3])
        first = reader.read_packed(100, EVENT_SIZE)
        assert isinstance(first, Packed) and list(first) == evs[:1]
        rest = reader.read_packed(100, EVENT_SIZE)
        assert rest == [b"x" * 13, evs[2], evs[3]]  # the discarded one skipped
        assert [decode(r).src_port for r in rest[1:]] == [40002, 40003]
        assert ring.consumer_pos() == ring.pos
        # At most max_records, the rest next time.
        for i in range(6):
            ring.put(_event(10 + i))
        assert len(reader.read_packed(4, EVENT_SIZE)) == 4
        assert len(reader.read_packed(4, EVENT_SIZE)) == 2
    finally:
        reader.close()


def test_a_packed_block_is_decoded_like_its_records() -> None:
    evs = [_event(i) for i in range(4)]
    odd = bytearray(evs[2])
    odd[36] = 5  # address family (offset checked against the C header in test_pipeline)
    recs = [evs[0], evs[1], bytes(odd), evs[3]]
    block = b"".join(
        struct.pack("=II", EVENT_SIZE, 0) + r + bytes(STRIDE - 8 - EVENT_SIZE) for r in recs
    )
    packed = Packed(block, 4, STRIDE, 8)
    assert list(packed) == recs
    rows, bad = decode_batch(packed)
    assert bad == 1 and rows == decode_batch(recs)[0] == decode_batch([evs[0], evs[1], evs[3]])[0]
    wide = b"".join(struct.pack("=II", EVENT_SIZE, 0) + r + bytes(24) for r in recs)
    assert decode_batch(Packed(wide, 4, 8 + EVENT_SIZE + 24, 8)) == (rows, 1)


class _Datapath:
    """Counters and a libbpf-style consume that only counts its calls."""

    def __init__(self) -> None:
        self.lost = 0
        self.consumed = 0

    def counters(self) -> dict[str, int]:
        return {"events_lost": self.lost}

    def consume_events(self) -> None:
        self.consumed += 1


def test_the_lost_check_drains_only_when_the_kernel_lost_events() -> None:
    # Draining a backlog in one go holds the event loop: without a loss there is no lost
    # record to order after the events that made it, so nothing is drained.
    from streamer.events.source import Source

    dp = _Datapath()
    reported: list[int] = []
    src = Source(dp, lambda batch: None, reported.append)
    assert src.check_lost() == 0 and dp.consumed == 0 and reported == []
    dp.lost = 7
    assert src.check_lost() == 7 and dp.consumed >= 1 and reported == [7]
    calls = dp.consumed
    assert src.check_lost() == 0 and dp.consumed == calls and reported == [7]
