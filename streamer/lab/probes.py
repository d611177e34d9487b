"""Echo servers and probes inside network namespaces: does this traffic get through?

In: a namespace name (None: our own), addresses and ports. Out: `EchoServer`, which echoes
TCP streams and UDP datagrams from one thread, and the probes `tcp_exchange`,
`udp_exchange` and `ping`, each bounded by its timeout and answering True (the echo came
back) or False (anything else: refused, reset, dropped, timed out) instead of raising.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from types import TracebackType

from streamer.lab.netns import netns_socket


def _family(addr: str) -> int:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"not an IP address: {addr!r}") from None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _sockaddr(addr: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    return (addr, port, 0, 0) if _family(addr) == socket.AF_INET6 else (addr, port)


class EchoServer:
    """Echo TCP streams and UDP datagrams on ports inside netns `ns`, from one thread.

    Binds `bind` (default "::", dual-stack: IPv4 and IPv6) on each of `tcp_ports` and
    `udp_ports`; port 0 picks a free one (see `.tcp_ports` / `.udp_ports` after start).
    Everything is bound before `start()` returns, so it is ready at once. Counters:
    `tcp_accepted`, `udp_datagrams`. A peer that stops reading gets at most ~1 MiB
    buffered; beyond that we stop reading from it.
    """

    _MAX_PENDING = 1 << 20

    def __init__(
        self,
        ns: str | None,
        tcp_ports: Sequence[int] = (),
        udp_ports: Sequence[int] = (),
        bind: str = "::",
    ) -> None:
        self.ns = ns
        self.bind = bind
        self._want_tcp = list(tcp_ports)
        self._want_udp = list(udp_ports)
        self.tcp_ports: list[int] = []
        self.udp_ports: list[int] = []
        self.tcp_accepted = 0
        self.udp_datagrams = 0
        self._sel = selectors.DefaultSelector()
        self._socks: list[socket.socket] = []
        self._conns: dict[socket.socket, bytearray] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def port(self) -> int:
        """The first TCP port, else the first UDP port."""
        return (self.tcp_ports or self.udp_ports)[0]

    def _listen(self, type_: int, port: int) -> socket.socket:
        fam = _family(self.bind)
        s = netns_socket(self.ns, fam, type_)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6 and self.bind == "::":
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(_sockaddr(self.bind, port))
            if type_ == socket.SOCK_STREAM:
                s.listen(128)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self._socks.append(s)
        return s

    def start(self) -> EchoServer:
        """Bind everything and start serving; OSError (all closed again) if a bind fails."""
        try:
            for port in self._want_tcp:
                s = self._listen(socket.SOCK_STREAM, port)
                self.tcp_ports.append(s.getsockname()[1])
                self._sel.register(s, selectors.EVENT_READ, "accept")
            for port in self._want_udp:
                s = self._listen(socket.SOCK_DGRAM, port)
                self.udp_ports.append(s.getsockname()[1])
                self._sel.register(s, selectors.EVENT_READ, "udp")
        except BaseException:
            self.stop()
            raise
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._serve, name=f"echo-{self.ns}", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        while not self._stopping:
            for key, events in self._sel.select(timeout=1.0):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    self._handle(sock, key.data, events)
                except OSError:
                    if key.data == "conn":
                        self._drop(sock)

    def _handle(self, sock: socket.socket, kind: str, events: int) -> None:
        if kind == "wake":
            return
        if kind == "accept":
            conn, _ = sock.accept()
            conn.setblocking(False)
            self.tcp_accepted += 1
            self._conns[conn] = bytearray()
            self._sel.register(conn, selectors.EVENT_READ, "conn")
        elif kind == "udp":
            data, peer = sock.recvfrom(65535)
            self.udp_datagrams += 1
            with contextlib.suppress(OSError):
                sock.sendto(data, peer)
        else:
            pending = self._conns[sock]
            if events & selectors.EVENT_READ:
                data = sock.recv(65536)
                if not data:
                    self._drop(sock)
                    return
                pending += data
            if pending:
                sent = sock.send(pending)
                del pending[:sent]
            mask = selectors.EVENT_WRITE if pending else 0
            if len(pending) < self._MAX_PENDING:
                mask |= selectors.EVENT_READ
            self._sel.modify(sock, mask, "conn")

    def _drop(self, sock: socket.socket) -> None:
        self._conns.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()

    def stop(self) -> None:
        """Stop serving and close every socket (live connections are reset). Idempotent."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        for conn in list(self._conns):
            self._drop(conn)
        for s in self._socks:
            s.close()
        self._socks.clear()
        with contextlib.suppress(OSError):
            self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> EchoServer:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _token() -> bytes:
    return secrets.token_hex(8).encode()


def tcp_exchange(ns: str | None, addr: str, port: int, timeout: float = 1.0) -> bool:
    """Connect from netns `ns` to addr:port, send a line, get it echoed; False on any failure.

    The whole attempt (connect + echo) is bounded by `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        with netns_socket(ns, _family(addr), socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(_sockaddr(addr, port))
            line = _token() + b"\n"
            s.sendall(line)
            buf = b""
            while line not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                chunk = s.recv(4096)
                if not chunk:
                    return False
                buf += chunk
            return True
    except OSError:
        return False


def udp_exchange(ns: str | None, addr: str, port: int, timeout: float = 1.0) -> bool:
    """Send one datagram from netns `ns` to addr:port and wait `timeout` s for its echo."""
    deadline = time.monotonic() + timeout
    try:
        with netns_socket(ns, _family(addr), socket.SOCK_DGRAM) as s:
            # connect() so an ICMP port-unreachable fails fast instead of timing out.
            s.connect(_sockaddr(addr, port))
            token = _token()
            s.send(token)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                if s.recv(65535) == token:
                    return True
    except OSError:
        return False


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(ns: str | None, addr: str, timeout: float = 1.0) -> bool:
    """One ICMP/ICMPv6 echo from netns `ns` to `addr`; True if the reply came in `timeout` s.

    Uses a raw socket (we run as root), so no `ping` binary is needed; replies are
    matched on identifier, sequence and payload, so concurrent pings don't mix.
    """
    fam = _family(addr)
    v6 = fam == socket.AF_INET6
    ident, seq = secrets.randbelow(0x10000), secrets.randbelow(0x10000)
    payload = _token()
    req_type, rep_type = (128, 129) if v6 else (8, 0)
    header = struct.pack("!BBHHH", req_type, 0, 0, ident, seq)
    # The kernel fills in the ICMPv6 checksum (it needs the pseudo-header); IPv4 is ours.
    csum = 0 if v6 else _inet_checksum(header + payload)
    packet = struct.pack("!BBHHH", req_type, 0, csum, ident, seq) + payload
    want_src = ipaddress.ip_address(addr)
    deadline = time.monotonic() + timeout
    try:
        proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
        with netns_socket(ns, fam, socket.SOCK_RAW, proto) as s:
            s.sendto(packet, _sockaddr(addr, 0))
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                s.settimeout(left)
                data, src = s.recvfrom(65535)
                icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
                if len(icmp) < 8 or icmp[0] != rep_type:
                    continue
                if struct.unpack("!HH", icmp[4:8]) != (ident, seq) or icmp[8:] != payload:
                    continue
                if ipaddress.ip_address(src[0].split("%")[0]) == want_src:
                    return True
    except OSError:
        return False
