"""The fleet's Kafka topics (streamer/fleet/topic.py) on the real broker: generations and
their numbering, a stale base refused, two writers from the same base (one process and two)
of which exactly one wins, confirm, a reader that yields only the newest and skips bad
records, a 100,000-rule generation, a broker outage the reader and the fleet view live
through, and agents' statuses (tombstones, lost by time)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from bench.kafkabroker import KafkaBroker, free_port, kcat_produce, topic_names, unique_topic
from streamer.fleet.records import POLICY_KEY, AgentStatus, PolicyRecord, encode_policy
from streamer.fleet.topic import (
    FleetError,
    FleetView,
    PolicyReader,
    PolicyWriter,
    StaleError,
    StatusPublisher,
    ensure_topics,
    is_lost,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
# Bounds for waits on the broker (never assertions on how long something took).
WAIT_S = 60.0


def doc(n: int) -> dict[str, Any]:
    return {"default_action": "deny", "groups": {}, "policies": [{"rule_id": n, "action": "allow"}]}


class Follower:
    """A PolicyReader iterated in a task: what it yields goes to `got`, on_bad to `bad`."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bad: list[str] = []
        self.reader = PolicyReader(bootstrap, topic, on_bad=self.bad.append)
        self.got: asyncio.Queue[PolicyRecord] = asyncio.Queue()

    async def run(self) -> None:
        async for rec in self.reader.records():
            await self.got.put(rec)

    async def next(self) -> PolicyRecord:
        return await asyncio.wait_for(self.got.get(), WAIT_S)


@pytest.fixture
async def topics(kafka_broker: KafkaBroker) -> tuple[str, str, str]:
    return kafka_broker.bootstrap, unique_topic("policy"), unique_topic("agents")


async def follow(bootstrap: str, topic: str) -> AsyncIterator[Follower]:
    f = Follower(bootstrap, topic)
    task = asyncio.create_task(f.run())
    try:
        yield f
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await f.reader.close()


async def test_generations_are_numbered_and_stale_bases_refused(
    topics: tuple[str, str, str],
) -> None:
    boot, pt, at = topics
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        assert await w.newest() is None
        with pytest.raises(StaleError, match=r"^stale: newest is 0$"):
            await w.publish(doc(1), base=4, actor="a")
        r1 = await w.publish(doc(1), base=0, actor="alice", confirm_within=30)
        assert (r1.generation, r1.base, r1.actor, r1.confirm_within) == (1, 0, "alice", 30)
        assert not r1.confirmed and r1.document == doc(1)
        assert await w.newest() == r1
        r2 = await w.publish(doc(2), base=1, actor="bob")
        r3 = await w.publish(doc(3), base=None, actor="carol")  # no base: over whatever
        assert (r2.generation, r3.generation, r3.base) == (2, 3, 2)
        with pytest.raises(StaleError, match=r"^stale: newest is 3$") as exc:
            await w.publish(doc(9), base=2, actor="late")
        assert exc.value.newest == 3
        assert await w.newest() == r3
    # Both topics exist now, compacted; a second writer sees what the first wrote.
    assert {pt, at} <= set(topic_names(boot))
    async with PolicyWriter(boot, pt, agents_topic=at) as w2:
        assert await w2.newest() == r3


async def test_confirm(topics: tuple[str, str, str]) -> None:
    boot, pt, at = topics
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        r1 = await w.publish(doc(1), base=0, actor="a", confirm_within=60)
        c1 = await w.confirm(r1)
        assert c1.confirmed and c1.generation == 1 and c1.document == r1.document
        assert await w.confirm(r1) == c1  # again: nothing new
        assert await w.newest() == c1
        r2 = await w.publish(doc(2), base=1, actor="a", confirm_within=60)
        with pytest.raises(StaleError, match="newest is 2"):
            await w.confirm(r1)
        assert await w.newest() == r2


async def _race(boot: str, pt: str, at: str, base: int, tag: str) -> PolicyRecord | StaleError:
    """One writer, made and used at once, publishing from `base`."""
    try:
        async with PolicyWriter(boot, pt, agents_topic=at) as w:
            return await w.publish(doc(hash(tag) % 1000), base=base, actor=tag)
    except StaleError as e:
        return e


async def test_two_writers_from_one_base_exactly_one_wins(topics: tuple[str, str, str]) -> None:
    boot, pt, at = topics
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        await w.publish(doc(0), base=0, actor="seed")
    for base in range(1, 5):
        results = await asyncio.gather(
            _race(boot, pt, at, base, f"x{base}"), _race(boot, pt, at, base, f"y{base}")
        )
        won = [r for r in results if isinstance(r, PolicyRecord)]
        lost = [r for r in results if isinstance(r, StaleError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert won[0].generation == base + 1
        async with PolicyWriter(boot, pt, agents_topic=at) as w:
            assert await w.newest() == won[0]


_RACER = """
import asyncio, json, sys
from streamer.fleet.topic import PolicyWriter, StaleError
async def main():
    boot, pt, at, base, tag = sys.argv[1:]
    try:
        async with PolicyWriter(boot, pt, agents_topic=at) as w:
            rec = await w.publish({"tag": tag}, base=int(base), actor=tag)
        print(json.dumps({"won": rec.generation}))
    except StaleError as e:
        print(json.dumps({"stale": e.newest, "fenced": type(e).__name__}))
asyncio.run(main())
"""


async def test_two_processes_from_one_base_exactly_one_wins(
    topics: tuple[str, str, str],
) -> None:
    boot, pt, at = topics
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        await w.publish(doc(0), base=0, actor="seed")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for base in (1, 2, 3):
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _RACER,
                boot,
                pt,
                at,
                str(base),
                f"p{base}{side}",
                stdout=subprocess.PIPE,
                env=env,
            )
            for side in "ab"
        ]
        outs = [await asyncio.wait_for(p.communicate(), WAIT_S) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        results = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outs]
        assert sorted("won" in r for r in results) == [False, True], results
        assert [r["won"] for r in results if "won" in r] == [base + 1]
        assert [r["stale"] for r in results if "stale" in r] in ([base], [base + 1])


async def test_reader_yields_the_newest_only(topics: tuple[str, str, str]) -> None:
    boot, pt, at = topics
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        for g in range(3):
            r3 = await w.publish(doc(g), base=g, actor="a")
        async for f in follow(boot, pt):
            # Behind by three: straight to the newest.
            assert await f.next() == r3
            assert f.reader.caught_up.is_set()
            r4 = await w.publish(doc(4), base=3, actor="a", confirm_within=10)
            assert await f.next() == r4
            c4 = await w.confirm(r4)
            assert await f.next() == c4
            assert f.got.empty() and f.bad == []


async def test_reader_of_an_empty_topic_is_caught_up(topics: tuple[str, str, str]) -> None:
    boot, pt, at = topics
    await ensure_topics(boot, pt, at)
    async for f in follow(boot, pt):
        await asyncio.wait_for(f.reader.caught_up.wait(), WAIT_S)
        assert f.got.empty()


async def test_reader_waits_for_the_topic_without_creating_it(
    topics: tuple[str, str, str],
) -> None:
    boot, pt, at = topics
    async for f in follow(boot, pt):
        await asyncio.sleep(3.0)  # it polls meanwhile
        assert pt not in topic_names(boot)
        assert not f.reader.caught_up.is_set()
        async with PolicyWriter(boot, pt, agents_topic=at) as w:
            r1 = await w.publish(doc(1), base=0, actor="a")
        assert await f.next() == r1


async def test_bad_records_are_reported_and_change_nothing(
    topics: tuple[str, str, str],
) -> None:
    boot, pt, at = topics
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        r1 = await w.publish(doc(1), base=0, actor="a")
        r2 = await w.publish(doc(2), base=1, actor="a")
        async for f in follow(boot, pt):
            assert await f.next() == r2
            # By hand, not through the writer: garbage, another key, an older generation.
            kcat_produce(boot, pt, [("policy", "not a policy"), ("other", "x")])
            producer = AIOKafkaProducer(bootstrap_servers=boot)
            await producer.start()
            try:
                await producer.send_and_wait(pt, encode_policy(r1), key=POLICY_KEY)
            finally:
                await producer.stop()
            r3 = await w.publish(doc(3), base=2, actor="a")
            assert r3.generation == 3
            assert await f.next() == r3
            assert len(f.bad) == 3, f.bad
            assert "not zstd-compressed" in f.bad[0] and f"{pt}[0]@" in f.bad[0]
            assert "key b'other' is not b'policy'" in f.bad[1]
            assert "generation 1 after generation 2" in f.bad[2]
        # A reader from scratch: the same newest, the same complaints.
        async for f in follow(boot, pt):
            assert await f.next() == r3
            assert len(f.bad) == 3


async def test_a_generation_of_100000_rules(topics: tuple[str, str, str]) -> None:
    boot, pt, at = topics
    rules = [
        {
            "rule_id": i,
            "name": f"rule-{i}",
            "src_ip": f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
            "dst_ip": None,
            "src_port": None,
            "dst_port": 1 + i % 65535,
            "protocol": "tcp",
            "action": "allow",
            "priority": i,
            "direction": "ingress",
            "hosts": {"role": "web"},
        }
        for i in range(100_000)
    ]
    big = {"default_action": "deny", "groups": {}, "policies": rules}
    print(f"100,000 rules: {len(encode_policy(PolicyRecord(1, big, 0, 'a', 0.0)))} bytes")
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        rec = await w.publish(big, base=0, actor="bulk")
        async for f in follow(boot, pt):
            got = await f.next()
            assert got == rec and got.document == big and f.bad == []


async def test_existing_policy_topic_must_fit_generations(kafka_broker: KafkaBroker) -> None:
    boot = kafka_broker.bootstrap
    pt, at = unique_topic("plain"), unique_topic("agents")
    kcat_produce(boot, pt, ["made by auto-creation"])  # not compacted, 1 MB records
    with pytest.raises(FleetError, match=r"cleanup\.policy is delete, not compact.*kafka-configs"):
        await ensure_topics(boot, pt, at)


async def test_broker_away_for_30s(kafka_broker: KafkaBroker) -> None:
    """The reader and the fleet view live through the outage; an agent that keeps trying to
    heartbeat (its publisher giving up each time, never raising) does not become lost while
    the broker is away; afterwards the reader sees a generation published after it."""
    boot = kafka_broker.bootstrap
    pt, at = unique_topic("outage"), unique_topic("agents")
    async with PolicyWriter(boot, pt, agents_topic=at) as w:
        r1 = await w.publish(doc(1), base=0, actor="a")
    view = FleetView(boot, at, heartbeat_s=1.0)
    delivered: list[bool] = []

    async def heartbeat(pub: StatusPublisher) -> None:
        while True:
            delivered.append(await pub.publish(status("web-1", heartbeat_at=time.time())))
            await asyncio.sleep(0.25)

    async with StatusPublisher(boot, at, timeout=1.0) as pub, asyncio.TaskGroup() as tg:
        beat = tg.create_task(heartbeat(pub))
        view_task = tg.create_task(view.run())
        await asyncio.wait_for(view.caught_up.wait(), WAIT_S)
        while set(view.live()) != {"web-1"}:
            await asyncio.sleep(0.05)
        async for f in follow(boot, pt):
            assert await f.next() == r1

            def away() -> None:
                with kafka_broker.outage():
                    time.sleep(30.0)

            outage = asyncio.create_task(asyncio.to_thread(away))
            while kafka_broker.running:
                await asyncio.sleep(0.2)
            n = len(delivered)
            await asyncio.sleep(8.0)  # several lost-times (3 s) into the outage
            assert not kafka_broker.running
            assert set(view.live()) == {"web-1"}
            assert delivered[n:] and not any(delivered[n + 1 :])
            await outage
            assert set(view.live()) == {"web-1"}
            async with PolicyWriter(boot, pt, agents_topic=at) as w:
                r2 = await w.publish(doc(2), base=1, actor="a")
            assert await f.next() == r2
            assert f.bad == []
        while not delivered[-1]:
            await asyncio.sleep(0.1)
        assert set(view.live()) == {"web-1"}
        # Silent from now on: lost after three heartbeats.
        beat.cancel()
        while view.live():
            await asyncio.sleep(0.1)
        assert view.state_of(view.agents["web-1"]) == "lost"
        view_task.cancel()
    await view.close()


def status(host: str, **over: Any) -> AgentStatus:
    fields: dict[str, Any] = {
        "host": host,
        "labels": {"role": "web"},
        "addresses": ["10.1.0.1"],
        "generation": 1,
        "applied_at": time.time(),
        "state": "enforcing",
        "error": None,
        "version": "0.1.0",
        "heartbeat_at": time.time(),
    }
    fields.update(over)
    return AgentStatus(**fields)


async def test_status_tombstone_live_and_lost(kafka_broker: KafkaBroker) -> None:
    boot = kafka_broker.bootstrap
    at = unique_topic("agents")
    changes: list[dict[str, AgentStatus]] = []
    view: FleetView

    def changed() -> None:
        changes.append(view.live())

    view = FleetView(boot, at, heartbeat_s=0.5, on_change=changed)
    async with StatusPublisher(boot, at) as pub, asyncio.TaskGroup() as tg:
        assert await pub.publish(status("web-1"))
        assert await pub.publish(status("db-1", labels={"role": "db"}, addresses=["10.2.0.1"]))
        task = tg.create_task(view.run())
        await asyncio.wait_for(view.caught_up.wait(), WAIT_S)
        while set(view.live()) != {"web-1", "db-1"}:
            await asyncio.sleep(0.05)
        assert view.state_of(view.agents["db-1"]) == "enforcing"
        assert set(changes[-1]) == {"web-1", "db-1"}
        # db-1 stops cleanly: gone at once.
        assert await pub.tombstone("db-1")
        while "db-1" in view.agents:
            await asyncio.sleep(0.05)
        assert set(changes[-1]) == {"web-1"}
        # A heartbeat changing nothing but the time is no change; new addresses are.
        n = len(changes)
        assert await pub.publish(status("web-1", generation=2))
        assert await pub.publish(status("web-1", addresses=["10.1.0.9"]))
        while view.agents["web-1"].addresses != ["10.1.0.9"]:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert len(changes) == n + 1
        # web-1 falls silent: lost after three heartbeats, by time alone (the view's own timer
        # tells on_change a moment after live() says so).
        async with asyncio.timeout(WAIT_S):
            while view.live() or changes[-1] != {}:
                await asyncio.sleep(0.05)
        assert view.state_of(view.agents["web-1"]) == "lost"
        assert is_lost(view.agents["web-1"], time.time(), 0.5)
        assert not is_lost(view.agents["web-1"], time.time())  # 5 s heartbeats: not yet
        # Back with a heartbeat.
        assert await pub.publish(status("web-1", state="error", error="bad rule"))
        while not view.live():
            await asyncio.sleep(0.05)
        assert view.state_of(view.agents["web-1"]) == "error"
        task.cancel()
    await view.close()
    snap = await snapshot(boot, at)
    assert set(snap) == {"web-1"} and snap["web-1"].error == "bad rule"
    assert await snapshot(boot, unique_topic("none")) == {}


async def test_status_publisher_without_a_broker_gives_up_in_time() -> None:
    port = free_port()
    async with StatusPublisher(f"127.0.0.1:{port}", "microseg.agents", timeout=2.0) as pub:
        assert await pub.publish(status("web-1")) is False
        assert await pub.tombstone("web-1") is False
