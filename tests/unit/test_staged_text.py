"""Staged verdicts (docs/contract.md §6) for people and for the feed's filters: the text line
and table cell `flows observe` and `--print-events` show, the feed's `staged` filter, and
`flows observe --staged/--staged-verdict` as the agent's query parameter."""

from __future__ import annotations

import argparse
import io
from typing import Any

import pytest

from streamer.cli.observe import ObserveConfig, add_flow_parsers
from streamer.events.sinks.websocket import FlowFilter
from streamer.events.text import cells, compact_line, staged_text

TRIAL = {"rule_id": 12, "name": "trial", "priority": 100, "action": "deny", "mode": "staged"}


def flow(**over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "schema": "microseg.flow/v1",
        "type": "flow",
        "seq": 3,
        "time": "2026-11-22T10:01:02.123456789Z",
        "verdict": "allow",
        "direction": "ingress",
        "src_ip": "10.0.0.7",
        "src_port": 51234,
        "dst_ip": "10.0.0.5",
        "dst_port": 22,
        "protocol": "tcp",
        "tcp_flags": "SYN",
        "packets": 1,
        "bytes": 60,
        "kind": "new",
        "rule": None,
        "policy_generation": 2,
    }
    obj.update(over)
    return obj


def test_the_line_says_what_the_staged_view_would_do() -> None:
    by_rule = flow(staged={"verdict": "deny", "rule": TRIAL})
    assert compact_line(by_rule).endswith(" new would deny by rule 12 (trial)")
    assert cells(by_rule)[-1] == "would deny by rule 12 (trial)"
    by_default = flow(verdict="log", staged={"verdict": "deny", "rule": None})
    assert compact_line(by_default).endswith(" new would deny by the default action")
    unnamed = flow(staged={"verdict": "log", "rule": {**TRIAL, "name": ""}})
    assert cells(unnamed)[-1] == "would log by rule 12"
    allow = flow(verdict="deny", staged={"verdict": "allow", "rule": TRIAL})
    assert staged_text(allow["staged"]) == "would allow by rule 12 (trial)"
    # Where the views agree: nothing said, the line as before.
    plain = flow()
    assert compact_line(plain).endswith("pkts=1 bytes=60 new") and cells(plain)[-1] == ""
    for other in ({"type": "lost", "lost": 2, "stage": "kernel", "seq": 4}, {"type": "alert"}):
        assert len(cells(other)) == len(cells(plain))


def test_the_feeds_staged_filter() -> None:
    staged_deny = flow(staged={"verdict": "deny", "rule": TRIAL})
    staged_log = flow(staged={"verdict": "log", "rule": None})
    plain = flow(verdict="deny")
    lost = {"type": "lost", "lost": 1, "stage": "kernel"}
    anyf = FlowFilter.parse({"staged": "any"})
    assert [anyf.matches(o) for o in (staged_deny, staged_log, plain, lost)] == [
        True,
        True,
        False,
        True,
    ]
    assert not anyf.any and anyf.describe() == {"staged": ["any"]}
    deny = FlowFilter.parse({"staged": "DENY"})
    assert [deny.matches(o) for o in (staged_deny, staged_log, plain)] == [True, False, False]
    both = FlowFilter.parse({"staged": "deny,log", "verdict": "allow"})
    assert both.matches(staged_deny) and both.matches(staged_log) and not both.matches(plain)
    assert both.describe() == {"verdict": ["allow"], "staged": ["deny", "log"]}
    for bad in ("", "yes", "deny,maybe", "any,deny"):
        with pytest.raises(ValueError, match=r"staged: .*use any, or staged verdicts"):
            FlowFilter.parse({"staged": bad})


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_flow_parsers(p.add_subparsers())
    return p.parse_args(["flows", "observe", *argv])


def test_observe_asks_the_agent_for_staged_events() -> None:
    cfg = ObserveConfig.from_args(_args("--staged"), io.StringIO())
    assert cfg.params == {"staged": "any"}
    cfg = ObserveConfig.from_args(
        _args("--staged-verdict", "deny", "--staged-verdict", "LOG,deny"), io.StringIO()
    )
    assert cfg.params == {"staged": "deny,log"}
    cfg = ObserveConfig.from_args(_args("--staged", "--verdict", "allow"), io.StringIO())
    assert cfg.params == {"verdict": "allow", "staged": "any"}
    assert "staged" not in ObserveConfig.from_args(_args(), io.StringIO()).params


def test_observe_refuses_a_bad_staged_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        _args("--staged-verdict", "maybe")
    assert e.value.code == 2
    assert "'maybe' is not a staged verdict" in capsys.readouterr().err
