"""The flow-event pipeline, stage by stage (streamer/source, decode, enrich, fanout, sinks).

Decoding (test_layout.py holds the event layout against the C header), enrichment across a
real policy change, the fan-out's drops and lost records with a deliberately slow sink, a
failing sink (also one ending with a CancelledError it did not ask for), file rotation, the
Kafka spool (bounded, ordered, restartable), the kernel's own losses with a one-page ring buffer
and a burst through BPF_PROG_TEST_RUN, and the pipeline's tasks: one that fails ends run() with
its error, as does a sink failing as the stop timeout cancels it, the sinks still writing out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from support.bpf import EventSink, loaded_datapath, unique_instance
from support.packets import frame

from streamer.datapath.bindings import test_run as prog_test_run
from streamer.datapath.compiler import compile_policy
from streamer.datapath.config import DatapathConfig
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.layout import EVENT
from streamer.datapath.reference import Packet
from streamer.events.decode import (
    DecodeError,
    FlowEvent,
    decode,
    decode_batch,
    encode,
)
from streamer.events.enrich import Enricher
from streamer.events.fanout import Channel, Fanout, Item, flow_key, make_item
from streamer.events.pipeline import Pipeline, PipelineConfig
from streamer.events.sinks.file import FileSink, FileSinkConfig
from streamer.events.sinks.spool import HEADER, Rec, Spool
from streamer.events.source import SourceConfig
from streamer.policy.model import parse_policy_document

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "docs" / "flow-event.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def valid(obj: dict[str, Any]) -> None:
    errors = sorted(VALIDATOR.iter_errors(obj), key=str)
    assert not errors, f"{obj} is not valid against the schema: {errors[0]}"


def lost_factory(en: Enricher) -> Any:
    def make(lost: int, stage: str, first: int, last: int) -> Item:
        return make_item(en.lost_record(lost, stage, first_seq=first, last_seq=last), lost)

    return make


def flow_obj(en: Enricher, **over: Any) -> dict[str, Any]:
    ev = FlowEvent(
        ts_ns=time.monotonic_ns(), packets=1, bytes=60, ifindex=1, rule_id=None, generation=1,
        family=4, protocol=6, direction="ingress", verdict="deny", src_ip="10.0.0.7",
        dst_ip="10.0.0.5", src_port=51234, dst_port=22, tcp_flags=2, kind="new",
    )
    obj = en.enrich(ev)
    obj.update(over)
    return obj


def gap_check(stream: list[dict[str, Any]], produced: int) -> tuple[int, int]:
    """Every seq 1..produced is in `stream` once, or covered by exactly one lost record's
    first_seq..seq range; returns (events seen, events reported lost)."""
    seen: set[int] = set()
    covered: set[int] = set()
    lost = 0
    for obj in stream:
        valid(obj)
        if obj.get("type") == "lost":
            rng = set(range(obj["first_seq"], obj["seq"] + 1))
            assert not rng & covered, f"lost ranges overlap: {obj}"
            covered |= rng
            lost += obj["lost"]
        else:
            assert obj["seq"] not in seen, f"seq {obj['seq']} twice"
            seen.add(obj["seq"])
    assert not seen & covered, "an event both delivered and reported lost"
    assert seen | covered == set(range(1, produced + 1)), "a gap no lost record explains"
    assert lost == len(covered), (lost, len(covered))
    return len(seen), lost


# ---- decode --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("family", "src", "dst", "proto"),
    [
        (4, "10.0.0.7", "192.168.200.1", 6),
        (4, "0.0.0.0", "255.255.255.255", 17),
        (6, "2001:db8::10", "2001:db8:1::53", 17),
        (6, "fe80::1:0:0:1", "::ffff:10.1.2.3", 58),
        (6, "2001:db8:0:1:1:1:1:1", "::", 6),
        (4, "172.16.5.4", "172.16.5.5", 1),
    ],
)
def test_decode_round_trip(family: int, src: str, dst: str, proto: int) -> None:
    import ipaddress

    ev = FlowEvent(
        ts_ns=123456789012345, packets=7, bytes=9000, ifindex=42, rule_id=4294967295,
        generation=77, family=family, protocol=proto, direction="egress", verdict="log",
        src_ip=src, dst_ip=dst, src_port=65535 if proto in (6, 17) else 0,
        dst_port=1 if proto in (6, 17) else 0, tcp_flags=0x12, kind="update",
    )
    raw = encode(ev)
    assert len(raw) == EVENT.size
    back = decode(raw)
    for field in FlowEvent.__slots__:
        if field.endswith("_ip"):
            # The same address, in canonical text (IPv4-mapped ones as ::ffff:a.b.c.d).
            text = getattr(back, field)
            assert ipaddress.ip_address(text) == ipaddress.ip_address(getattr(ev, field))
            if not text.startswith("::ffff:"):
                assert text == str(ipaddress.ip_address(text)), text
        else:
            assert getattr(back, field) == getattr(ev, field), field
    # The layout's fields by name read the same bytes the same way.
    r = EVENT.as_dict(raw)
    assert tuple(r[f] for f in ("ts", "packets", "bytes", "ifindex", "rule_id", "gen", "family",
                                "proto")) == (ev.ts_ns, 7, 9000, 42, 4294967295, 77, family, proto)
    assert tuple(r[f] for f in ("sport", "dport", "tcp_flags", "kind", "direction",
                                "verdict")) == (ev.src_port, ev.dst_port, 0x12, 2, 2, 2)


def test_decode_rejects_what_is_no_event() -> None:
    good = encode(decode(encode(FlowEvent(
        1, 1, 60, 1, None, 1, 4, 6, "ingress", "deny", "10.0.0.1", "10.0.0.2", 1, 2, 2, "new"))))
    with pytest.raises(DecodeError, match="79 bytes, expected 80"):
        decode(good[:-1])
    with pytest.raises(DecodeError, match="81 bytes"):
        decode(good + b"\0")
    bad_family = bytearray(good)
    bad_family[EVENT.offset("family")] = 5
    with pytest.raises(DecodeError, match="address family 5"):
        decode(bytes(bad_family))
    unknown = bytearray(good)
    unknown[EVENT.offset("verdict")] = 9
    unknown[EVENT.offset("kind")] = 9
    assert (decode(bytes(unknown)).verdict, decode(bytes(unknown)).kind) == ("unknown", "unknown")


def test_decode_batch_keeps_good_records_in_order_and_counts_the_rest() -> None:
    evs = [FlowEvent(i, 1, 60, 1, None, 1, 4, 6, "ingress", "deny", "10.0.0.1", "10.0.0.2",
                     i, 2, 2, "new") for i in range(1, 6)]
    raws = [encode(e) for e in evs]
    bad_family = bytearray(raws[2])
    bad_family[EVENT.offset("family")] = 5
    rows, bad = decode_batch([raws[0], raws[1][:-1], bytes(bad_family), raws[3] + b"\0",
                              raws[4], raws[1] + raws[3]])
    assert bad == 4
    assert [r[0] for r in rows] == [1, 5]
    assert decode_batch([]) == ([], 0)


def test_render_writes_byte_for_byte_what_enrich_describes() -> None:
    """The hot path (`render`, a template per event) and the reference (`enrich` + orjson)
    agree on every field, for every kind of value: known and unknown names, rules of live,
    unknown and no generations, both families, odd host and interface names."""
    import random

    rnd = random.Random(7)
    policy = parse_policy_document({"policies": [
        R(3, name='say "hi"\u00e9', priority=5), R(9, action="log", name="x"),
    ]})
    fast = Enricher({1: "eth0", 7: 'we"ird\\if'}, host="host-ü\n")
    ref = Enricher({1: "eth0", 7: 'we"ird\\if'}, host="host-ü\n")
    for en in (fast, ref):
        en.add_generation(4, policy)
    addrs = {4: ["10.0.0.1", "192.168.255.254", "0.0.0.0"],
             6: ["2001:db8::1", "::ffff:1.2.3.4", "fe80::abcd:1"]}
    evs = []
    for _ in range(400):
        family = rnd.choice((4, 6))
        evs.append(FlowEvent(
            ts_ns=time.monotonic_ns() + rnd.randrange(-3 * 10**9, 3 * 10**9),
            packets=rnd.randrange(1, 2**40), bytes=rnd.randrange(0, 2**50),
            ifindex=rnd.choice((1, 7, 99)), rule_id=rnd.choice((None, 3, 9, 77)),
            generation=rnd.choice((4, 4, 5)), family=family,
            protocol=rnd.choice((1, 6, 17, 58, 47)),
            direction=rnd.choice(("ingress", "egress")), verdict=rnd.choice(("deny", "log")),
            src_ip=rnd.choice(addrs[family]), dst_ip=rnd.choice(addrs[family]),
            src_port=rnd.randrange(65536), dst_port=rnd.randrange(65536),
            tcp_flags=rnd.randrange(256), kind=rnd.choice(("new", "update")),
        ))
    raws = [encode(e) for e in evs]
    odd = bytearray(raws[0])
    odd[EVENT.offset("direction")] = 9
    odd[EVENT.offset("verdict")] = 200
    odd[EVENT.offset("kind")] = 0
    raws.append(bytes(odd))
    rows, bad = decode_batch(raws)
    assert bad == 0
    items = fast.render(rows)
    ref._clock_offset_ns, ref._clock_read_at = fast._clock_offset_ns, fast._clock_read_at
    assert len(items) == len(raws)
    for item, raw in zip(items, raws, strict=True):
        obj = ref.enrich(decode(raw))
        assert item.data == orjson.dumps(obj), (item.data, obj)
        assert item.key == flow_key(obj) and item.seq == obj["seq"] and item.weight == 1
        assert not item.is_lost and item.obj == obj
        valid(obj)
    assert fast.seq == ref.seq == len(raws)


# ---- enrich --------------------------------------------------------------------------------


def R(rule_id: int, **kw: Any) -> dict[str, Any]:
    return {"rule_id": rule_id, "protocol": "tcp", "action": "deny", **kw}


def _run(dp: Datapath, pkt: Packet) -> int:
    return prog_test_run(prog_fd(dp, pkt.direction), frame(pkt))[0]


def test_a_generations_metadata_costs_what_it_holds() -> None:
    """The rules' JSON kept per generation is sized to its text (orjson's own bytes keep a
    4 KiB buffer each: 400 MiB for 100,000 rules)."""
    import tracemalloc

    policy = parse_policy_document({"policies": [R(i, name=f"r{i}") for i in range(1, 2001)]})
    en = Enricher({1: "eth0"}, host="h")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        en.add_generation(1, policy)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2000 * 1024, f"{grown / 2000:.0f} bytes per rule"


def test_enrichment_across_a_policy_change(datapath: Datapath, datapath_events: EventSink) -> None:
    """Events still in the ring buffer after a change are described by the set that judged
    them; once drained after the switch, the old generation's metadata goes."""
    dp = datapath
    dp.clear_sessions()
    datapath_events.drain()
    en = Enricher({1: "eth-test"}, host="node-test")
    old = parse_policy_document({"default_action": "allow", "policies": [
        R(11, dst_port=22, name="no-ssh", priority=200),
        R(12, dst_port=5432, action="log", name="audit-pg"),
    ]})
    new = parse_policy_document({"default_action": "deny", "policies": [
        R(11, dst_port=22, name="ssh-still-denied", priority=300),
    ]})

    def apply(policy: Any) -> int:
        expected = dp.active()[0] + 1
        en.add_generation(expected, policy)  # before the switch, as the agent does
        gen = dp.apply(compile_policy(policy, dp.config.max_shapes))
        assert gen == expected
        en.switched(gen)
        return gen

    g1 = apply(old)
    assert _run(dp, Packet.of("10.1.0.9", "10.0.0.5", "tcp", 40000, 22, tcp_flags=0x02)) == 2
    assert _run(dp, Packet.of("10.1.0.9", "10.0.0.5", "tcp", 40001, 5432, tcp_flags=0x02)) == 0
    g2 = apply(new)  # the two events above are still in the ring buffer
    assert _run(dp, Packet.of("10.1.0.9", "10.0.0.5", "tcp", 40002, 22, tcp_flags=0x02)) == 2
    assert _run(dp, Packet.of("10.1.0.9", "10.0.0.5", "udp", 40003, 53)) == 2  # default deny
    mark = en.retire_point()
    objs = [en.enrich(decode(r)) for r in datapath_events.drain()]
    en.retire(mark)
    by_port = {o["src_port"]: o for o in objs}
    assert set(by_port) == {40000, 40001, 40002, 40003}, objs
    assert by_port[40000]["rule"] == {"rule_id": 11, "name": "no-ssh", "priority": 200,
                                      "action": "deny"}
    assert by_port[40000]["policy_generation"] == g1
    assert by_port[40001]["rule"]["name"] == "audit-pg"
    assert by_port[40001]["verdict"] == "log"
    assert by_port[40002]["rule"] == {"rule_id": 11, "name": "ssh-still-denied",
                                      "priority": 300, "action": "deny"}
    assert by_port[40002]["policy_generation"] == g2
    assert by_port[40003]["rule"] is None
    assert [o["seq"] for o in objs] == [1, 2, 3, 4]
    for o in objs:
        valid(o)
        assert (o["host"], o["iface"]) == ("node-test", "eth-test")
        assert abs(_epoch(o["time"]) - time.time()) < 30
    # Only the live generation is kept once the drain after the switch is done.
    assert en.generations == [g2]
    dp.clear_sessions()


def _epoch(text: str) -> float:
    dt = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return dt.timestamp() + int(text[20:29]) / 1e9


def test_enricher_keeps_generations_until_drained() -> None:
    en = Enricher({}, host="h")
    p1 = parse_policy_document({"policies": [R(1, name="a")]})
    p2 = parse_policy_document({"policies": [R(1, name="b")]})
    en.add_generation(1, p1)
    en.switched(1)
    en.add_generation(2, p2)
    assert en.rule(1, 1)["name"] == "a" and en.rule(2, 1)["name"] == "b"
    mark = en.retire_point()  # taken before the switch to 2: keeps 1
    en.switched(2)
    en.retire(mark)
    assert en.generations == [1, 2]
    en.retire(en.retire_point())
    assert en.generations == [2]
    # An event of a forgotten generation still names its rule.
    assert en.rule(1, 1) == {"rule_id": 1, "name": "", "priority": None, "action": None}
    en.add_generation(3, p1)
    en.forget(3)  # the switch failed
    assert en.generations == [2]


# ---- fan-out ---------------------------------------------------------------------------------


class ListSink:
    """Collects what it gets; `delay` seconds per item (a slow sink), or fails."""

    def __init__(self, name: str, delay: float = 0.0, fail_every: int = 0,
                 fail_times: int = 0) -> None:
        self.name = name
        self.delay = delay
        self.fail_every = fail_every
        self.fail_times = fail_times
        self.got: list[dict[str, Any]] = []
        self.batches = 0

    async def run(self, channel: Channel) -> None:
        while True:
            items = await channel.get_batch(64)
            if not items:
                return
            self.batches += 1
            if self.fail_times and self.batches % self.fail_every == 0:
                self.fail_times -= 1
                channel.report_lost(sum(i.weight for i in items), items[0].seq, items[-1].seq)
                raise OSError("this sink fails now and then")
            for item in items:
                if self.delay:
                    await asyncio.sleep(self.delay)
                self.got.append(json.loads(item.data))

    def stats(self) -> dict[str, Any]:
        return {"delivered": sum(1 for o in self.got if o.get("type") != "lost")}


async def test_a_slow_sink_drops_with_lost_records_and_slows_nobody() -> None:
    en = Enricher({1: "eth0"}, host="h")
    slow, fast = ListSink("slow", delay=0.002), ListSink("fast")
    fan = Fanout([slow, fast], lost_factory(en), {"slow": 50, "fast": 100_000})
    task = asyncio.create_task(fan.run())
    n = 0
    publish_s = 0.0
    for _ in range(20):
        batch = [make_item(flow_obj(en)) for _ in range(250)]
        n += len(batch)
        t0 = time.perf_counter()
        fan.publish(batch)
        publish_s = max(publish_s, time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    fan.close()
    await asyncio.wait_for(task, 60)
    # The reader's side never waited for the slow sink.
    assert publish_s < 0.05, publish_s
    assert gap_check(fast.got, n) == (n, 0)
    seen, lost = gap_check(slow.got, n)
    assert seen + lost == n and lost > 0, (seen, lost)
    st = fan.stats()
    assert st["slow"]["queue_dropped"] == lost and st["fast"]["queue_dropped"] == 0
    assert st["slow"]["received"] == st["fast"]["received"] == n
    # Lost records sit where the gap is: right after the last event before it.
    stream = slow.got
    for i, obj in enumerate(stream):
        if obj.get("type") == "lost":
            before = [o["seq"] for o in stream[:i] if o.get("type") != "lost"]
            assert not before or max(before) < obj["first_seq"]
            assert obj["stage"] == "slow"


async def test_a_failing_sink_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    en = Enricher({}, host="h")
    bad, good = ListSink("bad", fail_every=3, fail_times=4), ListSink("good")
    fan = Fanout([bad, good], lost_factory(en), 10_000)
    task = asyncio.create_task(fan.run())
    caplog.set_level(logging.ERROR, logger="microseg.fanout")
    n = 0
    deadline = time.monotonic() + 20
    while fan.sink_errors["bad"] < 4 and time.monotonic() < deadline:
        batch = [make_item(flow_obj(en)) for _ in range(64)]
        n += len(batch)
        fan.publish(batch)
        await asyncio.sleep(0.05)
    fan.close()
    await asyncio.wait_for(task, 60)
    assert fan.sink_errors["bad"] >= 4
    assert gap_check(good.got, n) == (n, 0)
    seen, lost = gap_check(bad.got, n)
    assert lost > 0 and seen + lost == n
    # Logged, but rate-limited: one line for several failures.
    lines = [r for r in caplog.records if "sink bad failed" in r.getMessage()]
    assert 1 <= len(lines) < fan.sink_errors["bad"], [r.getMessage() for r in lines]


async def test_a_sink_ending_with_a_cancel_it_did_not_ask_for_is_restarted() -> None:
    """A sink's run that ends with a CancelledError nobody asked for (it awaited a future
    its owner cancelled) is a failure like any other: counted, restarted, nothing lost
    (a TaskGroup would take it for a requested stop, and the sink would be gone unseen)."""

    class Strays(ListSink):
        strayed = False

        async def run(self, channel: Channel) -> None:
            if not self.strayed:
                self.strayed = True
                fut = asyncio.get_running_loop().create_future()
                asyncio.get_running_loop().call_soon(fut.cancel)
                await fut
            await super().run(channel)

    en = Enricher({}, host="h")
    sink = Strays("strays")
    fan = Fanout([sink], lost_factory(en), 10_000)
    task = asyncio.create_task(fan.run())
    batch = [make_item(flow_obj(en)) for _ in range(100)]
    fan.publish(batch)
    deadline = time.monotonic() + 10
    while len(sink.got) < len(batch) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    fan.close()
    await asyncio.wait_for(task, 10)
    assert fan.sink_errors["strays"] == 1
    assert gap_check(sink.got, len(batch)) == (len(batch), 0)


# ---- the file sink -----------------------------------------------------------------------------


async def test_file_sink_rotates_by_size(tmp_path: Path) -> None:
    en = Enricher({}, host="h")
    path = tmp_path / "ev" / "events.jsonl"
    sink = FileSink(FileSinkConfig(path, max_bytes=20_000, keep=2))
    ch = Channel("file", 100_000, lost_factory(en))
    items = [make_item(flow_obj(en)) for _ in range(300)]
    line = len(items[0].data) + 1
    for item in items:
        ch.offer(item)
    ch.close()
    await sink.run(ch)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"], files
    seqs: list[int] = []
    for p in (path.parent / "events.jsonl.2", path.parent / "events.jsonl.1", path):
        data = p.read_bytes()
        assert len(data) <= 20_000 and data.endswith(b"\n")
        if p != path:
            assert len(data) > 20_000 - line  # rotated only when the next line would not fit
        seqs += [json.loads(x)["seq"] for x in data.splitlines()]
    # The newest lines, in order, with nothing missing; older ones rotated away.
    assert seqs == list(range(seqs[0], 301)) and seqs[0] > 1
    assert sink.rotations == 300 * line // 20_000 or sink.rotations >= 3
    assert sink.stats()["delivered"] == 300 and sink.failed == 0
    # A restart appends to the live file (and rotates it when full).
    sink2 = FileSink(FileSinkConfig(path, max_bytes=20_000, keep=2))
    ch2 = Channel("file", 10, lost_factory(en))
    ch2.offer(make_item(flow_obj(en)))
    ch2.close()
    await sink2.run(ch2)
    assert json.loads(path.read_bytes().splitlines()[-1])["seq"] == 301


async def test_file_sink_write_failure_is_counted_and_reported(tmp_path: Path) -> None:
    en = Enricher({}, host="h")
    path = tmp_path / "events.jsonl"
    path.mkdir()  # opening it for appending fails
    sink = FileSink(FileSinkConfig(path))
    ch = Channel("file", 1000, lost_factory(en))
    task = asyncio.create_task(sink.run(ch))
    for _ in range(5):
        ch.offer(make_item(flow_obj(en)))
    await asyncio.sleep(0.2)
    assert sink.failed == 5
    path.rmdir()  # writable again: the lost record goes first, then new events
    for _ in range(3):
        ch.offer(make_item(flow_obj(en)))
    ch.close()
    await asyncio.wait_for(task, 10)
    got = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert got[0]["type"] == "lost" and got[0]["lost"] == 5 and got[0]["stage"] == "file"
    assert (got[0]["first_seq"], got[0]["seq"]) == (1, 5)
    assert [o["seq"] for o in got[1:]] == [6, 7, 8]
    gap_check(got, 8)


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


# ---- the kernel's losses -------------------------------------------------------------------


@pytest.fixture
def tiny_ringbuf() -> Iterator[Datapath]:
    with loaded_datapath(DatapathConfig(instance=unique_instance("rb"), session_entries=8192,
                                        ringbuf_pages=1, rule_slots=1024)) as dp:
        yield dp


async def test_kernel_lost_counts_equal_the_shortfall(
    tiny_ringbuf: Datapath, tmp_path: Path
) -> None:
    """A one-page ring buffer (4 KiB: under 50 events) and a burst of 400 new denied flows
    while nobody drains it: what did not fit is counted by the kernel and reported by the
    pipeline as lost records, to the event."""
    dp = tiny_ringbuf
    policy = parse_policy_document({"default_action": "deny", "policies": []})
    en = Enricher({1: "lo-test"}, host="h")
    en.add_generation(1, policy)
    dp.apply(compile_policy(policy, dp.config.max_shapes))
    events = tmp_path / "events.jsonl"
    pipe = Pipeline(
        PipelineConfig(source=SourceConfig(lost_poll_interval=0.1),
                       file=FileSinkConfig(events)),
        dp, en,
    )
    task = asyncio.create_task(pipe.run())
    await asyncio.sleep(0.2)  # the pipeline watches the ring buffer now
    burst = 400
    fd = prog_fd(dp, "ingress")
    # No await in between: the event loop cannot drain while the burst runs.
    for i in range(burst):
        pkt = Packet.of("10.2.0.1", "10.0.0.5", "udp", 10000 + i, 53)
        assert prog_test_run(fd, frame(pkt))[0] == 2
    kernel = dp.counters()
    deadline = time.monotonic() + 10
    while pipe.source.kernel_lost < kernel["events_lost"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    pipe.stop()
    await asyncio.wait_for(task, 30)
    got = [json.loads(x) for x in events.read_bytes().splitlines()]
    flows = [o for o in got if o["type"] == "flow"]
    lost = [o for o in got if o["type"] == "lost"]
    assert 0 < len(flows) < 60, len(flows)
    assert all(o["stage"] == "kernel" and "first_seq" not in o for o in lost), lost
    assert len(flows) + sum(o["lost"] for o in lost) == burst
    assert kernel["events_sent"] == len(flows) and kernel["events_lost"] == burst - len(flows)
    assert {o["src_port"] for o in flows} <= set(range(10000, 10000 + burst))
    for o in got:
        valid(o)
    # One sequence for both kinds: 1..n with no gap.
    assert sorted(o["seq"] for o in got) == list(range(1, len(got) + 1))
    st = pipe.stats()
    assert st["source"]["kernel_lost"] == burst - len(flows)
    assert st["sinks"]["file"]["delivered"] == len(flows)
    assert pipe.extra_stats()["events_lost"] == 0  # nothing lost after the kernel


@pytest.mark.parametrize("own_reader", [True, False], ids=["mmap", "libbpf"])
def test_both_ring_readers_take_every_record_in_order_across_wraparounds(
    tiny_ringbuf: Datapath, own_reader: bool
) -> None:
    """Rounds of 30 events through the one-page ring buffer (it wraps around every ~46): the
    memory-mapped reader and libbpf's callbacks both hand over every record, in order, once,
    and free the space (no reservation ever fails)."""
    from streamer.events.source import Source, own_reader_supported

    assert own_reader_supported(), "the CI machine is x86-64: the mmap reader must be tested"
    dp = tiny_ringbuf
    policy = parse_policy_document({"default_action": "deny", "policies": []})
    dp.apply(compile_policy(policy, dp.config.max_shapes))
    got: list[bytes] = []
    src = Source(dp, got.extend, lambda n: None, SourceConfig(own_reader=own_reader))
    loop = asyncio.new_event_loop()
    try:
        src.start(loop)
        assert src.reader == ("mmap" if own_reader else "libbpf")
        lost0 = dp.counters()["events_lost"]
        fd = prog_fd(dp, "ingress")
        sport = 20000 + (0 if own_reader else 5000)
        for _ in range(10):
            for _ in range(30):
                pkt = Packet.of("10.3.0.1", "10.0.0.5", "udp", sport, 53)
                assert prog_test_run(fd, frame(pkt))[0] == 2
                sport += 1
            src.drain()
        src.stop()
    finally:
        loop.close()
    assert dp.counters()["events_lost"] == lost0
    ports = [decode(r).src_port for r in got]
    assert ports == list(range(sport - 300, sport))


async def test_events_no_sink_has_room_for_are_shed_before_rendering(tmp_path: Path) -> None:
    """A drained batch larger than every sink's free room: what fits is rendered and queued,
    the rest only gets its sequence numbers, and each sink a lost record for the gap, in
    place (nothing is rendered that every sink would drop)."""
    en = Enricher({1: "eth0"}, host="h")
    path = tmp_path / "events.jsonl"
    pipe = Pipeline(PipelineConfig(file=FileSinkConfig(path), queue_size=10), None, en)
    ev = FlowEvent(1, 1, 60, 1, None, 1, 4, 6, "ingress", "deny", "10.0.0.1", "10.0.0.2",
                   1, 2, 2, "new")
    pipe.handle([encode(ev)] * 25)
    assert (pipe.enriched, pipe.shed, en.seq) == (10, 15, 25)
    ch = pipe.fanout.channels["file"]
    assert (ch.received, ch.dropped, ch.depth, ch.room) == (25, 15, 10, 0)
    pipe.handle([encode(ev)] * 3)  # still no room: shed whole
    assert (pipe.enriched, pipe.shed, en.seq) == (10, 18, 28)
    pipe.fanout.close()
    await asyncio.wait_for(pipe.fanout.run(), 10)
    got = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [o["seq"] for o in got if o["type"] == "flow"] == list(range(1, 11))
    (lost,) = [o for o in got if o["type"] == "lost"]
    assert (lost["first_seq"], lost["seq"], lost["lost"], lost["stage"]) == (11, 28, 18, "file")
    gap_check(got, 28)
    st = pipe.stats()
    assert st["enrich"]["dropped"] == 18 and st["lost"]["queues"] == 18


# ---- the pipeline's tasks ---------------------------------------------------------------------


def _flow_records(n: int) -> list[bytes]:
    ev = FlowEvent(1, 1, 60, 1, None, 1, 4, 6, "ingress", "deny", "10.0.0.1", "10.0.0.2",
                   1, 2, 2, "new")
    return [encode(ev)] * n


async def test_a_failing_pipeline_task_ends_the_pipeline_with_its_error(
    tiny_ringbuf: Datapath, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lost-counter poll fails (a bug): run() ends by itself at once, without stop(), and
    raises that error, once the sinks have written what they were given and every task it
    started has ended."""
    en = Enricher({1: "eth0"}, host="h")
    path = tmp_path / "events.jsonl"
    pipe = Pipeline(PipelineConfig(file=FileSinkConfig(path)), tiny_ringbuf, en)

    async def failing_poll() -> None:
        await asyncio.sleep(0.1)
        pipe.handle(_flow_records(5))
        raise RuntimeError("a bug in the lost-event poll")

    monkeypatch.setattr(pipe.source, "run", failing_poll)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="a bug in the lost-event poll"):
        await asyncio.wait_for(pipe.run(), 20)
    assert time.monotonic() - started < 10  # by itself, not by the timeout
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert pipe.fanout.channels["file"].closed
    got = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [o["seq"] for o in got] == [1, 2, 3, 4, 5]


async def test_a_sink_failing_as_the_stop_timeout_cancels_it_is_raised_by_run(
    tiny_ringbuf: Datapath, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At stop, a sink that does not finish within stop_timeout is cancelled; one that fails
    as it is cancelled is not restarted (it would hold the stop up for ever): run() raises
    its error, after the other sinks wrote everything."""

    class Stuck:
        name = "stuck"

        async def run(self, channel: Channel) -> None:
            try:
                await asyncio.Event().wait()  # takes nothing, never ends by itself
            except asyncio.CancelledError:
                raise OSError("flushing failed as it was cancelled") from None

        def stats(self) -> dict[str, Any]:
            return {}

    en = Enricher({1: "eth0"}, host="h")
    path = tmp_path / "events.jsonl"
    pipe = Pipeline(
        PipelineConfig(file=FileSinkConfig(path), stop_timeout=0.3), tiny_ringbuf, en
    )
    pipe.fanout = Fanout([*pipe.fanout.sinks, Stuck()], lost_factory(en), 100)
    task = asyncio.create_task(pipe.run())
    await asyncio.sleep(0.1)
    pipe.handle(_flow_records(5))
    caplog.set_level(logging.WARNING, logger="microseg.pipeline")
    pipe.stop()
    with pytest.raises(OSError, match="flushing failed as it was cancelled"):
        await asyncio.wait_for(task, 20)
    assert any("sinks did not finish within" in r.getMessage() for r in caplog.records)
    assert pipe.fanout.sink_errors["stuck"] == 0  # not restarted
    got = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert [o["seq"] for o in got] == [1, 2, 3, 4, 5]
