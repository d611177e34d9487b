"""The admin API benchmarks: a real agent (`microseg run`) in a lab of our own, timed from here.

In: `ApiSettings` (rule sets, live sizes, requests per row, a time budget per row, the bulk
size, the big group's size, the seed). Out: a results dict (`run_api_bench`); its table and
its targets are bench.apireport's. Everything made is removed at the end, also on failure or
SIGTERM (SystemExit): the agents, their pins, the labs, the temporary directories.

For each rule set (bench.rulesets: the regular "palette" and the "irregular" one a new user
writes), a fresh agent (bench.agentproc), one request at a time on a keep-alive loopback
connection, every answer checked against real traffic from the lab's peer:

- rule sets: shapes and table entries of every set used, compiled here (compile_policy);
- single-rule write -> enforced, at each live size: rounds of `POST` of a rule allowing PORT
  (a connection to PORT must then pass), `PUT /policies/{id}` of it moving it to PORT_ALT at
  another priority (PORT_ALT must pass; every DELETE_CHECK_EVERY-th round PORT must be
  refused) and `DELETE` (every DELETE_CHECK_EVERY-th round PORT_ALT must be refused);
- group member write -> enforced (SPEC §5), at each live size: a rule allows PORT from a
  small group; rounds of `POST /groups/{name}/members` adding the peer's address (PORT must
  pass) and `DELETE .../members` removing it (every DELETE_CHECK_EVERY-th: refused). An
  agent answering 404 on GET /groups has no groups: those rows say so;
- `PUT /policies` of `bulk_rules` rules replacing the first size's set: wall time (median of
  `bulk_runs`), VmRSS 1 s after the answer and the peak VmHWM from just before the request
  (reset through /proc/PID/clear_refs); beside it `nft -f` of the same policy rendered as
  sets (bench.nft NS) and as a chain (NL) into a scratch lab's device, bounded by NFT_BOUND_S;
  then its pieces in a fresh process (bench.apisplit);
- memory after `rss_writes` single-rule writes (POST, PUT, DELETE in turn) at `bulk_rules`;
- a group of `group_members` members replaced whole (`PUT /groups/{name}`) at `bulk_rules`
  rules, set up by a whole-set document with "groups": wall time; the peer is in every other
  member list, and the connection passes or is refused accordingly;
- start-up with `bulk_rules` rules: the agent stopped (`--keep-on-exit`) and started again
  onto its pins and state dir, then a fresh instance (no pins, a new state dir seeded from
  the policy file): seconds from process start until the API answers and a connection the
  policy allows passes (and one it does not is refused), VmRSS and VmHWM then.

A row stops early when it has run for `budget_s` (a slow agent): it says how many rounds it
did. A missed target is printed, never a failure; a wrong answer (an HTTP error, a change not
enforced when answered) is a BenchError.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.agentproc import BenchAgent, Client, Memory
from bench.apidocs import (
    BENCH_PRIORITY,
    BIG_GROUP,
    BIG_GROUP_RULE_ID,
    FIRST_ID,
    GROUP,
    GROUP_RULE_ID,
    PORT,
    PORT_ALT,
    PORT_DENIED,
    bulk_doc,
    group_rule,
    grouped_doc,
    live_doc,
    port_rule,
)
from bench.apisplit import split_in_subprocess
from bench.common import BenchError
from bench.rulesets import group_members

__all__ = ["ApiSettings", "run_api_bench", "settings_for"]

DELETE_CHECK_EVERY = 10
NEG_TIMEOUT = 0.2
POS_TIMEOUT = 2.0
SETTLE_S = 1.0  # between an answer and reading VmRSS: what the agent frees right after counts
SMALL_GROUP = 10  # members of the small group besides the peer
GROUP_OK = (200, 201, 204)  # SPEC §5 names no status for group writes: any success
NFT_BOUND_S = 30.0  # an nft -f taking longer is stopped and reported as "more than"
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ApiSettings:
    """How much to measure. `sizes`: live rules of the single-rule and group rows;
    `requests`: rounds per row; `budget_s`: a row (and the writes before the RSS reading)
    stops after this long; `rss_writes`: single-rule writes at `bulk_rules` rules before RSS
    is read; `group_members`: the size of the group replaced whole."""

    sets: tuple[str, ...]
    sizes: tuple[int, ...]
    requests: int
    budget_s: float
    bulk_rules: int
    bulk_runs: int
    group_members: int
    rss_writes: int
    seed: int
    quick: bool


FULL_API = ApiSettings(
    ("palette", "irregular"), (100, 10_000, 100_000), 200, 60.0, 100_000, 3, 100_000, 1_000,
    1, False,
)  # fmt: skip
QUICK_API = ApiSettings(
    ("palette", "irregular"), (100, 1_000), 10, 20.0, 1_000, 1, 1_000, 30, 1, True
)


def settings_for(
    quick: bool,
    requests: int | None,
    bulk_rules: int | None,
    seed: int,
    budget_s: float | None = None,
) -> ApiSettings:
    """FULL_API or QUICK_API with the rounds per row, the bulk size and the budget overridden."""
    b = QUICK_API if quick else FULL_API
    return ApiSettings(
        b.sets, b.sizes, requests or b.requests, budget_s or b.budget_s, bulk_rules or b.bulk_rules,
        b.bulk_runs, b.group_members, b.rss_writes, seed, b.quick,
    )  # fmt: skip


# ---- measuring ---------------------------------------------------------------------------------


def _pct(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), interpolated between samples (never beyond the largest)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summary_ms(values_s: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values_s]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(_pct(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


def rule_set_shape(kind: str, rules: int, seed: int) -> dict[str, Any]:
    """Shapes and table entries of a generated set, compiled here as the agent compiles it."""
    from streamer.datapath.compiler import compile_policy
    from streamer.datapath.config import DatapathConfig
    from streamer.policy.model import parse_policy_document

    compiled = compile_policy(
        parse_policy_document(live_doc(kind, rules, seed)), DatapathConfig("bench").max_shapes
    )
    return {
        "set": kind,
        "rules": rules,
        "shapes": compiled.shape_count,
        "shapes_v4": len(compiled.v4.shapes),
        "shapes_v6": len(compiled.v6.shapes),
        "entries": compiled.entry_count,
    }


class ApiBench:
    """The measurements on one agent with one kind of rule set."""

    def __init__(self, settings: ApiSettings, kind: str, agent: BenchAgent) -> None:
        self.s = settings
        self.kind = kind
        self.agent = agent
        self.client = Client(agent.port)
        self.next_id = FIRST_ID
        lab = agent.lab
        self.hosts = [lab.host_v4, lab.host_v6]
        self.peers = [lab.peer_v4, lab.peer_v6]
        self.groups: bool | None = None  # does the agent have address groups (SPEC §5)?

    def close(self) -> None:
        self.client.close()

    # -- helpers --

    def passes(self, i: int, port: int, timeout: float) -> bool:
        """A TCP exchange from the peer to the host (IPv4 for even i, IPv6 for odd) on port."""
        from streamer.lab.probes import tcp_exchange

        return tcp_exchange(self.agent.lab.peer_ns, self.hosts[i % 2], port, timeout)

    def must_pass(self, i: int, port: int, what: str) -> None:
        if not self.passes(i, port, POS_TIMEOUT):
            family = "IPv4" if i % 2 == 0 else "IPv6"
            raise BenchError(
                f"{what} was answered, but an {family} connection to port {port} it allows did"
                " not pass: not enforced when the answer came"
            )

    def must_refuse(self, i: int, port: int, what: str) -> None:
        if self.passes(i, port, NEG_TIMEOUT):
            family = "IPv4" if i % 2 == 0 else "IPv6"
            raise BenchError(
                f"{what} was answered, but an {family} connection to port {port} still passed"
            )

    def timed(self, method: str, path: str, doc: Any = None, ok: tuple[int, ...] = (200,)) -> float:
        """Seconds of one request; BenchError unless it answers one of `ok`."""
        body = None if doc is None else orjson.dumps(doc)
        t0 = time.perf_counter()
        status, data = self.client.call(method, path, body)
        elapsed = time.perf_counter() - t0
        if status not in ok:
            raise BenchError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return elapsed

    def replace(self, doc: dict[str, Any]) -> float:
        return self.timed("PUT", "/policies", doc)

    def memory(self, settle: bool = True) -> Memory:
        if settle:
            time.sleep(SETTLE_S)
        return Memory.read(self.agent.pid)

    # -- single-rule writes --

    def writes(self, rules: int) -> dict[str, Any]:
        """Rounds of POST, PUT and DELETE of one rule on a live set of `rules` rules."""
        s = self.s
        self.replace(live_doc(self.kind, rules, s.seed))
        self.must_refuse(0, PORT, f"the {rules:,}-rule set")
        post: list[float] = []
        put: list[float] = []
        delete: list[float] = []
        negative = 0
        started = time.perf_counter()
        for i in range(s.requests):
            if i and time.perf_counter() - started > s.budget_s:
                break
            rid = self.next_id
            self.next_id += 1
            rule = port_rule(rid, PORT, BENCH_PRIORITY)
            post.append(self.timed("POST", "/policies", rule, (201,)))
            self.must_pass(i, PORT, f"POST of rule {rid}")
            moved = port_rule(rid, PORT_ALT, BENCH_PRIORITY - 1)
            put.append(self.timed("PUT", f"/policies/{rid}", moved))
            self.must_pass(i, PORT_ALT, f"PUT of rule {rid}")
            check = i % DELETE_CHECK_EVERY == 0
            if check:
                self.must_refuse(i, PORT, f"PUT of rule {rid} (off port {PORT})")
            delete.append(self.timed("DELETE", f"/policies/{rid}"))
            if check:
                self.must_refuse(i, PORT_ALT, f"DELETE of rule {rid}")
                negative += 1
        done = len(post)
        return {
            "base_rules": rules,
            "requests": s.requests,
            "done": done,
            "budget_hit": done < s.requests,
            "seconds": round(time.perf_counter() - started, 1),
            "post": summary_ms(post),
            "put": summary_ms(put),
            "delete": summary_ms(delete),
            "enforcement_checks": {
                "passed_after_post": done, "passed_after_put": done,
                "refused_after_put": negative, "refused_after_delete": negative,
            },
        }  # fmt: skip

    # -- address groups --

    def has_groups(self) -> bool:
        """GET /groups: 200 yes, 404 no (an agent before address groups); else BenchError."""
        if self.groups is None:
            status, data = self.client.call("GET", "/groups")
            if status not in (200, 404):
                raise BenchError(f"GET /groups: HTTP {status}: {data[:300]!r}")
            self.groups = status == 200
        return self.groups

    def group_row(self, rules: int) -> dict[str, Any]:
        """Rounds of adding the peer's address to a group a rule allows PORT from, and of
        removing it, on the live set of `rules` rules (left by `writes`)."""
        s = self.s
        members = group_members(SMALL_GROUP, s.seed + 7)
        self.timed("PUT", f"/groups/{GROUP}", {"members": members}, GROUP_OK)
        self.timed("POST", "/policies", group_rule(GROUP_RULE_ID, GROUP, PORT), (201,))
        self.must_refuse(0, PORT, f"the rule from group {GROUP} (the peer not a member)")
        add: list[float] = []
        remove: list[float] = []
        negative = 0
        started = time.perf_counter()
        path = f"/groups/{GROUP}/members"
        for i in range(s.requests):
            if i and time.perf_counter() - started > s.budget_s:
                break
            one = {"members": [self.peers[i % 2]]}
            add.append(self.timed("POST", path, one, GROUP_OK))
            self.must_pass(i, PORT, f"adding {self.peers[i % 2]} to group {GROUP}")
            remove.append(self.timed("DELETE", path, one, GROUP_OK))
            if i % DELETE_CHECK_EVERY == 0:
                self.must_refuse(i, PORT, f"removing {self.peers[i % 2]} from group {GROUP}")
                negative += 1
        elapsed = time.perf_counter() - started
        self.timed("DELETE", f"/policies/{GROUP_RULE_ID}")
        self.timed("DELETE", f"/groups/{GROUP}", ok=GROUP_OK)
        done = len(add)
        return {
            "base_rules": rules,
            "requests": s.requests,
            "done": done,
            "budget_hit": done < s.requests,
            "seconds": round(elapsed, 1),
            "add": summary_ms(add),
            "remove": summary_ms(remove),
            "enforcement_checks": {"passed_after_add": done, "refused_after_remove": negative},
        }

    def group_replace(self) -> dict[str, Any]:
        """A group of `group_members` members replaced whole, back and forth, at bulk_rules
        rules: the peer is a member of every other list (B), not of the first (A)."""
        s = self.s
        old = group_members(s.group_members, s.seed + 101)
        new = group_members(s.group_members - 2, s.seed + 202) + self.peers
        setup = self.replace(grouped_doc(self.kind, s.bulk_rules, s.seed, old))
        self.must_refuse(0, PORT_ALT, f"the set with group {BIG_GROUP} (the peer not a member)")
        path = f"/groups/{BIG_GROUP}"
        walls: list[float] = []
        Memory.reset_peak(self.agent.pid)
        for run in range(s.bulk_runs):
            walls.append(self.timed("PUT", path, {"members": new}, GROUP_OK))
            self.must_pass(run, PORT_ALT, f"PUT {path} of {len(new):,} members")
            walls.append(self.timed("PUT", path, {"members": old}, GROUP_OK))
            self.must_refuse(run, PORT_ALT, f"PUT {path} of {len(old):,} members")
        mem = self.memory()
        self.timed("DELETE", f"/policies/{BIG_GROUP_RULE_ID}")
        self.timed("DELETE", path, ok=GROUP_OK)
        return {
            "members": s.group_members,
            "rules": s.bulk_rules,
            "replacements": len(walls),
            "setup_s": round(setup, 3),
            "wall_s": round(statistics.median(walls), 3),
            "wall_min_s": round(min(walls), 3),
            "wall_max_s": round(max(walls), 3),
            "memory": mem.to_dict(),
        }

    # -- the whole set --

    def bulk(self) -> dict[str, Any]:
        """PUT of `bulk_rules` rules replacing the first size's set, `bulk_runs` times, with
        the agent's memory after each (the worst run kept)."""
        s = self.s
        base_doc = live_doc(self.kind, s.sizes[0], s.seed)
        body_doc = bulk_doc(self.kind, s.bulk_rules, s.seed)
        body_bytes = len(orjson.dumps(body_doc))
        walls: list[float] = []
        backs: list[float] = []
        mems: list[Memory] = []
        for run in range(s.bulk_runs):
            self.replace(base_doc)
            self.must_refuse(run, PORT, f"the {s.sizes[0]:,}-rule set")
            Memory.reset_peak(self.agent.pid)
            walls.append(self.replace(body_doc))
            self.must_pass(run, PORT, f"the PUT of {s.bulk_rules:,} rules")
            mems.append(self.memory())
            backs.append(self.replace(base_doc))
        return {
            "rules": s.bulk_rules,
            "replacing": s.sizes[0],
            "body_bytes": body_bytes,
            "runs": s.bulk_runs,
            "wall_s": round(statistics.median(walls), 3),
            "wall_min_s": round(min(walls), 3),
            "wall_max_s": round(max(walls), 3),
            "back_to_base_s": round(statistics.median(backs), 3),
            "memory": {
                "rss_mib": max(m.rss_mib for m in mems),
                "peak_mib": max(m.peak_mib for m in mems),
            },
        }

    def rss_after_writes(self) -> dict[str, Any]:
        """`rss_writes` single-rule writes (POST, PUT, DELETE in turn) at bulk_rules rules,
        then the agent's memory; the peak is the one during the writes."""
        s = self.s
        self.replace(live_doc(self.kind, s.bulk_rules, s.seed))
        time.sleep(SETTLE_S)
        before = Memory.read(self.agent.pid)
        Memory.reset_peak(self.agent.pid)
        started = time.perf_counter()
        rid = 0
        done = 0
        for i in range(s.rss_writes):
            if i % 3 == 0 and time.perf_counter() - started > s.budget_s:
                break
            step = i % 3
            if step == 0:
                rid = self.next_id
                self.next_id += 1
                self.timed("POST", "/policies", port_rule(rid, PORT, BENCH_PRIORITY), (201,))
                if i % (3 * DELETE_CHECK_EVERY) == 0:
                    self.must_pass(i // 3, PORT, f"POST of rule {rid}")
            elif step == 1:
                self.timed("PUT", f"/policies/{rid}", port_rule(rid, PORT_ALT, BENCH_PRIORITY))
            else:
                self.timed("DELETE", f"/policies/{rid}")
            done += 1
        elapsed = time.perf_counter() - started
        mem = self.memory()
        if done % 3:
            self.timed("DELETE", f"/policies/{rid}")
        return {
            "rules": s.bulk_rules,
            "writes": done,
            "of": s.rss_writes,
            "budget_hit": done < s.rss_writes,
            "seconds": round(elapsed, 1),
            "before": before.to_dict(),
            "memory": mem.to_dict(),
        }

    def restart(self) -> dict[str, Any]:
        """The bulk set (PORT allowed) saved, the agent stopped leaving its pins, and started
        again onto them: start-up to enforcing, then its memory."""
        s = self.s
        self.replace(bulk_doc(self.kind, s.bulk_rules, s.seed))
        self.client.close()
        self.agent.stop()
        out = timed_start(self.agent)
        self.client = Client(self.agent.port)
        return out


def timed_start(agent: BenchAgent) -> dict[str, Any]:
    """Launch `agent` and time it to enforcing: its API answers and a connection from the peer
    to PORT passes; then one to PORT_DENIED must be refused (else no classifier judged the
    first one, and the wait goes on). Its memory 1 s later (peak: since it started)."""
    from streamer.lab.probes import tcp_exchange

    lab = agent.lab
    t0 = time.perf_counter()
    agent.launch()
    api = False
    while time.perf_counter() - t0 < START_TIMEOUT_S:
        api = api or agent.api_answers(0.5)
        if api and tcp_exchange(lab.peer_ns, lab.host_v4, PORT, 0.5):
            seconds = time.perf_counter() - t0
            if not tcp_exchange(lab.peer_ns, lab.host_v4, PORT_DENIED, NEG_TIMEOUT):
                time.sleep(SETTLE_S)
                mem = Memory.read(agent.pid)
                return {"startup_s": round(seconds, 3), "memory": mem.to_dict()}
        time.sleep(0.01)
    raise BenchError(
        f"the agent was not enforcing its policy within {START_TIMEOUT_S:g} s of its start"
        f" (API answering: {api}):\n{agent.log()}"
    )


# ---- nft -f beside the PUT --------------------------------------------------------------------


def nft_apply(kind: str, s: ApiSettings, scratch: Any) -> dict[str, Any]:
    """`nft -f` of the bulk set rendered as sets (NS) and as one chain (NL) into the scratch
    lab's host device: seconds, median of bulk_runs (one run when it hits NFT_BOUND_S)."""
    from bench.lab import NFT_TABLE
    from bench.nft import render_linear, render_sets

    doc = bulk_doc(kind, s.bulk_rules, s.seed)
    out: dict[str, Any] = {}
    for name, render in (("ns", render_sets), ("nl", render_linear)):
        r = render(doc, NFT_TABLE, scratch.host_if)
        times: list[float] = []
        over = False
        with tempfile.NamedTemporaryFile("w", prefix="msbench-", suffix=".nft") as f:
            f.write(r.script)
            f.flush()
            for _ in range(s.bulk_runs):
                seconds, over = _nft_load(scratch.host_ns, f.name)
                times.append(seconds)
                if over:
                    break
        out[name] = {
            "seconds": round(statistics.median(times), 3),
            "over_bound": over,
            "bound_s": NFT_BOUND_S,
            "nft_rules": r.rules,
            "script_bytes": len(r.script),
        }
    return out


def _nft_load(ns: str, path: str) -> tuple[float, bool]:
    """(seconds, stopped at NFT_BOUND_S) of `nft -f path` in netns `ns`; the table is
    deleted afterwards (untimed)."""
    from bench.lab import NFT_TABLE

    argv = ["ip", "netns", "exec", ns, "nft", "-f", path]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=NFT_BOUND_S)
    except subprocess.TimeoutExpired:
        seconds, over = time.perf_counter() - t0, True
    else:
        seconds, over = time.perf_counter() - t0, False
        if proc.returncode != 0:
            raise BenchError(f"nft -f of the rendered policy: {proc.stderr.strip()[:800]}")
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "delete", "table", "netdev", NFT_TABLE],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    return seconds, over


# ---- one rule set ------------------------------------------------------------------------------


def _one_set(
    s: ApiSettings, kind: str, lab: Any, workdir: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Every measurement of one rule set on a fresh agent, then a first start."""
    agent = BenchAgent(workdir / kind, live_doc(kind, s.sizes[0], s.seed), lab, keep_on_exit=True)
    bench: ApiBench | None = None
    out: dict[str, Any] = {"writes": [], "groups": {"supported": None, "rows": [], "replace": None}}
    groups = out["groups"]
    try:
        agent.start()
        bench = ApiBench(s, kind, agent)
        groups["supported"] = bench.has_groups()
        if not groups["supported"]:
            progress(f"api: {kind}: groups: not supported by this agent (GET /groups: 404)")
        for rules in s.sizes:
            progress(f"api: {kind}: single-rule writes on {rules:,} rules ...")
            out["writes"].append(bench.writes(rules))
            if groups["supported"]:
                progress(f"api: {kind}: group member writes on {rules:,} rules ...")
                groups["rows"].append(bench.group_row(rules))
        progress(f"api: {kind}: PUT of {s.bulk_rules:,} rules x{s.bulk_runs} ...")
        out["bulk"] = bench.bulk()
        progress(f"api: {kind}: {s.rss_writes:,} single-rule writes on {s.bulk_rules:,} rules ...")
        out["after_writes"] = bench.rss_after_writes()
        if groups["supported"]:
            progress(f"api: {kind}: a group of {s.group_members:,} members replaced ...")
            groups["replace"] = bench.group_replace()
        progress(f"api: {kind}: restart onto the pins with {s.bulk_rules:,} rules ...")
        out["restart"] = bench.restart()
    finally:
        if bench is not None:
            bench.close()
        agent.close()
    progress(f"api: {kind}: first start with {s.bulk_rules:,} rules ...")
    first = BenchAgent(workdir / f"{kind}-first", bulk_doc(kind, s.bulk_rules, s.seed), lab)
    try:
        out["first_start"] = timed_start(first)
    finally:
        first.close()
    return out


def run_api_bench(settings: ApiSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every API benchmark of `settings`; the results dict (see bench.apireport)."""
    from pyroute2 import config as pyroute2_config

    from bench.apireport import targets
    from streamer.lab.lab import Lab
    from streamer.lab.probes import EchoServer

    # pyroute2 forks a helper per netns operation and SIGTERMs it when done; our SIGTERM
    # handler (SystemExit, for cleanup) must not run in that child, or the lab comes out
    # half-built. The agent does the same.
    pyroute2_config.disable_mp_signal = True
    s = settings
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="microseg-bench-api-"))
    res: dict[str, Any] = {"rule_sets": [], "sets": {}}
    lab: Any = None
    scratch: Any = None
    try:
        progress("api: compiling the rule sets here (shapes, entries) ...")
        for kind in s.sets:
            for rules in sorted({*s.sizes, s.bulk_rules}):
                res["rule_sets"].append(rule_set_shape(kind, rules, s.seed))
        lab = Lab.create()
        progress(f"api: starting an agent in lab {lab.name} ...")
        with EchoServer(lab.host_ns, [PORT, PORT_ALT, PORT_DENIED]).start():
            for kind in s.sets:
                res["sets"][kind] = _one_set(s, kind, lab, workdir, progress)
        scratch = Lab.create()
        for kind in s.sets:
            bulk = res["sets"][kind]["bulk"]
            progress(f"api: {kind}: nft -f of the same {s.bulk_rules:,} rules (scratch lab) ...")
            bulk["nft"] = nft_apply(kind, s, scratch)
            progress(f"api: {kind}: timing the pieces of the PUT in a fresh process ...")
            try:
                bulk["split"] = split_in_subprocess(
                    kind, s.bulk_rules, s.sizes[0], s.seed, s.bulk_runs, workdir
                )
            except BenchError as e:
                # It drives the store's internals; a store without them is no agent error.
                bulk["split"] = None
                bulk["split_error"] = str(e).splitlines()[-1][:300]
    finally:
        try:
            if scratch is not None:
                scratch.destroy()
        finally:
            try:
                if lab is not None:
                    lab.destroy()
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    res["meta"] = {
        "cpus": os.cpu_count(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "quick": s.quick,
        "seed": s.seed,
        "sizes": list(s.sizes),
        "requests": s.requests,
        "budget_s": s.budget_s,
        "bulk_rules": s.bulk_rules,
        "group_members": s.group_members,
        "rss_writes": s.rss_writes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    res["targets"] = targets(res)
    res["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    return res
