"""`scripts/install.sh` (make install) into a scratch DESTDIR, with real wheels and real venvs.

Two wheels are built from copies of this checkout: "old" with the checkout's version and "new"
with `.post1` appended (pyproject.toml and streamer/__init__.py patched in the copy). In order,
on one staging root:

1. install old: the tree (the venv of its version, current link, /usr/local/bin link, /etc
   examples, /var/lib/microseg 0700, the unit, scripts naming their final interpreter), and the
   installed microseg runs outside the checkout without PYTHONPATH (--version, policy-check);
2. the installed unit passes `systemd-analyze verify` (systemd is not PID 1 here: ExecStart is
   pointed at the staged file, nothing else changes), with no warning; the optional
   sys-fs-bpf.mount is what Debian's systemd refuses, which is why it is not installed;
3. the classifier builds with the unit's capabilities only (no CAP_SYS_ADMIN);
4. the upgrade under traffic: the OLD installed agent runs `run --config FILE` on a lab with
   the unit's capabilities only (entered into the lab's netns by nsenter, as a host agent sits
   in its own), a UDP hammer on a denied port and live TCP connections; the new version is
   installed, the old agent stopped by SIGTERM (what `systemctl restart` sends; keep-on-exit
   from the config), the NEW agent started: no denied datagram answered or delivered, the
   connections survive, the pinned state is adopted. /etc/microseg edits survive the upgrade,
   previous -> old;
5. --rollback swaps current and previous back; 6. --uninstall keeps /etc/microseg and the
   state dir, --purge removes them.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.agentproc import AgentProcess, rule, unique_agent_instance, write_policy
from support.netutil import (
    FAMILIES,
    DeniedHammer,
    TcpConn,
    echo_server,
    host,
    udp_echo_server,
)
from support.wheels import NOT_SOURCE, clean_env, run_ok, scratch_dir

from streamer import __version__
from streamer.datapath import artifact
from streamer.datapath.config import DatapathConfig
from streamer.lab.lab import Lab

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/microseg"
OLD = __version__
NEW = f"{__version__}.post1"
PIP_TIMEOUT = 600.0

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with scratch_dir("microseg-install-test-") as d:
        yield d


def _build_wheel(workdir: Path, version: str) -> Path:
    src = workdir / f"src-{version}"
    shutil.copytree(ROOT, src, symlinks=True, ignore=NOT_SOURCE)
    for rel, pattern in (
        ("pyproject.toml", r'^version = "[^"]*"'),
        ("streamer/__init__.py", r'^__version__ = "[^"]*"'),
    ):
        f = src / rel
        text, n = re.subn(pattern, pattern.split(" = ")[0][1:] + f' = "{version}"', f.read_text(),
                          count=1, flags=re.M)  # fmt: skip
        assert n == 1, rel
        f.write_text(text)
    dist = workdir / f"dist-{version}"
    run_ok(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
        timeout=PIP_TIMEOUT,
        cwd=workdir,
        env=clean_env(),
    )
    (whl,) = dist.glob("microseg-*.whl")
    return whl


@pytest.fixture(scope="module")
def wheels(workdir: Path) -> dict[str, Path]:
    return {OLD: _build_wheel(workdir, OLD), NEW: _build_wheel(workdir, NEW)}


@pytest.fixture(scope="module")
def destdir(workdir: Path) -> Path:
    d = workdir / "root"
    d.mkdir()
    return d


def install_sh(destdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """scripts/install.sh with DESTDIR=destdir, from outside the checkout."""
    return run_ok(
        [str(ROOT / "scripts" / "install.sh"), *args],
        timeout=PIP_TIMEOUT,
        cwd="/",
        env={**clean_env(), "DESTDIR": str(destdir)},
    )


def microseg(destdir: Path, version: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed microseg of `version`, run by its venv's interpreter (its shebang names
    the final /opt path, which a staging root does not have)."""
    venv = destdir / PREFIX.lstrip("/") / version
    return run_ok(
        [str(venv / "bin" / "python"), str(venv / "bin" / "microseg"), *args],
        timeout=120,
        cwd="/",
        env=clean_env(),
    )


@pytest.fixture(scope="module")
def installed_old(destdir: Path, wheels: dict[str, Path]) -> Path:
    install_sh(destdir, "--wheel", str(wheels[OLD]))
    return destdir


def _opt(destdir: Path) -> Path:
    return destdir / PREFIX.lstrip("/")


def test_install_tree(installed_old: Path) -> None:
    d = installed_old
    opt = _opt(d)
    assert os.readlink(opt / "current") == OLD
    assert not (opt / "previous").exists()
    venv = opt / OLD
    assert (venv / "pyvenv.cfg").read_text().count("include-system-site-packages = true") == 1
    shebang = (venv / "bin" / "microseg").read_text().splitlines()[0]
    assert shebang == f"#!{PREFIX}/{OLD}/bin/python3", shebang
    assert os.readlink(d / "usr/local/bin/microseg") == f"{PREFIX}/current/bin/microseg"
    assert (d / "etc/microseg/microseg.toml").read_bytes() == (
        ROOT / "examples/microseg.toml"
    ).read_bytes()
    assert (d / "etc/microseg/policy.json").read_bytes() == (
        ROOT / "examples/host-policy.json"
    ).read_bytes()
    assert stat.S_IMODE((d / "var/lib/microseg").stat().st_mode) == 0o700
    unit = d / "etc/systemd/system/microseg.service"
    assert unit.read_bytes() == (ROOT / "deploy/systemd/microseg.service").read_bytes()
    assert (opt / "share/sys-fs-bpf.mount").is_file()
    assert not list(opt.glob(".staging*"))
    # The installed code, not the checkout's: outside it, no PYTHONPATH.
    out = microseg(d, OLD, "--version")
    assert out.stdout.strip() == f"microseg {OLD}"
    code = "import streamer; print(streamer.__file__)"
    where = run_ok([str(venv / "bin/python"), "-c", code], timeout=60, cwd="/", env=clean_env())
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    check = microseg(d, OLD, "policy-check", str(d / "etc/microseg/policy.json"))
    assert "2 rules" in check.stdout, check.stdout


def _unit_settings(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_verifies(installed_old: Path, tmp_path: Path) -> None:
    d = installed_old
    unit = d / "etc/systemd/system/microseg.service"
    s = _unit_settings(unit)
    assert s["ExecStart"] == ["/usr/local/bin/microseg run --config /etc/microseg/microseg.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"] and s["LimitMEMLOCK"] == ["infinity"]
    assert s["RequiresMountsFor"] == ["/sys/fs/bpf"]
    assert s["ProtectSystem"] == ["strict"]
    assert s["ReadWritePaths"] == ["/sys/fs/bpf /var/lib/microseg /run/microseg"]
    assert s["CapabilityBoundingSet"] == ["CAP_BPF CAP_NET_ADMIN CAP_PERFMON"]
    assert "ProtectKernelModules" not in s  # it would hide /lib/modules from bcc
    # systemd is not PID 1: verify offline; ExecStart must name an existing file, so the
    # copy points it at the staged one. Nothing else differs.
    copy = tmp_path / "microseg.service"
    staged = _opt(d) / "current/bin/microseg"
    copy.write_text(
        unit.read_text().replace("ExecStart=/usr/local/bin/microseg", f"ExecStart={staged}", 1)
    )
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for microseg.service: ([\d.]+)", security.stdout)
    assert m is not None and float(m[1]) < 5.0, security.stdout[-2000:]
    # Debian's systemd mounts bpffs itself and refuses a unit for it: optional, not installed.
    mount = tmp_path / "sys-fs-bpf.mount"
    shutil.copy(_opt(d) / "share/sys-fs-bpf.mount", mount)
    refused = subprocess.run(
        ["systemd-analyze", "verify", str(mount)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0 and "Refusing" in refused.stderr, refused.stderr
    assert not (d / "etc/systemd/system/sys-fs-bpf.mount").exists()


def _unit_caps(destdir: Path) -> str:
    """The unit's capability bounding set as setpriv's --bounding-set."""
    (caps,) = _unit_settings(destdir / "etc/systemd/system/microseg.service")[
        "CapabilityBoundingSet"
    ]
    return "-all," + ",".join("+" + c.removeprefix("CAP_").lower() for c in caps.split())


def test_build_needs_no_cap_sys_admin(installed_old: Path, tmp_path: Path) -> None:
    """The installed build, confined to the unit's capabilities (no private bpffs mount)."""
    venv = _opt(installed_old) / OLD
    cfg = DatapathConfig(instance="unused", session_entries=4096 + os.getpid() % 4096)
    defines = artifact.size_defines(cfg)
    key = artifact.cache_key(defines)
    done = run_ok(
        ["setpriv", "--bounding-set", _unit_caps(installed_old), "--inh-caps", "-all", "--",
         str(venv / "bin/python"), "-m", "streamer.datapath.build", "--cache-dir",
         str(tmp_path), "--key", key, "--", *defines],
        timeout=600, cwd="/", env=clean_env(),
    )  # fmt: skip
    assert artifact.artifact_path(tmp_path, key).is_file(), done.stdout + done.stderr
    assert not list(Path("/sys/fs/bpf").glob("microseg-build-*")), "the build left its pins"


class ConfigAgent(AgentProcess):
    """An installed agent as microseg.service runs it: `run --config FILE` alone, with the
    unit's capabilities, in the lab's host namespace (nsenter: as a host agent is in its own
    namespace, so it needs no --netns and no CAP_SYS_ADMIN). The config file names this
    object's instance, state dir and events file, so the fixture's cleanup finds them."""

    def __init__(self, lab: Lab, config: Path, venv: Path, caps: str, **kwargs: Any) -> None:
        super().__init__(lab, None, **kwargs)
        self.config, self.venv, self.caps = config, venv, caps

    def argv(self) -> list[str]:
        return [
            "nsenter", f"--net=/run/netns/{self.netns}",
            "setpriv", "--bounding-set", self.caps, "--inh-caps", "-all", "--",
            str(self.venv / "bin/python"), str(self.venv / "bin/microseg"),
            "run", "--config", str(self.config),
        ]  # fmt: skip


def test_upgrade_under_traffic_leaves_no_gap(
    installed_old: Path,
    wheels: dict[str, Path],
    module_lab: Lab,
    tmp_path: Path,
) -> None:
    d = installed_old
    lab = module_lab
    opt = _opt(d)
    # An operator's edits of /etc/microseg, which the upgrade must keep.
    (d / "etc/microseg/policy.json").write_text('{"default_action": "allow", "policies": []}')
    toml_before = (d / "etc/microseg/microseg.toml").read_text() + "\n# edited\n"
    (d / "etc/microseg/microseg.toml").write_text(toml_before)

    policy = write_policy(
        tmp_path / "policy.json",
        [
            rule(80, "tcp", "allow", dst_port=80, direction="ingress"),
            rule(81, "udp", "allow", dst_port=53, direction="ingress"),
        ],
    )
    events = tmp_path / "events.jsonl"
    instance, state = unique_agent_instance(), tmp_path / "state"
    config = tmp_path / "microseg.toml"
    config.write_text(
        f'iface = ["{lab.host_if}"]\n'
        f'policy-file = "{policy}"\n'
        f'instance = "{instance}"\n'
        f'state-dir = "{state}"\n'
        f'events-file = "{events}"\n'
        'api = ["none"]\nfailsafe = "none"\nkeep-on-exit = true\n'
    )
    caps = _unit_caps(d)

    def agent(version: str) -> AgentProcess:
        return ConfigAgent(lab, config, opt / version, caps, events_file=events,
                           instance=instance, state_dir=state, start_timeout=300)  # fmt: skip

    old, new = agent(OLD), agent(NEW)
    with (
        echo_server(lab.host_ns, (80,), (53,)),
        udp_echo_server(lab.host_ns, 5353) as denied_srv,
    ):
        try:
            old.start()
            conns = {fam: TcpConn(lab.peer_ns, host(lab, fam), 80) for fam in FAMILIES}
            for fam, conn in conns.items():
                assert conn.exchange(), f"{fam}: no connection through the old agent"
            seen = denied_srv.udp_datagrams
            hammer = DeniedHammer(lab.peer_ns, [lab.host_v4, lab.host_v6], 5353, limit=600)
            hammer.start()
            try:
                # The upgrade: the new version's files while the old agent runs, then what
                # `systemctl restart` does: SIGTERM, and the unit starts the new one.
                install_sh(d, "--wheel", str(wheels[NEW]))
                assert os.readlink(opt / "current") == NEW
                assert old.stop() == 0, old.log
                old.wait_log(r"stay attached", timeout=1)
                t0 = time.monotonic()
                new.start()
                restart_s = time.monotonic() - t0
                time.sleep(0.3)
            finally:
                hammer.finish()
            assert not hammer.echoes, f"denied port answered during the upgrade: {hammer.echoes}"
            assert denied_srv.udp_datagrams == seen, "a denied datagram reached the server"
            assert hammer.attempts >= min(50, restart_s / 0.05), (hammer.attempts, restart_s)
            new.wait_log(r"adopted pinned state: generation 1, 2 rules", timeout=1)
            for fam, conn in conns.items():
                assert conn.exchange(), f"{fam}: live connection broke across the upgrade"
            for conn in conns.values():
                conn.close()
            assert f"microseg {NEW}" in microseg(d, NEW, "--version").stdout
        finally:
            old.cleanup()
            new.cleanup()
    # The upgrade kept the operator's files and remembers the old version.
    assert (d / "etc/microseg/microseg.toml").read_text() == toml_before
    assert (d / "etc/microseg/policy.json").read_text().startswith('{"default_action": "allow"')
    assert os.readlink(opt / "previous") == OLD and (opt / OLD / "bin/microseg").is_file()
    assert sorted(p.name for p in opt.iterdir()) == sorted(
        [OLD, NEW, "current", "previous", "share"]
    )


def test_rollback(installed_old: Path) -> None:
    d = installed_old
    opt = _opt(d)
    assert os.readlink(opt / "current") == NEW, "runs after the upgrade test"
    install_sh(d, "--rollback")
    assert os.readlink(opt / "current") == OLD and os.readlink(opt / "previous") == NEW
    assert microseg(d, OLD, "--version").stdout.strip() == f"microseg {OLD}"
    install_sh(d, "--rollback")  # and forward again
    assert os.readlink(opt / "current") == NEW and os.readlink(opt / "previous") == OLD


def test_uninstall_keeps_config_unless_purge(installed_old: Path) -> None:
    d = installed_old
    install_sh(d, "--uninstall")
    assert not _opt(d).exists()
    assert not (d / "usr/local/bin/microseg").is_symlink()
    assert not (d / "etc/systemd/system/microseg.service").exists()
    assert (d / "etc/microseg/microseg.toml").is_file() and (d / "var/lib/microseg").is_dir()
    install_sh(d, "--uninstall", "--purge")
    assert not (d / "etc/microseg").exists() and not (d / "var/lib/microseg").exists()
