"""The WebSocket sink: the live flow feed at GET /api/v1/flows.

In: a channel of Items (the hub's), and WebSocket clients, each with a `FlowFilter` from the
query string (verdict, ip, port, protocol, rule_id, staged). Out: one text message per matching
record (lost records always pass: they concern every subscriber). Each client has a bounded
queue; the hub only ever puts into it without waiting, so a client that stops reading delays
nobody. A client whose queue overflows is sent `{"type": "slow_consumer", ...}` (if its socket
still takes it within two seconds), disconnected (close code 1008), and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from streamer import vocabulary
from streamer.events.fanout import Channel, Item, count_events

log = logging.getLogger("microseg.sink.websocket")

VERDICTS = frozenset(vocabulary.VERDICTS)
PROTOCOLS = frozenset(vocabulary.PROTOCOL_NUMBERS)
FILTER_PARAMS = ("verdict", "ip", "port", "protocol", "rule_id", "staged")
STAGED_ANY = "any"  # `staged=any`: every event with a staged verdict
DEFAULT_CLIENT_QUEUE = 4096
MAX_CLIENTS = 64

_LOST_MARK = b'"type":"lost"'  # lost records start {"schema":...,"type":"lost"

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class FlowFilter:
    """Which events a client wants; None = any. Values within a field are alternatives
    (`verdict=deny,log`); fields must all match. `ip` and `port` match either endpoint;
    `staged` is `any` (the event has a staged verdict: contract §6) or staged verdicts."""

    verdicts: frozenset[str] | None = None
    nets: tuple[IPNet, ...] | None = None
    ports: frozenset[int] | None = None
    protocols: frozenset[str] | None = None
    rule_ids: frozenset[int] | None = None
    staged: frozenset[str] | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> FlowFilter:
        """From query parameters; ValueError naming the bad one."""
        verdicts = nets = ports = protocols = rule_ids = staged = None
        if "verdict" in query:
            vs = _split(query["verdict"].lower())
            bad = [v for v in vs if v not in VERDICTS]
            if bad or not vs:
                raise ValueError(
                    f"verdict: {query['verdict'][:40]!r}: use allow, deny or log"
                    " (comma-separated for several)"
                )
            verdicts = frozenset(vs)
        if "ip" in query:
            items = _split(query["ip"])
            try:
                nets = tuple(ipaddress.ip_network(v, strict=False) for v in items)
            except ValueError:
                nets = ()
            if not items or not nets:
                raise ValueError(
                    f"ip: {query['ip'][:60]!r} is not an IPv4/IPv6 address or CIDR"
                    " (comma-separated for several)"
                )
        if "port" in query:
            items = _split(query["port"])
            if not items or not all(v.isdigit() and 0 < int(v) <= 65535 for v in items):
                raise ValueError(f"port: {query['port'][:40]!r} is not a port number 1..65535")
            ports = frozenset(int(v) for v in items)
        if "protocol" in query:
            ps = _split(query["protocol"].lower())
            if not ps or any(p not in PROTOCOLS for p in ps):
                raise ValueError(
                    f"protocol: {query['protocol'][:40]!r}: use tcp, udp, icmp or icmpv6"
                )
            protocols = frozenset(ps)
        if "rule_id" in query:
            items = _split(query["rule_id"])
            if not items or not all(v.isdigit() and 0 < int(v) < 2**32 for v in items):
                raise ValueError(f"rule_id: {query['rule_id'][:40]!r} is not a rule_id")
            rule_ids = frozenset(int(v) for v in items)
        if "staged" in query:
            vs = _split(query["staged"].lower())
            if vs == [STAGED_ANY]:
                staged = VERDICTS
            elif vs and all(v in VERDICTS for v in vs):
                staged = frozenset(vs)
            else:
                raise ValueError(
                    f"staged: {query['staged'][:40]!r}: use any, or staged verdicts allow, deny"
                    " or log (comma-separated for several)"
                )
        return cls(verdicts, nets, ports, protocols, rule_ids, staged)

    @property
    def any(self) -> bool:
        return (
            self.verdicts is None
            and self.nets is None
            and self.ports is None
            and self.protocols is None
            and self.rule_ids is None
            and self.staged is None
        )

    def matches(self, obj: dict[str, Any]) -> bool:
        if obj.get("type") in ("lost", "alert"):  # gaps and alerts reach every client
            return True
        if self.verdicts is not None and obj.get("verdict") not in self.verdicts:
            return False
        if self.protocols is not None and obj.get("protocol") not in self.protocols:
            return False
        if self.ports is not None and not (
            obj.get("src_port") in self.ports or obj.get("dst_port") in self.ports
        ):
            return False
        if self.rule_ids is not None:
            rule = obj.get("rule")
            if not rule or rule.get("rule_id") not in self.rule_ids:
                return False
        if self.staged is not None:
            st = obj.get("staged")
            if not isinstance(st, dict) or st.get("verdict") not in self.staged:
                return False
        if self.nets is not None:
            try:
                addrs = (ipaddress.ip_address(obj["src_ip"]), ipaddress.ip_address(obj["dst_ip"]))
            except (KeyError, ValueError):
                return False
            if not any(a in n for a in addrs for n in self.nets if a.version == n.version):
                return False
        return True

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.verdicts is not None:
            out["verdict"] = sorted(self.verdicts)
        if self.nets is not None:
            out["ip"] = [str(n) for n in self.nets]
        if self.ports is not None:
            out["port"] = sorted(self.ports)
        if self.protocols is not None:
            out["protocol"] = sorted(self.protocols)
        if self.rule_ids is not None:
            out["rule_id"] = sorted(self.rule_ids)
        if self.staged is not None:
            out["staged"] = [STAGED_ANY] if self.staged == VERDICTS else sorted(self.staged)
        return out


@dataclass(eq=False)
class _Client:
    id: int
    filter: FlowFilter
    peer: str
    queue: asyncio.Queue[bytes | None]
    connected_at: float = field(default_factory=time.monotonic)
    sent: int = 0
    kicked: bool = False
    pump: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class WebSocketConfig:
    client_queue: int = DEFAULT_CLIENT_QUEUE
    max_clients: int = MAX_CLIENTS
    kick_grace: float = 2.0  # a slow client's socket gets this long to take the final message
    recent: int = 2048  # records kept for GET /api/v1/flows/recent (`flows observe --last`)


class WebSocketHub:
    """The feed's fan-out to clients: a sink of the pipeline, and the route's handler."""

    name = "websocket"

    def __init__(self, config: WebSocketConfig | None = None) -> None:
        self.config = config or WebSocketConfig()
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self.received = 0
        self.delivered = 0  # event messages sent, over all clients
        self.dropped = 0  # events queued for clients that were disconnected as too slow
        self.slow_disconnects = 0
        self.connections = 0
        self.closed = False
        self.recent: deque[Item] = deque(maxlen=self.config.recent)

    # ---- the sink ----------------------------------------------------------------------------

    async def run(self, channel: Channel) -> None:
        try:
            while True:
                items = await channel.get_batch(4096)
                if not items:
                    return
                self.publish(items)
        finally:
            self.close()

    def close(self) -> None:
        """No more records: every client is told to finish and disconnect; new ones are
        refused (503). For a hub fed by something else than a channel (the fleet feed)."""
        self.closed = True
        for c in list(self._clients.values()):
            self._end(c, None)

    def publish(self, items: list[Item]) -> None:
        """Queue `items` for every client whose filter matches; never waits."""
        self.received += count_events(items)
        self.recent.extend(items)
        for c in list(self._clients.values()):
            if c.kicked:
                continue
            f = c.filter
            for item in items:
                if f.any or f.matches(item.obj):
                    try:
                        c.queue.put_nowait(item.data)
                    except asyncio.QueueFull:
                        self._kick(c)
                        break

    def _kick(self, c: _Client) -> None:
        """`c` cannot keep up: drop what it has queued, tell it, and disconnect it."""
        c.kicked = True
        self.slow_disconnects += 1
        dropped = c.queue.qsize()
        self.dropped += dropped
        log.warning(
            "flow feed client %s (%s) too slow: %d events queued; disconnecting it",
            c.id,
            c.peer,
            dropped,
        )
        while not c.queue.empty():
            c.queue.get_nowait()
        msg = {
            "type": "slow_consumer",
            "message": "this client did not keep up with the flow feed and is disconnected",
            "dropped": dropped,
            "queue_size": self.config.client_queue,
        }
        self._end(c, orjson.dumps(msg))

    def _end(self, c: _Client, last: bytes | None) -> None:
        """Tell `c`'s pump to send `last` (if any) and close; cancel it if its socket does
        not take that within the grace period."""
        with contextlib.suppress(asyncio.QueueFull):
            if last is not None:
                c.queue.put_nowait(last)
            c.queue.put_nowait(None)
        if c.pump is not None:
            asyncio.get_running_loop().call_later(self.config.kick_grace, c.pump.cancel)

    # ---- the route ---------------------------------------------------------------------------

    def has_room(self) -> bool:
        return len(self._clients) < self.config.max_clients

    async def serve(self, request: web.Request, flt: FlowFilter) -> web.StreamResponse:
        """Upgrade `request` to a WebSocket and stream matching records until either side
        closes. 400 for a plain GET; 503 when the hub is full or stopped. The client's send
        and read tasks run in a TaskGroup: an error of theirs other than the client going
        away is raised here once the socket is closed."""
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
        if not ws.can_prepare(request).ok:
            raise web.HTTPBadRequest(
                reason="this route is a WebSocket: connect with a WebSocket client"
            )
        if self.closed or not self.has_room():
            raise web.HTTPServiceUnavailable(reason="the flow feed takes no more clients")
        await ws.prepare(request)
        c = _Client(
            next(self._ids),
            flt,
            str(request.remote or "?"),
            asyncio.Queue(self.config.client_queue),
        )
        self._clients[c.id] = c
        self.connections += 1
        log.info("flow feed client %s connected from %s %s", c.id, c.peer, flt.describe() or "")
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    c.pump = tg.create_task(self._pump(c, ws), name=f"ws-client-{c.id}")
                    reader = tg.create_task(self._read(ws), name=f"ws-reader-{c.id}")
                    # Either side ending (or the pump cancelled by a kick) ends the connection.
                    await asyncio.wait({c.pump, reader}, return_when=asyncio.FIRST_COMPLETED)
                    self._clients.pop(c.id, None)
                    c.pump.cancel()
                    reader.cancel()
            except* ConnectionError:
                pass  # the client went away while being sent to: a feed's usual end
        finally:
            self._clients.pop(c.id, None)
            if not ws.closed:
                try:
                    await asyncio.wait_for(
                        ws.close(code=1008 if c.kicked else 1000), self.config.kick_grace
                    )
                except (TimeoutError, ConnectionError, RuntimeError):
                    if request.transport is not None:
                        request.transport.abort()
            log.info("flow feed client %s disconnected (%d events sent)", c.id, c.sent)
        return ws

    async def _pump(self, c: _Client, ws: web.WebSocketResponse) -> None:
        while True:
            data = await c.queue.get()
            if data is None:
                return
            await ws.send_str(data.decode())
            if not c.kicked and _LOST_MARK not in data[:48]:
                c.sent += 1
                self.delivered += 1

    @staticmethod
    async def _read(ws: web.WebSocketResponse) -> None:
        # Clients have nothing to say; reading handles pings and the close handshake.
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                return

    def stats(self) -> dict[str, Any]:
        clients = list(self._clients.values())
        return {
            "delivered": self.delivered,
            "dropped": self.dropped,
            "clients": len(clients),
            "connections": self.connections,
            "slow_disconnects": self.slow_disconnects,
            "client_queue_depth_max": max((c.queue.qsize() for c in clients), default=0),
        }
