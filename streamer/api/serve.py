"""Serving the admin API: binding every `--api` address and starting the application on them.

In: the `ApiContext` and the `--api` values. Out: a running `web.AppRunner` (`start_api`) serving
`make_app(ctx)` on TCP and Unix sockets. A Unix socket gets mode 0660 before anyone can connect;
a stale socket file is replaced, a live one or any other file is an `ApiSetupError`, as is an
address that cannot be served. No access log is kept: a sign-in link's code is in its query.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from pathlib import Path

from aiohttp import web

from streamer.api.app import make_app
from streamer.api.context import ApiContext, ApiSetupError
from streamer.api.listen import ListenAddress, parse_listen

__all__ = ["start_api"]

log = logging.getLogger("microseg.api")


def _unix_socket(path: Path) -> socket.socket:
    """A bound Unix socket at `path`, mode 0660 before anyone can connect; a stale socket
    file is replaced, a live one (another agent) or any other file is an error."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ApiSetupError(f"--api unix:{path}: the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ApiSetupError(f"--api unix:{path}: {e.strerror}") from e
            path.unlink(missing_ok=True)  # stale: nobody listens on it
        else:
            raise ApiSetupError(f"--api unix:{path}: another process is serving on it")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Before listen(): nobody can connect while the mode is still the umask's.
        os.chmod(path, 0o660)
    except OSError as e:
        sock.close()
        raise ApiSetupError(f"--api unix:{path}: {e.strerror}") from e
    return sock


async def start_api(ctx: ApiContext, listen: list[str]) -> web.AppRunner:
    """Serve `make_app(ctx)` on every `listen` address (see `parse_listen`).

    The TCP hosts are added to `ctx.bind_hosts`. Returns the runner; the caller awaits
    `runner.cleanup()` to stop (which also closes the Unix sockets; their files stay and are
    replaced at the next start). Raises ApiSetupError when an address cannot be served.
    """
    addresses: list[ListenAddress] = []
    for item in listen:
        try:
            addresses.append(parse_listen(item))
        except ValueError as e:
            raise ApiSetupError(f"--api {e}") from None
    ctx.bind_hosts.update(a.host.lower() for a in addresses if a.host is not None)
    runner = web.AppRunner(make_app(ctx), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        for address in addresses:
            site: web.BaseSite
            if address.path is not None:
                site = web.SockSite(runner, _unix_socket(address.path), shutdown_timeout=5)
            else:
                site = web.TCPSite(
                    runner, address.host, address.port, reuse_address=True, shutdown_timeout=5
                )
            try:
                await site.start()
            except OSError as e:
                raise ApiSetupError(f"--api {address}: {e.strerror or e}") from e
            log.debug("API listening on %s", address)
    except BaseException:
        await runner.cleanup()
        raise
    return runner
