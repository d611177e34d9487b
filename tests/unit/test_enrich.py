"""Flow-event enrichment (`streamer.events.enrich`): what a generation's rule metadata costs,
and generations kept until the events they judged are drained."""

from __future__ import annotations

from dataclasses import replace

import pytest
from support.events import tcp_rule, valid

from streamer.events.decode import FlowEvent
from streamer.events.enrich import Enricher
from streamer.policy.model import parse_policy_document

# ---- enrich --------------------------------------------------------------------------------


def test_a_generations_metadata_costs_what_it_holds() -> None:
    """The rules' JSON kept per generation is sized to its text (orjson's own bytes keep a
    4 KiB buffer each: 400 MiB for 100,000 rules)."""
    import tracemalloc

    policy = parse_policy_document(
        {"policies": [tcp_rule(i, name=f"r{i}") for i in range(1, 2001)]}
    )
    en = Enricher({1: "eth0"}, host="h")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        en.add_generation(1, policy)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2000 * 1024, f"{grown / 2000:.0f} bytes per rule"


def test_enricher_keeps_generations_until_drained() -> None:
    en = Enricher({}, host="h")
    p1 = parse_policy_document({"policies": [tcp_rule(1, name="a")]})
    p2 = parse_policy_document({"policies": [tcp_rule(1, name="b")]})
    en.add_generation(1, p1)
    en.switched(1)
    en.add_generation(2, p2)
    assert en.rule(1, 1)["name"] == "a" and en.rule(2, 1)["name"] == "b"
    mark = en.retire_point()  # taken before the switch to 2: keeps 1
    en.switched(2)
    en.retire(mark)
    assert en.generations == [1, 2]
    en.retire(en.retire_point())
    assert en.generations == [2]
    # An event of a forgotten generation still names its rule.
    assert en.rule(1, 1) == {"rule_id": 1, "name": "", "priority": None, "action": None}
    en.add_generation(3, p1)
    en.forget(3)  # the switch failed
    assert en.generations == [2]


def test_a_group_rules_metadata_names_its_groups() -> None:
    """docs/contract.md §5: the event's rule object carries src_group/dst_group when the rule
    has them, and only then."""
    policy = parse_policy_document(
        {
            "groups": {"web": {"members": ["10.0.0.0/24"]}, "db": {}},
            "policies": [
                tcp_rule(1, name="g", src_group="web", dst_group="db"),
                tcp_rule(2, name="a", dst_group="db"),
                tcp_rule(3, name="plain"),
            ],
        }
    )
    en = Enricher({}, host="h")
    en.add_generation(1, policy)
    assert en.rule(1, 1) == {
        "rule_id": 1,
        "name": "g",
        "priority": 100,
        "action": "deny",
        "src_group": "web",
        "dst_group": "db",
    }
    assert "src_group" not in en.rule(1, 2) and en.rule(1, 2)["dst_group"] == "db"
    assert set(en.rule(1, 3)) == {"rule_id", "name", "priority", "action"}


def test_a_staged_verdict_is_the_staged_object_and_only_where_the_views_differ() -> None:
    """docs/contract.md §6: a record whose staged view differs carries `staged` (its verdict,
    and its rule described like `rule`, "mode": "staged" included; null for the staged
    default); one where they agree has no `staged` key at all. Only a staged rule's object
    carries `mode`."""
    policy = parse_policy_document(
        {
            "policies": [
                tcp_rule(1, name="enforced", action="allow"),
                tcp_rule(2, name="trial", mode="staged"),
            ]
        }
    )
    en = Enricher({1: "eth0"}, host="h")
    en.add_generation(3, policy)
    agree = FlowEvent(
        1, 1, 60, 1, 1, 3, 4, 6, "ingress", "log", "10.0.0.1", "10.0.0.2", 1, 22, 2, "new"
    )
    obj = en.enrich(agree)
    assert "staged" not in obj and "mode" not in obj["rule"]
    valid(obj)
    by_rule = en.enrich(replace(agree, verdict="allow", staged_verdict="deny", staged_rule_id=2))
    assert by_rule["rule"]["name"] == "enforced" and "mode" not in by_rule["rule"]
    assert by_rule["staged"] == {
        "verdict": "deny",
        "rule": {
            "rule_id": 2,
            "name": "trial",
            "priority": 100,
            "action": "deny",
            "mode": "staged",
        },
    }
    assert list(by_rule).index("staged") == list(by_rule).index("rule") + 1
    valid(by_rule)
    by_default = en.enrich(replace(agree, rule_id=None, staged_verdict="deny"))
    assert by_default["rule"] is None and by_default["staged"] == {"verdict": "deny", "rule": None}
    valid(by_default)
    gone = en.enrich(replace(agree, staged_verdict="deny", staged_rule_id=99))
    assert gone["staged"]["rule"] == {"rule_id": 99, "name": "", "priority": None, "action": None}
    valid(gone)
    bad = dict(by_rule, staged={"verdict": "maybe", "rule": None})
    with pytest.raises(AssertionError, match="not valid"):
        valid(bad)
