"""Promote (contract §6) through the admin API served in-process over the session's
classifier: `POST /policies/{id}/promote` and `POST /policies/promote`, their answers, errors
that change nothing, dry runs, the journal across a restore, and an agent that stages
everything refusing it."""

from __future__ import annotations

from support.apiapp import Api, P, assert_error, full, rule

from streamer.policy.store import PolicyStore
from streamer.vocabulary import Mode


async def _setup(api: Api) -> None:
    doc = {
        "default_action": "allow",
        "policies": [
            rule(1, dst_port=7001, action="deny", mode="staged"),
            rule(2, dst_port=7002, action="deny", mode="staged"),
            rule(3, dst_port=7003, action="deny"),
        ],
    }
    status, body, _ = await api.call("PUT", f"{P}/policies", doc)
    assert status == 200, body


async def test_promote_one_rule(api: Api) -> None:
    await _setup(api)
    status, body, _ = await api.call("GET", f"{P}/policies/1")
    assert status == 200 and body["mode"] == "staged", body
    gen = api.store.generation
    status, body, headers = await api.call("POST", f"{P}/policies/1/promote")
    assert status == 200, body
    assert body["generation"] == gen + 1 == int(headers["X-Policy-Generation"])
    assert body["promoted"] == [
        {"rule_id": 1, "staged_packets": 0, "staged_bytes": 0, "staged_flows": 0}
    ]
    status, got, _ = await api.call("GET", f"{P}/policies/1")
    assert "mode" not in got and got["action"] == "deny"
    # The rule is the same rule in mode enforce; the others are untouched.
    assert api.store.rule(1) is not None and not api.store.rule(1).staged  # type: ignore[union-attr]
    assert api.store.rule(2) is not None and api.store.rule(2).staged  # type: ignore[union-attr]
    assert api.changes()[-1]["change"] == "promote rule 1"


async def test_promote_several_in_one_generation(api: Api) -> None:
    await _setup(api)
    gen = api.store.generation
    status, body, _ = await api.call("POST", f"{P}/policies/promote", {"rule_ids": [2, 1, 2]})
    assert status == 200, body
    assert body["generation"] == gen + 1
    assert [p["rule_id"] for p in body["promoted"]] == [2, 1]
    status, listing, _ = await api.call("GET", f"{P}/policies")
    assert [r.get("mode", "enforce") for r in listing["policies"]] == ["enforce"] * 3


async def test_promote_errors_change_nothing(api: Api) -> None:
    await _setup(api)
    gen = api.store.generation
    disk = api.disk()
    status, body, _ = await api.call("POST", f"{P}/policies/99/promote")
    assert_error(status, body, 404, "not_found", "99")
    status, body, _ = await api.call("POST", f"{P}/policies/3/promote")
    assert_error(status, body, 409, "not_staged", "rule 3 is not staged")
    # One bad id refuses the whole promote.
    status, body, _ = await api.call("POST", f"{P}/policies/promote", {"rule_ids": [1, 3]})
    assert_error(status, body, 409, "not_staged")
    for bad in ({}, {"rule_ids": []}, {"rule_ids": [0]}, {"rule_ids": ["1"]}, [1], {"ids": [1]}):
        status, body, _ = await api.call("POST", f"{P}/policies/promote", bad)
        assert_error(status, body, 400, "invalid", "rule_ids")
    status, body, _ = await api.call("POST", f"{P}/policies/abc/promote")
    assert status == 400, body
    assert api.store.generation == gen and api.disk() == disk
    assert api.store.rule(1).staged  # type: ignore[union-attr]


async def test_promote_dry_run(api: Api) -> None:
    await _setup(api)
    gen = api.store.generation
    status, body, _ = await api.call("POST", f"{P}/policies/1/promote?dry_run=1")
    assert status == 200, body
    assert body["dry_run"] is True and body["generation"] == gen
    assert body["changed"] == [
        {
            "before": full(1, dst_port=7001, action="deny", mode="staged"),
            "after": full(1, dst_port=7001, action="deny"),
        }
    ]
    assert "failsafe" in body and "sessions_checked" in body
    assert api.store.generation == gen and api.store.rule(1).staged  # type: ignore[union-attr]


async def test_promote_survives_a_restore_from_the_journal(api: Api) -> None:
    await _setup(api)
    status, _, _ = await api.call("POST", f"{P}/policies/promote", {"rule_ids": [1, 2]})
    assert status == 200
    persisted = PolicyStore(api.state_dir, lambda p, g: 0).read_persisted()
    assert persisted is not None
    policy, _ = persisted
    assert [r.staged for r in policy.policies] == [False, False, False]


async def test_an_agent_that_stages_everything_refuses_promote(api: Api) -> None:
    await _setup(api)
    api.ctx.policy_mode = Mode.STAGED
    status, body, _ = await api.call("POST", f"{P}/policies/1/promote")
    assert_error(status, body, 409, "staged_agent", "--policy-mode staged")
    assert api.store.rule(1).staged  # type: ignore[union-attr]


async def test_promote_with_confirm_within_pends_then_is_confirmed(api: Api) -> None:
    await _setup(api)
    gen = api.store.generation
    status, body, _ = await api.call("POST", f"{P}/policies/1/promote?confirm_within=60")
    assert status == 200, body
    assert body["generation"] == gen + 1 and body["pending"]["generation"] == gen + 1, body
    # While it waits, another promote is refused and nothing changes.
    status, err, _ = await api.call("POST", f"{P}/policies/2/promote")
    assert_error(status, err, 409, "pending")
    status, ok, _ = await api.call("POST", f"{P}/policies/confirm", {"generation": gen + 1})
    assert status == 200 and ok["confirmed"] is True, ok
    status, body, _ = await api.call("POST", f"{P}/policies/2/promote?confirm_within=0")
    assert_error(status, body, 400, "invalid", "confirm_within")
    assert api.store.rule(2) is not None and api.store.rule(2).staged  # type: ignore[union-attr]
