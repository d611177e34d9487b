"""Flow, lost and alert records as text for people: the one line the console sink
(`--print-events`) and `flows observe -o compact` print, and the cells of its table.

In: a record as a dict (contract §4 and docs/flow-event.schema.json). Out: text; missing fields
show as `-`, a default-action decision as `default`, a rule as `<id> <name>`, a staged verdict
(contract §6) as `would deny by rule <id> (<name>)` or `would deny by the default action`
(nothing where the record has none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def clock(time: Any) -> str:
    """`2026-11-22T10:01:02.123456789Z` -> `10:01:02.123` (UTC)."""
    text = str(time or "")
    _, sep, rest = text.partition("T")
    if not sep:
        return text or "-"
    return rest.rstrip("Z")[:12]


def endpoint(ip: Any, port: Any) -> str:
    addr = str(ip or "-")
    if port in (None, 0):
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def rule_text(rule: Any) -> str:
    if not isinstance(rule, dict):
        return "default"
    name = rule.get("name") or ""
    return f"{rule.get('rule_id')} {name}".strip()


def staged_text(staged: Any) -> str:
    """What the staged view would have done, or "" when the record has no staged verdict."""
    if not isinstance(staged, dict):
        return ""
    verdict = staged.get("verdict") or "-"
    rule = staged.get("rule")
    if not isinstance(rule, dict):
        return f"would {verdict} by the default action"
    name = rule.get("name") or ""
    return f"would {verdict} by rule {rule.get('rule_id')}" + (f" ({name})" if name else "")


def alert_text(obj: Mapping[str, Any]) -> str:
    return (
        f"{obj.get('alert')} {obj.get('state')} ({obj.get('severity')}): {obj.get('message', '')}"
    )


def cells(obj: Mapping[str, Any]) -> list[str]:
    if obj.get("type") == "alert":
        return [clock(obj.get("time")), "ALERT", "-", alert_text(obj), "-", "-", "-", "-", "-", ""]
    if obj.get("type") == "lost":
        first = obj.get("first_seq")
        span = f"seq {first}..{obj.get('seq')}" if first is not None else f"seq {obj.get('seq')}"
        return [
            clock(obj.get("time")),
            "LOST",
            "-",
            f"{obj.get('lost')} events lost",
            f"at {obj.get('stage')}",
            "-",
            span,
            "-",
            "-",
            "",
        ]
    proto = str(obj.get("protocol") or "-")
    return [
        clock(obj.get("time")),
        str(obj.get("verdict", "-")).upper(),
        str(obj.get("direction") or "-"),
        endpoint(obj.get("src_ip"), obj.get("src_port")),
        endpoint(obj.get("dst_ip"), obj.get("dst_port")),
        proto,
        rule_text(obj.get("rule")),
        str(obj.get("packets", "-")),
        str(obj.get("bytes", "-")),
        staged_text(obj.get("staged")),
    ]


def compact_line(obj: Mapping[str, Any]) -> str:
    if obj.get("type") == "alert":
        return f"{clock(obj.get('time'))} ALERT {alert_text(obj)}"
    if obj.get("type") == "lost":
        first = obj.get("first_seq")
        span = f" seq {first}..{obj.get('seq')}" if first is not None else ""
        return f"{clock(obj.get('time'))} LOST {obj.get('lost')} events at {obj.get('stage')}{span}"
    flags = f" {obj['tcp_flags']}" if obj.get("tcp_flags") else ""
    staged = staged_text(obj.get("staged"))
    return (
        f"{clock(obj.get('time'))} {str(obj.get('verdict', '-')).upper():<5}"
        f" {obj.get('direction', '-'):<7} {endpoint(obj.get('src_ip'), obj.get('src_port'))}"
        f" -> {endpoint(obj.get('dst_ip'), obj.get('dst_port'))} {obj.get('protocol', '-')}"
        f"{flags} rule={rule_text(obj.get('rule')).replace(' ', ':', 1)}"
        f" pkts={obj.get('packets', '-')} bytes={obj.get('bytes', '-')} {obj.get('kind', '')}"
        f"{' ' + staged if staged else ''}"
    ).rstrip()
