"""Flow-event helpers for the pipeline tests: `valid(obj)` checks a record against
docs/flow-event.schema.json; `tcp_rule` is a rule document (tcp deny unless given);
`flow_obj(en)` is one enriched flow record, `lost_factory(en)` makes the lost records a fan-out
channel reports, and `gap_check` proves that a stream lost nothing without saying so.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jsonschema

from streamer.events.decode import FlowEvent
from streamer.events.enrich import Enricher
from streamer.events.fanout import Item, make_item
from support import REPO

SCHEMA = json.loads((REPO / "docs" / "flow-event.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def valid(obj: dict[str, Any]) -> None:
    errors = sorted(VALIDATOR.iter_errors(obj), key=str)
    assert not errors, f"{obj} is not valid against the schema: {errors[0]}"


def tcp_rule(rule_id: int, **kw: Any) -> dict[str, Any]:
    """A rule document: tcp deny unless given."""
    return {"rule_id": rule_id, "protocol": "tcp", "action": "deny", **kw}


def lost_factory(en: Enricher) -> Any:
    def make(lost: int, stage: str, first: int, last: int) -> Item:
        return make_item(en.lost_record(lost, stage, first_seq=first, last_seq=last), lost)

    return make


def flow_obj(en: Enricher, **over: Any) -> dict[str, Any]:
    ev = FlowEvent(
        ts_ns=time.monotonic_ns(),
        packets=1,
        bytes=60,
        ifindex=1,
        rule_id=None,
        generation=1,
        family=4,
        protocol=6,
        direction="ingress",
        verdict="deny",
        src_ip="10.0.0.7",
        dst_ip="10.0.0.5",
        src_port=51234,
        dst_port=22,
        tcp_flags=2,
        kind="new",
    )
    obj = en.enrich(ev)
    obj.update(over)
    return obj


def gap_check(stream: list[dict[str, Any]], produced: int) -> tuple[int, int]:
    """Every seq 1..produced is in `stream` once, or covered by exactly one lost record's
    first_seq..seq range; returns (events seen, events reported lost)."""
    seen: set[int] = set()
    covered: set[int] = set()
    lost = 0
    for obj in stream:
        valid(obj)
        if obj.get("type") == "lost":
            rng = set(range(obj["first_seq"], obj["seq"] + 1))
            assert not rng & covered, f"lost ranges overlap: {obj}"
            covered |= rng
            lost += obj["lost"]
        else:
            assert obj["seq"] not in seen, f"seq {obj['seq']} twice"
            seen.add(obj["seq"])
    assert not seen & covered, "an event both delivered and reported lost"
    assert seen | covered == set(range(1, produced + 1)), "a gap no lost record explains"
    assert lost == len(covered), (lost, len(covered))
    return len(seen), lost
