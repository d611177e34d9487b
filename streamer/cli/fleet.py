"""`microseg fleet apply|get|status` (and `observe`, streamer/cli/fleetobserve.py): the fleet's
one policy, written to and read from Kafka directly (contract §7), never through an agent.

In: `--fleet BOOTSTRAP` (or MICROSEG_FLEET), the topics, and per command: a policy file in the
fleet form (`hosts` on rules, `select` on groups), `--base G`, `--dry-run`, `--confirm S`.
Out: `apply` validates the whole document first (nothing is published when it fails), then
publishes one generation (refused when the newest is no longer the base: exit 3, `stale: newest
is G`); `get` prints the newest generation and its document; `status` one line per agent and
exit 0 only when every agent enforces the newest generation.

Exit status: 0 done, 1 refused / brokers unreachable / not confirmed / agents not converged,
2 bad arguments, 3 stale base.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Final

import orjson

from streamer.cli import argtypes
from streamer.cli.documents import read_document
from streamer.cli.errors import ClientError, UsageError
from streamer.cli.output import format_table, print_json
from streamer.fleet.records import (
    DEFAULT_AGENTS_TOPIC,
    DEFAULT_HEARTBEAT_S,
    DEFAULT_POLICY_TOPIC,
    AgentStatus,
    PolicyRecord,
    is_lost,
)
from streamer.policy.model import PolicyError, PolicySet, parse_policy_document

__all__ = ["add_fleet_parsers", "agents_report", "cmd_fleet_apply", "cmd_fleet_get"]

FLEET_ENV: Final = "MICROSEG_FLEET"
EXIT_STALE: Final = 3
# Confirm this long before the agents' deadline: the confirmation must reach them in time.
_CONFIRM_MARGIN_S: Final = 1.0


def _rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("fleet brokers")
    g.add_argument(
        "--fleet",
        metavar="HOST:PORT[,HOST:PORT...]",
        type=argtypes.kafka_servers,
        default=os.environ.get(FLEET_ENV),
        help=f"the fleet's Kafka brokers (default: ${FLEET_ENV})",
    )
    g.add_argument("--fleet-topic", default=DEFAULT_POLICY_TOPIC, type=argtypes.kafka_topic)
    g.add_argument("--fleet-agents-topic", default=DEFAULT_AGENTS_TOPIC, type=argtypes.kafka_topic)
    g.add_argument(
        "--timeout",
        type=argtypes.seconds_between(1.0, 3600.0),
        default=30.0,
        metavar="SECONDS",
        help="give up on the brokers after this long (default %(default)s)",
    )
    return p


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")


def add_fleet_parsers(subparsers: Any) -> None:
    """`microseg fleet ...` under the top-level `subparsers`."""
    from streamer.cli.fleetobserve import add_fleet_observe_parser

    fleet = subparsers.add_parser(
        "fleet", help="one policy for many hosts through Kafka (docs/fleet.md)"
    )
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")
    common = _common()
    p = fsub.add_parser(
        "apply", parents=[common], help="publish a policy document as the fleet's new generation"
    )
    p.add_argument("file", type=Path, help="policy document (JSON or YAML; - for stdin)")
    p.add_argument(
        "--base",
        type=argtypes.bounded_int(0, 2**62, "a generation"),
        help="the generation this document was written on (default: the newest when the"
        " command starts; a document from `fleet get -o json` carries its own)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="publish nothing: what each host would enforce"
    )
    p.add_argument(
        "--confirm",
        type=argtypes.bounded_int(1, 3600, "seconds"),
        metavar="SECONDS",
        help="every agent reverts by itself unless all report the new generation within this"
        " long (then it is confirmed); otherwise the previous generation is published again",
    )
    _output(p)
    p.set_defaults(func=cmd_fleet_apply)
    p = fsub.add_parser("get", parents=[common], help="the newest generation's document")
    _output(p)
    p.set_defaults(func=cmd_fleet_get)
    p = fsub.add_parser(
        "status",
        parents=[common],
        help="every agent's generation, state, lag and last heartbeat (exit 0: all converged)",
    )
    p.add_argument(
        "--heartbeat",
        type=argtypes.seconds_between(0.2, 300.0),
        default=DEFAULT_HEARTBEAT_S,
        metavar="SECONDS",
        help="the agents' --fleet-heartbeat (lost after 3 missed; default %(default)s)",
    )
    _output(p)
    p.set_defaults(func=cmd_fleet_status)
    add_fleet_observe_parser(fsub)


# ---- running ----------------------------------------------------------------------------------


def _run(args: argparse.Namespace, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    if not args.fleet:
        print(f"microseg fleet: --fleet BOOTSTRAP is needed (or ${FLEET_ENV})", file=sys.stderr)
        return 2
    from streamer.fleet.topic import FleetError

    try:
        return int(asyncio.run(main()))
    except FleetError as e:
        print(f"microseg fleet: {e}", file=sys.stderr)
        return 1
    except ClientError as e:
        print(f"microseg fleet: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        return 130


def _unreachable(args: argparse.Namespace, e: BaseException) -> ClientError:
    return ClientError(f"the fleet's brokers {args.fleet} cannot be used: {e or type(e).__name__}")


# ---- apply ------------------------------------------------------------------------------------


def _read_fleet_document(path: Path) -> tuple[PolicySet, int | None]:
    """The validated document and, for `fleet get -o json` output, the generation it came
    with. Raises ClientError: nothing is published from a document that does not validate."""
    data = read_document(path)
    base = None
    if isinstance(data, dict) and set(data) == {"generation", "document"}:
        base = data["generation"]
        if type(base) is not int or base < 0:
            raise UsageError(f"{path}: generation: {base!r} is not a generation")
        data = data["document"]
    try:
        return parse_policy_document(data, str(path), fleet=True), base
    except PolicyError as e:
        raise ClientError(f"{e}\nnothing was published") from None


def cmd_fleet_apply(args: argparse.Namespace) -> int:
    return _run(args, lambda: _apply(args))


async def _apply(args: argparse.Namespace) -> int:
    from streamer.fleet.topic import PolicyWriter, StaleError, read_newest

    policy, carried = _read_fleet_document(args.file)
    if args.dry_run:
        # A dry run only reads: no writer, so no in-flight apply of someone else is fenced.
        newest = await read_newest(args.fleet, args.fleet_topic, args.timeout)
        agents = await _live_agents(args, DEFAULT_HEARTBEAT_S)
        return _dry_run(args, policy, newest, _base(args, carried, newest), agents)
    async with contextlib.AsyncExitStack() as stack:
        try:
            writer = await asyncio.wait_for(
                stack.enter_async_context(
                    PolicyWriter(args.fleet, args.fleet_topic, agents_topic=args.fleet_agents_topic)
                ),
                args.timeout,
            )
        except Exception as e:
            raise _unreachable(args, e) from None
        newest = await asyncio.wait_for(writer.newest(), args.timeout)
        base = _base(args, carried, newest)
        agents = await _live_agents(args, DEFAULT_HEARTBEAT_S)
        try:
            record = await writer.publish(
                policy.to_api(),
                base=base,
                actor=_actor(),
                confirm_within=float(args.confirm) if args.confirm else None,
            )
        except StaleError as e:
            print(
                f"microseg fleet apply: {e} (base {base}); nothing was published", file=sys.stderr
            )
            return EXIT_STALE
        _say_published(args, record, base, agents)
        if not args.confirm:
            return 0
        return await _confirm(args, writer, record, newest, agents)


def _base(args: argparse.Namespace, carried: int | None, newest: PolicyRecord | None) -> int:
    """--base, else the generation the document came with, else the newest now."""
    if args.base is not None:
        return int(args.base)
    if carried is not None:
        return carried
    return newest.generation if newest is not None else 0


def _actor() -> str:
    user = os.environ.get("SUDO_USER") or os.environ.get("USER") or "cli"
    return f"{user}@{os.uname().nodename}"


async def _live_agents(args: argparse.Namespace, heartbeat: float) -> dict[str, AgentStatus]:
    from streamer.fleet.topic import snapshot

    agents = await snapshot(args.fleet, args.fleet_agents_topic, args.timeout)
    now = time.time()
    return {h: s for h, s in agents.items() if not is_lost(s, now, heartbeat)}


def _say_published(
    args: argparse.Namespace, record: PolicyRecord, base: int, agents: Mapping[str, Any]
) -> None:
    if args.output == "json":
        print_json(
            {
                "generation": record.generation,
                "base": base,
                "agents": sorted(agents),
                "confirm_within": record.confirm_within,
            }
        )
        return
    print(
        f"published generation {record.generation} (base {base}) to {args.fleet_topic};"
        f" {len(agents)} agents follow it"
    )


async def _confirm(
    args: argparse.Namespace,
    writer: Any,
    record: PolicyRecord,
    previous: PolicyRecord | None,
    agents: Mapping[str, AgentStatus],
) -> int:
    """Confirm `record` once every agent that was live at publication reports it; else publish
    the previous generation's document again (each agent also reverts by itself)."""
    from streamer.fleet.topic import FleetView

    targeted = set(agents)
    deadline = record.published_at + record.confirm_within - _CONFIRM_MARGIN_S  # type: ignore[operator]
    async with FleetView(args.fleet, args.fleet_agents_topic) as view:
        task = asyncio.create_task(view.run())
        try:
            while True:
                missing = {
                    h
                    for h in targeted
                    if (s := view.agents.get(h)) is None or s.generation < record.generation
                }
                if not missing or time.time() >= deadline:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if not missing:
        await writer.confirm(record)
        print(f"generation {record.generation} confirmed: all {len(targeted)} agents enforce it")
        return 0
    names = ", ".join(sorted(missing))
    print(
        f"microseg fleet apply: generation {record.generation} not confirmed: {names} did not"
        " report it in time; every agent reverts it by itself",
        file=sys.stderr,
    )
    if previous is not None:
        again = await writer.publish(previous.document, base=record.generation, actor="revert")
        print(
            f"generation {again.generation} puts generation {previous.generation}'s document back",
            file=sys.stderr,
        )
    return 1


def _dry_run(
    args: argparse.Namespace,
    policy: PolicySet,
    newest: PolicyRecord | None,
    base: int,
    agents: Mapping[str, AgentStatus],
) -> int:
    from streamer.fleet.scope import FleetHost, rules_for_host, select_members

    before: PolicySet | None = None
    if newest is not None:
        try:
            before = parse_policy_document(newest.document, "the newest generation", fleet=True)
        except PolicyError:
            before = None
    hosts = []
    for name, s in agents.items():
        try:
            hosts.append(FleetHost.parse(name, s.labels, s.addresses))
        except ValueError:
            continue
    groups = select_members(policy, hosts)
    out: list[dict[str, Any]] = []
    for h in sorted(hosts, key=lambda h: h.name):
        now = set(rules_for_host(before, h.labels)) if before is not None else set()
        after = rules_for_host(policy, h.labels)
        out.append(
            {
                "host": h.name,
                "labels": dict(h.labels),
                "generation": agents[h.name].generation,
                "rules": after,
                "added": sorted(set(after) - now),
                "removed": sorted(now - set(after)),
            }
        )
    doc = {
        "dry_run": True,
        "base": base,
        "newest": newest.generation if newest is not None else 0,
        "hosts": out,
        "select": groups,
    }
    if args.output == "json":
        print_json(doc)
        return 0
    print(f"dry run: nothing published; generation {doc['newest']} is the newest, base {base}")
    rows = [
        [
            o["host"],
            ",".join(f"{k}={v}" for k, v in sorted(o["labels"].items())) or "-",
            str(o["generation"]),
            str(len(o["rules"])),
            " ".join(f"+{r}" for r in o["added"]) + " " + " ".join(f"-{r}" for r in o["removed"]),
        ]
        for o in out
    ]
    print(format_table(["HOST", "LABELS", "GEN", "RULES", "CHANGES"], rows))
    for name, members in groups.items():
        print(f"group {name} (select): {', '.join(members) or 'no members'}")
    return 0


# ---- get --------------------------------------------------------------------------------------


def cmd_fleet_get(args: argparse.Namespace) -> int:
    return _run(args, lambda: _get(args))


async def _get(args: argparse.Namespace) -> int:
    from streamer.fleet.topic import read_newest

    try:
        newest = await asyncio.wait_for(
            read_newest(args.fleet, args.fleet_topic, args.timeout), args.timeout
        )
    except Exception as e:
        raise _unreachable(args, e) from None
    if newest is None:
        print(f"microseg fleet get: {args.fleet_topic} holds no generation yet", file=sys.stderr)
        return 1
    if args.output == "json":
        sys.stdout.write(
            orjson.dumps(
                {"generation": newest.generation, "document": newest.document},
                option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
        return 0
    rules = newest.document.get("policies", [])
    print(
        f"generation {newest.generation} (base {newest.base}), published"
        f" {_rfc3339(newest.published_at)} by {newest.actor}: {len(rules)} rules,"
        f" default {newest.document.get('default_action', 'allow')}"
        + ("" if newest.confirm_within is None or newest.confirmed else ", not confirmed")
    )
    sys.stdout.write(orjson.dumps(newest.document, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


# ---- status -----------------------------------------------------------------------------------


def agents_report(
    newest: PolicyRecord | None, agents: Mapping[str, AgentStatus], heartbeat: float, now: float
) -> dict[str, Any]:
    """`fleet status -o json`: {"generation": NEWEST, "agents": [...]} (lost: silent for
    LOST_AFTER_HEARTBEATS heartbeats)."""
    newest_gen = newest.generation if newest is not None else 0
    rows = []
    for host in sorted(agents):
        s = agents[host]
        lost = is_lost(s, now, heartbeat)
        behind = s.generation < newest_gen
        lag = round(max(0.0, now - newest.published_at), 3) if behind and newest else 0.0
        rows.append(
            {
                "host": host,
                "labels": dict(s.labels),
                "addresses": list(s.addresses),
                "generation": s.generation,
                "state": "lost" if lost else s.state,
                "error": s.error,
                "lag_s": lag,
                "last_heartbeat": _rfc3339(s.heartbeat_at),
            }
        )
    return {"generation": newest_gen, "agents": rows}


def converged(report: Mapping[str, Any]) -> bool:
    """Every agent enforces the newest generation (and there is at least one)."""
    agents = report["agents"]
    return bool(agents) and all(
        a["state"] == "enforcing" and a["generation"] == report["generation"] for a in agents
    )


def cmd_fleet_status(args: argparse.Namespace) -> int:
    return _run(args, lambda: _status(args))


async def _status(args: argparse.Namespace) -> int:
    from streamer.fleet.topic import read_newest, snapshot

    try:
        async with asyncio.timeout(args.timeout):
            agents = await snapshot(args.fleet, args.fleet_agents_topic, args.timeout)
            newest = await read_newest(args.fleet, args.fleet_topic, args.timeout)
    except TimeoutError:
        raise _unreachable(args, TimeoutError("timed out")) from None
    except ClientError:
        raise
    except Exception as e:
        raise _unreachable(args, e) from None
    report = agents_report(newest, agents, args.heartbeat, time.time())
    if args.output == "json":
        print_json(report)
    else:
        print(f"newest generation {report['generation']}")
        rows = [
            [
                a["host"],
                str(a["generation"]),
                a["state"],
                f"{a['lag_s']:.1f}s",
                a["last_heartbeat"] or "-",
                ",".join(a["addresses"]) or "-",
                a["error"] or "",
            ]
            for a in report["agents"]
        ]
        print(
            format_table(["HOST", "GEN", "STATE", "LAG", "HEARTBEAT", "ADDRESSES", "ERROR"], rows)
        )
    if not report["agents"]:
        print("microseg fleet status: no agent follows the fleet", file=sys.stderr)
    return 0 if converged(report) else 1
