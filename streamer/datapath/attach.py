"""Attaching: our programs on an interface's TC hooks, and taking them off again.

In: the loaded programs, an interface name and optionally a network namespace (by name).
Out: tcx links pinned under <instance>/links/ (kernel 6.6+) or direct-action filters on a
clsact qdisc, swapped in atomically over an attachment of ours in either form; a record of
what was attached in <run_dir>/<instance>/attachments.json, so `detach` removes only what we
added (the clsact qdisc only if we created it and nothing else uses it). `tcx_programs` lists
anyone's programs on the tcx hooks. Other tools' programs and filters are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import functools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from streamer.datapath.bindings import libbpf, link_ifindex, prog_name
from streamer.datapath.config import (
    ATTACH_MODES,
    DEFAULT_PIN_ROOT,
    DEFAULT_RUN_DIR,
    LINKS_DIR,
    DatapathConfig,
    DatapathError,
)

T = TypeVar("T")

TC_PRIO = 0x4D53  # "MS": our filters' preference and handle on every hook
TC_HANDLE = 0x4D53
PARENT_INGRESS = "ffff:fff2"
PARENT_EGRESS = "ffff:fff3"
BPF_TCX_INGRESS = 46  # enum bpf_attach_type
BPF_TCX_EGRESS = 47
# hook, program, tcx attach type
HOOKS = (("ingress", "ms_ingress", BPF_TCX_INGRESS), ("egress", "ms_egress", BPF_TCX_EGRESS))
_CLONE_NEWNET = 0x40000000


def attach(
    config: DatapathConfig, progs: dict[str, Any], ifname: str, netns: str | None = None
) -> tuple[int, str]:
    """Attach (or atomically replace) our programs on the TC ingress and egress hooks of
    ifname: as pinned tcx links, or as filters on a clsact qdisc (`attach_mode`).

    Returns the interface index and what was attached ("tcx" or "tc"). An attachment of
    ours in the other form goes only once the new one judges, so no packet passes unjudged.
    Records the mode and whether it created the clsact qdisc, so detach removes only what
    we added.
    """
    from pyroute2 import IPRoute

    mode = config.attach_mode
    if mode not in ATTACH_MODES:
        raise DatapathError(f"attach mode {mode!r}: expected one of {', '.join(ATTACH_MODES)}")
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            where = f" in netns {netns}" if netns else ""
            raise DatapathError(f"no interface named {ifname}{where}")
        index = int(idx[0])
        created = False
        if mode != "tc":
            try:
                _attach_tcx(config, progs, ifname, netns, index)
            except _NoTcx as e:
                if mode == "tcx":
                    raise DatapathError(f"{ifname}: the kernel has no tcx hook ({e})") from e
                mode = "tc"
            else:
                mode = "tcx"
                _del_tc_filters(ipr, index)
        if mode == "tc":
            qdiscs = [q for q in ipr.get_qdiscs(index=index) if q.get_attr("TCA_KIND") == "clsact"]
            if not qdiscs:
                ipr.tc("add", "clsact", index)
                created = True
            for hook, prog, _ in HOOKS:
                fn = progs[prog]
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    index,
                    TC_HANDLE,
                    fd=fn.fd,
                    name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
                    parent=PARENT_INGRESS if hook == "ingress" else PARENT_EGRESS,
                    prio=TC_PRIO,
                    classid=1,
                    direct_action=True,
                )
            _unpin_links(config.pin_root, ifname, netns)
    _record_attachment(config, ifname, netns, created, mode)
    return index, mode


def _attach_tcx(
    config: DatapathConfig, progs: dict[str, Any], ifname: str, netns: str | None, index: int
) -> None:
    """Our programs as tcx links pinned under <instance>/links/: a pinned link of ours on
    this interface is updated in place (atomic), a stale one (its interface gone or
    renumbered) replaced. _NoTcx when the kernel has no tcx hook."""
    lib = libbpf()
    for hook, prog, atype in HOOKS:
        path = _link_pin(config.instance_dir, ifname, netns, hook)
        prog_fd = int(progs[prog].fd)
        if path.exists():
            fd = lib.bpf_obj_get(str(path).encode())
            if fd >= 0:
                try:
                    same = link_ifindex(fd) == index
                    if same and lib.bpf_link_update(fd, prog_fd, None) == 0:
                        continue
                    lib.bpf_link_detach(fd)
                finally:
                    os.close(fd)
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)

        def create(prog_fd: int = prog_fd, atype: int = atype) -> int:
            return int(lib.bpf_link_create(prog_fd, index, atype, None))

        fd = _in_netns(netns, create)
        if fd < 0:
            err = -fd
            if err == errno.EINVAL and hook == "ingress":
                raise _NoTcx(os.strerror(err))
            raise DatapathError(f"{ifname} {hook}: attaching (tcx) failed: {os.strerror(err)}")
        try:
            if lib.bpf_obj_pin(fd, str(path).encode()) != 0:
                err = ct.get_errno()
                lib.bpf_link_detach(fd)
                raise DatapathError(f"pinning {path} failed: {os.strerror(err)}")
        finally:
            os.close(fd)


def _record_attachment(
    config: DatapathConfig, ifname: str, netns: str | None, created_qdisc: bool, mode: str
) -> None:
    path = config.attachments_file
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    key = f"{netns or ''}/{ifname}"
    prev = data.get(key, {})
    data[key] = {
        "created_qdisc": prev.get("created_qdisc", False) or created_qdisc,
        "mode": mode,
    }
    path.write_text(json.dumps(data))


class _NoTcx(Exception):
    """The kernel refused a tcx link for a TC program: it predates tcx (Linux 6.6)."""


def _link_pin(instance_dir: Path, ifname: str, netns: str | None, hook: str) -> Path:
    """Where our tcx link on one hook of one interface is pinned (interface names hold no
    '/'; the namespace part is prefixed so no netns name can pass for the host's)."""
    return instance_dir / LINKS_DIR / (f"ns-{netns}" if netns else "host") / ifname / hook


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """fn() run in network namespace `netns` (by name, /run/netns), for calls that name an
    interface by index. Runs in a thread of its own: a namespace is a per-thread property,
    and that thread ends with the call."""
    if not netns:
        return fn()
    out: list[T] = []
    errs: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(Path("/run/netns") / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ct.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    raise DatapathError(f"entering netns {netns}: {os.strerror(ct.get_errno())}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            errs.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if errs:
        if isinstance(errs[0], OSError):
            raise DatapathError(f"netns {netns}: {errs[0]}") from errs[0]
        raise errs[0]
    return out[0]


def _del_tc_filters(ipr: Any, index: int) -> list[str]:
    """Remove our clsact filters (handle and preference 0x4d53) from the interface's hooks."""
    removed = []
    for hook, parent in (("ingress", PARENT_INGRESS), ("egress", PARENT_EGRESS)):
        with contextlib.suppress(Exception):
            ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=parent, prio=TC_PRIO)
            removed.append(hook)
    return removed


def _unpin_links(pin_root: Path, ifname: str, netns: str | None) -> list[str]:
    """Detach and unpin every instance's tcx links of ours on the interface; the hooks whose
    link went."""
    removed = []
    lib = libbpf()
    nsdir = f"ns-{netns}" if netns else "host"
    pins = pin_root.glob(f"*/{LINKS_DIR}/{nsdir}/{ifname}/*") if pin_root.exists() else []
    for path in sorted(pins):
        fd = lib.bpf_obj_get(str(path).encode())
        if fd >= 0:
            lib.bpf_link_detach(fd)
            os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return removed


def tcx_programs(ifname: str, netns: str | None = None) -> dict[str, list[tuple[int, str]]]:
    """(id, name) of the programs on the interface's tcx ingress and egress hooks, in order
    (anyone's, not only ours; empty where the kernel has no tcx)."""
    from pyroute2 import IPRoute

    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise DatapathError(f"no interface named {ifname}")
    lib = libbpf()
    index = int(idx[0])

    def query(atype: int) -> list[int]:
        ids = (ct.c_uint32 * 64)()
        cnt, flags = ct.c_uint32(64), ct.c_uint32(0)
        if lib.bpf_prog_query(index, atype, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
            return []
        return list(ids[: cnt.value])

    out: dict[str, list[tuple[int, str]]] = {}
    for hook, _, atype in HOOKS:
        out[hook] = []
        for pid in _in_netns(netns, functools.partial(query, atype)):
            out[hook].append((int(pid), prog_name(pid)))
    return out


def detach(
    ifname: str,
    netns: str | None = None,
    run_dir: Path = DEFAULT_RUN_DIR,
    pin_root: Path = DEFAULT_PIN_ROOT,
) -> list[str]:
    """Remove our programs from the interface: tcx links and clsact filters (and the clsact
    qdisc if we created it and nothing else uses it).

    Returns what was removed, for the operator. Other tools' programs are left alone.
    """
    from pyroute2 import IPRoute

    removed: list[str] = []
    created_qdisc = False
    key = f"{netns or ''}/{ifname}"
    records: list[Path] = sorted(run_dir.glob("*/attachments.json")) if run_dir.exists() else []
    for path in records:
        data = json.loads(path.read_text())
        if key in data:
            created_qdisc = created_qdisc or data[key].get("created_qdisc", False)
            del data[key]
            path.write_text(json.dumps(data))
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            raise DatapathError(f"no interface named {ifname}")
        index = idx[0]
        removed += [f"{ifname} {hook} (tcx)" for hook in _unpin_links(pin_root, ifname, netns)]
        removed += [f"{ifname} {hook}" for hook in _del_tc_filters(ipr, index)]
        if created_qdisc:
            others = [
                f
                for parent in (0xFFFFFFF2, 0xFFFFFFF3)
                for f in ipr.get_filters(index=index, parent=parent)
            ]
            if not others:
                with contextlib.suppress(Exception):
                    ipr.tc("del", "clsact", index)
                    removed.append(f"{ifname} clsact")
    return removed
