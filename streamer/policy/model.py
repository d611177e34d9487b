"""The policy model (docs/contract.md §2): rules, policy sets, validation and policy files.

In: policy documents (dicts from JSON/YAML, API bodies) or policy files.
Out: frozen, validated `Rule` objects with canonical field values and precomputed match data
(`src_net`, `dst_net`, `src_ports`, `dst_ports`, `proto_number`, `families`, `score`), grouped
in a `PolicySet`. Invalid input raises `PolicyError` whose `.errors` are messages a person can
act on (which rule, which field, what was wrong, what is allowed); nothing invalid is kept.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import socket
from collections.abc import Mapping
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Final, Self

import pydantic
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PlainValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from streamer.vocabulary import PROTOCOL_NUMBERS as VOCABULARY_NUMBERS
from streamer.vocabulary import Action, DefaultAction, Direction, Protocol

__all__ = [
    "MAX_NAME_LEN",
    "MAX_RULE_ID",
    "PROTOCOL_NUMBERS",
    "IPNet",
    "PolicyError",
    "PolicySet",
    "Rule",
    "format_validation_error",
    "load_policy_file",
    "parse_policy_document",
]

MAX_RULE_ID: Final = 2**32 - 1
MAX_PORT: Final = 65535
MAX_PRIORITY: Final = 65535
MAX_NAME_LEN: Final = 128

IPNet = IPv4Network | IPv6Network


# None = any protocol number.
PROTOCOL_NUMBERS: Final[dict[Protocol, int | None]] = {
    **{Protocol(name): number for name, number in VOCABULARY_NUMBERS.items()},
    Protocol.ANY: None,
}

# Ties on priority: deny beats log beats allow (docs/contract.md §2).
_ACTION_RANK: Final[dict[Action, int]] = {Action.DENY: 2, Action.LOG: 1, Action.ALLOW: 0}

# By IP version, 0 = either. ICMP is an IPv4 protocol and ICMPv6 an IPv6 one: a rule for
# either can only match that family.
_FAMILIES: Final[dict[int, frozenset[int]]] = {
    0: frozenset({4, 6}),
    4: frozenset({4}),
    6: frozenset({6}),
}

_CUSTOM = "microseg_invalid"
_PORT_HINT = 'use an int 0..65535 or "lo-hi"'
_IP_HINT = 'use an IPv4/IPv6 address or CIDR, or "any"'
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"


def _invalid(message: str) -> PydanticCustomError:
    # The message goes through the context so braces in user input are not format fields.
    return PydanticCustomError(_CUSTOM, "{reason}", {"reason": message})


def _show(value: Any) -> str:
    """A short JSON-like rendering of a user value for messages."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# (canonical text, version: 0 for "any", network address as int, prefix length)
_Addr = tuple[str, int, int, int]
_ANY_ADDR: Final[_Addr] = ("any", 0, 0, 0)


# Recent parses by input and by canonical text: the rule validator parses again the canonical
# text its field validator just produced. Bounded by clearing; a miss only costs a parse.
_IP_CACHE: dict[str, _Addr] = {}
_IP_CACHE_MAX: Final = 8192


def _parse_ip(text: str) -> _Addr:
    """Parse an address, CIDR or "any" into (canonical text, version, value, prefix length).

    Raises ValueError with the message for the user (without the field name).
    """
    addr = _IP_CACHE.get(text)
    if addr is None:
        addr = _parse_ip_uncached(text)
        if len(_IP_CACHE) >= _IP_CACHE_MAX:
            _IP_CACHE.clear()
        _IP_CACHE[text] = addr
        _IP_CACHE[addr[0]] = addr
    return addr


def _parse_ip_uncached(text: str) -> _Addr:
    # A bulk replace may hold 100k distinct addresses: ipaddress is too slow for that, so the
    # common forms take a fast path through inet_pton/inet_ntop and everything else (and every
    # error) goes through ipaddress, whose canonical text this path reproduces.
    addr, slash, plen = text.partition("/")
    if ":" in addr:
        family, version, bits = socket.AF_INET6, 6, 128
    else:
        family, version, bits = socket.AF_INET, 4, 32
    try:
        packed = socket.inet_pton(family, addr)
    except (OSError, ValueError):
        return _parse_ip_slow(text)
    canonical = socket.inet_ntop(family, packed)
    if family == socket.AF_INET:
        if canonical != addr:
            return _parse_ip_slow(text)  # leading zeros and the like: let ipaddress judge
    elif "." in canonical:
        return _parse_ip_slow(text)  # ::ffff:1.2.3.4: ipaddress writes it in hex
    value = int.from_bytes(packed, "big")
    if not slash:
        return canonical, version, value, bits
    if not plen.isdigit() or len(plen) > 3 or (plen[0] == "0" and plen != "0"):
        return _parse_ip_slow(text)
    prefix = int(plen)
    if prefix > bits or value & ((1 << (bits - prefix)) - 1):
        return _parse_ip_slow(text)
    if prefix == bits:
        return canonical, version, value, prefix
    return f"{canonical}/{prefix}", version, value, prefix


def _parse_ip_slow(text: str) -> _Addr:
    if text.lower() == "any":
        return _ANY_ADDR
    if "%" in text:
        raise ValueError(f"{_show(text)}: scoped IPv6 addresses (with %zone) are not supported")
    if not text.isascii() or text != text.strip():
        raise ValueError(f"{_show(text)} is not an IP address or CIDR: {_IP_HINT}")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{_show(text)} is not an IP address or CIDR: {_IP_HINT}") from exc
        raise ValueError(f"{_show(text)} has host bits set: did you mean {loose}?") from exc
    canonical = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
    return canonical, net.version, int(net.network_address), net.prefixlen


def _make_net(addr: _Addr) -> IPNet | None:
    if addr[1] == 4:
        return IPv4Network((addr[2], addr[3]))
    if addr[1] == 6:
        return IPv6Network((addr[2], addr[3]))
    return None


def _validate_ip(value: Any) -> str:
    if value.__class__ is str:
        addr = _IP_CACHE.get(value)
        if addr is not None:
            return addr[0]
    elif not isinstance(value, str):
        raise _invalid(f"{_show(value)} is not a string: {_IP_HINT}")
    try:
        return _parse_ip(value)[0]
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _validate_port(value: Any) -> int | str:
    # bool is an int subclass: a JSON `true` must not become port 1.
    if type(value) is int:
        if 0 <= value <= MAX_PORT:
            return value
        raise _invalid(f"{value} is not a port: {_PORT_HINT}")
    if isinstance(value, str):
        low, dash, high = value.partition("-")
        if not (
            dash
            and 0 < len(low) <= 5
            and 0 < len(high) <= 5
            and low.isascii()
            and low.isdigit()
            and high.isascii()
            and high.isdigit()
        ):
            raise _invalid(f"{_show(value)} is not a port: {_PORT_HINT}")
        lo, hi = int(low), int(high)
        if hi > MAX_PORT:
            raise _invalid(f"{_show(value)}: port {hi} is above 65535")
        if lo > hi:
            raise _invalid(f"{_show(value)}: the range is empty ({lo} > {hi}): write it as lo-hi")
        # "0-0" stays a range: it is a condition (port 0), while int 0 means no condition.
        if lo == hi and lo != 0:
            return lo
        return f"{lo}-{hi}"
    raise _invalid(f"{_show(value)} is not a port: {_PORT_HINT}")


# Match data of a rule, computed once at validation:
# (src addr, dst addr, src_ports, dst_ports, proto_number, families, score)
_Derived = tuple[
    _Addr, _Addr, tuple[int, int] | None, tuple[int, int] | None, int | None, frozenset[int], int
]
# Per protocol: (number or None for any, the only IP version it exists in or 0).
_PROTO_INFO: Final[dict[Protocol, tuple[int | None, int]]] = {
    Protocol.TCP: (6, 0),
    Protocol.UDP: (17, 0),
    Protocol.ICMP: (1, 4),
    Protocol.ICMPV6: (58, 6),
    Protocol.ANY: (None, 0),
}
_ACTION_BITS: Final[dict[Action, int]] = {
    action: rank << 32 for action, rank in _ACTION_RANK.items()
}


IPField = Annotated[str, PlainValidator(_validate_ip)]
PortField = Annotated[int | str, PlainValidator(_validate_port)]


class Rule(BaseModel):
    """One policy rule (docs/contract.md §2). Field values are canonical after validation.

    Derived (read-only): `src_net`/`dst_net` (None = any family), `src_ports`/`dst_ports`
    (inclusive range, None = no condition), `proto_number` (None = any), `families`,
    `score` (higher wins).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule_id: Annotated[int, Field(strict=True, ge=1, le=MAX_RULE_ID)]
    name: Annotated[
        str, Field(strict=True, max_length=MAX_NAME_LEN, pattern=_NO_CONTROL_PATTERN)
    ] = ""
    src_ip: IPField = "any"
    dst_ip: IPField = "any"
    src_port: PortField = 0
    dst_port: PortField = 0
    protocol: Protocol
    action: Action
    priority: Annotated[int, Field(strict=True, ge=0, le=MAX_PRIORITY)] = 100
    direction: Direction = Direction.ANY

    @model_validator(mode="after")
    def _derive(self) -> Rule:
        # The hot path of a bulk replace (100k rules): kept lean on purpose.
        fields = self.__dict__
        src = _IP_CACHE.get(fields["src_ip"]) or _parse_ip(fields["src_ip"])
        dst = _IP_CACHE.get(fields["dst_ip"]) or _parse_ip(fields["dst_ip"])
        version = src[1] or dst[1]
        if src[1] and dst[1] and src[1] != dst[1]:
            raise _invalid(
                f"src_ip is IPv{src[1]} but dst_ip is IPv{dst[1]}; a rule matches one "
                'family: use addresses of one family, or "any"'
            )
        number, only_version = _PROTO_INFO[fields["protocol"]]
        src_port = fields["src_port"]
        dst_port = fields["dst_port"]
        if only_version:
            self._check_icmp(version, only_version, src_port, dst_port)
            version = only_version
        # Canonical ports: int 0 = none, int p = (p, p), "lo-hi" (also "0-0") = (lo, hi).
        if src_port.__class__ is int:
            src_ports = (src_port, src_port) if src_port else None
        else:
            lo, _, hi = src_port.partition("-")
            src_ports = (int(lo), int(hi))
        if dst_port.__class__ is int:
            dst_ports = (dst_port, dst_port) if dst_port else None
        else:
            lo, _, hi = dst_port.partition("-")
            dst_ports = (int(lo), int(hi))
        score = (
            (fields["priority"] << 34)
            | _ACTION_BITS[fields["action"]]
            | (MAX_RULE_ID - fields["rule_id"])
        )
        # Not a PrivateAttr: pydantic's per-instance private-attribute setup costs more than
        # the rest of the validation. The slot is BaseModel's own, copied and pickled with it;
        # "src_net"/"dst_net" are added on first use.
        object.__setattr__(
            self,
            "__pydantic_private__",
            {"_d": (src, dst, src_ports, dst_ports, number, _FAMILIES[version], score)},
        )
        return self

    def _check_icmp(
        self, version: int, only_version: int, src_port: int | str, dst_port: int | str
    ) -> None:
        protocol = self.protocol.value
        if version and version != only_version:
            if only_version == 4:
                hint = "protocol icmp is ICMP for IPv4: use icmpv6 with IPv6 addresses"
            else:
                hint = "protocol icmpv6 is ICMP for IPv6: use icmp with IPv4 addresses"
            raise _invalid(f"protocol: {hint}")
        if src_port != 0 or dst_port != 0:
            field = "src_port" if src_port != 0 else "dst_port"
            raise _invalid(
                f"{field}: a port condition is invalid with protocol {protocol} "
                "(only tcp and udp have ports): use 0, or protocol tcp, udp or any"
            )

    def __eq__(self, other: object) -> bool:
        # Fields only: the private match data follows from them (and its lazily built
        # networks must not make equal rules unequal).
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(other) is type(self) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(tuple(self.__dict__.values()))

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with `update` the result is validated again (so its match data is right)."""
        if update:
            return self.model_validate({**self.to_api(), **update})
        return super().model_copy(deep=deep)

    def _private(self) -> dict[str, Any]:
        private = self.__pydantic_private__
        if private is None:
            raise RuntimeError("Rule was built without validation (model_construct?)")
        return private

    def _derived(self) -> _Derived:
        derived: _Derived = self._private()["_d"]
        return derived

    def match_data(self) -> _Derived:
        """Everything matching needs, in one tuple, for hot loops (the compiler):
        (src, dst, src_ports, dst_ports, proto_number, families, score), where src and dst
        are (canonical text, version (0: any), network as int, prefix length)."""
        return self._derived()

    @property
    def src_net(self) -> IPNet | None:
        """The source network; None = any address of either family."""
        private = self._private()
        net: IPNet | None = private.get("src_net")
        if net is None:
            net = private["src_net"] = _make_net(private["_d"][0])
        return net

    @property
    def dst_net(self) -> IPNet | None:
        """The destination network; None = any address of either family."""
        private = self._private()
        net: IPNet | None = private.get("dst_net")
        if net is None:
            net = private["dst_net"] = _make_net(private["_d"][1])
        return net

    @property
    def src_ports(self) -> tuple[int, int] | None:
        """Inclusive source port range; None = no condition."""
        return self._derived()[2]

    @property
    def dst_ports(self) -> tuple[int, int] | None:
        """Inclusive destination port range; None = no condition."""
        return self._derived()[3]

    @property
    def proto_number(self) -> int | None:
        """IP protocol number; None = any protocol."""
        return self._derived()[4]

    @property
    def families(self) -> frozenset[int]:
        """The address families (4, 6) this rule can match."""
        return self._derived()[5]

    @property
    def score(self) -> int:
        """(priority << 34) | (action_rank << 32) | (2^32-1 - rule_id): higher wins."""
        return self._derived()[6]

    def to_api(self) -> dict[str, Any]:
        """All fields, canonical, JSON-able (the RULE object of contract §2)."""
        return {
            "rule_id": self.rule_id,
            "name": self.name,
            "src_ip": self.src_ip,
            "dst_ip": self.dst_ip,
            "src_port": self.src_port,
            "dst_port": self.dst_port,
            "protocol": self.protocol.value,
            "action": self.action.value,
            "priority": self.priority,
            "direction": self.direction.value,
        }


class PolicySet(BaseModel):
    """A whole policy set: the default action and the rules (rule_ids unique)."""

    model_config = ConfigDict(extra="forbid")

    default_action: DefaultAction = DefaultAction.ALLOW
    policies: list[Rule] = Field(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _without_gc(cls, data: Any, handler: ModelWrapValidatorHandler[PolicySet]) -> PolicySet:
        # A bulk replace builds ~10 objects per rule; the cyclic collector would walk the
        # growing heap again and again (it doubled the time of 100k rules). Nothing built here
        # is cyclic garbage, so pausing it is free.
        was_enabled = gc.isenabled()
        if was_enabled:
            gc.disable()
        try:
            return handler(data)
        finally:
            if was_enabled:
                gc.enable()

    @model_validator(mode="after")
    def _unique_ids(self) -> PolicySet:
        seen: dict[int, int] = {}
        problems: list[str] = []
        for index, rule in enumerate(self.policies):
            first = seen.setdefault(rule.rule_id, index)
            if first != index:
                problems.append(
                    f"policies[{index}] (rule_id {rule.rule_id}): rule_id: duplicate: "
                    f"rule_id {rule.rule_id} is already used by policies[{first}]"
                )
        if problems:
            raise _invalid("\n".join(problems))
        return self

    def get(self, rule_id: int) -> Rule | None:
        """The rule with this id, or None."""
        for rule in self.policies:
            if rule.rule_id == rule_id:
                return rule
        return None

    def to_api(self) -> dict[str, Any]:
        """The policy document: {"default_action": ..., "policies": [RULE, ...]}."""
        return {
            "default_action": self.default_action.value,
            "policies": [rule.to_api() for rule in self.policies],
        }


class PolicyError(ValueError):
    """Invalid policy input. `.errors` holds one message per problem; `source` names the file."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = list(errors) or ["invalid policy"]
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"invalid policy file {self.source}" if self.source else "invalid policy"
        if len(self.errors) == 1:
            return f"{head}: {self.errors[0]}"
        return head + ":\n" + "\n".join(f"  {message}" for message in self.errors)


_RULE_FIELDS: Final = tuple(Rule.model_fields)
_SET_FIELDS: Final = tuple(PolicySet.model_fields)
_INT_HINTS: Final[dict[str, str]] = {
    "rule_id": f"use an int 1..{MAX_RULE_ID}",
    "priority": f"use an int 0..{MAX_PRIORITY}",
}
_ENUMS: Final[dict[str, type[StrEnum]]] = {
    "protocol": Protocol,
    "action": Action,
    "direction": Direction,
    "default_action": DefaultAction,
}


def _rule_prefix(loc: tuple[int | str, ...], data: Any) -> tuple[str, tuple[int | str, ...]]:
    """Split a location into the rule prefix ("policies[3] (rule_id 1002)") and the rest.

    Knows policy documents ({"policies": [...]}) and bare lists of rules; else no prefix.
    """
    if len(loc) >= 2 and loc[0] == "policies" and isinstance(loc[1], int):
        index, rest = loc[1], loc[2:]
        items = data.get("policies") if isinstance(data, dict) else None
    elif loc and isinstance(loc[0], int) and isinstance(data, list):
        index, rest, items = loc[0], loc[1:], data
    else:
        return "", loc
    prefix = f"policies[{index}]"
    try:
        rule_id = items[index]["rule_id"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        rule_id = None
    if type(rule_id) is int and 1 <= rule_id <= MAX_RULE_ID:
        prefix += f" (rule_id {rule_id})"
    return prefix, rest


def _describe(error: Any, field: str, value: Any, in_rule: bool) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    allowed = ", ".join(_RULE_FIELDS if in_rule else _SET_FIELDS)
    if kind == _CUSTOM:
        return str(ctx.get("reason", error["msg"]))
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return f"unknown field; allowed fields are: {allowed}"
    if field in _ENUMS and kind in ("enum", "str_type", "string_type"):
        choices = ", ".join(member.value for member in _ENUMS[field])
        return f"{_show(value)} is not one of: {choices}"
    if field in _INT_HINTS and kind in (
        "int_type",
        "int_parsing",
        "int_from_float",
        "greater_than_equal",
        "less_than_equal",
    ):
        return f"{_show(value)} is not a valid {field}: {_INT_HINTS[field]}"
    if kind in ("string_type", "str_type"):
        return f"{_show(value)} is not a string"
    if kind == "string_pattern_mismatch" and field == "name":
        return "must not contain control characters (newline, tab, ...)"
    if kind == "string_too_long":
        return f"is {len(value)} characters long; at most {ctx.get('max_length')} are allowed"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        what = "a rule" if in_rule else "a policy document"
        return f"{_show(value)} is not {what}: expected an object (a JSON mapping)"
    if kind == "list_type":
        return f"{_show(value)} is not a list: expected a list of rules"
    return str(error["msg"])


def format_validation_error(exc: pydantic.ValidationError, data: Any) -> list[str]:
    """Turn a pydantic error into messages naming the rule (position, rule_id) and the field.

    `data` is the input that was validated: a policy document ({"policies": [...]}), a list of
    rules (TypeAdapter(list[Rule])) or one rule dict.
    Example: `policies[3] (rule_id 1002): dst_port: "70000" is not a port: ...`.
    """
    messages: list[str] = []
    single_rule = exc.title == Rule.__name__
    for error in exc.errors(include_url=False):
        loc: tuple[int | str, ...] = tuple(error["loc"])
        prefix, rest = ("", loc) if single_rule else _rule_prefix(loc, data)
        in_rule = bool(prefix) or single_rule
        field = ".".join(str(part) for part in rest)
        value = error.get("input") if error["type"] != "missing" else None
        if error["type"] == "extra_forbidden":
            value = rest[-1] if rest else None
        text = _describe(error, str(rest[-1]) if rest else "", value, in_rule)
        if error["type"] == _CUSTOM and not rest:
            # Whole-rule or whole-set checks name their fields (and rules) themselves.
            parts = [prefix, text] if prefix else [text]
        elif error["type"] == "extra_forbidden":
            parts = [p for p in (prefix, _show(value)) if p] + [text]
        else:
            parts = [p for p in (prefix, field) if p] + [text]
        for line in ": ".join(parts).split("\n"):
            if line not in messages:
                messages.append(line)
    return messages


def parse_policy_document(data: Any, source: str | None = None) -> PolicySet:
    """Validate a policy document ({"default_action": ..., "policies": [...]}).

    Raises PolicyError with every problem found; nothing of an invalid document is kept.
    """
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else _show(data)
        raise PolicyError(
            [
                f"the top level is {kind}: expected an object "
                '{"default_action": "allow"|"deny", "policies": [RULE, ...]}'
            ],
            source,
        )
    try:
        return PolicySet.model_validate(data)
    except pydantic.ValidationError as exc:
        raise PolicyError(format_validation_error(exc, data), source) from None


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: invalid YAML: {problem}"
    return f"invalid YAML: {problem}"


def load_policy_file(path: str | Path) -> PolicySet:
    """Read and validate a policy file: YAML when the suffix is .yaml/.yml, else JSON.

    Raises PolicyError (naming the file) when it cannot be read or parsed, or any rule is
    invalid: the whole file is rejected.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(["cannot read it: no such file"], source) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            [f"it is not UTF-8 text ({exc.reason} at byte {exc.start})"], source
        ) from None
    except OSError as exc:
        raise PolicyError([f"cannot read it: {exc.strerror or exc}"], source) from None
    data: Any
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError([_yaml_error(exc)], source) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(
                [f"line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}"], source
            ) from None
        except RecursionError:
            raise PolicyError(["invalid JSON: nested too deeply"], source) from None
    return parse_policy_document(data, source)
