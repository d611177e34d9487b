"""The address group routes (streamer/api/groups.py, docs/contract.md §5) in-process over the
session's classifier (support/apiapp.py): every write enforced when answered (BPF_PROG_TEST_RUN
verdicts right after each response), an empty group matching nothing and a member add making
it match, idempotent member changes, dry runs, the whole document through PUT/GET /policies,
what bad names, members and rules get (never a 500), and 100,000 members in one body."""

from __future__ import annotations

from typing import Any

from support.apiapp import Api, P, assert_error, full, passes, rule

DB = "10.70.1.0/24"
DB6 = "fd00:70::/64"


async def _deny_all_but(api: Api, groups: dict[str, Any], *rules: dict[str, Any]) -> None:
    status, body, _ = await api.call(
        "PUT",
        f"{P}/policies",
        {"default_action": "deny", "groups": groups, "policies": list(rules)},
    )
    assert status == 200, body


async def test_empty_group_matches_nothing_until_a_member_is_added(api: Api) -> None:
    dp = api.dp
    await _deny_all_but(
        api, {"db": {"members": []}}, rule(10, dst_group="db", dst_port=5432, name="to-db")
    )
    assert not passes(dp, "10.70.1.5", 5432)

    gen = api.store.generation
    status, body, headers = await api.call(
        "POST", f"{P}/groups/db/members", {"members": [DB, DB6, "10.70.1.0/24"]}
    )
    assert status == 200, body
    assert body == {
        "dry_run": False,
        "generation": gen + 1,
        "name": "db",
        "created": False,
        "deleted": False,
        "members_added": [DB, DB6],
        "members_removed": [],
        "members_unchanged": [],
        "member_count": 2,
        "rules": [10],
    }
    assert int(headers["X-Policy-Generation"]) == gen + 1 == dp.active()[0]
    # Enforced when answered, both families, only the group's addresses.
    assert passes(dp, "10.70.1.5", 5432)
    assert passes(dp, "fd00:70::9", 5432, src="fd00:99::1")
    assert not passes(dp, "10.70.2.5", 5432)
    assert not passes(dp, "10.70.1.5", 22)

    # The same again changes nothing, says so, and keeps the generation.
    status, body, headers = await api.call("POST", f"{P}/groups/db/members", {"members": [DB]})
    assert status == 200, body
    assert body["members_added"] == [] and body["members_unchanged"] == [DB]
    assert int(headers["X-Policy-Generation"]) == gen + 1 == api.store.generation

    # Remove one: the other family still matches.
    status, body, _ = await api.call(
        "DELETE", f"{P}/groups/db/members", {"members": [DB, "10.99.0.1"]}
    )
    assert status == 200, body
    assert body["members_removed"] == [DB] and body["members_unchanged"] == ["10.99.0.1"]
    assert body["member_count"] == 1 and body["generation"] == gen + 2
    assert not passes(dp, "10.70.1.5", 5432)
    assert passes(dp, "fd00:70::9", 5432, src="fd00:99::1")

    # Emptied again: matches nothing.
    status, body, _ = await api.call("DELETE", f"{P}/groups/db/members", {"members": [DB6]})
    assert status == 200 and body["member_count"] == 0, body
    assert not passes(dp, "fd00:70::9", 5432, src="fd00:99::1")

    disk = api.disk()
    assert disk["groups"] == {"db": {"members": []}}
    assert disk["policies"][0]["dst_group"] == "db"


async def test_group_crud_and_reads(api: Api) -> None:
    dp = api.dp
    await _deny_all_but(api, {})
    # PUT creates: 201 with Location.
    status, body, headers = await api.call(
        "PUT", f"{P}/groups/web", {"members": ["10.71.0.1", "10.71.0.2/32", "2001:db8:71::/48"]}
    )
    assert status == 201, body
    assert headers["Location"] == f"{P}/groups/web"
    assert body["created"] is True and body["members_added"] == [
        "10.71.0.1",
        "10.71.0.2",
        "2001:db8:71::/48",
    ]
    # A rule using it, from the group's addresses only.
    status, body, _ = await api.call(
        "POST", f"{P}/policies", rule(20, src_group="web", dst_port=80)
    )
    assert status == 201, body
    assert body == full(20, src_group="web", dst_port=80)
    assert passes(dp, "10.1.1.1", 80, src="10.71.0.2")
    assert not passes(dp, "10.1.1.1", 80, src="10.71.0.3")

    status, body, _ = await api.call("GET", f"{P}/groups")
    assert status == 200
    assert body == {"groups": [{"name": "web", "member_count": 3, "rules": [20]}], "count": 1}
    status, body, _ = await api.call("GET", f"{P}/groups/web")
    assert status == 200
    assert body == {
        "name": "web",
        "members": ["10.71.0.1", "10.71.0.2", "2001:db8:71::/48"],
        "member_count": 3,
        "rules": [20],
    }

    # PUT replaces: 200, the difference named.
    status, body, _ = await api.call("PUT", f"{P}/groups/web", {"members": ["10.71.0.3"]})
    assert status == 200, body
    assert body["created"] is False and body["members_added"] == ["10.71.0.3"]
    assert body["members_removed"] == ["10.71.0.1", "10.71.0.2", "2001:db8:71::/48"]
    assert passes(dp, "10.1.1.1", 80, src="10.71.0.3")
    assert not passes(dp, "10.1.1.1", 80, src="10.71.0.2")

    # In use: 409, the message names the rule; nothing changes.
    gen = api.store.generation
    status, body, _ = await api.call("DELETE", f"{P}/groups/web")
    assert_error(status, body, 409, "in_use", "web", "20")
    assert api.store.generation == gen and "web" in api.store.policy.groups

    # The whole document comes back from GET /policies and goes in again unchanged.
    status, listed, _ = await api.call("GET", f"{P}/policies")
    assert listed["groups"] == {"web": {"members": ["10.71.0.3"]}}
    doc = {k: listed[k] for k in ("default_action", "groups", "policies")}
    status, body, _ = await api.call("PUT", f"{P}/policies", doc)
    assert status == 200, body
    assert body["added"] == body["removed"] == body["changed"] == []
    assert body["groups_added"] == body["groups_removed"] == body["groups_changed"] == []

    # Without its rule the group can go.
    assert (await api.call("DELETE", f"{P}/policies/20"))[0] == 200
    status, body, _ = await api.call("DELETE", f"{P}/groups/web")
    assert status == 200, body
    assert body["deleted"] is True and body["members_removed"] == ["10.71.0.3"]
    assert api.store.policy.groups == {}
    status, body, _ = await api.call("GET", f"{P}/groups/web")
    assert_error(status, body, 404, "not_found", "web")


async def test_dry_runs_change_nothing(api: Api) -> None:
    dp = api.dp
    await _deny_all_but(api, {"db": {"members": []}}, rule(10, dst_group="db", dst_port=5432))
    gen = api.store.generation
    for method, path, body in (
        ("POST", "/groups/db/members", {"members": ["10.72.0.0/16"]}),
        ("PUT", "/groups/db", {"members": ["10.72.0.0/16"]}),
        ("PUT", "/groups/new", {"members": ["10.72.0.0/16"]}),
        ("DELETE", "/groups/db/members", {"members": ["10.72.0.0/16"]}),
    ):
        status, answer, headers = await api.call(method, f"{P}{path}?dry_run=1", body)
        assert status == 200, (path, answer)
        assert answer["dry_run"] is True and "sessions_checked" in answer, answer
        assert int(headers["X-Policy-Generation"]) == gen
    status, answer, _ = await api.call(
        "POST", f"{P}/groups/db/members?dry_run=1", {"members": ["10.72.0.0/16"]}
    )
    assert answer["members_added"] == ["10.72.0.0/16"]
    status, answer, _ = await api.call(
        "PUT", f"{P}/policies?dry_run=1", {"groups": {"x": {}}, "policies": []}
    )
    assert (
        status == 200 and answer["groups_added"] == ["x"] and answer["groups_removed"] == ["db"]
    ), answer
    assert api.store.generation == gen and api.store.policy.groups["db"].members == ()
    assert not passes(dp, "10.72.0.1", 5432)


async def test_errors(api: Api) -> None:
    await _deny_all_but(api, {"db": {"members": [DB]}}, rule(10, dst_group="db"))
    gen = api.store.generation
    cases: list[tuple[str, str, Any, int, str, tuple[str, ...]]] = [
        ("GET", "/groups/nope", None, 404, "not_found", ("nope",)),
        ("PUT", "/groups/nope/members", None, 405, "method_not_allowed", ()),
        ("POST", "/groups/nope/members", {"members": [DB]}, 404, "not_found", ("nope",)),
        ("DELETE", "/groups/nope/members", {"members": [DB]}, 404, "not_found", ("nope",)),
        ("DELETE", "/groups/nope", None, 404, "not_found", ("nope",)),
        ("GET", "/groups/-bad", None, 400, "invalid", ("group name", "-bad")),
        ("PUT", "/groups/a%20b", {"members": []}, 400, "invalid", ("a b",)),
        (
            "POST",
            "/groups/db/members",
            {"members": ["10.70.1.1/16", "any", 7]},
            400,
            "invalid",
            ("members[0]", "host bits", "members[1]", '"any"', "members[2]"),
        ),
        ("POST", "/groups/db/members", {"member": [DB]}, 400, "invalid", ("member",)),
        ("POST", "/groups/db/members", {"members": DB}, 400, "invalid", ("not a list",)),
        ("POST", "/groups/db/members", [DB], 400, "invalid", ("not an object",)),
        ("PUT", "/groups/db", {"members": ["fe80::1%eth0"]}, 400, "invalid", ("members[0]",)),
        (
            "PUT",
            "/groups/db",
            {"members": [], "select": {"role": "web"}},
            400,
            "invalid",
            ("fleet",),
        ),
        ("PUT", "/groups/db", {"members": [], "x": 1}, 400, "invalid", ("unknown field",)),
        ("DELETE", "/groups/db", None, 409, "in_use", ("10",)),
        (
            "POST",
            "/policies",
            rule(11, src_group="web"),
            400,
            "invalid",
            ("rule_id 11", "src_group", "web", "db"),
        ),
        (
            "PUT",
            "/policies/10",
            rule(10, dst_group="web"),
            400,
            "invalid",
            ("dst_group", "web"),
        ),
        (
            "POST",
            "/policies",
            rule(12, src_group="db", src_ip="10.0.0.1"),
            400,
            "invalid",
            ("src_ip and src_group",),
        ),
        (
            "PUT",
            "/policies",
            {"groups": {}, "policies": [rule(13, dst_group="db")]},
            400,
            "invalid",
            ("policies[0] (rule_id 13)", "dst_group", "no group"),
        ),
        (
            "PUT",
            "/policies",
            {"groups": {"web": {"select": {"role": "web"}}}},
            400,
            "invalid",
            ("groups.web", "fleet mode"),
        ),
    ]
    for method, path, body, status_want, code, words in cases:
        status, answer, _ = await api.call(method, f"{P}{path}", body)
        assert_error(status, answer, status_want, code, *words)
    status, answer, _ = await api.call(
        "POST", f"{P}/groups/db/members", data=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_error(status, answer, 415, "unsupported_media_type")
    status, answer, _ = await api.call(
        "POST",
        f"{P}/groups/db/members",
        data=b'{"members": ["' + b"1" * (65 << 20) + b'"]}',
        headers={"Content-Type": "application/json"},
    )
    assert_error(status, answer, 413, "too_large")
    assert api.store.generation == gen
    assert api.store.policy.groups["db"].members == (DB,)


async def test_100k_members_in_one_body(api: Api) -> None:
    dp = api.dp
    await _deny_all_but(api, {"big": {"members": []}}, rule(30, src_group="big", dst_port=443))
    members = [f"2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::/64" for i in range(100_000)]
    status, body, _ = await api.call("POST", f"{P}/groups/big/members", {"members": members})
    assert status == 200, body if not isinstance(body, dict) else body.get("message")
    assert body["member_count"] == 100_000 and len(body["members_added"]) == 100_000
    assert passes(dp, "2001:db8::1", 443, src="2001:db8:1:869f::7")  # the last member
    assert not passes(dp, "2001:db8::1", 443, src="2001:db8:2::7")
    status, body, _ = await api.call("GET", f"{P}/groups/big")
    assert status == 200 and body["member_count"] == 100_000
    status, body, _ = await api.call("PUT", f"{P}/groups/big", {"members": members[:10]})
    assert status == 200 and body["member_count"] == 10
