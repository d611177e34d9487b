"""`microseg flows observe` and `microseg viewer-url` against a real agent on the lab, with
real traffic: recent events, every filter, the output formats, --follow (no duplicates between
the recent events and the live feed), bad arguments.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from support import REPO
from support.agentproc import AgentProcess, flows, free_port, write_policy
from support.netutil import syn, udp_to, wait_until

from streamer.lab.lab import Lab

RULES = [
    {
        "rule_id": 1002,
        "name": "no-ssh",
        "dst_port": 22,
        "protocol": "tcp",
        "action": "deny",
        "priority": 200,
    },
    {"rule_id": 1005, "name": "audit-pg", "dst_port": 5432, "protocol": "tcp", "action": "log"},
]


@pytest.fixture(scope="module")
def agent(module_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent, with a mix of denied and logged flows (v4, v6, tcp, udp) already seen."""
    tmp = tmp_path_factory.mktemp("observe")
    policy = write_policy(tmp / "policy.json", RULES, "deny")
    with AgentProcess(
        module_lab,
        policy,
        tmp / "events.jsonl",
        api=f"127.0.0.1:{free_port()}",
        extra_args=["--print-events"],
    ) as a:
        a.start()
        a.wait_api()
        for fam in ("v4", "v6"):
            syn(module_lab, fam, 22)
            syn(module_lab, fam, 5432)
            udp_to(module_lab, fam, [7001])
        assert wait_until(lambda: len(flows(a)) >= 6, 10)
        yield a


def microseg(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MICROSEG_TOKEN", "NO_COLOR")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "streamer",
            *args,
            "--api",
            agent.api or "",
            "--state-dir",
            str(agent.state_dir),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def observe_json(agent: AgentProcess, *args: str) -> list[dict[str, Any]]:
    out = microseg(agent, "flows", "observe", "-o", "json", *args)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_recent_events_as_json_are_the_agents(agent: AgentProcess) -> None:
    got = observe_json(agent, "--last", "100")
    assert [e["seq"] for e in got] == [e["seq"] for e in agent.events()][-100:]
    assert got == agent.events()[-100:]  # the agent's objects, unchanged
    assert len(observe_json(agent, "--last", "2")) == 2
    assert len(observe_json(agent)) == min(20, len(agent.events()))  # --last 20 by default


@pytest.mark.parametrize(
    ("args", "keep"),
    [
        (("--verdict", "log"), lambda e: e["verdict"] == "log"),
        (("--verdict", "deny"), lambda e: e["verdict"] == "deny"),
        (("--protocol", "udp"), lambda e: e["protocol"] == "udp"),
        (("--port", "22"), lambda e: 22 in (e["src_port"], e["dst_port"])),
        (("--port", "22,5432"), lambda e: {22, 5432} & {e["src_port"], e["dst_port"]}),
        (("--ip", "198.18.0.0/15"), lambda e: ":" not in e["src_ip"]),
        (("--rule", "1002"), lambda e: (e["rule"] or {}).get("rule_id") == 1002),
        (("--rule", "audit-pg"), lambda e: (e["rule"] or {}).get("name") == "audit-pg"),
        (("--rule", "default"), lambda e: e["rule"] is None),
        (
            ("--verdict", "deny", "--protocol", "tcp"),
            lambda e: e["verdict"] == "deny" and e["protocol"] == "tcp",
        ),
    ],
)
def test_each_filter_keeps_exactly_the_matching_events(
    agent: AgentProcess, args: tuple[str, ...], keep: Any
) -> None:
    got = observe_json(agent, "--last", "1000", *args)
    expected = [e for e in flows(agent) if keep(e)]
    assert got and [e["seq"] for e in got if e["type"] == "flow"] == [e["seq"] for e in expected]


def test_ip_filter_takes_either_end(agent: AgentProcess, module_lab: Lab) -> None:
    got = observe_json(agent, "--last", "1000", "--ip", module_lab.host_v6)
    assert got and all(module_lab.host_v6 in (e["src_ip"], e["dst_ip"]) for e in got)
    assert len(got) == sum(1 for e in flows(agent) if ":" in e["dst_ip"])


def test_table_and_compact_output(agent: AgentProcess, module_lab: Lab) -> None:
    out = microseg(agent, "flows", "observe", "--last", "1000", "--port", "22")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "TIME",
        "VERDICT",
        "DIRECTION",
        "SOURCE",
        "DESTINATION",
        "PROTO",
        "RULE",
        "PKTS",
        "BYTES",
        "STAGED",
    ]
    assert "\033[" not in out.stdout  # not a terminal: no colours
    row = next(ln for ln in lines[1:] if f"{module_lab.host_v4}:22" in ln)
    assert row.split()[1:8] == [
        "DENY",
        "ingress",
        row.split()[3],
        f"{module_lab.host_v4}:22",
        "tcp",
        "1002",
        "no-ssh",
    ]
    assert f"[{module_lab.host_v6}]:22" in out.stdout

    out = microseg(
        agent,
        "flows",
        "observe",
        "--last",
        "1000",
        "-o",
        "compact",
        "--verdict",
        "log",
        "--color",
        "always",
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(ln.startswith("\033[33m") and ln.endswith("\033[0m") for ln in lines)
    assert all(" LOG " in ln and " -> " in ln and "rule=1005:audit-pg" in ln for ln in lines)


def test_the_agents_console_prints_the_compact_lines(agent: AgentProcess) -> None:
    """`--print-events` prints what `-o compact` does: the rule with its name, `default` when
    the default action decided."""
    out = microseg(agent, "flows", "observe", "--last", "1000", "-o", "compact", "--color", "never")
    assert out.returncode == 0, out.stderr
    compact = out.stdout.splitlines()
    printed = [ln for ln in agent.stdout_lines if " -> " in ln]
    assert compact and printed[: len(compact)] == compact
    assert any("rule=1002:no-ssh" in ln for ln in printed)
    assert any("rule=default" in ln for ln in printed)


def test_follow_prints_live_events_after_the_recent_ones_without_duplicates(
    agent: AgentProcess, module_lab: Lab
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MICROSEG_TOKEN"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamer",
            "flows",
            "observe",
            "--follow",
            "--last",
            "3",
            "-o",
            "json",
            "--verdict",
            "deny",
            "--api",
            agent.api or "",
            "--state-dir",
            str(agent.state_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    try:
        mark = agent.log_mark()
        agent.wait_log(r"flow feed client \d+ connected", after=mark, timeout=10)
        assert wait_until(lambda: len(lines) >= 3, 10), lines
        before = len(flows(agent))
        for port in range(9100, 9105):
            udp_to(module_lab, "v4", [port])
        syn(module_lab, "v6", 5432)  # logged: filtered out
        assert wait_until(lambda: len(flows(agent)) >= before + 6, 10)
        assert wait_until(lambda: len(lines) >= 8, 5), lines
        time.sleep(0.5)
        # Still following after the client's request timeout (10 s) would have passed.
        time.sleep(10.5)
        udp_to(module_lab, "v4", [9105])
        assert wait_until(lambda: len(lines) >= 9, 5), lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    reader.join(5)
    got = [json.loads(ln) for ln in lines]
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(set(seqs)), "a record twice, or out of order"
    denied = [e for e in flows(agent) if e["verdict"] == "deny"]
    assert seqs == [e["seq"] for e in denied if e["seq"] >= seqs[0]]
    assert {e["dst_port"] for e in got[3:]} == set(range(9100, 9106))
    assert rc == 0, proc.stderr.read() if proc.stderr else ""


def test_bad_arguments_and_a_missing_agent(agent: AgentProcess) -> None:
    for bad in (
        ("--port", "0"),
        ("--ip", "10.0.0.300"),
        ("--verdict", "maybe"),
        ("--protocol", "sctp"),
        ("--last", "-1"),
        ("-o", "yaml"),
    ):
        out = microseg(agent, "flows", "observe", *bad)
        assert out.returncode == 2 and bad[0] in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamer",
            "flows",
            "observe",
            "--api",
            f"127.0.0.1:{free_port()}",
            "--token",
            "x",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
    )
    assert out.returncode == 1 and "not reachable" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamer",
            "flows",
            "observe",
            "--follow",
            "--api",
            agent.api or "",
            "--token",
            "wrong",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO,
    )
    assert out.returncode == 1 and "token" in out.stderr and "Traceback" not in out.stderr


def test_viewer_url_mints_a_one_time_link(agent: AgentProcess) -> None:
    out = microseg(agent, "viewer-url")
    assert out.returncode == 0, out.stderr
    link = out.stdout.strip()
    assert link.startswith(f"{agent.api_url}/login?code=")
    with urllib.request.urlopen(link, timeout=10) as r:
        assert r.status == 200 and "microseg_session" in r.headers["Set-Cookie"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(link, timeout=10)
    assert e.value.code == 401
    out = microseg(agent, "viewer-url", "--token", "wrong")
    assert out.returncode == 1 and "token" in out.stderr
