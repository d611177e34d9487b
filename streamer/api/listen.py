"""What an `--api` value means: `HOST:PORT`, `[IPv6]:PORT` or `unix:/path`.

In: the text of one `--api` value. Out: a `ListenAddress` (`parse_listen`), or its host alone
(`host_of`, for `ApiContext.bind_hosts`). A value that is none of these is a ValueError saying
what is wrong; nothing is bound here (streamer/api/serve.py binds and serves).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamer.api.auth import is_ip

__all__ = ["ListenAddress", "host_of", "parse_listen"]


@dataclass(frozen=True)
class ListenAddress:
    """One `--api` value: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"


def host_of(listen: str) -> str | None:
    """The host of one `--api` value (for `ApiContext.bind_hosts`); None for a Unix socket
    or a value `parse_listen` rejects."""
    try:
        return parse_listen(listen).host
    except ValueError:
        return None


def parse_listen(value: str) -> ListenAddress:
    """Parse `HOST:PORT`, `[IPv6]:PORT` or `unix:/path`; ValueError says what is wrong."""
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ValueError(f"{value!r}: give the socket's path, e.g. unix:/run/microseg.sock")
        return ListenAddress(path=Path(path))
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not is_ip(host) or ":" not in host:
            raise ValueError(f"{value!r}: {host!r} in brackets is not an IPv6 address")
    elif ":" in host:
        raise ValueError(f"{value!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080) or unix:/path")
    return ListenAddress(host=host, port=int(port))
