"""Reading a request's input: query parameters, the rule id in the path, and JSON bodies.

In: an aiohttp request. Out: checked values (`query_params`, `dry_run_param`, `flag_param`,
`int_param`, `path_rule_id`, `path_group_name`), the parsed JSON body (`read_json`, within
`SMALL_BODY_LIMIT`, `GROUP_BODY_LIMIT` or `WHOLE_SET_BODY_LIMIT`) and that body validated into
a `Rule`, `Group` or `PolicySet` (`validate_rule`, `validate_group`, `validate_set`) or a member
list (`members_body`). Anything else is an `ApiError`: 400 for an unknown or repeated query
parameter (a typo like `?dryrun=1` must not apply a change) or a bad value, 415 for a body that
is not UTF-8 `application/json`, 413 for one above the limit; validation lists at most 20
problems in the message.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import orjson
import pydantic
from aiohttp import web

from streamer.api.context import ApiError, short
from streamer.policy.model import (
    MAX_RULE_ID,
    Group,
    PolicyError,
    PolicySet,
    Rule,
    check_group_name,
    format_validation_error,
    parse_policy_document,
)

__all__ = [
    "GROUP_BODY_LIMIT",
    "SMALL_BODY_LIMIT",
    "WHOLE_SET_BODY_LIMIT",
    "dry_run_param",
    "flag_param",
    "int_param",
    "members_body",
    "path_group_name",
    "path_rule_id",
    "query_params",
    "read_json",
    "validate_group",
    "validate_rule",
    "validate_set",
]

SMALL_BODY_LIMIT: Final = 64 * 1024
WHOLE_SET_BODY_LIMIT: Final = 64 * 1024 * 1024  # 100,000 full rules take about 20 MiB
# A group's members (PUT /groups/{name}, the member routes): 100,000 IPv6 CIDRs take about
# 5 MiB, a million about 45.
GROUP_BODY_LIMIT: Final = 64 * 1024 * 1024
_BIG_JSON: Final = 256 * 1024  # parse and validate bodies above this off the event loop


def query_params(request: web.Request, allowed: tuple[str, ...] = ()) -> dict[str, str]:
    """The query parameters, each at most once and all of them known; else 400."""
    out: dict[str, str] = {}
    for key, value in request.query.items():
        if key not in allowed:
            hint = f"allowed: {', '.join(allowed)}" if allowed else "this route takes none"
            raise ApiError(400, f"unknown query parameter {short(key, 40)!r}: {hint}")
        if key in out:
            raise ApiError(400, f"query parameter {key!r} is given more than once")
        out[key] = value
    return out


_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def dry_run_param(request: web.Request) -> bool:
    return flag_param("dry_run", query_params(request, ("dry_run",)).get("dry_run"))


def flag_param(name: str, value: str | None) -> bool:
    """A yes/no query parameter (absent: no)."""
    if value is None:
        return False
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    # A bare `?dry_run` is ambiguous: refuse it rather than guess and maybe apply.
    raise ApiError(400, f"{name}: {short(value, 40)!r} is not a flag: use {name}=1 or {name}=0")


def int_param(name: str, value: str, low: int, high: int) -> int:
    if not (value.isascii() and value.isdigit() and len(value) <= 10):
        raise ApiError(400, f"{name}: {short(value, 40)!r} is not a whole number {low}..{high}")
    number = int(value)
    if not low <= number <= high:
        raise ApiError(400, f"{name}: {number} is out of range: use {low}..{high}")
    return number


def path_group_name(request: web.Request) -> str:
    raw = request.match_info["name"]
    try:
        return check_group_name(raw)
    except ValueError as e:
        raise ApiError(400, f"group name in the path: {e}") from None


def path_rule_id(request: web.Request) -> int:
    raw = request.match_info["rule_id"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not (
        1 <= int(raw) <= MAX_RULE_ID
    ):
        raise ApiError(
            400,
            f"rule_id in the path: {short(raw, 40)!r} is not a valid rule_id: use an int "
            f"1..{MAX_RULE_ID}",
        )
    return int(raw)


async def read_json(request: web.Request, limit: int) -> Any:
    """The JSON body: 415 unless application/json (UTF-8), 413 above `limit`, 400 if bad."""
    if "Content-Type" not in request.headers or request.content_type != "application/json":
        given = request.headers.get("Content-Type", "none")
        raise ApiError(
            415,
            f"the body must be JSON, sent with 'Content-Type: application/json' "
            f"(got {short(given, 60)!r})",
        )
    charset = request.charset
    if charset is not None and charset.lower().replace("-", "") != "utf8":
        raise ApiError(
            415,
            f"JSON must be UTF-8 (application/json; charset=utf-8), not {short(charset, 30)!r}",
        )
    too_large = ApiError(413, f"the body is larger than {limit // 1024} KiB, the limit here")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        raise ApiError(400, "the body is empty: expected a JSON object")
    try:
        if len(body) > _BIG_JSON:
            return await asyncio.to_thread(orjson.loads, body)
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ApiError(
            400, f"the body is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}"
        ) from None


def _problems(errors: list[str]) -> ApiError:
    """A 400 listing validation problems: all in `errors`, the first ones in the message."""
    shown = errors[:20]
    message = "\n".join(shown)
    if len(errors) > len(shown):
        message += f"\n... and {len(errors) - len(shown)} more problems"
    return ApiError(400, message, errors=errors)


def validate_rule(data: Any) -> Rule:
    try:
        return Rule.model_validate(data)
    except pydantic.ValidationError as e:
        raise _problems(format_validation_error(e, data)) from None


def validate_group(data: Any) -> Group:
    """A group body ({"members": [...]})."""
    try:
        return Group.model_validate(data)
    except pydantic.ValidationError as e:
        raise _problems(format_validation_error(e, data)) from None


def members_body(data: Any) -> list[Any]:
    """The list of a member route's body ({"members": [...]}); each member is the store's
    to check."""
    shape = 'expected an object {"members": [ADDRESS or CIDR, ...]}'
    if not isinstance(data, dict):
        raise ApiError(400, f"the body is not an object: {shape}")
    extra = [k for k in data if k != "members"]
    if extra:
        raise ApiError(400, f"{short(repr(extra[0]), 40)}: unknown field; {shape}")
    members = data.get("members")
    if not isinstance(members, list):
        given = "missing" if members is None else "not a list"
        raise ApiError(400, f"members: {given}: {shape}")
    return members


def validate_set(data: Any, fleet: bool = False) -> PolicySet:
    """A policy document, read as a policy file is (a missing default_action is "allow", a
    missing policies list is empty): the same document means the same set everywhere.
    `fleet`: in the fleet form (rules' `hosts`, groups' `select`: contract §7)."""
    try:
        return parse_policy_document(data, fleet=fleet)
    except PolicyError as e:
        raise _problems(e.errors) from None
