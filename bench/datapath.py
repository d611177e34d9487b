"""The datapath micro-benchmarks: BPF_PROG_TEST_RUN on the real classifier, ns per packet.

In: `Settings` (`settings_for`: --quick, --runs, --packets, --seed). Out: a plain-text table on
stdout and the results dict that bench.__main__ writes as JSON (bench/results.json unless
--out). Nothing is attached to any interface: a private classifier instance (unique pin
directory, removed at the end) runs crafted frames only.

Measured, each as the median of several runs with min and max:
- floor: an empty SCHED_CLS program, with repeat=10000 on one packet and with repeat=1 over
  many distinct packets (the per-call overhead differs; each case is compared with the floor
  measured the same way);
- session hit: one flow's packet repeated after its first packet created the session;
- new flow at 10 / 1,000 / 10,000 / 100,000 rules: many distinct flows, each run once, so every
  packet misses the session table and is judged (top rule, a late rule, default action; IPv4
  and IPv6);
- cost against the number of shapes at a fixed rule count;
- the time to compile and apply each rule set.
"""

from __future__ import annotations

import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BenchError
from bench.frames import Flow, frame
from bench.rulesets import (
    BOTTOM4_ID,
    BOTTOM6_ID,
    FIXED_RULES,
    PALETTE,
    TOP4_ID,
    TOP6_ID,
    Target,
    default_target,
    flows_for,
    palette_policy,
    rule_target,
    shape_sweep_policy,
)
from streamer.datapath.layout import MS_DENY, TC_ACT_OK, TC_ACT_SHOT, VERDICT_NAMES

HIT_REPEAT = 10_000
# Informational targets (printed next to the numbers, never a failure).
TARGET_HIT_NS = 25
TARGET_NEW_NS = 150
TARGET_NEW_RATIO = 2.0


@dataclass(frozen=True)
class Settings:
    """How much to measure: runs per case, packets per new-flow run, rule counts, shapes."""

    runs: int
    packets: int
    rule_counts: tuple[int, ...]
    sweep_rules: int
    sweep_shapes: tuple[int, ...]
    seed: int
    quick: bool


FULL = Settings(9, 2000, (10, 1_000, 10_000, 100_000), 10_000, (0, 1, 4, 16, 64, 256), 1, False)
QUICK = Settings(1, 64, (10, 1_000), 1_000, (0, 1, 16), 1, True)


# ---- measuring -------------------------------------------------------------------------------


@dataclass
class Case:
    """One measured thing. A run gives one value: the mean ns of a repeat=N call, or the
    median ns of many repeat=1 calls (one per distinct packet)."""

    key: str  # unique within a block
    label: str
    kind: str  # "floor", "hit" or "new"
    family: int
    method: str  # "repeat" (one packet, repeat=N) or "distinct" (N packets, repeat=1 each)
    fds: list[int]
    frames: list[bytes]
    repeat: int = 1
    expect_rc: int = TC_ACT_OK
    target: Target | None = None
    values: list[float] = field(default_factory=list)


@dataclass
class Block:
    """Cases measured under one applied rule set, interleaved run by run."""

    section: str  # "rules" or "shapes"
    rules: int
    shapes_v4: int
    shapes_v6: int
    cases: list[Case]

    def case(self, key: str) -> Case:
        for c in self.cases:
            if c.key == key:
                return c
        raise KeyError(key)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-run values."""
    return {
        "median_ns": float(statistics.median(values)),
        "min_ns": float(min(values)),
        "max_ns": float(max(values)),
    }


class Bench:
    """Owns the classifier instance and the floor program for one benchmark run."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.dp: Any = None
        self.floor_bpf: Any = None
        self.floor_fd = -1
        self.blocks: list[Block] = []
        self.rule_sets: list[dict[str, Any]] = []
        self.fragments: dict[str, Any] = {}
        self._events = 0

    # -- setup / teardown --

    def start(self) -> None:
        from streamer.datapath.config import DatapathConfig
        from streamer.datapath.datapath import Datapath

        try:
            from bcc import BPF
        except ImportError as e:
            raise BenchError(f"bcc is not importable ({e}): run `make setup`") from e
        instance = f"bench-{os.getpid()}-{time.time_ns() % 1_000_000:06d}"
        # no failsafe entries: the rows measure the rules (tcp:22:in would pass the SSH flows)
        self.dp = Datapath(DatapathConfig(instance=instance, failsafe=()))
        self.dp.load()
        self.dp.open_events(self._on_event)
        try:
            self.floor_bpf = BPF(text="int ms_floor(struct __sk_buff *skb) { return 0; }")
            self.floor_fd = int(self.floor_bpf.load_func("ms_floor", BPF.SCHED_CLS).fd)
        except Exception as e:  # bcc raises bare Exception
            raise BenchError(f"loading the empty floor program failed: {e}") from e

    def stop(self) -> None:
        if self.floor_bpf is not None:
            self.floor_bpf.cleanup()
            self.floor_bpf = None
        if self.dp is not None:
            try:
                self.dp.close()
            finally:
                self.dp.remove_pins()
                self.dp = None

    def _on_event(self, _raw: bytes) -> None:
        self._events += 1

    # -- one run of one case --

    def _run(self, case: Case) -> float:
        from streamer.datapath.bindings import test_run

        dp = self.dp
        before = dp.counters()
        rule_before = self._rule_packets(case)
        if case.kind == "hit":
            # The flow's first packet makes the session; the timed call is all session hits.
            rc, _ = test_run(case.fds[0], case.frames[0], 1)
            rc, ns = test_run(case.fds[0], case.frames[0], case.repeat)
            value = float(ns)
            rcs = {rc}
        elif case.method == "repeat":
            rc, ns = test_run(case.fds[0], case.frames[0], case.repeat)
            value, rcs = float(ns), {rc}
        else:
            durations: list[int] = []
            rcs = set()
            for fd, data in zip(case.fds, case.frames, strict=True):
                rc, ns = test_run(fd, data, 1)
                durations.append(ns)
                rcs.add(rc)
            value = float(statistics.median(durations))
        dp.consume_events()
        if rcs != {case.expect_rc}:
            raise BenchError(f"{case.label}: return codes {sorted(rcs)}, expected {case.expect_rc}")
        if case.kind != "floor":
            self._check(case, before, dp.counters(), rule_before)
        return value

    def _rule_packets(self, case: Case) -> int:
        if case.target is None or case.kind != "new":
            return 0
        if case.target.rule_id == 0:
            return int(self.dp.default_counters().packets)
        return int(self.dp.rule_counters(case.target.rule_id).packets)

    def _check(
        self, case: Case, before: dict[str, int], after: dict[str, int], rule_before: int
    ) -> None:
        """Make sure the kernel did what the case claims: new sessions, or session hits."""

        def delta(name: str) -> int:
            return after[name] - before[name]

        n = len(case.frames)
        if case.kind == "hit":
            if delta("session_hits") != case.repeat or delta("new_sessions") != 1:
                raise BenchError(
                    f"{case.label}: {delta('session_hits')} session hits and"
                    f" {delta('new_sessions')} new sessions, expected {case.repeat} and 1"
                )
            return
        if delta("events_lost"):
            raise BenchError(
                f"{case.label}: the event ring buffer overflowed ({delta('events_lost')} lost),"
                " which would time a cheaper path: use fewer --packets"
            )
        if delta("new_sessions") != n or delta("session_hits") != 0:
            raise BenchError(
                f"{case.label}: {delta('new_sessions')} new sessions and"
                f" {delta('session_hits')} session hits for {n} new flows"
            )
        decided = self._rule_packets(case) - rule_before
        if decided != n:
            who = (
                "the default action"
                if case.target and not case.target.rule_id
                else (f"rule {case.target.rule_id if case.target else '?'}")
            )
            raise BenchError(f"{case.label}: {who} decided {decided} of {n} packets")

    def measure(self, block: Block) -> None:
        """All runs of a block's cases, interleaved (run r measures every case once)."""
        cases = block.cases
        for r in range(self.s.runs):
            self.dp.clear_sessions()
            k = r % len(cases)
            for case in cases[k:] + cases[:k]:
                case.values.append(self._run(case))
        self.blocks.append(block)

    # -- building blocks --

    def apply(self, doc: dict[str, Any], gen_s: float) -> tuple[Any, dict[str, Any]]:
        from streamer.datapath.compiler import compile_policy
        from streamer.policy.model import parse_policy_document

        t0 = time.perf_counter()
        policy = parse_policy_document(doc)
        t1 = time.perf_counter()
        compiled = compile_policy(policy, self.dp.config.max_shapes)
        t2 = time.perf_counter()
        self.dp.apply(compiled)
        t3 = time.perf_counter()
        info = {
            "rules": len(policy.policies),
            "shapes_v4": len(compiled.v4.shapes),
            "shapes_v6": len(compiled.v6.shapes),
            "entries": compiled.entry_count,
            "generate_s": round(gen_s, 3),
            "parse_s": round(t1 - t0, 3),
            "compile_s": round(t2 - t1, 3),
            "apply_s": round(t3 - t2, 3),
            "compile_apply_s": round(t3 - t1, 3),
        }
        return (policy, compiled), info

    def floor_cases(self, families: Sequence[int], flows: dict[int, list[Flow]]) -> list[Case]:
        out: list[Case] = []
        for fam in families:
            first = frame(flows[fam][0])
            out.append(
                Case(
                    f"floor-rep-v{fam}",
                    f"floor, IPv{fam}, repeat={HIT_REPEAT}",
                    "floor",
                    fam,
                    "repeat",
                    [self.floor_fd],
                    [first],
                    HIT_REPEAT,
                )
            )
        for fam in families:
            frames = [frame(f) for f in flows[fam]]
            out.append(
                Case(
                    f"floor-new-v{fam}",
                    f"floor, IPv{fam}, repeat=1",
                    "floor",
                    fam,
                    "distinct",
                    [self.floor_fd] * len(frames),
                    frames,
                )
            )
        return out

    def new_case(
        self, key: str, label: str, target: Target, flows: list[Flow], policy: Any
    ) -> Case:
        from streamer.datapath.datapath import prog_fd

        if len(flows) < max(8, self.s.packets // 2):
            raise BenchError(f"{label}: found only {len(flows)} flows taking the measured path")
        _verify(policy, flows[0], target, label)
        return Case(
            key,
            label,
            "new",
            target.family,
            "distinct",
            [prog_fd(self.dp, f.direction) for f in flows],
            [frame(f) for f in flows],
            expect_rc=_expected_rc(target, policy),
            target=target,
        )

    def hit_case(self, key: str, label: str, target: Target, flow: Flow, policy: Any) -> Case:
        from streamer.datapath.datapath import prog_fd

        _verify(policy, flow, target, label)
        return Case(
            key,
            label,
            "hit",
            target.family,
            "repeat",
            [prog_fd(self.dp, flow.direction)],
            [frame(flow)],
            HIT_REPEAT,
            expect_rc=_expected_rc(target, policy),
            target=target,
        )

    def rules_block(self, count: int) -> None:
        t0 = time.perf_counter()
        doc = palette_policy(count, self.s.seed)
        (policy, compiled), info = self.apply(doc, time.perf_counter() - t0)
        self.rule_sets.append({"section": "rules", **info})
        n = self.s.packets
        seed = self.s.seed * 1000 + count
        floor_flows: dict[int, list[Flow]] = {}
        new_cases: list[Case] = []
        hit_cases: list[Case] = []
        for fam, top_id, bottom_id in ((4, TOP4_ID, BOTTOM4_ID), (6, TOP6_ID, BOTTOM6_ID)):
            tt, tkey = rule_target(compiled, fam, top_id)
            top_flows = flows_for(compiled, tt, tkey, n + 1, seed + fam)
            hit_cases.append(
                self.hit_case(f"hit-v{fam}", f"session hit, IPv{fam}", tt, top_flows.pop(), policy)
            )
            new_cases.append(
                self.new_case(f"top-v{fam}", f"new flow, IPv{fam}, top rule", tt, top_flows, policy)
            )
            lt, lkey = rule_target(compiled, fam, bottom_id)
            late = flows_for(compiled, lt, lkey, n, seed + 20 + fam)
            new_cases.append(
                self.new_case(f"late-v{fam}", f"new flow, IPv{fam}, late rule", lt, late, policy)
            )
            dt = default_target(compiled, fam)
            dflows = flows_for(compiled, dt, None, n, seed + 30 + fam)
            new_cases.append(
                self.new_case(f"default-v{fam}", f"new flow, IPv{fam}, default", dt, dflows, policy)
            )
            # The floor's distinct packets: flows of the same kind, never run through the
            # classifier (the floor program keeps no state).
            floor_flows[fam] = flows_for(compiled, dt, None, n, seed + 40 + fam)
        cases = self.floor_cases((4, 6), floor_flows) + hit_cases + new_cases
        self.measure(Block("rules", count, info["shapes_v4"], info["shapes_v6"], cases))

    def fragment_block(self) -> None:
        """Issue 5's fragment costs under the rule set applied last (the largest): a first
        fragment (a new flow: judged, its ports remembered) and a later fragment of a known
        datagram (fragment table + session hit), IPv4 UDP, against the floor's repeat cost.
        Checked by the kernel's counters: every first remembered, every later one followed."""
        from streamer.datapath.bindings import test_run
        from streamer.datapath.datapath import prog_fd

        fd = prog_fd(self.dp, "ingress")
        n = self.s.packets
        firsts = [_fragment4(0x0A640000 + i, 0x0A000005, 1000 + i, first=True) for i in range(n)]
        later = _fragment4(0x0A640000, 0x0A000005, 1000, first=False)
        first_ns: list[float] = []
        later_ns: list[float] = []
        for _ in range(self.s.runs):
            self.dp.clear_sessions()
            self.dp.clear_fragments()
            before = self.dp.counters()
            durations = [test_run(fd, f, 1)[1] for f in firsts]
            first_ns.append(float(statistics.median(durations)))
            later_ns.append(float(test_run(fd, later, HIT_REPEAT)[1]))
            after = self.dp.counters()
            got = (
                after["fragments_first"] - before["fragments_first"],
                after["fragments_followed"] - before["fragments_followed"],
            )
            if got != (n, HIT_REPEAT):
                raise BenchError(
                    f"fragments: {got[0]} firsts remembered of {n},"
                    f" {got[1]} later ones followed of {HIT_REPEAT}"
                )
            self.dp.consume_events()
        self.fragments = {
            "rules": self.blocks[-1].rules if self.blocks else 0,
            "first": summary(first_ns),
            "later": summary(later_ns),
        }

    def shapes_block(self, k: int) -> None:
        """IPv4 new flows over k shapes; k=0 is an empty policy (session create, no probes)."""
        count = self.s.sweep_rules if k else 0
        t0 = time.perf_counter()
        doc = (
            shape_sweep_policy(count, k, self.s.seed)
            if k
            else {"default_action": "deny", "policies": []}
        )
        (policy, compiled), info = self.apply(doc, time.perf_counter() - t0)
        self.rule_sets.append({"section": "shapes", **info})
        n = self.s.packets
        seed = self.s.seed * 1000 + 500 + k
        dt = default_target(compiled, 4)
        # New flows only here: the repeat=1 floor is the one to compare with.
        cases = self.floor_cases((4,), {4: flows_for(compiled, dt, None, n, seed)})[1:]
        if k:
            tt, tkey = rule_target(compiled, 4, TOP4_ID)
            cases.append(
                self.new_case(
                    "top-v4",
                    "new flow, IPv4, top rule",
                    tt,
                    flows_for(compiled, tt, tkey, n, seed + 1),
                    policy,
                )
            )
        cases.append(
            self.new_case(
                "default-v4",
                "new flow, IPv4, default",
                dt,
                flows_for(compiled, dt, None, n, seed + 2),
                policy,
            )
        )
        cases.append(
            self.new_case(
                "default-pair-v4",
                "new flow, IPv4, default, one pair",
                dt,
                flows_for(compiled, dt, None, n, seed + 3, one_pair=True),
                policy,
            )
        )
        self.measure(Block("shapes", count, info["shapes_v4"], info["shapes_v6"], cases))


def _fragment4(src: int, dst: int, ident: int, *, first: bool) -> bytes:
    """A fragment of a 72-byte UDP datagram to port 5353: the first (MF, the UDP header and
    32 bytes) or the one after it (offset 40, the last 32 bytes)."""
    payload = b"\0" * 32
    if first:
        l4 = struct.pack("!HHHH", 40000, 5353, 72, 0) + payload
        flags = 0x2000
    else:
        l4, flags = payload, 40 // 8
    ip = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(l4), ident, flags, 64, 17, 0, src, dst)
    return bytes.fromhex("0200000000020200000000010800") + ip + l4


def _expected_rc(target: Target, policy: Any) -> int:
    if target.action is None:
        return TC_ACT_SHOT if policy.default_action.value == "deny" else TC_ACT_OK
    return TC_ACT_SHOT if target.action == MS_DENY else TC_ACT_OK


def _verify(policy: Any, flow: Flow, target: Target, label: str) -> None:
    """The reference model (SPEC semantics) must agree on who decides the case's packets."""
    from streamer.datapath.reference import judge

    decision = judge(policy, flow.packet())
    got = decision.rule.rule_id if decision.rule is not None else 0
    if got != target.rule_id:
        raise BenchError(
            f"{label}: the reference model picks rule {got}, the bench expected {target.rule_id}"
        )


# ---- results ---------------------------------------------------------------------------------


def verdict_of(case: Case, default_action: str = "deny") -> str:
    """What the classifier decides for the case's packets, for the table."""
    if case.kind == "floor" or case.target is None:
        return "-"
    if case.target.action is None:
        return f"{default_action} (default)"
    return VERDICT_NAMES[case.target.action]


def floor_for(block: Block, case: Case) -> float:
    """The floor measured the same way as `case`, in the same block."""
    kind = "rep" if case.method == "repeat" else "new"
    return statistics.median(block.case(f"floor-{kind}-v{case.family}").values)


def results(bench: Bench, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything measured, as the JSON document (floors pooled over all blocks)."""
    floors: dict[str, list[float]] = {}
    cases: list[dict[str, Any]] = []
    for block in bench.blocks:
        for c in block.cases:
            if c.kind == "floor":
                floors.setdefault(c.key, []).extend(c.values)
                continue
            fl = floor_for(block, c)
            med = statistics.median(c.values)
            t = c.target
            cases.append(
                {
                    "section": block.section,
                    "rules": block.rules,
                    "shapes_v4": block.shapes_v4,
                    "shapes_v6": block.shapes_v6,
                    "case": c.key,
                    "label": c.label,
                    "family": c.family,
                    "method": (
                        f"repeat={c.repeat}, one packet"
                        if c.method == "repeat"
                        else f"repeat=1, {len(c.frames)} distinct packets"
                    ),
                    "verdict": verdict_of(c),
                    "rule_id": t.rule_id if t else None,
                    "probes": t.probes if t and c.kind == "new" else 0,
                    "shape_index": t.shape_index if t else None,
                    **summary(c.values),
                    "runs_ns": c.values,
                    "floor_ns": fl,
                    "over_floor_ns": med - fl,
                }
            )
    floor = []
    for key, values in floors.items():
        fam = int(key[-1])
        method = (
            f"repeat={HIT_REPEAT}, one packet"
            if "-rep-" in key
            else f"repeat=1, {bench.s.packets} distinct packets"
        )
        floor.append(
            {"case": key, "family": fam, "method": method, **summary(values), "runs_ns": values}
        )
    out = {"meta": meta, "floor": floor, "rule_sets": bench.rule_sets, "cases": cases}
    if bench.fragments:
        out["fragments"] = bench.fragments
    out["shape_sweep"] = _sweep(out)
    out["targets"] = _targets(out, bench.s)
    return out


def _find(
    res: dict[str, Any], section: str, rules: int, case: str, shapes_v4: int | None = None
) -> dict[str, Any] | None:
    for c in res["cases"]:
        if (
            c["section"] == section
            and c["rules"] == rules
            and c["case"] == case
            and (shapes_v4 is None or c["shapes_v4"] == shapes_v4)
        ):
            found: dict[str, Any] = c
            return found
    return None


def _sweep(res: dict[str, Any]) -> dict[str, Any]:
    points = []
    for c in res["cases"]:
        if c["section"] == "shapes" and c["case"] == "default-v4":
            top = _find(res, "shapes", c["rules"], "top-v4", c["shapes_v4"])
            pair = _find(res, "shapes", c["rules"], "default-pair-v4", c["shapes_v4"])
            points.append(
                {
                    "shapes": c["shapes_v4"],
                    "rules": c["rules"],
                    "top_ns": top["median_ns"] if top else None,
                    "top_over_floor_ns": top["over_floor_ns"] if top else None,
                    "default_ns": c["median_ns"],
                    "default_over_floor_ns": c["over_floor_ns"],
                    "default_probes": c["probes"],
                    "pair_ns": pair["median_ns"] if pair else None,
                    "pair_over_floor_ns": pair["over_floor_ns"] if pair else None,
                }
            )
    fit = _fit([(float(p["default_probes"]), float(p["default_over_floor_ns"])) for p in points])
    fit_pair = _fit(
        [
            (float(p["default_probes"]), float(p["pair_over_floor_ns"]))
            for p in points
            if p["pair_over_floor_ns"] is not None
        ]
    )
    return {
        "points": points,
        "ns_per_probe": fit[0],
        "intercept_ns": fit[1],
        "pair_ns_per_probe": fit_pair[0],
        "pair_intercept_ns": fit_pair[1],
    }


def _fit(xy: list[tuple[float, float]]) -> tuple[float | None, float | None]:
    """Least squares line through (x, y): (slope, intercept), or Nones below two x values."""
    if len({x for x, _ in xy}) < 2:
        return None, None
    mx = statistics.fmean(x for x, _ in xy)
    my = statistics.fmean(y for _, y in xy)
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    slope = sum((x - mx) * (y - my) for x, y in xy) / sxx
    return slope, my - slope * mx


def _targets(res: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    """The three targets, each with its measured values (keyed by case) and whether all meet it.

    Cost of a new flow = its ns over the floor measured the same way (repeat=1).
    """
    big, small = max(s.rule_counts), min(s.rule_counts)
    hits: dict[str, float] = {}
    news: dict[str, float] = {}
    ratios: dict[str, float | None] = {}
    for fam in (4, 6):
        c = _find(res, "rules", big, f"hit-v{fam}")
        if c:
            hits[f"IPv{fam}"] = c["over_floor_ns"]
        for kind in ("top", "late", "default"):
            c = _find(res, "rules", big, f"{kind}-v{fam}")
            base = _find(res, "rules", small, f"{kind}-v{fam}")
            if c:
                news[f"IPv{fam} {kind}"] = c["over_floor_ns"]
            if c and base:
                over0 = base["over_floor_ns"]
                ratios[f"IPv{fam} {kind}"] = c["over_floor_ns"] / over0 if over0 > 0 else None
    return [
        {
            "what": f"session hit within {TARGET_HIT_NS} ns of the floor (repeat={HIT_REPEAT}),"
            f" {big:,} rules",
            "unit": "ns over floor",
            "values": hits,
            "met": all(v <= TARGET_HIT_NS for v in hits.values()),
        },
        {
            "what": f"new flow within {TARGET_NEW_NS} ns of the floor (repeat=1), {big:,} rules",
            "unit": "ns over floor",
            "values": news,
            "met": all(v <= TARGET_NEW_NS for v in news.values()),
        },
        {
            "what": f"new flow at {big:,} rules costs at most {TARGET_NEW_RATIO:g}x its cost at"
            f" {small:,} rules (cost: ns over the floor)",
            "unit": "ratio",
            "values": ratios,
            "met": all(v is not None and v <= TARGET_NEW_RATIO for v in ratios.values()),
        },
    ]


def _ns(v: float) -> str:
    return f"{v:,.0f}"


def render(res: dict[str, Any]) -> str:
    """The plain-text table of a results dict."""
    m = res["meta"]
    lines: list[str] = []
    add = lines.append
    add("microseg datapath micro-benchmarks (BPF_PROG_TEST_RUN, ns per packet)")
    add(
        f"kernel {m['kernel']}, {m['cpu']} x{m['cpus']} (pinned to CPU {m['pinned_cpu']});"
        f" seed {m['seed']}{'; QUICK mode' if m['quick'] else ''}"
    )
    add(f"Each value: median of {m['runs']} run(s) [min..max]. A repeat=1 run sends")
    add(f"{m['packets']} distinct packets (new flows) once each and takes their median.")
    add("")
    add("Floor: an empty SCHED_CLS program returning TC_ACT_OK (all runs of all blocks)")
    for f in res["floor"]:
        add(
            f"  IPv{f['family']}  {f['method']:<34} {_ns(f['median_ns']):>6} ns"
            f"  [{_ns(f['min_ns'])}..{_ns(f['max_ns'])}]"
        )
    add("")
    add(f"Rule sets (seeded, default deny): {FIXED_RULES} fixed rules, per family a top rule")
    add("(priority 65535) and a late rule (priority 0, alone in the last shape probed); the")
    add(f"rest drawn from a palette of {len(PALETTE)} templates with fixed prefix lengths and port")
    add("forms, so the shape count stays flat as rules grow. Shape sweep: IPv4 TCP rules spread")
    add("evenly over k (src, dst) prefix-length pairs.")
    add(
        f"  {'set':<7} {'rules':>8} {'shapes v4+v6':>13} {'entries':>9} {'parse s':>8}"
        f" {'compile s':>10} {'apply s':>8} {'compile+apply s':>16}"
    )
    for r in res["rule_sets"]:
        add(
            f"  {r['section']:<7} {r['rules']:>8,} {r['shapes_v4']:>9}+{r['shapes_v6']:<3}"
            f" {r['entries']:>9,} {r['parse_s']:>8.2f} {r['compile_s']:>10.2f}"
            f" {r['apply_s']:>8.2f} {r['compile_apply_s']:>16.2f}"
        )
    add("")
    add("Per packet. probes: hash probes of the tuple-space search / shapes of the family.")
    add("over floor: minus the floor measured the same way in the same block (repeat=10000")
    add("for session hits, repeat=1 for new flows).")
    add(
        f"  {'rules':>7} {'shapes':>6}  {'case':<25} {'probes':>6}  {'verdict':<14}"
        f" {'median':>6} {'[min..max]':>15} {'over floor':>10}"
    )
    last_rules = None
    for c in res["cases"]:
        if c["section"] != "rules":
            continue
        first = c["rules"] != last_rules
        last_rules = c["rules"]
        nshapes = c["shapes_v4"] if c["family"] == 4 else c["shapes_v6"]
        probes = f"{c['probes']}/{nshapes}" if c["probes"] else "-"
        rules = f"{c['rules']:,}" if first else ""
        shapes = f"{c['shapes_v4']}+{c['shapes_v6']}" if first else ""
        label = c["label"]
        span = f"[{_ns(c['min_ns'])}..{_ns(c['max_ns'])}]"
        add(
            f"  {rules:>7} {shapes:>6}  {label:<25} {probes:>6}  {c['verdict']:<14}"
            f" {_ns(c['median_ns']):>6} {span:>15}"
            f" {c['over_floor_ns']:>+10,.0f}"
        )
    sw = res["shape_sweep"]
    if sw["points"]:
        add("")
        nrules = max(p["rules"] for p in sw["points"])
        add(f"Cost against shapes: {nrules:,} IPv4 rules over k shapes (0: no rules), new flows")
        add("(repeat=1), ns (over floor). random pairs: each packet from other addresses, so")
        add("rule-table buckets are mostly cold; one pair: one address pair, only the source")
        add("port varies, so every packet probes the same (warm) buckets.")
        add(
            f"  {'shapes':>6} {'rules':>7}  {'top rule, 1 probe':>18}"
            f"  {'default, k probes, random pairs':>31}  {'default, one pair':>18}"
        )

        def cell(ns: float | None, over: float | None) -> str:
            return "-" if ns is None or over is None else f"{_ns(ns)} ({over:+,.0f})"

        for p in sw["points"]:
            add(
                f"  {p['shapes']:>6} {p['rules']:>7,}"
                f"  {cell(p['top_ns'], p['top_over_floor_ns']):>18}"
                f"  {cell(p['default_ns'], p['default_over_floor_ns']):>31}"
                f"  {cell(p['pair_ns'], p['pair_over_floor_ns']):>18}"
            )
        if sw["ns_per_probe"] is not None:
            add(
                f"  fit (over floor): random pairs {sw['ns_per_probe']:.0f} ns/probe"
                f" + {sw['intercept_ns']:.0f} ns; one pair {sw['pair_ns_per_probe']:.0f} ns/probe"
                f" + {sw['pair_intercept_ns']:.0f} ns"
            )
    add("")
    add("Targets (informational, not pass/fail)")
    for t in res["targets"]:
        add(f"  [{'met' if t['met'] else 'NOT met':>7}] {t['what']}")
        shown = [
            f"{name} "
            + ("n/a" if v is None else f"{v:.2f}x" if t["unit"] == "ratio" else f"{v:+,.0f}")
            for name, v in t["values"].items()
        ]
        for i in range(0, len(shown), 3):
            add(
                "            "
                + ", ".join(shown[i : i + 3])
                + ("" if t["unit"] == "ratio" else " ns")
            )
    rs = [r for r in res["rule_sets"] if r["section"] == "rules"]
    if rs:
        r = max(rs, key=lambda x: x["rules"])
        add("")
        add(
            f"Apply at {r['rules']:,} rules ({r['shapes_v4']}+{r['shapes_v6']} shapes,"
            f" {r['entries']:,} entries): compile {r['compile_s']:.2f} s"
        )
        add(
            f"+ datapath.apply {r['apply_s']:.2f} s = {r['compile_apply_s']:.2f} s"
            f" (validating the document before that: {r['parse_s']:.2f} s)"
        )
    fr = res.get("fragments")
    if fr:
        add("")
        add(
            f"Fragments (IPv4 UDP, {fr['rules']:,} rules):"
            f" first fragment (new flow) {_ns(fr['first']['median_ns'])} ns"
            f" [{_ns(fr['first']['min_ns'])}..{_ns(fr['first']['max_ns'])}];"
            f" a later fragment of a known datagram {_ns(fr['later']['median_ns'])} ns"
            f" [{_ns(fr['later']['min_ns'])}..{_ns(fr['later']['max_ns'])}]"
        )
    add(f"Total bench time {m['elapsed_s']:.0f} s.")
    return "\n".join(lines)


# ---- the suite -------------------------------------------------------------------------------


def _meta(s: Settings, cpu: int) -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "pinned_cpu": cpu,
        "runs": s.runs,
        "packets": s.packets,
        "seed": s.seed,
        "quick": s.quick,
        "rule_counts": list(s.rule_counts),
        "sweep_rules": s.sweep_rules,
        "sweep_shapes": list(s.sweep_shapes),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def settings_for(quick: bool, runs: int | None, packets: int | None, seed: int) -> Settings:
    """FULL or QUICK with the runs, packets and seed overridden."""
    base = QUICK if quick else FULL
    return Settings(
        runs or base.runs,
        packets or base.packets,
        base.rule_counts,
        base.sweep_rules,
        base.sweep_shapes,
        seed,
        base.quick,
    )


def run_datapath(s: Settings, res: dict[str, Any]) -> int:
    """The datapath suite: prints its table and fills `res`; 0 or the exit status."""
    # One CPU for everything: BPF_PROG_TEST_RUN runs on the caller's CPU, and per-CPU
    # state (LRU free lists, counters) stays put between runs. Given back afterwards: the API
    # suite's agent must not share one CPU with its client.
    affinity = os.sched_getaffinity(0)
    cpu = max(affinity)
    os.sched_setaffinity(0, {cpu})

    from streamer.datapath.compiler import CompileError
    from streamer.datapath.config import DatapathError
    from streamer.policy.model import PolicyError

    started = time.perf_counter()
    bench = Bench(s)
    try:
        bench.start()
        for count in s.rule_counts:
            print(f"bench: {count:,} rules ...", file=sys.stderr, flush=True)
            bench.rules_block(count)
        print("bench: fragments ...", file=sys.stderr, flush=True)
        bench.fragment_block()
        for k in s.sweep_shapes:
            print(f"bench: {k} shapes ...", file=sys.stderr, flush=True)
            bench.shapes_block(k)
        from bench.staged import measure_staged, render_staged

        print("bench: staged view and failsafe ...", file=sys.stderr, flush=True)
        staged = measure_staged(bench, s)
    except (BenchError, DatapathError, CompileError, PolicyError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        bench.stop()
        os.sched_setaffinity(0, affinity)
    meta = _meta(s, cpu)
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["events_received"] = bench._events
    res.update(results(bench, meta))
    res["staged"] = staged
    print(render(res))
    print()
    print(render_staged(staged))
    return 0
