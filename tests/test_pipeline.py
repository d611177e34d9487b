"""The flow-event pipeline fed by the loaded classifier (through BPF_PROG_TEST_RUN): enrichment
across a real policy change, the kernel's own losses with a one-page ring buffer, counted and
reported to the event, with both ring-buffer readers, and the pipeline's tasks: one that fails
ends run() with its error, as does a sink failing as the stop timeout cancels it, the sinks
still writing out. The stages on their own: tests/unit/ (test_decode, test_enrich, test_fanout,
test_file_sink, test_spool); the event layout against the C header: test_layout.py."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from support.bpf import EventSink, loaded_datapath, unique_instance
from support.bpf import kernel_retval as run
from support.events import lost_factory, tcp_rule, valid
from support.packets import frame

from bench.kafkabroker import KafkaBroker, kcat_consume, unique_topic
from streamer.datapath.bindings import test_run as prog_test_run
from streamer.datapath.compiler import compile_policy
from streamer.datapath.config import DatapathConfig
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.reference import Packet
from streamer.events.decode import FlowEvent, decode, encode
from streamer.events.enrich import Enricher
from streamer.events.fanout import Channel, Fanout
from streamer.events.pipeline import Pipeline, PipelineConfig
from streamer.events.sinks.file import FileSinkConfig
from streamer.events.source import SourceConfig
from streamer.policy.model import parse_policy_document

# ---- enrich --------------------------------------------------------------------------------


def test_enrichment_across_a_policy_change(datapath: Datapath, datapath_events: EventSink) -> None:
    """Events still in the ring buffer after a change are described by the set that judged
    them; once drained after the switch, the old generation's metadata goes."""
    dp = datapath
    dp.clear_sessions()
    datapath_events.drain()
    en = Enricher({1: "eth-test"}, host="node-test")
    old = parse_policy_document(
        {
            "default_action": "allow",
            "policies": [
                tcp_rule(11, dst_port=22, name="no-ssh", priority=200),
                tcp_rule(12, dst_port=5432, action="log", name="audit-pg"),
            ],
        }
    )
    new = parse_policy_document(
        {
            "default_action": "deny",
            "policies": [
                tcp_rule(11, dst_port=22, name="ssh-still-denied", priority=300),
            ],
        }
    )

    def apply(policy: Any) -> int:
        expected = dp.active()[0] + 1
        en.add_generation(expected, policy)  # before the switch, as the agent does
        gen = dp.apply(compile_policy(policy, dp.config.max_shapes))
        assert gen == expected
        en.switched(gen)
        return gen

    g1 = apply(old)
    assert run(dp, Packet.of("10.1.0.9", "10.0.0.5", "tcp", 40000, 22, tcp_flags=0x02)) == 2
    assert run(dp, Packet.of("10.1.0.9", "10.0.0.5", "tcp", 40001, 5432, tcp_flags=0x02)) == 0
    g2 = apply(new)  # the two events above are still in the ring buffer
    assert run(dp, Packet.of("10.1.0.9", "10.0.0.5", "tcp", 40002, 22, tcp_flags=0x02)) == 2
    assert run(dp, Packet.of("10.1.0.9", "10.0.0.5", "udp", 40003, 53)) == 2  # default deny
    mark = en.retire_point()
    objs = [en.enrich(decode(r)) for r in datapath_events.drain()]
    en.retire(mark)
    by_port = {o["src_port"]: o for o in objs}
    assert set(by_port) == {40000, 40001, 40002, 40003}, objs
    assert by_port[40000]["rule"] == {
        "rule_id": 11,
        "name": "no-ssh",
        "priority": 200,
        "action": "deny",
    }
    assert by_port[40000]["policy_generation"] == g1
    assert by_port[40001]["rule"]["name"] == "audit-pg"
    assert by_port[40001]["verdict"] == "log"
    assert by_port[40002]["rule"] == {
        "rule_id": 11,
        "name": "ssh-still-denied",
        "priority": 300,
        "action": "deny",
    }
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


# ---- the kernel's losses -------------------------------------------------------------------


@pytest.fixture
def tiny_ringbuf() -> Iterator[Datapath]:
    with loaded_datapath(
        DatapathConfig(
            instance=unique_instance("rb"), session_entries=8192, ringbuf_pages=1, rule_slots=1024
        )
    ) as dp:
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
        PipelineConfig(source=SourceConfig(lost_poll_interval=0.1), file=FileSinkConfig(events)),
        dp,
        en,
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


# ---- the pipeline's tasks ---------------------------------------------------------------------


def _flow_records(n: int) -> list[bytes]:
    ev = FlowEvent(
        1, 1, 60, 1, None, 1, 4, 6, "ingress", "deny", "10.0.0.1", "10.0.0.2", 1, 2, 2, "new"
    )
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
    pipe = Pipeline(PipelineConfig(file=FileSinkConfig(path), stop_timeout=0.3), tiny_ringbuf, en)
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


# ---- the host name --------------------------------------------------------------------------


async def test_every_record_carries_the_agents_host_name_to_kafka_and_the_file(
    tiny_ringbuf: Datapath, tmp_path: Path, kafka_broker: KafkaBroker
) -> None:
    """The host name the agent was given (AgentConfig.host_name: Enricher's `host`) is in
    every record reaching the sinks: flows, lost and alert records, on Kafka and in the file
    alike (contract §4, §7: the fleet's one flows topic tells hosts apart by it)."""
    from streamer.agent.service import Agent, AgentConfig

    topic = unique_topic("host")
    cfg = AgentConfig(
        ifaces=("eth0",),
        datapath=tiny_ringbuf.config,
        state_dir=tmp_path,
        events_file=tmp_path / "events.jsonl",
        kafka=kafka_broker.bootstrap,
        kafka_topic=topic,
        host_name="node-fleet-7",
    )
    agent = Agent.__new__(Agent)  # only its pipeline_config(): no datapath of its own
    agent.config = cfg
    en = Enricher({1: "eth0"}, host=cfg.host_name)
    pipe = Pipeline(agent.pipeline_config(), tiny_ringbuf, en)
    task = asyncio.create_task(pipe.run())
    await asyncio.sleep(0.1)
    pipe.handle(_flow_records(3))
    pipe.handle([b"short"])  # undecodable: a lost record
    pipe.publish_alert({"alert": "syn_flood", "subject": "eth0", "state": "firing"})
    # The sink creates the topic and delivers while the pipeline runs (at stop it would only
    # spool what the broker has not taken yet).
    for _ in range(300):
        if pipe.stats()["sinks"]["kafka"]["delivered"] >= 3:
            break
        await asyncio.sleep(0.1)
    pipe.stop()
    await asyncio.wait_for(task, 30)
    in_file = [json.loads(x) for x in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    on_kafka = [
        json.loads(r["value"])
        for r in await asyncio.to_thread(kcat_consume, kafka_broker.bootstrap, topic, count=5)
    ]
    for got in (in_file, on_kafka):
        assert [o["type"] for o in got] == ["flow", "flow", "flow", "lost", "alert"]
        assert {o["host"] for o in got} == {"node-fleet-7"}


def test_without_a_host_name_records_carry_the_machines_hostname() -> None:
    """Unset, `host` stays what it always was: socket.gethostname()."""
    import socket

    en = Enricher({1: "eth0"}, host=None)
    assert en.lost_record(1, "kernel")["host"] == socket.gethostname()
