"""The fleet's records (streamer/fleet/records.py): a policy generation and an agent's status
round-trip through their encodings, and every malformed value is refused with a RecordError
that says what is wrong (and where, when told)."""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Any

import cramjam
import orjson
import pytest

from streamer.fleet.records import (
    MAX_POLICY_JSON_BYTES,
    AgentStatus,
    PolicyRecord,
    RecordError,
    decode_policy,
    decode_status,
    encode_policy,
    encode_status,
)

DOC: dict[str, Any] = {
    "default_action": "deny",
    "groups": {"db": {"members": ["10.0.0.0/24"], "select": {"role": "db"}}},
    "policies": [
        {"rule_id": 1, "name": "ssh", "dst_port": 22, "hosts": {"role": "db"}, "action": "allow"}
    ],
}
REC = PolicyRecord(
    generation=3,
    document=DOC,
    base=2,
    actor="alice",
    published_at=1700000000.25,
    confirm_within=30.0,
)
STATUS = AgentStatus(
    host="db-1",
    labels={"role": "db"},
    addresses=["10.0.0.5", "fd00::5"],
    generation=3,
    applied_at=1700000001.5,
    state="enforcing",
    error=None,
    version="0.1.0",
    heartbeat_at=1700000002.0,
)


def _policy_value(**over: Any) -> bytes:
    obj: dict[str, Any] = {
        "v": 1,
        "generation": 3,
        "base": 2,
        "actor": "alice",
        "published_at": 1.5,
        "confirm_within": None,
        "confirmed": False,
        "document": {},
    }
    obj.update(over)
    for k in [k for k, v in over.items() if v is _DROP]:
        del obj[k]
    return bytes(cramjam.zstd.compress(orjson.dumps(obj)))


_DROP = object()


def test_policy_round_trip() -> None:
    value = encode_policy(REC)
    assert value[:4] == b"\x28\xb5\x2f\xfd"  # a zstd frame
    assert decode_policy(value) == REC
    confirmed = replace(REC, confirmed=True, confirm_within=None)
    assert decode_policy(encode_policy(confirmed)) == confirmed
    assert orjson.loads(bytes(cramjam.zstd.decompress(value)))["v"] == 1


def test_policy_of_100000_rules_compresses() -> None:
    rules = [
        {
            "rule_id": i,
            "src_ip": f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
            "dst_port": 443,
            "protocol": "tcp",
            "action": "allow",
            "priority": i,
        }
        for i in range(100_000)
    ]
    rec = replace(REC, document={"default_action": "deny", "groups": {}, "policies": rules})
    value = encode_policy(rec)
    assert len(value) < 4 * 1024 * 1024
    assert decode_policy(value) == rec


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "a tombstone"),
        (b"", "not zstd-compressed"),
        (b'{"generation": 1}', "not zstd-compressed"),
        (zlib.compress(b"{}"), "not zstd-compressed"),
        (bytes(cramjam.zstd.compress(b"{}"))[:-3], "not valid zstd data"),
        (b"\x28\xb5\x2f\xfd\x00", "not zstd-compressed"),  # cut short
        (bytes(cramjam.zstd.compress(b"not json")), "not JSON"),
        (bytes(cramjam.zstd.compress(b"[1, 2]")), "a JSON object, not a list"),
        (_policy_value(v=2), "format 2 is not the one this version reads"),
        (_policy_value(v=_DROP), "lacks v"),
        (_policy_value(generation=_DROP), "lacks generation"),
        (_policy_value(document=_DROP, actor=_DROP), "lacks actor, document"),
        (_policy_value(extra=1), "unknown field(s) 'extra'"),
        (_policy_value(generation=0, base=0), "generation must be a whole number of at least 1"),
        (_policy_value(generation=-4), "generation must be"),
        (_policy_value(generation=2.0), "generation must be"),
        (_policy_value(generation=True), "generation must be"),
        (_policy_value(generation="3"), "generation must be"),
        (_policy_value(base=3), "base must be a whole number from 0 to 2"),
        (_policy_value(base=-1), "base must be"),
        (_policy_value(base=None), "base must be"),
        (_policy_value(actor=7), "actor must be a string"),
        (_policy_value(published_at="now"), "published_at must be Unix seconds"),
        (_policy_value(published_at=-1), "published_at must be"),
        (_policy_value(confirm_within=0), "confirm_within must be null or seconds"),
        (_policy_value(confirm_within="30"), "confirm_within must be"),
        (_policy_value(confirmed=1), "confirmed must be true or false"),
        (_policy_value(confirmed=None), "confirmed must be"),
        (_policy_value(document=[]), "document must be a JSON object, not a list"),
        (_policy_value(document=None), "document must be a JSON object, not null"),
    ],
)
def test_malformed_policy_values(value: bytes | None, message: str) -> None:
    with pytest.raises(RecordError, match=r"^microseg\.policy\[0\]@7: ") as exc:
        decode_policy(value, "microseg.policy[0]@7")
    assert message in str(exc.value)
    assert exc.value.where == "microseg.policy[0]@7"


def test_policy_size_is_read_before_decompressing() -> None:
    """A frame claiming more than the limit is refused without allocating for it; one that
    lies about its size is refused too (zstd checks the size it states)."""
    huge = bytearray(cramjam.zstd.compress(b"{}"))
    # Frame header: magic, descriptor (single segment, 8-byte size), size.
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + (MAX_POLICY_JSON_BYTES + 1).to_bytes(8, "little")
    with pytest.raises(RecordError, match=r"decompresses to .* more than"):
        decode_policy(header + bytes(huge[6:]))
    no_size = b"\x28\xb5\x2f\xfd" + bytes([0x00, 0x58]) + b"\x00" * 8
    with pytest.raises(RecordError, match="does not state its size"):
        decode_policy(no_size)
    raw = orjson.dumps({"x": "y" * 1000})
    frame = bytearray(cramjam.zstd.compress(raw))
    # The size field: two bytes for sizes 256..65791 (value + 256) after a window byte or not.
    assert frame[4] >> 6 == 1
    pos = 5 + (0 if frame[4] & 0x20 else 1)
    frame[pos : pos + 2] = (len(raw) - 256 - 10).to_bytes(2, "little")  # claims 10 bytes less
    with pytest.raises(RecordError, match="not valid zstd data"):
        decode_policy(bytes(frame))
    frame[pos : pos + 2] = (len(raw) - 256 + 10).to_bytes(2, "little")  # claims 10 more
    with pytest.raises(RecordError, match="not valid zstd data"):
        decode_policy(bytes(frame))


def test_encode_policy_refuses_what_readers_would() -> None:
    with pytest.raises(ValueError, match="generation must be"):
        encode_policy(replace(REC, generation=0, base=0))
    with pytest.raises(ValueError, match="base must be"):
        encode_policy(replace(REC, base=3))


def test_status_round_trip() -> None:
    value = encode_status(STATUS)
    assert set(orjson.loads(value)) == {
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
    assert decode_status(value) == STATUS
    failed = replace(STATUS, state="error", error="cannot compile", applied_at=None, generation=0)
    assert decode_status(encode_status(failed)) == failed


def _status_value(**over: Any) -> bytes:
    obj = orjson.loads(encode_status(STATUS))
    obj.update(over)
    for k in [k for k, v in over.items() if v is _DROP]:
        del obj[k]
    return orjson.dumps(obj)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "a tombstone"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "a JSON object, not a list"),
        (_status_value(host=_DROP), "lacks host"),
        (_status_value(heartbeat_at=_DROP), "lacks heartbeat_at"),
        (_status_value(lag=1), "unknown field(s) 'lag'"),
        (_status_value(host=""), "host must be a name"),
        (_status_value(host="h" * 256), "host must be a name"),
        (_status_value(labels={"role": 1}), "labels must be an object of strings"),
        (_status_value(labels=["role"]), "labels must be"),
        (_status_value(addresses="10.0.0.1"), "addresses must be a list of strings"),
        (_status_value(addresses=["10.0.0.0/24"]), "'10.0.0.0/24' is not an IPv4 or IPv6"),
        (_status_value(addresses=["db-1"]), "is not an IPv4 or IPv6"),
        (_status_value(generation=-1), "generation must be a whole number of at least 0"),
        (_status_value(generation=1.5), "generation must be"),
        (_status_value(applied_at="yesterday"), "applied_at must be null or Unix seconds"),
        (_status_value(state="lost"), "state must be one of enforcing, error"),
        (_status_value(error=3), "error must be null or a string"),
        (_status_value(version=None), "version must be a string"),
        (_status_value(heartbeat_at=None), "heartbeat_at must be Unix seconds"),
    ],
)
def test_malformed_status_values(value: bytes | None, message: str) -> None:
    with pytest.raises(RecordError, match=r"^microseg\.agents\[0\]@2: ") as exc:
        decode_status(value, "microseg.agents[0]@2")
    assert message in str(exc.value)


def test_encode_status_refuses_what_readers_would() -> None:
    with pytest.raises(ValueError, match="state must be one of"):
        encode_status(replace(STATUS, state="lost"))
