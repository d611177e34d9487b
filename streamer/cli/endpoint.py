"""Where the agent's admin API is: the `--api` address of the API clients.

In: the text of `--api` (`host:port`, `[v6]:port`, `host`, `http(s)://host[:port][/prefix]` or
`unix:/path`). Out: an `Endpoint` (base URL without /api/v1, the Unix socket path if any, the
text as written for messages), or argparse.ArgumentTypeError saying what is wrong. Queries,
fragments and schemes other than http(s) are refused, not dropped.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from typing import Final

from yarl import URL

__all__ = ["API_PREFIX", "DEFAULT_API", "DEFAULT_PORT", "Endpoint", "parse_api_address"]

DEFAULT_API: Final = "127.0.0.1:8080"
DEFAULT_PORT: Final = 8080
API_PREFIX: Final = "/api/v1"


@dataclass(frozen=True)
class Endpoint:
    """Where the API is: `base_url` (no /api/v1), `unix_path` for a Unix socket, `display` as
    the user wrote it (for messages)."""

    base_url: URL
    unix_path: str | None
    display: str


def parse_api_address(value: str) -> Endpoint:
    """`--api` value -> Endpoint. Accepts `host:port`, `[v6]:port`, `host` (port 8080),
    `http(s)://host[:port][/prefix]` and `unix:/path`. Raises argparse.ArgumentTypeError."""
    text = value.strip()
    if not text:
        raise argparse.ArgumentTypeError(
            "empty address: use HOST:PORT, http://HOST:PORT or unix:/PATH"
        )
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):  # unix:///run/x.sock
            path = path[2:]
        if not path.startswith("/"):
            raise argparse.ArgumentTypeError(
                f"{value!r}: a Unix socket needs an absolute path, e.g. unix:/run/microseg.sock"
            )
        # Host "localhost" is what the agent accepts on its socket (DNS-rebinding check).
        return Endpoint(URL("http://localhost"), path, text)
    if "://" in text:
        try:
            url = URL(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{value!r} is not a URL: {e}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise argparse.ArgumentTypeError(
                f"{value!r}: only http:// and https:// URLs with a host are supported"
            )
        if url.query_string or url.fragment:
            raise argparse.ArgumentTypeError(f"{value!r}: no query or fragment, please")
        path = url.path.rstrip("/")
        if path.endswith(API_PREFIX):
            path = path[: -len(API_PREFIX)]
        try:
            port = url.port
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: the port is not 1..65535") from None
        base = URL.build(scheme=url.scheme, host=url.host, port=port, path=path)
        return Endpoint(base, None, text)
    host, port = _split_host_port(text, value)
    return Endpoint(URL.build(scheme="http", host=host, port=port), None, text)


def _split_host_port(text: str, original: str) -> tuple[str, int]:
    hint = "use HOST:PORT, [IPv6]:PORT, http://HOST:PORT or unix:/PATH"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"{original!r} is not an address: {hint}")
        port_text = rest[1:] if rest else ""
    else:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            host, _, port_text = text.partition(":")
        else:
            host, port_text = text, ""
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise argparse.ArgumentTypeError(f"{original!r} is not an address: {hint}")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{original!r}: the port must be 1..65535")
    return host, int(port_text)
