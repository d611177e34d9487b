"""The policy model (docs/contract.md §2, §5): rules, address groups, policy sets, validation
and policy files.

In: policy documents (dicts from JSON/YAML, API bodies) or policy files.
Out: frozen, validated `Rule` objects with canonical field values and precomputed match data
(`src_net`, `dst_net`, `src_ports`, `dst_ports`, `proto_number`, `families`, `score`), and
`Group`s (canonical member addresses, deduplicated), together in a `PolicySet`. Invalid input
raises `PolicyError` whose `.errors` are messages a person can act on (which rule or group, which
field, what was wrong, what is allowed); nothing invalid is kept. Label groups (`select`) need
fleet mode and are refused here.

Fleet mode (contract §7): a fleet policy document (`parse_policy_document(..., fleet=True)`,
what `microseg fleet apply` publishes) may also scope a rule to hosts by their labels (`hosts`)
and give a group a label selector (`select`); every other parse refuses both, and
`streamer.fleet.scope` turns a fleet set into one host's local set, without them.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import re
import socket
from collections.abc import Iterable, Mapping
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
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from streamer.policy.labels import label_map
from streamer.vocabulary import PROTOCOL_NUMBERS as VOCABULARY_NUMBERS
from streamer.vocabulary import Action, DefaultAction, Direction, Mode, Protocol

__all__ = [
    "FLEET_CONTEXT",
    "GROUP_END",
    "GROUP_NAME_PATTERN",
    "MAX_NAME_LEN",
    "MAX_RULE_ID",
    "PROTOCOL_NUMBERS",
    "Group",
    "IPNet",
    "PolicyError",
    "PolicySet",
    "Rule",
    "check_group_name",
    "format_validation_error",
    "load_policy_file",
    "parse_address",
    "parse_members",
    "parse_policy_document",
    "unknown_group_message",
]

MAX_RULE_ID: Final = 2**32 - 1
MAX_PORT: Final = 65535
MAX_PRIORITY: Final = 65535
MAX_NAME_LEN: Final = 128
# A group name: 1..63 characters, letters, digits, "_", "." and "-", not starting with a
# punctuation mark (so it can never be mistaken for an option or a path in the CLI and URLs).
GROUP_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_GROUP_NAME_RE: Final = re.compile(GROUP_NAME_PATTERN)
_GROUP_NAME_HINT = 'use 1 to 63 letters, digits, "_", "." or "-", starting with a letter or digit'
# The version of a group end in match data (`Rule.match_data`): its text is the group's name.
GROUP_END: Final = -1
# Member problems listed in one message; the count of the rest follows.
_MAX_MEMBER_PROBLEMS: Final = 20

IPNet = IPv4Network | IPv6Network

# The validation context of a fleet document: `hosts` and `select` are accepted only under it
# (`Model.model_validate(data, context=FLEET_CONTEXT)`; parse_policy_document(fleet=True)).
FLEET_CONTEXT: Final[Mapping[str, bool]] = {"fleet": True}
_NO_HOSTS: Final = (
    "host-scoped rules need fleet mode (microseg fleet apply), which a local policy does not "
    "use: remove hosts (a rule of this agent's own policy applies to this host)"
)
_NO_SELECT: Final = (
    "select: label groups (select) need fleet mode, which "
    "this agent does not run: list the group's members instead"
)


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


def parse_address(text: str) -> tuple[str, int, int, int]:
    """An address, CIDR or "any" -> (canonical text, version (0: "any"), network as int,
    prefix length). Raises ValueError with the message for the user (without a field name)."""
    return _parse_ip(text)


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


def check_group_name(name: Any) -> str:
    """A group name as given, if valid; else ValueError with the message for the user."""
    if name.__class__ is str and _GROUP_NAME_RE.fullmatch(name):
        return str(name)
    if not isinstance(name, str):
        raise ValueError(f"{_show(name)} is not a group name (not a string): {_GROUP_NAME_HINT}")
    raise ValueError(f"{_show(name)} is not a group name: {_GROUP_NAME_HINT}")


def _is_enforce(value: Any) -> bool:
    return value is Mode.ENFORCE


def _is_none(value: Any) -> bool:
    return value is None


def _validate_group_name(value: Any) -> str:
    try:
        return check_group_name(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _validate_group_ref(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return check_group_name(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _fleet(info: ValidationInfo) -> bool:
    """Whether this validation is of a fleet document (the context FLEET_CONTEXT gives)."""
    context = info.context
    return isinstance(context, Mapping) and context.get("fleet") is True


def _validate_selector(value: Any) -> dict[str, str]:
    try:
        return label_map(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _validate_hosts(value: Any, info: ValidationInfo) -> dict[str, str] | None:
    # Only called when a rule gives `hosts`: the 100k-rule path without them does not pay.
    if value is None:
        return None
    if not _fleet(info):
        raise _invalid(_NO_HOSTS)
    return _validate_selector(value)


def _validate_select(value: Any, info: ValidationInfo) -> dict[str, str] | None:
    if value is None:
        return None
    if not _fleet(info):
        raise _invalid(_NO_SELECT.removeprefix("select: "))
    return _validate_selector(value)


def _selector_key(selector: dict[str, str] | None) -> frozenset[tuple[str, str]] | None:
    return None if selector is None else frozenset(selector.items())


def _member(text: Any) -> str:
    """One member's canonical text; ValueError with the message for the user."""
    if text.__class__ is not str:
        raise ValueError(f"{_show(text)} is not a string: use an IPv4/IPv6 address or CIDR")
    # Uncached: a million members would only flush the cache the rule validator relies on.
    addr = _parse_ip_uncached(text)
    if not addr[1]:
        raise ValueError(
            f"{_show(text)} is not a member: a group holds addresses and CIDRs; "
            "0.0.0.0/0 and ::/0 stand for every address of a family"
        )
    return addr[0]


def parse_members(values: Any) -> tuple[str, ...]:
    """A list of member addresses/CIDRs -> their canonical texts, first occurrence kept.

    Raises ValueError whose lines are `[index]: problem` (at most 20, then a count).
    """
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{_show(values)} is not a list: expected a list of addresses and CIDRs")
    out: dict[str, None] = {}
    problems: list[str] = []
    bad = 0
    for index, text in enumerate(values):
        try:
            out[_member(text)] = None
        except ValueError as exc:
            bad += 1
            if len(problems) < _MAX_MEMBER_PROBLEMS:
                problems.append(f"[{index}]: {exc}")
    if bad:
        if bad > len(problems):
            problems.append(f"... and {bad - len(problems)} more bad members")
        raise ValueError("\n".join(problems))
    return tuple(out)


def _validate_members(value: Any) -> tuple[str, ...]:
    try:
        return parse_members(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


class Group(BaseModel):
    """An address group (docs/contract.md §5): canonical member addresses and CIDRs of both
    families, each once, in the order first given. Empty: it matches nothing.

    Members stay plain strings (a group may hold a million); `addrs()` parses them when a
    compiler needs their values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    members: Annotated[tuple[str, ...], PlainValidator(_validate_members)] = ()
    # A label group (fleet documents only, contract §5, §7): its addresses are the members
    # and those of every agent whose labels match. Left out of dumps when unset.
    select: Annotated[
        dict[str, str] | None, PlainValidator(_validate_select), Field(exclude_if=_is_none)
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _no_select(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("select") is not None and not _fleet(info):
            raise _invalid(_NO_SELECT)
        return data

    def __hash__(self) -> int:
        # A dict (select) is not hashable: its pairs are.
        return hash((self.members, _selector_key(self.select)))

    def _with(self, members: tuple[str, ...]) -> Group:
        """This group with other members (built without validating again; select kept)."""
        if self.select is None:
            return Group.model_construct(members=members)
        return Group.model_construct(members=members, select=self.select)

    def addrs(self) -> list[tuple[str, int, int, int]]:
        """Each member as (canonical text, version, network as int, prefix length)."""
        return [_parse_ip_uncached(m) for m in self.members]

    def with_members(self, given: Iterable[str]) -> tuple[Group, list[str], list[str]]:
        """(this group plus the members `given`, the members added, those already in it).

        `given`: canonical texts, each once (`parse_members`' result).
        """
        given = tuple(given)
        present = set(self.members)
        added = [m for m in given if m not in present]
        unchanged = [m for m in given if m in present]
        if not added:
            return self, added, unchanged
        return self._with((*self.members, *added)), added, unchanged

    def without_members(self, given: Iterable[str]) -> tuple[Group, list[str], list[str]]:
        """(this group less the members `given`, the members removed, those not in it).

        `given`: canonical texts, each once (`parse_members`' result).
        """
        given = tuple(given)
        present = set(self.members)
        removed = [m for m in given if m in present]
        unchanged = [m for m in given if m not in present]
        if not removed:
            return self, removed, unchanged
        gone = set(removed)
        kept = tuple(m for m in self.members if m not in gone)
        return self._with(kept), removed, unchanged

    def to_api(self) -> dict[str, Any]:
        """{"members": [...]}, canonical; with "select": {...} when it is a label group."""
        if self.select is None:
            return {"members": list(self.members)}
        return {"members": list(self.members), "select": dict(self.select)}


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


# Port ranges by (lo, hi), and single ports also by the port: shared by the rules that have
# them (Rule._derive). Bounded by clearing, like _IP_CACHE (every single port fits).
_PORT_RANGES: dict[int | tuple[int, int], tuple[int, int]] = {}
_PORT_RANGES_MAX: Final = 1 << 18


def _port_range(lo: int, hi: int) -> tuple[int, int]:
    key = (lo, hi)
    kept = _PORT_RANGES.get(key)
    if kept is None:
        if len(_PORT_RANGES) >= _PORT_RANGES_MAX:
            _PORT_RANGES.clear()
        kept = _PORT_RANGES[key] = key
        if lo == hi:
            _PORT_RANGES[lo] = key
    return kept


# Each distinct set of given fields, shared by the rules that gave those (Rule._derive).
_FIELDS_SETS: dict[tuple[str, ...], frozenset[str]] = {}
_new_object = object.__new__

IPField = Annotated[str, PlainValidator(_validate_ip)]
PortField = Annotated[int | str, PlainValidator(_validate_port)]
GroupRef = Annotated[str | None, PlainValidator(_validate_group_ref)]
GroupName = Annotated[str, PlainValidator(_validate_group_name)]
HostsField = Annotated[
    dict[str, str] | None, PlainValidator(_validate_hosts), Field(exclude_if=_is_none)
]


class Rule(BaseModel):
    """One policy rule (docs/contract.md §2). Field values are canonical after validation.

    An end may name a group (`src_group`, `dst_group`, §5) instead of an address; its
    `src_ip`/`dst_ip` is then "any" and the group's members decide (the policy set holds them).

    Derived (read-only): `src_net`/`dst_net` (None = any family, and also for a group end),
    `src_ports`/`dst_ports` (inclusive range, None = no condition), `proto_number` (None =
    any), `families` (from the protocol and the address ends), `score` (higher wins).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule_id: Annotated[int, Field(strict=True, ge=1, le=MAX_RULE_ID)]
    name: Annotated[
        str, Field(strict=True, max_length=MAX_NAME_LEN, pattern=_NO_CONTROL_PATTERN)
    ] = ""
    src_ip: IPField = "any"
    dst_ip: IPField = "any"
    # Left out of dumps when unset, as in to_api: a rule without groups dumps as it always did.
    src_group: Annotated[GroupRef, Field(exclude_if=_is_none)] = None
    dst_group: Annotated[GroupRef, Field(exclude_if=_is_none)] = None
    src_port: PortField = 0
    dst_port: PortField = 0
    protocol: Protocol
    action: Action
    priority: Annotated[int, Field(strict=True, ge=0, le=MAX_PRIORITY)] = 100
    direction: Direction = Direction.ANY
    # Left out of dumps when enforce (the default), as in to_api.
    mode: Annotated[Mode, Field(exclude_if=_is_enforce)] = Mode.ENFORCE
    # Fleet documents only (contract §7): a label selector of the hosts the rule applies on;
    # None = every host. Last, and left out of dumps when unset: local rules are unchanged.
    hosts: HostsField = None

    @model_validator(mode="after")
    def _derive(self) -> Rule:
        # The hot path of a bulk replace (100k rules): kept lean on purpose.
        fields = self.__dict__
        src = _IP_CACHE.get(fields["src_ip"]) or _parse_ip(fields["src_ip"])
        dst = _IP_CACHE.get(fields["dst_ip"]) or _parse_ip(fields["dst_ip"])
        # A group end: its version is GROUP_END, and the family comes from the other end.
        if fields["src_group"] is not None:
            src = self._group_end("src", src)
        if fields["dst_group"] is not None:
            dst = self._group_end("dst", dst)
        version = max(src[1], 0) or max(dst[1], 0)
        if src[1] > 0 and dst[1] > 0 and src[1] != dst[1]:
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
        # Ranges repeat across rules: each is kept once (a tuple costs 56 bytes a rule).
        if src_port.__class__ is int:
            src_ports = _PORT_RANGES.get(src_port) if src_port else None
            if src_ports is None and src_port:
                src_ports = _port_range(src_port, src_port)
        else:
            lo, _, hi = src_port.partition("-")
            src_ports = _port_range(int(lo), int(hi))
        if dst_port.__class__ is int:
            dst_ports = _PORT_RANGES.get(dst_port) if dst_port else None
            if dst_ports is None and dst_port:
                dst_ports = _port_range(dst_port, dst_port)
        else:
            lo, _, hi = dst_port.partition("-")
            dst_ports = _port_range(int(lo), int(hi))
        score = (
            (fields["priority"] << 34)
            | _ACTION_BITS[fields["action"]]
            | (MAX_RULE_ID - fields["rule_id"])
        )
        # Not a PrivateAttr: pydantic's per-instance private-attribute setup costs more than
        # the rest of the validation. The slot is BaseModel's own, copied and pickled with it;
        # "src_net"/"dst_net" are added on first use.
        setattr_ = object.__setattr__
        setattr_(
            self,
            "__pydantic_private__",
            {"_d": (src, dst, src_ports, dst_ports, number, _FAMILIES[version], score)},
        )
        # Memory (100,000 rules are kept): the set of the fields given is the same few sets
        # for all rules, so one frozen copy of each is shared (pydantic only reads and copies
        # it once a model is frozen); and the fields move into a dict of the class's shared
        # keys, as an instance's own attributes would be (about 170 bytes, not 460).
        given = self.__pydantic_fields_set__
        key = tuple(given)  # cheaper than a frozenset; equal sets mostly iterate alike
        shared = _FIELDS_SETS.get(key)
        if shared is None:
            shared = frozenset(given)
            if len(_FIELDS_SETS) < 4096:
                _FIELDS_SETS[key] = shared
        setattr_(self, "__pydantic_fields_set__", shared)
        # A fresh instance's __dict__ is made with the class's shared keys; filled in field
        # order (always the same) it stays that way.
        compact = _new_object(self.__class__).__dict__
        for name, value in fields.items():
            compact[name] = value  # one by one: update() would copy into a dict of its own
        setattr_(self, "__dict__", compact)
        return self

    def _group_end(self, end: str, addr: _Addr) -> _Addr:
        if addr[1]:
            raise _invalid(
                f"{end}_ip and {end}_group: a rule end is an address or a group, not both: "
                f'remove {end}_ip (or make it "any") or {end}_group'
            )
        return (self.__dict__[f"{end}_group"], GROUP_END, 0, 0)

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
        fields = self.__dict__
        if fields["hosts"] is None:
            return hash(tuple(fields.values()))
        return hash(tuple(_selector_key(v) if v.__class__ is dict else v for v in fields.values()))

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with `update` the result is validated again (so its match data is right;
        a host-scoped rule's copy is validated as the fleet document's it came from)."""
        if update:
            context = FLEET_CONTEXT if self.__dict__["hosts"] is not None else None
            return self.model_validate({**self.to_api(), **update}, context=context)
        return super().model_copy(deep=deep)

    def without_hosts(self) -> Rule:
        """This rule for every host (hosts None): itself when it has no hosts, else a copy
        built without validating again (nothing else changes: the match data is shared)."""
        fields = self.__dict__
        if fields["hosts"] is None:
            return self
        clone = _new_object(self.__class__)
        compact = clone.__dict__  # the class's shared keys, as in _derive
        for name, value in fields.items():
            compact[name] = value
        compact["hosts"] = None
        setattr_ = object.__setattr__
        given = tuple(name for name in self.__pydantic_fields_set__ if name != "hosts")
        shared = _FIELDS_SETS.get(given)
        if shared is None:
            shared = frozenset(given)
        setattr_(clone, "__pydantic_fields_set__", shared)
        setattr_(clone, "__pydantic_extra__", None)
        setattr_(clone, "__pydantic_private__", dict(self._private()))
        return clone

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
        are (canonical text, version (0: any), network as int, prefix length), or for a group
        end (group name, GROUP_END, 0, 0): the members are the policy set's."""
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
        """All fields, canonical, JSON-able (the RULE object of contract §2); `src_group` and
        `dst_group` only when set, `mode` only when staged, `hosts` only when set (fleet)."""
        out = {
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
        if self.src_group is not None:
            out["src_group"] = self.src_group
        if self.dst_group is not None:
            out["dst_group"] = self.dst_group
        if self.mode is Mode.STAGED:
            out["mode"] = "staged"
        hosts = self.__dict__["hosts"]
        if hosts is not None:
            out["hosts"] = dict(hosts)
        return out

    @property
    def staged(self) -> bool:
        """A staged rule: judged, deciding nothing (contract §6)."""
        return self.mode is Mode.STAGED


class PolicySet(BaseModel):
    """A whole policy set: the default action, the address groups by name, and the rules
    (rule_ids unique; every group a rule names is in `groups`)."""

    model_config = ConfigDict(extra="forbid")

    default_action: DefaultAction = DefaultAction.ALLOW
    groups: dict[GroupName, Group] = Field(default_factory=dict)
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

    @model_validator(mode="after")
    def _known_groups(self) -> PolicySet:
        groups = self.groups
        problems: list[str] = []
        for index, rule in enumerate(self.policies):
            for field in ("src_group", "dst_group"):
                name = rule.__dict__[field]
                if name is not None and name not in groups:
                    problems.append(
                        f"policies[{index}] (rule_id {rule.rule_id}): {field}: "
                        + unknown_group_message(name, groups)
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

    def rules_using(self, name: str) -> list[int]:
        """The rule_ids of the rules that name group `name` on either end, in set order."""
        return [
            r.rule_id
            for r in self.policies
            if r.__dict__["src_group"] == name or r.__dict__["dst_group"] == name
        ]

    def group_users(self) -> dict[str, list[int]]:
        """Every group's name -> the rule_ids that use it (set order), in one pass."""
        users: dict[str, list[int]] = {name: [] for name in self.groups}
        for r in self.policies:
            fields = r.__dict__
            for name in {fields["src_group"], fields["dst_group"]}:
                if name is not None:
                    users.setdefault(name, []).append(r.rule_id)
        return users

    def to_api(self) -> dict[str, Any]:
        """The policy document: {"default_action": ..., "groups": {NAME: GROUP, ...},
        "policies": [RULE, ...]}."""
        return {
            "default_action": self.default_action.value,
            "groups": {name: group.to_api() for name, group in self.groups.items()},
            "policies": [rule.to_api() for rule in self.policies],
        }


def unknown_group_message(name: str, groups: Mapping[str, Any]) -> str:
    """What to say of a rule naming group `name` that is not among `groups`."""
    if not groups:
        known = "there are no groups: define it under groups first"
    else:
        names = sorted(groups)
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        known = f"the groups are: {shown}"
    return f"no group named {_show(name)} ({known})"


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


_ITEM_LINE: Final = re.compile(r"^\[\d+\]: ")
# The fields a local document may give (unknown-field messages list them); fleet adds these.
_FLEET_FIELDS: Final = frozenset({"hosts", "select"})
_RULE_FIELDS: Final = tuple(f for f in Rule.model_fields if f not in _FLEET_FIELDS)
_SET_FIELDS: Final = tuple(PolicySet.model_fields)
_GROUP_FIELDS: Final = tuple(f for f in Group.model_fields if f not in _FLEET_FIELDS)
# What an error is inside: its allowed fields and what the whole is called.
_RULE_CTX: Final = (_RULE_FIELDS, "a rule")
_SET_CTX: Final = (_SET_FIELDS, "a policy document")
_GROUP_CTX: Final = (_GROUP_FIELDS, 'a group: expected an object {"members": [...]}')
_FLEET_RULE_CTX: Final = (tuple(Rule.model_fields), "a rule")
_FLEET_GROUP_CTX: Final = (tuple(Group.model_fields), _GROUP_CTX[1])
_INT_HINTS: Final[dict[str, str]] = {
    "rule_id": f"use an int 1..{MAX_RULE_ID}",
    "priority": f"use an int 0..{MAX_PRIORITY}",
}
_ENUMS: Final[dict[str, type[StrEnum]]] = {
    "protocol": Protocol,
    "action": Action,
    "direction": Direction,
    "mode": Mode,
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


def _describe(
    error: Any, field: str, value: Any, where: tuple[tuple[str, ...], str] = _SET_CTX
) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    allowed = ", ".join(where[0])
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
    if kind == "dict_type" and field == "groups":
        return (
            f"{_show(value)} is not a map of groups: expected an object "
            '{"NAME": {"members": [...]}, ...}'
        )
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if where[1] == _GROUP_CTX[1]:
            return f"{_show(value)} is not {where[1]}"
        return f"{_show(value)} is not {where[1]}: expected an object (a JSON mapping)"
    if kind == "list_type":
        return f"{_show(value)} is not a list: expected a list of rules"
    return str(error["msg"])


def format_validation_error(
    exc: pydantic.ValidationError, data: Any, *, fleet: bool = False
) -> list[str]:
    """Turn a pydantic error into messages naming the rule (position, rule_id) and the field.

    `data` is the input that was validated: a policy document ({"policies": [...]}), a list of
    rules (TypeAdapter(list[Rule])) or one rule dict; `fleet`: it was a fleet document (the
    fields listed for an unknown one include hosts and select).
    Example: `policies[3] (rule_id 1002): dst_port: "70000" is not a port: ...`.
    """
    messages: list[str] = []
    single_rule = exc.title == Rule.__name__
    single_group = exc.title == Group.__name__
    for error in exc.errors(include_url=False):
        loc: tuple[int | str, ...] = tuple(error["loc"])
        prefix, rest = ("", loc) if single_rule or single_group else _rule_prefix(loc, data)
        if len(rest) >= 2 and rest[-1] == "[key]":
            rest = rest[:-2]  # a bad key of a map (a group's name): the map is the field
        if prefix or single_rule:
            where = _FLEET_RULE_CTX if fleet else _RULE_CTX
        elif single_group or (len(rest) >= 2 and rest[0] == "groups"):
            where = _FLEET_GROUP_CTX if fleet else _GROUP_CTX
        else:
            where = _SET_CTX
        field = ".".join(str(part) for part in rest)
        value = error.get("input") if error["type"] != "missing" else None
        if error["type"] == "extra_forbidden":
            value = rest[-1] if rest else None
        text = _describe(error, str(rest[-1]) if rest else "", value, where)
        if error["type"] == _CUSTOM and not rest:
            # Whole-rule or whole-set checks name their fields (and rules) themselves.
            parts = [prefix] if prefix else []
        elif error["type"] == "extra_forbidden":
            parts = [p for p in (prefix, ".".join(str(x) for x in rest[:-1]), _show(value)) if p]
        else:
            parts = [p for p in (prefix, field) if p]
        head = ": ".join(parts)
        # A check may report several problems, a line each; each line gets the location, and
        # a line starting with "[index]" names an item of the field (members[3]: ...).
        for line in text.split("\n"):
            if not head:
                message = line
            elif _ITEM_LINE.match(line):
                message = head + line
            else:
                message = f"{head}: {line}"
            if message not in messages:
                messages.append(message)
    return messages


def parse_policy_document(
    data: Any, source: str | None = None, *, fleet: bool = False
) -> PolicySet:
    """Validate a policy document ({"default_action": ..., "groups": {...}, "policies": [...]};
    groups may be left out). `fleet`: a fleet document, whose rules may give `hosts` and groups
    `select` (refused otherwise).

    Raises PolicyError with every problem found; nothing of an invalid document is kept.
    """
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else _show(data)
        raise PolicyError(
            [
                f"the top level is {kind}: expected an object "
                '{"default_action": "allow"|"deny", "groups": {...}, "policies": [RULE, ...]}'
            ],
            source,
        )
    try:
        return PolicySet.model_validate(data, context=FLEET_CONTEXT if fleet else None)
    except pydantic.ValidationError as exc:
        raise PolicyError(format_validation_error(exc, data, fleet=fleet), source) from None


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1} column {mark.column + 1}: invalid YAML: {problem}"
    return f"invalid YAML: {problem}"


def load_policy_file(path: str | Path, *, fleet: bool = False) -> PolicySet:
    """Read and validate a policy file: YAML when the suffix is .yaml/.yml, else JSON.
    `fleet`: a fleet policy file (parse_policy_document's `fleet`).

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
    return parse_policy_document(data, source, fleet=fleet)
