"""The classifier's `settings` map (struct ms_settings): one value, written whole.

In: the event interval, the idle timeouts and the failsafe entries (FailsafeRule). Out: the
packed struct ms_settings, each failsafe entry as struct ms_failsafe (direction, protocol,
destination port in network byte order, the remote end's network and mask; an entry without
a CIDR has family 0 and matches either family). Dropped: nothing; more entries than
MS_MAX_FAILSAFE is a DatapathError.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamer.datapath.config import DatapathError
from streamer.datapath.layout import (
    FAILSAFE,
    MS_DIR_EGRESS,
    MS_DIR_INGRESS,
    MS_MAX_FAILSAFE,
    SETTINGS,
)
from streamer.datapath.reference import Timeouts
from streamer.policy.failsafe import FailsafeRule


def pack_failsafe(rule: FailsafeRule) -> bytes:
    """struct ms_failsafe of one entry."""
    if rule.cidr is None:
        family, addr, mask = 0, bytes(16), bytes(16)
    else:
        family = rule.cidr.version
        addr = rule.cidr.network_address.packed
        mask = rule.cidr.netmask.packed
    return FAILSAFE.pack(
        family,
        rule.proto_number,
        MS_DIR_INGRESS if rule.direction == "in" else MS_DIR_EGRESS,
        rule.port.to_bytes(2, "big"),
        addr,  # an IPv4 address in the first word; the pack pads to 16 bytes
        mask,
    )


def pack_settings(
    event_interval_ns: int, timeouts: Timeouts, failsafe: Sequence[FailsafeRule]
) -> bytes:
    """struct ms_settings."""
    if len(failsafe) > MS_MAX_FAILSAFE:
        raise DatapathError(
            f"{len(failsafe)} failsafe entries: the classifier holds at most {MS_MAX_FAILSAFE}"
        )
    entries = b"".join(pack_failsafe(r) for r in failsafe)
    return SETTINGS.pack(event_interval_ns, *timeouts.by_class_ns(), len(failsafe), entries)
