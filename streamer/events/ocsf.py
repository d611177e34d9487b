"""OCSF 1.3.0: the records of the event stream as Open Cybersecurity Schema Framework events.

In: a record of the stream as a dict (contract §4, docs/flow-event.schema.json): a flow, a
`lost` record or an `alert` record. Out (`to_ocsf`): one OCSF 1.3.0 event as a dict, valid
against the published schema for the profiles it names in `metadata.profiles`:

- a flow: Network Activity (class 4001, category 4, profile `security_control`, plus `host`
  when the record names its host, for `device`). The verdict picks activity, action and
  disposition: deny is Refuse (5) / Denied (2) / Blocked (2); log is Traffic (6) / Allowed (1)
  / Logged (17); a staged would-denial (`staged.verdict` deny, the flow itself not denied) is
  Traffic / Allowed / Detected (15); anything else the stream carries (an allowed flow whose
  staged verdict is log or allow) is Traffic / Allowed / Allowed (1).
- a `lost` record: Base Event (class 0, category 0), activity 99 (Other) named "Events Lost",
  severity Medium; what has no OCSF place (lost, stage, first_seq, host) under `unmapped`.
- an `alert` record: Detection Finding (class 2004, category 2, profile `host`): firing is
  Create (1) with status New (1), resolved is Close (3) with status Resolved (4); warning is
  severity Medium (3), critical Critical (5); `finding_info.uid` is the same for the records
  of one alert (`<host>/<alert>/<subject>`), so a SIEM pairs the firing with its resolution.

Every record keeps what OCSF has no place for under `unmapped` (the microseg names), and its
nanosecond time as `metadata.original_time` (`time` is milliseconds since the epoch). A record
of another type is a Base Event with the whole record under `unmapped` (never dropped).

`ocsf_items` is what a sink whose format is `ocsf` applies to each batch it takes: new Items
(same seq, weight, key), the input left as it is (the fan-out shares Items between sinks).
`to_ocsf` never changes the record; the event it returns may share nested objects with it and
with other events (read them, do not change them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Literal, get_args

import orjson

from streamer import __version__
from streamer.events.decode import _FLAG_TEXT
from streamer.events.fanout import Item
from streamer.vocabulary import PROTOCOL_NUMBERS

EventFormat = Literal["microseg", "ocsf"]
EVENT_FORMATS: Final[tuple[str, ...]] = get_args(EventFormat)
OCSF_VERSION: Final = "1.3.0"

PRODUCT: Final[dict[str, str]] = {
    "name": "microseg",
    "vendor_name": "microseg",
    "version": __version__,
}
_FLOW_PROFILES: Final = ["security_control"]
_FLOW_PROFILES_HOST: Final = ["security_control", "host"]
_HOST_PROFILES: Final = ["host"]
_NO_PROFILES: Final[list[str]] = []

_REFUSE, _TRAFFIC = (5, "Refuse"), (6, "Traffic")


def _outcome(
    activity: tuple[int, str], action: tuple[int, str], disp: tuple[int, str]
) -> dict[str, Any]:
    """The fields one flow outcome fixes: class, activity, type, action, disposition, severity
    (Informational: a flow is a policy decision, not a finding) and status."""
    return {
        "activity_id": activity[0],
        "activity_name": activity[1],
        "type_uid": 4001 * 100 + activity[0],
        "type_name": f"Network Activity: {activity[1]}",
        "action_id": action[0],
        "action": action[1],
        "disposition_id": disp[0],
        "disposition": disp[1],
        "category_uid": 4,
        "category_name": "Network Activity",
        "class_uid": 4001,
        "class_name": "Network Activity",
        "severity_id": 1,
        "severity": "Informational",
        "status_id": 1,
        "status": "Success",
    }


_DENY: Final = _outcome(_REFUSE, (2, "Denied"), (2, "Blocked"))
_LOG: Final = _outcome(_TRAFFIC, (1, "Allowed"), (17, "Logged"))
_WOULD_DENY: Final = _outcome(_TRAFFIC, (1, "Allowed"), (15, "Detected"))
_ALLOWED: Final = _outcome(_TRAFFIC, (1, "Allowed"), (1, "Allowed"))

_TCP_FLAGS: Final = {text: bits for bits, text in enumerate(_FLAG_TEXT)}
# Protocols whose ports are ports (ICMP's are the echo identifier, or 0: kept in unmapped).
_PORTED: Final = frozenset({"tcp", "udp"})
_ICMP: Final = frozenset({"icmp", "icmpv6"})
_DEFAULT_RULE: Final = {
    "uid": "default",
    "name": "default action",
    "desc": "no rule matched: the policy's default action decided",
}
_ALERT_SEVERITY: Final = {"warning": (3, "Medium"), "critical": (5, "Critical")}
_ALERT_STATE: Final = {
    # state -> (activity_id, activity, status_id, status)
    "firing": (1, "Create", 1, "New"),
    "resolved": (3, "Close", 4, "Resolved"),
}
# Record fields an alert's OCSF event carries in its own places (the rest go to unmapped).
_ALERT_MAPPED: Final = frozenset({"schema", "type", "seq", "time", "host", "severity", "message"})

# time text -> ms: the whole second's epoch value, cached (records come in bursts).
_second_cache: tuple[str, int] = ("", 0)


def epoch_ms(text: str) -> int:
    """RFC 3339 UTC time (`2026-11-22T10:01:02.123456789Z`, the stream's) -> ms since epoch."""
    global _second_cache
    prefix = text[:19]
    cached, sec = _second_cache
    if prefix != cached:
        sec = int(datetime.strptime(prefix, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
        _second_cache = (prefix, sec)
    ms = sec * 1000
    if len(text) > 22 and text[19] == ".":
        ms += int(text[20:23])
    return ms


def _metadata(record: dict[str, Any], profiles: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": PRODUCT,
        "profiles": profiles,
        "original_time": record["time"],
    }
    seq = record.get("seq")
    if isinstance(seq, int):
        meta["sequence"] = seq
    return meta


_devices: dict[str, dict[str, Any]] = {}


def _device(host: str) -> dict[str, Any]:
    """The host profile's `device` for one host name (made once per name: agents have one)."""
    dev = _devices.get(host)
    if dev is None:
        if len(_devices) > 1024:
            _devices.clear()
        # type_id is required; whether the host is a server, a VM or a laptop we do not know.
        dev = _devices[host] = {"hostname": host, "type_id": 0, "type": "Unknown"}
    return dev


def _firewall_rule(rule: Any) -> dict[str, Any]:
    """A microseg `rule` object (or null: the default action) as OCSF's firewall_rule."""
    if not isinstance(rule, dict):
        return _DEFAULT_RULE
    out: dict[str, Any] = {"uid": str(rule.get("rule_id"))}
    if rule.get("name"):
        out["name"] = rule["name"]
    if rule.get("action") is not None:
        desc = f"{rule['action']}, priority {rule.get('priority')}"
        if rule.get("src_group") is not None:
            desc += f", from group {rule['src_group']}"
        if rule.get("dst_group") is not None:
            desc += f", to group {rule['dst_group']}"
        out["desc"] = desc
    if rule.get("mode") == "staged":
        out["type"] = "staged"
    return out


def _flow(r: dict[str, Any]) -> dict[str, Any]:
    # One dict literal and few lookups: this runs per event on a sink whose format is ocsf.
    verdict = r["verdict"]
    staged = r.get("staged")
    rule = r["rule"]
    if verdict == "deny":
        outcome = _DENY
    elif staged is not None and staged["verdict"] == "deny":
        outcome = _WOULD_DENY
        rule = staged["rule"]  # the rule that would deny
    elif verdict == "log":
        outcome = _LOG
    else:
        outcome = _ALLOWED
    host = r.get("host")
    proto = r["protocol"]
    src: dict[str, Any] = {"ip": r["src_ip"]}
    dst: dict[str, Any] = {"ip": r["dst_ip"]}
    unmapped: dict[str, Any] = {
        "verdict": verdict,
        "rule": r["rule"],
        "kind": r["kind"],
        "policy_generation": r["policy_generation"],
    }
    if proto in _PORTED:
        src["port"] = r["src_port"]
        dst["port"] = r["dst_port"]
    elif r["src_port"] or r["dst_port"]:
        # ICMP echo: the identifier in both ports (contract §4); it is no port.
        if proto in _ICMP:
            unmapped["icmp_echo_id"] = r["src_port"]
        else:
            unmapped["ports"] = [r["src_port"], r["dst_port"]]
    direction = _DIRECTION.get(r["direction"], _NO_DIRECTION)
    iface = r.get("iface")
    if iface:
        # The interface is the host's: the destination's for a flow coming in, else the source's.
        (dst if direction is _INBOUND else src)["interface_name"] = iface
    conn = _CONNECTIONS.get((direction, proto))
    if conn is None:
        conn = _connection(direction, proto)
    flags = r.get("tcp_flags")
    if flags is not None:
        conn = {**conn, "tcp_flags": _TCP_FLAGS.get(flags, 0)}
    meta: dict[str, Any] = {
        "version": OCSF_VERSION,
        "product": PRODUCT,
        "profiles": _FLOW_PROFILES_HOST if host else _FLOW_PROFILES,
        "original_time": r["time"],
        "sequence": r["seq"],
    }
    out = {
        **outcome,
        "time": epoch_ms(r["time"]),
        "metadata": meta,
        "src_endpoint": src,
        "dst_endpoint": dst,
        "connection_info": conn,
        "traffic": {"packets": r["packets"], "bytes": r["bytes"]},
        "firewall_rule": _firewall_rule(rule),
    }
    if host:
        out["device"] = _device(host)
    if staged is not None:
        unmapped["staged"] = staged
    out["unmapped"] = unmapped
    return out


_INBOUND: Final = (1, "Inbound")
_DIRECTION: Final = {"ingress": _INBOUND, "egress": (2, "Outbound")}
_NO_DIRECTION: Final = (0, "Unknown")
# (direction, protocol) -> connection_info without tcp_flags (shared: never changed).
_CONNECTIONS: dict[tuple[tuple[int, str], str], dict[str, Any]] = {}


def _connection(direction: tuple[int, str], proto: str) -> dict[str, Any]:
    conn: dict[str, Any] = {"direction_id": direction[0], "direction": direction[1]}
    num = PROTOCOL_NUMBERS.get(proto)
    if num is not None:
        conn["protocol_num"] = num
        conn["protocol_name"] = proto
    elif proto.isdigit():
        conn["protocol_num"] = int(proto)
    if len(_CONNECTIONS) < 1024:
        _CONNECTIONS[(direction, proto)] = conn
    return conn


def _lost(r: dict[str, Any]) -> dict[str, Any]:
    first = r.get("first_seq")
    span = f" (seq {first}..{r.get('seq')})" if first is not None else ""
    unmapped: dict[str, Any] = {
        k: r[k] for k in ("lost", "stage", "first_seq", "seq", "host") if k in r
    }
    unmapped["type"] = "lost"
    return {
        "class_uid": 0,
        "class_name": "Base Event",
        "category_uid": 0,
        "activity_id": 99,
        "activity_name": "Events Lost",
        "type_uid": 99,
        "type_name": "Base Event: Other",
        "severity_id": 3,
        "severity": "Medium",
        "time": epoch_ms(r["time"]),
        "message": f"{r.get('lost')} flow events lost at {r.get('stage')}{span}",
        "metadata": _metadata(r, _NO_PROFILES),
        "unmapped": unmapped,
    }


def _alert(r: dict[str, Any]) -> dict[str, Any]:
    host = r.get("host")
    severity = _ALERT_SEVERITY.get(r.get("severity", ""), (99, str(r.get("severity"))))
    activity_id, activity, status_id, status = _ALERT_STATE.get(
        r.get("state", ""), (99, str(r.get("state")), 99, str(r.get("state")))
    )
    name = str(r.get("alert"))
    subject = r.get("subject")
    message = r.get("message")
    info: dict[str, Any] = {
        "uid": f"{host or ''}/{name}/{subject}",
        "title": f"{name} ({subject})" if subject else name,
        "types": [name],
    }
    if message:
        info["desc"] = message
    out: dict[str, Any] = {
        "class_uid": 2004,
        "class_name": "Detection Finding",
        "category_uid": 2,
        "category_name": "Findings",
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": 2004 * 100 + activity_id,
        "type_name": f"Detection Finding: {activity}",
        "severity_id": severity[0],
        "severity": severity[1],
        "status_id": status_id,
        "status": status,
        "time": epoch_ms(r["time"]),
        "finding_info": info,
        "metadata": _metadata(r, _HOST_PROFILES if host else _NO_PROFILES),
        "unmapped": {k: v for k, v in r.items() if k not in _ALERT_MAPPED},
    }
    if message:
        out["message"] = message
    if host:
        out["device"] = _device(host)
    return out


def _other(r: dict[str, Any]) -> dict[str, Any]:
    """A record of a type this module does not know: kept whole, as a Base Event."""
    when = r.get("time")
    return {
        "class_uid": 0,
        "class_name": "Base Event",
        "category_uid": 0,
        "activity_id": 99,
        "activity_name": str(r.get("type")),
        "type_uid": 99,
        "severity_id": 0,
        "time": epoch_ms(when) if isinstance(when, str) else 0,
        "metadata": {"version": OCSF_VERSION, "product": PRODUCT, "profiles": _NO_PROFILES},
        "unmapped": r,
    }


def to_ocsf(record: dict[str, Any]) -> dict[str, Any]:
    """One record of the stream as an OCSF 1.3.0 event (see the module's docstring)."""
    kind = record.get("type", "flow")
    if kind == "flow":
        return _flow(record)
    if kind == "lost":
        return _lost(record)
    if kind == "alert":
        return _alert(record)
    return _other(record)


# ---- serialized, per event: templates ---------------------------------------------------------
#
# A TCP or UDP flow's event is, like the microseg record (streamer.events.enrich), the same
# text for every event of one combination of the fields events repeat, with nine values put
# in: the event of the first such record is made by `_flow`, serialized once with markers where
# those values go, and kept as a template (about half the cost of making and serializing the
# event each time). Anything else goes through `to_ocsf`.

MAX_TEMPLATES = 4096
_templates: dict[tuple[Any, ...], tuple[bytes, tuple[int, ...]]] = {}
# Per-event values: (marker, format): strings are ip and time text (never needing escapes).
_MARK_STR = ("@@ms-src@@", "@@ms-dst@@", "@@ms-otime@@")
_MARK_INT = ("@@ms-time@@", "@@ms-seq@@", "@@ms-sport@@", "@@ms-dport@@", "@@ms-pk@@", "@@ms-by@@")


def _rule_key(rule: Any) -> Any:
    return tuple(rule.items()) if isinstance(rule, dict) else rule


def _template(r: dict[str, Any]) -> tuple[bytes, tuple[int, ...]]:
    """The serialized event of `r`'s combination, with %b/%d where the per-event values go, and
    the order they go in (indexes into the values `_flow_bytes` makes)."""
    marked = dict(r)
    marked.update(
        src_ip=_MARK_STR[0], dst_ip=_MARK_STR[1], src_port=0, dst_port=0, packets=0, bytes=0
    )
    ev = _flow(marked)
    ev["time"] = _MARK_INT[0]
    ev["metadata"] = {**ev["metadata"], "original_time": _MARK_STR[2], "sequence": _MARK_INT[1]}
    ev["src_endpoint"] = {**ev["src_endpoint"], "port": _MARK_INT[2]}
    ev["dst_endpoint"] = {**ev["dst_endpoint"], "port": _MARK_INT[3]}
    ev["traffic"] = {"packets": _MARK_INT[4], "bytes": _MARK_INT[5]}
    text = orjson.dumps(ev).replace(b"%", b"%%")
    order: list[tuple[int, bytes, bytes]] = []
    for m in _MARK_STR:
        order.append((text.index(m.encode()), m.encode(), b"%b"))
    for m in _MARK_INT:
        quoted = b'"' + m.encode() + b'"'
        order.append((text.index(quoted), quoted, b"%d"))
    order.sort()
    # The values go in the order the markers appear: record it as a permutation.
    for _, mark, fmt in order:
        text = text.replace(mark, fmt)
    return text, tuple(_SLOT[mark] for _, mark, _ in order)


_SLOT = {
    m: i
    for i, m in enumerate(
        [m.encode() for m in _MARK_STR] + [b'"' + m.encode() + b'"' for m in _MARK_INT]
    )
}


def _flow_bytes(r: dict[str, Any]) -> bytes:
    """orjson.dumps(to_ocsf(r)) for a TCP or UDP flow, through its combination's template."""
    rule = r["rule"]
    staged = r.get("staged")
    key = (
        r["verdict"],
        r["direction"],
        r.get("iface"),
        r["protocol"],
        r.get("tcp_flags"),
        r["kind"],
        r["policy_generation"],
        r.get("host"),
        _rule_key(rule),
        None if staged is None else (staged["verdict"], _rule_key(staged["rule"])),
    )
    found = _templates.get(key)
    if found is None:
        if len(_templates) >= MAX_TEMPLATES:
            _templates.clear()
        found = _templates[key] = _template(r)
    tpl, order = found
    t = r["time"]
    values = (
        r["src_ip"].encode(),
        r["dst_ip"].encode(),
        t.encode(),
        epoch_ms(t),
        r["seq"],
        r["src_port"],
        r["dst_port"],
        r["packets"],
        r["bytes"],
    )
    return tpl % tuple([values[i] for i in order])


def to_ocsf_bytes(record: dict[str, Any]) -> bytes:
    """`orjson.dumps(to_ocsf(record))`, the same text, cheaper for flows (templates)."""
    if record.get("type") == "flow" and record.get("protocol") in _PORTED:
        return _flow_bytes(record)
    return orjson.dumps(to_ocsf(record))


def ocsf_items(items: list[Item]) -> list[Item]:
    """`items` with their data as OCSF events (new Items; the given ones are shared)."""
    return [
        Item(i.seq, i.weight, to_ocsf_bytes(i.obj), i.key, i.born_ns, is_lost=i.is_lost)
        for i in items
    ]
