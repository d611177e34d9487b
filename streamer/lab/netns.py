"""Entering named network namespaces, and finding and stopping what runs inside them.

In: namespace names as `ip netns` keeps them (bind mounts in /run/netns). Out: their paths
and ids, `in_netns` to switch the calling thread into one, `netns_socket` for a socket that
lives in one, the pids of processes inside, `kill_pids`, and `write_sysctl` for a
namespace's own net sysctls. Nothing here creates or removes a namespace (see
`streamer.lab.lab`). `LabError`, the error every module of `streamer.lab` raises, lives
here because entering a namespace that is gone is already one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """A lab could not be created, found, loaded or removed; the message says why."""


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


def netns_path(name: str) -> Path:
    """Path of the bind mount that keeps named netns `name` alive (as `ip netns` uses)."""
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    """True when a named network namespace `name` exists."""
    return netns_path(name).exists()


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Switch the calling thread (only) into named netns `name` for the `with` body.

    Keep the body minimal: sockets created inside stay bound to `name` for life, so the
    usual pattern is to create the socket in here and use it outside.
    """
    try:
        target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabError(f"network namespace {name!r} does not exist") from None
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                # Failing to return would leave this thread in the wrong namespace for
                # good; nothing sane can continue after that.
                _setns(own)
        finally:
            os.close(own)
    finally:
        os.close(target)


def netns_socket(ns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket living in named netns `ns` (None: the caller's own namespace)."""
    if ns is None:
        return socket.socket(family, type_, proto)
    with in_netns(ns):
        return socket.socket(family, type_, proto)


def netns_id(name: str) -> tuple[int, int] | None:
    """The (nsfs dev, ino) of named netns `name`; None when it does not exist."""
    try:
        st = os.stat(netns_path(name))
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(ns_ids: set[tuple[int, int]]) -> list[int]:
    """Pids (never our own) of processes whose netns is one of `ns_ids` (nsfs dev, ino)."""
    pids: list[int] = []
    if not ns_ids:
        return pids
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if (st.st_dev, st.st_ino) in ns_ids:
            pids.append(int(entry.name))
    return pids


def netns_pids(name: str) -> list[int]:
    """Pids of processes whose network namespace is named netns `name` (never our own)."""
    ns_id = netns_id(name)
    return pids_in_netns({ns_id}) if ns_id else []


def kill_pids(pids: list[int], grace: float = 1.0) -> None:
    """SIGTERM `pids`, then SIGKILL whatever still runs after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            if pids:
                time.sleep(0.02)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # A zombie is already dead for our purposes (its parent reaps it).
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def write_sysctl(ns: str, key: str, value: str) -> None:
    """Write `value` to net sysctl `key` (dotted, e.g. net.ipv6.conf.all.accept_dad) of `ns`."""
    # /proc/sys/net resolves against the opening thread's netns, hence the switch.
    path = "/proc/sys/" + key.replace(".", "/")
    with in_netns(ns), open(path, "w", encoding="ascii") as f:
        f.write(value)
