"""The demo/test lab: creation, addressing, reachability, CLI, and clean removal."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.netutil import (
    TcpConn,
    echo_server,
    ns_popen,
    ns_run,
    ping,
    tcp_connect,
    tcp_echo_server,
    tcp_exchange,
    udp_echo_server,
    udp_exchange,
    wait_until,
)

from streamer.cli.lab import add_lab_parser
from streamer.lab.lab import LAB_NET_V4, LAB_NET_V6, Lab
from streamer.lab.netns import LabError, netns_exists, netns_pids


def _netns_list() -> set[str]:
    out = ns_run(None, "ip", "netns", "list").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links(ns: str | None) -> dict[str, int]:
    cmd = ["ip", "-j", "link", "show"] if ns is None else ["ip", "-n", ns, "-j", "link", "show"]
    return {link["ifname"]: link["ifindex"] for link in json.loads(ns_run(None, *cmd).stdout)}


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="microseg")
    add_lab_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["lab", *argv])


# -- shape -------------------------------------------------------------------------


def test_names_addresses_and_ifindex(lab: Lab) -> None:
    for ifname in (lab.host_if, lab.peer_if):
        assert len(ifname) <= 15
    assert lab.host_ns != lab.peer_ns and {lab.host_ns, lab.peer_ns} <= _netns_list()
    assert _links(lab.host_ns)[lab.host_if] == lab.host_ifindex
    assert _links(lab.peer_ns)[lab.peer_if] == lab.peer_ifindex
    assert lab.host_if not in _links(None)  # nothing of the lab in our own namespace
    for addr in (lab.host_v4, lab.peer_v4):
        assert ipaddress.ip_address(addr) in LAB_NET_V4
    for addr in (lab.host_v6, lab.peer_v6):
        assert ipaddress.ip_address(addr) in LAB_NET_V6
    addrs = ns_run(lab.host_ns, "ip", "-br", "addr", "show", "dev", lab.host_if).stdout
    assert f"{lab.host_v4}/24" in addrs and f"{lab.host_v6}/64" in addrs
    assert "tentative" not in ns_run(lab.host_ns, "ip", "addr").stdout
    lo = ns_run(lab.peer_ns, "ip", "-br", "link", "show", "lo").stdout
    assert "UNKNOWN" in lo or "UP" in lo


def test_prefix_validation() -> None:
    for bad in ("", "x" * 14, "a/b", "-lead", "sp ace", "dot.ted"):
        with pytest.raises(ValueError, match="invalid lab prefix"):
            Lab.names_for(bad)
    with pytest.raises(ValueError, match="slot"):
        Lab.create(slot=512)


def test_duplicate_prefix_refused_without_harming_the_first(lab: Lab) -> None:
    with pytest.raises(LabError, match="already exists"):
        Lab.create(prefix=lab.name)
    assert lab.exists()
    assert ping(lab.peer_ns, lab.host_v4)


def test_two_labs_are_separate(lab: Lab) -> None:
    other_slot = (lab.slot + 1) % 512
    with Lab.create(slot=other_slot) as other:
        assert other.name != lab.name and other.host_v4 != lab.host_v4
        assert ping(other.peer_ns, other.host_v4) and ping(lab.peer_ns, lab.host_v6)
        # The two labs share no link: one's peer cannot reach the other's host.
        assert not ping(lab.peer_ns, other.host_v4, timeout=0.3)


# -- reachability -------------------------------------------------------------------


def test_ping_both_families_both_directions(lab: Lab) -> None:
    assert ping(lab.peer_ns, lab.host_v4)
    assert ping(lab.peer_ns, lab.host_v6)
    assert ping(lab.host_ns, lab.peer_v4)
    assert ping(lab.host_ns, lab.peer_v6)


def test_tcp_and_udp_both_families(lab: Lab) -> None:
    with echo_server(lab.host_ns, tcp_ports=[0], udp_ports=[0]) as srv:
        tport, uport = srv.tcp_ports[0], srv.udp_ports[0]
        for addr in (lab.host_v4, lab.host_v6):
            assert tcp_connect(lab.peer_ns, addr, tport)
            assert tcp_exchange(lab.peer_ns, addr, tport)
            assert udp_exchange(lab.peer_ns, addr, uport)
        assert srv.tcp_accepted == 4 and srv.udp_datagrams == 2
    # And the other way round, with fixed ports and an IPv4-only server.
    with (
        tcp_echo_server(lab.peer_ns, 8080, bind="0.0.0.0") as t,
        udp_echo_server(lab.peer_ns, 5353) as u,
    ):
        assert t.port == 8080 and u.port == 5353
        assert tcp_exchange(lab.host_ns, lab.peer_v4, 8080)
        assert not tcp_connect(lab.host_ns, lab.peer_v6, 8080)  # v4-only bind
        assert udp_exchange(lab.host_ns, lab.peer_v6, 5353)


def test_failures_are_fast_and_false(lab: Lab) -> None:
    start = time.monotonic()
    assert not tcp_connect(lab.peer_ns, lab.host_v4, 9)  # refused
    assert not tcp_exchange(lab.peer_ns, lab.host_v6, 9)
    assert not udp_exchange(lab.peer_ns, lab.host_v4, 9)  # port unreachable
    assert not ping(lab.peer_ns, "198.18.0.77" if lab.slot else "198.18.1.77")  # no route
    assert time.monotonic() - start < 0.5
    start = time.monotonic()
    # Silence (an address on the link that nobody owns) is bounded by the timeout.
    assert not tcp_connect(lab.peer_ns, str(ipaddress.ip_address(lab.host_v4) + 7), 80, 0.3)
    assert time.monotonic() - start < 1.0


def test_persistent_connection_reports_a_cut(lab: Lab) -> None:
    srv = tcp_echo_server(lab.host_ns)
    try:
        with TcpConn(lab.peer_ns, lab.host_v6, srv.port) as conn:
            assert all(conn.exchange() for _ in range(5))
            srv.stop()  # resets the live connection
            assert not conn.exchange(timeout=0.5)
            assert conn.broken
    finally:
        srv.stop()
    with pytest.raises(ConnectionError, match="cannot connect"):
        TcpConn(lab.peer_ns, lab.host_v4, srv.port)


def test_many_probes_are_quick(module_lab: Lab) -> None:
    lab = module_lab
    with echo_server(lab.host_ns, tcp_ports=[0], udp_ports=[0]) as srv:
        start = time.monotonic()
        for _ in range(50):
            assert tcp_exchange(lab.peer_ns, lab.host_v4, srv.tcp_ports[0])
            assert udp_exchange(lab.peer_ns, lab.host_v6, srv.udp_ports[0])
            assert ping(lab.peer_ns, lab.host_v6)
        assert time.monotonic() - start < 5.0


# -- removal ------------------------------------------------------------------------


def test_destroy_removes_everything_and_is_idempotent() -> None:
    lab = Lab.create()
    sleeper = ns_popen(lab.host_ns, "sleep", "60")
    srv = tcp_echo_server(lab.host_ns)
    conn = TcpConn(lab.peer_ns, lab.host_v4, srv.port)
    try:
        assert wait_until(lambda: sleeper.pid in netns_pids(lab.host_ns), 2.0)
        lab.destroy()
        assert not ({lab.host_ns, lab.peer_ns} & _netns_list())
        assert not netns_exists(lab.host_ns) and not lab.exists()
        assert sleeper.wait(timeout=3) is not None  # the process inside was stopped
        lab.destroy()  # again: nothing left, no error
    finally:
        conn.close()
        srv.stop()
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        lab.destroy()
    assert lab.host_if not in _links(None) and lab.peer_if not in _links(None)


def test_context_manager_cleans_up_on_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab.create() as lab:
        assert lab.exists()
        raise RuntimeError("boom")
    assert not lab.exists()


# -- state file and CLI ---------------------------------------------------------------


def test_save_load_roundtrip_and_errors(lab: Lab, tmp_path: Path) -> None:
    state = tmp_path / "sub" / "lab.json"
    lab.save(state)
    assert Lab.load(state) == lab
    with pytest.raises(LabError, match="does not exist"):
        Lab.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LabError, match="not valid JSON"):
        Lab.load(bad)
    data = lab.to_dict()
    del data["host_ns"]
    bad.write_text(json.dumps(data))
    with pytest.raises(LabError, match="missing field 'host_ns'"):
        Lab.load(bad)
    data = lab.to_dict() | {"host_v4": "10.0.0.1"}
    bad.write_text(json.dumps(data))
    with pytest.raises(LabError, match="not a lab address"):
        Lab.load(bad)
    data = lab.to_dict() | {"peer_ns": "init"}
    bad.write_text(json.dumps(data))
    with pytest.raises(LabError, match="does not belong"):
        Lab.load(bad)


def test_cli_up_show_traffic_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "lab.json"
    s = str(state)
    try:
        args = _parse("up", "--state-file", s)
        assert args.func(args) == 0
        lab = Lab.load(state)
        assert lab.exists()
        assert f"{lab.host_v4}/24" in capsys.readouterr().out

        args = _parse("up", "--state-file", s, "--json")
        assert args.func(args) == 0  # already up: same lab, reported again
        out = capsys.readouterr()
        assert json.loads(out.out)["name"] == lab.name and "already up" in out.err

        args = _parse("show", "--state-file", s, "--field", "host_if")
        assert args.func(args) == 0
        assert capsys.readouterr().out.strip() == lab.host_if

        args = _parse("traffic", "--state-file", s, "--count", "1", "--interval", "0.1")
        assert args.func(args) == 0
        lines = capsys.readouterr().out.splitlines()
        # After the "HH:MM:SS round N" prefix: its seconds could read like a port (":22 ").
        attempts = [line.split(" round ", 1)[1] for line in lines if " round " in line]
        assert len(attempts) == 12
        assert all(line.endswith(" ok") for line in attempts), lines
        for port in (":22", ":80", ":443", ":5432", ":53"):
            assert sum(port + " " in line for line in attempts) == 2
        assert sum(" ping " in line for line in attempts) == 2
        assert lines[-1] == "traffic done: 12 ok, 0 blocked"

        args = _parse("down", "--state-file", s)
        assert args.func(args) == 0
        assert not state.exists() and not lab.exists()
        args = _parse("down", "--state-file", s)
        assert args.func(args) == 0  # nothing recorded: still fine
        args = _parse("show", "--state-file", s)
        assert args.func(args) == 1
        assert "no lab is up" in capsys.readouterr().err
    finally:
        if state.exists():
            Lab.load(state).destroy()


def test_cli_up_replaces_a_stale_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "lab.json"
    stale = Lab.create()
    stale.save(state)
    stale.destroy()
    try:
        args = _parse("up", "--state-file", str(state), "--prefix", stale.name + "x")
        assert args.func(args) == 0
        fresh = Lab.load(state)
        assert fresh.name == stale.name + "x" and fresh.exists()
    finally:
        Lab.load(state).destroy()


def test_cli_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parse("up", "--state-file", str(tmp_path / "l.json"), "--prefix", "no/slash")
    assert args.func(args) == 1
    assert "invalid lab prefix" in capsys.readouterr().err
    for argv in (
        ["traffic", "--count", "-1"],
        ["traffic", "--duration", "0"],
        ["up", "--slot", "600"],
    ):
        with pytest.raises(SystemExit) as exc:
            _parse(*argv)
        assert exc.value.code == 2
        assert "must be" in capsys.readouterr().err


def test_module_entry_point(tmp_path: Path) -> None:
    state = str(tmp_path / "lab.json")
    py = [sys.executable, "-m", "streamer.cli.lab"]
    host_ns = ""
    try:
        out = subprocess.run(
            [*py, "up", "--state-file", state],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        assert out.startswith("lab ")
        host_ns = subprocess.run(
            [*py, "show", "--state-file", state, "--field", "host_ns"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
        assert netns_exists(host_ns)
        # output into a pipe its reader has closed (`| head` done): exit 1 quietly, no
        # traceback, from this entry point and from `microseg`
        for argv in (py, [sys.executable, "-m", "streamer", "lab"]):
            read_end, write_end = os.pipe()
            os.close(read_end)
            try:
                cut = subprocess.run(
                    [*argv, "show", "--state-file", state, "--json"],
                    stdout=write_end,
                    stderr=subprocess.PIPE,
                    text=True,
                    timeout=20,
                    check=False,
                )
            finally:
                os.close(write_end)
            assert cut.returncode == 1 and "Traceback" not in cut.stderr, cut.stderr
    finally:
        subprocess.run([*py, "down", "--state-file", state], capture_output=True, timeout=20)
    assert not netns_exists(host_ns)
