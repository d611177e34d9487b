"""The fleet's Kafka topics: the policy writer and reader, the status publisher, the fleet view.

The policy topic (compacted, one partition) holds one self-contained record per generation
under the key POLICY_KEY (docs/fleet.md says why). It has one writer at a time: every
`PolicyWriter` uses the transactional id "<topic>.writer", so starting one fences any other
(the broker aborts the other's open transaction and refuses its later writes), and a
generation is only decided inside a transaction that first reads the topic to its end with
read_committed. Two writers from the same base therefore never both commit: the loser is
refused with `StaleError` (or `FencedError` when it was fenced and could not go again).

Readers (`PolicyReader`, the writer's own reads, `FleetView`) use no consumer group: they
assign every partition and read from the beginning. A compacted topic holds about one record
per key, so this is cheap, and there is no committed offset that could be stale or lost.
Neither readers nor the status publisher ever let a metadata request create a topic (the
broker may auto-create topics, with the wrong settings): they wait until it exists, or create
it with `ensure_topics`' settings.

The agents topic (compacted) holds each agent's newest `AgentStatus` under its host name and a
tombstone once it stopped cleanly. `FleetView` turns it into the live set: an agent is lost
when its heartbeat is older than LOST_AFTER_HEARTBEATS heartbeats, by the wall clock (hosts'
clocks must roughly agree), counted only over time the view was in touch with the broker, so
that the broker away never makes agents lost (contract §7: that never changes enforcement).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Final, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    NoError,
    ProducerFenced,
    TopicAlreadyExistsError,
    for_code,
)

from streamer.fleet.records import (
    DEFAULT_AGENTS_TOPIC,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_POLICY_TOPIC,
    LOST_AFTER_HEARTBEATS,
    POLICY_KEY,
    AgentStatus,
    PolicyRecord,
    RecordError,
    decode_policy,
    decode_status,
    encode_policy,
    encode_status,
    is_lost,
)

log = logging.getLogger("microseg.fleet")

# The largest policy record (compressed): 100,000 rules are ~0.7 MB, so 32 MiB leaves room
# for far larger documents and less compressible ones. The topic, the producer's requests
# and the consumers' fetches all take it.
MAX_POLICY_RECORD_BYTES: Final = 32 * 1024 * 1024
# Room for a record batch's and a request's framing beyond the record.
_REQUEST_SLACK: Final = 1024 * 1024

POLICY_TOPIC_CONFIGS: Final[dict[str, str]] = {
    "cleanup.policy": "compact",
    "max.message.bytes": str(MAX_POLICY_RECORD_BYTES),
    # The active segment is never compacted and readers read from the start: rolling at
    # 64 MiB or hourly bounds what a reader reads beyond the one record per key.
    "segment.bytes": str(64 * 1024 * 1024),
    "segment.ms": str(3600 * 1000),
    # A small topic: clean it as soon as a tenth is superseded.
    "min.cleanable.dirty.ratio": "0.1",
    # Older generations are no use to anyone (agents keep the set they replace themselves):
    # no minimum lag before compaction.
    "min.compaction.lag.ms": "0",
    # How long transaction markers (and any tombstone) stay after cleaning: a reader that
    # takes longer than this to read the topic once could miss them. One day.
    "delete.retention.ms": str(24 * 3600 * 1000),
}
AGENTS_TOPIC_CONFIGS: Final[dict[str, str]] = {
    "cleanup.policy": "compact",
    "segment.bytes": str(16 * 1024 * 1024),
    "segment.ms": str(3600 * 1000),
    "min.cleanable.dirty.ratio": "0.1",
    "min.compaction.lag.ms": "0",
    # A stopped agent's tombstone stays a day after cleaning: a fleet view down for less
    # than that still sees the agent leave when it reads the topic again.
    "delete.retention.ms": str(24 * 3600 * 1000),
}

_BACKOFF_S: Final = (0.2, 0.5, 1.0, 2.0)  # reconnect waits, then the last one repeatedly
_FETCH_WAIT_MS: Final = 500  # consumers' long poll: also how often an idle view hears the broker
_PUBLISH_ATTEMPTS: Final = 2  # a fenced or failed transaction goes once more (see publish)


class FleetError(RuntimeError):
    """The brokers did not answer in time, or a topic is not usable as it is; the message
    says which and what to do."""


class StaleError(Exception):
    """The policy topic's newest generation is not the one the change was based on."""

    def __init__(self, newest: int) -> None:
        super().__init__(f"stale: newest is {newest}")
        self.newest = newest


class FencedError(StaleError):
    """Another writer took over while this one was committing (its transaction was aborted)."""


# ---- topics --------------------------------------------------------------------------------------


async def ensure_topics(
    bootstrap: str,
    policy_topic: str,
    agents_topic: str,
    *,
    replication: int = 1,
    timeout: float = 30.0,
) -> None:
    """Create the policy and agents topics (one partition, compacted, the settings above) if
    missing; existing topics are left alone, except that a policy topic that is not compacted
    or takes smaller records than MAX_POLICY_RECORD_BYTES is refused with FleetError (we do
    not alter a topic someone else made: the message gives the command). FleetError also
    when the brokers do not answer within `timeout` s."""
    await _ensure(
        bootstrap,
        {policy_topic: POLICY_TOPIC_CONFIGS, agents_topic: AGENTS_TOPIC_CONFIGS},
        replication=replication,
        timeout=timeout,
        check={policy_topic},
    )


async def _ensure(
    bootstrap: str,
    wanted: dict[str, dict[str, str]],
    *,
    replication: int,
    timeout: float,
    check: Iterable[str] = (),
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        async with asyncio.timeout(timeout):
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if missing:
                new = [
                    NewTopic(
                        t,
                        num_partitions=1,
                        replication_factor=replication,
                        topic_configs=dict(wanted[t]),
                    )
                    for t in missing
                ]
                answer = await admin.create_topics(new)
                for name, code, *rest in answer.topic_errors:
                    error = for_code(code)
                    # Made meanwhile by another agent or writer: fine.
                    if error is not NoError and error is not TopicAlreadyExistsError:
                        why = rest[0] if rest and rest[0] else error.__name__
                        raise FleetError(f"cannot create topic {name!r} on {bootstrap}: {why}")
                log.info("created topic(s) %s on %s", ", ".join(missing), bootstrap)
            for t in check:
                if t in existing:
                    await _check_policy_topic(admin, t)
    except TimeoutError:
        raise FleetError(
            f"the Kafka brokers at {bootstrap} did not answer within {timeout:.0f}s"
        ) from None
    except KafkaError as e:
        raise FleetError(f"cannot set up topics on {bootstrap}: {_describe(e)}") from e
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _check_policy_topic(admin: AIOKafkaAdminClient, topic: str) -> None:
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    answers = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    configs: dict[str, str] = {}
    for answer in answers:
        for resource in answer.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            for entry in resource[4]:
                configs[str(entry[0])] = str(entry[1])
    problems = []
    if "compact" not in configs.get("cleanup.policy", "compact").split(","):
        problems.append(f"cleanup.policy is {configs['cleanup.policy']}, not compact")
    size = configs.get("max.message.bytes")
    if size is not None and size.isdigit() and int(size) < MAX_POLICY_RECORD_BYTES:
        problems.append(f"max.message.bytes is {size}, less than {MAX_POLICY_RECORD_BYTES}")
    if problems:
        raise FleetError(
            f"the policy topic {topic!r} exists but {'; '.join(problems)}: fix it with "
            f"kafka-configs.sh --alter --entity-type topics --entity-name {topic} "
            f"--add-config cleanup.policy=compact,max.message.bytes={MAX_POLICY_RECORD_BYTES}"
        )


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text and text != type(e).__name__ else type(e).__name__


def _where(topic: str, partition: int, offset: int) -> str:
    return f"{topic}[{partition}]@{offset}"


async def _topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition] | None:
    """The topic's partitions, or None while it does not exist. Asks for every topic's
    metadata: a request naming the topic could make the broker create it."""
    # consumer.topics() fetches this too but keeps only the names; the partitions come from
    # the same answer (the client's own metadata holds only the topics it tracks).
    cluster = await consumer._client.fetch_all_metadata()
    parts = cluster.partitions_for_topic(topic)
    if not parts:
        return None
    return [TopicPartition(topic, p) for p in sorted(parts)]


def _consumer(bootstrap: str, *, read_committed: bool, request_timeout: float) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        # A whole policy record in one fetch.
        max_partition_fetch_bytes=MAX_POLICY_RECORD_BYTES + _REQUEST_SLACK,
        fetch_max_bytes=2 * (MAX_POLICY_RECORD_BYTES + _REQUEST_SLACK),
        fetch_max_wait_ms=_FETCH_WAIT_MS,
        request_timeout_ms=max(int(request_timeout * 1000), 5000),
        retry_backoff_ms=200,
        # Metadata at least every 30 s: a new partition leader after a broker restart.
        metadata_max_age_ms=30000,
    )


async def _stop_quietly(client: AIOKafkaConsumer | AIOKafkaProducer | None, timeout: float) -> None:
    if client is None:
        return
    try:
        async with asyncio.timeout(timeout):
            await client.stop()
    except Exception as e:  # closing is best effort: the broker may be away
        log.debug("stopping a Kafka client: %s", _describe(e))


async def _read_to_end(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition]
) -> AsyncIterator[list[Any]]:
    """Yield the batches fetched until every partition's position reaches the end offsets
    (for read_committed: the last stable offset) asked for at the start."""
    end = await consumer.end_offsets(tps)
    while True:
        pending = [tp for tp in tps if await consumer.position(tp) < end[tp]]
        if not pending:
            return
        batch = await consumer.getmany(*pending, timeout_ms=_FETCH_WAIT_MS)
        for recs in batch.values():
            if recs:
                yield recs


# ---- the newest policy generation ----------------------------------------------------------------


class _Newest:
    """The newest valid policy record read so far, from records in offset order. Records
    that are malformed, under another key, or not newer than what was read (a lower
    generation, or the same one again differing) go to `on_bad` and change nothing."""

    def __init__(self, on_bad: Callable[[str], None]) -> None:
        self.on_bad = on_bad
        self.record: PolicyRecord | None = None

    @property
    def generation(self) -> int:
        return self.record.generation if self.record is not None else 0

    def feed(self, msg: Any) -> None:
        where = _where(msg.topic, msg.partition, msg.offset)
        if msg.key != POLICY_KEY:
            self.on_bad(f"{where}: key {msg.key!r} is not {POLICY_KEY!r}; record ignored")
            return
        try:
            rec = decode_policy(msg.value, where)
        except RecordError as e:
            self.on_bad(f"{e}; record ignored")
            return
        best = self.record
        if best is None or rec.generation > best.generation:
            self.record = rec
        elif rec.generation < best.generation:
            self.on_bad(
                f"{where}: generation {rec.generation} after generation {best.generation}; "
                "record ignored"
            )
        elif rec == best:
            pass  # the same record again (a confirm repeated): nothing new
        elif rec.confirmed and not best.confirmed and _same_generation(rec, best):
            self.record = rec
        else:
            self.on_bad(
                f"{where}: generation {rec.generation} again, not its confirmation; record ignored"
            )


def _same_generation(a: PolicyRecord, b: PolicyRecord) -> bool:
    """b confirmed would be a (the confirmation changes nothing else)."""
    return (a.generation, a.document, a.base, a.actor, a.published_at, a.confirm_within) == (
        b.generation,
        b.document,
        b.base,
        b.actor,
        b.published_at,
        b.confirm_within,
    )


def _newer(rec: PolicyRecord | None, than: PolicyRecord | None) -> bool:
    if rec is None:
        return False
    if than is None:
        return True
    return rec.generation > than.generation or (
        rec.generation == than.generation and rec.confirmed and not than.confirmed
    )


# ---- the writer ----------------------------------------------------------------------------------


class _Closing:
    """`async with` for the clients below that connect lazily: entering does nothing, leaving
    closes (`close()`)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        raise NotImplementedError


async def _pause_after(client: _Closing, what: str, e: BaseException, failures: int) -> int:
    """After the `failures`-th failure in a row of a following client: log it, close the
    client (the next round connects afresh), wait the backoff; the failures now."""
    delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
    log.warning("%s: %s; again in %.1fs", what, _describe(e), delay)
    await client.close()
    await asyncio.sleep(delay)
    return failures + 1


class PolicyWriter:
    """Publishes policy generations (the `microseg fleet` CLI's side). Async context
    manager: entering ensures both topics and starts the transactional producer (id
    "<topic>.writer": this fences any other writer) and a read_committed reader.

    Every call is bounded by `timeout` s (FleetError when the brokers do not answer)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = DEFAULT_POLICY_TOPIC,
        *,
        agents_topic: str = DEFAULT_AGENTS_TOPIC,
        timeout: float = 30.0,
        replication: int = 1,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.agents_topic = agents_topic
        self.timeout = timeout
        self.replication = replication
        self.transactional_id = f"{topic}.writer"
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._newest = _Newest(self._bad)
        self._lock = asyncio.Lock()  # one transaction at a time per writer

    @staticmethod
    def _bad(message: str) -> None:
        log.warning("policy topic: %s", message)

    async def __aenter__(self) -> PolicyWriter:
        try:
            await ensure_topics(
                self.bootstrap,
                self.topic,
                self.agents_topic,
                replication=self.replication,
                timeout=self.timeout,
            )
            async with self._bounded("connecting"):
                self._consumer = _consumer(
                    self.bootstrap, read_committed=True, request_timeout=self.timeout
                )
                await self._consumer.start()
                tps = await _topic_partitions(self._consumer, self.topic)
                while tps is None:  # just created: metadata may lag a moment
                    await asyncio.sleep(0.1)
                    tps = await _topic_partitions(self._consumer, self.topic)
                self._tps = tps
                self._consumer.assign(tps)
                await self._consumer.seek_to_beginning(*tps)
                await self._start_producer()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the producer and the reader (bounded; safe to repeat)."""
        producer, self._producer = self._producer, None
        consumer, self._consumer = self._consumer, None
        await _stop_quietly(producer, 5.0)
        await _stop_quietly(consumer, 5.0)

    @contextlib.asynccontextmanager
    async def _bounded(self, doing: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.timeout):
                yield
        except TimeoutError:
            raise FleetError(
                f"{doing}: the Kafka brokers at {self.bootstrap} did not answer within "
                f"{self.timeout:.0f}s"
            ) from None

    async def _start_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                transactional_id=self.transactional_id,
                enable_idempotence=True,
                acks="all",
                # The record is compressed already (zstd, encode_policy).
                compression_type=None,
                max_request_size=MAX_POLICY_RECORD_BYTES + _REQUEST_SLACK,
                request_timeout_ms=max(int(self.timeout * 1000), 5000),
                # A writer that died mid-transaction blocks read_committed readers until
                # this passes or the next writer starts (which aborts it at once).
                transaction_timeout_ms=60000,
            )
            try:
                await producer.start()
            except BaseException:
                await _stop_quietly(producer, 5.0)
                raise
            self._producer = producer
        return self._producer

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        await _stop_quietly(producer, 5.0)

    async def _read(self) -> PolicyRecord | None:
        assert self._consumer is not None, "use PolicyWriter as an async context manager"
        async for recs in _read_to_end(self._consumer, self._tps):
            for msg in recs:
                self._newest.feed(msg)
        return self._newest.record

    async def newest(self) -> PolicyRecord | None:
        """The newest valid generation (read_committed, to the end), None when there is none."""
        async with self._lock, self._bounded("reading the policy topic"):
            return await self._read()

    async def publish(
        self,
        document: dict[str, Any],
        *,
        base: int | None,
        actor: str,
        confirm_within: float | None = None,
    ) -> PolicyRecord:
        """Publish `document` as the next generation and return its record once a
        read_committed reader sees it. `base`: the generation it was made from (0: the
        topic must be empty); None publishes over whatever is newest.

        Inside one transaction: read to the end, refuse with StaleError(newest) when the
        newest is not `base`, send, commit. A transaction that fails (fenced by another
        writer, or the commit refused) goes once more with a new producer, checking `base`
        again inside the new transaction; when that fails too: FencedError(newest). So of two
        writers publishing from the same base, exactly one commits."""
        async with self._lock, self._bounded("publishing a policy generation"):
            return await self._transact(
                lambda newest: self._next_record(newest, document, base, actor, confirm_within)
            )

    async def confirm(self, record: PolicyRecord) -> PolicyRecord:
        """Publish `record`'s generation again with confirmed=True (so agents keep it);
        StaleError(newest) when the newest generation is no longer `record`'s (or is another
        record of that generation). Confirming a confirmed generation returns it as is."""

        def confirmed(newest: PolicyRecord | None) -> PolicyRecord | None:
            if newest is None or not _same_generation(newest, record):
                raise StaleError(newest.generation if newest is not None else 0)
            if newest.confirmed:
                return None
            return PolicyRecord(
                generation=record.generation,
                document=record.document,
                base=record.base,
                actor=record.actor,
                published_at=record.published_at,
                confirm_within=record.confirm_within,
                confirmed=True,
            )

        async with self._lock, self._bounded("confirming a policy generation"):
            return await self._transact(confirmed)

    @staticmethod
    def _next_record(
        newest: PolicyRecord | None,
        document: dict[str, Any],
        base: int | None,
        actor: str,
        confirm_within: float | None,
    ) -> PolicyRecord:
        current = newest.generation if newest is not None else 0
        if base is not None and current != base:
            raise StaleError(current)
        return PolicyRecord(
            generation=current + 1,
            document=document,
            base=current,
            actor=actor,
            published_at=time.time(),
            confirm_within=confirm_within,
        )

    async def _transact(
        self, make: Callable[[PolicyRecord | None], PolicyRecord | None]
    ) -> PolicyRecord:
        """Run make(newest) inside a transaction and publish what it returns (None: nothing
        to publish, newest is the answer). See publish() for the retry."""
        attempted: PolicyRecord | None = None
        failure: BaseException | None = None
        for _ in range(_PUBLISH_ATTEMPTS):
            producer = await self._start_producer()
            try:
                # Waits for our producer id: from here on no writer that started before us
                # can commit, so what we read next is all there is.
                await producer.begin_transaction()
                newest = await self._read()
                if attempted is not None and newest == attempted:
                    # The failed attempt's commit went through after all.
                    await producer.abort_transaction()
                    return attempted
                try:
                    rec = make(newest)
                except StaleError:
                    await producer.abort_transaction()
                    raise
                if rec is None:
                    await producer.abort_transaction()
                    assert newest is not None
                    return newest
                value = encode_policy(rec)
                attempted = rec
                meta = await producer.send_and_wait(
                    self.topic, value, key=POLICY_KEY, partition=self._tps[0].partition
                )
                await producer.commit_transaction()
            except StaleError:
                raise
            except (KafkaError, OSError) as e:
                failure = e
                log.info(
                    "policy transaction failed (%s)%s",
                    _describe(e),
                    "; fenced by another writer" if isinstance(e, ProducerFenced) else "",
                )
                await self._drop_producer()
                continue
            await self._wait_visible(meta.partition, meta.offset)
            return rec
        newest = await self._read()
        if attempted is not None and newest == attempted:
            return attempted
        err = FencedError(newest.generation if newest is not None else 0)
        raise err from failure

    async def _wait_visible(self, partition: int, offset: int) -> None:
        """Read until our committed record (at `offset`) has been read back."""
        assert self._consumer is not None
        tp = TopicPartition(self.topic, partition)
        while await self._consumer.position(tp) <= offset:
            batch = await self._consumer.getmany(tp, timeout_ms=_FETCH_WAIT_MS)
            for recs in batch.values():
                for msg in recs:
                    self._newest.feed(msg)


# ---- the reader ----------------------------------------------------------------------------------


class PolicyReader(_Closing):
    """Follows the policy topic (an agent's side). Async context manager; connecting happens
    in `records()`, which waits for the brokers and for the topic to exist, and survives the
    brokers going away (it reconnects and goes on from where it was).

    `caught_up` is set once it has read up to the end offsets seen when it first connected.
    `on_bad(message)` hears of every record skipped (malformed, or not newer)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = DEFAULT_POLICY_TOPIC,
        *,
        on_bad: Callable[[str], None],
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.caught_up = asyncio.Event()
        self._newest = _Newest(on_bad)
        self._yielded: PolicyRecord | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._positions: dict[TopicPartition, int] = {}
        self._waiting_logged = False

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        await _stop_quietly(consumer, 5.0)

    async def records(self) -> AsyncIterator[PolicyRecord]:
        """Yield the newest valid generation: once caught up (the newest of everything
        read so far), then after each fetched batch, and only when newer than the last
        yielded (a higher generation, or the same one now confirmed). Runs until cancelled."""
        failures = 0
        while True:
            try:
                tps = await self._connect()
                end = await self._end_offsets(tps)
                while True:
                    if self.caught_up.is_set():
                        got = await self._fetch(tps)
                        failures = 0
                        if not got:
                            continue
                    elif any(self._positions.get(tp, 0) < end[tp] for tp in tps):
                        # Catching up: only the newest of all that is read then counts.
                        await self._fetch(tps)
                        failures = 0
                        continue
                    else:
                        self.caught_up.set()
                    if _newer(self._newest.record, self._yielded):
                        self._yielded = self._newest.record
                        assert self._yielded is not None
                        yield self._yielded
            except (KafkaError, OSError) as e:
                failures = await _pause_after(
                    self, f"policy topic {self.topic} on {self.bootstrap}", e, failures
                )

    async def _connect(self) -> list[TopicPartition]:
        """A started consumer assigned to every partition at our positions (the beginning
        the first time); waits (polling) until the topic exists."""
        if self._consumer is None:
            consumer = _consumer(self.bootstrap, read_committed=True, request_timeout=30.0)
            try:
                await consumer.start()
            except BaseException:
                await _stop_quietly(consumer, 5.0)
                raise
            self._consumer = consumer
        consumer = self._consumer
        while (tps := await _topic_partitions(consumer, self.topic)) is None:
            if not self._waiting_logged:
                self._waiting_logged = True
                log.info("waiting for the policy topic %s on %s", self.topic, self.bootstrap)
            await asyncio.sleep(1.0)
        consumer.assign(tps)
        for tp in tps:
            if tp in self._positions:
                consumer.seek(tp, self._positions[tp])
            else:
                await consumer.seek_to_beginning(tp)
        return tps

    async def _end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        assert self._consumer is not None
        if self.caught_up.is_set():
            return {tp: 0 for tp in tps}
        end: dict[TopicPartition, int] = await self._consumer.end_offsets(tps)
        return end

    async def _fetch(self, tps: list[TopicPartition]) -> bool:
        """One getmany: feed what came, remember positions; True when records came."""
        assert self._consumer is not None
        batch = await self._consumer.getmany(*tps, timeout_ms=1000)
        got = False
        for recs in batch.values():
            for msg in recs:
                got = True
                self._newest.feed(msg)
        for tp in tps:
            self._positions[tp] = await self._consumer.position(tp)
        return got


# ---- agent status --------------------------------------------------------------------------------


class StatusPublisher(_Closing):
    """Publishes an agent's status to the agents topic (key: the host name). Async context
    manager; connects lazily, so the brokers may be away at start.

    `publish` and `tombstone` never raise for the brokers being away or slow, and never take
    longer than `timeout` s: they return False (and log once per outage) and the caller
    tries again on its next heartbeat. True means the broker acknowledged the record."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = DEFAULT_AGENTS_TOPIC,
        *,
        timeout: float = 5.0,
        replication: int = 1,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self.replication = replication
        self._producer: AIOKafkaProducer | None = None
        self._topic_ok = False
        self._failing = False

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        await _stop_quietly(producer, self.timeout)

    async def publish(self, status: AgentStatus) -> bool:
        """Send `status` (encoded by encode_status); False when not acknowledged in time."""
        return await self._send(status.host.encode(), encode_status(status))

    async def tombstone(self, host: str) -> bool:
        """Remove `host` from the fleet (a record with no value); False when not acknowledged."""
        return await self._send(host.encode(), None)

    async def _send(self, key: bytes, value: bytes | None) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                producer = await self._connect()
                await producer.send_and_wait(self.topic, value, key=key)
        except (TimeoutError, KafkaError, OSError, FleetError) as e:
            # A fresh producer next time: one whose send timed out can stay stuck behind that
            # batch after the broker returns (seen with an idempotent producer and a restart).
            await self.close()
            if not self._failing:
                self._failing = True
                log.warning(
                    "agent status to %s on %s not delivered (%s); trying again on the next "
                    "heartbeat",
                    self.topic,
                    self.bootstrap,
                    "no answer in time" if isinstance(e, TimeoutError) else _describe(e),
                )
            return False
        if self._failing:
            self._failing = False
            log.info("agent status to %s on %s delivered again", self.topic, self.bootstrap)
        return True

    async def _connect(self) -> AIOKafkaProducer:
        if not self._topic_ok:
            # Created with its settings before the first send would auto-create it without.
            await _ensure(
                self.bootstrap,
                {self.topic: AGENTS_TOPIC_CONFIGS},
                replication=self.replication,
                timeout=self.timeout,
            )
            self._topic_ok = True
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=0,
                # A status older than a few heartbeats is worth nothing: give up on it.
                request_timeout_ms=max(int(self.timeout * 1000), 1000),
            )
            try:
                await producer.start()
            except BaseException:
                await _stop_quietly(producer, 1.0)
                raise
            self._producer = producer
        return self._producer


class FleetView(_Closing):
    """The fleet as the agents topic tells it (both the agents' and the CLI's side): run
    `run()` in a task group; `agents` holds every host's newest status (tombstones remove),
    `caught_up` is set once the topic was read to the end seen at the first connection.

    `on_change()` is called whenever the live set's (host, labels, addresses) changes, also
    when an agent becomes lost by time. Lost time only runs while the view hears the broker
    (its fetches are answered): the broker away makes no agent lost, and after it comes
    back every agent has the full LOST_AFTER_HEARTBEATS heartbeats to report again."""

    def __init__(
        self,
        bootstrap: str,
        topic: str = DEFAULT_AGENTS_TOPIC,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        on_change: Callable[[], None] | None = None,
        on_bad: Callable[[str], None] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.heartbeat_s = heartbeat_s
        self.on_change = on_change
        self.on_bad = on_bad or (lambda m: log.warning("agents topic: %s", m))
        self.agents: dict[str, AgentStatus] = {}
        self.caught_up = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._positions: dict[TopicPartition, int] = {}
        # Wall-clock times: of the latest fetch answer, and since when answers have come
        # without a gap (None: never yet; the first connection has no grace).
        self._heard_at: float | None = None
        self._heard_since: float | None = None
        self._signature: frozenset[tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]]] = (
            frozenset()
        )

    @property
    def lost_after(self) -> float:
        return LOST_AFTER_HEARTBEATS * self.heartbeat_s

    @property
    def _gap_s(self) -> float:
        # Fetch answers come every _FETCH_WAIT_MS when idle: silence longer than this (and
        # than a heartbeat) means the broker was away.
        return max(self.heartbeat_s, 4 * _FETCH_WAIT_MS / 1000)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        await _stop_quietly(consumer, 5.0)

    def _lost(self, status: AgentStatus, now: float | None) -> bool:
        now = time.time() if now is None else now
        if self._heard_at is None:
            return is_lost(status, now, self.heartbeat_s)
        # Time counts only while the broker answers: frozen since the last answer.
        # (A fetch answer is due every _FETCH_WAIT_MS: that much past the last one counts.)
        until = min(now, self._heard_at + _FETCH_WAIT_MS / 1000)
        since = status.heartbeat_at
        if self._heard_since is not None:
            since = max(since, self._heard_since)
        return until - since > self.lost_after

    def live(self, now: float | None = None) -> dict[str, AgentStatus]:
        """The agents not lost at `now` (default: the wall clock), by host."""
        return {h: s for h, s in self.agents.items() if not self._lost(s, now)}

    def state_of(self, status: AgentStatus, now: float | None = None) -> str:
        """ "lost", or the agent's own state."""
        return "lost" if self._lost(status, now) else status.state

    def _check_change(self) -> None:
        sig = frozenset(
            (h, tuple(sorted(s.labels.items())), tuple(s.addresses)) for h, s in self.live().items()
        )
        if sig != self._signature:
            self._signature = sig
            if self.on_change is not None:
                self.on_change()

    def _feed(self, msg: Any) -> None:
        where = _where(msg.topic, msg.partition, msg.offset)
        try:
            host = msg.key.decode() if msg.key is not None else None
        except UnicodeDecodeError:
            host = None
        if not host:
            self.on_bad(f"{where}: key {msg.key!r} is not a host name; record ignored")
            return
        if msg.value is None:
            self.agents.pop(host, None)
            return
        try:
            status = decode_status(msg.value, where)
        except RecordError as e:
            self.on_bad(f"{e}; record ignored")
            return
        if status.host != host:
            self.on_bad(f"{where}: the status of {status.host!r} under key {host!r}; ignored")
            return
        self.agents[host] = status

    def _heard(self, tps: list[TopicPartition]) -> None:
        """Note when the broker last answered our fetches (aiokafka's poll timestamps)."""
        assert self._consumer is not None
        stamps = [self._consumer.last_poll_timestamp(tp) for tp in tps]
        known = [s / 1000.0 for s in stamps if s]
        if not known:
            return
        heard = min(known)
        if self._heard_at is not None and heard - self._heard_at > self._gap_s:
            # Answers again after a gap: every agent gets its full time to report again.
            self._heard_since = heard
        if self._heard_at is None or heard > self._heard_at:
            self._heard_at = heard

    async def run(self) -> None:
        """Follow the topic until cancelled (reconnecting when the brokers go away); calls
        on_change as described above."""
        failures = 0
        while True:
            try:
                tps = await self._connect()
                assert self._consumer is not None
                end = (
                    {tp: 0 for tp in tps}
                    if self.caught_up.is_set()
                    else await self._consumer.end_offsets(tps)
                )
                while True:
                    batch = await self._consumer.getmany(*tps, timeout_ms=int(self._tick() * 1000))
                    failures = 0
                    for recs in batch.values():
                        for msg in recs:
                            self._feed(msg)
                    for tp in tps:
                        self._positions[tp] = await self._consumer.position(tp)
                    self._heard(tps)
                    if not self.caught_up.is_set():
                        if any(self._positions[tp] < end[tp] for tp in tps):
                            continue
                        self.caught_up.set()
                    self._check_change()
            except (KafkaError, OSError) as e:
                failures = await _pause_after(
                    self, f"agents topic {self.topic} on {self.bootstrap}", e, failures
                )
                if self.caught_up.is_set():
                    self._check_change()

    def _tick(self) -> float:
        """How long the next fetch may wait: until the next agent could become lost, at
        most a second, at least 50 ms."""
        now = time.time()
        wait = 1.0
        for s in self.agents.values():
            left = s.heartbeat_at + self.lost_after - now
            if 0 < left < wait:
                wait = left
        return max(wait, 0.05)

    async def _connect(self) -> list[TopicPartition]:
        if self._consumer is None:
            consumer = _consumer(self.bootstrap, read_committed=False, request_timeout=30.0)
            try:
                await consumer.start()
            except BaseException:
                await _stop_quietly(consumer, 5.0)
                raise
            self._consumer = consumer
        consumer = self._consumer
        while (tps := await _topic_partitions(consumer, self.topic)) is None:
            await asyncio.sleep(1.0)
        consumer.assign(tps)
        for tp in tps:
            if tp in self._positions:
                consumer.seek(tp, self._positions[tp])
            else:
                await consumer.seek_to_beginning(tp)
        return tps


async def _read_once(
    bootstrap: str, topic: str, timeout: float, read_committed: bool, feed: Callable[[Any], None]
) -> None:
    """Read `topic` from its start to its end once, each record to `feed` (an absent topic
    feeds nothing). FleetError when the brokers do not answer within `timeout` s."""
    consumer = _consumer(bootstrap, read_committed=read_committed, request_timeout=timeout)
    try:
        async with asyncio.timeout(timeout):
            await consumer.start()
            tps = await _topic_partitions(consumer, topic)
            if tps is None:
                return
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            async for recs in _read_to_end(consumer, tps):
                for msg in recs:
                    feed(msg)
    except TimeoutError:
        raise FleetError(
            f"the Kafka brokers at {bootstrap} did not answer within {timeout:.0f}s"
        ) from None
    except KafkaError as e:
        raise FleetError(f"cannot read {topic} on {bootstrap}: {_describe(e)}") from e
    finally:
        await _stop_quietly(consumer, 5.0)


async def snapshot(
    bootstrap: str, topic: str = DEFAULT_AGENTS_TOPIC, timeout: float = 10.0
) -> dict[str, AgentStatus]:
    """Every host's newest status, the agents topic read to its end once (for the CLI; judge
    lost with `is_lost`). An absent topic is an empty fleet. FleetError when the brokers do
    not answer within `timeout` s."""
    view = FleetView(bootstrap, topic)
    await _read_once(bootstrap, topic, timeout, False, view._feed)
    return view.agents


async def read_newest(
    bootstrap: str, topic: str = DEFAULT_POLICY_TOPIC, timeout: float = 10.0
) -> PolicyRecord | None:
    """The newest valid generation (read_committed, to the end), for readers that must not
    fence a writer (`fleet get`, `fleet status`): no transactional id. None when the topic
    holds none or does not exist. FleetError when the brokers do not answer in `timeout` s."""
    newest = _Newest(lambda message: log.warning("%s", message))
    await _read_once(bootstrap, topic, timeout, True, newest.feed)
    return newest.record
