"""The classifier's lookup over compiled tables in Python, for the compiler's tests: `probe`
walks a `CompiledPolicy`'s shapes as bpf/classifier.c judge_family does (best shape first,
stopping once no shape left can beat the match in hand) and returns the entry that decides."""

from __future__ import annotations

from streamer.datapath.compiler import CompiledPolicy, Entry
from streamer.datapath.reference import Packet


def probe(compiled: CompiledPolicy, pkt: Packet) -> Entry | None:
    """The kernel's probe loop (bpf/classifier.c judge_family) over compiled tables."""
    tables = compiled.family(pkt.family)
    bits = 32 if pkt.family == 4 else 128
    ports = pkt.proto in (6, 17)
    best: Entry | None = None
    for shape, max_score, entries in zip(
        tables.shapes, tables.max_scores, tables.entries, strict=True
    ):
        if best is not None and best.score >= max_score:
            break

        def m(v: int, width: int, plen: int) -> int:
            return v & (((1 << width) - 1) ^ ((1 << (width - plen)) - 1))

        key = (
            1 if pkt.direction == "ingress" else 2,
            0 if shape.proto_wild else pkt.proto,
            m(pkt.sport if ports else 0, 16, shape.sport_plen),
            m(pkt.dport if ports else 0, 16, shape.dport_plen),
            m(int(pkt.src), bits, shape.src_plen),
            m(int(pkt.dst), bits, shape.dst_plen),
        )
        e = entries.get(key)
        if e is not None and (best is None or e.score > best.score):
            best = e
    return best
