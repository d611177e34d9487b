"""What the API clients print for people: aligned tables, `key  value` lines, policy diffs.

In: the admin API's answers (contract §3): rules, diffs of a policy change, counters. Out: text
for stdout, or with `-o json` the answer itself (indented). Nothing here talks to the agent;
unknown fields are kept (appended to key-value lists, shown compactly as JSON in a cell),
malformed list items are skipped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "RULE_FIELDS",
    "cell",
    "format_table",
    "is_diff",
    "key_values",
    "list_of_dicts",
    "print_json",
    "render_diff",
    "rules_table",
]

# A rule's fields in contract §2 order (the groups of §5 after the addresses): the order they
# are shown, compared and sent in.
RULE_FIELDS: Final = (
    "rule_id",
    "name",
    "src_ip",
    "dst_ip",
    "src_group",
    "dst_group",
    "src_port",
    "dst_port",
    "protocol",
    "action",
    "priority",
    "direction",
    "mode",
)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """Aligned columns separated by two spaces; column indexes in `right` are right-aligned.
    No trailing spaces."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_json(data: Any) -> None:
    """The API's answer as indented JSON (nothing for no answer)."""
    if data is not None:
        print(json.dumps(data, indent=2, ensure_ascii=False))


def cell(value: Any) -> str:
    """One value as table text: None "-", booleans yes/no, containers as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _port(value: Any) -> str:
    return "any" if value in (0, "0", None) else str(value)


def _end(rule: Mapping[str, Any], end: str) -> str:
    """A rule end as shown: its address, or `group:NAME` for a group end."""
    group = rule.get(f"{end}_group")
    if group:
        return f"group:{cell(group)}"
    return cell(rule.get(f"{end}_ip", "any"))


def _rule_row(rule: Mapping[str, Any]) -> list[str]:
    return [
        cell(rule.get("rule_id")),
        cell(rule.get("name")) if rule.get("name") else "-",
        _end(rule, "src"),
        _port(rule.get("src_port")),
        _end(rule, "dst"),
        _port(rule.get("dst_port")),
        cell(rule.get("protocol")),
        cell(rule.get("action")),
        cell(rule.get("priority")),
        cell(rule.get("direction", "any")),
    ]


RULE_HEADERS: Final = (
    "ID",
    "NAME",
    "SRC",
    "SPORT",
    "DST",
    "DPORT",
    "PROTO",
    "ACTION",
    "PRIO",
    "DIR",
)


def rules_table(rules: Sequence[Mapping[str, Any]]) -> str:
    """Rules as a table, one row each; a MODE column when any rule is staged (§6)."""
    rows = [_rule_row(r) for r in rules]
    if not any(r.get("mode", "enforce") != "enforce" for r in rules):
        return format_table(RULE_HEADERS, rows, right=(0, 8))
    for row, r in zip(rows, rules, strict=True):
        row.append(cell(r.get("mode", "enforce")))
    return format_table((*RULE_HEADERS, "MODE"), rows, right=(0, 8))


def key_values(data: Mapping[str, Any], order: Sequence[str] = ()) -> str:
    """`key  value` lines, `order` first; nested mappings flattened as a.b; rates get a %."""
    flat: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif (
            prefix.endswith("_rate")
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            flat.append((prefix, f"{value:.2f}%"))
        else:
            flat.append((prefix, '""' if value == "" else cell(value)))

    keys = [k for k in order if k in data] + [k for k in data if k not in order]
    for key in keys:
        walk(str(key), data[key])
    width = max((len(k) for k, _ in flat), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in flat)


def _rule_summary(rule: Mapping[str, Any]) -> str:
    name = f' "{rule["name"]}"' if rule.get("name") else ""
    src = _end(rule, "src")
    dst = _end(rule, "dst")
    if _port(rule.get("src_port")) != "any":
        src += f" port {rule['src_port']}"
    if _port(rule.get("dst_port")) != "any":
        dst += f" port {rule['dst_port']}"
    return (
        f"{cell(rule.get('rule_id'))}{name}: {cell(rule.get('action'))} "
        f"{cell(rule.get('protocol'))} {src} -> {dst}, priority {cell(rule.get('priority'))}, "
        f"direction {cell(rule.get('direction', 'any'))}"
    )


def _rule_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> str:
    keys = [k for k in RULE_FIELDS if k in before or k in after]
    keys += [k for k in after if k not in keys]
    changes = [
        f"{k} {cell(before.get(k))} -> {cell(after.get(k))}"
        for k in keys
        if before.get(k) != after.get(k)
    ]
    name = f' "{after["name"]}"' if after.get("name") else ""
    return f"{cell(after.get('rule_id'))}{name}: " + ("; ".join(changes) or "no field differs")


def render_diff(diff: Mapping[str, Any], new_default: str | None = None) -> str:
    """A policy change (the API's diff object) for people: a header, `+` added, `-` removed,
    `~` changed rules (with the fields that differ), groups added, removed and changed, the
    default action, and for a dry run how
    many live sessions would change verdict. `new_default` names the new default action when
    the caller knows it (the diff only says whether it changed)."""
    dry = bool(diff.get("dry_run"))
    gen = diff.get("generation")
    if dry:
        lines = [f"dry run against generation {cell(gen)}: nothing was applied"]
    else:
        lines = [f"applied: now generation {cell(gen)}"]
    for rule in list_of_dicts(diff.get("added")):
        lines.append(f"+ {_rule_summary(rule)}")
    for rule in list_of_dicts(diff.get("removed")):
        lines.append(f"- {_rule_summary(rule)}")
    for pair in list_of_dicts(diff.get("changed")):
        before, after = pair.get("before"), pair.get("after")
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            lines.append(f"~ {_rule_changes(before, after)}")
    for key, mark, what in (
        ("groups_added", "+", "added"),
        ("groups_removed", "-", "removed"),
        ("groups_changed", "~", "members changed"),
    ):
        names = diff.get(key)
        for name in names if isinstance(names, list) else []:
            lines.append(f"{mark} group {cell(name)} ({what})")
    if diff.get("default_action_changed"):
        to = f" to {new_default}" if new_default else ""
        lines.append(f"~ default action {'would change' if dry else 'changed'}{to}")
    if len(lines) == 1:
        lines.append("no changes")
    if dry and "sessions_checked" in diff:
        checked = cell(diff.get("sessions_checked"))
        changing = cell(diff.get("sessions_changing_verdict"))
        lines.append(f"{changing} of {checked} live sessions would change verdict")
    return "\n".join(lines)


def list_of_dicts(value: Any) -> list[Mapping[str, Any]]:
    """The mappings of a JSON list (anything else: none)."""
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def is_diff(data: Any) -> bool:
    """Whether an answer is the diff of a policy change."""
    return isinstance(data, Mapping) and "added" in data and "removed" in data


def into_pipe(command: Callable[[], int]) -> int:
    """Run a command whose output may be piped into e.g. `head`: a closed pipe ends it quietly
    with status 1, and the interpreter's final flush does not complain about it again."""
    try:
        return command()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
