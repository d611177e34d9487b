"""The API token file, `<state-dir>/api-token`: made at first start, refused when others can
read it.

In: the agent's state dir. Out: the bearer token the API requires (`load_or_create_token`). A
token file that is not a regular file, is empty, or is open to group or others is an
`ApiSetupError`, never silently replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from streamer.api.context import ApiSetupError

__all__ = ["TOKEN_FILE", "load_or_create_token"]

log = logging.getLogger("microseg.api")

TOKEN_FILE: Final = "api-token"


def load_or_create_token(state_dir: Path) -> str:
    """The API token in `<state_dir>/api-token`, created (mode 0600) at first start.

    Raises ApiSetupError when the file is readable or writable by group or others, is not a
    regular file, or is empty: the agent must not run with a token others can read.
    """
    path = state_dir / TOKEN_FILE
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as e:
        raise ApiSetupError(f"cannot create the API token {path}: {e.strerror}") from e
    token = secrets.token_urlsafe(32)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ApiSetupError(f"cannot write the API token {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    log.info("created the API token in %s", path)
    return token


def _read_token(path: Path) -> str:
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise ApiSetupError(f"the API token {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ApiSetupError(
                f"the API token {path} is accessible by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}` (and consider "
                "replacing the token: delete the file and restart the agent)"
            )
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ApiSetupError(f"cannot read the API token {path}: {e}") from e
    if not token:
        raise ApiSetupError(f"the API token {path} is empty: delete it to have a new one made")
    return token
