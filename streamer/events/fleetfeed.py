"""The fleet feed: every agent's flow events, read from the fleet's flows topic (contract §7),
served like the agent's own feed (`/api/v1/flows?source=fleet`, the viewer's fleet view).

In: the topic's (bootstrap, topic) and a `WebSocketHub` of its own. Out: each record of the
topic (a JSON object: flows, lost and alert records of every host) published to the hub,
which keeps the recent ones and fans them out to its clients through their bounded queues (a
client that does not keep up is dropped and counted there, as on the local feed). The topic is
read without a consumer group from shortly before its end (the hub's `recent` records per
partition, so the recent list has history at once), then as records come; Kafka holds what we
have not read yet, so nothing waits in memory here. Records that are not JSON objects are
skipped and counted.

`run()` is a task of the agent's TaskGroup: it never ends by itself. The brokers away, the
topic missing or any consumer failure is logged (rate-limited) and retried after a pause, from
the topic's end again; cancelled, it closes the hub (its clients are disconnected).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Final

import orjson

from streamer.events.fanout import Item, RateLimitedLog, flow_key
from streamer.events.sinks.websocket import WebSocketHub

__all__ = ["FleetFeed"]

log = logging.getLogger("microseg.fleetfeed")

RETRY_S: Final = 5.0
_POLL_MS: Final = 1000
_BATCH: Final = 4096


class _NoTopic(Exception):
    pass


class FleetFeed:
    """Reads `topic` on `bootstrap` into `hub` until cancelled."""

    def __init__(
        self, bootstrap: str, topic: str, hub: WebSocketHub, retry_s: float = RETRY_S
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.hub = hub
        self.retry_s = retry_s
        self.received = 0  # records published to the hub
        self.skipped = 0  # records that are not JSON objects
        self.failures = 0  # consumer (re)starts that failed or ended in an error
        self.up = False
        self._log = RateLimitedLog(log, 60.0)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self._consume()
                except _NoTopic:
                    self._log(
                        logging.INFO,
                        "no-topic",
                        "fleet feed: no topic %s on %s yet; waiting for the first agent's events",
                        self.topic,
                        self.bootstrap,
                    )
                except Exception as e:  # the brokers away, or anything else: retry
                    self.failures += 1
                    self._log(
                        logging.WARNING,
                        "failed",
                        "fleet feed: reading %s on %s failed (%s); retrying every %.0f s",
                        self.topic,
                        self.bootstrap,
                        e,
                        self.retry_s,
                    )
                self.up = False
                await asyncio.sleep(self.retry_s)
        finally:
            self.up = False
            self.hub.close()

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap.split(","),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="latest",
            client_id="microseg-fleet-feed",
        )
        await consumer.start()
        try:
            # All topics' metadata: naming the topic in a metadata request would create it.
            cluster = await consumer._client.fetch_all_metadata()
            parts = cluster.partitions_for_topic(self.topic)
            if not parts:
                raise _NoTopic()
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            begins = await consumer.beginning_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(begins[tp], ends[tp] - self.hub.config.recent))
            self.up = True
            log.info("fleet feed: reading %s on %s", self.topic, self.bootstrap)
            while True:
                batches = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_BATCH)
                items = [
                    item
                    for tp in sorted(batches, key=lambda t: t.partition)
                    for rec in batches[tp]
                    if (item := self._item(rec.value)) is not None
                ]
                if items:
                    self.received += len(items)
                    self.hub.publish(items)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _item(self, value: bytes | None) -> Item | None:
        """A record as the hub takes it, or None (counted) when it is not a flow record."""
        try:
            obj = orjson.loads(value or b"")
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            key = flow_key(obj)
        except (ValueError, KeyError):
            self.skipped += 1
            return None
        is_lost = obj.get("type") == "lost"
        seq = obj.get("seq")
        return Item(
            seq if isinstance(seq, int) else 0,
            int(obj.get("lost", 0) or 0) if is_lost else 1,
            value or b"",
            key,
            time.monotonic_ns(),
            obj=obj,
            is_lost=is_lost,
        )

    def stats(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "up": self.up,
            "received": self.received,
            "skipped": self.skipped,
            "failures": self.failures,
            **self.hub.stats(),
        }
