"""Rules and fixtures of the unit tests: pure logic, run as any user, with no BPF, no network
namespace, no Kafka broker and no agent process (`pytest tests/unit` takes seconds).

The suite's root check (tests/conftest.py) does not apply here: `_environment_ok` is replaced
by a check that a unit test asks for no fixture that needs root (such a test belongs outside
tests/unit/). Skips still count as failures. No unit test sees the caller's MICROSEG_TOKEN.

The client tests' fixtures: `stub` serves the stub admin API of support/stubapi.py, `state_dir`
holds its token, `run(*argv)` runs a `microseg` command in-process and `cli(*argv)` runs one
against the stub.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.stubapi import TOKEN, Cli, Result, ServerThread, Stub

from streamer.cli.connection import TOKEN_ENV
from streamer.cli.main import build_parser

# Fixtures of tests/conftest.py that need root (network namespaces, BPF, an agent, Kafka).
_NEEDS_ROOT = frozenset(
    {
        "lab",
        "module_lab",
        "datapath",
        "datapath_events",
        "verdict",
        "dp",
        "agent_factory",
        "kafka_broker",
        "make_api",
        "api",
    }
)


@pytest.fixture(autouse=True)
def _environment_ok(request: pytest.FixtureRequest) -> None:
    """Replaces the suite's root check here: a unit test may use nothing that needs root."""
    wanted = sorted(_NEEDS_ROOT.intersection(request.fixturenames))
    if wanted:
        pytest.fail(
            f"{request.node.nodeid} is in tests/unit/ but uses {', '.join(wanted)} "
            "(root only): move it out of tests/unit/",
            pytrace=False,
        )


# ---- the client against the stub admin API ---------------------------------------------------


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[Stub]:
    the_stub = Stub()
    server = ServerThread(the_stub, tmp_path / "api.sock")
    try:
        server.start()
        yield the_stub
    finally:
        server.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    (d / "api-token").write_text(TOKEN + "\n")
    (d / "api-token").chmod(0o600)
    return d


@pytest.fixture(autouse=True)
def _no_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Cli:
    """run(*argv) -> (exit status, stdout, stderr); argparse exits become the status."""

    def go(*argv: str) -> Result:
        parser = build_parser()
        try:
            args = parser.parse_args(list(argv))
            rc = args.func(args)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return rc, out, err

    return go


@pytest.fixture
def cli(run: Cli, stub: Stub, state_dir: Path) -> Cli:
    """run() with --api and --state-dir pointing at the stub."""

    def go(*argv: str) -> Result:
        return run(*argv, "--api", f"127.0.0.1:{stub.tcp_port}", "--state-dir", str(state_dir))

    return go
