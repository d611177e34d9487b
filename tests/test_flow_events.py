"""Flow events end to end: the agent as a real process on the lab, real traffic, a real Kafka
broker read back with kcat (a consumer we did not write), the WebSocket feed and the file.

- Denied and logged flows show up exactly once each (plus rate-limited updates) on all three,
  identical, valid against docs/flow-event.schema.json; allowed flows produce nothing.
- The broker stopped for 30 s during a stream, then restarted: every event reaches Kafka,
  once, in order (the spool had room, so nothing is dropped).
- A WebSocket client that stops reading is disconnected (told so) without delaying the other
  client or Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from support.agentapi import api_stats
from support.agentproc import AgentFactory, AgentProcess, free_port, rule, write_policy
from support.events import valid
from support.netutil import (
    FAMILIES,
    TcpConn,
    echo_server,
    host,
    netns_socket,
    peer,
    tcp_attempt,
    wait_until,
)

from bench.kafkabroker import KafkaBroker, kcat_consume, unique_topic
from streamer.lab.lab import Lab


def start_agent(
    agent_factory: AgentFactory,
    lab: Lab,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    broker: KafkaBroker,
    topic: str,
    extra: tuple[str, ...] = (),
    **kw: Any,
) -> AgentProcess:
    policy = write_policy(tmp_path / "policy.json", rules, "deny")
    api = f"127.0.0.1:{free_port()}"
    agent = agent_factory(
        lab,
        policy,
        api=api,
        extra_args=["--kafka", broker.bootstrap, "--kafka-topic", topic, *extra],
        **kw,
    ).start()
    agent.wait_api()
    agent.wait_log(r"Kafka: streaming to topic", timeout=30)
    return agent


def auth(agent: AgentProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.token()}"}


def kafka_values(broker: KafkaBroker, topic: str) -> list[tuple[str | None, dict[str, Any]]]:
    return [(r["key"], json.loads(r["value"])) for r in kcat_consume(broker.bootstrap, topic)]


class WsReader:
    """A WebSocket client that reads everything into `.got` (in a task)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, **kw: Any) -> None:
        self.session, self.url, self.kw = session, url, kw
        self.got: list[dict[str, Any]] = []
        self.closed_code: int | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> WsReader:
        ws = await self.session.ws_connect(
            self.url, timeout=aiohttp.ClientWSTimeout(ws_close=5), **self.kw
        )
        self.task = asyncio.create_task(self._read(ws))
        return self

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.got.append(json.loads(msg.data))
        self.closed_code = ws.close_code

    def events(self) -> list[dict[str, Any]]:
        return [o for o in self.got if o.get("type") == "flow"]

    async def wait(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            await asyncio.sleep(0.05)
        return pred()


# ---- 1. exactly once, everywhere ---------------------------------------------------------


async def test_denied_and_logged_flows_reach_every_sink_once(
    module_lab: Lab, agent_factory: AgentFactory, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    lab = module_lab
    topic = unique_topic("flows")
    rules = [
        rule(80, "tcp", "allow", dst_port=80, direction="ingress"),
        {**rule(81, "tcp", "log", dst_port=5432, direction="ingress"), "name": "audit-pg"},
        {**rule(82, "tcp", "deny", dst_port=22, priority=200), "name": "no-ssh"},
    ]
    interval = 0.5
    with echo_server(lab.host_ns, (22, 80, 81, 5432)):
        agent = start_agent(
            agent_factory, lab, tmp_path, rules, kafka_broker, topic, event_interval=interval
        )
        url = f"ws://{agent.api}/api/v1/flows"
        async with aiohttp.ClientSession() as session:
            everything = await WsReader(session, url, headers=auth(agent)).start()
            # A browser's way in (?token=), with filters.
            only_ssh = await WsReader(
                session, f"{url}?verdict=deny&port=22&token={agent.token()}"
            ).start()
            flows, allowed = await asyncio.to_thread(_traffic, lab, interval)
            n_flows = len(flows)

            def file_has_all() -> bool:
                ports = {(e["src_ip"], e["src_port"]) for e in agent.events()}
                return all(f in ports for f in flows)

            assert await asyncio.to_thread(wait_until, file_has_all, 10), agent.events()
            await asyncio.sleep(1.0)  # late ones (the logged flow's FIN) land too
            file_events = agent.events()
            n = len(file_events)
            assert await everything.wait(lambda: len(everything.got) >= n, 10), (
                len(everything.got),
                n,
                [e for e in file_events if e not in everything.got],
            )
            kafka = await asyncio.to_thread(
                lambda: kcat_consume(kafka_broker.bootstrap, topic, count=n, timeout=20)
            )
            await asyncio.sleep(0.5)
            assert len(everything.got) == n
            stats = await asyncio.to_thread(api_stats, agent)
        assert agent.stop() == 0

    # Kafka: the same objects, keyed by their addresses, nothing more.
    again = await asyncio.to_thread(kafka_values, kafka_broker, topic)
    assert len(again) == n, "more records in Kafka than events in the file"
    for r in kafka:
        obj = json.loads(r["value"])
        assert r["key"] == f"{obj['src_ip']}->{obj['dst_ip']}"
    by_seq = {e["seq"]: e for e in file_events}
    assert [json.loads(r["value"]) for r in kafka] == file_events  # one partition: in order
    assert everything.got == file_events
    assert sorted(by_seq) == list(range(1, n + 1))
    for e in file_events:
        valid(e)
        assert e["type"] == "flow" and e["verdict"] in ("deny", "log")
        assert (e["src_ip"], e["src_port"]) not in allowed
    # Each denied or logged flow: exactly one "new" event; updates only for the one that
    # kept talking, at most one per interval.
    for key, (verdict, rule_id) in flows.items():
        evs = [e for e in file_events if (e["src_ip"], e["src_port"]) == key]
        news = [e for e in evs if e["kind"] == "new"]
        assert len(news) == 1, evs
        assert news[0]["verdict"] == verdict
        assert (news[0]["rule"] or {}).get("rule_id") == rule_id
        if verdict == "deny":
            assert [e["kind"] for e in evs] == ["new"], evs
    updates = [e for e in file_events if e["kind"] == "update"]
    assert updates and all(e["verdict"] == "log" for e in updates)
    assert n == n_flows + len(updates)
    # The filtered client got exactly the denied SSH attempts.
    want = [e for e in file_events if e["verdict"] == "deny" and 22 in (e["dst_port"],)]
    assert only_ssh.got == want and len(want) == 2
    # Accounting: every event delivered everywhere, nothing lost.
    p = stats["pipeline"]
    for sink in ("file", "kafka", "websocket"):
        assert p["sinks"][sink]["received"] == n, (sink, p["sinks"][sink])
        assert p["sinks"][sink]["queue_dropped"] == 0
    assert p["sinks"]["file"]["delivered"] == n
    assert p["sinks"]["kafka"]["delivered"] == n and p["sinks"]["kafka"]["dropped"] == 0
    assert stats["events_lost"] == 0


def _traffic(
    lab: Lab, interval: float
) -> tuple[dict[tuple[str, int], tuple[str, int | None]], set[tuple[str, int]]]:
    """Allowed, denied (by a rule and by default) and logged TCP flows, both families."""
    flows: dict[tuple[str, int], tuple[str, int | None]] = {}
    allowed: set[tuple[str, int]] = set()
    for fam in FAMILIES:
        h, src = host(lab, fam), peer(lab, fam)
        ok, sport = tcp_attempt(lab.peer_ns, h, 80, 2.0)
        assert ok, f"{fam}: allowed connection failed"
        allowed.add((src, sport))
        ok, sport = tcp_attempt(lab.peer_ns, h, 22, 0.6)
        assert not ok
        flows[(src, sport)] = ("deny", 82)
        ok, sport = tcp_attempt(lab.peer_ns, h, 81, 0.6)
        assert not ok
        flows[(src, sport)] = ("deny", None)
    conns = [TcpConn(lab.peer_ns, host(lab, fam), 5432) for fam in FAMILIES]
    try:
        for fam, conn in zip(FAMILIES, conns, strict=True):
            flows[(peer(lab, fam), conn.sock.getsockname()[1])] = ("log", 81)
        for _ in range(3 * int(1 / 0.1 * interval) + 1):
            assert all(c.exchange() for c in conns), "logged connection failed"
            time.sleep(0.1)
    finally:
        for c in conns:
            c.close()
    return flows, allowed


# ---- 2. the broker away for 30 s -----------------------------------------------------------


class UdpStream:
    """New denied UDP flows from the peer at `rate` per second (one datagram each, to
    consecutive ports), until stopped or `limit` seconds passed."""

    def __init__(self, lab: Lab, rate: float, first_port: int, limit: float = 180.0) -> None:
        self.lab, self.rate, self.port, self.limit = lab, rate, first_port, limit
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with netns_socket(self.lab.peer_ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
            deadline = time.monotonic() + self.limit
            while not self._stop.is_set() and time.monotonic() < deadline:
                s.sendto(b"x", (self.lab.host_v4, self.port + self.sent))
                self.sent += 1
                self._stop.wait(1 / self.rate)

    def __enter__(self) -> UdpStream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def test_broker_outage_loses_nothing(
    module_lab: Lab, agent_factory: AgentFactory, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    lab = module_lab
    topic = unique_topic("outage")
    agent = start_agent(agent_factory, lab, tmp_path, [], kafka_broker, topic)
    with UdpStream(lab, rate=20, first_port=20000) as stream:
        time.sleep(3)
        with kafka_broker.outage():
            down_at = time.monotonic()
            time.sleep(5)
            mid = api_stats(agent)["pipeline"]["sinks"]["kafka"]
            assert not mid["up"] and mid["spool_records"] > 0, mid
            time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        time.sleep(3)
        stream.stop()
    assert stream.sent > 600

    def caught_up() -> bool:
        k = api_stats(agent)["pipeline"]["sinks"]["kafka"]
        return bool(
            k["up"]
            and k["spool_records"] == 0
            and k["inflight"] == 0
            and k["waiting"] == 0
            and k["delivered"] >= len(agent.events())
        )

    assert wait_until(caught_up, 60, interval=0.5), api_stats(agent)["pipeline"]
    file_events = agent.events()
    stats = api_stats(agent)
    assert agent.stop() == 0
    assert len(file_events) == stream.sent, "the file missed events (lost in the kernel?)"
    got = kafka_values(kafka_broker, topic)
    objs = [o for _k, o in got]
    # Every event once, in order, and no lost record: the spool had room for all of them.
    assert [o["seq"] for o in objs] == [e["seq"] for e in file_events]
    assert objs == file_events
    k = stats["pipeline"]["sinks"]["kafka"]
    assert k["spooled"] > 0 and k["replayed"] > 0 and k["dropped"] == 0, k
    assert k["delivered"] == len(file_events)
    assert "has not acknowledged" in agent.log or "unreachable" in agent.log
    for o in objs[:: max(1, len(objs) // 50)]:
        valid(o)


# ---- 3. a client that stops reading ---------------------------------------------------------


def raw_ws_connect(address: str, path: str, token: str) -> socket.socket:
    """A WebSocket handshake by hand, on a socket with a tiny receive buffer; the caller
    then does not read (a stuck browser tab)."""
    h, port = address.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect((h, int(port)))
    s.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "the handshake was cut"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def ws_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the server's (unmasked) frames in `data`; a torn last one is
    left out."""
    out: list[tuple[int, bytes]] = []
    i = 0
    while i + 2 <= len(data):
        op, n = data[i] & 0x0F, data[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            n = struct.unpack_from(">H", data, j)[0]
            j += 2
        elif n == 127:
            n = struct.unpack_from(">Q", data, j)[0]
            j += 8
        if j + n > len(data):
            break
        out.append((op, data[j : j + n]))
        i = j + n
    return out


async def test_a_stuck_websocket_client_delays_nobody(
    module_lab: Lab, agent_factory: AgentFactory, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    lab = module_lab
    topic = unique_topic("slow")
    agent = start_agent(
        agent_factory, lab, tmp_path, [], kafka_broker, topic, extra=("--flow-feed-queue", "2048")
    )
    assert agent.api is not None
    token = agent.token() or ""
    stuck = await asyncio.to_thread(raw_ws_connect, agent.api, "/api/v1/flows", token)
    try:
        async with aiohttp.ClientSession() as session:
            fast = await WsReader(
                session, f"ws://{agent.api}/api/v1/flows", headers=auth(agent)
            ).start()
            burst = 20000  # the stuck socket alone absorbs ~8,000 (kernel buffers)
            t0 = time.monotonic()
            sending = asyncio.create_task(asyncio.to_thread(_udp_burst, lab, burst, 30000))

            def slow_kicked() -> bool:
                ws = api_stats(agent)["pipeline"]["sinks"]["websocket"]
                return bool(ws["slow_disconnects"] == 1)

            assert await asyncio.to_thread(wait_until, slow_kicked, 30, 0.05), (
                api_stats(agent)["pipeline"],
                len(agent.events()),
            )
            # Reading again at once, within the grace period the agent gives a stuck client:
            # the rest of what was in flight, then the final word and the close.
            data = await asyncio.to_thread(_read_all, stuck, 10.0)
            await sending
            sent_s = time.monotonic() - t0
            file_n = lambda: len(agent.events())  # noqa: E731
            assert await fast.wait(lambda: len(fast.events()) >= file_n() > 0, 20)
            fast_s = time.monotonic() - t0
            stats = await asyncio.to_thread(api_stats, agent)
            await asyncio.sleep(0.3)
    finally:
        stuck.close()
    file_events = agent.events()
    assert agent.stop() == 0
    frames = ws_frames(data)
    texts = [json.loads(p) for op, p in frames if op == 1]
    assert texts and texts[-1]["type"] == "slow_consumer", texts[-3:]
    assert frames[-1][0] == 8 and struct.unpack(">H", frames[-1][1][:2])[0] == 1008
    assert len(texts) - 1 < len(file_events)
    # The fast client and Kafka got every event, promptly.
    assert [o["seq"] for o in fast.events()] == [e["seq"] for e in file_events]
    kafka = await asyncio.to_thread(
        lambda: kcat_consume(kafka_broker.bootstrap, topic, count=len(file_events), timeout=20)
    )
    assert [json.loads(r["value"])["seq"] for r in kafka] == [e["seq"] for e in file_events]
    assert fast_s < sent_s + 15, (fast_s, sent_s)
    p = stats["pipeline"]["sinks"]
    assert p["websocket"]["queue_dropped"] == 0 and p["kafka"]["queue_dropped"] == 0
    assert p["websocket"]["slow_disconnects"] == 1 and p["websocket"]["dropped"] > 0
    assert len(file_events) + stats["pipeline"]["source"]["kernel_lost"] == burst


def _udp_burst(lab: Lab, n: int, first_port: int) -> None:
    with netns_socket(lab.peer_ns, socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(n):
            s.sendto(b"x", (lab.host_v4, first_port + i))
            if i % 250 == 249:
                time.sleep(0.05)  # a burst, but one a reading client keeps up with


def _read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out
