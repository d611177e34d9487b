"""The kernel classifier against the stateful reference model, frame by frame (for the hostile
corpus and the fuzzer).

`Harness(dp, policy, failsafe=..., staged_all=...)` applies a policy (and the failsafe
entries: put back to the datapath's own by `close`), empties the session and fragment tables,
sets long
timeouts (so nothing expires while a run goes on: the model's clock stands still) and sends
frames through BPF_PROG_TEST_RUN and `StatefulReference.process_frame` side by side. Each
frame's pass/drop must agree at once; the kernel's counters (what each packet became, and the
state counters: sessions, TCP transitions, fragments, related ICMP) are compared with the
model's in `check_counters`, per packet or per batch.
Import as `from support.diffkit import Harness` (tests/ is on sys.path under pytest).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from streamer.datapath.bindings import test_run as bpf_test_run
from streamer.datapath.compiler import compile_policy
from streamer.datapath.config import DatapathError
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.layout import TC_ACT_OK, TC_ACT_SHOT
from streamer.datapath.reference import Decision, StatefulReference, Timeouts, Verdict
from streamer.policy.failsafe import FailsafeRule
from streamer.policy.model import PolicySet

# What a packet became, by the kernel counter it increments.
VERDICT_COUNTER = {
    Verdict.ALLOW: "allowed_packets",
    Verdict.DENY: "denied_packets",
    Verdict.LOG: "logged_packets",
    Verdict.PASS_L2: "l2_passed",
    Verdict.DROP_PARSE: "parse_drops",
    Verdict.DROP_FRAGMENT: "fragment_drops",
    Verdict.PASS_RELATED: "related_passed",
}
# State counters the model keeps under the kernel's names.
STATE_COUNTERS = (
    "new_sessions",
    "syn_new_sessions",
    "closed_sessions",
    "half_open_opened",
    "half_open_left",
    "renewed_expired",
    "renewed_closed",
    "session_create_failed",
    "fragments_first",
    "fragments_replaced",
    "fragments_followed",
    "fragment_drops_no_first",
    "fragment_drops_overlap",
    "fragment_drops_tiny",
    "pressure_drops",
    "failsafe_passed",
    "failsafe_flows",
    "staged_flows",
)
LONG = Timeouts.uniform(864_000.0)  # ten days: nothing expires during a run


@dataclass
class Mismatch:
    index: int
    frame: bytes
    direction: str
    kernel_rc: int
    want: Decision

    def __str__(self) -> str:
        return (
            f"packet {self.index} ({self.direction}): kernel rc={self.kernel_rc}, reference "
            f"{self.want.verdict.name} (rule "
            f"{self.want.rule.rule_id if self.want.rule else None})\n  frame: {self.frame.hex()}"
        )


class Harness:
    """One policy, the kernel and the model side by side (see the module docstring)."""

    def __init__(
        self,
        dp: Datapath,
        policy: PolicySet,
        capacity: int | None = None,
        timeouts: Timeouts = LONG,
        failsafe: tuple[FailsafeRule, ...] = (),
    ) -> None:
        self.dp = dp
        staged_all = dp.config.staged_all
        dp.apply(compile_policy(policy, dp.config.max_shapes, staged_all))
        dp.clear_sessions()
        dp.clear_fragments()
        dp.set_timeouts(timeouts)
        dp.set_failsafe(failsafe)
        self.ref = StatefulReference(
            policy,
            capacity=dp.config.session_entries if capacity is None else capacity,
            timeouts=timeouts,
            failsafe=failsafe,
            staged_all=staged_all,
        )
        self.fds = {d: prog_fd(dp, d) for d in ("ingress", "egress")}
        self.base = dp.counters()
        self.verdicts: Counter[str] = Counter()
        self.sent = 0
        self.mismatches: list[Mismatch] = []

    def send(self, frame: bytes, direction: str) -> Decision:
        """One frame through both; a pass/drop disagreement is recorded in `mismatches`."""
        want = self.ref.process_frame(frame, "ingress" if direction == "ingress" else "egress")
        try:
            rc = bpf_test_run(self.fds[direction], frame)[0]
        except DatapathError:
            # BPF_PROG_TEST_RUN refuses frames of no more than an Ethernet header, and IP
            # frames shorter than their fixed IP header: the model must not judge those by
            # the policy (the kernel's parser drops them, see test_datapath's malformed frames).
            if len(frame) >= 14 + 40 + 8 or want.verdict is not Verdict.DROP_PARSE:
                raise
            self.sent += 1
            return want
        self.verdicts[VERDICT_COUNTER[want.verdict]] += 1
        expected_rc = TC_ACT_OK if want.passes else TC_ACT_SHOT
        if rc != expected_rc:
            self.mismatches.append(Mismatch(self.sent, frame, direction, rc, want))
        self.sent += 1
        return want

    def counter_differences(self) -> dict[str, tuple[int, int]]:
        """Counters where kernel and model differ since the start: name -> (kernel, model)."""
        now = self.dp.counters()
        out = {}
        for name in set(VERDICT_COUNTER.values()) | set(STATE_COUNTERS):
            kernel = now[name] - self.base[name]
            if name in VERDICT_COUNTER.values():
                model = self.verdicts[name]
            else:
                model = self.ref.counters[name]
            if kernel != model:
                out[name] = (kernel, model)
        return out

    def check(self, context: str = "") -> None:
        """Fail with the first mismatches and the counter differences, if any."""
        diffs = self.counter_differences()
        if not self.mismatches and not diffs:
            return
        lines = [f"{context}: {len(self.mismatches)} of {self.sent} packets judged differently"]
        lines += [str(m) for m in self.mismatches[:5]]
        if diffs:
            lines.append("counters (kernel, reference): " + repr(sorted(diffs.items())))
        raise AssertionError("\n".join(lines))

    def close(self) -> None:
        """Leave the shared datapath as other tests expect it: default timeouts, empty tables."""
        self.dp.clear_sessions()
        self.dp.clear_fragments()
        self.dp.set_timeouts(self.dp.config.timeouts)
        self.dp.set_failsafe(self.dp.config.failsafe)
