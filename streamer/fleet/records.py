"""What the fleet's topics hold, and how it is encoded (docs/fleet.md).

The policy topic holds one self-contained record per generation under the key POLICY_KEY:
a `PolicyRecord` (the whole policy document, its generation and who published it), as
zstd-compressed JSON with a format version. The agents topic holds one record per host (key:
the host name): an `AgentStatus` as plain JSON, or a tombstone when the agent stopped cleanly.

Decoding never trusts the bytes: anything malformed (bad compression, bad JSON, a missing or
mistyped field, a generation below 1, an unknown format version) raises `RecordError` saying
what is wrong. The policy document itself is not checked here (its rules are the agent's to
validate); only that it is a JSON object.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import cramjam
import orjson

POLICY_KEY: Final = b"policy"
DEFAULT_POLICY_TOPIC: Final = "microseg.policy"
DEFAULT_AGENTS_TOPIC: Final = "microseg.agents"
DEFAULT_FLOWS_TOPIC: Final = "microseg.flows"
DEFAULT_HEARTBEAT_S: Final = 5.0
# An agent silent for this many heartbeats is lost (contract §7).
LOST_AFTER_HEARTBEATS: Final = 3

# The policy record's format version ("v"); a reader refuses other versions rather than
# guessing at their meaning.
POLICY_FORMAT: Final = 1
# Decompressed size at most (a 100,000-rule document is about 18 MB): a record that claims
# more is refused before anything is allocated for it.
MAX_POLICY_JSON_BYTES: Final = 256 * 1024 * 1024
# zstd level 3: ~40 ms and ~25x on a 100,000-rule document (18 MB -> 0.7 MB).
_ZSTD_LEVEL: Final = 3
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"

AGENT_STATES: Final = ("enforcing", "error")

_POLICY_FIELDS: Final = frozenset(
    {"v", "generation", "base", "actor", "published_at", "confirm_within", "confirmed", "document"}
)
_STATUS_FIELDS: Final = frozenset(
    {
        "host",
        "labels",
        "addresses",
        "generation",
        "applied_at",
        "state",
        "error",
        "version",
        "heartbeat_at",
    }
)


class RecordError(ValueError):
    """A record that cannot be used; the message says what is wrong with it (and where, when
    the caller knows: `where` is prefixed, e.g. "microseg.policy[0]@17")."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


@dataclass(frozen=True)
class PolicyRecord:
    """One policy generation: `document` is a policy document as `PolicySet.to_api()` gives
    it (in fleet form rules may carry `hosts` and groups `select`); `base` the generation it
    was made from (0: none); `actor` who published it; `published_at` Unix seconds;
    `confirm_within` seconds the agents wait for `confirmed` before reverting (None: no
    confirmation asked); `confirmed` set by the writer's confirm (same generation again)."""

    generation: int
    document: dict[str, Any]
    base: int
    actor: str
    published_at: float
    confirm_within: float | None = None
    confirmed: bool = False


@dataclass(frozen=True)
class AgentStatus:
    """One agent's status (contract §7): `state` "enforcing" or "error" ("lost" is only
    computed by readers, from `heartbeat_at`); `generation` the applied one (0: none yet);
    `applied_at` and `heartbeat_at` Unix seconds (the agent's wall clock)."""

    host: str
    labels: dict[str, str]
    addresses: list[str]
    generation: int
    applied_at: float | None
    state: str
    error: str | None
    version: str
    heartbeat_at: float


# ---- policy records ------------------------------------------------------------------------------


def encode_policy(rec: PolicyRecord) -> bytes:
    """The record's value: zstd-compressed JSON with the format version. ValueError when the
    record itself is not one a reader would accept (so a writer never publishes one)."""
    obj = {
        "v": POLICY_FORMAT,
        "generation": rec.generation,
        "base": rec.base,
        "actor": rec.actor,
        "published_at": rec.published_at,
        "confirm_within": rec.confirm_within,
        "confirmed": rec.confirmed,
        "document": rec.document,
    }
    _check_policy(obj)
    raw = orjson.dumps(obj)
    if len(raw) > MAX_POLICY_JSON_BYTES:
        raise ValueError(
            f"the policy record is {len(raw)} bytes of JSON, more than the "
            f"{MAX_POLICY_JSON_BYTES} a reader accepts"
        )
    return bytes(cramjam.zstd.compress(raw, level=_ZSTD_LEVEL))


def decode_policy(value: bytes | None, where: str | None = None) -> PolicyRecord:
    """A policy record from its value; RecordError (prefixed with `where`) when malformed."""
    if value is None:
        raise RecordError("a tombstone (no value) where a policy generation was expected", where)
    raw = _zstd_decompress(value, where)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RecordError(f"the decompressed value is not JSON ({e})", where) from None
    try:
        _check_policy(obj)
    except ValueError as e:
        raise RecordError(str(e), where) from None
    return PolicyRecord(
        generation=obj["generation"],
        document=obj["document"],
        base=obj["base"],
        actor=obj["actor"],
        published_at=float(obj["published_at"]),
        confirm_within=None if obj["confirm_within"] is None else float(obj["confirm_within"]),
        confirmed=obj["confirmed"],
    )


def _check_policy(obj: Any) -> None:
    """ValueError naming the first thing wrong with a decoded policy record object."""
    if not isinstance(obj, dict):
        raise ValueError(f"a policy record is a JSON object, not {_kind(obj)}")
    if "v" in obj and obj["v"] != POLICY_FORMAT:
        raise ValueError(
            f"policy record format {obj['v']!r} is not the one this version reads "
            f"({POLICY_FORMAT}): upgrade the agent"
        )
    _exact_keys(obj, _POLICY_FIELDS, "policy record")
    gen = obj["generation"]
    if not _is_int(gen) or gen < 1:
        raise ValueError(f"generation must be a whole number of at least 1, not {gen!r}")
    base = obj["base"]
    if not _is_int(base) or not 0 <= base < gen:
        raise ValueError(f"base must be a whole number from 0 to {gen - 1}, not {base!r}")
    if not isinstance(obj["actor"], str):
        raise ValueError(f"actor must be a string, not {_kind(obj['actor'])}")
    if not _is_time(obj["published_at"]):
        raise ValueError(f"published_at must be Unix seconds, not {obj['published_at']!r}")
    cw = obj["confirm_within"]
    if cw is not None and not (_is_number(cw) and 0 < cw <= 86400):
        raise ValueError(f"confirm_within must be null or seconds (0 to 86400], not {cw!r}")
    if not isinstance(obj["confirmed"], bool):
        raise ValueError(f"confirmed must be true or false, not {obj['confirmed']!r}")
    if not isinstance(obj["document"], dict):
        raise ValueError(f"document must be a JSON object, not {_kind(obj['document'])}")


def _zstd_decompress(value: bytes, where: str | None) -> bytes:
    """Decompress one zstd frame whose header states its size (encode_policy writes it), at
    most MAX_POLICY_JSON_BYTES: the size is read first, so a hostile value cannot make us
    allocate more (cramjam's own decompress would grow without bound)."""
    size = _zstd_content_size(value, where)
    if size > MAX_POLICY_JSON_BYTES:
        raise RecordError(
            f"the value decompresses to {size} bytes, more than the {MAX_POLICY_JSON_BYTES} "
            "accepted",
            where,
        )
    out = bytearray(size)
    try:
        n = cramjam.zstd.decompress_into(value, out)
    except Exception as e:  # cramjam.DecompressionError and friends: corrupt input
        raise RecordError(f"the value is not valid zstd data ({e})", where) from None
    if n != size:
        raise RecordError(f"the value decompresses to {n} bytes, its header says {size}", where)
    return bytes(out)


def _zstd_content_size(value: bytes, where: str | None) -> int:
    # RFC 8878 §3.1.1.1: magic, frame header descriptor, [window], [dictionary id], size.
    if len(value) < 6 or value[:4] != _ZSTD_MAGIC:
        raise RecordError(
            f"the value is not zstd-compressed (starts {bytes(value[:8])!r}, {len(value)} bytes)",
            where,
        )
    fhd = value[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    fcs_len = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if fcs_len == 0:
        raise RecordError("the zstd frame does not state its size", where)
    if len(value) < pos + fcs_len:
        raise RecordError("the zstd frame header is cut short", where)
    field = value[pos : pos + fcs_len]
    size: int = struct.unpack("<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[fcs_len], field)[0]
    return size + 256 if fcs_len == 2 else size


# ---- agent status records ------------------------------------------------------------------------


def encode_status(s: AgentStatus) -> bytes:
    """The status record's value: JSON with the contract §7 keys plus `heartbeat_at`.
    ValueError when the status is not one `decode_status` accepts."""
    obj = {
        "host": s.host,
        "labels": s.labels,
        "addresses": s.addresses,
        "generation": s.generation,
        "applied_at": s.applied_at,
        "state": s.state,
        "error": s.error,
        "version": s.version,
        "heartbeat_at": s.heartbeat_at,
    }
    _check_status(obj)
    return orjson.dumps(obj)


def decode_status(value: bytes | None, where: str | None = None) -> AgentStatus:
    """An agent's status from its value; RecordError (prefixed with `where`) when malformed
    (a tombstone included: the caller handles value None before)."""
    if value is None:
        raise RecordError("a tombstone (no value) where an agent status was expected", where)
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        raise RecordError(f"the value is not JSON ({e})", where) from None
    try:
        _check_status(obj)
    except ValueError as e:
        raise RecordError(str(e), where) from None
    return AgentStatus(
        host=obj["host"],
        labels=dict(obj["labels"]),
        addresses=list(obj["addresses"]),
        generation=obj["generation"],
        applied_at=None if obj["applied_at"] is None else float(obj["applied_at"]),
        state=obj["state"],
        error=obj["error"],
        version=obj["version"],
        heartbeat_at=float(obj["heartbeat_at"]),
    )


def _check_status(obj: Any) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"an agent status is a JSON object, not {_kind(obj)}")
    _exact_keys(obj, _STATUS_FIELDS, "agent status")
    host = obj["host"]
    if not isinstance(host, str) or not host or len(host) > 255:
        raise ValueError(f"host must be a name of 1 to 255 characters, not {host!r}")
    labels = obj["labels"]
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValueError(f"labels must be an object of strings, not {labels!r}")
    addrs = obj["addresses"]
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise ValueError(f"addresses must be a list of strings, not {addrs!r}")
    for a in addrs:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ValueError(f"addresses: {a!r} is not an IPv4 or IPv6 address") from None
    gen = obj["generation"]
    if not _is_int(gen) or gen < 0:
        raise ValueError(f"generation must be a whole number of at least 0, not {gen!r}")
    if obj["applied_at"] is not None and not _is_time(obj["applied_at"]):
        raise ValueError(f"applied_at must be null or Unix seconds, not {obj['applied_at']!r}")
    if obj["state"] not in AGENT_STATES:
        raise ValueError(f"state must be one of {', '.join(AGENT_STATES)}, not {obj['state']!r}")
    if obj["error"] is not None and not isinstance(obj["error"], str):
        raise ValueError(f"error must be null or a string, not {_kind(obj['error'])}")
    if not isinstance(obj["version"], str):
        raise ValueError(f"version must be a string, not {_kind(obj['version'])}")
    if not _is_time(obj["heartbeat_at"]):
        raise ValueError(f"heartbeat_at must be Unix seconds, not {obj['heartbeat_at']!r}")


# ---- helpers -------------------------------------------------------------------------------------


def _exact_keys(obj: dict[str, Any], fields: frozenset[str], what: str) -> None:
    missing = sorted(fields - obj.keys())
    if missing:
        raise ValueError(f"{what} lacks {', '.join(missing)}")
    extra = sorted(obj.keys() - fields)
    if extra:
        raise ValueError(f"{what} has unknown field(s) {', '.join(map(repr, extra))}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _is_time(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _kind(v: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(v), "null" if v is None else type(v).__name__)


def is_lost(status: AgentStatus, now: float, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> bool:
    """Silent for more than LOST_AFTER_HEARTBEATS heartbeats at `now` (wall clock)."""
    return now - status.heartbeat_at > LOST_AFTER_HEARTBEATS * heartbeat_s
