"""Helpers for real-traffic tests: commands, echo servers and probes inside a netns.

Import as `from support.netutil import ...` (tests/ is on sys.path under pytest). Every probe
is bounded by its `timeout` (default 1 s) and returns a bool instead of raising, so a
test reads `assert tcp_connect(...)` / `assert not tcp_connect(...)`.

Sockets are created inside the target namespace by switching only the calling thread
there for the instant of `socket()` (see `streamer.lab.netns.netns_socket`), so probes cost
microseconds, not a process spawn. Servers run as a thread of the test process; they
are ready when the constructor returns and must be stopped (they are context managers).
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from types import TracebackType

from streamer.lab.lab import Lab
from streamer.lab.netns import LabError, netns_socket
from streamer.lab.probes import EchoServer, ping, tcp_exchange, udp_exchange

__all__ = [
    "EchoServer",
    "Lab",
    "LabError",
    "TcpConn",
    "echo_server",
    "link_mac",
    "netns_socket",
    "ns_popen",
    "ns_run",
    "ping",
    "receive_all",
    "send_frames",
    "tcp_connect",
    "tcp_echo_server",
    "tcp_exchange",
    "udp_echo_server",
    "udp_exchange",
    "wait_until",
]


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _sockaddr(addr: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    return (addr, port, 0, 0) if ":" in addr else (addr, port)


def ns_run(ns: str | None, *cmd: str, timeout: float = 10.0, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cmd` inside named netns `ns` (None: here); text output captured.

    Raises subprocess.CalledProcessError (with stderr in the message) when `check` and
    the command fails, subprocess.TimeoutExpired after `timeout` s (the child is killed).
    """
    argv = ["ip", "netns", "exec", ns, *cmd] if ns is not None else list(cmd)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout,
                                            f"{proc.stderr.strip()} (in netns {ns})")
    return proc


def ns_popen(ns: str | None, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start `cmd` in named netns `ns` in the background; the caller must stop it.

    `Lab.destroy()` also kills anything still running inside the lab's namespaces.
    """
    argv = ["ip", "netns", "exec", ns, *cmd] if ns is not None else list(cmd)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(argv, **kwargs)  # type: ignore[call-overload, no-any-return]


def echo_server(ns: str | None, tcp_ports: Sequence[int] = (), udp_ports: Sequence[int] = (),
                bind: str = "::") -> EchoServer:
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
            raise ConnectionError(f"cannot connect from netns {ns} to {addr} port {port}: "
                                  f"{e}") from e

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
                    self._buf = self._buf[pos + len(line):]
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

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
               interval: float = 0.05) -> bool:
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
