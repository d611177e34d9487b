"""The agent (`microseg run`) as a real process, judged by real traffic across the lab's veth.

Every test starts its own agent (own pin instance, own events file) on the module's lab, with a
policy file written from the lab's addresses, and sends TCP, UDP and ICMP over IPv4 and IPv6
from the peer namespace to echo servers in the host namespace (the agent's side) or back.
"ingress" is peer -> host as the packet crosses the host's interface.

Probes that must fail wait out a short timeout; they run concurrently, so a whole table of
expectations costs about one timeout.

Two tests run the agent in this process instead, to see its classifier released (closed) on
the ways out that end no process: a start that fails after loading, and a task that crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import config as pyroute2_config
from support.agentproc import (
    AgentFactory,
    AgentProcess,
    rule,
    unique_agent_instance,
    write_policy,
)
from support.netutil import (
    FAMILIES,
    NEG_TIMEOUT,
    DeniedHammer,
    TcpConn,
    echo_server,
    host,
    ns_run,
    peer,
    ping,
    tcp_attempt,
    tcp_exchange,
    udp_echo_server,
    udp_exchange,
    wait_until,
)

import streamer.agent.service as agent_service
from streamer.agent.service import Agent, AgentConfig
from streamer.datapath.attach import detach, tcx_programs
from streamer.datapath.config import DatapathConfig
from streamer.events.pipeline import Pipeline
from streamer.lab.lab import Lab

# ---- probes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One attempt from netns `src_ns` to `dst`: "tcp" (connect + echo), "udp" (echo), "ping"."""

    kind: str
    src_ns: str
    dst: str
    port: int = 0

    def __call__(self, timeout: float) -> bool:
        if self.kind == "tcp":
            return tcp_exchange(self.src_ns, self.dst, self.port, timeout)
        if self.kind == "udp":
            return udp_exchange(self.src_ns, self.dst, self.port, timeout)
        if self.kind == "ping":
            return ping(self.src_ns, self.dst, timeout)
        raise ValueError(f"unknown probe kind {self.kind!r}")

    def __str__(self) -> str:
        port = f" port {self.port}" if self.kind != "ping" else ""
        return f"{self.kind} {self.src_ns} -> {self.dst}{port}"


def probe_all(probes: Iterable[Probe], timeout: float = NEG_TIMEOUT) -> dict[Probe, bool]:
    """Run `probes` concurrently; what each returned."""
    todo = list(dict.fromkeys(probes))
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(todo)))) as ex:
        return dict(zip(todo, ex.map(lambda p: p(timeout), todo), strict=True))


def expect(table: dict[Probe, bool], timeout: float = NEG_TIMEOUT) -> None:
    """Assert every probe passes (True) or is blocked (False) as `table` says."""
    got = probe_all(table, timeout)
    wrong = [
        f"  {p}: expected {'pass' if want else 'blocked'}, got {'pass' if got[p] else 'blocked'}"
        for p, want in table.items()
        if got[p] != want
    ]
    assert not wrong, "traffic not as the policy says:\n" + "\n".join(wrong)


def tc_filters(lab: Lab, hook: str) -> str:
    """`tc filter show` of the lab's host interface at clsact `hook` (ingress/egress)."""
    return ns_run(None, "tc", "-n", lab.host_ns, "filter", "show", "dev", lab.host_if, hook).stdout


def hook_programs(lab: Lab) -> dict[str, list[tuple[int, str]]]:
    """(id, name) of the programs on the lab host interface's hooks: tcx links (from the
    kernel's BPF_PROG_QUERY) and then clsact filters (from `tc filter show`)."""
    out = tcx_programs(lab.host_if, lab.host_ns)
    for hook in out:
        out[hook] += [
            (int(m[2]), m[1])
            for m in re.finditer(r"\b(ms_\w+) .*?\bid (\d+)", tc_filters(lab, hook))
        ]
    return out


def ours_attached(lab: Lab) -> dict[str, bool]:
    """Whether our program (ms_<hook>) sits on each hook, as a tcx link or a clsact filter."""
    return {
        hook: any(name == f"ms_{hook}" for _, name in progs)
        for hook, progs in hook_programs(lab).items()
    }


def our_prog_ids(lab: Lab) -> dict[str, list[int]]:
    """Ids of our programs on each hook (exactly one each while attached)."""
    return {
        hook: [pid for pid, name in progs if name.startswith("ms_")]
        for hook, progs in hook_programs(lab).items()
    }


def start(
    agent_factory: AgentFactory,
    lab: Lab,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    default: str = "deny",
    **kwargs: Any,
) -> AgentProcess:
    policy = write_policy(tmp_path / "policy.json", rules, default)
    return agent_factory(lab, policy, **kwargs).start()


# ---- 1. verdicts as the policy says -------------------------------------------------------

HOST_TCP = (22, 80, 81, 7999, 8000, 8005, 8010, 8011, 9000)
HOST_UDP = (53, 54, 80, 4999, 5000, 5010, 5011)


def _default_deny(lab: Lab) -> tuple[list[dict[str, Any]], dict[Probe, bool]]:
    rules = [
        rule(10, "tcp", "allow", dst_port=80, direction="ingress"),
        rule(11, "tcp", "allow", dst_port="8000-8010", direction="ingress"),
        rule(12, "udp", "allow", dst_port=53, direction="ingress"),
        rule(13, "icmp", "allow", direction="ingress"),  # IPv4 ping only: no icmpv6 rule
    ]
    table: dict[Probe, bool] = {}
    for fam in FAMILIES:
        h, p = host(lab, fam), peer(lab, fam)
        for port, ok in (
            (80, True),
            (81, False),
            (7999, False),
            (8000, True),
            (8005, True),
            (8010, True),
            (8011, False),
            (22, False),
        ):
            table[Probe("tcp", lab.peer_ns, h, port)] = ok
        for port, ok in ((53, True), (54, False), (80, False)):  # rule 10 is tcp only
            table[Probe("udp", lab.peer_ns, h, port)] = ok
        table[Probe("ping", lab.peer_ns, h)] = fam == "v4"
        # The rules are ingress only: the host may not open anything towards the peer.
        table[Probe("tcp", lab.host_ns, p, 80)] = False
        table[Probe("udp", lab.host_ns, p, 53)] = False
        table[Probe("ping", lab.host_ns, p)] = False
    return rules, table


def _default_allow(lab: Lab) -> tuple[list[dict[str, Any]], dict[Probe, bool]]:
    rules = [
        rule(20, "tcp", "deny", dst_port=22),
        rule(21, "udp", "deny", dst_port="5000-5010"),
        rule(22, "icmpv6", "deny"),
        # A family-specific address is met only by that family: IPv6 to 9000 stays allowed.
        rule(23, "tcp", "deny", src_ip=f"{lab.peer_v4}/32", dst_port=9000),
    ]
    table: dict[Probe, bool] = {}
    for fam in FAMILIES:
        h, p = host(lab, fam), peer(lab, fam)
        for port, ok in ((22, False), (80, True), (9000, fam == "v6")):
            table[Probe("tcp", lab.peer_ns, h, port)] = ok
        for port, ok in ((4999, True), (5000, False), (5010, False), (5011, True), (53, True)):
            table[Probe("udp", lab.peer_ns, h, port)] = ok
        table[Probe("ping", lab.peer_ns, h)] = fam == "v4"
        table[Probe("ping", lab.host_ns, p)] = fam == "v4"
        table[Probe("tcp", lab.host_ns, p, 80)] = True
        table[Probe("tcp", lab.host_ns, p, 22)] = False  # direction any: egress too
    return rules, table


@pytest.mark.parametrize("policy", [_default_deny, _default_allow], ids=["deny", "allow"])
def test_traffic_as_policy_says(
    module_lab: Lab,
    agent_factory: AgentFactory,
    tmp_path: Path,
    policy: Callable[[Lab], tuple[list[dict[str, Any]], dict[Probe, bool]]],
) -> None:
    lab = module_lab
    rules, table = policy(lab)
    default = "deny" if policy is _default_deny else "allow"
    with (
        echo_server(lab.host_ns, HOST_TCP, HOST_UDP),
        echo_server(lab.peer_ns, (22, 80), (53,)),
    ):
        # Without the agent everything passes: the blocked probes below are the policy's doing.
        expect(dict.fromkeys(table, True), timeout=2.0)
        agent = start(agent_factory, lab, tmp_path, rules, default)
        expect(table)
        assert agent.stop() == 0


# ---- 2. replies under default deny --------------------------------------------------------


def test_replies_pass_under_default_deny(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    rules = [
        rule(
            30 + i,
            "tcp",
            "allow",
            src_ip=peer(lab, fam),
            dst_ip=host(lab, fam),
            dst_port=80,
            direction="ingress",
        )
        for i, fam in enumerate(FAMILIES)
    ]
    with echo_server(lab.host_ns, (80, 81)), echo_server(lab.peer_ns, (80,)):
        agent = start(agent_factory, lab, tmp_path, rules)
        table: dict[Probe, bool] = {}
        for fam in FAMILIES:
            # The SYN-ACK and the echo leave on egress, where no rule allows anything.
            table[Probe("tcp", lab.peer_ns, host(lab, fam), 80)] = True
            table[Probe("tcp", lab.peer_ns, host(lab, fam), 81)] = False
            table[Probe("tcp", lab.host_ns, peer(lab, fam), 80)] = False
        expect(table)
        # Not just the handshake: a long conversation keeps passing in both directions.
        for fam in FAMILIES:
            with TcpConn(lab.peer_ns, host(lab, fam), 80) as conn:
                assert all(conn.exchange() for _ in range(20)), f"{fam}: exchange failed"
        assert agent.stop() == 0


# ---- 3. a policy change cuts a live connection ----------------------------------------------


def test_policy_change_cuts_live_connection(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    allow_both = [
        rule(40, "tcp", "allow", dst_port=80, direction="ingress"),
        rule(41, "tcp", "allow", dst_port=8080, direction="ingress"),
    ]
    with echo_server(lab.host_ns, (80, 8080)):
        agent = start(agent_factory, lab, tmp_path, allow_both)
        cut = {fam: TcpConn(lab.peer_ns, host(lab, fam), 80) for fam in FAMILIES}
        kept = {fam: TcpConn(lab.peer_ns, host(lab, fam), 8080) for fam in FAMILIES}
        cut_ports = {c.sock.getsockname()[1] for c in cut.values()}
        try:
            for fam in FAMILIES:
                assert cut[fam].exchange() and kept[fam].exchange(), f"{fam}: before the change"
            write_policy(
                agent.policy_file,
                [
                    rule(41, "tcp", "allow", dst_port=8080, direction="ingress"),
                    rule(42, "tcp", "deny", dst_port=80, priority=200),
                ],
            )
            line = agent.reload()
            assert "policy generation 2 applied" in line
            for fam in FAMILIES:
                assert not cut[fam].exchange(NEG_TIMEOUT), f"{fam}: denied connection still live"
                assert kept[fam].exchange(), f"{fam}: a still-allowed connection was cut"
            expect({Probe("tcp", lab.peer_ns, host(lab, fam), 80): False for fam in FAMILIES})
        finally:
            for conn in (*cut.values(), *kept.values()):
                conn.close()

        # The cut shows up as a deny event of the new generation for each established flow.
        def cut_events() -> list[dict[str, Any]]:
            return [
                e
                for e in agent.events()
                if e["src_port"] in cut_ports
                and e["verdict"] == "deny"
                and e["policy_generation"] == 2
                and (e["rule"] or {}).get("rule_id") == 42
            ]

        assert wait_until(lambda: len({e["src_port"] for e in cut_events()}) == 2, timeout=5), (
            cut_ports,
            agent.events(),
        )
        assert all(e["direction"] == "ingress" and e["dst_port"] == 80 for e in cut_events())
        assert agent.stop() == 0


# ---- 4. a bad file on SIGHUP keeps the live set -----------------------------------------------


def test_bad_reload_keeps_live_set(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    web = rule(50, "tcp", "allow", dst_port=80, direction="ingress")
    alt = rule(51, "tcp", "allow", dst_port=8080, direction="ingress")
    before: dict[Probe, bool] = {}
    for fam in FAMILIES:
        before[Probe("tcp", lab.peer_ns, host(lab, fam), 80)] = True
        before[Probe("tcp", lab.peer_ns, host(lab, fam), 8080)] = False
    after = {p: True for p in before}
    with echo_server(lab.host_ns, (80, 8080)):
        agent = start(agent_factory, lab, tmp_path, [web])
        expect(before)
        policy = agent.policy_file
        bad_files: dict[str, Callable[[], object]] = {
            # One valid rule next to an invalid one: the valid one must not be applied either.
            "invalid rule": lambda: write_policy(
                policy, [web, alt, rule(52, "icmp", "allow", dst_port=5)]
            ),
            "duplicate rule_id": lambda: write_policy(policy, [web, alt, {**alt, "name": "x"}]),
            "not JSON": lambda: policy.write_text('{"policies": [ {"rule_id": 51,'),
            "missing file": lambda: policy.unlink(),
        }
        for what, make_bad in bad_files.items():
            make_bad()
            line = agent.reload(expect_applied=False)
            assert "generation 1 stays" in line, f"{what}: {line}"
            expect(before)
        assert "policy generation 2" not in agent.log
        # The agent is not stuck: a good file is applied at the next SIGHUP.
        write_policy(policy, [web, alt])
        assert "policy generation 2 applied" in agent.reload()
        expect(after)
        assert agent.stop() == 0


# ---- 5. kill -9 keeps enforcing; a restart adopts ---------------------------------------------


def test_kill9_keeps_enforcing_and_restart_adopts(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    rules = [
        rule(60, "tcp", "allow", dst_port=80, direction="ingress"),
        rule(61, "udp", "allow", dst_port=53, direction="ingress"),
    ]
    table: dict[Probe, bool] = {}
    for fam in FAMILIES:
        table[Probe("tcp", lab.peer_ns, host(lab, fam), 80)] = True
        table[Probe("udp", lab.peer_ns, host(lab, fam), 53)] = True
        table[Probe("udp", lab.peer_ns, host(lab, fam), 5353)] = False
        table[Probe("tcp", lab.peer_ns, host(lab, fam), 81)] = False
    with (
        echo_server(lab.host_ns, (80, 81), (53,)),
        udp_echo_server(lab.host_ns, 5353) as denied_srv,
    ):
        agent = start(agent_factory, lab, tmp_path, rules)
        conns = {fam: TcpConn(lab.peer_ns, host(lab, fam), 80) for fam in FAMILIES}
        try:
            expect(table)
            first_ids = our_prog_ids(lab)
            agent.kill9()
            assert ours_attached(lab) == {"ingress": True, "egress": True}, tc_filters(
                lab, "ingress"
            )
            assert agent.pin_dir.is_dir()
            expect(table)
            for fam, conn in conns.items():
                assert conn.exchange(), f"{fam}: live connection broke when the agent died"

            seen = denied_srv.udp_datagrams
            hammer = DeniedHammer(lab.peer_ns, [lab.host_v4, lab.host_v6], 5353)
            hammer.start()
            try:
                t0 = time.monotonic()
                agent.start()
                restart_s = time.monotonic() - t0
                time.sleep(0.3)  # and a little while after the new filters are in
            finally:
                hammer.finish()
            assert not hammer.echoes, f"denied port answered during the restart: {hammer.echoes}"
            assert denied_srv.udp_datagrams == seen, "a denied datagram reached the server"
            # The loop must really have covered the restart (~20 ms per attempt).
            assert hammer.attempts >= min(50, restart_s / 0.05), (hammer.attempts, restart_s)

            agent.wait_log(r"adopted pinned state: generation 1, 2 rules", timeout=1)
            # The state dir holds generation 1 and the pinned maps enforce it: kept as is.
            agent.wait_log(r"restoring 2 rules at generation 1", timeout=1)
            agent.wait_log(r"policy generation 1 kept", timeout=1)
            assert ours_attached(lab) == {"ingress": True, "egress": True}
            # Replaced in place: one filter per hook, now running the new agent's programs.
            new_ids = our_prog_ids(lab)
            assert all(len(ids) == 1 for ids in (*first_ids.values(), *new_ids.values()))
            assert all(new_ids[h] != first_ids[h] for h in new_ids), (first_ids, new_ids)
            expect(table)
            for fam, conn in conns.items():
                assert conn.exchange(), f"{fam}: live connection broke across the restart"
        finally:
            for conn in conns.values():
                conn.close()
        assert agent.stop() == 0
        assert ours_attached(lab) == {"ingress": False, "egress": False}


# ---- 6. clean exit detaches (or not, with --keep-on-exit) --------------------------------------


@pytest.mark.parametrize("mode", ["auto", "tc"])
def test_clean_exit_detaches(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path, mode: str
) -> None:
    """auto: tcx links (this kernel has tcx), no qdisc; tc: clsact filters, and the clsact
    qdisc the agent created. Either way a clean exit removes all of it."""
    lab = module_lab
    denied = {Probe("tcp", lab.peer_ns, host(lab, fam), 81): False for fam in FAMILIES}

    def qdiscs() -> str:
        return ns_run(None, "tc", "-n", lab.host_ns, "qdisc", "show").stdout

    with echo_server(lab.host_ns, (80, 81)):
        agent = start(
            agent_factory,
            lab,
            tmp_path,
            [rule(70, "tcp", "allow", dst_port=80)],
            extra_args=["--attach-mode", mode],
        )
        assert ours_attached(lab) == {"ingress": True, "egress": True}
        tcx = tcx_programs(lab.host_if, lab.host_ns)
        # the log line and the attachments record name what was attached, not the mode asked
        attached = "tcx" if mode == "auto" else "tc"
        agent.wait_log(
            rf"enforcing on {lab.host_if} in netns \S+ \("
            + ("tcx link" if attached == "tcx" else "clsact filter")
            + r"\)",
            timeout=1,
        )
        record = json.loads((agent.run_dir / "attachments.json").read_text())
        assert record[f"{lab.host_ns}/{lab.host_if}"]["mode"] == attached, record
        if mode == "auto":
            assert [n for _, n in tcx["ingress"]] == ["ms_ingress"], tcx
            assert "clsact" not in qdiscs() and tc_filters(lab, "ingress").strip() == ""
        else:
            assert tcx == {"ingress": [], "egress": []}
            assert "clsact" in qdiscs() and "handle 0x4d53" in tc_filters(lab, "ingress")
        expect(denied)
        assert agent.stop() == 0
        agent.wait_log(r"detached from", timeout=1)
        assert hook_programs(lab) == {"ingress": [], "egress": []}
        for hook in ("ingress", "egress"):
            assert tc_filters(lab, hook).strip() == "", f"{hook}: {tc_filters(lab, hook)}"
        # Any clsact qdisc was the agent's, so it removes it too.
        assert "clsact" not in qdiscs()
        assert not agent.pin_dir.exists(), list(agent.pin_dir.rglob("*"))
        assert not agent.run_dir.exists(), list(agent.run_dir.rglob("*"))
        expect({p: True for p in denied}, timeout=2.0)


def test_keep_on_exit_then_detach(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    denied = {Probe("tcp", lab.peer_ns, host(lab, fam), 81): False for fam in FAMILIES}
    with echo_server(lab.host_ns, (80, 81)):
        agent = start(
            agent_factory,
            lab,
            tmp_path,
            [rule(71, "tcp", "allow", dst_port=80)],
            keep_on_exit=True,
        )
        assert agent.stop() == 0
        agent.wait_log(rf"{lab.host_if} \(tcx links\) stay attached", timeout=1)
        assert ours_attached(lab) == {"ingress": True, "egress": True}
        assert agent.pin_dir.is_dir()
        expect(denied)  # still enforcing without a process
        cli = [
            sys.executable,
            "-m",
            "streamer",
            "detach",
            "--netns",
            lab.host_ns,
            "--iface",
            lab.host_if,
        ]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert f"{lab.host_if}: removed" in done.stdout, done.stdout
        assert ours_attached(lab) == {"ingress": False, "egress": False}
        expect({p: True for p in denied}, timeout=2.0)
        # Detaching again is not an error: there is just nothing to remove.
        again = subprocess.run(cli, capture_output=True, text=True, timeout=30)
        assert again.returncode == 0, again.stderr
        assert "nothing" in again.stdout, again.stdout


# ---- 7. flow events ---------------------------------------------------------------------------

TIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


def _event_ns(ev: dict[str, Any]) -> int:
    dt = datetime.strptime(ev["time"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000 + int(ev["time"][20:29])


def test_events_file(module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path) -> None:
    lab = module_lab
    rules = [
        rule(80, "tcp", "allow", dst_port=80, direction="ingress"),
        {**rule(81, "tcp", "log", dst_port=5432, direction="ingress"), "name": "audit-pg"},
        {**rule(82, "tcp", "deny", dst_port=22, priority=200), "name": "no-ssh"},
    ]
    interval = 0.5
    with echo_server(lab.host_ns, (22, 80, 81, 5432)):
        agent = start(agent_factory, lab, tmp_path, rules, event_interval=interval)
        t_start = time.time()
        flows: dict[tuple[str, int], tuple[str, int | None, str | None]] = {}
        allowed_ports: list[int] = []
        for fam in FAMILIES:
            h = host(lab, fam)
            ok, sport = tcp_attempt(lab.peer_ns, h, 80, 2.0)
            assert ok, f"{fam}: allowed connection failed"
            allowed_ports.append(sport)
            ok, sport = tcp_attempt(lab.peer_ns, h, 22, NEG_TIMEOUT)
            assert not ok
            flows[(fam, sport)] = ("deny", 82, "no-ssh")
            ok, sport = tcp_attempt(lab.peer_ns, h, 81, NEG_TIMEOUT)
            assert not ok
            flows[(fam, sport)] = ("deny", None, None)  # the default decided
        # A logged connection that keeps talking: a "new" event, then at most one per interval.
        logged: dict[str, int] = {}
        conns = [TcpConn(lab.peer_ns, host(lab, fam), 5432) for fam in FAMILIES]
        try:
            for fam, conn in zip(FAMILIES, conns, strict=True):
                logged[fam] = conn.sock.getsockname()[1]
                flows[(fam, logged[fam])] = ("log", 81, "audit-pg")
            t_talk = time.monotonic()
            for _ in range(16):
                assert all(c.exchange() for c in conns), "logged connection failed"
                time.sleep(0.1)
            talk_s = time.monotonic() - t_talk
        finally:
            for conn in conns:
                conn.close()

        def flow_events() -> dict[tuple[str, int], list[dict[str, Any]]]:
            out: dict[tuple[str, int], list[dict[str, Any]]] = {k: [] for k in flows}
            for ev in agent.events():
                fam = "v6" if ":" in ev["src_ip"] else "v4"
                if (fam, ev["src_port"]) in out:
                    out[(fam, ev["src_port"])].append(ev)
            return out

        assert wait_until(lambda: all(flow_events().values()), timeout=5), (
            f"missing events; got {agent.events()}"
        )
        time.sleep(0.5)  # let late ones (e.g. the logged flow's FIN) land
        events = agent.events()
        by_flow = flow_events()

    seqs = [e["seq"] for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"seq not increasing by 1: {seqs}"
    for ev in events:
        assert ev["schema"] == "microseg.flow/v1"
        assert TIME_RE.match(ev["time"]), ev["time"]
        assert abs(_event_ns(ev) / 1e9 - t_start) < 60, ev["time"]
        assert ev["iface"] == lab.host_if
        assert ev["policy_generation"] == 1
        assert ev["packets"] >= 1 and ev["bytes"] >= 40 * ev["packets"], ev
    # Allowed flows are never reported.
    assert not [e for e in events if e["verdict"] == "allow" or e["dst_port"] == 80], events
    for port in allowed_ports:
        assert not [e for e in events if e["src_port"] == port], f"allowed flow {port}"

    for (fam, sport), (verdict, rule_id, name) in flows.items():
        evs = by_flow[(fam, sport)]
        first = evs[0]
        want = {
            "direction": "ingress",
            "verdict": verdict,
            "protocol": "tcp",
            "src_ip": peer(lab, fam),
            "dst_ip": host(lab, fam),
            "src_port": sport,
            "kind": "new",
            "tcp_flags": "SYN",
            "packets": 1,
        }
        assert {k: first[k] for k in want} == want, first
        assert first["dst_port"] in (22, 81, 5432)
        if rule_id is None:
            assert first["rule"] is None, first
        else:
            r = first["rule"]
            assert (r["rule_id"], r["name"], r["action"]) == (rule_id, name, verdict), r
            assert r["priority"] == (200 if rule_id == 82 else 100), r
        assert all(e["direction"] == "ingress" and e["verdict"] == verdict for e in evs), evs

    for fam in FAMILIES:
        evs = by_flow[(fam, logged[fam])]
        updates = evs[1:]
        assert all(e["kind"] == "update" for e in updates), evs
        # ~16 round trips over `talk_s`: at least one update, and never two within an interval.
        assert 1 <= len(updates) <= int(talk_s / interval) + 2, (talk_s, evs)
        stamps = [_event_ns(e) for e in evs]
        gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(stamps)]
        assert all(g >= interval * 0.98 for g in gaps), f"events closer than {interval}s: {gaps}"
        # Together they count no more than was sent (4 packets per round trip, in both ways).
        assert sum(e["packets"] for e in evs) <= 4 * 16 + 10, evs
    assert agent.stop() == 0


# ---- 8. counters ------------------------------------------------------------------------------


def test_stats_count_what_was_sent(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    lab = module_lab
    rules = [
        rule(90, "udp", "allow", dst_port=53, direction="ingress"),
        rule(91, "tcp", "deny", dst_port=22, priority=200),
    ]
    n_udp, n_denied = 20, 6
    with echo_server(lab.host_ns, (22,), (53,)):
        agent = start(agent_factory, lab, tmp_path, rules, stats_interval=1)
        assert wait_until(lambda: len(agent.stats()) >= 1, timeout=5), agent.stdout_lines
        before = agent.stats()[-1]
        for i in range(n_udp):
            assert udp_exchange(lab.peer_ns, host(lab, FAMILIES[i % 2]), 53, 2.0), i
        with ThreadPoolExecutor(n_denied) as ex:
            results = list(
                ex.map(
                    lambda i: tcp_attempt(lab.peer_ns, host(lab, FAMILIES[i % 2]), 22, 0.3)[0],
                    range(n_denied),
                )
            )
        assert not any(results)
        mark = len(agent.stats())
        # A line printed after the traffic was sampled after it: wait for two to be sure.
        assert wait_until(lambda: len(agent.stats()) >= mark + 2, timeout=5), agent.stdout_lines
        after = agent.stats()[-1]
    delta = {k: after[k] - before[k] for k in before if k != "gen"}
    sent_udp = 2 * n_udp  # request in, echo out
    denied_syns = n_denied  # at least one SYN each (no retransmit within 0.3 s)
    assert after["gen"] == 1
    assert delta["total"] >= sent_udp + denied_syns, delta
    assert delta["allowed"] >= sent_udp, delta
    assert delta["denied"] >= denied_syns, delta
    assert delta["sessions+"] >= n_udp + denied_syns, delta
    assert delta["events"] >= denied_syns, delta
    assert after["lost"] == 0 and after["parse_drops"] == 0, after
    assert agent.stop() == 0


def _signal_while_starting(agent: AgentProcess, sig: int) -> None:
    """Send `sig` once the agent catches SIGHUP and SIGTERM but before it enforces."""
    assert wait_until(
        lambda: (
            "enforcing on" in agent.log
            or not agent.running
            or (agent.catches(signal.SIGHUP) and agent.catches(signal.SIGTERM))
        ),
        timeout=30,
        interval=0.005,
    ), agent.log
    assert "enforcing on" not in agent.log, (
        "the agent enforced before it could handle SIGHUP/SIGTERM: a signal in that window "
        "kills it with the filters left attached and nobody to remove them"
    )
    agent.signal(sig)


def test_signals_during_startup(
    module_lab: Lab, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    """SIGHUP or SIGTERM while the agent is still starting (compiling the classifier): it must
    not die by the signal's default action, which would leave filters nobody removes."""
    lab = module_lab
    policy = write_policy(tmp_path / "p.json", [rule(1, "tcp", "allow", dst_port=80)])

    hup = agent_factory(lab, policy).start(wait=False)
    _signal_while_starting(hup, signal.SIGHUP)
    hup.wait_enforcing()
    hup.wait_log(r"policy generation 2 applied", timeout=10)  # the SIGHUP, as a reload
    assert hup.running, hup.log
    assert hup.stop() == 0, hup.log
    assert ours_attached(lab) == {"ingress": False, "egress": False}

    term = agent_factory(lab, policy).start(wait=False)
    _signal_while_starting(term, signal.SIGTERM)
    assert term.proc is not None
    assert term.proc.wait(30) == 0, term.log
    assert ours_attached(lab) == {"ingress": False, "egress": False}
    assert not term.pin_dir.exists()


def test_agent_helper_cleans_up_after_a_failure(module_lab: Lab, tmp_path: Path) -> None:
    """AgentProcess.cleanup leaves no process, filter or pin behind, even mid-run."""
    policy = write_policy(tmp_path / "p.json", [rule(1, "tcp", "allow", dst_port=80)])
    agent = AgentProcess(module_lab, policy, tmp_path / "ev.jsonl")
    with pytest.raises(RuntimeError), agent:
        agent.start()
        raise RuntimeError("a test failing while the agent runs")
    assert not agent.running
    assert ours_attached(module_lab) == {"ingress": False, "egress": False}
    assert not agent.pin_dir.exists() and not agent.run_dir.exists()


# ---- in process: the classifier is released on every way out ----------------------------


def _in_process_agent(lab: Lab, tmp_path: Path, ifaces: tuple[str, ...]) -> Agent:
    return Agent(
        AgentConfig(
            ifaces=ifaces,
            netns=lab.host_ns,
            state_dir=tmp_path / "state",
            datapath=DatapathConfig(instance=unique_agent_instance()),
        )
    )


def _remove_traces(lab: Lab, agent: Agent) -> None:
    cfg = agent.config.datapath
    with contextlib.suppress(Exception):
        detach(lab.host_if, lab.host_ns, cfg.run_dir, cfg.pin_root)
    agent.datapath.close()
    agent.datapath.remove_pins()
    shutil.rmtree(cfg.attachments_file.parent, ignore_errors=True)


def test_a_start_that_fails_after_loading_releases_the_classifier(
    module_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pyroute2_config, "disable_mp_signal", pyroute2_config.disable_mp_signal)
    agent = _in_process_agent(module_lab, tmp_path, ("ms-no-such-if",))
    try:
        assert asyncio.run(agent.run()) == 1  # no interface named ms-no-such-if
        assert not agent.datapath.loaded
    finally:
        _remove_traces(module_lab, agent)


def test_an_agent_that_crashes_releases_the_classifier_and_keeps_enforcing(
    module_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task of the agent fails (here the pipeline): run() raises it, with the classifier
    released (was: left loaded), and the filters stay attached and enforcing, as after a
    kill -9 (a restart adopts them)."""

    async def failing_pipeline(self: Pipeline) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("a bug in the pipeline")

    monkeypatch.setattr(pyroute2_config, "disable_mp_signal", pyroute2_config.disable_mp_signal)
    monkeypatch.setattr(Pipeline, "run", failing_pipeline)
    monkeypatch.setattr(agent_service, "tune_gc", lambda: None)  # not for the test process
    agent = _in_process_agent(module_lab, tmp_path, (module_lab.host_if,))
    try:
        with pytest.raises(ExceptionGroup) as raised:
            asyncio.run(agent.run())
        assert raised.group_contains(RuntimeError, match="a bug in the pipeline")
        assert not agent.datapath.loaded
        assert ours_attached(module_lab) == {"ingress": True, "egress": True}
    finally:
        _remove_traces(module_lab, agent)
    assert ours_attached(module_lab) == {"ingress": False, "egress": False}
