"""Helpers for real-traffic tests: commands, echo servers and probes inside a netns.

Import as `from support.netutil import ...` (tests/ is on sys.path under pytest). Every probe
is bounded by its `timeout` (default 1 s) and returns a bool instead of raising, so a
test reads `assert tcp_connect(...)` / `assert not tcp_connect(...)`.

Sockets are created inside the target namespace by switching only the calling thread
there for the instant of `socket()` (see `streamer.lab.netns.netns_socket`), so probes cost
microseconds, not a process spawn. Servers run as a thread of the test process; they
are ready when the constructor returns and must be stopped (they are context managers).

From the lab's peer to its host: `host`/`peer` are a lab end's address in a family (FAMILIES),
`tcp_attempt`, `syn` and `udp_to` the probes the agent tests send, `reach`/`expect_ports`
the ports that pass in both families; a probe that must fail waits NEG_TIMEOUT.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from streamer.lab.lab import Lab
from streamer.lab.netns import LabError, netns_socket
from streamer.lab.probes import EchoServer, ping, tcp_exchange, udp_exchange

__all__ = [
    "FAMILIES",
    "NEG_TIMEOUT",
    "POS_TIMEOUT",
    "EchoServer",
    "Lab",
    "LabError",
    "TcpConn",
    "echo_server",
    "expect_ports",
    "host",
    "link_mac",
    "netns_socket",
    "ns_popen",
    "ns_run",
    "peer",
    "ping",
    "reach",
    "receive_all",
    "send_frames",
    "syn",
    "tcp_attempt",
    "tcp_connect",
    "tcp_echo_server",
    "tcp_exchange",
    "udp_echo_server",
    "udp_exchange",
    "udp_to",
    "wait_until",
]


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _sockaddr(addr: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    return (addr, port, 0, 0) if ":" in addr else (addr, port)


def ns_run(
    ns: str | None, *cmd: str, timeout: float = 10.0, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` inside named netns `ns` (None: here); text output captured.

    Raises subprocess.CalledProcessError (with stderr in the message) when `check` and
    the command fails, subprocess.TimeoutExpired after `timeout` s (the child is killed).
    """
    argv = ["ip", "netns", "exec", ns, *cmd] if ns is not None else list(cmd)
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(
            proc.returncode, argv, proc.stdout, f"{proc.stderr.strip()} (in netns {ns})"
        )
    return proc


def ns_popen(ns: str | None, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start `cmd` in named netns `ns` in the background; the caller must stop it.

    `Lab.destroy()` also kills anything still running inside the lab's namespaces.
    """
    argv = ["ip", "netns", "exec", ns, *cmd] if ns is not None else list(cmd)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload, no-any-return]


def echo_server(
    ns: str | None, tcp_ports: Sequence[int] = (), udp_ports: Sequence[int] = (), bind: str = "::"
) -> EchoServer:
    """A started echo server in `ns` (dual-stack on "::" by default); port 0 = any free."""
    return EchoServer(ns, tcp_ports, udp_ports, bind).start()


def tcp_echo_server(ns: str | None, port: int = 0, bind: str = "::") -> EchoServer:
    """A started TCP echo server in `ns`; its port is `.port`."""
    return echo_server(ns, tcp_ports=[port], bind=bind)


def udp_echo_server(ns: str | None, port: int = 0, bind: str = "::") -> EchoServer:
    """A started UDP echo server in `ns`; its port is `.port`."""
    return echo_server(ns, udp_ports=[port], bind=bind)


def tcp_connect(ns: str | None, addr: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP handshake from `ns` to addr:port completes within `timeout` s.

    Only the handshake is tested; use `tcp_exchange` to also require data to flow.
    """
    try:
        with netns_socket(ns, _family(addr), socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(_sockaddr(addr, port))
            return True
    except OSError:
        return False


# ---- from the lab's peer to its host ---------------------------------------------------------

FAMILIES = ("v4", "v6")
NEG_TIMEOUT = 0.6  # how long a blocked probe waits: replies on a veth take microseconds
POS_TIMEOUT = 2.0  # how long a probe that must pass may take


def host(lab: Lab, fam: str) -> str:
    """The lab host end's address in family `fam` ("v4" or "v6")."""
    return lab.host_v4 if fam == "v4" else lab.host_v6


def peer(lab: Lab, fam: str) -> str:
    """The lab peer end's address in family `fam` ("v4" or "v6")."""
    return lab.peer_v4 if fam == "v4" else lab.peer_v6


def tcp_attempt(ns: str, dst: str, port: int, timeout: float) -> tuple[bool, int]:
    """Connect from `ns` to dst:port and exchange one line: (it worked, our source port)."""
    v6 = ":" in dst
    with netns_socket(ns, socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("::", 0) if v6 else ("0.0.0.0", 0))
        sport: int = s.getsockname()[1]
        s.settimeout(timeout)
        try:
            s.connect((dst, port, 0, 0) if v6 else (dst, port))
            s.sendall(b"hello\n")
            return s.recv(64) == b"hello\n", sport
        except OSError:
            return False, sport


def syn(lab: Lab, fam: str, port: int) -> int:
    """One TCP connection attempt from the peer to the host's `port`; our source port. The
    socket is closed at once (the SYN is out; a denied one gets no answer anyway)."""
    af = socket.AF_INET if fam == "v4" else socket.AF_INET6
    with netns_socket(lab.peer_ns, af, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        s.bind(("0.0.0.0", 0) if fam == "v4" else ("::", 0))
        sport: int = s.getsockname()[1]
        s.connect_ex((host(lab, fam), port))
        time.sleep(0.02)
        return sport


def udp_to(lab: Lab, fam: str, ports: Iterable[int], pace: int = 0) -> None:
    """One datagram from the peer to each of the host's `ports` (each a new flow); `pace`:
    sleep 0.1 s after every `pace` datagrams."""
    af = socket.AF_INET if fam == "v4" else socket.AF_INET6
    with netns_socket(lab.peer_ns, af, socket.SOCK_DGRAM) as s:
        for i, port in enumerate(ports):
            s.sendto(b"x", (host(lab, fam), port))
            if pace and i % pace == pace - 1:
                time.sleep(0.1)


def reach(
    lab: Lab, ports: Iterable[int], timeout: float = NEG_TIMEOUT
) -> dict[tuple[str, int], bool]:
    """Connect + echo from the peer to the host on each port, both families, concurrently."""
    todo = [(fam, port) for port in ports for fam in FAMILIES]
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as ex:
        got = ex.map(lambda fp: tcp_exchange(lab.peer_ns, host(lab, fp[0]), fp[1], timeout), todo)
        return dict(zip(todo, got, strict=True))


def expect_ports(lab: Lab, want: Mapping[int, bool], what: str) -> None:
    """Every port in `want` passes (True) or is blocked (False), in both families."""
    got = reach(lab, want)
    wrong = [
        f"  {fam} port {port}: expected {'pass' if want[port] else 'blocked'}"
        for (fam, port), ok in got.items()
        if ok != want[port]
    ]
    assert not wrong, f"{what}: traffic not as the policy says:\n" + "\n".join(wrong)


# ---- a live connection, waiting, raw frames --------------------------------------------------


class TcpConn:
    """A long-lived TCP connection from `ns` to an echo server at addr:port.

    `exchange()` sends one unique line and waits for its echo: True if it came back in
    time. Use it to show that a policy change cuts (or spares) an established flow.
    Lines echoed late (after a failed exchange) are skipped, never mistaken for new ones.
    The constructor raises ConnectionError if the connection cannot be opened.
    """

    def __init__(self, ns: str | None, addr: str, port: int, timeout: float = 1.0) -> None:
        self.ns, self.addr, self.port, self.timeout = ns, addr, port, timeout
        self.sock = netns_socket(ns, _family(addr), socket.SOCK_STREAM)
        self.broken = False
        self._buf = b""
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(_sockaddr(addr, port))
        except OSError as e:
            self.sock.close()
            raise ConnectionError(
                f"cannot connect from netns {ns} to {addr} port {port}: {e}"
            ) from e

    def exchange(self, timeout: float | None = None) -> bool:
        """Send a fresh line and wait (default: the constructor's timeout) for its echo."""
        if self.broken:
            return False
        line = secrets.token_hex(8).encode() + b"\n"
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.sock.sendall(line)
            while True:
                pos = self._buf.find(line)
                if pos >= 0:
                    self._buf = self._buf[pos + len(line) :]
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.broken = True  # the server closed: nothing more will come
                    return False
                self._buf += chunk
        except TimeoutError:
            return False
        except OSError:
            self.broken = True  # reset or similar: the connection is gone for good
            return False

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self.sock.close()

    def __enter__(self) -> TcpConn:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll `predicate` until it returns True (-> True) or `timeout` s pass (-> False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def link_mac(ns: str | None, ifname: str) -> bytes:
    """The hardware address of `ifname` in netns `ns`."""
    out = ns_run(ns, "ip", "-j", "link", "show", "dev", ifname).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def send_frames(ns: str | None, ifname: str, frames: Sequence[bytes]) -> None:
    """Put whole Ethernet frames on the wire of `ifname` in netns `ns`, in order."""
    with netns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        for frame in frames:
            s.send(frame)


def receive_all(sock: socket.socket, quiet: float) -> list[bytes]:
    """Every datagram `sock` receives until none has come for `quiet` seconds."""
    sock.settimeout(quiet)
    out = []
    try:
        while len(out) < 1000:
            out.append(sock.recv(65535))
    except TimeoutError:
        pass
    return out


class DeniedHammer(threading.Thread):
    """Sends a UDP datagram (a new flow each time) to a denied port every ~20 ms, for at most
    `limit` seconds or until stopped; counts attempts and echoes."""

    def __init__(self, ns: str, targets: list[str], port: int, limit: float = 30.0) -> None:
        super().__init__(name="denied-hammer", daemon=True)
        self.ns, self.targets, self.port, self.limit = ns, targets, port, limit
        self.halt = threading.Event()
        self.attempts = 0
        self.echoes: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.halt.is_set() and time.monotonic() < deadline:
            for dst in self.targets:
                self.attempts += 1
                if udp_exchange(self.ns, dst, self.port, timeout=0.02):
                    self.echoes.append(f"{dst} at {time.monotonic():.3f}")

    def finish(self) -> None:
        self.halt.set()
        self.join(5.0)
