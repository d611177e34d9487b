"""Demo traffic through a lab: what `microseg lab traffic` sends and reports.

In: a `Lab`, how long, how many rounds, how often and how patiently. Out: echo servers on
the demo ports (TCP 22, 80, 443, 5432 and UDP 53) in the lab's host namespace, one round of
probes from the peer namespace per interval (each port and a ping, over IPv4 and IPv6), a
line per attempt ending in "ok" or "blocked", and the totals. Nothing is kept between runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from streamer.lab.lab import Lab
from streamer.lab.probes import EchoServer, ping, tcp_exchange, udp_exchange

DEMO_TCP_PORTS = (22, 80, 443, 5432)
DEMO_UDP_PORTS = (53,)


@dataclass(frozen=True)
class _Attempt:
    kind: str  # tcp / udp / ping
    dst: str
    port: int

    def label(self, src: str) -> str:
        dst = f"[{self.dst}]" if ":" in self.dst else self.dst
        where = f"{dst}:{self.port}" if self.kind != "ping" else dst
        return f"{self.kind:<4} {src} -> {where}"


def run_traffic(
    lab: Lab,
    *,
    duration: float,
    count: int = 0,
    interval: float = 2.0,
    timeout: float = 1.0,
    out: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Serve the demo ports in `lab.host_ns` and probe them from `lab.peer_ns`.

    Rounds run every `interval` s until `duration` s pass, `count` rounds are done
    (0: no round limit) or `stop` is set. Each attempt is reported via `out` as one
    line ending in "ok" or "blocked". Returns {"ok": n, "blocked": m}.
    """
    stop = stop or threading.Event()
    attempts: list[tuple[_Attempt, str]] = []
    for src, dst in ((lab.peer_v4, lab.host_v4), (lab.peer_v6, lab.host_v6)):
        attempts += [(_Attempt("tcp", dst, p), src) for p in DEMO_TCP_PORTS]
        attempts += [(_Attempt("udp", dst, p), src) for p in DEMO_UDP_PORTS]
        attempts.append((_Attempt("ping", dst, 0), src))

    def probe(a: _Attempt) -> bool:
        if a.kind == "tcp":
            return tcp_exchange(lab.peer_ns, a.dst, a.port, timeout)
        if a.kind == "udp":
            return udp_exchange(lab.peer_ns, a.dst, a.port, timeout)
        return ping(lab.peer_ns, a.dst, timeout)

    totals = {"ok": 0, "blocked": 0}
    end = time.monotonic() + duration
    rounds = 0
    with (
        EchoServer(lab.host_ns, DEMO_TCP_PORTS, DEMO_UDP_PORTS),
        ThreadPoolExecutor(max_workers=len(attempts)) as pool,
    ):
        while not stop.is_set() and time.monotonic() < end and (count == 0 or rounds < count):
            started = time.monotonic()
            rounds += 1
            results = list(pool.map(probe, [a for a, _ in attempts]))
            stamp = time.strftime("%H:%M:%S")
            for (a, src), ok in zip(attempts, results, strict=True):
                verdict = "ok" if ok else "blocked"
                totals[verdict] += 1
                out(f"{stamp} round {rounds:<4} {a.label(src):<52} {verdict}")
            if count and rounds >= count:
                break
            stop.wait(
                max(0.0, min(interval - (time.monotonic() - started), end - time.monotonic()))
            )
    return totals
