"""The built wheel installs into a clean venv and its `microseg run` enforces.

In: this checkout. The wheel is built from a copy of it (`pip wheel --no-deps`, setuptools from
the build isolation, as a user's `pip` builds it), installed into a fresh venv made by Debian's
/usr/bin/python3 with --system-site-packages (bcc is Debian's python3-bpfcc) with its
dependencies from PyPI. Checked: the wheel's file list (every module of streamer/, the
classifier's C source and header, the viewer; no bench/, no tests/), that the venv imports
streamer from its own site-packages, and that the venv's `microseg run`, started outside the
checkout without PYTHONPATH, enforces on a real lab, answers /api/v1/health and exits 0
(detached) on SIGTERM. Everything lives in one temporary directory, removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.agentproc import AgentProcess, free_port, write_policy
from support.netutil import echo_server, tcp_connect, wait_until
from support.wheels import NOT_SOURCE, clean_env, run_ok, scratch_dir

import streamer
from streamer.lab.lab import Lab

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: its site-packages hold bcc
# Building pulls setuptools, installing pulls the dependencies: PyPI on a cold cache.
PIP_TIMEOUT = 420.0

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """One temporary directory for the source copy, the wheel and the venv; always removed."""
    with scratch_dir("microseg-wheel-test-") as d:
        yield d


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    """The wheel, built from a copy of the checkout: a build writes build/ and *.egg-info
    next to the sources, and a stale build/lib of an earlier build would end up in the wheel."""
    src = workdir / "src"
    # symlinks=True: streamer/datapath/bpf stays the link to bpf/ it is in the repository.
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCE)
    dist = workdir / "dist"
    run_ok(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(src)],
        timeout=PIP_TIMEOUT,
        cwd=workdir,
        env=clean_env(),
    )
    (whl,) = dist.glob("microseg-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(workdir: Path, wheel: Path) -> Path:
    """A fresh venv (system site-packages for bcc) with the wheel installed; its directory."""
    env = workdir / "venv"
    run_ok(
        [SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(env)],
        timeout=120,
        cwd=workdir,
        env=clean_env(),
    )
    python = str(env / "bin" / "python")
    probe = "import importlib.util as u; print(u.find_spec('streamer') is None)"
    before = run_ok([python, "-c", probe], timeout=30, cwd=workdir, env=clean_env())
    assert before.stdout.strip() == "True", (
        "a streamer package is already importable in a fresh venv (system or user "
        "site-packages): the test could not tell it from the wheel's"
    )
    run_ok(
        [python, "-m", "pip", "install", str(wheel)],
        timeout=PIP_TIMEOUT,
        cwd=workdir,
        env=clean_env(),
    )
    return env


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = {n.split("/", 1)[1]: n for n in names if n.split("/")[0].endswith(".dist-info")}
        top_level = z.read(dist_info["top_level.txt"]).decode().split()
        entry_points = z.read(dist_info["entry_points.txt"]).decode()
        shipped_c = z.read("streamer/datapath/bpf/classifier.c")
        shipped_h = z.read("streamer/datapath/bpf/classifier.h")
    assert top_level == ["streamer"], top_level
    assert not [n for n in names if n.split("/")[0] in ("bench", "tests")], sorted(names)
    assert "microseg = streamer.cli.main:main" in entry_points, entry_points
    # Every module of every subpackage, the viewer and py.typed: whatever streamer/ holds.
    # (followlinks: streamer/datapath/bpf is a link to the repository's bpf/)
    wanted = {
        (Path(d) / f).relative_to(ROOT).as_posix()
        for d, _, files in os.walk(ROOT / "streamer", followlinks=True)
        if "__pycache__" not in Path(d).parts
        for f in files
        if not f.endswith(".pyc")
    }
    assert {"streamer/events/sinks/__init__.py", "streamer/viewer/index.html",
            "streamer/datapath/bpf/classifier.c"} <= wanted  # fmt: skip
    missing = sorted(wanted - names)
    assert not missing, f"the wheel lacks {missing}"
    # The classifier's source and header are the repository's bpf/, not a copy that drifted.
    assert shipped_c == (ROOT / "bpf" / "classifier.c").read_bytes()
    assert shipped_h == (ROOT / "bpf" / "classifier.h").read_bytes()


def test_venv_imports_its_own_streamer(venv: Path, workdir: Path) -> None:
    code = (
        "import json, streamer, streamer.datapath.loader as d; "
        "print(json.dumps([streamer.__file__, str(d.BPF_DIR), "
        "(d.BPF_DIR / 'classifier.c').is_file()]))"
    )
    out = run_ok(
        [str(venv / "bin" / "python"), "-c", code], timeout=60, cwd=workdir, env=clean_env()
    )
    module, bpf_dir, has_source = json.loads(out.stdout)
    site = venv / "lib"
    assert Path(module).is_relative_to(site), module
    assert Path(bpf_dir).is_relative_to(site) and has_source, bpf_dir


def test_installed_version_and_policy_check(venv: Path, workdir: Path) -> None:
    """The installed console script, outside the checkout: --version and an offline check."""
    microseg = str(venv / "bin" / "microseg")
    out = run_ok([microseg, "--version"], timeout=60, cwd=workdir, env=clean_env())
    assert out.stdout.strip() == f"microseg {streamer.__version__}", out.stdout
    example = shutil.copy(ROOT / "examples" / "policies.json", workdir / "policies.json")
    out = run_ok([microseg, "policy-check", str(example)], timeout=60, cwd=workdir, env=clean_env())
    assert "rules" in out.stdout and "table entries" in out.stdout, out.stdout


def test_installed_microseg_run_enforces(
    venv: Path,
    workdir: Path,
    module_lab: Lab,
    agent_factory: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    lab = module_lab
    microseg = venv / "bin" / "microseg"
    assert microseg.is_file(), f"the wheel installed no {microseg}"
    policy = write_policy(
        tmp_path / "policy.json",
        [
            {
                "rule_id": 1,
                "name": "web",
                "protocol": "tcp",
                "action": "allow",
                "dst_port": 80,
                "direction": "ingress",
            },
        ],
        default="deny",
    )
    with echo_server(lab.host_ns, (80, 81)):
        # Without the agent both connect: the refused one below is the agent's doing.
        for port in (80, 81):
            assert wait_until(lambda p=port: tcp_connect(lab.peer_ns, lab.host_v4, p)), port
        agent = agent_factory(
            lab,
            policy,
            command=[str(microseg)],
            cwd=workdir,
            env=clean_env(),
            api=f"127.0.0.1:{free_port()}",
            start_timeout=60.0,
        )
        agent.start()
        assert tcp_connect(lab.peer_ns, lab.host_v4, 80), agent.log
        assert not tcp_connect(lab.peer_ns, lab.host_v4, 81), agent.log
        agent.wait_api()
        with urllib.request.urlopen(f"{agent.api_url}/api/v1/health", timeout=10) as resp:
            assert resp.status == 200
            assert json.loads(resp.read())["status"] == "ok"
        assert agent.stop() == 0, agent.log
        agent.wait_log(r"detached from", timeout=1)
        assert wait_until(lambda: tcp_connect(lab.peer_ns, lab.host_v4, 81)), agent.log
