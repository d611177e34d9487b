"""Host labels, selectors and host names (`streamer.policy.labels`, docs/contract.md §7): the
key and value syntax and its limits, KEY=VALUE, label maps, selector matching (the empty
selector matches every host), and the CLI's `--host-label` / `--host-name` value types."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from streamer.cli.argtypes import host_label, host_name
from streamer.policy.labels import (
    MAX_LABELS,
    check_host_name,
    check_label_key,
    check_label_value,
    check_labels,
    parse_label,
    selector_matches,
)

LONGEST_HOST = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
GOOD_KEYS = [
    "role",
    "a",
    "A",
    "0",
    "app.kubernetes.io",
    "Role_2-x.y",
    "x" * 63,
    "example.com/role",
    "a-b.c0/name",
    f"{'p' * 253}/n",
]
BAD_KEYS = [
    "",
    "-role",
    "role-",
    "_x",
    "x.",
    "a b",
    "rôle",
    "x" * 64,
    "/role",
    "example.com/",
    "Example.com/role",  # a DNS prefix is lower-case
    "a/b/c",
    "-a.com/x",
    "a..b/x",
    f"{'p' * 254}/n",
    "role\n",
]


@pytest.mark.parametrize("key", GOOD_KEYS)
def test_good_keys(key: str) -> None:
    assert check_label_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys(key: str) -> None:
    with pytest.raises(ValueError, match="is not a label key: use 1 to 63 letters"):
        check_label_key(key)


@pytest.mark.parametrize("value", ["", "web", "v1.2.3", "a_b-c", "Z", "9" * 63])
def test_good_values(value: str) -> None:
    assert check_label_value("k", value) == value


@pytest.mark.parametrize("value", ["-web", "web.", "a b", "a/b", "x=y", "9" * 64, "é"])
def test_bad_values(value: str) -> None:
    with pytest.raises(ValueError, match=r"^k: .* is not a label value: use at most 63"):
        check_label_value("k", value)


@pytest.mark.parametrize(
    ("value", "words"),
    [(1, 'write it as a string: "1"'), (True, "is not a string"), (None, "is not a string")],
)
def test_values_must_be_strings(value: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_label_value("k", value)


def test_parse_label() -> None:
    assert parse_label("role=web") == ("role", "web")
    assert parse_label("tier=") == ("tier", "")
    assert parse_label("example.com/zone=eu-1") == ("example.com/zone", "eu-1")
    with pytest.raises(ValueError, match=r'^"role" is not KEY=VALUE \(e\.g\. role=web\)$'):
        parse_label("role")
    with pytest.raises(ValueError, match='"" is not a label key'):
        parse_label("=web")
    with pytest.raises(ValueError, match='role: "a=b" is not a label value'):
        parse_label("role=a=b")


def test_check_labels() -> None:
    given = {"role": "db", "env": "", "example.com/zone": "eu"}
    out = check_labels(given, "labels")
    assert out == given
    assert out is not given
    assert list(out) == list(given)
    assert check_labels({}, "labels") == {}
    assert len(check_labels({f"k{i}": "v" for i in range(MAX_LABELS)}, "x")) == MAX_LABELS


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["role=db"], ['labels: ["role=db"] is not a map of labels: expected an object']),
        ("role=db", ['labels: "role=db" is not a map of labels']),
        ({f"k{i}": "v" for i in range(MAX_LABELS + 1)}, ["labels: 33 labels: at most 32"]),
        ({1: "x"}, ["labels: 1 is not a label key (not a string)"]),
        (
            {"-a": "x", "b": 2, "c": "ok"},
            ['labels: "-a" is not a label key', "labels: b: 2 is not a string"],
        ),
    ],
)
def test_bad_label_maps(value: Any, expected: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        check_labels(value, "labels")
    lines = str(info.value).split("\n")
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), line


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ({}, {}, True),
        ({}, {"role": "db"}, True),
        ({"role": "db"}, {"role": "db", "env": "prod"}, True),
        ({"role": "db", "env": "prod"}, {"role": "db", "env": "prod"}, True),
        ({"role": "db", "env": "prod"}, {"role": "db"}, False),
        ({"role": "db"}, {"role": "web"}, False),
        ({"role": "db"}, {"Role": "db"}, False),  # keys are case-sensitive
        ({"role": "db"}, {}, False),
        ({"tier": ""}, {"tier": ""}, True),
        ({"tier": ""}, {}, False),  # an empty value is a value
    ],
)
def test_selector_matches(selector: dict[str, str], labels: dict[str, str], matches: bool) -> None:
    assert selector_matches(selector, labels) is matches


@pytest.mark.parametrize(
    "name", ["h1", "db-1", "DB_1", "web-01.eu.example.com", "x" * 63, LONGEST_HOST]
)
def test_good_host_names(name: str) -> None:
    assert check_host_name(name) == name
    assert host_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-h",
        "h-",
        "a..b",
        ".a",
        "a.",
        "a b",
        "h/1",
        "x" * 64,
        LONGEST_HOST + "a",
        "hé",
        "h\n",
    ],
)
def test_bad_host_names(name: str) -> None:
    with pytest.raises(ValueError, match="is not a host name: use at most 253 characters"):
        check_host_name(name)
    with pytest.raises(argparse.ArgumentTypeError, match="is not a host name"):
        host_name(name)


def test_host_label_argtype() -> None:
    assert host_label("role=db") == ("role", "db")
    assert host_label("tier=") == ("tier", "")
    with pytest.raises(argparse.ArgumentTypeError, match="is not KEY=VALUE"):
        host_label("role")
    with pytest.raises(argparse.ArgumentTypeError, match="is not a label value"):
        host_label("role=a b")


def test_argtypes_in_a_parser() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--host-label", type=host_label, action="append", default=[])
    parser.add_argument("--host-name", type=host_name)
    args = parser.parse_args(
        ["--host-label", "role=db", "--host-label", "env=", "--host-name", "h1"]
    )
    assert dict(args.host_label) == {"role": "db", "env": ""}
    assert args.host_name == "h1"
    with pytest.raises(argparse.ArgumentError, match="is not a host name"):
        parser.parse_args(["--host-name", "x."])
