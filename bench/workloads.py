"""The side-by-side bench's workloads, each one run between the lab's peer and host.

In: a `BenchLab`, the address family, the seconds a run lasts. Out: one number per run (and
the details) from real traffic through the host end's ingress, sender pinned to one CPU and
receiver to the other:

- `tcp`: TCP bulk throughput, iperf3 (Gbit/s received);
- `udp`: small-packet UDP rate, 18-byte payloads (64-byte frames with IPv4) sent flat out with
  sendmmsg, datagrams/s delivered to the receiving socket (bench/nettool.c). Paired with a
  twin lab (`run_udp_pair`), one sender floods both in turn, `UDP_SLICE_MS` each: this
  workload's rate moves by tens of percent within seconds on a shared machine, and only
  slices that close together see the same machine;
- `rr`: request/response latency, one TCP connection, 1-byte ping-pong (netperf's TCP_RR):
  p50 and p99 per transaction in microseconds. Paired (`run_rr_pair`), one client alternates
  transactions between the lab and its twin: p99 here is set by stalls of the machine (other
  processes, interrupts), which back-to-back runs catch in one and not the other;
- `crr`: new connections per second, each connect + 1-byte exchange + close a new flow
  (netperf's TCP_CRR; closed with RST so no TIME_WAIT piles up in a long run).

Ports 5201..5204 (`PORTS`): the bench's rules match the range 5200-5215. bench/nettool.c is
compiled with the system cc on first use into build/bench/ (outside the source tree).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import BenchError
from bench.lab import BenchLab

ROOT = Path(__file__).resolve().parent.parent
IPERF_PORT = 5201
ECHO_PORT = 5202
UDP_PORT = 5204
PORTS = (IPERF_PORT, ECHO_PORT, UDP_PORT)
PORT_RANGE = "5200-5215"
UDP_PAYLOAD = 18
UDP_SLICE_MS = 20
WORKLOADS = ("tcp", "udp", "rr", "crr")


def c_tool(name: str) -> Path:
    """bench/<name>.c compiled into build/bench/<name> (again when older than its source)."""
    src = Path(__file__).resolve().parent / f"{name}.c"
    out = ROOT / "build" / "bench" / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError(f"no C compiler (cc) to build bench/{name}.c: run `make setup`")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(tmp), str(src)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"building bench/{name}.c failed:\n{proc.stderr[-1500:]}")
    tmp.replace(out)
    return out


def nettool() -> Path:
    """The compiled bench/nettool.c."""
    return c_tool("nettool")


def _json(text: str, what: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                data: dict[str, Any] = json.loads(line)
            except ValueError:
                break
            return data
    raise BenchError(f"{what}: no JSON result in {text[-400:]!r}")


def _ready(proc: subprocess.Popen[str], what: str) -> None:
    """Wait for a server's "ready" line (it binds before printing it)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise BenchError(f"{what} did not start (said {line!r})")


@dataclass
class Servers:
    """The long-lived server on the host side: the TCP echo server (RR and CRR). iperf3's
    server is started per run (`-1`): a long-lived one can stay stuck on a test whose client
    was killed."""

    lab: BenchLab
    bound_s: float
    procs: list[subprocess.Popen[str]]

    @classmethod
    def start(cls, lab: BenchLab, bound_s: float) -> Servers:
        tool = str(nettool())
        procs = [
            lab.popen("host", [tool, "echo", "::", str(ECHO_PORT), f"{bound_s:.0f}"], bound_s),
        ]
        self = cls(lab, bound_s, procs)
        try:
            _ready(procs[0], "the echo server")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _wait_listening(lab: BenchLab, port: int) -> None:
    """Until something listens on TCP `port` in the host namespace (bounded: 5 s)."""
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["ip", "netns", "exec", lab.lab.host_ns, "ss", "-Hltn", f"sport = :{port}"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout  # fmt: skip
        if out.strip():
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} in the lab after 5 s")


def run_tcp(lab: BenchLab, family: int, seconds: float) -> dict[str, Any]:
    """iperf3 from peer to host: {"value": Gbit/s received, "retransmits": n}. iperf3 takes
    whole seconds only: `seconds` is rounded up."""
    host = lab.addr("host", family)
    seconds = float(max(1, math.ceil(seconds)))
    server = lab.popen("host", ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)], seconds + 30)
    try:
        _wait_listening(lab, IPERF_PORT)
        out = lab.run(
            "peer",
            ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J",
             "--connect-timeout", "3000"],
            seconds + 20,
        )  # fmt: skip
    finally:
        if server.poll() is None:
            try:
                server.wait(3)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(5)
    try:
        data = json.loads(out)
        end = data["end"]
        bps = float(end["sum_received"]["bits_per_second"])
        retr = int(end["sum_sent"].get("retransmits", 0))
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"iperf3 gave no result: {out[-400:]!r}") from e
    return {"value": bps / 1e9, "retransmits": retr}


def run_udp(lab: BenchLab, family: int, seconds: float) -> dict[str, Any]:
    """UDP flood peer -> host: {"value": datagrams/s delivered, "sent_rate": datagrams/s}."""
    tool = str(nettool())
    sink = lab.popen("host", [tool, "sink", "::", str(UDP_PORT), f"{seconds + 3:g}"], seconds + 6)
    try:
        _ready(sink, "the UDP sink")
        sent = _json(
            lab.run(
                "peer",
                [tool, "udp", lab.addr("host", family), str(UDP_PORT), f"{seconds:g}",
                 str(UDP_PAYLOAD)],
                seconds + 10,
            ),
            "nettool udp",
        )  # fmt: skip
        out, _ = sink.communicate(timeout=seconds + 8)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(5)
    got = _json(out, "nettool sink")
    return {"value": float(got["rate"]), "received": got["count"], "sent_rate": sent["rate"]}


def _ab_argv(mode: str, sides: tuple[BenchLab, BenchLab], family: int, *rest: str) -> list[str]:
    """nettool's two-namespace `mode` (udpab, rrab): each side's peer namespace (where the
    client makes its socket) and host address, then `rest` (port, seconds, ...)."""
    from streamer.lab.netns import netns_path

    argv = [str(nettool()), mode]
    for s in sides:
        argv += [str(netns_path(s.lab.peer_ns)), s.addr("host", family)]
    return argv + list(rest)


def run_udp_pair(lab: BenchLab, twin: BenchLab, family: int, seconds: float, twin_first: bool
                 ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The UDP flood into `lab` and `twin` in turn (`UDP_SLICE_MS` each, `seconds` each in
    all; one sender on the sender CPU, each lab's sink on the receiver CPU): the result of
    `run_udp` for each, "value" = datagrams its sink got / seconds the sender spent on it."""
    tool = str(nettool())
    sides = (twin, lab) if twin_first else (lab, twin)
    sinks = [s.popen("host", [tool, "sink", "::", str(UDP_PORT), f"{2 * seconds + 3:g}"],
                     2 * seconds + 6) for s in sides]  # fmt: skip
    try:
        for sink in sinks:
            _ready(sink, "the UDP sink")
        argv = _ab_argv(
            "udpab",
            sides,
            family,
            str(UDP_PORT),
            f"{2 * seconds:g}",
            str(UDP_PAYLOAD),
            str(UDP_SLICE_MS),
        )
        sent = _json(lab.run("peer", argv, 2 * seconds + 10), "nettool udpab")
        outs = [sink.communicate(timeout=2 * seconds + 8)[0] for sink in sinks]
    finally:
        for sink in sinks:
            if sink.poll() is None:
                sink.kill()
                sink.wait(5)
    res = []
    for k, out in zip("ab", outs, strict=True):
        got, snd = _json(out, "nettool sink"), sent[k]
        res.append({"value": got["count"] / max(snd["seconds"], 1e-9), "received": got["count"],
                    "sent_rate": snd["rate"]})  # fmt: skip
    return (res[1], res[0]) if twin_first else (res[0], res[1])


def _rr_result(out: dict[str, Any]) -> dict[str, Any]:
    """A TCP_RR result of nettool: {"value": p99 µs, "p50_us", "p99_us", "rate"}."""
    if out["count"] == 0:
        raise BenchError("TCP_RR: no transaction completed")
    return {"value": out["p99_us"], "p50_us": out["p50_us"], "p99_us": out["p99_us"],
            "rate": out["rate"]}  # fmt: skip


def run_rr(lab: BenchLab, family: int, seconds: float) -> dict[str, Any]:
    """TCP_RR: {"value": p99 µs, "p50_us", "p99_us", "rate": transactions/s}."""
    out = _json(
        lab.run(
            "peer",
            [str(nettool()), "rr", lab.addr("host", family), str(ECHO_PORT), f"{seconds:g}", "1"],
            seconds + 10,
        ),
        "nettool rr",
    )
    return _rr_result(out)


def run_rr_pair(lab: BenchLab, twin: BenchLab, family: int, seconds: float, twin_first: bool
                ) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """TCP_RR into `lab` and `twin` from one client, transactions alternating between them
    (`seconds` each in all; each lab's echo server must be running): the result of `run_rr`
    for each. A stall of the machine (what sets this workload's p99 here) lands in both."""
    sides = (twin, lab) if twin_first else (lab, twin)
    argv = _ab_argv("rrab", sides, family, str(ECHO_PORT), f"{2 * seconds:g}", "1")
    out = _json(lab.run("peer", argv, 2 * seconds + 10), "nettool rrab")
    a, b = _rr_result(out["a"]), _rr_result(out["b"])
    return (b, a) if twin_first else (a, b)


def run_crr(lab: BenchLab, family: int, seconds: float) -> dict[str, Any]:
    """TCP_CRR: {"value": connections/s, "errors": failed connections, "p99_us"}."""
    out = _json(
        lab.run(
            "peer",
            [str(nettool()), "crr", lab.addr("host", family), str(ECHO_PORT), f"{seconds:g}"],
            seconds + 10,
        ),
        "nettool crr",
    )
    return {"value": out["rate"], "errors": out["errors"], "p99_us": out["p99_us"]}


RUNNERS: dict[str, Callable[[BenchLab, int, float], dict[str, Any]]] = {
    "tcp": run_tcp,
    "udp": run_udp,
    "rr": run_rr,
    "crr": run_crr,
}
# Workloads run in both labs at once by one client, interleaved (the others: back to back).
PAIRED: dict[
    str, Callable[[BenchLab, BenchLab, int, float, bool], tuple[dict[str, Any], dict[str, Any]]]
] = {
    "udp": run_udp_pair,
    "rr": run_rr_pair,
}
UNITS = {"tcp": "Gbit/s", "udp": "pkt/s", "rr": "µs p99", "crr": "conn/s"}
HIGHER_IS_BETTER = {"tcp": True, "udp": True, "rr": False, "crr": True}
