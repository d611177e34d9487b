"""Decode: raw ring-buffer records (struct ms_event: streamer.datapath.layout.EVENT) into typed
events.

In: bytes copied out of the ring buffer (one record, a list of them, or a `Packed` block as the
source copies them out in one piece). Out: FlowEvent (`decode`, one record) or raw rows
(`decode_batch`, a drained batch at once, one C-level unpack: the hot path; the fields events
mostly repeat stay packed in two byte strings, see `Row`). A record of the wrong size or an
unknown address family is rejected (DecodeError, or counted by `decode_batch`), never guessed at.
A record whose staged verdict is MS_NO_STAGED (the staged view agrees) has no staged verdict;
its staged rule id is then ignored.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from streamer.datapath.layout import (
    DIRECTION_NAMES,
    EVENT,
    EVENT_KIND_NAMES,
    EVENT_META_FAMILY,
    EVENT_ROW,
    MS_NO_STAGED,
    VERDICT_NAMES,
)
from streamer.vocabulary import PROTOCOL_NAMES

PROTOCOLS = PROTOCOL_NAMES
TCP_FLAG_NAMES = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
# Every flag byte's text ("SYN|ACK"), made once: events are many.
_FLAG_TEXT = tuple(
    "|".join(n for i, n in enumerate(TCP_FLAG_NAMES) if v >> i & 1) for v in range(256)
)


class DecodeError(ValueError):
    """A record that is not a struct ms_event."""


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """One kernel flow event, typed."""

    ts_ns: int  # CLOCK_MONOTONIC
    packets: int
    bytes: int
    ifindex: int
    rule_id: int | None
    generation: int
    family: int
    protocol: int
    direction: str
    verdict: str
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    tcp_flags: int
    kind: str
    # What the staged view decided where it differs from the enforced one (contract §6):
    # None when the views agree; staged_rule_id None when the staged default decided.
    staged_verdict: str | None = None
    staged_rule_id: int | None = None

    @property
    def protocol_name(self) -> str:
        return PROTOCOLS.get(self.protocol, str(self.protocol))

    @property
    def tcp_flags_text(self) -> str | None:
        if self.protocol != 6:
            return None
        return _FLAG_TEXT[self.tcp_flags & 0xFF]


_SIZE = EVENT.size
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


def decode(record: bytes) -> FlowEvent:
    """One ring-buffer record into a FlowEvent; DecodeError if it is not one."""
    if len(record) != _SIZE:
        raise DecodeError(f"flow event of {len(record)} bytes, expected {_SIZE}")
    (
        ts,
        packets,
        nbytes,
        ifindex,
        rule_id,
        gen,
        family,
        proto,
        direction,
        verdict,
        src,
        dst,
        sport,
        dport,
        tcp_flags,
        kind,
        staged_verdict,
        staged_rule_id,
    ) = EVENT.unpack(record)
    if family == 4:
        src_ip = socket.inet_ntop(socket.AF_INET, src[:4])
        dst_ip = socket.inet_ntop(socket.AF_INET, dst[:4])
    elif family == 6:
        src_ip = socket.inet_ntop(socket.AF_INET6, src)
        dst_ip = socket.inet_ntop(socket.AF_INET6, dst)
    else:
        raise DecodeError(f"flow event with address family {family}")
    return FlowEvent(
        ts_ns=ts,
        packets=packets,
        bytes=nbytes,
        ifindex=ifindex,
        rule_id=rule_id or None,
        generation=gen,
        family=family,
        protocol=proto,
        direction=DIRECTION_NAMES.get(direction, "unknown"),
        verdict=VERDICT_NAMES.get(verdict, "unknown"),
        src_ip=src_ip,
        dst_ip=dst_ip,
        src_port=sport,
        dst_port=dport,
        tcp_flags=tcp_flags,
        kind=EVENT_KIND_NAMES.get(kind, "unknown"),
        staged_verdict=(
            None if staged_verdict == MS_NO_STAGED else VERDICT_NAMES.get(staged_verdict, "unknown")
        ),
        staged_rule_id=(staged_rule_id or None) if staged_verdict != MS_NO_STAGED else None,
    )


Row = tuple[int, int, int, bytes, bytes, bytes, int, int, bytes]
"""One record's fields as `decode_batch` gives them (layout.EVENT_ROW): ts, packets, bytes,
meta (16 bytes: ifindex, rule_id, gen, family, proto, direction, verdict, as
layout.EVENT_META), src (16 bytes), dst (16 bytes), sport, dport, tail (12 bytes: tcp_flags,
kind, staged_verdict, pad, staged_rule_id, pad2). The fields an event stream mostly repeats
stay packed, so the renderer looks them up as one key."""

_FAMILY_OFFSET = EVENT.offset("family")
_GOOD_FAMILIES = b"\x04\x06"


class Packed:
    """Records copied out of the ring buffer in one piece: `count` records, each `stride`
    bytes apart starting `header` bytes into `data` (the ring buffer's 8-byte record headers
    left in place). Iterating gives each record's bytes (what a list of records would)."""

    __slots__ = ("count", "data", "header", "stride")

    def __init__(self, data: bytes, count: int, stride: int, header: int) -> None:
        self.data = data
        self.count = count
        self.stride = stride
        self.header = header

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[bytes]:
        d, h, st = self.data, self.header, self.stride
        size = st - h
        return (d[i * st + h : i * st + h + size] for i in range(self.count))


def _unpacker(header: int, stride: int) -> struct.Struct:
    """EVENT_ROW after `header` bytes, padded to `stride`."""
    s = _UNPACKERS.get((header, stride))
    if s is None:
        pad = stride - header - _SIZE
        s = struct.Struct(f"<{header}x{EVENT_ROW.format[1:]}{pad}x")
        _UNPACKERS[(header, stride)] = s
    return s


_UNPACKERS: dict[tuple[int, int], struct.Struct] = {}


def decode_batch(records: list[bytes] | Packed) -> tuple[list[Row], int]:
    """Many records at once (one C-level unpack of the whole batch, no Python work per field).

    In: a list of records, or a `Packed` block of them (records of the wrong size are never
    packed). Returns the rows of the good records, in order, and how many were dropped
    (wrong size or address family)."""
    if isinstance(records, Packed):
        if records.stride < records.header + _SIZE:
            raise ValueError(f"packed records of {records.stride - records.header} bytes")
        st = _unpacker(records.header, records.stride)
        blob = records.data[: records.count * records.stride]
        families = blob[records.header + _FAMILY_OFFSET :: records.stride]
        bad = 0
    else:
        good = [r for r in records if len(r) == _SIZE]
        st = EVENT_ROW
        blob = b"".join(good)
        families = blob[_FAMILY_OFFSET::_SIZE]
        bad = len(records) - len(good)
    rows: list[Row] = list(st.iter_unpack(blob))
    if families.translate(None, _GOOD_FAMILIES):
        n = len(rows)
        at = EVENT_META_FAMILY
        rows = [r for r in rows if r[3][at] == 4 or r[3][at] == 6]
        bad += n - len(rows)
    return rows, bad


def encode(ev: FlowEvent) -> bytes:
    """The struct ms_event bytes of `ev` (the inverse of decode; for tests and benchmarks)."""
    af = _AF[ev.family]
    src = socket.inet_pton(af, ev.src_ip).ljust(16, b"\0")
    dst = socket.inet_pton(af, ev.dst_ip).ljust(16, b"\0")
    rdir = {v: k for k, v in DIRECTION_NAMES.items()}
    rverdict = {v: k for k, v in VERDICT_NAMES.items()}
    rkind = {v: k for k, v in EVENT_KIND_NAMES.items()}
    return EVENT.pack(
        ev.ts_ns,
        ev.packets,
        ev.bytes,
        ev.ifindex,
        ev.rule_id or 0,
        ev.generation,
        ev.family,
        ev.protocol,
        rdir[ev.direction],
        rverdict[ev.verdict],
        src,
        dst,
        ev.src_port,
        ev.dst_port,
        ev.tcp_flags,
        rkind[ev.kind],
        MS_NO_STAGED if ev.staged_verdict is None else rverdict[ev.staged_verdict],
        ev.staged_rule_id or 0,
    )
