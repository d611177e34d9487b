"""`microseg fleet observe`: every agent's flow events, read from the fleet's flows topic.

In: `--fleet BOOTSTRAP[,BOOTSTRAP...]`, `--flows-topic` (default `microseg.flows`, contract §7),
`--host NAME` (repeatable, comma-separated alternatives) and the filters, `-f/--follow`,
`--last N`, `-o table|json|compact` and `--color` of `flows observe` (streamer/cli/observe.py,
whose `ObserveConfig.matches` applies them here with the agent's semantics). Out: one line per
matching record on stdout, a host column in table and compact output, `-o json` each record's
value as it is on the topic.

The topic is read with aiokafka without a consumer group (nothing is committed; every run
reads for itself). `--last N`: the last N matching records of the whole topic (each partition
is read backwards from its end in windows until it has N of them or is exhausted; the
partitions' records then merged by their `time`); with `--follow`, then every new record from
where each partition ended, in arrival order. Records that are not JSON objects are skipped
and counted (one line on stderr at the end). Exit status: 0 done (or Ctrl-C while following),
1 the brokers cannot be reached or the topic does not exist, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from typing import IO, Any, Final

from streamer.cli.observe import ObserveConfig, Printer, add_observe_args

__all__ = [
    "DEFAULT_FLOWS_TOPIC",
    "FleetObserveError",
    "add_fleet_observe_parser",
    "cmd_fleet_observe",
    "fleet_observe",
]

DEFAULT_FLOWS_TOPIC: Final = "microseg.flows"
# Records read per step backwards from a partition's end while looking for the last N.
_WINDOW_MIN: Final = 1000
_POLL_MS: Final = 500
# Reading a range of offsets gives up after this many empty polls in a row (a partition whose
# end moved back, or a broker gone meanwhile): what was read by then is shown.
_MAX_EMPTY_POLLS: Final = 20


class FleetObserveError(Exception):
    """The brokers or the topic are not there; the message is for a person (exit 1)."""


@dataclass
class _Counts:
    skipped: int = 0  # records on the topic that are not JSON objects


def _decode(value: bytes | None, counts: _Counts) -> tuple[dict[str, Any], str] | None:
    """A record's value as (object, text), or None (counted) when it is not a JSON object."""
    try:
        text = (value or b"").decode()
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        obj = None
    if not isinstance(obj, dict):
        counts.skipped += 1
        return None
    return obj, text


async def _start(bootstrap: str, topic: str) -> tuple[Any, list[Any]]:
    """A started consumer (no group) and the topic's partitions; FleetObserveError when the
    brokers do not answer or the topic is not there."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
        request_timeout_ms=10_000,
        client_id="microseg-fleet-observe",
    )
    try:
        await consumer.start()
    except KafkaError as e:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise FleetObserveError(
            f"cannot reach the fleet's brokers at {bootstrap} ({e});"
            " is --fleet right and the broker up?"
        ) from None
    try:
        # The whole cluster's metadata: asking for one topic by name would create it. (The
        # consumer's own view, partitions_for_topic, holds only topics it already follows.)
        cluster = await consumer._client.fetch_all_metadata()
        parts = cluster.partitions_for_topic(topic)
        if not parts:
            raise FleetObserveError(
                f"no topic {topic!r} on {bootstrap}: no agent has sent flow events there yet"
                " (is --flows-topic right?)"
            )
    except BaseException:
        await consumer.stop()
        raise
    return consumer, [TopicPartition(topic, p) for p in sorted(parts)]


async def _read_range(consumer: Any, tp: Any, start: int, stop: int) -> list[Any]:
    """The records of partition `tp` from offset `start` up to (not including) `stop`."""
    consumer.assign([tp])
    consumer.seek(tp, start)
    out: list[Any] = []
    empty = 0
    while await consumer.position(tp) < stop and empty < _MAX_EMPTY_POLLS:
        batch = await consumer.getmany(tp, timeout_ms=_POLL_MS, max_records=5000)
        recs = batch.get(tp, [])
        empty = 0 if recs else empty + 1
        out.extend(r for r in recs if r.offset < stop)
    return out


async def _last(
    consumer: Any, tps: list[Any], ends: dict[Any, int], cfg: ObserveConfig, counts: _Counts
) -> list[tuple[dict[str, Any], str]]:
    """The last `cfg.last` matching records over all partitions, oldest first."""
    begins = await consumer.beginning_offsets(tps)
    found: list[tuple[str, int, int, dict[str, Any], str]] = []
    window = max(_WINDOW_MIN, 4 * cfg.last)
    for tp in tps:
        stop, begin = ends[tp], begins[tp]
        mine = 0
        while stop > begin and mine < cfg.last:
            start = max(begin, stop - window)
            for rec in reversed(await _read_range(consumer, tp, start, stop)):
                got = _decode(rec.value, counts)
                if got is None or not cfg.matches(got[0]):
                    continue
                found.append((str(got[0].get("time", "")), tp.partition, rec.offset, *got))
                mine += 1
                if mine == cfg.last:
                    break
            stop = start
    # Times are RFC 3339 UTC with nanoseconds, one width: their text sorts as they do.
    found.sort(key=lambda f: f[:3])
    return [(obj, raw) for *_, obj, raw in found[-cfg.last :]]


async def fleet_observe(bootstrap: str, topic: str, cfg: ObserveConfig, stream: IO[str]) -> int:
    """Print the last `cfg.last` matching records of `topic`, then (with `cfg.follow`) every
    new one until cancelled. FleetObserveError when the brokers or the topic are not there."""
    counts = _Counts()
    printer = Printer(cfg, stream)
    consumer, tps = await _start(bootstrap, topic)
    try:
        ends = await consumer.end_offsets(tps)
        if cfg.last:
            printer.batch(await _last(consumer, tps, ends, cfg, counts))
        if not cfg.follow:
            if not printer.count and cfg.output == "table":
                print(f"no matching flow events on {topic}", file=sys.stderr)
            return 0
        # From where the last ones ended: nothing missed, nothing printed twice.
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])
        while True:
            batches = await consumer.getmany(timeout_ms=_POLL_MS, max_records=5000)
            for tp in sorted(batches, key=lambda t: t.partition):
                for rec in batches[tp]:
                    got = _decode(rec.value, counts)
                    if got is not None and cfg.matches(got[0]):
                        printer.one(*got)
    finally:
        if counts.skipped:
            print(
                f"microseg: skipped {counts.skipped} records on {topic} that are not flow"
                " events (not JSON objects)",
                file=sys.stderr,
            )
        await consumer.stop()


# --------------------------------------------------------------------------- command


def cmd_fleet_observe(args: argparse.Namespace) -> int:
    """`fleet observe`: the last flow events of every host, and with --follow the new ones."""
    cfg = ObserveConfig.from_args(args, sys.stdout, host_column=True)
    if not cfg.follow and cfg.last == 0:
        print("microseg: --last 0 without --follow shows nothing", file=sys.stderr)
        return 2
    # aiokafka logs every failed connection attempt; the one line we print says it all.
    if not args.verbose:
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        return asyncio.run(fleet_observe(args.fleet, args.flows_topic, cfg, sys.stdout))
    except FleetObserveError as e:
        print(f"microseg: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _host_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give a host name")
    return names


def _bootstrap(value: str) -> str:
    servers = [v.strip() for v in value.split(",") if v.strip()]
    if not servers or not all(s.rpartition(":")[2].isdigit() for s in servers):
        raise argparse.ArgumentTypeError(f"{value!r}: use HOST:PORT[,HOST:PORT...]")
    return ",".join(servers)


def add_fleet_observe_parser(fleet_subparsers: Any) -> argparse.ArgumentParser:
    """Register `observe` on the `fleet` command group's subparsers; returns its parser."""
    p: argparse.ArgumentParser = fleet_subparsers.add_parser(
        "observe",
        help="every host's flow events, from the fleet's flows topic",
        description="Show the fleet's last flow events (the last 20 by default) from the "
        "flows topic, with the host that reported each, or follow them with --follow. "
        "Filters take comma-separated alternatives and may be repeated; lost records show "
        "unless --host leaves out their host.",
    )
    g = add_observe_args(p)
    g.add_argument(
        "--host",
        action="append",
        type=_host_list,
        metavar="NAME",
        help="reported by this host (its --host-name)",
    )
    k = p.add_argument_group("fleet")
    k.add_argument(
        "--fleet",
        type=_bootstrap,
        required=True,
        metavar="BOOTSTRAP",
        help="the fleet's Kafka brokers, HOST:PORT[,HOST:PORT...]",
    )
    k.add_argument(
        "--flows-topic",
        default=DEFAULT_FLOWS_TOPIC,
        metavar="TOPIC",
        help=f"the topic the agents send flow events to (default {DEFAULT_FLOWS_TOPIC})",
    )
    p.set_defaults(func=cmd_fleet_observe)
    return p
