"""Loading the classifier: bpffs, the instance's pin directories, and bcc (its only import).

In: a DatapathConfig. Out: bpf/classifier.c compiled by bcc with the config's sizes, its
programs loaded (and chained into the slow path), its maps pinned under the instance's layout
directory (adopted as they are when they exist) and entered into a `Maps`. Pins of another
layout of the same instance are removed (they would be misread); the tcx links' directory is
kept. `remove_tree` deletes a pin directory (bpffs holds no plain files: unlink and rmdir).
"""

from __future__ import annotations

import ctypes as ct
import importlib.resources
import logging
import os
from pathlib import Path
from typing import Any

from streamer.datapath.config import LINKS_DIR, DatapathConfig, DatapathError
from streamer.datapath.maps import Maps

log = logging.getLogger(__name__)

# The classifier's C source, package data (in a checkout a link to the repository's bpf/).
# A real directory: bcc takes it as -I, which an installed package's files on disk give.
BPF_DIR = Path(str(importlib.resources.files("streamer.datapath") / "bpf"))
PROGRAMS = ("ms_ingress", "ms_egress", "ms_judge", "ms_related", "ms_record")
# The programs the TC programs tail-call, by their index in `slow_path` (SLOW_* in the .c).
SLOW_PATH = ("ms_judge", "ms_related", "ms_record")
MAPS = (
    "sessions",
    "rules4",
    "rules6",
    "shapes",
    "banks",
    "active",
    "settings",
    "counters",
    "rule_stats",
    "blooms",
    "frags",
    "reaped",
)


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


def load_classifier(config: DatapathConfig, maps: Maps) -> dict[str, Any]:
    """Compile and load the classifier into `maps`; returns its programs by name."""
    from bcc import BPF  # the only bcc import of the product

    ensure_bpffs()
    pin = config.pin_dir
    if config.instance_dir.exists():
        for other in config.instance_dir.iterdir():
            if other != pin and other.name != LINKS_DIR:
                log.warning("pinned maps of another layout in %s: removing them", other)
                remove_tree(other)
    pin.mkdir(parents=True, exist_ok=True)
    cflags = [
        f"-I{BPF_DIR}",
        f'-DMS_PIN="{pin}"',
        f"-DMS_MAX_SHAPES={config.max_shapes}",
        f"-DMS_SESSIONS={config.session_entries}",
        f"-DMS_RULE_ENTRIES={config.rule_entries}",
        f"-DMS_RULE_SLOTS={config.rule_slots}",
        f"-DMS_RINGBUF_PAGES={config.ringbuf_pages}",
        f"-DMS_FRAGS={config.frag_entries}",
        "-Wno-unused-function",
    ]
    progs: dict[str, Any] = {}
    try:
        bpf = BPF(src_file=str(BPF_DIR / "classifier.c"), cflags=cflags)
        maps.bpf = bpf
        for name in PROGRAMS:
            progs[name] = bpf.load_func(name, BPF.SCHED_CLS)
    except Exception as e:  # bcc raises bare Exception
        raise DatapathError(f"loading the classifier failed: {e}") from e
    for i, name in enumerate(SLOW_PATH):
        bpf["slow_path"][ct.c_int(i)] = ct.c_int(progs[name].fd)
    maps.barrier()  # the barrier's inner map in place before any packet needs it
    for name in MAPS:
        maps.fds[name] = bpf[name].get_fd()
    return progs


def release(maps: Maps) -> None:
    """Drop bcc's objects (programs, map fds); what is pinned or attached stays."""
    if maps.bpf is not None:
        maps.bpf.cleanup()
        maps.bpf = None
