"""Loading the classifier: bpffs, the instance's pin directories, the build, libbpf.

In: a DatapathConfig. Out: the classifier's maps (pinned under the instance's layout directory,
adopted as they are when their pins exist and match; the others created) entered into a
`Maps`, and its programs loaded from the build artifact (streamer.datapath.artifact) with
libbpf, chained into the slow path. The artifact comes from the cache directory
(`config.cache_dir`); when none matches, or one is unusable (a warning), a child process
compiles it with bcc first (`python -m streamer.datapath.build`): this process never imports
bcc. Pins of another layout of the same instance are removed (they would be misread); the tcx
links' directory is kept. `remove_tree` deletes a pin directory (bpffs holds no plain files:
unlink and rmdir). `release` closes every fd the load opened; what is pinned or attached stays.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import json
import logging
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from streamer.datapath import artifact
from streamer.datapath.artifact import BPF_DIR, Artifact, ArtifactError, MapDef
from streamer.datapath.bindings import (
    BPF_PROG_TYPE_SCHED_CLS,
    libbpf,
    map_create,
    map_info,
    prog_load,
)
from streamer.datapath.config import LINKS_DIR, DatapathConfig, DatapathError
from streamer.datapath.maps import Maps

log = logging.getLogger(__name__)

__all__ = ["BPF_DIR", "PROGRAMS", "SLOW_PATH", "Loaded", "Program", "load_classifier"]

PROGRAMS = ("ms_ingress", "ms_egress", "ms_judge", "ms_related", "ms_record")
# The programs the TC programs tail-call, by their index in `slow_path` (SLOW_* in the .c).
SLOW_PATH = ("ms_judge", "ms_related", "ms_record")
BUILD_TIMEOUT = 600.0  # seconds: bcc takes about 2 on an idle machine
# The checkout or site-packages directory holding `streamer`, for the build's interpreter.
_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Program:
    """A loaded program: its name and fd (what attach and BPF_PROG_TEST_RUN take)."""

    name: str
    fd: int


@dataclass(frozen=True)
class Loaded:
    """What `load_classifier` did: the programs, and whether the build was compiled for this
    load (False: it came from the cache)."""

    progs: dict[str, Program]
    compiled: bool


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf when it is not (pins need it)."""
    with open("/proc/mounts") as f:
        if any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f):
            return
    os.makedirs("/sys/fs/bpf", exist_ok=True)
    rc = os.system("mount -t bpf bpf /sys/fs/bpf")
    if rc != 0:
        raise DatapathError("/sys/fs/bpf is not a bpf filesystem and mounting one failed")


def remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for p in sorted(path.rglob("*"), key=lambda x: len(x.parts), reverse=True):
        if p.is_dir():
            p.rmdir()
        else:
            p.unlink()
    path.rmdir()


# ---- the build ---------------------------------------------------------------------------


def _compile(config: DatapathConfig, key: str, defines: list[str]) -> float:
    """Run the build in a child process; the seconds it took."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "streamer.datapath.build",
        "--cache-dir",
        str(config.cache_dir),
        "--key",
        key,
        "--",
        *defines,
    ]
    try:
        done = subprocess.run(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DatapathError(f"building the classifier failed: {e}") from e
    if done.returncode != 0:
        lines = (done.stderr or "").strip().splitlines()
        tail = "\n".join(lines[-40:]) or f"exit status {done.returncode}"
        raise DatapathError(f"building the classifier into {config.cache_dir} failed:\n{tail}")
    try:
        return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
    except (ValueError, KeyError, IndexError, TypeError):
        return 0.0


def _artifact(config: DatapathConfig) -> tuple[Artifact, bool]:
    """The build for this config, from the cache or compiled now; whether it was compiled."""
    defines = artifact.size_defines(config)
    key = artifact.cache_key(defines)
    path = artifact.artifact_path(config.cache_dir, key)
    try:
        found = artifact.read(path, key)
    except FileNotFoundError:
        pass
    except ArtifactError as e:
        log.warning("%s: building it again", e)
    else:
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used: kept when the cache is pruned
        return found, False
    seconds = _compile(config, key, defines)
    try:
        built = artifact.read(path, key)
    except (FileNotFoundError, ArtifactError) as e:
        raise DatapathError(f"the classifier was built but {path} cannot be read: {e}") from e
    log.debug("bcc compiled the classifier in %.2f s", seconds)
    return built, True


# ---- maps and programs -------------------------------------------------------------------


def _describe(type_: int, key_size: int, value_size: int, max_entries: int, flags: int) -> str:
    return (
        f"type {type_}, key {key_size} B, value {value_size} B, {max_entries} entries,"
        f" flags {flags}"
    )


def _adopt(d: MapDef, path: Path) -> int | None:
    """The fd of the map pinned at path, checked against its definition; None if no pin."""
    fd = int(libbpf().bpf_obj_get(str(path).encode()))
    if fd < 0:
        err = ct.get_errno()
        if err == errno.ENOENT:
            return None
        raise DatapathError(f"opening pinned map {d.name} at {path} failed: {os.strerror(err)}")
    try:
        info = map_info(fd)
    except DatapathError as e:
        os.close(fd)
        raise DatapathError(f"pinned map {d.name} at {path}: {e}") from e
    have = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
    want = (d.type, d.key_size, d.value_size, d.max_entries, d.flags)
    if have != want:
        os.close(fd)
        raise DatapathError(
            f"pinned map {d.name} at {path} does not match the classifier: it has "
            f"{_describe(*have)}, the classifier needs {_describe(*want)}"
        )
    return fd


def _open_map(d: MapDef, pin_dir: Path, fds: dict[str, int]) -> int:
    """Adopt the map's pin, or create it (and pin it when it is a pinned map)."""
    path = pin_dir / d.pin if d.pin else None
    if path is not None:
        fd = _adopt(d, path)
        if fd is not None:
            return fd
    inner = fds[d.inner] if d.inner else 0
    fd = map_create(d.name, d.type, d.key_size, d.value_size, d.max_entries, d.flags, inner)
    if path is None:
        return fd
    path.parent.mkdir(parents=True, exist_ok=True)
    if libbpf().bpf_obj_pin(fd, str(path).encode()) != 0:
        err = ct.get_errno()
        os.close(fd)
        if err == errno.EEXIST:  # a concurrent load pinned it first; share that one
            again = _adopt(d, path)
            if again is not None:
                return again
        raise DatapathError(f"pinning map {d.name} at {path} failed: {os.strerror(err)}")
    return fd


def load_classifier(config: DatapathConfig, maps: Maps) -> Loaded:
    """Load the classifier into `maps` (see the module's docstring)."""
    started = time.monotonic()
    ensure_bpffs()
    pin = config.pin_dir
    if config.instance_dir.exists():
        for other in config.instance_dir.iterdir():
            if other != pin and other.name != LINKS_DIR:
                log.warning("pinned maps of another layout in %s: removing them", other)
                remove_tree(other)
    pin.mkdir(parents=True, exist_ok=True)
    built, compiled = _artifact(config)
    took_build = time.monotonic() - started
    progs: dict[str, Program] = {}
    try:
        for d in built.maps:
            maps.fds[d.name] = _open_map(d, pin, maps.fds)
            maps.defs[d.name] = d
        for name in PROGRAMS:
            code = built.program(name).patched(maps.fds)
            progs[name] = Program(
                name, prog_load(name, BPF_PROG_TYPE_SCHED_CLS, code, built.license)
            )
        for i, name in enumerate(SLOW_PATH):
            maps.write("slow_path", struct.pack("<I", i), struct.pack("<I", progs[name].fd))
        maps.barrier()  # the barrier's inner map in place before any packet needs it
    except BaseException:
        release(maps, progs)
        raise
    log.info(
        "classifier %s (%s) in %.2f s, loaded in %.2f s",
        "compiled by bcc" if compiled else "from the build cache",
        artifact.artifact_path(config.cache_dir, built.key),
        took_build,
        time.monotonic() - started - took_build,
    )
    return Loaded(progs, compiled)


def release(maps: Maps, progs: dict[str, Program] | None = None) -> None:
    """Close the programs' and the maps' fds; what is pinned or attached stays."""
    maps.close()
    for p in (progs or {}).values():
        with contextlib.suppress(OSError):
            os.close(p.fd)
    if progs is not None:
        progs.clear()
