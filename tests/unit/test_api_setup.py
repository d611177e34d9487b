"""The admin API's set-up (streamer/api/app.py), no server: `--api` listen addresses, and the
token file (created 0600, refused when readable by others, empty or not a regular file)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from streamer.api.context import ApiSetupError
from streamer.api.listen import ListenAddress, parse_listen
from streamer.api.tokens import load_or_create_token


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ListenAddress(host="127.0.0.1", port=8080)
    assert parse_listen("[::1]:8080") == ListenAddress(host="::1", port=8080)
    assert parse_listen("localhost:0") == ListenAddress(host="localhost", port=0)
    assert parse_listen("unix:/run/x.sock") == ListenAddress(path=Path("/run/x.sock"))
    assert str(parse_listen("[::1]:80")) == "[::1]:80"
    for bad in (
        "8080",
        "::1:8080",
        "[::1]",
        "[nope]:80",
        "host:99999",
        "host:",
        ":80",
        "unix:",
        "host:http",
    ):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_token_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    token = load_or_create_token(state)
    path = state / "api-token"
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token
    assert load_or_create_token(state) == token
    os.chmod(path, 0o640)
    with pytest.raises(ApiSetupError, match="chmod 600"):
        load_or_create_token(state)
    os.chmod(path, 0o604)
    with pytest.raises(ApiSetupError, match="group or others"):
        load_or_create_token(state)
    os.chmod(path, 0o600)
    path.write_text("\n")
    with pytest.raises(ApiSetupError, match="empty"):
        load_or_create_token(state)
    path.unlink()
    (tmp_path / "elsewhere").write_text("abc")
    os.chmod(tmp_path / "elsewhere", 0o600)
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ApiSetupError, match="not a regular file"):
        load_or_create_token(state)
