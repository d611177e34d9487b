"""The Kafka sink's spool (`streamer.events.sinks.spool`): ordered across restarts, bounded
(the oldest goes), a torn record cut."""

from __future__ import annotations

from pathlib import Path

from streamer.events.sinks.spool import HEADER, Rec, Spool

# ---- the Kafka spool ---------------------------------------------------------------------------


def recs(first: int, n: int, size: int = 400) -> list[Rec]:
    return [Rec(s, 1, b"10.0.0.1->10.0.0.2", b"v" * size) for s in range(first, first + n)]


def drain(spool: Spool, step: int = 7) -> list[int]:
    out: list[int] = []
    for _ in range(100_000):
        got = spool.take(step)
        if not got:
            return out
        out += [r.seq for r in got]
    raise AssertionError("spool never emptied")


def test_spool_keeps_order_across_restarts(tmp_path: Path) -> None:
    d = tmp_path / "spool"
    s = Spool(d, 1 << 20, segment_bytes=4096)
    assert s.append(recs(1, 100)) is None
    assert [r.seq for r in s.take(10)] == list(range(1, 11))
    s.append(recs(101, 50))
    s.close()
    s = Spool(d, 1 << 20, segment_bytes=4096)  # a restart resumes after what was taken
    assert (s.records, s.weight) == (140, 140)
    first = s.take(5)
    s.prepend(first[2:])  # taken, not delivered: handed back in front
    s.close()
    s = Spool(d, 1 << 20, segment_bytes=4096)
    assert drain(s) == list(range(13, 151))
    assert s.empty and s.nbytes == 0
    s.append(recs(151, 3))
    assert drain(s, 100) == [151, 152, 153]
    s.close()
    # Fully taken segments are deleted (the live tail may stay, empty).
    assert len([p for p in d.iterdir() if p.suffix == ".spool"]) <= 1


def test_spool_is_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    rec_size = HEADER.size + len(b"10.0.0.1->10.0.0.2") + 400
    s = Spool(tmp_path / "s", 50 * rec_size, segment_bytes=10 * rec_size)
    assert s.append(recs(1, 50)) is None
    dropped = s.append(recs(51, 5))
    assert dropped is not None
    # Whole segments go, oldest first; the spool is within its bound again.
    assert (dropped.first_seq, dropped.last_seq) == (1, dropped.records)
    assert dropped.records == dropped.weight >= 5
    assert s.nbytes <= 50 * rec_size
    rest = drain(s)
    assert rest == list(range(dropped.records + 1, 56))
    # Partly taken segments count only what is left in them.
    s.append(recs(100, 50))
    s.take(3)
    d2 = s.append(recs(150, 10))
    # The partly taken segment's 2 left (103, 104) and the next whole one (105..114).
    assert d2 is not None and (d2.first_seq, d2.last_seq, d2.records) == (103, 114, 12)
    assert drain(s)[0] == 115


def test_spool_cuts_a_torn_record(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = Spool(d, 1 << 20)
    s.append(recs(1, 3))
    s.close()
    seg = next(p for p in d.iterdir() if p.suffix == ".spool")
    data = seg.read_bytes()
    seg.write_bytes(data[:-10])  # a crash mid-write
    s = Spool(d, 1 << 20)
    assert drain(s) == [1, 2]
    s.append(recs(4, 1))
    assert drain(s) == [4]
