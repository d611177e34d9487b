"""The flow-event pipeline: source → decode → enrich → fan-out → sinks.

In: a loaded Datapath, the agent's Enricher and a `PipelineConfig` naming the sinks. Out:
every ring-buffer record as one contract §4 JSON object on each configured sink (file, Kafka,
WebSocket feed, console), and per-stage accounting (`stats()`, `register_metrics()`).

Decode and enrich are cheap and run synchronously right after each drain of the ring buffer;
everything after them sits behind the fan-out's bounded queues, so nothing a sink does can
slow the draining. Every event lost on the way is counted where it was lost and reported in
the stream as a `lost` record: by the kernel (ring buffer full), by decode (a record of the
wrong size), by a sink's queue, by the Kafka spool.

`run()` is meant to be a task of the agent's TaskGroup: it returns after `stop()` (or raises
CancelledError after being cancelled) only once the sinks have written what they were given,
or `stop_timeout` has passed. Its tasks (the lost-counter poll, the fan-out and under it each
sink's supervisor) run in TaskGroups: one that fails stops the pipeline the same way, and
`run()` raises that failure.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from streamer.datapath.layout import EVENT
from streamer.events.decode import Packed, decode_batch
from streamer.events.enrich import Enricher
from streamer.events.fanout import Fanout, Item, Sink, make_item
from streamer.events.sinks.console import ConsoleSink
from streamer.events.sinks.file import FileSink, FileSinkConfig
from streamer.events.sinks.kafka import KafkaSink, KafkaSinkConfig
from streamer.events.sinks.websocket import WebSocketConfig, WebSocketHub
from streamer.events.source import Source, SourceConfig
from streamer.events.tasks import own_cancel_only, raise_sole

log = logging.getLogger("microseg.pipeline")

DEFAULT_QUEUE = 65536


def tune_gc() -> None:
    """Process-wide: what exists now (modules, config) leaves the collector's view, and full
    collections come far less often. The pipeline makes hundreds of thousands of short-lived
    objects a second; with the default thresholds a full collection walks every queued record
    every few hundred milliseconds, stalling the loop for tens of milliseconds (the flow-event
    p99). Records hold no cycles, so reference counting frees them anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


@dataclass(frozen=True)
class PipelineConfig:
    """Which sinks, and how big each one's queue is (events)."""

    source: SourceConfig = field(default_factory=SourceConfig)
    file: FileSinkConfig | None = None
    kafka: KafkaSinkConfig | None = None
    websocket: WebSocketConfig | None = None  # None: no /api/v1/flows feed
    console: bool = False
    queue_size: int = DEFAULT_QUEUE
    stop_timeout: float = 10.0


class Pipeline:
    def __init__(self, config: PipelineConfig, datapath: Any, enricher: Enricher) -> None:
        self.config = config
        self.enricher = enricher
        self.decoded = 0
        self.undecodable = 0
        self.enriched = 0
        self.shed = 0  # decoded, then dropped for every sink before rendering
        sinks: list[Sink] = []
        self.file: FileSink | None = None
        self.kafka: KafkaSink | None = None
        self.websocket: WebSocketHub | None = None
        if config.file is not None:
            self.file = FileSink(config.file)
            sinks.append(self.file)
        if config.kafka is not None:
            self.kafka = KafkaSink(config.kafka, self._lost_item)
            sinks.append(self.kafka)
        if config.websocket is not None:
            self.websocket = WebSocketHub(config.websocket)
            sinks.append(self.websocket)
        if config.console:
            sinks.append(ConsoleSink())
        self.fanout = Fanout(sinks, self._lost_item, config.queue_size)
        self.source = Source(
            datapath,
            self.handle,
            self._kernel_lost,
            config.source,
            drain_mark=enricher.retire_point,
            drained=enricher.retire,
        )
        self._stop = asyncio.Event()
        self._running = False

    # ---- decode and enrich (synchronous, per drained batch) -----------------------------------

    def handle(self, records: list[bytes] | Packed) -> None:
        """Decode and enrich `records` (one drained batch), then offer them to every sink.

        Events no sink has room for are not rendered: they get their sequence numbers and
        each sink a gap to report (under overload the reader would otherwise spend its core
        making records that are dropped anyway, and starve the sinks)."""
        rows, bad = decode_batch(records)
        self.decoded += len(rows)
        shed = max(0, len(rows) - self.fanout.room())
        if shed:
            rows = rows[: len(rows) - shed]
        items = self.enricher.render(rows)
        self.enriched += len(items)
        self.fanout.publish(items)
        if shed:
            first = self.enricher.seq + 1
            self.enricher.seq += shed
            self.shed += shed
            self.fanout.shed(shed, first, first + shed - 1)
        if bad:
            if self.undecodable < 10:
                sizes = sorted({len(r) for r in records if len(r) != EVENT.size})
                log.warning(
                    "%d undecodable flow events (wrong size %s or address family)", bad, sizes
                )
            self.undecodable += bad
            self.fanout.publish([make_item(self.enricher.lost_record(bad, "decode"), bad)])

    def publish_alert(self, fields: dict[str, Any]) -> None:
        """An `alert` record (see streamer.agent.pressure) into every sink's stream."""
        self.fanout.publish([make_item(self.enricher.alert_record(fields), 0)])

    def _kernel_lost(self, n: int) -> None:
        log.warning("the kernel lost %d flow events (ring buffer full)", n)
        self.fanout.publish([make_item(self.enricher.lost_record(n, "kernel"), n)])

    def _lost_item(self, lost: int, stage: str, first_seq: int, last_seq: int) -> Item:
        obj = self.enricher.lost_record(lost, stage, first_seq=first_seq, last_seq=last_seq)
        return make_item(obj, lost)

    # ---- life ----------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to drain, flush the sinks and return."""
        self._stop.set()

    async def run(self) -> None:
        """Until `stop()`: then (and also when cancelled, or when one of its tasks failed) the
        ring buffer is drained a last time and every sink writes out what it holds, for up to
        `stop_timeout`. A task's failure is raised here (a sink's own failures are its
        supervisor's: restarted, see streamer.events.fanout)."""
        self.source.start(asyncio.get_running_loop())
        self._running = True
        try:
            # Two groups: the sinks outlive the intake, so a failing lost-counter poll still
            # leaves them time to write what they were given.
            async with asyncio.TaskGroup() as outlets:
                sinks = outlets.create_task(self.fanout.run(), name="pipeline-fanout")
                try:
                    async with asyncio.TaskGroup() as intake:
                        poll = intake.create_task(
                            own_cancel_only(self.source.run(), "the lost-event poll"),
                            name="pipeline-source",
                        )
                        try:
                            # The sinks' supervisors end only once their channels are closed.
                            await self._stop.wait()
                        finally:
                            poll.cancel()
                finally:
                    self.source.stop()
                    self.fanout.close()
                    await self._finish(sinks)
        except BaseExceptionGroup as group:
            raise_sole(group)
        finally:
            self._running = False

    async def _finish(self, sinks: asyncio.Task[None]) -> None:
        """Give the sinks `stop_timeout` to write out, then cancel them (their group awaits
        them and raises what they fail with)."""
        done, _ = await asyncio.wait([sinks], timeout=self.config.stop_timeout)
        if not done:
            log.warning(
                "sinks did not finish within %.0f s; what they held is lost",
                self.config.stop_timeout,
            )
            sinks.cancel()

    # ---- accounting ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per stage and sink. Safe from another thread (the API reads it from one)."""
        sinks = self.fanout.stats()
        queue_dropped = sum(int(s.get("queue_dropped", 0)) for s in sinks.values())
        sink_dropped = sum(int(s.get("dropped", 0)) for s in sinks.values())
        return {
            "source": self.source.stats(),
            "decode": {
                "received": self.source.received,
                "delivered": self.decoded,
                "dropped": self.undecodable,
            },
            "enrich": {
                "received": self.decoded,
                "delivered": self.enriched,
                "dropped": self.shed,
                "seq": self.enricher.seq,
                "generations": self.enricher.generations,
            },
            "sinks": sinks,
            "lost": {
                "kernel": self.source.kernel_lost,
                "decode": self.undecodable,
                "queues": queue_dropped,
                "sinks": sink_dropped,
            },
        }

    def extra_stats(self) -> dict[str, Any]:
        """For `ApiContext.extra_stats`: `events_lost` (added to the kernel's count, so the
        total covers every loss; a drop at one sink counts once for that sink) and the
        per-stage details under `pipeline`."""
        s = self.stats()
        lost = s["lost"]
        return {
            "events_lost": lost["decode"] + lost["queues"] + lost["sinks"],
            "pipeline": s,
        }


# ---- Prometheus -----------------------------------------------------------------------------


class PipelineCollector:
    """`microseg_pipeline_*` and `microseg_kafka_*` metrics, read from `Pipeline.stats()` at
    scrape time."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._pipeline.stats()
        events = CounterMetricFamily(
            "microseg_pipeline_events",
            "Flow events through each pipeline stage and sink, by result",
            labels=["stage", "result"],
        )
        events.add_metric(["source", "received"], s["source"]["received"])
        events.add_metric(["source", "lost_in_kernel"], s["source"]["kernel_lost"])
        for stage in ("decode", "enrich"):
            for result in ("received", "delivered", "dropped"):
                events.add_metric([stage, result], s[stage][result])
        depth = GaugeMetricFamily(
            "microseg_pipeline_queue_depth", "Events waiting in a sink's queue", labels=["sink"]
        )
        capacity = GaugeMetricFamily(
            "microseg_pipeline_queue_capacity", "Size of a sink's queue", labels=["sink"]
        )
        for name, sink in s["sinks"].items():
            for result in ("received", "delivered", "dropped", "queue_dropped"):
                events.add_metric([name, result], int(sink.get(result, 0)))
            for result in ("spooled", "replayed", "failed", "spool_dropped"):
                if result in sink:
                    events.add_metric([name, result], int(sink[result]))
            depth.add_metric([name], sink["queue_depth"])
            capacity.add_metric([name], sink["queue_capacity"])
        yield events
        yield depth
        yield capacity
        k = s["sinks"].get("kafka")
        if k is not None:
            yield GaugeMetricFamily(
                "microseg_kafka_up", "1 when the broker acknowledges sends", value=int(k["up"])
            )
            yield GaugeMetricFamily(
                "microseg_kafka_spool_bytes", "Bytes in the Kafka spool", value=k["spool_bytes"]
            )
            # The spool's bound (--kafka-spool-max-bytes): what "spool filling" is measured to.
            yield GaugeMetricFamily(
                "microseg_kafka_spool_capacity_bytes",
                "Size the Kafka spool may grow to before its oldest records are dropped",
                value=k["spool_max_bytes"],
            )
            yield GaugeMetricFamily(
                "microseg_kafka_spool_records",
                "Records in the Kafka spool",
                value=k["spool_records"],
            )
            yield GaugeMetricFamily(
                "microseg_kafka_inflight", "Records sent, not yet acknowledged", value=k["inflight"]
            )
            lat = GaugeMetricFamily(
                "microseg_kafka_send_latency_seconds",
                "Time from handing a batch to the producer to its acknowledgement (recent)",
                labels=["quantile"],
            )
            for q, key in (("0.5", "send_latency_p50_ms"), ("0.99", "send_latency_p99_ms")):
                if k[key] is not None:
                    lat.add_metric([q], k[key] / 1000)
            yield lat
        ws = s["sinks"].get("websocket")
        if ws is not None:
            yield GaugeMetricFamily(
                "microseg_flow_feed_clients", "WebSocket flow feed clients", value=ws["clients"]
            )
            yield CounterMetricFamily(
                "microseg_flow_feed_slow_disconnects",
                "Flow feed clients disconnected for not keeping up",
                value=ws["slow_disconnects"],
            )


def register_metrics(registry: Any, pipeline: Pipeline) -> PipelineCollector:
    """Register the pipeline's metrics on `registry` (a prometheus CollectorRegistry)."""
    collector = PipelineCollector(pipeline)
    registry.register(collector)
    return collector
