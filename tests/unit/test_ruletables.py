"""streamer.datapath.ruletables: a long random sequence of single-rule changes made in place
(rules of both modes, rules changing mode, the default action changing; and under staged_all)
gives the same tables as compiling the final set whole (with room for every shape), both
views' halves of every key included, and keeps its invariants (every shape non-empty, its max
score exact, probe order by max score) when shapes are merged."""

from __future__ import annotations

import random
from typing import Any

import pytest

from streamer.datapath.compiler import Shape, compile_policy, entry_of, rule_ends, top, value_of
from streamer.datapath.ruletables import NeedsRecompile, RuleTables
from streamer.policy.model import Group, Rule, parse_policy_document


def _rule(rng: random.Random, rule_id: int, staged_share: float = 0.3) -> Rule:
    plen = rng.choice((8, 16, 24, 32))
    value = (10 << 24 | rng.getrandbits(24)) & (((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1))
    text = ".".join(str(value >> k & 255) for k in (24, 16, 8, 0))
    doc: dict[str, Any] = {
        "rule_id": rule_id,
        "src_ip": text if plen == 32 else f"{text}/{plen}",
        "protocol": rng.choice(("tcp", "udp", "any")),
        "action": rng.choice(("allow", "deny", "log")),
        "priority": rng.randint(1, 5),
        "direction": rng.choice(("ingress", "egress", "any")),
    }
    if doc["protocol"] != "any" or rng.random() < 0.3:
        doc["dst_port"] = rng.choice((22, 80, "1000-1100", "0-65535"))
    if rng.random() < 0.2:
        doc["src_ip"] = "10.0.0.0/8"  # the same keys from several rules
    if rng.random() < 0.1:
        doc["src_ip"] = "fd00::/16"
    if rng.random() < staged_share:
        doc["mode"] = "staged"
    return Rule.model_validate(doc)


def _other_mode(rule: Rule) -> Rule:
    doc = rule.to_api()
    doc["mode"] = "enforce" if rule.staged else "staged"
    return Rule.model_validate(doc)


def _content(t: RuleTables) -> dict[tuple[Shape, bytes], int]:
    return {
        (ls.shape, k[2:]): v for f in (4, 6) for ls in t.fam[f].order for k, v in ls.best.items()
    }


def _check_invariants(t: RuleTables) -> None:
    for f in (4, 6):
        order = t.fam[f].order
        assert [s.max_score for s in order] == sorted((s.max_score for s in order), reverse=True)
        assert len({s.sid for s in order}) == len(order)
        for ls in order:
            assert ls.best and ls.max_score == max(map(top, ls.best.values()))
            for k, lst in ls.shared.items():
                assert len(lst) >= 2 and ls.best[k] == value_of(lst)
            for v in ls.best.values():
                e = entry_of(v)
                assert e.s_score >= e.score and e.s_score > 0


@pytest.mark.parametrize(
    ("max_shapes", "staged_share", "staged_all"),
    [(512, 0.0, False), (512, 0.3, False), (14, 0.3, False), (512, 0.3, True)],
)
def test_changes_in_place_equal_a_whole_compile(
    max_shapes: int, staged_share: float, staged_all: bool
) -> None:
    rng = random.Random(5)
    rules = {i: _rule(rng, i, staged_share) for i in range(1, 300)}
    default = ["allow"]

    def whole() -> RuleTables:
        doc = {"default_action": default[0], "policies": [r.to_api() for r in rules.values()]}
        compiled = compile_policy(parse_policy_document(doc), max_shapes, staged_all)
        return RuleTables.build(compiled, max_shapes)

    t = whole()
    assert t.staged_all is staged_all
    for step in range(600):
        ch = t.begin()
        op = rng.random()
        try:
            if op < 0.35:
                rid = max(rules) + 1
                rules[rid] = r = _rule(rng, rid, staged_share)
                ch.add_rule(r, *rule_ends(r))
            elif op < 0.6:
                r = rules.pop(rng.choice(list(rules)))
                ch.remove_rule(r, *rule_ends(r))
            elif op < 0.75 and staged_share:
                # enforce <-> staged (a promote, or staging a rule again)
                rid = rng.choice(list(rules))
                old, rules[rid] = rules[rid], _other_mode(rules[rid])
                ch.remove(old, *rule_ends(old))
                ch.add(rules[rid], *rule_ends(rules[rid]))
            elif op < 0.8:
                default[0] = "deny" if default[0] == "allow" else "allow"
                ch.default_action = 1 if default[0] == "deny" else 0
            else:
                rid = rng.choice(list(rules))
                old, rules[rid] = rules[rid], _rule(rng, rid, staged_share)
                ch.remove(old, *rule_ends(old))
                ch.add(rules[rid], *rule_ends(rules[rid]))
            delta = ch.finish()
            ch.commit()
            want = 1 if default[0] == "deny" else 0
            assert delta.staged_default == want
            assert delta.default_action == (0 if staged_all else want)
        except NeedsRecompile:
            t = whole()
        _check_invariants(t)
        want = 1 if default[0] == "deny" else 0
        assert (t.enforced_default, t.staged_default) == (0 if staged_all else want, want)
        if max_shapes == 512:
            assert _content(t) == _content(whole()), step
    if staged_all:
        # every key's enforced half is empty: nothing decides but the (allow) default
        assert all(
            entry_of(v).score == 0
            for f in (4, 6)
            for ls in t.fam[f].order
            for v in ls.best.values()
        )
    elif staged_share:
        halves = [entry_of(v) for f in (4, 6) for ls in t.fam[f].order for v in ls.best.values()]
        assert any(e.staged for e in halves) and any(not e.staged for e in halves)


def test_member_changes_in_place_equal_a_whole_compile() -> None:
    """Members added to and removed from groups used on one end, the other, or both, give
    the tables a whole compile of the resulting set gives."""
    from streamer.agent.edits import _change_members
    from streamer.policy.state import PolicyState

    rng = random.Random(7)
    doc: dict[str, Any] = {
        "groups": {"a": {"members": ["10.1.0.0/16", "10.2.0.1"]}, "b": {"members": []}},
        "policies": [
            {"rule_id": 1, "src_group": "a", "protocol": "tcp", "dst_port": 80, "action": "allow"},
            {"rule_id": 2, "dst_group": "a", "protocol": "any", "action": "deny", "priority": 5},
            {"rule_id": 3, "src_group": "a", "dst_group": "a", "protocol": "udp", "action": "log"},
            {"rule_id": 4, "src_group": "b", "dst_group": "a", "protocol": "any", "action": "log"},
            {"rule_id": 5, "src_ip": "10.0.0.0/8", "protocol": "tcp", "action": "deny"},
        ],
    }
    policy = parse_policy_document(doc)
    state = PolicyState.of(policy)
    t = RuleTables.build(compile_policy(policy, 512), 512)
    pool = ["10.1.0.0/16", "10.2.0.1", "10.3.0.0/24", "fd00::/64", "10.2.0.0/16", "10.9.9.9"]
    for _ in range(60):
        name = rng.choice(("a", "b"))
        before = state.groups[name]
        given = rng.sample(pool, rng.randint(1, 3))
        op = rng.random()
        if op < 0.2:  # a replace: some go, some come
            new = Group(members=tuple(given))
            added = [m for m in new.members if m not in before.members]
            removed = [m for m in before.members if m not in new.members]
        else:
            adding = op < 0.6
            new, changed, _ = (
                before.with_members(given) if adding else before.without_members(given)
            )
            added, removed = (changed, []) if adding else ([], changed)
        if not added and not removed:
            continue
        ch = t.begin()
        _change_members(ch, state, name, before, added, removed)
        ch.finish()
        ch.commit()
        state.groups[name] = new
        doc["groups"][name] = {"members": list(new.members)}
        whole = RuleTables.build(compile_policy(parse_policy_document(doc), 512), 512)
        _check_invariants(t)
        assert _content(t) == _content(whole)
