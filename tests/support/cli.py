"""`microseg ...` run as a real subprocess against an agent (support/agentproc.py): `cli` runs
one command with the agent's `--api` and `--state-dir` (output captured, never a traceback),
`cli_json` its `-o json` answer, `cli_fails` checks a failure's status and words.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from support import REPO
from support.agentproc import AgentProcess


def cli(
    agent: AgentProcess,
    *args: str,
    api: str | None = None,
    state_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`microseg ARGS --api .. --state-dir ..` (the agent's by default), output captured."""
    argv = [
        sys.executable,
        "-m",
        "streamer",
        *args,
        "--api",
        api or str(agent.api),
        "--state-dir",
        str(state_dir or agent.state_dir),
    ]
    environ = {k: v for k, v in os.environ.items() if k != "MICROSEG_TOKEN"}
    environ.update(env or {})
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=REPO, env=environ, check=False
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def cli_json(agent: AgentProcess, *args: str) -> Any:
    p = cli(agent, *args, "-o", "json")
    assert p.returncode == 0, f"{args}: exit {p.returncode}: {p.stderr}"
    return json.loads(p.stdout)


def cli_fails(p: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert p.returncode == status, f"exit {p.returncode}: {p.stdout}{p.stderr}"
    assert p.stderr.startswith("microseg: ") or status == 2, p.stderr
    for w in words:
        assert w.lower() in p.stderr.lower(), f"{w!r} not in: {p.stderr}"
