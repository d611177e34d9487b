"""The cost of the staged view and of the failsafe check (issue 19), in the datapath suite.

In: the datapath suite's Bench (its classifier, its floor program) and Settings. Out: one
block of medians (ns a packet, over the floor) for a palette set of up to 10,000 rules applied
three ways: no staged rule, a tenth of the rules staged (the measured flows' rule among them),
every rule staged; new flows decided by that rule and by the default action, a session hit
of a flow with and without a staged difference, and new default-action flows with the default
failsafe list and with none. Checked by the kernel's counters (new sessions, staged flows,
failsafe flows) and by the reference model's verdict of each case's first flow.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import BenchError
from bench.datapath import HIT_REPEAT, Bench, Settings
from bench.frames import Flow, frame
from bench.rulesets import TOP4_ID, default_target, flows_for, palette_policy, rule_target

MAX_RULES = 10_000
VARIANTS = ("none staged", "10% staged", "all staged")


def _doc(count: int, seed: int, variant: str) -> dict[str, Any]:
    doc = palette_policy(count, seed)
    for i, r in enumerate(doc["policies"]):
        if variant == "all staged" or (
            variant == "10% staged" and (i % 10 == 0 or r["rule_id"] == TOP4_ID)
        ):
            r["mode"] = "staged"
    return doc


class _Staged:
    def __init__(self, bench: Bench, s: Settings) -> None:
        self.b = bench
        self.s = s
        self.rows: dict[str, list[float]] = {}

    def _new(
        self, key: str, flows: list[Flow], policy: Any, failsafe: tuple[Any, ...] = ()
    ) -> None:
        """Every flow once, each its own new session; median ns over the floor."""
        from streamer.datapath.bindings import test_run
        from streamer.datapath.datapath import prog_fd
        from streamer.datapath.layout import MS_DENY
        from streamer.datapath.reference import judge

        dp = self.b.dp
        d = judge(policy, flows[0].packet(), failsafe)
        expect_rc = 2 if int(d.verdict) == MS_DENY else 0
        frames = [frame(f) for f in flows]
        fds = [prog_fd(dp, f.direction) for f in flows]
        dp.clear_sessions()
        before = dp.counters()
        times, rcs = [], set()
        for fd, data in zip(fds, frames, strict=True):
            rc, ns = test_run(fd, data, 1)
            times.append(ns)
            rcs.add(rc)
        after = dp.counters()
        dp.consume_events()
        floor = statistics.median(test_run(self.b.floor_fd, data, 1)[1] for data in frames)
        n = len(flows)
        if rcs != {expect_rc}:
            raise BenchError(f"staged: {key}: return codes {sorted(rcs)}, expected {expect_rc}")
        if after["new_sessions"] - before["new_sessions"] != n:
            raise BenchError(f"staged: {key}: not {n} new sessions")
        staged = after["staged_flows"] - before["staged_flows"]
        if staged != (n if d.staged is not None else 0):
            raise BenchError(f"staged: {key}: {staged} staged flows of {n}")
        passed = after["failsafe_flows"] - before["failsafe_flows"]
        if passed != (n if d.failsafe else 0):
            raise BenchError(f"staged: {key}: {passed} failsafe flows of {n}")
        self.rows.setdefault(key, []).append(float(statistics.median(times)) - floor)

    def _hit(self, key: str, flow: Flow) -> None:
        from streamer.datapath.bindings import test_run
        from streamer.datapath.datapath import prog_fd

        dp = self.b.dp
        fd, data = prog_fd(dp, flow.direction), frame(flow)
        dp.clear_sessions()
        test_run(fd, data, 1)
        before = dp.counters()
        _, ns = test_run(fd, data, HIT_REPEAT)
        after = dp.counters()
        dp.consume_events()
        if after["session_hits"] - before["session_hits"] != HIT_REPEAT:
            raise BenchError(f"staged: {key}: the timed packets were not all session hits")
        _, floor = test_run(self.b.floor_fd, data, HIT_REPEAT)
        self.rows.setdefault(key, []).append(float(ns - floor))

    def run(self) -> dict[str, Any]:
        from streamer.datapath.compiler import compile_policy
        from streamer.datapath.reference import failsafe_matches
        from streamer.policy.failsafe import DEFAULT_FAILSAFE, parse_failsafe
        from streamer.policy.model import parse_policy_document

        s, dp = self.s, self.b.dp
        count = min(MAX_RULES, max(s.rule_counts))
        base = parse_policy_document(_doc(count, s.seed, "none staged"))
        compiled = compile_policy(base, dp.config.max_shapes)
        tt, tkey = rule_target(compiled, 4, TOP4_ID)
        top = flows_for(compiled, tt, tkey, s.packets + 1, s.seed * 1000 + 901)
        hit_flow = top.pop()
        dflows = flows_for(compiled, default_target(compiled, 4), None, s.packets, s.seed + 902)
        if len(top) < 8 or len(dflows) < 8:
            raise BenchError("staged: too few flows taking the measured paths")
        policies = {v: parse_policy_document(_doc(count, s.seed, v)) for v in VARIANTS}
        failsafe = parse_failsafe(DEFAULT_FAILSAFE)
        # flows the list passes would take the failsafe path: the row times the check
        fs_flows = [f for f in dflows if not any(failsafe_matches(e, f.packet()) for e in failsafe)]
        for _ in range(s.runs):
            for v in VARIANTS:
                policy = policies[v]
                dp.apply(compile_policy(policy, dp.config.max_shapes))
                self._new(f"{v}: new flow, rule", top, policy)
                self._new(f"{v}: new flow, default", dflows, policy)
                if v != "all staged":
                    self._hit(f"{v}: session hit", hit_flow)
                if v == "none staged":
                    dp.set_failsafe(failsafe)
                    try:
                        self._new("failsafe list: new flow, default", fs_flows, policy, failsafe)
                    finally:
                        dp.set_failsafe(())
        return {
            "rules": count,
            "rows": {
                k: {"median_ns": statistics.median(v), "runs": v} for k, v in self.rows.items()
            },
        }


def measure_staged(bench: Bench, s: Settings) -> dict[str, Any]:
    """The staged/failsafe block's results (see the module's docstring)."""
    return _Staged(bench, s).run()


def render_staged(res: dict[str, Any]) -> str:
    """The block's table: ns a packet over the floor, the medians of the runs."""
    rows = res["rows"]
    lines = [
        f"Staged view and failsafe (issue 19): {res['rules']:,} palette rules, IPv4, ns a packet "
        "over the floor (median of runs)",
        f"  {'case':46} {'ns':>8}",
    ]
    for key, r in rows.items():
        lines.append(f"  {key:46} {r['median_ns']:8.0f}")
    none = rows.get("none staged: new flow, rule", {}).get("median_ns")
    tenth = rows.get("10% staged: new flow, rule", {}).get("median_ns")
    if none is not None and tenth is not None:
        lines.append(f"  a staged difference on a new flow costs {tenth - none:+.0f} ns")
    return "\n".join(lines)
