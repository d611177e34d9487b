"""The fleet benchmark: `fleet apply` -> every agent enforcing, checked by packets.

In: `FleetSettings` (agent counts, changes per count, the big set's size and agents, the
label-group changes). Out: a results dict (`run_fleet_bench`, the JSON "fleet" section) and
its plain-text table (`render_fleet`). Everything made is removed at the end, also on failure,
Ctrl-C or SIGTERM (SystemExit): the agents (killed, detached, pins and run files removed),
the labs (and whatever runs in them), the broker and its directory, the work directory.

Set-up: one private Kafka broker (bench.kafkabroker) on loopback, unique topics; one lab
(`streamer.lab.lab.Lab`) per agent, an echo server on PORT in each lab's host namespace, and
one `microseg run --fleet` process per lab on its host end (label role=db, its own pin
instance and state dir, no API, failsafe off). Agents are added as the counts grow (1, then
4 more, ...), so the 20-agent row runs on the agents of the 10-agent row plus 10 new ones.
The policy is published from this process with `streamer.fleet.topic.PolicyWriter` (what
`microseg fleet apply` runs), and every time is counted from `publish()` returning (the
record committed and read back by a read_committed reader, as `fleet apply` returns).

Verdicts are read by packets only: from each lab's peer namespace a non-blocking TCP connect
to the host end's PORT every PROBE_EVERY_S, each judged after PROBE_WAIT_S (handshake done:
allowed; anything else: refused). A lab has converged at the send time of its first probe
that shows the new verdict (the SYN was judged by the new rules then: an upper bound, to
PROBE_EVERY_S); a change has converged when the last lab has.

- One-rule change: a set of BASE_RULES palette rules (bench.rulesets, none covers the lab
  addresses) plus a rule allowing PORT; each change alternately adds and removes a deny rule
  for PORT above it (the rest stays). p50/p99/max over `changes` changes per agent count.
- 100,000 rules at `big_agents` agents: from the one-rule set with the deny in place, a
  document of `big_rules` palette rules plus the PORT allow rule (and, on alternate runs, the
  deny), each agent enforcing the new verdict; also each agent's own "enforced (X s after
  its publication)" log line, and its RSS after.
- Label-group change at `group_agents` agents: every agent gets a rule allowing PORT only from
  the group `{"select": {"role": "client"}}` above a deny of PORT. A client agent (role=client,
  a new host name each time) starts on lab 0's PEER end: its addresses join the group; it
  stops cleanly (SIGTERM: its tombstone): they leave. The probes of lab 0 come from that
  address; every other lab's peer gets lab 0's peer IPv4 address as a second address (its
  host a route back), and its probes come from it, so every agent's verdict for traffic from
  the client's address is read by packets. Measured from the Kafka timestamp of the client's
  first status record (join) or tombstone (leave) on the agents topic, and also from its
  process start (join, includes its start-up) or its SIGTERM (leave).
- RSS (VmRSS, /proc/PID/status) of every agent at the end of every row and after the big set.

Targets are printed "met"/"NOT met", never a failure; a verdict that never changes within
CONVERGE_TIMEOUT_S is a BenchError (with the agents' logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import BenchError

ROOT = Path(__file__).resolve().parent.parent
PORT = 7311  # not a palette port (bench.rulesets._PORTS, BOTTOM_PORT)
ALLOW_ID = 900_001
DENY_ID = 900_002
GROUP_ALLOW_ID = 900_003
GROUP_DENY_ID = 900_004
BASE_RULES = 100
HEARTBEAT_S = 2.0
PROBE_EVERY_S = 0.01
PROBE_WAIT_S = 0.04
CONVERGE_TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0
SETTLE_S = 0.3  # between a converged change and the next publication
TARGET_P99_S = 1.0
TARGET_BIG_S = 10.0
TARGET_RSS_MIB = 250.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# Set when the run is interrupted (Ctrl-C, SIGTERM, an error): the waits in worker threads
# (probes, agents starting) end at once, so asyncio.run's executor shutdown does not wait.
_STOP = threading.Event()
_ENFORCED_RE = re.compile(r"fleet generation (\d+) enforced \(([\d.]+) s after its publication\)")


@dataclass(frozen=True)
class FleetSettings:
    """Agent counts of the one-rule rows, changes per row, the big set (rules, agents, runs),
    the label-group row (agents, changes: joins and leaves in turn)."""

    counts: tuple[int, ...]
    changes: int
    big_rules: int
    big_agents: int
    big_runs: int
    group_agents: int
    group_changes: int
    seed: int
    quick: bool


FULL_FLEET = FleetSettings((1, 5, 10, 20), 20, 100_000, 10, 2, 10, 6, 1, False)
QUICK_FLEET = FleetSettings((1, 5), 5, 10_000, 5, 1, 5, 2, 1, True)


def settings_for(
    quick: bool,
    counts: Sequence[int] | None = None,
    changes: int | None = None,
    seed: int = 1,
) -> FleetSettings:
    """FULL_FLEET or QUICK_FLEET with the counts and changes overridden; the big and group rows
    run on at most the largest count."""
    b = QUICK_FLEET if quick else FULL_FLEET
    cs = tuple(sorted(set(counts))) if counts else b.counts
    top = max(cs)
    return FleetSettings(
        cs, changes or b.changes, b.big_rules, min(b.big_agents, top), b.big_runs,
        min(b.group_agents, top), min(b.group_changes, max(2, changes or b.group_changes)),
        seed, b.quick,
    )  # fmt: skip


# ---- documents ---------------------------------------------------------------------------------


def _allow(rule_id: int, priority: int) -> dict[str, Any]:
    return {
        "rule_id": rule_id, "name": f"bench-allow-{PORT}", "protocol": "tcp", "dst_port": PORT,
        "direction": "ingress", "action": "allow", "priority": priority,
    }  # fmt: skip


def _deny(rule_id: int, priority: int) -> dict[str, Any]:
    return {**_allow(rule_id, priority), "name": f"bench-deny-{PORT}", "action": "deny"}


def one_rule_doc(base: list[dict[str, Any]], deny: bool) -> dict[str, Any]:
    """The palette rules `base`, PORT allowed (priority 10), and when `deny` a deny of PORT
    above it (priority 20). Default deny (the palette's)."""
    rules = [*base, _allow(ALLOW_ID, 10)]
    if deny:
        rules.append(_deny(DENY_ID, 20))
    return {"default_action": "deny", "policies": rules}


def group_doc(base: list[dict[str, Any]]) -> dict[str, Any]:
    """PORT allowed only from the select group `clients` (role=client), denied otherwise, on
    the db hosts; default allow."""
    allow = {**_allow(GROUP_ALLOW_ID, 200), "src_group": "clients", "hosts": {"role": "db"}}
    deny = {**_deny(GROUP_DENY_ID, 100), "hosts": {"role": "db"}}
    # Default allow: the client agent gets no rule of this set (they are the db hosts'),
    # and its own end must let the probes through.
    return {
        "default_action": "allow",
        "groups": {"clients": {"members": [], "select": {"role": "client"}}},
        "policies": [*base, allow, deny],
    }


# ---- agents ------------------------------------------------------------------------------------


class FleetAgent:
    """One `microseg run --fleet` process on a lab end, its log in a file. `cleanup` leaves
    nothing behind (kill, detach, pins and run files removed); safe to repeat."""

    _n = 0

    def __init__(
        self, lab: Any, host: str, labels: dict[str, str], side: str, workdir: Path,
        fleet_args: list[str],
    ) -> None:  # fmt: skip
        FleetAgent._n += 1
        self.lab = lab
        self.host = host
        self.labels = labels
        self.side = side
        self.instance = f"bench-fleet-{os.getpid()}-{FleetAgent._n}"
        self.workdir = workdir / self.instance
        self.workdir.mkdir(parents=True)
        self.log_file = self.workdir / "agent.log"
        self.fleet_args = fleet_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def netns(self) -> str:
        return str(self.lab.host_ns if self.side == "host" else self.lab.peer_ns)

    @property
    def iface(self) -> str:
        return str(self.lab.host_if if self.side == "host" else self.lab.peer_if)

    def launch(self) -> None:
        argv = [
            sys.executable, "-m", "streamer", "run", "--netns", self.netns, "--iface", self.iface,
            *self.fleet_args, "--host-name", self.host,
            *[a for k, v in self.labels.items() for a in ("--host-label", f"{k}={v}")],
            "--failsafe", "none", "--api", "none", "--state-dir", str(self.workdir / "state"),
            "--instance", self.instance,
        ]  # fmt: skip
        self.started_at = time.monotonic()
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                cwd=ROOT, start_new_session=True,
            )  # fmt: skip

    def log(self, last: int = 25) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-last:])

    def enforcing(self) -> bool:
        """True once this run logged "enforcing on IFACE" (BenchError if it exited)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"agent {self.host} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return False
        return f"enforcing on {self.iface}" in text

    def enforced(self) -> dict[int, float]:
        """generation -> seconds after its publication, from the agent's own log lines."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return {}
        return {int(g): float(s) for g, s in _ENFORCED_RE.findall(text)}

    def rss_mib(self) -> float:
        if self.proc is None:
            raise BenchError(f"agent {self.host} is not running")
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError as e:
            raise BenchError(f"reading the memory of agent {self.host}: {e}") from e
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        raise BenchError(f"/proc/{self.proc.pid}/status has no VmRSS")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the agent process has used so far (0 when gone)."""
        if self.proc is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean stop: its tombstone) and wait; SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def cleanup(self) -> None:
        from streamer.datapath.attach import detach
        from streamer.datapath.config import DEFAULT_PIN_ROOT, DEFAULT_RUN_DIR

        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        try:
            if self.lab.exists():
                with contextlib.suppress(Exception):  # whatever pyroute2 raises: go on
                    detach(self.iface, self.netns)
        finally:
            shutil.rmtree(DEFAULT_PIN_ROOT / self.instance, ignore_errors=True)
            shutil.rmtree(DEFAULT_RUN_DIR / self.instance, ignore_errors=True)


def wait_enforcing(agents: Sequence[FleetAgent], timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    pending = list(agents)
    while pending:
        if _STOP.is_set():
            raise BenchError("interrupted")
        pending = [a for a in pending if not a.enforcing()]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"{len(pending)} agent(s) not enforcing after {timeout:.0f} s; {pending[0].host}:"
                f"\n{pending[0].log()}"
            )
        time.sleep(0.1)


# ---- probes ------------------------------------------------------------------------------------


@dataclass
class Target:
    """Where one lab's probes go from: its peer namespace, a source address (None: the
    peer's own), the host end's address."""

    name: str
    ns: str
    dst: str
    src: str | None = None


def probe_until(
    targets: Sequence[Target], want: bool, t0: float, timeout: float = CONVERGE_TIMEOUT_S
) -> dict[str, float]:
    """Probe every target until each shows `want` (True: connections pass); per target the
    seconds from `t0` (time.monotonic) to the send time of its first probe showing it.
    BenchError naming the targets that never did within `timeout` s."""
    sel = selectors.DefaultSelector()
    live: dict[socket.socket, tuple[Target, float]] = {}
    done: dict[str, float] = {}
    next_at = dict.fromkeys((t.name for t in targets), 0.0)
    by_name = {t.name: t for t in targets}
    deadline = time.monotonic() + timeout
    from streamer.lab.netns import netns_socket

    def finish(s: socket.socket, passed: bool) -> None:
        t, sent = live.pop(s)
        sel.unregister(s)
        s.close()
        if passed == want and t.name not in done:
            done[t.name] = sent - t0

    try:
        while len(done) < len(targets):
            now = time.monotonic()
            if _STOP.is_set():
                raise BenchError("interrupted")
            if now > deadline:
                missing = sorted(set(by_name) - set(done))
                raise BenchError(
                    f"{len(missing)} lab(s) never showed {'pass' if want else 'refused'} on"
                    f" port {PORT} within {timeout:.0f} s: {', '.join(missing[:5])}"
                )
            for name, at in next_at.items():
                if name in done or now < at:
                    continue
                t = by_name[name]
                s = netns_socket(t.ns, socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                # RST on close: no TIME_WAIT pile-up from thousands of probes.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                if t.src is not None:
                    s.bind((t.src, 0))
                sent = time.monotonic()
                s.connect_ex((t.dst, PORT))
                live[s] = (t, sent)
                sel.register(s, selectors.EVENT_WRITE)
                next_at[name] = sent + PROBE_EVERY_S
            for key, _ in sel.select(timeout=PROBE_EVERY_S / 2):
                s = key.fileobj  # type: ignore[assignment]
                assert isinstance(s, socket.socket)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                finish(s, err == 0)
            now = time.monotonic()
            for s, (_, sent) in list(live.items()):
                if now - sent >= PROBE_WAIT_S:
                    finish(s, False)
            # A target done stops probing; its sockets still in flight are dropped.
            for s, (t, _) in list(live.items()):
                if t.name in done:
                    finish(s, want)
    finally:
        for s in list(live):
            with contextlib.suppress(OSError):
                s.close()
        sel.close()
    return done


# ---- the bench ---------------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of values in s, as ms."""
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))] * 1000, 1)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _pct(values, 0.50),
        "p99_ms": _pct(values, 0.99),
        "max_ms": round(max(values) * 1000, 1) if values else None,
    }


def _rss(agents: Sequence[FleetAgent]) -> dict[str, Any]:
    values = [a.rss_mib() for a in agents]
    return {
        "agents": len(values),
        "max_mib": max(values),
        "median_mib": round(statistics.median(values), 1),
        "each_mib": values,
    }


class FleetBench:
    """Owns the broker, the labs, the agents and the work directory (`close` removes all)."""

    def __init__(self, settings: FleetSettings, progress: Callable[[str], None]) -> None:
        from bench.kafkabroker import unique_topic
        from bench.rulesets import palette_policy

        self.s = settings
        self.progress = progress
        self.workdir = Path(tempfile.mkdtemp(prefix="microseg-bench-fleet-"))
        self.broker: Any = None
        self.labs: list[Any] = []
        self.echoes: list[Any] = []
        self.agents: list[FleetAgent] = []
        self.clients: list[FleetAgent] = []
        self.aliases: list[tuple[Any, str]] = []
        self.policy_topic = unique_topic("bench-fleet-policy")
        self.agents_topic = unique_topic("bench-fleet-agents")
        self.flows_topic = unique_topic("bench-fleet-flows")
        self.base = palette_policy(BASE_RULES, settings.seed)["policies"]
        self.deny = True
        self.writer: Any = None
        self.start_s: dict[int, float] = {}

    # -- set-up and teardown --

    def start_broker(self) -> None:
        from bench.kafkabroker import KafkaBroker

        self.progress("fleet: starting a Kafka broker ...")
        self.broker = KafkaBroker()
        self.broker.start()

    def fleet_args(self) -> list[str]:
        return [
            "--fleet", self.broker.bootstrap, "--fleet-topic", self.policy_topic,
            "--fleet-agents-topic", self.agents_topic, "--fleet-heartbeat", str(HEARTBEAT_S),
            "--kafka-topic", self.flows_topic,
        ]  # fmt: skip

    def grow(self, count: int) -> None:
        """Labs, echo servers and db agents up to `count`; the seconds until all enforce."""
        from streamer.lab.lab import Lab
        from streamer.lab.probes import EchoServer

        new: list[FleetAgent] = []
        t0 = time.monotonic()
        while len(self.agents) < count:
            lab = Lab.create()
            self.labs.append(lab)
            self.progress(f"fleet: lab {lab.name} for db-{len(self.agents)}")
            self.echoes.append(EchoServer(lab.host_ns, [PORT]).start())
            i = len(self.agents)
            agent = FleetAgent(
                lab, f"db-{i}", {"role": "db"}, "host", self.workdir, self.fleet_args()
            )
            self.agents.append(agent)
            agent.launch()
            new.append(agent)
        wait_enforcing(new)
        self.start_s[count] = round(time.monotonic() - t0, 1)

    def close(self) -> None:
        for a in [*self.clients, *self.agents]:
            with contextlib.suppress(Exception):
                a.cleanup()
        for e in self.echoes:
            with contextlib.suppress(Exception):
                e.stop()
        for lab in self.labs:
            with contextlib.suppress(Exception):
                lab.destroy()
        try:
            if self.broker is not None:
                self.broker.destroy()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def targets(self, agents: int, from_client: bool = False) -> list[Target]:
        """The probes of the first `agents` labs (from lab 0's peer address when
        `from_client`: the others' peers have it as a second address then)."""
        out = []
        for i, lab in enumerate(self.labs[:agents]):
            src = self.labs[0].peer_v4 if from_client and i else None
            out.append(Target(f"db-{i}", lab.peer_ns, lab.host_v4, src))
        return out

    def alias_client_address(self, agents: int) -> None:
        """Lab 0's peer IPv4 address on every other lab's peer end, with a route back in its
        host namespace: their probes then come from the client agent's address."""
        addr = self.labs[0].peer_v4
        for lab in self.labs[1:agents]:
            for argv in (
                ["ip", "-n", lab.peer_ns, "addr", "add", f"{addr}/32", "dev", lab.peer_if],
                ["ip", "-n", lab.host_ns, "route", "add", f"{addr}/32", "dev", lab.host_if],
            ):
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                if proc.returncode != 0:
                    raise BenchError(f"{' '.join(argv)}: {proc.stderr.strip()}")
            self.aliases.append((lab, addr))

    # -- publishing --

    async def publish(self, doc: dict[str, Any]) -> tuple[int, float, float]:
        """(generation, monotonic time publish() returned, seconds it took)."""
        t = time.monotonic()
        rec = await self.writer.publish(doc, base=None, actor="bench")
        done = time.monotonic()
        return rec.generation, done, done - t

    async def change(
        self, targets: list[Target], doc: dict[str, Any], want: bool
    ) -> dict[str, Any]:
        gen, t0, pub_s = await self.publish(doc)
        per = await asyncio.to_thread(probe_until, targets, want, t0)
        return {"generation": gen, "publish_s": round(pub_s, 3), "per_lab_s": per,
                "converged_s": max(per.values())}  # fmt: skip

    async def one_rule_row(self, count: int) -> dict[str, Any]:
        targets = self.targets(count)
        # Where the last row left it: the deny in place or not; make sure every lab agrees.
        now = await asyncio.to_thread(probe_until, targets, not self.deny, time.monotonic())
        del now
        times: list[float] = []
        publish: list[float] = []
        own: list[float] = []
        for i in range(self.s.changes):
            self.deny = not self.deny
            self.progress(
                f"fleet: {count} agent(s): change {i + 1}/{self.s.changes}"
                f" ({'add' if self.deny else 'remove'} the deny) ..."
            )
            c = await self.change(targets, one_rule_doc(self.base, self.deny), not self.deny)
            times.append(c["converged_s"])
            publish.append(c["publish_s"])
            own.extend(self._own(c["generation"], count))
            await asyncio.sleep(SETTLE_S)
        return {
            "agents": count,
            "start_s": self.start_s.get(count),
            "convergence": summary(times),
            "convergence_s": [round(t, 4) for t in times],
            "publish": summary(publish),
            "agent_reported": summary(own),
            "rss": _rss(self.agents[:count]),
        }

    def _own(self, gen: int, count: int, timeout: float = 10.0) -> list[float]:
        """Each agent's own "enforced (X s after its publication)" for `gen` (waits a little
        for the log line)."""
        deadline = time.monotonic() + timeout
        while True:
            got = [a.enforced().get(gen) for a in self.agents[:count]]
            if all(g is not None for g in got) or time.monotonic() > deadline:
                return [g for g in got if g is not None]
            time.sleep(0.05)

    async def big_row(self) -> dict[str, Any]:
        from bench.rulesets import palette_policy

        n = self.s.big_agents
        targets = self.targets(n)
        self.progress(f"fleet: building {self.s.big_rules:,} palette rules ...")
        big = palette_policy(self.s.big_rules, self.s.seed + 1)["policies"]
        runs = []
        for run in range(self.s.big_runs):
            # From the small set with the deny: the big set opens PORT (run 0), or from the
            # big set without it the big set with it closes PORT (run 1), and so on.
            if run == 0 and not self.deny:
                self.deny = True
                await self.change(targets, one_rule_doc(self.base, True), False)
            self.deny = not self.deny
            self.progress(
                f"fleet: {n} agent(s): {self.s.big_rules:,} rules, run {run + 1}/{self.s.big_runs}"
                " ..."
            )
            cpu0 = sum(a.cpu_s() for a in self.agents[:n])
            c = await self.change(targets, one_rule_doc(big, self.deny), not self.deny)
            own = self._own(c["generation"], n, timeout=60)
            cpu = sum(a.cpu_s() for a in self.agents[:n]) - cpu0
            runs.append({
                "converged_s": round(c["converged_s"], 3),
                "publish_s": c["publish_s"],
                "per_lab_s": {k: round(v, 3) for k, v in sorted(c["per_lab_s"].items())},
                "agent_reported_s": [round(x, 3) for x in own],
                "agents_cpu_s": round(cpu, 1),
            })  # fmt: skip
        rss = _rss(self.agents[:n])
        return {
            "agents": n,
            "rules": self.s.big_rules + 1 + (1 if self.deny else 0),
            "runs": runs,
            "converged_s": max(r["converged_s"] for r in runs),
            "rss": rss,
        }

    async def _client_records(self, host: str) -> list[tuple[int, bool]]:
        """(Kafka timestamp ms, tombstone) of every record of `host` on the agents topic."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.broker.bootstrap, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest",
        )  # fmt: skip
        out: list[tuple[int, bool]] = []
        try:
            async with asyncio.timeout(30):
                await consumer.start()
                tp = TopicPartition(self.agents_topic, 0)
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                end = (await consumer.end_offsets([tp]))[tp]
                while await consumer.position(tp) < end:
                    batch = await consumer.getmany(tp, timeout_ms=500)
                    for msg in batch.get(tp, []):
                        if msg.key == host.encode():
                            out.append((msg.timestamp, msg.value is None))
        except TimeoutError:
            raise BenchError("reading the agents topic took more than 30 s") from None
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
        return out

    async def group_row(self) -> dict[str, Any]:
        n = self.s.group_agents
        self.alias_client_address(n)
        targets = self.targets(n, from_client=True)
        self.progress(f"fleet: {n} agent(s): the label-group set ...")
        await self.change(targets, group_doc(self.base), False)
        joins: list[float] = []
        leaves: list[float] = []
        joins_start: list[float] = []
        leaves_signal: list[float] = []
        client: FleetAgent | None = None
        for i in range(self.s.group_changes):
            if client is None:
                self.progress(f"fleet: group change {i + 1}/{self.s.group_changes} (join) ...")
                client = FleetAgent(
                    self.labs[0], f"client-{i}", {"role": "client"}, "peer", self.workdir,
                    self.fleet_args(),
                )  # fmt: skip
                self.clients.append(client)
                t0 = time.monotonic()
                wall0 = time.time()
                client.launch()
                per = await asyncio.to_thread(probe_until, targets, True, t0)
                done_wall = wall0 + max(per.values())
                recs = await self._client_records(client.host)
                first = next((ts for ts, tomb in recs if not tomb), None)
                if first is None:
                    raise BenchError(f"{client.host} joined but has no status record")
                joins.append(done_wall - first / 1000)
                joins_start.append(max(per.values()))
            else:
                self.progress(f"fleet: group change {i + 1}/{self.s.group_changes} (leave) ...")
                t0 = time.monotonic()
                wall0 = time.time()
                assert client.proc is not None
                client.proc.send_signal(signal.SIGTERM)
                per = await asyncio.to_thread(probe_until, targets, False, t0)
                done_wall = wall0 + max(per.values())
                client.stop()
                recs = await self._client_records(client.host)
                tomb = next((ts for ts, tomb in recs if tomb), None)
                if tomb is None:
                    raise BenchError(f"{client.host} left but wrote no tombstone")
                leaves.append(done_wall - tomb / 1000)
                leaves_signal.append(max(per.values()))
                # pyroute2 must not see our running loop: detach from a thread.
                await asyncio.to_thread(client.cleanup)
                client = None
            await asyncio.sleep(SETTLE_S)
        if client is not None:
            client.stop()
            await asyncio.to_thread(client.cleanup)
        return {
            "agents": n,
            "join_from_status": summary(joins),
            "join_from_start": summary(joins_start),
            "leave_from_tombstone": summary(leaves),
            "leave_from_sigterm": summary(leaves_signal),
        }

    async def run(self) -> dict[str, Any]:
        try:
            return await self._run()
        except BaseException:
            _STOP.set()
            raise

    async def _run(self) -> dict[str, Any]:
        from streamer.fleet.topic import PolicyWriter

        async with PolicyWriter(
            self.broker.bootstrap, self.policy_topic, agents_topic=self.agents_topic
        ) as writer:
            self.writer = writer
            await self.publish(one_rule_doc(self.base, self.deny))
            rows = []
            for count in self.s.counts:
                self.progress(f"fleet: starting agents up to {count} ...")
                await asyncio.to_thread(self.grow, count)
                rows.append(await self.one_rule_row(count))
            # The big and group rows on the first agents only: stop the others cleanly.
            keep = max(self.s.big_agents, self.s.group_agents)
            for a in self.agents[keep:]:
                a.stop()
            big = await self.big_row()
            group = await self.group_row()
        return {"rows": rows, "big": big, "group": group}


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    at10 = next((r for r in res["rows"] if r["agents"] == 10), None)
    row = at10 or res["rows"][-1]
    p99 = row["convergence"]["p99_ms"]
    big = res["big"]
    small_rss = max(r["rss"]["max_mib"] for r in res["rows"])
    return [
        {
            "target": f"one-rule change, p99 at {row['agents']} agents (s)",
            "goal": f"<= {TARGET_P99_S:g}",
            "value": p99 / 1000 if p99 is not None else None,
            "met": p99 is not None and p99 / 1000 <= TARGET_P99_S,
        },
        {
            "target": f"{big['rules']:,} rules to {big['agents']} agents (s)",
            "goal": f"<= {TARGET_BIG_S:g}",
            "value": big["converged_s"],
            "met": big["converged_s"] <= TARGET_BIG_S,
        },
        {
            "target": f"RSS per agent, max, {BASE_RULES + 2}-rule set (MiB)",
            "goal": f"<= {TARGET_RSS_MIB:g}",
            "value": small_rss,
            "met": small_rss <= TARGET_RSS_MIB,
        },
        {
            "target": f"RSS per agent, max, {big['rules']:,} rules (MiB)",
            "goal": f"<= {TARGET_RSS_MIB:g}",
            "value": big["rss"]["max_mib"],
            "met": big["rss"]["max_mib"] <= TARGET_RSS_MIB,
        },
    ]


def run_fleet_bench(settings: FleetSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run the benchmark; the results dict (the JSON "fleet" section). BenchError when it
    cannot run or a verdict never changed."""
    from pyroute2 import config as pyroute2_config

    from bench.kafkabroker import KafkaError
    from streamer.fleet.topic import FleetError, StaleError
    from streamer.lab.netns import LabError

    # pyroute2's netns helpers must not run our SIGTERM handler (see bench.api).
    pyroute2_config.disable_mp_signal = True
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    _STOP.clear()
    bench = FleetBench(settings, progress)
    try:
        bench.start_broker()
        res = asyncio.run(bench.run())
    except BenchError as e:
        logs = "\n".join(f"--- {a.host}:\n{a.log(8)}" for a in bench.agents[:3])
        raise BenchError(f"{e}\n{logs}") from e
    except (KafkaError, FleetError, StaleError, LabError) as e:
        raise BenchError(str(e)) from e
    finally:
        bench.close()
    res["meta"] = {
        "quick": settings.quick,
        "counts": list(settings.counts),
        "changes": settings.changes,
        "base_rules": BASE_RULES + 2,
        "big_rules": settings.big_rules,
        "heartbeat_s": HEARTBEAT_S,
        "probe_every_ms": PROBE_EVERY_S * 1000,
        "probe_wait_ms": PROBE_WAIT_S * 1000,
        "cpus": os.cpu_count(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    res["targets"] = _targets(res)
    return res


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def render_fleet(res: dict[str, Any]) -> str:
    """The plain-text table of `run_fleet_bench`'s results."""
    m = res["meta"]
    lines = [
        "microseg fleet benchmarks",
        "PolicyWriter.publish() returning -> every agent enforcing, read by packets (a TCP"
        f" connect every {m['probe_every_ms']:g} ms",
        f"per lab, {m['probe_wait_ms']:g} ms to answer); one broker, one lab per agent,"
        f" {m['cpus']} CPUs, load {m['load_before']:g} before",
        "",
        f"One-rule change ({m['changes']} changes, a deny added/removed in a"
        f" {m['base_rules']}-rule set)",
        f"{'agents':>6} {'start s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}"
        f" {'publish p50':>11} {'agent-own p50/p99':>17} {'RSS max/median MiB':>19}",
    ]
    for r in res["rows"]:
        c, p, o, rss = r["convergence"], r["publish"], r["agent_reported"], r["rss"]
        lines.append(
            f"{r['agents']:>6} {r['start_s'] or 0:>8.1f} {_ms(c['p50_ms']):>7}"
            f" {_ms(c['p99_ms']):>7} {_ms(c['max_ms']):>7} {_ms(p['p50_ms']):>11}"
            f" {_ms(o['p50_ms']) + ' / ' + _ms(o['p99_ms']):>17}"
            f" {rss['max_mib']:>10.0f} / {rss['median_mib']:<6.0f}"
        )
    b = res["big"]
    lines += ["", f"{b['rules']:,} rules to {b['agents']} agent(s)"]
    for i, run in enumerate(b["runs"]):
        own = run["agent_reported_s"]
        lines.append(
            f"  run {i + 1}: every agent enforcing {run['converged_s']:.2f} s after publish()"
            f" returned (publish {run['publish_s']:.2f} s); agents' own"
            f" {min(own, default=0):.2f}-{max(own, default=0):.2f} s after publication;"
            f" the agents' CPU {run.get('agents_cpu_s', 0):.1f} s in all"
        )
    lines.append(f"  RSS max {b['rss']['max_mib']:.0f} MiB, median {b['rss']['median_mib']:.0f}")
    g = res["group"]
    lines += [
        "",
        f"Label-group change at {g['agents']} agents (client agent joins/leaves a select group;"
        " p50 / max ms)",
        f"  join:  from its first status record {_ms(g['join_from_status']['p50_ms'])} /"
        f" {_ms(g['join_from_status']['max_ms'])}; from its process start"
        f" {_ms(g['join_from_start']['p50_ms'])} / {_ms(g['join_from_start']['max_ms'])}",
        f"  leave: from its tombstone {_ms(g['leave_from_tombstone']['p50_ms'])} /"
        f" {_ms(g['leave_from_tombstone']['max_ms'])}; from its SIGTERM"
        f" {_ms(g['leave_from_sigterm']['p50_ms'])} / {_ms(g['leave_from_sigterm']['max_ms'])}",
        "",
        f"Targets (informational; {m['elapsed_s']:.0f} s in all)",
    ]
    for t in res["targets"]:
        v = t["value"]
        shown = "-" if v is None else f"{v:,.2f}"
        lines.append(
            f"  {t['target']:<45} {t['goal']:>8}  {shown:>9}  {'met' if t['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


__all__ = [
    "FULL_FLEET",
    "QUICK_FLEET",
    "FleetSettings",
    "render_fleet",
    "run_fleet_bench",
    "settings_for",
]
