"""The API clients (streamer/cli/) against the stub admin API (support/stubapi.py):
`policy list` and `policy get` (tables, JSON, unknown and bad rule ids, error bodies),
`session list` with its filters, and `stats`."""

from __future__ import annotations

import json

import pytest
from support.stubapi import SESSIONS, TOKEN, Cli, Stub, column_starts, last

# --------------------------------------------------------------------------- policy list / get


def test_policy_list_table(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "list")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    header = lines[0]
    assert header.split() == [
        "ID",
        "NAME",
        "SRC",
        "SPORT",
        "DST",
        "DPORT",
        "PROTO",
        "ACTION",
        "PRIO",
        "DIR",
    ]
    assert lines[-1] == "3 rules, default action deny, generation 7"
    rows = lines[1:-1]
    assert [r.split()[0] for r in rows] == ["1001", "1002", "1003"]
    # Aligned: text columns start where their header does, numbers (ID, PRIO) end there.
    starts = column_starts(header)
    for row in rows:
        for index, start in enumerate(starts):
            if index in (0, 8):
                end = start + len(header.split()[index])
                assert row[end - 1] != " " and row[end] == " ", (row, index)
            else:
                assert row[start - 1] == " " and row[start] != " ", (row, index)
    assert rows[0].split() == [
        "1001",
        "https-to-web",
        "0.0.0.0/0",
        "any",
        "10.0.0.5",
        "443",
        "tcp",
        "allow",
        "100",
        "any",
    ]
    assert rows[2].split()[1] == "-"  # empty name
    assert rows[2].split()[5] == "80-443"
    assert not any(line != line.rstrip() for line in lines)
    seen = last(stub)
    assert (seen.method, seen.path) == ("GET", "/api/v1/policies")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["Host"] == f"127.0.0.1:{stub.tcp_port}"
    assert "Origin" not in seen.headers


def test_policy_list_json_is_the_api_answer(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("policy", "list", "-o", "json")
    assert (rc, err) == (0, "")
    assert json.loads(out) == stub.listing()
    assert out.startswith("{\n  ")  # pretty


def test_policy_list_empty(cli: Cli, stub: Stub) -> None:
    stub.rules.clear()
    rc, out, _ = cli("policy", "list")
    assert rc == 0
    assert out == "0 rules, default action deny, generation 7\n"


def test_policy_get_shows_counters(cli: Cli) -> None:
    rc, out, err = cli("policy", "get", "1001")
    assert (rc, err) == (0, "")
    pairs = dict(line.split(None, 1) for line in out.splitlines())
    assert pairs["rule_id"] == "1001"
    assert pairs["dst_port"] == "443"
    assert pairs["packets"] == "42"
    assert pairs["bytes"] == "4200"
    assert pairs["last_hit"] == "2026-11-22T10:01:02Z"
    assert list(pairs)[:3] == ["rule_id", "name", "src_ip"]
    rc, out, _ = cli("policy", "get", "1003")
    pairs = dict(line.split(None, 1) for line in out.splitlines())
    assert pairs["last_hit"] == "never"
    assert pairs["name"] == '""'
    assert len({line.index(line.split()[1]) for line in out.splitlines()}) == 1  # aligned


def test_policy_get_json(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli("policy", "get", "1002", "-o", "json")
    assert rc == 0
    assert json.loads(out) == {
        **stub.rules[1002],
        "packets": 42,
        "bytes": 4200,
        "last_hit": "2026-11-22T10:01:02Z",
    }


def test_policy_get_unknown_rule(cli: Cli) -> None:
    rc, out, err = cli("policy", "get", "7")
    assert rc == 1
    assert out == ""
    assert err == "microseg: no rule with rule_id 7 (HTTP 404 not_found)\n"


@pytest.mark.parametrize("bad", ["0", "-1", "abc", str(2**32)])
def test_policy_get_bad_rule_id_is_a_usage_error(run: Cli, bad: str) -> None:
    rc, _, err = (
        run("policy", "get", "--", bad) if bad.startswith("-") else run("policy", "get", bad)
    )
    assert rc == 2
    assert "not a rule id" in err


def test_non_json_error_body(cli: Cli) -> None:
    rc, _, err = cli("policy", "get", "666")
    assert rc == 1
    assert err == "microseg: Bad Gateway (HTTP 502)\n"


# --------------------------------------------------------------------------- sessions, stats


def test_session_list_table(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("session", "list")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "PROTO",
        "SRC",
        "DST",
        "DIR",
        "VERDICT",
        "RULE",
        "PKTS_OUT",
        "BYTES_OUT",
        "PKTS_IN",
        "BYTES_IN",
    ]
    assert lines[1].split() == [
        "tcp",
        "10.0.0.7:51234",
        "10.0.0.5:443",
        "egress",
        "allow",
        "1001",
        "12",
        "3400",
        "10",
        "120000",
    ]
    assert lines[2].split()[1:3] == ["[fd6d:7365:67::1]:40000", "[fd6d:7365:67::2]:22"]
    assert lines[3].split()[:6] == ["icmp", "10.0.0.7", "10.0.0.9", "egress", "allow", "default"]
    assert lines[-1] == "3 sessions"
    # Counters are right-aligned: each ends where its header ends.
    end = lines[0].index("BYTES_IN") + len("BYTES_IN")
    assert all(len(line) == end for line in lines[:-1])
    assert last(stub).query == {}


def test_session_list_filters(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli(
        "session",
        "list",
        "--ip",
        "10.0.0.7",
        "--port",
        "443",
        "--protocol",
        "TCP",
        "--verdict",
        "allow",
        "--limit",
        "5",
    )
    assert rc == 0
    assert last(stub).query == {
        "ip": "10.0.0.7",
        "port": "443",
        "protocol": "tcp",
        "verdict": "allow",
        "limit": "5",
    }
    assert out.splitlines()[-1] == "1 session"


def test_session_list_truncated_and_json(cli: Cli) -> None:
    rc, out, _ = cli("session", "list", "--limit", "1")
    assert rc == 0
    assert out.splitlines()[-1] == "1 session (truncated: narrow the filters or raise --limit)"
    rc, out, _ = cli("session", "list", "--limit", "1", "-o", "json")
    assert json.loads(out) == {"sessions": SESSIONS[:1], "count": 1, "truncated": True}


def test_session_list_none(cli: Cli) -> None:
    rc, out, _ = cli("session", "list", "--verdict", "log")
    assert (rc, out) == (0, "0 sessions\n")


@pytest.mark.parametrize(
    ("flag", "value"), [("--port", "0"), ("--port", "x"), ("--limit", "0"), ("--verdict", "drop")]
)
def test_session_list_bad_filters(cli: Cli, stub: Stub, flag: str, value: str) -> None:
    rc, _, err = cli("session", "list", flag, value)
    assert rc == 2 and flag in err
    assert stub.requests == []


def test_stats(cli: Cli, stub: Stub) -> None:
    rc, out, err = cli("stats")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["total_packets", "1000"]
    pairs = dict(line.split() for line in lines)
    assert pairs["events.lost"] == "0" and pairs["events.emitted"] == "70"
    assert len({line.index(line.split()[1], len(line.split()[0])) for line in lines}) == 1
    assert last(stub).path == "/api/v1/stats"


def test_stats_packets_and_policies(cli: Cli, stub: Stub) -> None:
    rc, out, _ = cli("stats", "--packets")
    assert rc == 0 and last(stub).path == "/api/v1/stats/packets"
    pairs = dict(line.split() for line in out.splitlines())
    assert pairs["allow_rate"] == "90.00%" and pairs["deny_rate"] == "10.00%"
    rc, out, _ = cli("stats", "--policies", "-o", "json")
    assert rc == 0 and last(stub).path == "/api/v1/stats/policies"
    assert json.loads(out) == {"policy_hits": 950, "policy_misses": 50, "hit_rate": 95.0}
    rc, _, err = cli("stats", "--packets", "--policies")
    assert rc == 2 and "not allowed with" in err
