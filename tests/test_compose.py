"""`docker compose up`: the compose file validates with Debian's docker-compose and says what
the README promises, and the image is built by the very script `make setup` runs.

No Docker engine runs here: these check the files, not a running stack.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from support import REPO


def compose_config(env: dict[str, str] | None = None) -> dict[str, Any]:
    """`docker-compose -f docker-compose.yml config`, parsed (it fails on an invalid file)."""
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing (scripts/setup.sh installs Debian's)"
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MICROSEG_", "COMPOSE_"))}
    out = subprocess.run(
        [exe, "-f", "docker-compose.yml", "config"],
        cwd=REPO,
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def volume_targets(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only), from short or long volume syntax."""
    out: dict[str, tuple[str, bool]] = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
        else:
            out[v["target"]] = (v.get("source", ""), bool(v.get("read_only")))
    return out


def test_compose_file_validates_and_runs_kafka_and_the_agent() -> None:
    services = compose_config()["services"]
    assert set(services) == {"kafka", "agent"}

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft
    assert "127.0.0.1:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert "healthcheck" in kafka

    agent = services["agent"]
    assert Path(agent["build"]["context"]).resolve() == REPO
    assert agent["privileged"] is True and agent["network_mode"] == "host"
    vols = volume_targets(agent)
    assert vols["/sys/fs/bpf"] == ("/sys/fs/bpf", False)
    assert vols["/lib/modules"] == ("/lib/modules", True)
    assert vols["/usr/src"] == ("/usr/src", True)
    command = agent["command"]
    assert command[:2] == ["make", "run"]
    assert "KAFKA=127.0.0.1:9092" in command and "POLICY=examples/policies.json" in command
    assert "IFACE=" in command  # no interface given: the lab demo
    assert agent["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_takes_the_interface_from_the_environment() -> None:
    agent = compose_config({"MICROSEG_IFACE": "eth7"})["services"]["agent"]
    assert "IFACE=eth7" in agent["command"]


def test_the_image_is_built_by_the_setup_script_make_setup_runs() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    instructions = [
        ln.strip()
        for ln in dockerfile.splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    assert instructions[0] == "FROM debian:12"
    runs = [ln for ln in instructions if ln.startswith("RUN ")]
    assert len(runs) == 1 and re.search(r"(^|\s)scripts/setup\.sh(\s|$)", runs[0]), runs
    copy = next(i for i, ln in enumerate(instructions) if ln.startswith("COPY "))
    assert instructions[copy] == "COPY . ." and copy < instructions.index(runs[0])
    # `make setup` (and so `make test`, which CI runs) runs that same script.
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^setup:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "scripts/setup.sh" in recipe[1], recipe
    assert re.search(r"^test:.*\bsetup\b", makefile, re.M)
    # What setup.sh leaves out of an image is only what the image does not need.
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "SETUP_IMAGE" in setup and "ENV SETUP_IMAGE=1" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
