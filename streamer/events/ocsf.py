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
`to_ocsf` never changes the record; the event it returns may share nested objects with it.
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
    """The fields one flow outcome fixes: activity, type, action and disposition."""
    return {
        "activity_id": activity[0],
        "activity_name": activity[1],
        "type_uid": 4001 * 100 + activity[0],
        "type_name": f"Network Activity: {activity[1]}",
        "action_id": action[0],
        "action": action[1],
        "disposition_id": disp[0],
        "disposition": disp[1],
    }


_DENY: Final = _outcome(_REFUSE, (2, "Denied"), (2, "Blocked"))
_LOG: Final = _outcome(_TRAFFIC, (1, "Allowed"), (17, "Logged"))
_WOULD_DENY: Final = _outcome(_TRAFFIC, (1, "Allowed"), (15, "Detected"))
_ALLOWED: Final = _outcome(_TRAFFIC, (1, "Allowed"), (1, "Allowed"))

_DIRECTION: Final = {"ingress": (1, "Inbound"), "egress": (2, "Outbound")}
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
    verdict = r.get("verdict")
    staged = r.get("staged")
    staged_verdict = staged.get("verdict") if isinstance(staged, dict) else None
    rule = r.get("rule")
    if verdict == "deny":
        out = dict(_DENY)
    elif staged_verdict == "deny":
        out = dict(_WOULD_DENY)
        rule = staged.get("rule")  # type: ignore[union-attr]  # the rule that would deny
    elif verdict == "log":
        out = dict(_LOG)
    else:
        out = dict(_ALLOWED)
    host = r.get("host")
    out["category_uid"] = 4
    out["category_name"] = "Network Activity"
    out["class_uid"] = 4001
    out["class_name"] = "Network Activity"
    out["severity_id"] = 1
    out["severity"] = "Informational"
    out["status_id"] = 1
    out["status"] = "Success"
    out["time"] = epoch_ms(r["time"])
    out["metadata"] = _metadata(r, _FLOW_PROFILES_HOST if host else _FLOW_PROFILES)
    proto = r.get("protocol")
    src: dict[str, Any] = {"ip": r["src_ip"]}
    dst: dict[str, Any] = {"ip": r["dst_ip"]}
    unmapped: dict[str, Any] = {
        "verdict": verdict,
        "rule": r.get("rule"),
        "kind": r.get("kind"),
        "policy_generation": r.get("policy_generation"),
    }
    if proto in _PORTED:
        src["port"] = r.get("src_port")
        dst["port"] = r.get("dst_port")
    elif r.get("src_port") or r.get("dst_port"):
        # ICMP echo: the identifier in both ports (contract §4); it is no port.
        key = "icmp_echo_id" if proto in _ICMP else "ports"
        unmapped[key] = r.get("src_port") if proto in _ICMP else [r["src_port"], r["dst_port"]]
    direction = _DIRECTION.get(r.get("direction", ""), (0, "Unknown"))
    iface = r.get("iface")
    if iface:
        # The interface is the host's: the destination's for a flow coming in, else the source's.
        (dst if direction[0] == 1 else src)["interface_name"] = iface
    out["src_endpoint"] = src
    out["dst_endpoint"] = dst
    conn: dict[str, Any] = {"direction_id": direction[0], "direction": direction[1]}
    num = PROTOCOL_NUMBERS.get(proto) if isinstance(proto, str) else None
    if num is not None:
        conn["protocol_num"] = num
        conn["protocol_name"] = proto
    elif isinstance(proto, str) and proto.isdigit():
        conn["protocol_num"] = int(proto)
    flags = r.get("tcp_flags")
    if flags is not None:
        conn["tcp_flags"] = _TCP_FLAGS.get(flags, 0)
    out["connection_info"] = conn
    traffic = {k: r[k] for k in ("packets", "bytes") if isinstance(r.get(k), int)}
    if traffic:
        out["traffic"] = traffic
    out["firewall_rule"] = _firewall_rule(rule)
    if host:
        out["device"] = _device(host)
    if staged is not None:
        unmapped["staged"] = staged
    out["unmapped"] = unmapped
    return out


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


def ocsf_items(items: list[Item]) -> list[Item]:
    """`items` with their data as OCSF events (new Items; the given ones are shared)."""
    dumps = orjson.dumps
    return [
        Item(i.seq, i.weight, dumps(to_ocsf(i.obj)), i.key, i.born_ns, is_lost=i.is_lost)
        for i in items
    ]
