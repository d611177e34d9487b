"""The OpenAPI 3.1 document of the admin API (served at `/api/v1/openapi.json`).

In: the agent's version and whether a bearer token is required. Out: a JSON-able dict that
describes every route, parameter, request body (the pydantic models' JSON schema, with the
address and port fields spelled out), response and error status the API actually returns.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from pydantic.json_schema import models_json_schema

from streamer.policy.labels import (
    LABEL_KEY_MAX,
    LABEL_KEY_PATTERN,
    LABEL_VALUE_MAX,
    LABEL_VALUE_PATTERN,
    MAX_LABELS,
)
from streamer.policy.model import GROUP_NAME_PATTERN, MAX_RULE_ID, PolicySet, Rule
from streamer.vocabulary import PACKET_DIRECTIONS, VERDICTS, Protocol

__all__ = ["SESSION_LIMIT_MAX", "build_openapi"]

SESSION_LIMIT_MAX: Final = 10_000
RULE_LIMIT_MAX: Final = 1_000_000
_REF = "#/components/schemas/{model}"

_IP_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "maxLength": 64,
    "description": 'IPv4/IPv6 address or CIDR (no host bits set), or "any"; '
    "0.0.0.0/0 and ::/0 mean any address of that family",
    "examples": ["any", "10.0.0.5", "10.0.0.0/24", "2001:db8::/32"],
}
_PORT_SCHEMA: Final[dict[str, Any]] = {
    "anyOf": [
        {"type": "integer", "minimum": 0, "maximum": 65535},
        {"type": "string", "pattern": "^[0-9]{1,5}-[0-9]{1,5}$"},
    ],
    "description": '0 = any port; a port; or an inclusive range "lo-hi". Only tcp and udp '
    "rules may have a port condition",
}
_GROUP_NAME_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "pattern": GROUP_NAME_PATTERN,
    "description": 'a group name: 1 to 63 letters, digits, "_", "." or "-", starting with a '
    "letter or digit",
}
_MEMBER_SCHEMA: Final[dict[str, Any]] = {
    "type": "string",
    "maxLength": 64,
    "description": "IPv4/IPv6 address or CIDR (no host bits set); 0.0.0.0/0 and ::/0 stand "
    'for every address of that family ("any" is not a member)',
    "examples": ["10.0.1.0/24", "fd00:1::/64", "10.0.0.5"],
}
_MEMBERS_SCHEMA: Final[dict[str, Any]] = {"type": "array", "items": _MEMBER_SCHEMA}
_RULE_IDS: Final[dict[str, Any]] = {
    "type": "array",
    "items": {"type": "integer", "minimum": 1, "maximum": MAX_RULE_ID},
    "description": "the rule_ids of the rules that name the group, in set order",
}
_TIME: Final[dict[str, Any]] = {
    "type": ["string", "null"],
    "format": "date-time",
    "description": "RFC 3339, UTC; null when never",
}
_COUNT: Final[dict[str, Any]] = {"type": "integer", "minimum": 0}
_RATE: Final[dict[str, Any]] = {
    "type": "number",
    "minimum": 0,
    "maximum": 100,
    "description": "percent",
}
_STAGED_PARAM: Final[dict[str, Any]] = {
    "type": "string",
    "pattern": "^(any|(allow|deny|log)(,(allow|deny|log))*)$",
}
_SOURCE_PARAM: Final[dict[str, Any]] = {
    "type": "string",
    "enum": ["local", "fleet"],
    "default": "local",
}
_SOURCE_DESC: Final = (
    "which feed: local (this agent's own flow events) or fleet (every agent's, from the "
    "fleet's flows topic, docs/contract.md §7; each record's `host` tells them apart; 503 or "
    "an empty list when the agent is given no fleet flows topic: see `flow_sources` in "
    "/api/v1/status)"
)
_STAGED_DESC: Final = (
    "only events with a staged verdict (docs/contract.md §6): any, or these staged verdicts "
    "(comma-separated)"
)


# The agent's --failsafe entries and --policy-mode (contract §6), where answers show them.
_FAILSAFE: Final[dict[str, Any]] = {
    "type": "array",
    "items": {"type": "string", "description": "PROTO:PORT:in|out[@CIDR], as --failsafe"},
    "description": "the failsafe entries: flows that pass before any rule",
}
_POLICY_MODE: Final[dict[str, Any]] = {
    "enum": ["enforce", "staged"],
    "description": "--policy-mode: staged stages every rule (nothing is dropped)",
}
_PENDING: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        "generation": {"type": "integer", "minimum": 1},
        "deadline": {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"},
    },
    "required": ["generation", "deadline"],
    "additionalProperties": False,
    "description": "the change waits for POST /policies/confirm until the deadline, else the "
    "agent reverts it (contract §6); only with ?confirm_within",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _obj(
    props: dict[str, Any],
    required: list[str] | None = None,
    extra: bool = False,
    description: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": extra,
    }
    if description:
        out["description"] = description
    return out


def _model_schemas() -> dict[str, Any]:
    """Rule, PolicySet and their enums from pydantic, address and port fields filled in."""
    _, doc = models_json_schema(
        [(Rule, "validation"), (PolicySet, "validation")], ref_template=_REF
    )
    defs: dict[str, Any] = doc["$defs"]
    rule = defs["Rule"]
    rule["description"] = (
        "A policy rule (docs/contract.md §2). Unknown fields are rejected, and so is hosts "
        "(fleet documents only: FleetRule)."
    )
    # Fleet-only (contract §7): the local API refuses it; FleetRule below describes it.
    rule["properties"].pop("hosts")
    for name in ("src_ip", "dst_ip"):
        rule["properties"][name] = {**_IP_SCHEMA, "default": "any"}
    for name in ("src_port", "dst_port"):
        rule["properties"][name] = {**_PORT_SCHEMA, "default": 0}
    for end in ("src", "dst"):
        rule["properties"][f"{end}_group"] = {
            **_GROUP_NAME_SCHEMA,
            "description": f"an address group of the set in place of {end}_ip (which is then "
            '"any"); left out: the end is an address',
        }
    defs["Group"] = {
        "type": "object",
        "properties": {"members": {**_MEMBERS_SCHEMA, "default": []}},
        "additionalProperties": False,
        "description": "An address group (docs/contract.md §5): addresses and CIDRs of both "
        "families; an empty group matches nothing. select (label groups) needs fleet mode "
        "and is refused (FleetGroup).",
    }
    defs["PolicySet"]["properties"]["groups"] = {
        "type": "object",
        "propertyNames": {"pattern": GROUP_NAME_PATTERN},
        "additionalProperties": _ref("Group"),
        "default": {},
        "description": "the address groups by name",
    }
    defs["PolicySet"]["description"] = (
        "A whole policy set, as in a policy file: default_action defaults to allow, groups to "
        "none, policies to an empty list (which removes every rule). A rule may only name a "
        "group of the document."
    )
    # PUT /policies/{rule_id}: the id comes from the path.
    update = copy.deepcopy(rule)
    update["required"] = [f for f in update["required"] if f != "rule_id"]
    update["description"] = (
        "A policy rule replacing the one named in the path; rule_id may be left out, and if "
        "present must equal the path's."
    )
    defs["RuleUpdate"] = update
    # What the API returns: every field, canonical.
    out = copy.deepcopy(rule)
    out["required"] = [f for f in out["properties"] if not f.endswith("_group") and f != "mode"]
    out["description"] = (
        "A policy rule as stored: every field, canonical values; src_group and dst_group only "
        "when the rule has them, mode only when it is staged."
    )
    for prop in out["properties"].values():
        prop.pop("default", None)
    defs["RuleOut"] = out
    written = copy.deepcopy(out)
    written["properties"]["pending"] = _PENDING
    written["description"] = "The rule a write applied, with `pending` under ?confirm_within."
    defs["RuleWritten"] = written
    defs.update(_fleet_schemas(rule, defs["Group"], defs["PolicySet"]))
    return defs


def _fleet_schemas(
    rule: dict[str, Any], group: dict[str, Any], policy_set: dict[str, Any]
) -> dict[str, Any]:
    """The fleet document's forms (contract §7, `microseg fleet apply`): a rule with `hosts`,
    a group with `select`. No route of this API takes them: the local API refuses both."""
    selector = {
        "type": "object",
        "propertyNames": {"pattern": LABEL_KEY_PATTERN, "maxLength": LABEL_KEY_MAX},
        "additionalProperties": {
            "type": "string",
            "pattern": LABEL_VALUE_PATTERN,
            "maxLength": LABEL_VALUE_MAX,
        },
        "maxProperties": MAX_LABELS,
        "description": "host labels, KEY: VALUE (keys [PREFIX/]NAME, NAME and values of "
        'letters, digits, "-", "_", ".", starting and ending with a letter or digit; a value '
        "may be empty); a selector matches a host when every pair is among its labels, {} "
        "matches every host",
        "examples": [{"role": "db", "env": "prod"}],
    }
    fleet_rule = copy.deepcopy(rule)
    fleet_rule["properties"]["hosts"] = {
        **_ref("LabelSelector"),
        "description": "fleet only: the hosts the rule applies on (left out: every host)",
    }
    fleet_rule["description"] = (
        "A rule of a fleet policy document: a Rule, plus hosts. Local API writes refuse hosts."
    )
    fleet_group = copy.deepcopy(group)
    fleet_group["properties"]["select"] = {
        **_ref("LabelSelector"),
        "description": "fleet only: the group also holds the addresses of every agent whose "
        "labels match",
    }
    fleet_group["description"] = (
        "A group of a fleet policy document (contract §5, §7): members, plus select. Local "
        "API writes refuse select."
    )
    fleet_set = copy.deepcopy(policy_set)
    fleet_set["properties"]["groups"]["additionalProperties"] = _ref("FleetGroup")
    fleet_set["properties"]["policies"]["items"] = _ref("FleetRule")
    fleet_set["description"] = (
        "A fleet policy document (microseg fleet apply): a PolicySet whose rules may give "
        "hosts and groups select. Not taken by this API."
    )
    return {
        "LabelSelector": selector,
        "FleetRule": fleet_rule,
        "FleetGroup": fleet_group,
        "FleetPolicySet": fleet_set,
    }


def _schemas() -> dict[str, Any]:
    schemas = _model_schemas()
    verdicts = {
        "type": "object",
        "properties": {v: _COUNT for v in VERDICTS},
        "required": list(VERDICTS),
        "additionalProperties": False,
    }
    by_direction = _obj(
        {d: verdicts for d in PACKET_DIRECTIONS}, description="packets by direction and verdict"
    )
    counters = {
        "total_packets": _COUNT,
        "allowed_packets": {**_COUNT, "description": "passed by a verdict, log included"},
        "denied_packets": _COUNT,
        "logged_packets": {**_COUNT, "description": "passed by a log verdict"},
        "new_sessions": _COUNT,
        "closed_sessions": {**_COUNT, "description": "0 until TCP state tracking lands"},
        "active_sessions": _COUNT,
        "policy_hits": {**_COUNT, "description": "flows decided by a rule"},
        "policy_misses": {**_COUNT, "description": "flows decided by the default action"},
        "session_hits": _COUNT,
        "rejudged_sessions": _COUNT,
        "parse_drops": _COUNT,
        "fragment_drops": _COUNT,
        "l2_passed": _COUNT,
        "events_sent": _COUNT,
        "events_lost": _COUNT,
        "session_create_failed": _COUNT,
        "session_table_capacity": _COUNT,
        "total_bytes": _COUNT,
        "failsafe_passed": {**_COUNT, "description": "packets of failsafe flows (passed first)"},
        "failsafe_flows": {**_COUNT, "description": "flows the failsafe list passed"},
        "staged_flows": {
            **_COUNT,
            "description": "flows whose staged verdict differs from the enforced one",
        },
        "by_direction": _ref("ByDirection"),
    }
    component = {"status": {"type": "string"}, "message": {"type": "string"}}
    hits = {
        "packets": _COUNT,
        "bytes": _COUNT,
        "last_hit": _TIME,
        "staged_packets": {
            **_COUNT,
            "description": "packets of the flows it would have decided where the staged view "
            "differs from the enforced one (docs/contract.md §6)",
        },
        "staged_bytes": _COUNT,
        "staged_flows": _COUNT,
    }
    schemas.update(
        {
            "Error": _obj(
                {
                    "error": {"type": "string", "description": "machine-readable code"},
                    "message": {"type": "string", "description": "what is wrong, for a person"},
                    "errors": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "each problem (validation errors)",
                    },
                },
                required=["error", "message"],
            ),
            "Health": _obj({"status": {"const": "ok"}, "message": {"type": "string"}}),
            "ByDirection": by_direction,
            "Stats": _obj(
                counters,
                extra=True,
                description="Counters since the classifier was loaded. Extra "
                "counters (the event pipeline's) may be present.",
            ),
            "PacketStats": _obj(
                {
                    "total_packets": _COUNT,
                    "allowed_packets": _COUNT,
                    "denied_packets": _COUNT,
                    "logged_packets": _COUNT,
                    "allow_rate": _RATE,
                    "deny_rate": _RATE,
                    "by_direction": _ref("ByDirection"),
                },
                description="Rates are percent of total_packets (which also counts packets "
                "no verdict was taken for).",
            ),
            "RuleHits": _obj(
                {
                    "rule_id": {"type": "integer", "minimum": 1, "maximum": MAX_RULE_ID},
                    "name": {"type": "string"},
                    "action": _ref("Action"),
                    "mode": {"const": "staged", "description": "only when the rule is staged"},
                    **hits,
                },
                required=["rule_id", "name", "action", *hits],
            ),
            "PolicyStats": _obj(
                {
                    "policy_hits": _COUNT,
                    "policy_misses": _COUNT,
                    "hit_rate": _RATE,
                    "rule_count": _COUNT,
                    "default": _obj(
                        hits,
                        description="flows decided by the default action (staged_*: by the "
                        "staged default where the views differ)",
                    ),
                    "rules": {
                        "type": "array",
                        "items": _ref("RuleHits"),
                        "description": "most hit first, at most `limit`",
                    },
                }
            ),
            "RuleDetail": _obj(
                {**schemas["RuleOut"]["properties"], **hits},
                required=[*schemas["RuleOut"]["required"], *hits],
                description="A rule with its hit counters (packets and bytes of the flows it "
                "decided, and when it last decided one) and its staged counters (what it "
                "would have decided where the staged view differs: docs/contract.md §6).",
            ),
            "PolicyList": _obj(
                {
                    "policies": {"type": "array", "items": _ref("RuleOut")},
                    "count": _COUNT,
                    "default_action": _ref("DefaultAction"),
                    "groups": {
                        "type": "object",
                        "additionalProperties": _ref("Group"),
                        "description": "the address groups by name, members canonical",
                    },
                    "generation": _COUNT,
                    "policy_mode": _POLICY_MODE,
                    "failsafe": _FAILSAFE,
                },
                description="The whole policy document (default_action, groups, policies: "
                "what PUT /policies takes) with the rule count, the generation and how the "
                "agent applies it (policy_mode, failsafe: not part of the document).",
            ),
            "GroupSummary": _obj(
                {"name": _GROUP_NAME_SCHEMA, "member_count": _COUNT, "rules": _RULE_IDS}
            ),
            "GroupList": _obj(
                {"groups": {"type": "array", "items": _ref("GroupSummary")}, "count": _COUNT},
                description="Every group, by name.",
            ),
            "GroupDetail": _obj(
                {
                    "name": _GROUP_NAME_SCHEMA,
                    "members": _MEMBERS_SCHEMA,
                    "member_count": _COUNT,
                    "rules": _RULE_IDS,
                }
            ),
            "Members": _obj(
                {"members": _MEMBERS_SCHEMA},
                description="Members to add or remove (canonicalized; repeats count once).",
            ),
            "GroupChange": _obj(
                {
                    "dry_run": {"type": "boolean"},
                    "generation": {
                        **_COUNT,
                        "description": "after the change (dry run, or nothing changed: now)",
                    },
                    "name": _GROUP_NAME_SCHEMA,
                    "created": {"type": "boolean", "description": "PUT made a new group"},
                    "deleted": {"type": "boolean"},
                    "members_added": {
                        **_MEMBERS_SCHEMA,
                        "description": "members that went into the group",
                    },
                    "members_removed": {
                        **_MEMBERS_SCHEMA,
                        "description": "members that left the group",
                    },
                    "members_unchanged": {
                        **_MEMBERS_SCHEMA,
                        "description": "members given that changed nothing: already in the "
                        "group (add) or not in it (remove)",
                    },
                    "member_count": {**_COUNT, "description": "after the change"},
                    "rules": _RULE_IDS,
                    "sessions_checked": {**_COUNT, "description": "dry run only"},
                    "sessions_changing_verdict": {
                        **_COUNT,
                        "description": "dry run only: live sessions the change would judge "
                        "differently",
                    },
                    "failsafe": {
                        **_FAILSAFE,
                        "description": "dry run only: " + _FAILSAFE["description"],
                    },
                    "pending": _PENDING,
                },
                required=[
                    "dry_run",
                    "generation",
                    "name",
                    "created",
                    "deleted",
                    "members_added",
                    "members_removed",
                    "members_unchanged",
                    "member_count",
                    "rules",
                ],
                description="What a group change did (or, dry run, would do).",
            ),
            "Change": _obj(
                {
                    "dry_run": {"type": "boolean"},
                    "generation": {**_COUNT, "description": "after the change (dry run: now)"},
                    "added": {"type": "array", "items": _ref("RuleOut")},
                    "removed": {"type": "array", "items": _ref("RuleOut")},
                    "changed": {
                        "type": "array",
                        "items": _obj({"before": _ref("RuleOut"), "after": _ref("RuleOut")}),
                    },
                    "default_action_changed": {"type": "boolean"},
                    "groups_added": {"type": "array", "items": _GROUP_NAME_SCHEMA},
                    "groups_removed": {"type": "array", "items": _GROUP_NAME_SCHEMA},
                    "groups_changed": {
                        "type": "array",
                        "items": _GROUP_NAME_SCHEMA,
                        "description": "groups whose members differ",
                    },
                    "sessions_checked": {**_COUNT, "description": "dry run only"},
                    "sessions_changing_verdict": {
                        **_COUNT,
                        "description": "dry run only: live sessions the change would judge "
                        "differently",
                    },
                    "failsafe": {
                        **_FAILSAFE,
                        "description": "dry run only: " + _FAILSAFE["description"],
                    },
                    "pending": _PENDING,
                },
                required=[
                    "dry_run",
                    "generation",
                    "added",
                    "removed",
                    "changed",
                    "default_action_changed",
                ],
                description="What a change did (or, dry run, would do).",
            ),
            "Status": _obj(
                {
                    "status": {"enum": ["ok", "degraded"]},
                    "version": {"type": "string"},
                    "interface": {"type": "string", "description": "comma-separated"},
                    "interfaces": {"type": "array", "items": {"type": "string"}},
                    "data_plane": _obj({**component, "generation": _COUNT}),
                    "api": _obj(component),
                    "statistics": _ref("Stats"),
                    "policy_count": _COUNT,
                    "policy_generation": _COUNT,
                    "policy_mode": _POLICY_MODE,
                    "failsafe": _FAILSAFE,
                    "pending": {
                        "anyOf": [
                            {"type": "null"},
                            {
                                **_PENDING,
                                "properties": {
                                    **_PENDING["properties"],
                                    "confirm_within": {"type": "integer"},
                                    "actor": {"type": "string"},
                                    "change": {"type": "string"},
                                    "replaces_generation": _COUNT,
                                },
                                "required": list(_PENDING["required"]),
                            },
                        ],
                        "description": "the change waiting for its confirmation, or null",
                    },
                    "fleet": {
                        "anyOf": [
                            {"type": "null"},
                            {
                                "type": "object",
                                "properties": {
                                    "bootstrap": {"type": "string"},
                                    "policy_topic": {"type": "string"},
                                    "agents_topic": {"type": "string"},
                                    "host": {"type": "string"},
                                    "labels": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                    "addresses": {"type": "array", "items": {"type": "string"}},
                                    "generation": _COUNT,
                                    "state": {"enum": ["enforcing", "error"]},
                                    "error": {"type": ["string", "null"]},
                                    "connected": {"type": "boolean"},
                                    "agents": {"type": "array", "items": {"type": "string"}},
                                    "confirm_deadline": {"type": ["number", "null"]},
                                },
                                "required": ["host", "labels", "generation", "state"],
                            },
                        ],
                        "description": "fleet mode (contract §7): this host in the fleet and "
                        "the fleet generation it enforces; null outside fleet mode",
                    },
                    "flow_sources": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["local", "fleet"]},
                        "description": "the feeds `source` of /api/v1/flows names: fleet "
                        "when the agent is given the fleet's flows topic",
                    },
                    "uptime_seconds": _COUNT,
                }
            ),
            "Session": _obj(
                {
                    "src_ip": {"type": "string"},
                    "dst_ip": {"type": "string"},
                    "src_port": {"type": "integer", "minimum": 0, "maximum": 65535},
                    "dst_port": {"type": "integer", "minimum": 0, "maximum": 65535},
                    "protocol": {"type": "string"},
                    "family": {"enum": [4, 6]},
                    "direction": {"type": "string", "description": "of the first packet"},
                    "verdict": {"type": "string"},
                    "rule_id": {
                        "type": ["integer", "null"],
                        "description": "null: the default action decided",
                    },
                    "policy_generation": _COUNT,
                    "ifindex": _COUNT,
                    "first_seen": _TIME,
                    "last_seen": _TIME,
                    "packets_out": {**_COUNT, "description": "from the originator"},
                    "bytes_out": _COUNT,
                    "packets_in": {**_COUNT, "description": "replies"},
                    "bytes_in": _COUNT,
                    "tcp_flags": {
                        "type": ["string", "null"],
                        "description": "TCP flags seen, e.g. SYN|ACK; null if not TCP",
                    },
                },
                description="A session table entry, oriented as its first packet went.",
            ),
            "SessionList": _obj(
                {
                    "sessions": {"type": "array", "items": _ref("Session")},
                    "count": _COUNT,
                    "truncated": {
                        "type": "boolean",
                        "description": "more sessions matched than `limit`",
                    },
                }
            ),
        }
    )
    schemas["Promoted"] = _obj(
        {
            **schemas["Change"]["properties"],
            "generation": {**_COUNT, "description": "after the change (dry run: now)"},
            "promoted": {
                "type": "array",
                "items": _obj(
                    {
                        "rule_id": _COUNT,
                        "staged_packets": _COUNT,
                        "staged_bytes": _COUNT,
                        "staged_flows": _COUNT,
                    },
                    required=["rule_id", "staged_packets", "staged_bytes", "staged_flows"],
                ),
                "description": "what each rule decided while staged",
            },
        },
        required=["generation", "promoted"],
        description="The promoted rules with what they decided while staged; a dry "
        "run has the diff (Change) too.",
    )
    return schemas


_ERRORS: Final[dict[int, str]] = {
    400: "Invalid input: the message names the field, what was wrong and what is allowed",
    401: "No or wrong bearer token",
    403: "A write whose Origin is not the API's own (cross-site request)",
    404: "No rule with this rule_id, or no group of this name",
    409: "A rule with this rule_id exists already, or (in_use) rules name the group; (managed) "
    "a write to an agent in fleet mode, whose policy the fleet decides",
    413: "The body is too large",
    415: "The body is not application/json",
    421: "The Host header names neither the API's address nor localhost (DNS rebinding)",
    500: "Unexpected failure (details only in the agent's log)",
    503: "The kernel or the disk refused the change; nothing was changed",
}


def _error_response(status: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": _ERRORS[status],
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    if status == 401:
        out["headers"] = {
            "WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}
        }
    return out


def _json(
    schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        out["headers"] = headers
    return out


_GENERATION_HEADER: Final = {
    "X-Policy-Generation": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "the policy generation after the change (dry run: the current one)",
    }
}


def _op(
    summary: str,
    ok: dict[str, dict[str, Any]],
    errors: list[int],
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    auth: bool = True,
    description: str | None = None,
) -> dict[str, Any]:
    codes = sorted({*errors, 421, 500} | ({401} if auth else set()))
    op: dict[str, Any] = {"summary": summary, "responses": {**ok}}
    if description:
        op["description"] = description
    for code in codes:
        op["responses"][str(code)] = _error_response(code)
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = body
    if not auth:
        op["security"] = []
    return op


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_DRY_RUN: Final = _query(
    "dry_run",
    {"type": "string", "enum": ["1", "0", "true", "false", "yes", "no", "on", "off"]},
    "1: change nothing and answer with the diff the change would make, and how many live "
    "sessions would change verdict",
)
_CONFIRM_WITHIN: Final = _query(
    "confirm_within",
    {"type": "integer", "minimum": 1, "maximum": 3600},
    "apply at once, and revert after this many seconds unless POST /policies/confirm keeps it "
    "(the answer has `pending`); meanwhile other writes answer 409 pending",
)
_FORCE: Final = _query(
    "force",
    {"type": "string", "enum": ["1", "0", "true", "false", "yes", "no", "on", "off"]},
    "1: apply even if the new set would deny the connection the request came on (else 409 lockout)",
)
_WRITE_PARAMS: Final = [_DRY_RUN, _CONFIRM_WITHIN, _FORCE]

_RULE_ID: Final = {
    "name": "rule_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_RULE_ID},
    "description": "the rule's rule_id",
}


_GROUP_NAME: Final = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": _GROUP_NAME_SCHEMA,
    "description": "the group's name",
}


def _group_paths(write_errors: list[int]) -> dict[str, Any]:
    """/groups, /groups/{name} and /groups/{name}/members (streamer/api/groups.py)."""
    change = _json(
        _ref("GroupChange"), "The change, enforced (dry run: what it would do)", _GENERATION_HEADER
    )
    members = _body("Members", "the members (at most 64 MiB)")
    return {
        "/api/v1/groups": {
            "get": _op(
                "Every address group: names, member counts, the rules using each",
                {"200": _json(_ref("GroupList"), "The groups")},
                [400],
            )
        },
        "/api/v1/groups/{name}": {
            "parameters": [_GROUP_NAME],
            "get": _op(
                "One group: its members and the rules using it",
                {"200": _json(_ref("GroupDetail"), "The group")},
                [400, 404],
            ),
            "put": _op(
                "Create a group, or replace its members",
                {
                    "201": _json(
                        _ref("GroupChange"),
                        "Created and enforced",
                        {
                            **_GENERATION_HEADER,
                            "Location": {
                                "schema": {"type": "string"},
                                "description": "the group's URL",
                            },
                        },
                    ),
                    "200": change,
                },
                write_errors,
                params=_WRITE_PARAMS,
                body=_body("Group", "the group (at most 64 MiB)"),
            ),
            "delete": _op(
                "Delete a group no rule uses",
                {"200": change},
                [400, 403, 404, 409, 503],
                params=_WRITE_PARAMS,
                description="409 (in_use) while a rule names the group; the message lists "
                "the rules.",
            ),
        },
        "/api/v1/groups/{name}/members": {
            "parameters": [_GROUP_NAME],
            "post": _op(
                "Add members (idempotent)",
                {"200": change},
                [*write_errors, 404],
                params=_WRITE_PARAMS,
                body=members,
                description="Members already in the group change nothing "
                "(members_unchanged); when none is new the generation stays.",
            ),
            "delete": _op(
                "Remove members (idempotent)",
                {"200": change},
                [*write_errors, 404],
                params=_WRITE_PARAMS,
                body=members,
                description="Members not in the group change nothing (members_unchanged); "
                "when none is removed the generation stays.",
            ),
        },
    }


def _body(schema: str, description: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": description,
        "content": {"application/json": {"schema": _ref(schema)}},
    }


def build_openapi(version: str, auth: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document for an agent of `version` (`auth`: a token is required)."""
    write_errors = [400, 403, 409, 413, 415, 503]
    change = _json(_ref("Change"), "Dry run: the diff; nothing was changed", _GENERATION_HEADER)
    ip_desc = "an address or CIDR"
    paths: dict[str, Any] = {
        "/api/v1/health": {
            "get": _op(
                "Liveness", {"200": _json(_ref("Health"), "The API answers")}, [], auth=False
            )
        },
        "/api/v1/status": {
            "get": _op("Agent status", {"200": _json(_ref("Status"), "Status")}, [400])
        },
        "/api/v1/policies": {
            "get": _op(
                "The applied policy set",
                {"200": _json(_ref("PolicyList"), "Every rule, in set order")},
                [400],
            ),
            "post": _op(
                "Add one rule",
                {
                    "201": _json(
                        _ref("RuleWritten"),
                        "Added and enforced in the kernel",
                        {
                            **_GENERATION_HEADER,
                            "Location": {
                                "schema": {"type": "string"},
                                "description": "the rule's URL",
                            },
                        },
                    ),
                    "200": change,
                },
                [*write_errors, 409],
                params=_WRITE_PARAMS,
                body=_body("Rule", "the rule (at most 64 KiB)"),
            ),
            "put": _op(
                "Replace the whole set atomically",
                {
                    "200": _json(
                        _ref("Change"),
                        "Replaced and enforced (or, dry run, the diff)",
                        _GENERATION_HEADER,
                    )
                },
                write_errors,
                params=_WRITE_PARAMS,
                body=_body("PolicySet", "the new set (at most 64 MiB)"),
            ),
        },
        "/api/v1/policies/reload": {
            "post": _op(
                "Re-apply the agent's policy file (as a whole-set replace)",
                {"200": _json(_ref("Change"), "The file's set is enforced", _GENERATION_HEADER)},
                [400, 403, 404, 409, 503],
                params=[_CONFIRM_WITHIN, _FORCE],
                description="400: the file is invalid (nothing changed). 404: the agent has "
                "no policy file.",
            )
        },
        "/api/v1/policies/promote": {
            "post": _op(
                "Enforce several staged rules in one generation",
                {"200": _json(_ref("Promoted"), "Enforced", _GENERATION_HEADER)},
                [*write_errors, 404],
                params=_WRITE_PARAMS,
                body={
                    "required": True,
                    "description": "the staged rules to enforce",
                    "content": {
                        "application/json": {
                            "schema": _obj(
                                {
                                    "rule_ids": {
                                        "type": "array",
                                        "items": _RULE_ID["schema"],
                                        "minItems": 1,
                                        "maxItems": 10000,
                                    }
                                },
                                required=["rule_ids"],
                            )
                        }
                    },
                },
                description="404: an unknown rule. 409 not_staged: a rule is not staged; "
                "409 staged_agent: the agent runs with --policy-mode staged. Nothing changes "
                "on any error.",
            )
        },
        "/api/v1/policies/{rule_id}/promote": {
            "parameters": [_RULE_ID],
            "post": _op(
                "Enforce one staged rule",
                {"200": _json(_ref("Promoted"), "Enforced", _GENERATION_HEADER)},
                [*write_errors, 404],
                params=_WRITE_PARAMS,
                description="404: no such rule. 409 not_staged, 409 staged_agent.",
            ),
        },
        "/api/v1/policies/confirm": {
            "post": _op(
                "Keep the change pending confirmation (made with ?confirm_within)",
                {
                    "200": _json(
                        _obj({"generation": _COUNT, "confirmed": {"const": True}}),
                        "Confirmed: the change stays",
                        _GENERATION_HEADER,
                    )
                },
                [400, 403, 409, 413, 415, 503],
                body={
                    "required": True,
                    "description": "the pending change's generation",
                    "content": {
                        "application/json": {
                            "schema": _obj({"generation": {"type": "integer", "minimum": 1}})
                        }
                    },
                },
                description="409 not_pending: that generation is not the change waiting "
                "(none is, another is, or it was reverted).",
            )
        },
        "/api/v1/policies/{rule_id}": {
            "parameters": [_RULE_ID],
            "get": _op(
                "One rule with its hit counters",
                {"200": _json(_ref("RuleDetail"), "The rule")},
                [400, 404],
            ),
            "put": _op(
                "Replace one rule",
                {
                    "200": _json(
                        {"anyOf": [_ref("RuleWritten"), _ref("Change")]},
                        "The rule as enforced (dry run: the diff)",
                        _GENERATION_HEADER,
                    )
                },
                [*write_errors, 404],
                params=_WRITE_PARAMS,
                body=_body("RuleUpdate", "the rule (at most 64 KiB)"),
            ),
            "delete": _op(
                "Delete one rule",
                {
                    "200": _json(
                        {"anyOf": [_ref("RuleWritten"), _ref("Change")]},
                        "The deleted rule, no longer enforced (dry run: the diff)",
                        _GENERATION_HEADER,
                    )
                },
                [400, 403, 404, 409, 503],
                params=_WRITE_PARAMS,
            ),
        },
        "/api/v1/stats": {
            "get": _op("All counters", {"200": _json(_ref("Stats"), "Counters")}, [400])
        },
        "/api/v1/stats/packets": {
            "get": _op(
                "Packet counters and rates",
                {"200": _json(_ref("PacketStats"), "Packet counters")},
                [400],
            )
        },
        "/api/v1/stats/policies": {
            "get": _op(
                "Rule hits and the hit rate",
                {"200": _json(_ref("PolicyStats"), "Policy counters")},
                [400],
                params=[
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": RULE_LIMIT_MAX,
                            "default": 100,
                        },
                        "at most this many rules in `rules`, most hit first",
                    )
                ],
            )
        },
        "/api/v1/sessions": {
            "get": _op(
                "Live sessions",
                {"200": _json(_ref("SessionList"), "Matching sessions")},
                [400],
                params=[
                    _query("ip", {"type": "string"}, f"either end is in {ip_desc}"),
                    _query("src_ip", {"type": "string"}, f"the originator is in {ip_desc}"),
                    _query("dst_ip", {"type": "string"}, f"the responder is in {ip_desc}"),
                    _query(
                        "port", {"type": "integer", "minimum": 0, "maximum": 65535}, "either port"
                    ),
                    _query(
                        "src_port",
                        {"type": "integer", "minimum": 0, "maximum": 65535},
                        "the originator's port",
                    ),
                    _query(
                        "dst_port",
                        {"type": "integer", "minimum": 0, "maximum": 65535},
                        "the responder's port",
                    ),
                    _query(
                        "protocol",
                        {"enum": [p.value for p in Protocol]},
                        "protocol name",
                    ),
                    _query("verdict", {"enum": list(VERDICTS)}, "the session's verdict"),
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": SESSION_LIMIT_MAX,
                            "default": 100,
                        },
                        "at most this many sessions",
                    ),
                ],
            )
        },
        "/api/v1/flows": {
            "get": _op(
                "Live flow events (WebSocket)",
                {
                    "101": {
                        "description": "Switching to a WebSocket: one text message per flow "
                        "event or lost record (docs/flow-event.schema.json); a client too "
                        'slow to keep up gets {"type": "slow_consumer"} and is closed (1008)'
                    }
                },
                [400, 403, 503],
                params=[
                    _query(
                        "verdict",
                        {"type": "string", "pattern": "^(allow|deny|log)(,(allow|deny|log))*$"},
                        "only these verdicts (comma-separated)",
                    ),
                    _query("ip", {"type": "string"}, f"either end is in {ip_desc}"),
                    _query(
                        "port",
                        {"type": "string", "pattern": "^[0-9]{1,5}(,[0-9]{1,5})*$"},
                        "either port is one of these (comma-separated)",
                    ),
                    _query(
                        "protocol",
                        {"type": "string"},
                        "tcp, udp, icmp or icmpv6 (comma-separated)",
                    ),
                    _query(
                        "rule_id",
                        {"type": "string", "pattern": "^[0-9]{1,10}(,[0-9]{1,10})*$"},
                        "only events decided by these rules (comma-separated)",
                    ),
                    _query("staged", _STAGED_PARAM, _STAGED_DESC),
                    _query("source", _SOURCE_PARAM, _SOURCE_DESC),
                    _query(
                        "token",
                        {"type": "string"},
                        "the API token, for browsers (which cannot send headers on a "
                        "WebSocket handshake)",
                    ),
                ],
                description="Upgrade to a WebSocket. A plain GET is answered 400.",
            )
        },
        "/api/v1/openapi.json": {
            "get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}, [400])
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "Prometheus text exposition format (microseg_* names)",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                [],
                auth=False,
            )
        },
    }
    paths.update(_group_paths(write_errors))
    paths.update(_viewer_paths())
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "microseg admin API",
            "version": version,
            "description": (
                "Policy CRUD, address groups, counters and sessions of a microseg agent. "
                'Errors are {"error": code, "message": text}. Unknown query parameters and body '
                "fields are rejected. Writes return once the change is enforced in the kernel."
            ),
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
    if auth:
        doc["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "the token in <state-dir>/api-token",
            }
        }
        doc["security"] = [{"bearer": []}]
    else:
        for item in paths.values():
            for op in item.values():
                if isinstance(op, dict) and "responses" in op:
                    op["responses"].pop("401", None)
                    op.pop("security", None)
    return doc


# ---- the viewer (streamer/api/viewer.py) ---------------------------------------------------------


def _html_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/html": {"schema": {"type": "string"}}}}


def _viewer_paths() -> dict[str, Any]:
    """The browser viewer's page, files and sign-in, and the feed's recent records."""
    sign_in = _html_response("Not signed in: a page saying how to get a sign-in link")
    filters = [
        _query("verdict", {"type": "string"}, "only these verdicts (comma-separated)"),
        _query("ip", {"type": "string"}, "either end is in this address or CIDR"),
        _query("port", {"type": "string"}, "either port is one of these (comma-separated)"),
        _query("protocol", {"type": "string"}, "tcp, udp, icmp or icmpv6 (comma-separated)"),
        _query("rule_id", {"type": "string"}, "decided by these rules (comma-separated)"),
        _query("staged", _STAGED_PARAM, _STAGED_DESC),
        _query("source", _SOURCE_PARAM, _SOURCE_DESC),
    ]
    index = _op(
        "The flow viewer (HTML)",
        {"200": _html_response("The viewer page")},
        [],
        description="For a browser signed in by the session cookie (see /login) or a token; "
        "otherwise 401 with a page saying how to sign in.",
    )
    index["responses"]["401"] = sign_in
    login = _op(
        "Sign a browser in with a one-time code",
        {
            "200": _html_response(
                "Signed in: sets the HttpOnly, SameSite=Strict session cookie and moves on to /"
            )
        },
        [400],
        params=[{**_query("code", {"type": "string"}, "the one-time code"), "required": False}],
        description="The code (from the agent's start-up output or POST "
        "/api/v1/viewer/codes) works once and expires.",
    )
    login["responses"]["401"] = _html_response("Unknown, used or expired code")
    login["security"] = []
    paths: dict[str, Any] = {"/": {"get": index}, "/login": {"get": login}}
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        paths[f"/viewer/{name}"] = {
            "get": _op(
                f"The viewer's {name}",
                {"200": {"description": name, "content": {kind: {"schema": {"type": "string"}}}}},
                [400],
            )
        }
    paths["/api/v1/viewer/codes"] = {
        "post": _op(
            "A one-time sign-in link for a browser",
            {
                "201": _json(
                    _obj(
                        {
                            "path": {"type": "string", "description": "/login?code=..."},
                            "expires_in_seconds": _COUNT,
                        }
                    ),
                    "Open http://<api>{path} in a browser, once, before it expires",
                )
            },
            [400, 403],
            description="Needs the bearer token (a browser session cannot mint codes).",
        )
    }
    paths["/api/v1/flows/recent"] = {
        "get": _op(
            "The feed's most recent records",
            {
                "200": _json(
                    _obj(
                        {
                            "events": {
                                "type": "array",
                                "items": {"type": "object"},
                                "description": "flow events and lost records, oldest first",
                            },
                            "count": _COUNT,
                            "kept": {**_COUNT, "description": "how many records the agent keeps"},
                        }
                    ),
                    "The last `limit` matching records",
                )
            },
            [400],
            params=[
                *filters,
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100},
                    "at most this many",
                ),
            ],
        )
    }
    return paths
