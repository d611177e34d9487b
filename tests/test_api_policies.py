"""The admin API (streamer/api/app.py) in-process over the session's classifier
(support/apiapp.py): policy CRUD, enforced when answered (checked with BPF_PROG_TEST_RUN verdicts
right after each response), hit counters, what invalid rules and bodies say (never a 500),
body limits (a 100,000-rule PUT fits), dry runs, and 100 concurrent writes (set == disk ==
kernel)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from support.apiapp import AUTH, Api, P, assert_error, full, passes, rule

from streamer.api.params import SMALL_BODY_LIMIT

# ---- policy CRUD -------------------------------------------------------------------------


ORIGINAL_EXAMPLE = {
    "rule_id": 1001,
    "src_ip": "0.0.0.0/0",
    "dst_ip": "10.0.0.5",
    "dst_port": 443,
    "protocol": "tcp",
    "action": "allow",
    "priority": 100,
}


async def test_crud_is_enforced_when_answered(api: Api) -> None:
    dp = api.dp
    status, body, _ = await api.call(
        "PUT", f"{P}/policies", {"default_action": "deny", "policies": []}
    )
    assert status == 200, body
    assert not passes(dp, "10.0.0.5", 443)

    # POST: the original design's example rule.
    gen = api.store.generation
    status, body, headers = await api.call("POST", f"{P}/policies", ORIGINAL_EXAMPLE)
    assert status == 201, body
    assert body == full(1001, src_ip="0.0.0.0/0", dst_ip="10.0.0.5", dst_port=443)
    assert headers["Location"] == f"{P}/policies/1001"
    assert int(headers["X-Policy-Generation"]) == gen + 1 == dp.active()[0]
    assert passes(dp, "10.0.0.5", 443)
    assert not passes(dp, "10.0.0.5", 80)

    status, body, _ = await api.call("GET", f"{P}/policies")
    assert status == 200
    assert body == {
        "policies": [full(1001, src_ip="0.0.0.0/0", dst_ip="10.0.0.5", dst_port=443)],
        "count": 1,
        "default_action": "deny",
        "groups": {},
        "generation": api.store.generation,
        "policy_mode": "enforce",
        "failsafe": [],
    }

    # PUT one: rule_id may be left out of the body.
    update = {k: v for k, v in ORIGINAL_EXAMPLE.items() if k != "rule_id"}
    update.update(dst_port="80-90", name="web")
    status, body, headers = await api.call("PUT", f"{P}/policies/1001", update)
    assert status == 200, body
    assert body["dst_port"] == "80-90" and body["name"] == "web"
    assert int(headers["X-Policy-Generation"]) == api.store.generation
    assert passes(dp, "10.0.0.5", 85)
    assert not passes(dp, "10.0.0.5", 443)
    # ... or equal the path's.
    status, body, _ = await api.call("PUT", f"{P}/policies/1001", {**update, "rule_id": 1001})
    assert status == 200, body

    # DELETE answers with the deleted rule.
    status, body, _ = await api.call("DELETE", f"{P}/policies/1001")
    assert status == 200, body
    assert body["rule_id"] == 1001 and body["name"] == "web"
    assert not passes(dp, "10.0.0.5", 85)
    status, body, _ = await api.call("GET", f"{P}/policies/1001")
    assert_error(status, body, 404, "not_found", "1001")
    status, body, _ = await api.call("DELETE", f"{P}/policies/1001")
    assert_error(status, body, 404, "not_found", "1001")
    status, body, _ = await api.call("PUT", f"{P}/policies/1001", update)
    assert_error(status, body, 404, "not_found", "1001")

    disk = api.disk()
    assert disk["policies"] == [] and disk["default_action"] == "deny"
    assert disk["generation"] == api.store.generation == dp.active()[0]


async def test_duplicate_rule_id_is_409(api: Api) -> None:
    assert (await api.call("POST", f"{P}/policies", rule(10)))[0] == 201
    gen = api.store.generation
    status, body, _ = await api.call("POST", f"{P}/policies", rule(10, action="deny"))
    assert_error(status, body, 409, "conflict", "10")
    assert api.store.generation == gen and api.store.policy.policies[0].action == "allow"


async def test_put_one_body_rule_id_must_match_path(api: Api) -> None:
    assert (await api.call("POST", f"{P}/policies", rule(11)))[0] == 201
    for other in (12, "11", True, None, 11.0):
        status, body, _ = await api.call("PUT", f"{P}/policies/11", {**rule(11), "rule_id": other})
        assert_error(status, body, 400, "invalid", "rule_id", "path")


async def test_rule_hit_counters(api: Api) -> None:
    dp = api.dp
    await api.call("PUT", f"{P}/policies", {"default_action": "deny", "policies": []})
    assert (await api.call("POST", f"{P}/policies", rule(20, dst_ip="10.20.0.1")))[0] == 201
    status, body, _ = await api.call("GET", f"{P}/policies/20")
    assert status == 200
    assert (body["packets"], body["bytes"], body["last_hit"]) == (0, 0, None)
    for _ in range(3):
        assert passes(dp, "10.20.0.1", 80)
    status, body, _ = await api.call("GET", f"{P}/policies/20")
    assert status == 200
    assert body == {
        **full(20, dst_ip="10.20.0.1"),
        **{k: body[k] for k in ("packets", "bytes", "last_hit")},
        "staged_packets": 0,  # contract §6: beside the hits; an enforced rule decides itself
        "staged_bytes": 0,
        "staged_flows": 0,
    }
    assert body["packets"] == 3 and body["bytes"] > 3 * 40
    last_hit = datetime.fromisoformat(body["last_hit"])
    assert body["last_hit"].endswith("Z")
    assert abs((datetime.now(UTC) - last_hit).total_seconds()) < 5


# ---- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (rule(1, dst_port=70000), ["dst_port", "70000", "65535"]),
        (rule(1, src_ip="10.0.0.300"), ["src_ip", "10.0.0.300", "CIDR"]),
        (rule(1, dst_ip="10.0.0.1/24"), ["dst_ip", "host bits", "10.0.0.0/24"]),
        (rule(1, protocol="sctp"), ["protocol", "sctp", "tcp, udp, icmp, icmpv6, any"]),
        (rule(1, action="accept"), ["action", "accept", "allow, deny, log"]),
        (rule(1, priority=-1), ["priority", "0..65535"]),
        (rule(1, colour="red"), ["colour", "unknown field", "allowed fields"]),
        (rule(1, protocol="icmp", dst_port=80), ["dst_port", "icmp", "tcp"]),
        (rule(1, name="a\nb"), ["name", "control characters"]),
        (rule(0), ["rule_id", "1..4294967295"]),
        (rule(2**32), ["rule_id", "1..4294967295"]),
        (rule(True), ["rule_id"]),
        (rule(1.5), ["rule_id"]),
        (rule(10**30), ["rule_id"]),
        ({"rule_id": 1, "action": "allow"}, ["protocol", "required field is missing"]),
        ([rule(1)], ["not a rule", "object"]),
        (None, ["not a rule", "object"]),
        ("x", ["not a rule"]),
        (12, ["not a rule"]),
    ],
)
async def test_invalid_rule_says_what_is_wrong(api: Api, doc: Any, words: list[str]) -> None:
    status, body, _ = await api.call(
        "POST",
        f"{P}/policies",
        data=json.dumps(doc).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert_error(status, body, 400, "invalid", *words)
    assert api.store.policy.policies == []


async def test_whole_set_errors_name_the_rule(api: Api) -> None:
    doc = {
        "default_action": "deny",
        "policies": [rule(1), rule(2), rule(3), rule(4, dst_port="90-80"), rule(5, action="x")],
    }
    status, body, _ = await api.call("PUT", f"{P}/policies", doc)
    assert_error(
        status,
        body,
        400,
        "invalid",
        "policies[3] (rule_id 4): dst_port",
        "90-80",
        "policies[4] (rule_id 5): action",
    )
    assert len(body["errors"]) == 2
    duplicate = {"default_action": "deny", "policies": [rule(1), rule(2), rule(1)]}
    status, body, _ = await api.call("PUT", f"{P}/policies", duplicate)
    assert_error(status, body, 400, "invalid", "policies[2] (rule_id 1): rule_id: duplicate")
    bad: Any
    for bad, words in [
        ({"default_action": "block", "policies": []}, ["default_action", "allow, deny"]),
        ({"default_action": "deny", "policies": [], "extra": 1}, ["extra", "unknown field"]),
        ({"default_action": "deny", "policies": 5}, ["policies", "not a list"]),
        ([rule(1)], ["top level is a list"]),
    ]:
        status, body, _ = await api.call("PUT", f"{P}/policies", bad)
        assert_error(status, body, 400, "invalid", *words)
    assert api.store.policy.policies == [] and api.store.policy.default_action == "allow"


async def test_whole_set_reads_like_a_policy_file(api: Api) -> None:
    # A missing default_action is allow and missing policies are none, as in a policy file.
    status, body, _ = await api.call("PUT", f"{P}/policies", {"default_action": "deny"})
    assert status == 200, body
    assert api.store.policy.default_action == "deny" and api.store.policy.policies == []
    status, body, _ = await api.call("PUT", f"{P}/policies", {"policies": [rule(3)]})
    assert status == 200, body
    assert body["default_action_changed"] is True and body["added"] == [full(3)]
    assert api.store.policy.default_action == "allow"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"rule_id": 1,', ["not valid JSON", "line 1 column"]),
        (b'{"rule_id": 1,\n "protocol": tcp}', ["not valid JSON", "line 2 column"]),
        (b"", ["empty"]),
        (b"   \n", ["empty"]),
        (b"\xff\xfe{}", ["not valid JSON"]),
        (b'{"rule_id": 1e400}', ["not valid JSON"]),
        (b"[" * 5000 + b"]" * 5000, ["not valid JSON"]),
        (b'{"name": "\\ud800", "rule_id": 1, "protocol": "tcp", "action": "allow"}', []),
        (b'{"rule_id": 1, "protocol": "tcp", "action": "allow", "rule_id": "x"}', ["rule_id"]),
        (b'{"rule_id": 1, "protocol": "tcp", "action": "allow", "name": "\\u0000"}', ["name"]),
        (b"NaN", ["not valid JSON"]),
    ],
)
async def test_bad_json_is_400_never_500(api: Api, data: bytes, words: list[str]) -> None:
    for method, path in [
        ("POST", f"{P}/policies"),
        ("PUT", f"{P}/policies"),
        ("PUT", f"{P}/policies/1"),
    ]:
        status, body, _ = await api.call(
            method, path, data=data, headers={"Content-Type": "application/json"}
        )
        assert_error(status, body, 400, "invalid", *words)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=latin-1",
        "application/jsonx",
    ],
)
async def test_body_must_be_json_415(api: Api, content_type: str | None) -> None:
    data = json.dumps(rule(30)).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    for method, path in [
        ("POST", f"{P}/policies"),
        ("PUT", f"{P}/policies/30"),
        ("PUT", f"{P}/policies"),
    ]:
        async with api.client.request(
            method, path, data=data, headers={**AUTH, **headers}, skip_auto_headers=["Content-Type"]
        ) as resp:
            body = await resp.json()
            assert_error(resp.status, body, 415, "unsupported_media_type", "application/json")
    status, body, _ = await api.call(
        "POST",
        f"{P}/policies",
        data=data,
        headers={"Content-Type": "application/json; charset=UTF-8"},
    )
    assert status == 201, body


async def test_body_limits(api: Api) -> None:
    big = rule(40, name="x" * SMALL_BODY_LIMIT)
    for method, path in [("POST", f"{P}/policies"), ("PUT", f"{P}/policies/40")]:
        status, body, _ = await api.call(method, path, big)
        assert_error(status, body, 413, "too_large", "64 KiB")

    # Without Content-Length (chunked), the limit holds as the body arrives.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"rule_id": 41, "protocol": "tcp", "action": "allow", "name": "'
        for _ in range(SMALL_BODY_LIMIT // 1024 + 1):
            yield b"y" * 1024
        yield b'"}'

    async with api.client.post(
        f"{P}/policies", data=chunks(), headers={**AUTH, "Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"
    assert api.store.policy.policies == []
    # The whole-set limit is 64 MiB: announce more and it is refused before reading.
    async with api.client.put(
        f"{P}/policies",
        data=b" " * (64 * 1024 * 1024 + 1),
        headers={**AUTH, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "too_large"


async def test_bulk_replace_of_100000_rules(api: Api) -> None:
    dp = api.dp
    n = 100_000
    doc = {
        "default_action": "deny",
        "policies": [
            {
                "rule_id": i + 1,
                "name": f"rule-{i + 1}",
                "src_ip": "any",
                "dst_ip": f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}",
                "src_port": 0,
                "dst_port": 80,
                "protocol": "tcp",
                "action": "allow",
                "priority": 100,
                "direction": "any",
            }
            for i in range(n)
        ],
    }
    data = json.dumps(doc).encode()
    assert len(data) > SMALL_BODY_LIMIT * 100
    started = time.monotonic()
    status, body, headers = await api.call(
        "PUT", f"{P}/policies", data=data, headers={"Content-Type": "application/json"}
    )
    elapsed = time.monotonic() - started
    assert status == 200, body
    assert len(body["added"]) == n and body["removed"] == [] and not body["dry_run"]
    assert int(headers["X-Policy-Generation"]) == dp.active()[0] == api.store.generation
    print(f"PUT of {n} rules ({len(data) / 2**20:.1f} MiB): {elapsed:.2f} s")
    assert passes(dp, "10.100.0.0", 80)
    assert passes(dp, "10.101.134.159", 80)  # rule 100000
    assert not passes(dp, "10.101.134.160", 80)
    assert not passes(dp, "10.100.0.0", 81)
    status, body, _ = await api.call("GET", f"{P}/policies")
    assert status == 200 and body["count"] == n
    assert len(api.disk()["policies"]) == n
    status, body, _ = await api.call("GET", f"{P}/policies/{n}")
    assert status == 200 and body["dst_ip"] == "10.101.134.159"
    # Back to nothing (the shared classifier's slots are freed).
    status, body, _ = await api.call(
        "PUT", f"{P}/policies", {"default_action": "allow", "policies": []}
    )
    assert status == 200 and len(body["removed"]) == n


# ---- dry runs -----------------------------------------------------------------------------


async def test_dry_run_returns_the_diff_and_changes_nothing(api: Api) -> None:
    dp = api.dp
    setup = {
        "default_action": "deny",
        "policies": [rule(50, dst_ip="10.50.0.1"), rule(51, dst_ip="10.50.0.2")],
    }
    assert (await api.call("PUT", f"{P}/policies", setup))[0] == 200
    assert passes(dp, "10.50.0.1", 80)  # a live session decided by rule 50
    gen = dp.active()[0]
    disk = api.store.path.read_bytes()
    changes = api.changes()

    async def unchanged() -> None:
        assert dp.active()[0] == gen == api.store.generation
        assert api.store.path.read_bytes() == disk
        assert api.changes() == changes
        assert [r.rule_id for r in api.store.policy.policies] == [50, 51]

    status, body, headers = await api.call("POST", f"{P}/policies?dry_run=1", rule(52))
    assert status == 200, body
    assert body["dry_run"] is True and body["generation"] == gen
    assert int(headers["X-Policy-Generation"]) == gen
    assert body["added"] == [full(52)] and body["removed"] == [] and body["changed"] == []
    await unchanged()

    status, body, _ = await api.call(
        "PUT", f"{P}/policies/50?dry_run=true", rule(50, dst_ip="10.50.0.1", action="deny")
    )
    assert status == 200, body
    assert body["changed"] == [
        {
            "before": full(50, dst_ip="10.50.0.1"),
            "after": full(50, dst_ip="10.50.0.1", action="deny"),
        }
    ]
    assert body["sessions_changing_verdict"] >= 1 and body["sessions_checked"] >= 1
    await unchanged()

    status, body, _ = await api.call("DELETE", f"{P}/policies/51?dry_run=1")
    assert status == 200, body
    assert body["removed"] == [full(51, dst_ip="10.50.0.2")]
    await unchanged()

    status, body, _ = await api.call(
        "PUT",
        f"{P}/policies?dry_run=1",
        {"default_action": "allow", "policies": [rule(51, dst_ip="10.50.0.2")]},
    )
    assert status == 200, body
    assert body["default_action_changed"] is True
    assert [r["rule_id"] for r in body["removed"]] == [50]
    await unchanged()
    assert passes(dp, "10.50.0.1", 80) and not passes(dp, "10.50.0.9", 80)

    # dry_run=0 is a real write.
    status, body, _ = await api.call("DELETE", f"{P}/policies/51?dry_run=0")
    assert status == 200 and body["rule_id"] == 51
    assert dp.active()[0] == gen + 1


# ---- concurrency -----------------------------------------------------------------------------


async def test_100_concurrent_writes_agree_with_disk_and_kernel(api: Api) -> None:
    dp = api.dp

    def r(i: int) -> dict[str, Any]:
        return rule(i, dst_ip=f"10.60.0.{i}", dst_port=80)

    setup = {"default_action": "deny", "policies": [r(i) for i in range(1, 51)]}
    assert (await api.call("PUT", f"{P}/policies", setup))[0] == 200
    gen0 = api.store.generation
    ops: list[tuple[str, str, Any]] = [("POST", f"{P}/policies", r(i)) for i in range(51, 101)]
    ops += [("DELETE", f"{P}/policies/{i}", None) for i in range(1, 41)]
    ops += [("POST", f"{P}/policies", r(i)) for i in range(51, 61)]  # duplicates: one wins
    random.Random(7).shuffle(ops)
    assert len(ops) == 100
    results = await asyncio.gather(*(api.call(m, p, b) for m, p, b in ops))
    statuses = [s for s, _, _ in results]
    assert statuses.count(201) == 50, statuses
    assert statuses.count(200) == 40, statuses
    assert statuses.count(409) == 10, statuses
    # Every accepted write was one generation, none lost or merged.
    assert api.store.generation == gen0 + 90 == dp.active()[0]
    gens = sorted(int(h["X-Policy-Generation"]) for s, _, h in results if s in (200, 201))
    assert gens == list(range(gen0 + 1, gen0 + 91))

    expected = set(range(41, 101))
    _, body, _ = await api.call("GET", f"{P}/policies")
    assert {p["rule_id"] for p in body["policies"]} == expected and body["count"] == 60
    disk = api.disk()
    assert {p["rule_id"] for p in disk["policies"]} == expected
    assert disk["generation"] == api.store.generation
    kernel = {i for i in range(1, 101) if passes(dp, f"10.60.0.{i}", 80)}
    assert kernel == expected
    assert len(api.changes()) >= 90
