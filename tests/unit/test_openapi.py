"""The OpenAPI document's fleet forms (streamer/api/openapi.py, docs/contract.md §7): the
local Rule and Group schemas leave hosts and select out (the local API refuses them),
FleetRule, FleetGroup and FleetPolicySet describe them, and the label selector's patterns
agree with streamer.policy.labels."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from test_labels import BAD_KEYS, GOOD_KEYS

from streamer.api.openapi import build_openapi
from streamer.policy.labels import check_label_value

DOC = build_openapi("0")
SCHEMAS: dict[str, Any] = DOC["components"]["schemas"]


def validator(name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    return jsonschema.Draft202012Validator(root)


FLEET_DOC = {
    "default_action": "deny",
    "groups": {"web": {"members": [], "select": {"role": "web"}}, "db": {"members": []}},
    "policies": [
        {"rule_id": 1, "protocol": "tcp", "action": "allow", "src_group": "web"},
        {"rule_id": 2, "protocol": "tcp", "action": "allow", "hosts": {"role": "db", "e": ""}},
    ],
}


def test_local_schemas_leave_the_fleet_fields_out() -> None:
    for name in ("Rule", "RuleUpdate", "RuleOut", "RuleWritten"):
        assert "hosts" not in SCHEMAS[name]["properties"], name
    assert "select" not in SCHEMAS["Group"]["properties"]
    assert not validator("PolicySet").is_valid(FLEET_DOC)
    rule = FLEET_DOC["policies"][1]
    assert not validator("Rule").is_valid(rule)


def test_fleet_schemas() -> None:
    assert SCHEMAS["FleetRule"]["properties"]["hosts"]["$ref"].endswith("/LabelSelector")
    assert SCHEMAS["FleetGroup"]["properties"]["select"]["$ref"].endswith("/LabelSelector")
    validator("FleetPolicySet").validate(FLEET_DOC)
    for bad in ({"role": 1}, {"-x": "y"}, {"role": "a b"}, {f"k{i}": "" for i in range(33)}):
        assert not validator("FleetRule").is_valid({**FLEET_DOC["policies"][1], "hosts": bad})
    assert not validator("FleetGroup").is_valid({"members": [], "select": [], "x": 1})


# The schema bounds a key's length as a whole, not its DNS prefix's 253 characters; and
# Python's `$` (jsonschema's) matches before a final newline, as ECMA's does not.
SCHEMA_KEYS = [(k, True) for k in GOOD_KEYS] + [
    (k, False) for k in BAD_KEYS if len(k.partition("/")[0]) <= 253 and not k.endswith("\n")
]


@pytest.mark.parametrize(("key", "good"), SCHEMA_KEYS)
def test_selector_key_pattern_agrees_with_the_model(key: str, good: bool) -> None:
    assert validator("LabelSelector").is_valid({key: "v"}) is good


@pytest.mark.parametrize("value", ["", "web", "a.b", "-a", "a-", "a b", "x" * 63, "x" * 64])
def test_selector_value_pattern_agrees_with_the_model(value: str) -> None:
    try:
        check_label_value("k", value)
        good = True
    except ValueError:
        good = False
    assert validator("LabelSelector").is_valid({"k": value}) is good
