"""The fleet feed's records (streamer.events.fleetfeed): what the hub is given from the topic,
and what is skipped and counted. Against a real broker: tests/test_viewer.py's fleet view."""

from __future__ import annotations

import orjson

from streamer.events.fleetfeed import FleetFeed
from streamer.events.sinks.websocket import WebSocketHub


def test_records_become_hub_items_and_what_is_not_a_record_is_counted() -> None:
    feed = FleetFeed("127.0.0.1:9", "microseg.flows", WebSocketHub())
    flow = {"type": "flow", "seq": 7, "host": "node-a", "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2"}
    lost = {"type": "lost", "seq": 9, "first_seq": 8, "host": "node-b", "lost": 2}
    items = [feed._item(orjson.dumps(o)) for o in (flow, lost)]
    assert [(i.seq, i.weight, i.is_lost, i.key) for i in items if i is not None] == [
        (7, 1, False, b"10.0.0.1->10.0.0.2"),
        (9, 2, True, b"lost@node-b"),
    ]
    for bad in (b"not json", b"[1, 2]", None, b'{"type": "flow"}'):
        assert feed._item(bad) is None
    assert feed.skipped == 4
    feed.hub.publish([i for i in items if i is not None])
    assert [i.obj["host"] for i in feed.hub.recent] == ["node-a", "node-b"]
    assert feed.stats()["skipped"] == 4 and feed.stats()["up"] is False
