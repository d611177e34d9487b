"""Reading the policy, rule and member files the API clients send (`policy add|update --file`,
`policy apply FILE`, `policy load --file`, `group set|add|remove --file`).

In: a path (`-` = stdin) to a JSON or YAML document, or for members also plain text (one a
line). Out: its data, checked only for its top-level shape (one rule: an object; a policy set:
an object; members: a list); what the fields mean is the agent's to judge. A file that cannot
be read or parsed is a `UsageError` naming it and, when the parser says, the line and column.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from streamer.cli.errors import UsageError

__all__ = ["read_document", "read_members", "read_policy_file", "read_rule_file"]


def _read_text(path: Path) -> str:
    name = "stdin" if str(path) == "-" else str(path)
    try:
        return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{name}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read it: {e.strerror or e}") from None


def read_document(path: Path, text: str | None = None) -> Any:
    """A JSON or YAML file (`-` = stdin) -> its data. YAML when the suffix is .yaml/.yml;
    JSON when .json; otherwise JSON, falling back to YAML. Raises UsageError naming the file.
    `text`: the file's text, when already read."""
    name = "stdin" if str(path) == "-" else str(path)
    if text is None:
        text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        as_json = False
    elif suffix == ".json":
        as_json = True
    else:  # stdin, .txt, no suffix: JSON documents start with { or [
        as_json = text.lstrip()[:1] in ("{", "[")
    if as_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{name}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}"
            ) from None
        except RecursionError:
            raise UsageError(f"{name}: invalid JSON: nested too deeply") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        at = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        raise UsageError(f"{name}: {at}invalid YAML: {problem}") from None
    except RecursionError:
        raise UsageError(f"{name}: invalid YAML: nested too deeply") from None


def read_rule_file(path: Path) -> dict[str, Any]:
    """One rule (an object); a policy set or anything else is a UsageError."""
    data = read_document(path)
    if (isinstance(data, dict) and "policies" in data) or isinstance(data, list):
        raise UsageError(
            f"{path}: holds a policy set, not one rule; use `microseg policy apply {path}`"
        )
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: expected one rule (a JSON/YAML object), got {type(data).__name__}"
        )
    return data


def read_policy_file(path: Path) -> dict[str, Any]:
    """A policy set (an object: default_action, policies); anything else is a UsageError."""
    data = read_document(path)
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: the top level is {type(data).__name__}: expected an object "
            '{"default_action": "allow"|"deny", "groups": {...}, "policies": [RULE, ...]}'
        )
    return data


def read_members(path: Path) -> list[Any]:
    """Members for a group: a JSON/YAML list or {"members": [...]} (by the suffix, or text
    starting with [, { or "- "), else plain text, one member a line (blank lines and # comments
    skipped). Raises UsageError naming the file."""
    text = _read_text(path)
    suffix = path.suffix.lower()
    start = text.lstrip()
    if suffix in (".json", ".yaml", ".yml") or start[:1] in ("[", "{") or start[:2] == "- ":
        data = read_document(path, text)
        if isinstance(data, dict) and set(data) == {"members"}:
            data = data["members"]
        if not isinstance(data, list):
            raise UsageError(
                f'{path}: expected a list of members or {{"members": [...]}}, '
                f"got {type(data).__name__}"
            )
        return data
    members = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            members.append(line)
    return members
