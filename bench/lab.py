"""The side-by-side benchmark's lab: a `streamer.lab.lab.Lab` plus what the bench does to it.

In: nothing but root. Out: `BenchLab`, a fresh lab (two namespaces, a veth pair, addresses of
its own from 198.18.0.0/15 and fd6d:7365:67::/48) with helpers to run pinned commands in
either namespace, to put one filter configuration at a time on the host end's ingress (an
empty classifier, an nftables table), to read the interface's packet counter, and to read
BPF programs' run time from the kernel (`BpfStats`). Everything made is removed by `close`
(processes in the namespaces included); nftables tables live inside the lab's host
namespace only, never in the machine's own ruleset.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BenchError

NFT_TABLE = "msbench"
_BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type
EMPTY_PROG = "int ms_empty(struct __sk_buff *skb) { return 0; }"
_EMPTY_PRIO = 0x4D54
PARENT_INGRESS = "ffff:fff2"
PARENT_EGRESS = "ffff:fff3"


class BenchLab:
    """A lab for the side-by-side bench: peer (sender) -> veth -> host (receiver, filtered).

    `sender_cpu` / `receiver_cpu`: the CPUs the peer's and the host's programs are pinned to
    (None when the machine has one CPU).
    """

    def __init__(self) -> None:
        from pyroute2 import config as pyroute2_config

        from streamer.lab.lab import Lab

        # pyroute2's netns helpers must not run our SIGTERM handler (see bench.api).
        pyroute2_config.disable_mp_signal = True
        self.lab: Any = Lab.create()
        cpus = sorted(os.sched_getaffinity(0))
        self.sender_cpu: int | None = cpus[-1] if len(cpus) > 1 else None
        self.receiver_cpu: int | None = cpus[0] if len(cpus) > 1 else None
        self._empty: Any = None
        self._nft = False

    @property
    def name(self) -> str:
        return str(self.lab.name)

    def addr(self, side: str, family: int) -> str:
        """The host's or the peer's address of `family` (4 or 6)."""
        return str(getattr(self.lab, f"{side}_v{family}"))

    # -- processes --

    def argv(self, side: str, argv: list[str], bound_s: float) -> list[str]:
        """`argv` run in the side's namespace, pinned to the side's CPU, killed after bound_s."""
        ns = self.lab.host_ns if side == "host" else self.lab.peer_ns
        cpu = self.receiver_cpu if side == "host" else self.sender_cpu
        pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
        return ["ip", "netns", "exec", ns, "timeout", "-k", "2", f"{bound_s:.0f}", *pin, *argv]

    def run(self, side: str, argv: list[str], bound_s: float) -> str:
        """Run to completion; its stdout (BenchError with its stderr if it fails)."""
        try:
            proc = subprocess.run(
                self.argv(side, argv, bound_s), capture_output=True, text=True,
                timeout=bound_s + 5, check=False, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"{argv[0]} did not finish within {bound_s:.0f} s") from e
        if proc.returncode != 0:
            raise BenchError(
                f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
        return proc.stdout

    def popen(self, side: str, argv: list[str], bound_s: float) -> subprocess.Popen[str]:
        """Start in the background (stdout piped, stderr discarded)."""
        return subprocess.Popen(
            self.argv(side, argv, bound_s), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip

    # -- counters --

    def rx_packets(self) -> int:
        """Packets the host end of the veth received (counted before any filter)."""
        from pyroute2 import IPRoute

        with IPRoute(netns=self.lab.host_ns) as ipr:
            link = ipr.get_links(self.lab.host_ifindex)[0]
            stats = link.get_attr("IFLA_STATS64")
            return int(stats["rx_packets"])

    def filter_prog_ids(self) -> dict[str, int]:
        """Ids of the BPF programs attached to the host end: {"ingress": id, "egress": id},
        tcx links (microseg's, where the kernel has tcx) or clsact filters (`tc -j`: the
        pyroute2 here does not decode TCA_BPF_ID)."""
        from streamer.datapath.attach import tcx_programs

        out: dict[str, int] = {
            hook: progs[0][0]
            for hook, progs in tcx_programs(self.lab.host_if, self.lab.host_ns).items()
            if progs
        }
        for hook in ("ingress", "egress"):
            argv = ["ip", "netns", "exec", self.lab.host_ns, "tc", "-j", "filter", "show",
                    "dev", self.lab.host_if, hook]  # fmt: skip
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            try:
                filters = json.loads(proc.stdout or "[]")
            except ValueError:
                filters = []
            for f in filters:
                prog = f.get("options", {}).get("prog", {})
                if "id" in prog and hook not in out:
                    out[hook] = int(prog["id"])
        return out

    # -- B1: the empty classifier --

    def attach_empty(self) -> None:
        """An empty TC classifier (returns TC_ACT_OK) on clsact ingress and egress."""
        from bcc import BPF
        from pyroute2 import IPRoute

        self._empty = BPF(text=EMPTY_PROG)
        fn = self._empty.load_func("ms_empty", BPF.SCHED_CLS)
        with IPRoute(netns=self.lab.host_ns) as ipr:
            ipr.tc("add", "clsact", self.lab.host_ifindex)
            for parent in (PARENT_INGRESS, PARENT_EGRESS):
                ipr.tc(
                    "add-filter", "bpf", self.lab.host_ifindex, _EMPTY_PRIO, fd=fn.fd,
                    name="ms_empty", parent=parent, prio=_EMPTY_PRIO, classid=1,
                    direct_action=True,
                )  # fmt: skip

    def detach_empty(self) -> None:
        """Remove the clsact qdisc (and so the empty classifier) again."""
        from pyroute2 import IPRoute

        if self._empty is None:
            return
        with contextlib.suppress(Exception), IPRoute(netns=self.lab.host_ns) as ipr:
            ipr.tc("del", "clsact", self.lab.host_ifindex)
        self._empty.cleanup()
        self._empty = None

    # -- nftables, inside the host namespace --

    def nft(self, *args: str, stdin_file: Path | None = None) -> str:
        argv = ["ip", "netns", "exec", self.lab.host_ns, "nft", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise BenchError(f"nft {' '.join(args)}: {proc.stderr.strip()[:800]}")
        return proc.stdout

    def nft_load(self, script: str) -> float:
        """Load an `nft -f` script (one table) into the host namespace; seconds it took."""
        with tempfile.NamedTemporaryFile("w", prefix="msbench-", suffix=".nft") as f:
            f.write(script)
            f.flush()
            t0 = time.perf_counter()
            self._nft = True
            self.nft("-f", f.name)
            return time.perf_counter() - t0

    def nft_counter(self, name: str) -> int:
        """Packets of the named counter in our table."""
        out = self.nft("list", "counter", "netdev", NFT_TABLE, name)
        for word, value in zip(out.split(), out.split()[1:], strict=False):
            if word == "packets":
                return int(value)
        raise BenchError(f"nft counter {name}: no packet count in {out!r}")

    def nft_delete(self) -> None:
        if self._nft:
            self.nft("delete", "table", "netdev", NFT_TABLE)
            self._nft = False

    def close(self) -> None:
        """Remove everything: the empty classifier, the nft table, the lab and its processes."""
        try:
            self.detach_empty()
            with contextlib.suppress(BenchError, OSError, subprocess.TimeoutExpired):
                self.nft_delete()
        finally:
            self.lab.destroy()


class BpfStats:
    """Kernel run-time statistics of BPF programs while the object lives (BPF_ENABLE_STATS:
    the kernel turns them off again when our fd closes, even if we die; the same switch as
    the sysctl kernel.bpf_stats_enabled, without a sysctl to restore)."""

    def __init__(self) -> None:
        from streamer.datapath.bindings import libbpf

        lib = libbpf()
        lib.bpf_enable_stats.argtypes = [ct.c_int]
        self.fd = int(lib.bpf_enable_stats(_BPF_STATS_RUN_TIME))
        if self.fd < 0:
            raise BenchError(f"BPF_ENABLE_STATS failed: {os.strerror(ct.get_errno() or -self.fd)}")

    @staticmethod
    def read(prog_id: int) -> tuple[int, int]:
        """(run_time_ns, run_cnt) of program `prog_id` (0, 0 if it is gone)."""
        from streamer.datapath.bindings import libbpf

        lib = libbpf()
        lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
        fd = int(lib.bpf_prog_get_fd_by_id(prog_id))
        if fd < 0:
            return 0, 0
        try:
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        finally:
            os.close(fd)
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return int(fields.get("run_time_ns", "0")), int(fields.get("run_cnt", "0"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
