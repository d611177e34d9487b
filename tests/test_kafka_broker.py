"""The local Kafka broker (scripts/kafka.sh, bench/kafkabroker.py, the `kafka_broker` fixture).

A real broker throughout, read and written with kcat (and once with aiokafka, the client of
the streamer's Kafka sink): round trips, restarts that keep topics and data, a broker inside
a network namespace of our own, and the script's command line.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.netutil import ns_run, tcp_connect

from bench.kafkabroker import (
    KAFKA_SH,
    KafkaBroker,
    KafkaError,
    KcatTimeout,
    free_port,
    kcat_consume,
    kcat_produce,
    topic_names,
    unique_topic,
    wait_topic,
)
from streamer.lab.lab import Lab

# Generous against a loaded CI machine; a start takes ~5-8 s here (see the report of
# test_restart_keeps_topics_and_data in -rA output).
START_BOUND_S = 30.0


def script(
    *args: str, ns: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return ns_run(ns, str(KAFKA_SH), *args, timeout=timeout, check=False)


def kv(records: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["key"], r["value"]) for r in records]


# ---- the session broker ----------------------------------------------------------------------


def test_kcat_round_trip(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("rt")
    sent = [("10.0.0.1->10.0.0.2", '{"n": 1}'), (None, "no key"), ("k", "two\nlines"), ("", "e")]
    assert kcat_produce(kafka_broker.bootstrap, topic, sent) == 4
    got = kcat_consume(kafka_broker.bootstrap, topic)
    assert kv(got) == sent
    assert [(r["topic"], r["partition"], r["offset"]) for r in got] == [
        (topic, 0, i) for i in range(4)
    ]
    assert all(isinstance(r["timestamp"], int) and r["headers"] == [] for r in got)
    assert topic in topic_names(kafka_broker.bootstrap)


def test_consume_count_waits_and_reports_shortfall(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("count")
    kcat_produce(kafka_broker.bootstrap, topic, ["a", "b"])
    assert [r["value"] for r in kcat_consume(kafka_broker.bootstrap, topic, count=2)] == ["a", "b"]
    t0 = time.monotonic()
    with pytest.raises(KcatTimeout, match="got 2 of 3 records") as exc:
        kcat_consume(kafka_broker.bootstrap, topic, count=3, timeout=3.0)
    assert time.monotonic() - t0 < 10.0
    assert [r["value"] for r in exc.value.records] == ["a", "b"]


def test_wait_topic_neither_creates_nor_hangs(kafka_broker: KafkaBroker) -> None:
    topic = unique_topic("absent")
    with pytest.raises(TimeoutError, match="not there"):
        wait_topic(kafka_broker.bootstrap, topic, timeout=1.5)
    assert topic not in topic_names(kafka_broker.bootstrap)
    with pytest.raises(TimeoutError):
        kcat_consume(kafka_broker.bootstrap, topic, timeout=1.5)


def test_aiokafka_producer_and_admin(kafka_broker: KafkaBroker) -> None:
    """The settings the Kafka sink uses (acks=all, idempotence, compression) work against this
    broker version; a topic made with the admin client has the partitions asked for."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = unique_topic("aio")

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(
            bootstrap_servers=kafka_broker.bootstrap,
            acks="all",
            enable_idempotence=True,
            compression_type="gzip",
            linger_ms=5,
        )
        await producer.start()
        try:
            for i in range(20):
                await producer.send(topic, f'{{"seq": {i}}}'.encode(), key=f"k{i % 4}".encode())
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(run())
    assert wait_topic(kafka_broker.bootstrap, topic) == 3
    got = kcat_consume(kafka_broker.bootstrap, topic, count=20)
    assert sorted(r["value"] for r in got) == sorted(f'{{"seq": {i}}}' for i in range(20))
    # Same key, same partition, in order.
    for k in range(4):
        mine = [r for r in got if r["key"] == f"k{k}"]
        assert len({r["partition"] for r in mine}) == 1
        assert [r["value"] for r in mine] == [f'{{"seq": {i}}}' for i in range(k, 20, 4)]


# ---- brokers of our own ----------------------------------------------------------------------


def test_restart_keeps_topics_and_data() -> None:
    with KafkaBroker() as broker:
        assert broker.running
        assert broker.startup_seconds is not None and broker.startup_seconds < START_BOUND_S
        first_start = broker.startup_seconds
        boot = broker.bootstrap
        topic = unique_topic("restart")
        kcat_produce(boot, topic, [("a", "1"), ("b", "2"), ("c", "3")])
        log = broker.directory / "logs" / "server.log"
        assert log.stat().st_size > 0  # it logs to its own file

        broker.stop()
        assert not broker.running
        assert not tcp_connect(None, "127.0.0.1", broker.port or 0)
        assert (broker.directory / "data").is_dir()

        broker.start()
        assert broker.bootstrap == boot
        assert kv(kcat_consume(boot, topic)) == [("a", "1"), ("b", "2"), ("c", "3")]
        kcat_produce(boot, topic, [("d", "4")])
        assert [r["offset"] for r in kcat_consume(boot, topic)] == [0, 1, 2, 3]

        # A crash (SIGKILL) loses nothing acknowledged either.
        broker.kill()
        assert not broker.running
        broker.start()
        assert kv(kcat_consume(boot, topic))[-1] == ("d", "4")

        with broker.outage():
            assert not broker.running
        assert broker.running
        assert topic in topic_names(boot)
        print(
            f"broker start-up: first {first_start:.1f}s, last restart {broker.startup_seconds:.1f}s"
        )
    assert not broker.running
    assert not broker.directory.exists()


def test_session_broker_outage_restarts_even_when_the_block_fails(
    kafka_broker: KafkaBroker,
) -> None:
    topic = unique_topic("outage")
    kcat_produce(kafka_broker.bootstrap, topic, [("k", "before")])
    with pytest.raises(RuntimeError, match="boom"), kafka_broker.outage():
        assert not kafka_broker.running
        assert not tcp_connect(None, "127.0.0.1", kafka_broker.port or 0)
        raise RuntimeError("boom")
    assert kafka_broker.running
    kcat_produce(kafka_broker.bootstrap, topic, [("k", "after")])
    assert kv(kcat_consume(kafka_broker.bootstrap, topic)) == [("k", "before"), ("k", "after")]


def test_broker_in_a_network_namespace(lab: Lab) -> None:
    """It serves 127.0.0.1 of the namespace it was started in, and only there."""
    port = free_port(None)  # free outside too, so "not reachable outside" means something
    with KafkaBroker(netns=lab.host_ns, port=port) as broker:
        topic = unique_topic("netns")
        kcat_produce(broker.bootstrap, topic, [("k", "inside")], netns=lab.host_ns)
        assert kv(kcat_consume(broker.bootstrap, topic, netns=lab.host_ns)) == [("k", "inside")]
        assert tcp_connect(lab.host_ns, "127.0.0.1", port)
        assert not tcp_connect(lab.peer_ns, "127.0.0.1", port)
        assert not tcp_connect(None, "127.0.0.1", port)
        broker.stop()
        broker.start()
        assert kv(kcat_consume(broker.bootstrap, topic, netns=lab.host_ns)) == [("k", "inside")]


# ---- scripts/kafka.sh as `make kafka` runs it ---------------------------------------------------


def test_script_default_port_inside_a_namespace(lab: Lab) -> None:
    """`ip netns exec NS scripts/kafka.sh start` (what `make kafka` runs, in a namespace of
    our own so 9092 is surely free): 127.0.0.1:9092 there, found again by status and stop."""
    ns = lab.host_ns
    try:
        started = script("start", ns=ns)
        assert started.returncode == 0, started.stderr
        assert started.stdout == "127.0.0.1:9092\n"
        assert "ready on 127.0.0.1:9092" in started.stderr

        status = script("status", ns=ns)
        assert status.returncode == 0 and status.stdout.startswith("running 127.0.0.1:9092 pid ")
        broker_dir = Path(status.stdout.split(" dir ", 1)[1].strip())
        assert (broker_dir / "data" / "meta.properties").exists()

        again = script("start", ns=ns)  # idempotent: same broker, same address
        assert again.returncode == 0 and again.stdout == "127.0.0.1:9092\n"
        assert "already running" in again.stderr

        root = script("status", "--port", "9092")  # another namespace, another broker (or none)
        assert str(broker_dir) not in root.stdout

        kcat_produce("127.0.0.1:9092", "demo", ["hello"], netns=ns)
        assert [r["value"] for r in kcat_consume("127.0.0.1:9092", "demo", netns=ns)] == ["hello"]
    finally:
        stopped = script("stop", ns=ns)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped the broker on 127.0.0.1:9092" in stopped.stderr
    assert not broker_dir.exists()
    assert script("status", ns=ns).returncode == 3
    again_stopped = script("stop", ns=ns)
    assert again_stopped.returncode == 0 and "nothing to stop" in again_stopped.stderr


def test_script_listen_and_advertised(tmp_path: Path) -> None:
    """`start --listen ADDR:PORT --advertised HOST:PORT` (what `make kafka KAFKA_LISTEN=...
    KAFKA_ADVERTISED=...` runs): the broker listens and advertises there, and status and
    stop find it by the port."""
    port = free_port()
    where = f"127.0.0.1:{port}"
    try:
        started = script(
            "start", "--listen", where, "--advertised", where, "--dir", str(tmp_path / "b")
        )
        assert started.returncode == 0, started.stderr
        assert started.stdout == f"{where}\n"
        props = (tmp_path / "b" / "server.properties").read_text()
        assert f"listeners=PLAINTEXT://{where}," in props
        assert f"advertised.listeners=PLAINTEXT://{where}\n" in props
        status = script("status", "--port", str(port))
        assert status.returncode == 0 and status.stdout.startswith(f"running {where} pid ")
        kcat_produce(where, "demo", ["hello"])
        assert [r["value"] for r in kcat_consume(where, "demo")] == ["hello"]
    finally:
        stopped = script("stop", "--listen", where)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped the broker on {where}" in stopped.stderr


def test_fetch_uses_the_cache_without_network(lab: Lab) -> None:
    """After `make setup` the jars are cached: a fetch from a namespace with no route out
    succeeds at once."""
    t0 = time.monotonic()
    res = script("fetch", ns=lab.peer_ns, timeout=30.0)
    assert res.returncode == 0, res.stderr
    assert "already cached" in res.stderr
    assert time.monotonic() - t0 < 10.0


def test_fetch_without_maven_central_fails_clearly(lab: Lab, tmp_path: Path) -> None:
    """An empty cache and no way out (the lab's namespace has no route beyond the lab): a
    bounded failure naming the cause, nothing half-made left in the cache."""
    cache = tmp_path / "cache"
    res = ns_run(
        lab.peer_ns,
        "env",
        f"MICROSEG_KAFKA_CACHE={cache}",
        str(KAFKA_SH),
        "fetch",
        timeout=180.0,
        check=False,
    )
    assert res.returncode == 1
    assert "cannot download Kafka" in res.stderr and "Maven Central" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in cache.iterdir()) == [".fetch.lock", "fetch-4.3.1.log"]
    assert (
        ns_run(
            None, "env", f"MICROSEG_KAFKA_CACHE={cache}", str(KAFKA_SH), "cached", check=False
        ).returncode
        == 1
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "missing command"),
        (("launch",), "unknown command 'launch'"),
        (("start", "--port", "abc"), "invalid --port 'abc'"),
        (("start", "--port", "70000"), "invalid --port '70000'"),
        (("start", "--port", "0"), "invalid --port '0'"),
        (("start", "--port"), "option --port needs a value"),
        (
            ("start", "--port", "19", "--controller-port", "19"),
            "--port and --controller-port must differ",
        ),
        (("start", "--frobnicate"), "unknown option '--frobnicate'"),
        (("start", "--timeout", "-3"), "invalid --timeout '-3'"),
        (("start", "--version", "3.9.1"), "invalid Kafka version '3.9.1'"),
        (("start", "--dir", "/"), "--dir / is not a broker directory"),
        (("start", "--listen", "9092"), "invalid --listen '9092'"),
        (("start", "--listen", "127.0.0.1:0"), "invalid --listen '127.0.0.1:0'"),
        (("start", "--listen", "0.0.0.0:9092"), "say which one clients use with --advertised"),
        (("start", "--listen", "[::]:9092"), "say which one clients use with --advertised"),
        (("start", "--port", "5", "--listen", "127.0.0.1:6"), "name different ports"),
        (("start", "--advertised", "kafka1"), "invalid --advertised 'kafka1'"),
        (("status", "--advertised", "kafka1:9092"), "--advertised is for start"),
    ],
)
def test_script_rejects_bad_input(args: tuple[str, ...], message: str) -> None:
    res = script(*args, timeout=30.0)
    assert res.returncode == 2
    assert message in res.stderr
    assert "usage:" in res.stderr
    assert "Traceback" not in res.stderr


def test_script_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    res = script("start", "--dir", str(tmp_path), timeout=30.0)
    assert res.returncode == 2
    assert "not empty and was not made by this script" in res.stderr
    stop = script("stop", "--dir", str(tmp_path), timeout=30.0)
    assert stop.returncode == 2 and "not a broker directory" in stop.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_script_start_reports_a_taken_port() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        res = script("start", "--port", str(port), timeout=60.0)
    assert res.returncode == 1
    assert f"127.0.0.1:{port} is already in use" in res.stderr
    assert "Traceback" not in res.stderr


def test_broker_without_start_has_no_address() -> None:
    broker = KafkaBroker()
    with pytest.raises(KafkaError, match="start"):
        _ = broker.bootstrap
    broker.destroy()  # harmless before a start
    assert not broker.running
