"""`microseg run --fleet ...` as one validated value (kept apart from the Kafka code, so the
command line does not import it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from streamer.fleet.records import DEFAULT_AGENTS_TOPIC, DEFAULT_HEARTBEAT_S, DEFAULT_POLICY_TOPIC

__all__ = ["FleetConfig"]


@dataclass(frozen=True)
class FleetConfig:
    """`microseg run --fleet ...`, validated: brokers, topics, who this host is."""

    bootstrap: str
    host: str
    labels: Mapping[str, str] = field(default_factory=dict)
    policy_topic: str = DEFAULT_POLICY_TOPIC
    agents_topic: str = DEFAULT_AGENTS_TOPIC
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
