"""Side by side: microseg against nftables and against no filter at all, on real traffic.

In: `CompareSettings` (rule counts, runs, seconds per run). Out: a results dict
(`run_compare`), its plain-text table (`render_compare`) and a PNG plot (`plot_compare`).
Everything made is removed at the end, also on failure or SIGTERM (SystemExit): the agent
and its pins, nft tables (only ever inside the lab's namespace), the servers, the lab.

One lab (bench.lab), the same traffic (bench.workloads) through the host end's ingress, one
filter configuration at a time:

| config | what |
|---|---|
| B0 | no qdisc, no filter, no nftables |
| B1 | clsact with an empty classifier returning TC_ACT_OK (ingress and egress) |
| MS | a real `microseg run` on the veth (tcx links here), the rule set PUT through its API |
| NL | nftables, the same rules as a linear chain (netdev ingress) |
| NS | nftables as an expert writes them: sets, concatenations, a verdict map (bench.nft) |

Rule sets are the seeded palette sets of bench.rulesets with the lab's traffic placed in one
of three paths: `first` (the rule of highest priority, first in NL's chain), `last` (a rule
of priority 0, in a shape of its own: the last shape microseg probes, the last rule of NL's
chain), `default` (no rule matches; default action allow). The reference model must agree on
which rule decides, and after each measurement the counters must show that rule (or the
default) deciding the traffic: microseg's per-rule counters, nft's named counter.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bench.common import BenchError
from bench.rulesets import BOTTOM4_ID, BOTTOM6_ID, TOP4_ID, TOP6_ID, palette_policy
from bench.workloads import (
    HIGHER_IS_BETTER,
    IPERF_PORT,
    PAIRED,
    PORT_RANGE,
    RUNNERS,
    WORKLOADS,
    Servers,
)

T = TypeVar("T")
PLOT = Path(__file__).resolve().parent.parent / "docs" / "bench.png"
CONFIGS = ("B0", "B1", "MS", "NL", "NS")
CASES = ("first", "last", "default")
# Share of the packets the host end received that the intended rule (or default) must have
# decided; the rest is room for ARP / neighbour discovery, which no rule judges.
DECIDED_SHARE = 0.95
DECIDED_SLACK = 50
# Targets (informational, never a failure).
TARGET_RATE_VS_B0 = 0.95
TARGET_VS_NL = 10.0
TARGET_VS_NS = 0.90
TARGET_CRR_VS_B0 = 0.90
TARGET_RR_P99_VS_B0 = 1.05


@dataclass(frozen=True)
class CompareSettings:
    """What to measure. `rule_counts`: the IPv4 default-path sweep (MS, NL, NS);
    `v6_rule_counts`: the IPv6 one; `edge_rules`: where first and last rule are measured too
    (IPv4); every point gets `runs` runs of each workload, `seconds` each."""

    rule_counts: tuple[int, ...]
    v6_rule_counts: tuple[int, ...]
    edge_rules: int
    nl_v6_max: int  # NL's IPv6 points only up to this many rules
    runs: int
    seconds: float
    seed: int
    quick: bool


# What the 20-minute budget cut: IPv6 at 100,000 rules only, and not for NL (a linear chain of
# 23,000 IPv6 rules: slower than NL at 10,000 IPv4 rules, which is measured); first/last rule at
# 100,000 only (IPv4); B0 and B1 for IPv4 only (every run has its paired B0 anyway); 0.4 s runs
# (iperf3: 1 s, its least).
FULL_COMPARE = CompareSettings(
    (1_000, 10_000, 100_000), (100_000,), 100_000, 10_000, 5, 0.4, 1, False
)
QUICK_COMPARE = CompareSettings((100,), (100,), 100, 100, 1, 0.3, 1, True)


def settings_for(
    quick: bool, runs: int | None, seconds: float | None, seed: int
) -> CompareSettings:
    """FULL_COMPARE or QUICK_COMPARE with runs, seconds and seed overridden."""
    base = QUICK_COMPARE if quick else FULL_COMPARE
    return CompareSettings(
        base.rule_counts, base.v6_rule_counts, base.edge_rules, base.nl_v6_max, runs or base.runs,
        seconds or base.seconds, seed, base.quick,
    )  # fmt: skip


@dataclass(frozen=True)
class Point:
    """One measured configuration: filter, rule count, address family, traffic path."""

    config: str
    rules: int
    family: int
    case: str  # first / last / default; "-" for B0 and B1

    @property
    def label(self) -> str:
        n = f" {self.rules:,} rules" if self.config in ("MS", "NL", "NS") else ""
        return f"{self.config}{n} IPv{self.family} {self.case}"


def plan(s: CompareSettings) -> list[Point]:
    """Every point of a run, grouped by configuration (and by rule set within one)."""
    # B0 here is an A/A check of the pairing (B0 against its twin), and B1 the empty classifier.
    points = [Point("B0", 0, 4, "-"), Point("B1", 0, 4, "-")]
    counts = sorted(set(s.rule_counts) | set(s.v6_rule_counts))
    for config in ("MS", "NL", "NS"):
        if config == "MS":
            points.append(Point("MS", 0, 4, "default"))
        for n in counts:
            for case in CASES:
                for fam in (4, 6):
                    sweep = s.rule_counts if fam == 4 else s.v6_rule_counts
                    edge = case != "default" and fam == 4 and n == s.edge_rules
                    if config == "NL" and fam == 6 and n > s.nl_v6_max:
                        continue
                    if edge or (case == "default" and n in sweep):
                        points.append(Point(config, n, fam, case))
    return points


# ---- rule sets -----------------------------------------------------------------------------


def _net_of(addr: str, plen: int) -> str:
    return str(ip_network(f"{addr}/{plen}", strict=False))


def bench_doc(rules: int, case: str, peer: dict[int, str], host: dict[int, str],
              seed: int) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
    """The policy document of `rules` rules with the lab's traffic (peer -> host, ports
    PORT_RANGE) on path `case`, and the ids of the rules that decide it (none: the default).

    `first` puts the traffic on the top rules (priority 65535), `last` on the bottom rules
    (priority 0, a shape of their own); both keep default deny. `default` matches nothing and
    allows by default. The rule count stays `rules` (the lab rules replace fixed ones).
    """
    if rules == 0:
        if case != "default":
            raise BenchError("a set of 0 rules has only the default path")
        return {"default_action": "allow", "policies": []}, []
    doc = palette_policy(max(rules, 4), seed)
    if case == "default":
        doc["default_action"] = "allow"
        return doc, []
    lab_rules: dict[int, dict[str, Any]] = {}
    for fam, top, bottom, wide in ((4, TOP4_ID, BOTTOM4_ID, "198.18.0.0/15"),
                                   (6, TOP6_ID, BOTTOM6_ID, "fd6d:7365:67::/48")):  # fmt: skip
        common = {"protocol": "any", "dst_port": PORT_RANGE, "direction": "ingress",
                  "action": "allow"}  # fmt: skip
        if case == "first":
            lab_rules[top] = {
                **common, "rule_id": top, "name": f"bench-first{fam}", "priority": 65535,
                "src_ip": _net_of(peer[fam], 24 if fam == 4 else 64), "dst_ip": host[fam],
            }  # fmt: skip
        else:
            lab_rules[bottom] = {
                **common, "rule_id": bottom, "name": f"bench-last{fam}", "priority": 0,
                "src_ip": wide,
            }  # fmt: skip
    doc["policies"] = [lab_rules.get(r["rule_id"], r) for r in doc["policies"]]
    return doc, sorted(lab_rules)


def check_decider(doc: dict[str, Any], marked: list[int], peer: dict[int, str],
                  host: dict[int, str]) -> None:  # fmt: skip
    """The reference model must pick the marked rule of each family (or the default) for
    the lab's TCP and UDP traffic; BenchError if not."""
    from streamer.datapath.reference import Packet, judge
    from streamer.policy.model import parse_policy_document

    policy = parse_policy_document(doc)
    for fam in (4, 6):
        want = next((m for m in marked if (m in (TOP4_ID, BOTTOM4_ID)) == (fam == 4)), 0)
        for proto in (6, 17):
            pkt = Packet(fam, ip_address(peer[fam]), ip_address(host[fam]), proto, 40000,
                         IPERF_PORT, "ingress")  # fmt: skip
            d = judge(policy, pkt)
            got = d.rule.rule_id if d.rule is not None else 0
            if got != want:
                raise BenchError(f"IPv{fam}: the reference model picks rule {got}, not {want}")


# ---- measuring -----------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "values": [round(v, 3) for v in values],
    }


@dataclass
class Compare:
    """One run of the side-by-side bench."""

    s: CompareSettings
    progress: Callable[[str], None]
    lab: Any = None  # the lab whose host end is filtered
    ref: Any = None  # its twin, never filtered: every run is paired with a B0 run here
    servers: Any = None
    ref_servers: Any = None
    points: list[dict[str, Any]] = field(default_factory=list)
    apply: list[dict[str, Any]] = field(default_factory=list)
    agent_info: list[dict[str, Any]] = field(default_factory=list)

    def peer_host(self) -> tuple[dict[int, str], dict[int, str]]:
        return ({f: self.lab.addr("peer", f) for f in (4, 6)},
                {f: self.lab.addr("host", f) for f in (4, 6)})  # fmt: skip

    def _once(self, lab: Any, w: str, family: int, label: str, retries: list[str]
              ) -> dict[str, Any]:  # fmt: skip
        return self._retrying(w, label, retries, lambda: RUNNERS[w](lab, family, self.s.seconds))

    def _pair(self, w: str, point: Point, ref_first: bool, retries: list[str]
              ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
        """One interleaved run of workload `w` (in PAIRED): this lab's result and its twin's."""
        return self._retrying(w, point.label, retries, lambda: PAIRED[w](
            self.lab, self.ref, point.family, self.s.seconds, ref_first))  # fmt: skip

    def _retrying(self, w: str, label: str, retries: list[str], run: Callable[[], T]) -> T:
        try:
            return run()
        except BenchError as e:
            # One retry: a tool can hang on a machine this busy; twice is a failure.
            retries.append(f"{w}: {e}")
            self.progress(f"compare: {label}: {w} failed ({e}); once more")
            return run()

    def measure(self, point: Point, decided: Callable[[], int] | None,
                progs: dict[str, int] | None = None) -> None:  # fmt: skip
        """Every run of every workload of `point`, each paired with the same run in the twin
        lab that has no filter (B0, the order alternating run by run); then the counter check
        (`decided`: packets the intended rule decided; None for the empty classifier, checked
        by its run count in the extra runs of `_classifier_ns`).
        """
        self.progress(f"compare: {point.label} ...")
        rx0, hit0 = self.lab.rx_packets(), decided() if decided else 0
        values: dict[str, list[float]] = {w: [] for w in WORKLOADS}
        refs: dict[str, list[float]] = {w: [] for w in WORKLOADS}
        extra: dict[str, list[dict[str, Any]]] = {w: [] for w in WORKLOADS}
        retries: list[str] = []
        for run in range(self.s.runs):
            for w in WORKLOADS:
                if w in PAIRED:
                    r, b = self._pair(w, point, run % 2 == 0, retries)
                    values[w].append(float(r["value"]))
                    extra[w].append(r)
                    refs[w].append(float(b["value"]))
                    continue
                order = (self.ref, self.lab) if run % 2 == 0 else (self.lab, self.ref)
                for lab in order:
                    r = self._once(lab, w, point.family, point.label, retries)
                    if lab is self.lab:
                        values[w].append(float(r["value"]))
                        extra[w].append(r)
                    else:
                        refs[w].append(float(r["value"]))
        rx, hit = self.lab.rx_packets() - rx0, (decided() if decided else 0) - hit0
        cls: dict[str, dict[str, float | None]] = {}
        if progs:
            cls, rx_counted, runs = self._classifier_ns(point, progs, retries)
            if decided is None:
                rx, hit = rx_counted, runs  # the empty classifier: what it saw while counted
        if hit < DECIDED_SHARE * rx - DECIDED_SLACK:
            raise BenchError(
                f"{point.label}: the intended rule decided {hit:,} of the {rx:,} packets the"
                " host end received: this would benchmark the wrong path"
            )
        workloads: dict[str, dict[str, Any]] = {}
        for w in WORKLOADS:
            paired = [ratio(v, b, w) for v, b in zip(values[w], refs[w], strict=True)]
            workloads[w] = {
                **_spread(values[w]),
                "b0": _spread(refs[w]),
                "vs_b0": _spread([x if x is not None else 0.0 for x in paired]),
            }
        res: dict[str, Any] = {
            "config": point.config, "rules": point.rules, "family": point.family,
            "case": point.case, "rx_packets": rx, "decided_packets": hit,
            "workloads": workloads, "retries": retries,
        }  # fmt: skip
        rr = extra["rr"]
        res["workloads"]["rr"]["p50_us"] = statistics.median(r["p50_us"] for r in rr)
        res["workloads"]["crr"]["errors"] = sum(int(r["errors"]) for r in extra["crr"])
        res["workloads"]["tcp"]["retransmits"] = sum(int(r["retransmits"]) for r in extra["tcp"])
        if cls:
            for w in WORKLOADS:
                res["workloads"][w]["classifier_ns"] = cls[w]
            # the hit path on small packets: the UDP flood's (one-way: ingress only)
            res["classifier_ns"] = cls["udp"]
        self.points.append(res)

    def _classifier_ns(self, point: Point, progs: dict[str, int], retries: list[str]
                       ) -> tuple[dict[str, dict[str, float | None]], int, int]:  # fmt: skip
        """One more run of each workload with the kernel's BPF run-time statistics on: the
        classifier's ns per packet by workload and hook, the packets the host end received
        meanwhile and the ingress program's runs. Not during the paired runs: the statistics
        read the clock twice per program run (a paravirtual clock here), which no B0 pays."""
        from bench.lab import BpfStats

        out: dict[str, dict[str, float | None]] = {}
        rx0 = self.lab.rx_packets()
        runs = 0
        stats = BpfStats()
        try:
            for w in WORKLOADS:
                before = {h: stats.read(i) for h, i in progs.items()}
                self._once(self.lab, w, point.family, point.label, retries)
                out[w] = {}
                for h, i in progs.items():
                    (t0, c0), (t1, c1) = before[h], stats.read(i)
                    out[w][h] = round((t1 - t0) / (c1 - c0), 1) if c1 > c0 else None
                    if h == "ingress":
                        runs += c1 - c0
        finally:
            stats.close()
        return out, self.lab.rx_packets() - rx0, runs

    # -- configurations --

    def baseline(self, points: list[Point]) -> None:
        for p in points:
            if p.config == "B0":
                self.measure(p, self.lab.rx_packets)
        self.lab.attach_empty()
        try:
            progs = self.lab.filter_prog_ids()
            if "ingress" not in progs:
                raise BenchError("the empty classifier is not attached")
            for p in points:
                if p.config == "B1":
                    self.measure(p, None, progs)
        finally:
            self.lab.detach_empty()

    def microseg(self, points: list[Point], workdir: Path) -> None:
        from bench.agentproc import BenchAgent, Client

        peer, host = self.peer_host()
        empty, _ = bench_doc(0, "default", peer, host, self.s.seed)
        agent = BenchAgent(workdir, empty, lab=self.lab.lab)
        client: Client | None = None
        try:
            t0 = time.perf_counter()
            agent.start()
            self.agent_info.append(self._agent_info(agent, 0, time.perf_counter() - t0, "start"))
            client = Client(agent.port)
            progs = self.lab.filter_prog_ids()
            for (rules, case), group in _by_ruleset(points).items():
                doc, marked = bench_doc(rules, case, peer, host, self.s.seed)
                check_decider(doc, marked, peer, host)
                body = orjson.dumps(doc)
                t0 = time.perf_counter()
                client.must("PUT", "/policies", body, 200)
                self.apply.append({"config": "MS", "rules": rules, "case": case,
                                   "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
                if rules and case == "default":
                    self.agent_info.append(self._agent_info(agent, rules, None, "after PUT"))
                for p in group:
                    rid = next((m for m in marked if (m in (TOP4_ID, BOTTOM4_ID))
                                == (p.family == 4)), 0)  # fmt: skip
                    self.measure(p, _ms_counter(client, rid), progs)
        finally:
            if client is not None:
                client.close()
            agent.close()
        # Start-up with the largest set in the policy file: compile and apply before the API.
        big = max(p.rules for p in points)
        doc, _ = bench_doc(big, "default", peer, host, self.s.seed)
        agent = BenchAgent(workdir, doc, lab=self.lab.lab)
        try:
            t0 = time.perf_counter()
            agent.start(timeout=120)
            self.agent_info.append(self._agent_info(agent, big, time.perf_counter() - t0, "start"))
        finally:
            agent.close()

    @staticmethod
    def _agent_info(agent: Any, rules: int, startup: float | None, when: str) -> dict[str, Any]:
        status = Path(f"/proc/{agent.proc.pid}/status").read_text()
        kb = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in status.splitlines())
              if k in ("VmRSS", "VmHWM")}  # fmt: skip
        return {"rules": rules, "when": when, "startup_s": None if startup is None
                else round(startup, 3), "rss_mib": round(kb.get("VmRSS", 0) / 1024, 1),
                "hwm_mib": round(kb.get("VmHWM", 0) / 1024, 1)}  # fmt: skip

    def nftables(self, config: str, points: list[Point]) -> None:
        from bench.lab import NFT_TABLE
        from bench.nft import HIT_COUNTER, render_linear, render_sets

        render = render_linear if config == "NL" else render_sets
        peer, host = self.peer_host()
        for (rules, case), group in _by_ruleset(points).items():
            doc, marked = bench_doc(rules, case, peer, host, self.s.seed)
            for p in group:
                mine = [m for m in marked if (m in (TOP4_ID, BOTTOM4_ID)) == (p.family == 4)]
                r = render(doc, NFT_TABLE, self.lab.lab.host_if, mine)
                seconds = self.lab.nft_load(r.script)
                self.apply.append({"config": config, "rules": rules, "case": case,
                                   "seconds": round(seconds, 3), "nft_rules": r.rules,
                                   "max_steps": r.max_steps[p.family]})  # fmt: skip
                try:
                    self.measure(p, lambda: self.lab.nft_counter(HIT_COUNTER))
                    self.points[-1]["nft_rules"] = r.rules
                    self.points[-1]["max_steps"] = r.max_steps[p.family]
                finally:
                    self.lab.nft_delete()


def _by_ruleset(points: list[Point]) -> dict[tuple[int, str], list[Point]]:
    out: dict[tuple[int, str], list[Point]] = {}
    for p in points:
        out.setdefault((p.rules, p.case), []).append(p)
    return out


def _ms_counter(client: Any, rule_id: int) -> Callable[[], int]:
    """Packets decided by `rule_id` (0: the default action), from the agent's API."""

    def read() -> int:
        if rule_id:
            data = orjson.loads(client.must("GET", f"/policies/{rule_id}", None, 200))
            return int(data["packets"])
        data = orjson.loads(client.must("GET", "/stats/policies?limit=0", None, 200))
        return int(data["default"]["packets"])

    return read


def _uncontrolled() -> list[str]:
    load = os.getloadavg()
    notes = [
        f"{os.cpu_count()} CPUs shared with whatever else runs (load average {load[0]:.2f} at"
        " the end): other processes and their interrupts land on the pinned CPUs too",
        "CPU frequency, turbo and SMT siblings: not controlled (a VM's vCPUs)",
        "a veth pair, not a NIC: the sender's CPU also runs the receive path (and every"
        " filter) in its softirq, so filter cost shows up as lost sender throughput",
        "background load changes within seconds: each run is paired with a B0 run in a twin"
        " lab right next to it, and ratios are taken run by run (the B0 row is the A/A check);"
        " the UDP flood goes to both labs in turn, 20 ms slices, from one sender (its rate moves"
        " by tens of percent from one second to the next); RR alternates transactions between"
        " the labs from one client, as its p99 is mostly other processes' scheduling on these"
        " 2 CPUs",
    ]
    if os.cpu_count() == 1:
        notes.append("one CPU: sender and receiver could not be pinned apart")
    return notes


def run_compare(settings: CompareSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every configuration of `settings`; the results dict (see render_compare)."""
    from bench.lab import BenchLab
    from bench.workloads import nettool

    nettool()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="microseg-bench-compare-"))
    c = Compare(settings, progress)
    points = plan(settings)
    try:
        c.lab = BenchLab()
        c.ref = BenchLab()
        progress(f"compare: lab {c.lab.name}, twin {c.ref.name}, {len(points)} points ...")
        c.servers = Servers.start(c.lab, 3600)
        c.ref_servers = Servers.start(c.ref, 3600)
        c.baseline([p for p in points if p.config in ("B0", "B1")])
        c.microseg([p for p in points if p.config == "MS"], workdir)
        for config in ("NL", "NS"):
            c.nftables(config, [p for p in points if p.config == config])
    finally:
        try:
            for servers in (c.servers, c.ref_servers):
                if servers is not None:
                    servers.stop()
            for lab in (c.lab, c.ref):
                if lab is not None:
                    lab.close()
        finally:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    res: dict[str, Any] = {
        "meta": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "sender_cpu": c.lab.sender_cpu,
            "receiver_cpu": c.lab.receiver_cpu,
            "runs": settings.runs,
            "seconds": settings.seconds,
            "seed": settings.seed,
            "quick": settings.quick,
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "uncontrolled": _uncontrolled(),
            "tools": _versions(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "points": c.points,
        "apply": c.apply,
        "agent": c.agent_info,
    }
    res["targets"] = targets(res)
    res["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    return res


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, argv in (("nft", ["nft", "--version"]), ("iperf3", ["iperf3", "--version"])):
        try:
            text = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
            out[name] = text.splitlines()[0].strip() if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            out[name] = "?"
    return out


# ---- results -------------------------------------------------------------------------------


def _find(res: dict[str, Any], config: str, rules: int, family: int, case: str
          ) -> dict[str, Any] | None:  # fmt: skip
    for p in res["points"]:
        if (p["config"], p["family"]) == (config, family) and (
            config in ("B0", "B1") or (p["rules"], p["case"]) == (rules, case)
        ):
            found: dict[str, Any] = p
            return found
    return None


def _med(p: dict[str, Any] | None, w: str) -> float | None:
    return None if p is None else float(p["workloads"][w]["median"])


def ratio(ms: float | None, other: float | None, w: str) -> float | None:
    """How many times better MS is than `other` on workload w (>1: MS better)."""
    if ms is None or other is None or ms <= 0 or other <= 0:
        return None
    return ms / other if HIGHER_IS_BETTER[w] else other / ms


def vs_b0(p: dict[str, Any] | None, w: str) -> float | None:
    """The point against B0 on w: median of the per-run ratios to the paired B0 run (>1
    better; RR: B0's p99 over the point's)."""
    if p is None:
        return None
    v = float(p["workloads"][w]["vs_b0"]["median"])
    return v if v > 0 else None


def versus(ms: dict[str, Any] | None, other: dict[str, Any] | None, w: str) -> float | None:
    """How many times better MS is than another point on w, each first taken against its own
    paired B0 runs (so drift in background load between the two points cancels)."""
    a, b = vs_b0(ms, w), vs_b0(other, w)
    return None if a is None or b is None else a / b


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its values and met / not met (informational)."""
    ms_points = [p for p in res["points"] if p["config"] == "MS" and p["family"] == 4]
    if not ms_points:
        return []
    big = max(p["rules"] for p in ms_points)
    at_big = [p for p in ms_points if p["rules"] == big]
    out: list[dict[str, Any]] = []

    def against_b0(w: str, share: float, what: str) -> None:
        vals = {p["case"]: vs_b0(p, w) for p in at_big}
        out.append({"what": what, "values": vals,
                    "met": all(v is not None and v >= share for v in vals.values())})  # fmt: skip

    against_b0("tcp", TARGET_RATE_VS_B0, f"TCP throughput at {big:,} rules >= 95 % of B0")
    against_b0("udp", TARGET_RATE_VS_B0, f"small-packet rate at {big:,} rules >= 95 % of B0")
    against_b0("crr", TARGET_CRR_VS_B0, f"new connections/s at {big:,} rules >= 90 % of B0")
    against_b0(
        "rr", 1 / TARGET_RR_P99_VS_B0, f"request/response p99 at {big:,} rules within 5 % of B0"
    )
    mid = 10_000 if any(p["rules"] == 10_000 for p in ms_points) else big
    nl_vals: dict[str, float | None] = {}
    for w in ("tcp", "udp", "crr", "rr"):
        nl_vals[w] = versus(_find(res, "MS", mid, 4, "default"),
                            _find(res, "NL", mid, 4, "default"), w)  # fmt: skip
    out.append(
        {
            "what": f"at least 10x NL at {mid:,} rules (default path)",
            "values": nl_vals,
            "met": all(v is not None and v >= TARGET_VS_NL for v in nl_vals.values()),
        }
    )
    ns_vals: dict[str, float | None] = {}
    for p in res["points"]:
        if p["config"] != "MS" or not p["rules"]:
            continue
        ns = _find(res, "NS", p["rules"], p["family"], p["case"])
        for w in WORKLOADS:
            key = f"{w} {p['rules']:,} v{p['family']} {p['case']}"
            ns_vals[key] = versus(p, ns, w)
    out.append(
        {
            "what": "within 10 % of NS at every N (ratio MS vs NS >= 0.90)",
            "values": ns_vals,
            "met": all(v is not None and v >= TARGET_VS_NS for v in ns_vals.values()),
        }
    )
    return out


# ---- output --------------------------------------------------------------------------------


def _fmt(w: str, v: float | None) -> str:
    if v is None:
        return "-"
    if w == "tcp":
        return f"{v:.2f}"
    if w == "udp":
        return f"{v / 1000:,.0f}k"
    if w == "rr":
        return f"{v:,.0f}"
    return f"{v:,.0f}"


def _r(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}" if v < 10 else f"{v:.0f}"


def render_compare(res: dict[str, Any], events: dict[str, Any] | None = None) -> str:
    """The plain-text tables of a compare results dict (plus the events suite's rate)."""
    m = res["meta"]
    lines: list[str] = []
    add = lines.append
    add("microseg side by side with nftables and with no filter (real traffic over a veth pair,")
    add(
        f"sender pinned to CPU {m['sender_cpu']}, receiver to CPU {m['receiver_cpu']});"
        f" median of {m['runs']} run(s) of {m['seconds']:g} s{'; QUICK mode' if m['quick'] else ''}"
    )
    add(
        "B0 no filter | B1 empty classifier | MS microseg | NL nftables linear chain |"
        " NS nftables sets + vmap"
    )
    add("TCP: iperf3 Gbit/s; UDP: 18-byte datagrams delivered/s; RR: 1-byte TCP_RR p50/p99 µs;")
    add("CRR: new TCP connections/s (each a new flow). Every run is paired with the same run")
    add("in a twin lab without any filter (B0): right before or after it, UDP and RR interleaved")
    add("with it (UDP 20 ms slices, RR transaction by transaction); (x.xx) = median of")
    add("the per-run ratios to B0 (>1 better; RR: B0's p99 over this p99). The B0 row pairs")
    add("B0 with B0: how far apart two identical set-ups land on this machine.")
    add("cls ns: the classifier's own time per packet from the kernel (bpf_stats) at ingress,")
    add("in the UDP / RR / CRR runs (UDP: the session hit; CRR: mostly new flows).")
    add("")
    add(
        f"  {'config':<6} {'rules':>7} {'fam':>3} {'path':<7}  {'TCP':>12}  {'UDP':>12}"
        f"  {'RR p50/p99':>16}  {'CRR':>13}  {'cls ns':>14}"
    )
    for p in res["points"]:
        cells = []
        for w in WORKLOADS:
            cell = f"{_fmt(w, _med(p, w))} ({_r(vs_b0(p, w))})"
            if w == "rr":
                cell = f"{p['workloads']['rr']['p50_us']:.0f}/{cell}"
            cells.append(cell)
        cls_s = _cls_cell(p)
        rules = f"{p['rules']:,}" if p["config"] in ("MS", "NL", "NS") else ""
        add(
            f"  {p['config']:<6} {rules:>7} {'v' + str(p['family']):>3} {p['case']:<7}"
            f"  {cells[0]:>12}  {cells[1]:>12}  {cells[2]:>16}  {cells[3]:>13}  {cls_s:>14}"
        )
    add("")
    add("The paired B0 runs (median) and the spread [min..max] of the per-run ratios to them:")
    for p in res["points"]:
        spans = []
        for w in WORKLOADS:
            r = p["workloads"][w]["vs_b0"]
            b0 = p["workloads"][w]["b0"]["median"]
            spans.append(f"{w} {_fmt(w, b0)} [{_r(r['min'])}..{_r(r['max'])}]")
        add(
            f"  {p['config']:<3} {p['rules']:>7,} v{p['family']} {p['case']:<7} " + ", ".join(spans)
        )
    add("")
    add("microseg against nftables at the same rules, family and path: times better, each taken")
    add("against its own paired B0 runs first (RR: p99):")
    add(
        f"  {'rules':>7} {'fam':>3} {'path':<7}  {'vs NL: TCP':>10} {'UDP':>6} {'RR':>6} {'CRR':>6}"
        f"   {'vs NS: TCP':>10} {'UDP':>6} {'RR':>6} {'CRR':>6}"
    )
    for p in res["points"]:
        if p["config"] != "MS" or not p["rules"]:
            continue
        row = []
        for other in ("NL", "NS"):
            o = _find(res, other, p["rules"], p["family"], p["case"])
            row += [_r(versus(p, o, w)) for w in WORKLOADS]
        add(
            f"  {p['rules']:>7,} {'v' + str(p['family']):>3} {p['case']:<7}"
            f"  {row[0]:>10} {row[1]:>6} {row[2]:>6} {row[3]:>6}"
            f"   {row[4]:>10} {row[5]:>6} {row[6]:>6} {row[7]:>6}"
        )
    add("")
    add(
        "Time to apply the rule set (MS: PUT /api/v1/policies, answer = enforced; NL/NS:"
        " nft -f), median over the paths:"
    )
    by: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for a in res["apply"]:
        by.setdefault((a["config"], a["rules"]), []).append(a)
    for (config, nrules), rows in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not nrules:
            continue
        sec = statistics.median(r["seconds"] for r in rows)
        extra = ""
        if config != "MS":
            extra = (
                f"  ({rows[0]['nft_rules']:,} nft rules; a packet walks up to"
                f" {max(r['max_steps'] for r in rows):,} rules/lookups)"
            )
        add(f"  {config:<3} {nrules:>8,} rules: {sec:6.2f} s{extra}")
    add("")
    add(
        "The agent (`microseg run`, a Python process): start-up = process start to API answer,"
        " enforcement live before it."
    )
    for a in res["agent"]:
        st = f", start-up {a['startup_s']:.2f} s" if a["startup_s"] is not None else ""
        add(
            f"  {a['rules']:>8,} rules ({a['when']}): RSS {a['rss_mib']:.0f} MiB"
            f" (peak {a['hwm_mib']:.0f} MiB){st}"
        )
    eps = _events_eps(events)
    if eps is not None:
        add(f"Flow events to Kafka (the events suite, acks=all): sustained {eps:,.0f} events/s"
            " with nothing lost.")  # fmt: skip
    add("")
    add("Targets (informational, not pass/fail)")
    for t in res["targets"]:
        add(f"  [{'met' if t['met'] else 'NOT met':>7}] {t['what']}")
        shown = [f"{k} {_r(v)}" for k, v in t["values"].items()]
        for i in range(0, len(shown), 4):
            add("            " + ", ".join(shown[i : i + 4]))
    add("")
    add("Not controlled on this machine:")
    for n in m["uncontrolled"]:
        add(f"  - {n}")
    add(f"Compare bench time {m['elapsed_s']:.0f} s.")
    return "\n".join(lines)


def _cls_cell(p: dict[str, Any]) -> str:
    """The ingress classifier ns of the UDP, RR and CRR runs ("" where none was measured)."""
    wl = p["workloads"]
    ns = [(wl[w].get("classifier_ns") or {}).get("ingress") for w in ("udp", "rr", "crr")]
    if all(v is None for v in ns):
        return ""
    return "/".join("-" if v is None else f"{v:.0f}" for v in ns)


def _cost_ns(p: dict[str, Any]) -> float:
    """Nanoseconds a small packet costs more than under B0: from the median of the point's
    per-run UDP ratios to their paired B0 runs (as the table), at the paired B0's median rate.
    Medians of the rates alone would mix runs of different moments of the machine."""
    r, b0 = vs_b0(p, "udp"), p["workloads"]["udp"]["b0"]["median"]
    if not r or r <= 0 or b0 <= 0:
        return float("nan")
    return float((1.0 / r - 1.0) * 1e9 / b0)


def _events_eps(events: dict[str, Any] | None) -> float | None:
    """The events suite's sustained rate, if it ran (its layout is its own: read defensively)."""
    if not isinstance(events, dict):
        return None
    eps = events.get("sustained_eps")
    if eps is None and isinstance(events.get("sustained"), dict):
        eps = events["sustained"].get("delivered_eps")
    return float(eps) if isinstance(eps, int | float) else None


def plot_compare(res: dict[str, Any], path: Path) -> None:
    """PNG: TCP throughput and new connections/s as a share of the paired B0 runs, and the
    added cost per small packet, against the number of rules (traffic on the default path),
    MS / NL / NS per family, B1 (the empty classifier) as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    colors = {"MS": "tab:blue", "NL": "tab:red", "NS": "tab:orange"}
    panels = (("tcp", "TCP throughput, share of B0"),
              ("cost", "added cost per small packet (ns over B0, from the UDP rate)"),
              ("crr", "new connections per second, share of B0"))  # fmt: skip
    b1 = _find(res, "B1", 0, 4, "-")
    for ax, (w, title) in zip(axes, panels, strict=True):
        for fam, style in ((4, "-"), (6, "--")):
            for config in ("MS", "NL", "NS"):
                pts = sorted((p for p in res["points"] if p["config"] == config
                              and p["family"] == fam and p["case"] == "default" and p["rules"]),
                             key=lambda p: p["rules"])  # fmt: skip
                if not pts:
                    continue
                xs = [p["rules"] for p in pts]
                ys = [_cost_ns(p) if w == "cost" else vs_b0(p, w) or float("nan") for p in pts]
                ax.plot(xs, ys, style, marker="o", color=colors[config],
                        label=f"{config} IPv{fam}")  # fmt: skip
                cls = [(p.get("classifier_ns") or {}).get("ingress") for p in pts]
                if w == "cost" and any(c is not None for c in cls):
                    label = f"MS classifier alone (bpf_stats) IPv{fam}"
                    ax.plot(xs, [c or float("nan") for c in cls], ":", marker="x",
                            color="tab:green", label=label)  # fmt: skip
        if b1 is not None:
            y = _cost_ns(b1) if w == "cost" else vs_b0(b1, w)
            if y is not None:
                ax.axhline(y, color="grey", linewidth=0.9, label="B1 empty classifier IPv4")
        if w != "cost":
            ax.axhline(1.0, color="black", linewidth=0.9, label="B0 (no filter)")
            ax.set_yscale("log")
        else:
            # symlog: noise can make a cheap filter look cheaper than no filter at all.
            ax.set_yscale("symlog", linthresh=100)
            ax.set_ylim(bottom=-300)
        ax.set_xscale("log")
        ax.set_xlabel("rules (traffic on the default path)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].legend(fontsize=7, loc="upper left")
    m = res["meta"]
    fig.suptitle(
        f"microseg (MS) vs nftables linear (NL) and sets (NS): veth lab, kernel {m['kernel']},"
        f" {m['cpus']} CPUs, median of {m['runs']} paired runs x {m['seconds']:g} s",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
