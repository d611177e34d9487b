"""The `microseg` command line: argument parsing and validation into typed configs.

Each subcommand validates its flags once and hands a typed config to the component that does
the work (agent, lab, datapath). Bad flags exit with status 2 and a message naming the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from streamer import __version__
from streamer.agent.pressure import PressureConfig
from streamer.cli import argtypes
from streamer.cli.config import ConfigError, RunConfig, config_path_in, load_run_config
from streamer.cli.fleet import add_fleet_parsers
from streamer.cli.group import add_group_parser
from streamer.cli.lab import add_lab_parser
from streamer.cli.monitor import add_monitor_parser
from streamer.cli.observe import add_flow_parsers
from streamer.cli.output import into_pipe
from streamer.cli.policy import add_policy_parser
from streamer.cli.sessions import add_session_parser
from streamer.cli.stats import add_stats_parser
from streamer.datapath.reference import Timeouts
from streamer.events.ocsf import EVENT_FORMATS, EventFormat
from streamer.fleet.config import FleetConfig
from streamer.fleet.records import DEFAULT_AGENTS_TOPIC, DEFAULT_HEARTBEAT_S, DEFAULT_POLICY_TOPIC
from streamer.policy.failsafe import DEFAULT_FAILSAFE, parse_failsafe
from streamer.vocabulary import DefaultAction, Mode

_TIMEOUT_CLASSES = [f.name for f in dataclasses.fields(Timeouts)]


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the agent in the foreground")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help='TOML file of these flags without -- (policy-file = "...", iface = ["eth0"]);'
        " flags given here replace its keys (see examples/microseg.toml)",
    )
    p.add_argument(
        "--iface",
        action="append",
        type=argtypes.ifname,
        required=True,
        help="interface to enforce on (repeatable)",
    )
    p.add_argument("--netns", help="named network namespace the interfaces live in")
    p.add_argument("--policy-file", type=Path, help="policy file (JSON or YAML)")
    p.add_argument(
        "--default-action",
        choices=[a.value for a in DefaultAction],
        help="verdict when no rule matches (overrides the policy file's)",
    )
    p.add_argument(
        "--policy-mode",
        choices=[m.value for m in Mode],
        default=Mode.ENFORCE.value,
        help="staged: every rule (and the default action) is staged: nothing is dropped, "
        "every flow the policy would deny is reported (default enforce)",
    )
    p.add_argument(
        "--failsafe",
        type=argtypes.failsafe_list,
        default=parse_failsafe(DEFAULT_FAILSAFE),
        metavar="LIST|none",
        help="traffic that passes before any rule: PROTO:PORT:in|out[@CIDR],... "
        f"(default {DEFAULT_FAILSAFE}); none turns it off",
    )
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/microseg"))
    p.add_argument("--events-file", type=Path, help="write flow events as JSON lines here")
    p.add_argument(
        "--events-file-max-bytes",
        type=argtypes.size,
        default=100 << 20,
        metavar="SIZE",
        help="rotate the events file when it would grow past this (e.g. 100M; 0: never)",
    )
    p.add_argument(
        "--events-file-keep",
        type=argtypes.non_negative_int,
        default=5,
        metavar="N",
        help="rotated events files kept (F.1 ... F.N)",
    )
    p.add_argument(
        "--events-file-format",
        choices=EVENT_FORMATS,
        help="records in the events file: microseg (contract §4) or ocsf (OCSF 1.3.0 events;"
        " see README); default --event-format's",
    )
    p.add_argument(
        "--event-format",
        choices=EVENT_FORMATS,
        default="microseg",
        help="the format of the events file and Kafka unless --events-file-format or"
        " --kafka-format say otherwise (default microseg)",
    )
    p.add_argument(
        "--instance",
        type=argtypes.instance_name,
        help="pin directory name under /sys/fs/bpf/microseg (default: per netns)",
    )
    p.add_argument("--session-table-size", type=argtypes.positive_int, default=262144)
    p.add_argument(
        "--max-shapes",
        type=argtypes.positive_int,
        default=512,
        help="distinct rule shapes per address family the classifier probes",
    )
    p.add_argument(
        "--event-interval",
        type=argtypes.seconds,
        default=1.0,
        help="at most one event per flow per this many seconds after its first",
    )
    p.add_argument("--ringbuf-pages", type=argtypes.positive_int, default=256)
    p.add_argument(
        "--attach-mode",
        choices=["auto", "tcx", "tc"],
        default="auto",
        help="tcx: BPF links on the TC hook (Linux 6.6+, the cheaper hook); tc:"
        " filters on a clsact qdisc; auto: tcx where the kernel has it",
    )
    p.add_argument(
        "--keep-on-exit",
        action="store_true",
        help="leave the classifier attached and enforcing after a clean exit",
    )
    p.add_argument(
        "--stats-interval",
        type=argtypes.seconds,
        default=0.0,
        help="print counters every this many seconds (0: never)",
    )
    p.add_argument("--print-events", action="store_true", help="print flow events to stdout")
    # The fleet feed alone (the viewer's fleet view, ?source=fleet), without the fleet's
    # policy: what --fleet sets from its brokers and microseg.flows. Hidden: for tests.
    p.add_argument("--fleet-flows", metavar="BOOTSTRAP", help=argparse.SUPPRESS)
    p.add_argument("--fleet-flows-topic", default="microseg.flows", help=argparse.SUPPRESS)
    p.add_argument(
        "--api",
        action="append",
        metavar="HOST:PORT|unix:PATH",
        help="serve the admin API here (repeatable; default 127.0.0.1:8080;"
        " 'none' to serve no API)",
    )
    p.add_argument(
        "--no-auth", action="store_true", help="serve the API without a bearer token (demos only)"
    )
    p.add_argument(
        "--flow-feed-queue",
        type=argtypes.positive_int,
        default=4096,
        metavar="N",
        help="events queued per /api/v1/flows client; one that falls further"
        " behind is disconnected",
    )
    p.add_argument(
        "--kafka",
        metavar="HOST:PORT",
        type=argtypes.kafka_servers,
        help="also stream flow events to Kafka (bootstrap servers, comma-separated)",
    )
    p.add_argument(
        "--kafka-topic",
        default="microseg.flows",
        type=argtypes.kafka_topic,
        help="topic for flow events (created if missing)",
    )
    p.add_argument(
        "--kafka-format",
        choices=EVENT_FORMATS,
        help="Kafka record values: microseg (contract §4) or ocsf (OCSF 1.3.0 events);"
        " default --event-format's",
    )
    p.add_argument(
        "--kafka-spool-max-bytes",
        type=argtypes.size,
        default=256 << 20,
        metavar="SIZE",
        help="events wait in <state-dir>/spool while Kafka is unreachable, up to"
        " this much (then the oldest are dropped, and counted)",
    )
    p.add_argument(
        "--timeout",
        action="append",
        type=argtypes.class_seconds(_TIMEOUT_CLASSES),
        metavar="CLASS=SECONDS",
        default=[],
        help="idle timeout of a session class (repeatable); classes: "
        + ", ".join(_TIMEOUT_CLASSES)
        + " (defaults: Linux conntrack's; see README)",
    )
    _pressure_flags(p)
    _fleet_flags(p)
    p.set_defaults(func=cmd_run)


def _fleet_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fleet (one policy for many hosts through Kafka; see docs/fleet.md)")
    g.add_argument(
        "--fleet",
        metavar="HOST:PORT[,HOST:PORT...]",
        type=argtypes.kafka_servers,
        help="follow the fleet's policy topic on these brokers (local policy writes are then"
        " refused); flow events go to their flows topic unless --kafka names others",
    )
    g.add_argument(
        "--host-name",
        type=argtypes.host_name,
        metavar="NAME",
        help="this host's name in the fleet (default: the system's host name)",
    )
    g.add_argument(
        "--host-label",
        action="append",
        type=argtypes.host_label,
        default=[],
        metavar="KEY=VALUE",
        help="a label of this host, for rules' hosts and groups' select (repeatable)",
    )
    g.add_argument(
        "--fleet-topic",
        default=DEFAULT_POLICY_TOPIC,
        type=argtypes.kafka_topic,
        help="the fleet's policy topic (default %(default)s)",
    )
    g.add_argument(
        "--fleet-agents-topic",
        default=DEFAULT_AGENTS_TOPIC,
        type=argtypes.kafka_topic,
        help="the fleet's agent status topic (default %(default)s)",
    )
    g.add_argument(
        "--fleet-heartbeat",
        default=DEFAULT_HEARTBEAT_S,
        type=argtypes.seconds_between(0.2, 300.0),
        metavar="SECONDS",
        help="status heartbeat; an agent silent for 3 heartbeats is lost (default %(default)s)",
    )


def _fleet_config(args: argparse.Namespace) -> FleetConfig | None:
    if args.fleet is None:
        return None
    labels = dict(args.host_label)
    if len(labels) != len(args.host_label):
        raise ValueError("--host-label: a key is given twice")
    return FleetConfig(
        bootstrap=args.fleet,
        host=args.host_name or argtypes.host_name(socket.gethostname()),
        labels=labels,
        policy_topic=args.fleet_topic,
        agents_topic=args.fleet_agents_topic,
        heartbeat_s=args.fleet_heartbeat,
    )


def _pressure_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pressure alerts (alert records in the event stream, metrics)")
    d = PressureConfig()
    g.add_argument(
        "--syn-flood-half-open",
        type=argtypes.non_negative_int,
        metavar="N",
        default=d.half_open_threshold,
        help="alert syn_flood at this many half-open TCP sessions"
        f" (default {d.half_open_threshold}; 0: off)",
    )
    g.add_argument(
        "--syn-flood-rate",
        type=argtypes.per_second,
        metavar="PER_S",
        default=d.syn_rate_threshold,
        help="... or at this many new TCP sessions opened by a SYN per second"
        f" (default {d.syn_rate_threshold:g}; 0: off)",
    )
    g.add_argument(
        "--new-flow-rate-alert",
        type=argtypes.per_second,
        metavar="PER_S",
        default=d.new_flow_rate_threshold,
        help="alert new_flow_rate at this many new sessions per second, any protocol"
        f" (default {d.new_flow_rate_threshold:g}; 0: off)",
    )
    g.add_argument(
        "--fill-warning",
        type=argtypes.fraction,
        metavar="RATIO",
        default=d.fill_warning,
        help="alert map_fill (warning) when a kernel table is this full (default 0.8)",
    )
    g.add_argument(
        "--fill-critical",
        type=argtypes.fraction,
        metavar="RATIO",
        default=d.fill_critical,
        help="... and critical at this (default 0.95)",
    )
    g.add_argument(
        "--pressure-interval",
        type=argtypes.seconds,
        metavar="SECONDS",
        default=d.interval,
        help="how often the tables are read for alerts and rates (default 1)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from streamer.agent.service import AgentConfig, default_instance, run_agent
    from streamer.datapath.config import DatapathConfig

    if args.kafka_spool_max_bytes < 64 * 1024:
        print("microseg run: --kafka-spool-max-bytes must be at least 64K", file=sys.stderr)
        return 2
    if args.ringbuf_pages & (args.ringbuf_pages - 1):
        print("microseg run: --ringbuf-pages must be a power of two", file=sys.stderr)
        return 2
    if args.policy_file is not None and not args.policy_file.is_file():
        print(f"microseg run: --policy-file {args.policy_file}: no such file", file=sys.stderr)
        return 2
    if args.netns is not None and not Path("/run/netns", args.netns).exists():
        print(f"microseg run: --netns {args.netns}: no such network namespace", file=sys.stderr)
        return 2
    try:
        timeouts = Timeouts(**dict(args.timeout))
    except ValueError as e:
        print(f"microseg run: --timeout: {e}", file=sys.stderr)
        return 2
    try:
        pressure = PressureConfig(
            interval=args.pressure_interval,
            half_open_threshold=args.syn_flood_half_open,
            syn_rate_threshold=args.syn_flood_rate,
            new_flow_rate_threshold=args.new_flow_rate_alert,
            fill_warning=args.fill_warning,
            fill_critical=args.fill_critical,
        )
    except ValueError as e:
        print(f"microseg run: {e}", file=sys.stderr)
        return 2
    if args.fleet is not None and args.policy_file is not None:
        print(
            "microseg run: --policy-file with --fleet: the fleet's topic is the policy"
            " (publish it with `microseg fleet apply FILE`)",
            file=sys.stderr,
        )
        return 2
    if args.fleet is None and (args.host_name or args.host_label):
        print("microseg run: --host-name and --host-label need --fleet", file=sys.stderr)
        return 2
    try:
        fleet = _fleet_config(args)
    except (ValueError, argparse.ArgumentTypeError) as e:
        print(f"microseg run: {e}", file=sys.stderr)
        return 2
    # argparse's choices checked them: one of EVENT_FORMATS.
    events_file_format = cast(EventFormat, args.events_file_format or args.event_format)
    kafka_format = cast(EventFormat, args.kafka_format or args.event_format)
    if kafka_format != "microseg" and fleet is not None and args.kafka is None:
        # The fleet's flows topic feeds `fleet observe` and the viewer's fleet view, which
        # read contract §4 records.
        print(
            "microseg run: --kafka-format ocsf with --fleet: the fleet's flows topic carries"
            " microseg records; name another topic or broker for OCSF with --kafka",
            file=sys.stderr,
        )
        return 2
    instance = args.instance or default_instance(args.netns)
    api = tuple(args.api or ["127.0.0.1:8080"])
    if "none" in api:
        api = ()
    config = AgentConfig(
        ifaces=tuple(dict.fromkeys(args.iface)),
        netns=args.netns,
        policy_file=args.policy_file,
        default_action=DefaultAction(args.default_action) if args.default_action else None,
        state_dir=args.state_dir,
        events_file=args.events_file,
        events_file_max_bytes=args.events_file_max_bytes,
        events_file_keep=args.events_file_keep,
        events_file_format=events_file_format,
        kafka=args.kafka or (fleet.bootstrap if fleet is not None else None),
        kafka_topic=args.kafka_topic,
        kafka_spool_max_bytes=args.kafka_spool_max_bytes,
        kafka_format=kafka_format,
        flow_feed_queue=args.flow_feed_queue,
        keep_on_exit=args.keep_on_exit,
        stats_interval=args.stats_interval,
        print_events=args.print_events,
        api_listen=api,
        no_auth=args.no_auth,
        pressure=pressure,
        fleet=fleet,
        host_name=fleet.host if fleet is not None else None,
        fleet_flows=(args.fleet_flows, args.fleet_flows_topic)
        if args.fleet_flows
        else (fleet.bootstrap, args.kafka_topic)
        if fleet is not None and args.kafka is None
        else None,
        datapath=DatapathConfig(
            instance=instance,
            session_entries=args.session_table_size,
            max_shapes=args.max_shapes,
            ringbuf_pages=args.ringbuf_pages,
            event_interval_ns=int(args.event_interval * 1e9),
            timeouts=timeouts,
            attach_mode=args.attach_mode,
            failsafe=args.failsafe,
            staged_all=args.policy_mode == Mode.STAGED.value,
        ),
    )
    return run_agent(config)


def _add_detach(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "detach", help="remove microseg's classifier (tcx links, clsact filters) from interfaces"
    )
    p.add_argument("--iface", action="append", type=argtypes.ifname, required=True)
    p.add_argument("--netns")
    p.set_defaults(func=cmd_detach)


def cmd_detach(args: argparse.Namespace) -> int:
    from streamer.datapath.attach import detach
    from streamer.datapath.config import DatapathError

    rc = 0
    for ifname in args.iface:
        try:
            removed = detach(ifname, args.netns)
        except DatapathError as e:
            print(f"microseg detach: {e}", file=sys.stderr)
            rc = 1
            continue
        print(f"{ifname}: removed {', '.join(removed) if removed else 'nothing (not attached)'}")
    return rc


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policy-check", help="validate and compile a policy file offline")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_policy_check)


def cmd_policy_check(args: argparse.Namespace) -> int:
    from streamer.datapath.compiler import CompileError, compile_policy
    from streamer.policy.model import PolicyError, load_policy_file

    try:
        policy = load_policy_file(args.file)
        compiled = compile_policy(policy, 512)
    except (PolicyError, CompileError) as e:
        print(f"microseg: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: {len(policy.policies)} rules, {len(policy.groups)} groups,"
        f" default {policy.default_action.value},"
        f" {compiled.shape_count} shapes, {compiled.entry_count} table entries"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="microseg", description="eBPF microsegmentation")
    parser.add_argument("--version", action="version", version=f"microseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_detach(sub)
    _add_check(sub)
    add_lab_parser(sub)
    add_policy_parser(sub)
    add_group_parser(sub)
    add_session_parser(sub)
    add_stats_parser(sub)
    add_flow_parsers(sub)
    add_monitor_parser(sub)
    add_fleet_parsers(sub)
    return parser


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise KeyError(name)


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """`microseg` arguments -> the namespace its command runs with. `run --config FILE`: the
    file's keys become run's defaults before the command line is parsed, so the flags given
    replace them and the file satisfies required ones (--iface). ConfigError for a bad file;
    argparse's SystemExit for bad flags."""
    parser = build_parser()
    run_config: RunConfig | None = None
    config_file = config_path_in(argv)
    if config_file is not None:
        run_config = load_run_config(config_file, _subparser(parser, "run"))
        run_config.apply(_subparser(parser, "run"))
    args = parser.parse_args(argv)
    if run_config is not None:
        run_config.fill(args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_command_line(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as e:
        print(f"microseg run: --config {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return into_pipe(lambda: int(args.func(args)))


if __name__ == "__main__":
    sys.exit(main())
