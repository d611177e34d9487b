"""Host labels and label selectors of the fleet (docs/contract.md §2, §5, §7), and host names.

In: label text from the command line (`KEY=VALUE`), label maps from policy documents and agent
status records, host names. Out: the same values checked (a fresh dict for a map), or
ValueError with a message a person can act on. Nothing is changed or dropped: a value is taken
whole or refused.

The syntax is Kubernetes' (so labels copied from there work as they are):
- a key is `NAME` or `PREFIX/NAME`: NAME is 1..63 letters, digits, "-", "_" and ".", starting
  and ending with a letter or digit; PREFIX is a DNS subdomain (lower-case letters, digits, "-"
  and ".", dot-separated parts starting and ending with a letter or digit), at most 253
  characters. Keys are case-sensitive.
- a value is 0..63 characters of NAME's alphabet, starting and ending with a letter or digit;
  it may be empty (`tier=`), and an empty value matches only an empty value.
- a map holds at most 32 pairs.
A selector is such a map: it matches a host when every pair is among the host's labels. The
empty selector `{}` is allowed and matches every host (as a rule without `hosts` does; a group
`select: {}` holds the addresses of the whole fleet).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "HOST_NAME_MAX",
    "LABEL_KEY_MAX",
    "LABEL_KEY_PATTERN",
    "LABEL_NAME_MAX",
    "LABEL_VALUE_MAX",
    "LABEL_VALUE_PATTERN",
    "MAX_LABELS",
    "check_host_name",
    "check_label_key",
    "check_label_value",
    "check_labels",
    "label_map",
    "parse_label",
    "selector_matches",
]

LABEL_NAME_MAX: Final = 63
LABEL_VALUE_MAX: Final = 63
LABEL_PREFIX_MAX: Final = 253
MAX_LABELS: Final = 32
HOST_NAME_MAX: Final = 253

_NAME: Final = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_PART: Final = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_PREFIX: Final = rf"{_DNS_PART}(?:\.{_DNS_PART})*"
_NAME_RE: Final = re.compile(_NAME)
_PREFIX_RE: Final = re.compile(_PREFIX)
# The same as JSON Schema patterns (the OpenAPI document); the prefix's 253 characters are a
# separate bound there (LABEL_KEY_MAX).
LABEL_KEY_PATTERN: Final = rf"^(?:{_PREFIX}/)?{_NAME}$"
LABEL_VALUE_PATTERN: Final = rf"^(?:{_NAME})?$"
LABEL_KEY_MAX: Final = LABEL_PREFIX_MAX + 1 + LABEL_NAME_MAX
# A host name: dot-separated parts of 1..63 letters, digits, "-" and "_", each starting and
# ending with a letter or digit (what hostnames and Kafka keys of the fleet look like).
_HOST_PART: Final = r"[A-Za-z0-9](?:[-A-Za-z0-9_]{0,61}[A-Za-z0-9])?"
_HOST_RE: Final = re.compile(rf"{_HOST_PART}(?:\.{_HOST_PART})*")

_ALPHABET: Final = 'letters, digits, "-", "_" or "."'
_KEY_HINT: Final = (
    f"use 1 to {LABEL_NAME_MAX} {_ALPHABET}, starting and ending with a letter or digit, "
    'optionally after a DNS prefix and "/" (e.g. role, example.com/role)'
)
_VALUE_HINT: Final = (
    f"use at most {LABEL_VALUE_MAX} {_ALPHABET}, starting and ending with a letter or digit "
    "(or nothing)"
)
_HOST_HINT: Final = (
    f"use at most {HOST_NAME_MAX} characters: dot-separated parts of 1 to 63 letters, digits, "
    '"-" or "_", each starting and ending with a letter or digit'
)


def _show(value: Any) -> str:
    """A short JSON-like rendering of a user value for messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key_ok(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if not _NAME_RE.fullmatch(name):
        return False
    if slash:
        return len(prefix) <= LABEL_PREFIX_MAX and _PREFIX_RE.fullmatch(prefix) is not None
    return True


def check_label_key(key: Any) -> str:
    """A label key as given, if valid; else ValueError with the message for the user."""
    if key.__class__ is not str:
        raise ValueError(f"{_show(key)} is not a label key (not a string): {_KEY_HINT}")
    if not _key_ok(key):
        raise ValueError(f"{_show(key)} is not a label key: {_KEY_HINT}")
    return str(key)


def check_label_value(key: str, value: Any) -> str:
    """Label `key`'s value as given, if valid; else ValueError naming the key."""
    if value.__class__ is not str:
        hint = f' (write it as a string: "{value}")' if isinstance(value, (int, float)) else ""
        raise ValueError(f"{key}: {_show(value)} is not a string{hint}: {_VALUE_HINT}")
    if value and not _NAME_RE.fullmatch(value):
        raise ValueError(f"{key}: {_show(value)} is not a label value: {_VALUE_HINT}")
    return str(value)


def parse_label(text: str) -> tuple[str, str]:
    """`KEY=VALUE` -> (key, value); the value may be empty (`KEY=`). ValueError if bad."""
    key, eq, value = text.partition("=")
    if not eq:
        raise ValueError(f"{_show(text)} is not KEY=VALUE (e.g. role=web)")
    return check_label_key(key), check_label_value(key, value)


def label_map(value: Any) -> dict[str, str]:
    """A label map checked (a fresh dict, order kept); ValueError listing the problems (a
    line each, without saying what the map is)."""
    if not isinstance(value, Mapping):
        raise ValueError(
            f'{_show(value)} is not a map of labels: expected an object {{"KEY": "VALUE", ...}}'
        )
    out: dict[str, str] = {}
    problems: list[str] = []
    for key, item in value.items():
        try:
            out[check_label_key(key)] = check_label_value(key, item)
        except ValueError as exc:
            problems.append(str(exc))
    if len(value) > MAX_LABELS:
        problems.append(f"{len(value)} labels: at most {MAX_LABELS} are allowed")
    if problems:
        raise ValueError("\n".join(problems))
    return out


def check_labels(value: Any, what: str) -> dict[str, str]:
    """A map of label keys to values (a host's labels, a selector), checked: a fresh dict in
    the given order. ValueError whose lines start with `what` (e.g. "--host-label")."""
    try:
        return label_map(value)
    except ValueError as exc:
        raise ValueError("\n".join(f"{what}: {line}" for line in str(exc).split("\n"))) from None


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a host with `labels` is selected: every pair of `selector` is among them (the
    empty selector matches every host; an empty value only an empty value)."""
    return all(labels.get(key) == value for key, value in selector.items())


def check_host_name(name: Any) -> str:
    """A fleet host name as given, if valid; else ValueError with the message for the user."""
    if name.__class__ is not str:
        raise ValueError(f"{_show(name)} is not a host name (not a string): {_HOST_HINT}")
    if not name or len(name) > HOST_NAME_MAX or not _HOST_RE.fullmatch(name):
        raise ValueError(f"{_show(name)} is not a host name: {_HOST_HINT}")
    return str(name)
