"""Suite-wide rules and fixtures (the helpers they are built from are in tests/support/).

- The suite runs as root with bpffs at /sys/fs/bpf (real kernel, real traffic). If not,
  every test errors with the reason: nothing is skipped. Only tests/unit/ (pure logic) runs
  as any user: its conftest.py lifts that check there.
- Skips count as failures: a skipped test (or module) is reported as failed/error, in
  tests/unit/ too.
- `lab` (per test) and `module_lab` (per module) give a fresh `streamer.lab.lab.Lab` that is
  always destroyed afterwards, also when the test fails.
- `datapath` (per session) is one loaded classifier (unique pins, removed afterwards) for
  BPF_PROG_TEST_RUN; a test applies its own policy and clears sessions. `datapath_events`
  collects its ring-buffer records (`staged_datapath_events` those of `staged_datapath`, the
  classifier of `--policy-mode staged`); `verdict` runs one packet or frame through it; `dp` is
  `datapath` with its sessions cleared.
- `make_api` (per test) serves the admin API in-process over `dp` and a fresh PolicyStore
  (support/apiapp.py); `api` is one such app with the default token.
- `agent_factory` (per test) makes `microseg run` subprocesses; `kafka_broker` (per session)
  is one real Kafka broker.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from support.agentproc import AgentProcess
from support.apiapp import TOKEN, Api, Factory, make_store
from support.bpf import (
    EventSink,
    kernel_retval,
    loaded_datapath,
    remove_stale_test_pins,
    unique_instance,
)

from bench.kafkabroker import KafkaBroker
from streamer.api.app import make_app
from streamer.api.context import ApiContext
from streamer.datapath.config import DatapathConfig
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import TC_ACT_OK
from streamer.datapath.reference import Packet
from streamer.lab.lab import Lab


def _environment_problems() -> list[str]:
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("the test suite must run as root (network namespaces, eBPF)")
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        mounts = []
    if not any(m.split()[1:3] == ["/sys/fs/bpf", "bpf"] for m in mounts if len(m.split()) > 2):
        problems.append(
            "bpffs is not mounted at /sys/fs/bpf (run `make setup`, or "
            "`mount -t bpf bpf /sys/fs/bpf`)"
        )
    if shutil.which("ip") is None:
        problems.append("the `ip` command (iproute2) is missing (run `make setup`)")
    return problems


@pytest.fixture(scope="session", autouse=True)
def _environment_ok() -> None:
    problems = _environment_problems()
    if problems:
        pytest.fail("test environment not usable:\n  " + "\n  ".join(problems), pytrace=False)


_SKIP_IS_FAILURE = "skipped tests count as failures in this suite"


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"{_SKIP_IS_FAILURE}: {_skip_reason(report.longrepr)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{_SKIP_IS_FAILURE}: {_skip_reason(report.longrepr)}"
    return report


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab for one test, destroyed afterwards whatever happens."""
    with Lab.create() as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def module_lab() -> Iterator[Lab]:
    """A lab shared by the tests of one module, destroyed after the module."""
    with Lab.create() as the_lab:
        yield the_lab


# ---- the classifier through BPF_PROG_TEST_RUN --------------------------------------------


@pytest.fixture(scope="session")
def datapath() -> Iterator[Datapath]:
    """One loaded classifier for the session; its pins are removed afterwards. No failsafe
    entries: the tests judge rules (tests of failsafe traffic set their own, and put none
    back)."""
    remove_stale_test_pins()
    with loaded_datapath(
        DatapathConfig(instance=unique_instance("dp"), session_entries=65536, failsafe=())
    ) as dp:
        yield dp


@pytest.fixture(scope="session")
def staged_datapath() -> Iterator[Datapath]:
    """A second classifier for the session, as `--policy-mode staged` runs one (every rule
    staged, nothing dropped by a rule), with no failsafe entries."""
    with loaded_datapath(
        DatapathConfig(
            instance=unique_instance("staged"),
            session_entries=65536,
            failsafe=(),
            staged_all=True,
        )
    ) as dp:
        yield dp


@pytest.fixture(scope="session")
def datapath_events(datapath: Datapath) -> EventSink:
    """The event sink of `datapath` (a ring buffer can be opened once per datapath)."""
    return EventSink(datapath)


@pytest.fixture(scope="session")
def staged_datapath_events(staged_datapath: Datapath) -> EventSink:
    """The event sink of `staged_datapath`."""
    return EventSink(staged_datapath)


@pytest.fixture
def verdict() -> Callable[[Datapath, Packet | bytes, str | None], bool]:
    """verdict(dp, packet_or_frame, direction) -> True when the classifier passes it."""

    def run(dp: Datapath, pkt_or_frame: Packet | bytes, direction: str | None = None) -> bool:
        return kernel_retval(dp, pkt_or_frame, direction) == TC_ACT_OK

    return run


@pytest.fixture
def dp(datapath: Datapath) -> Datapath:
    """The session's classifier with no sessions left by earlier tests."""
    datapath.clear_sessions()
    return datapath


# ---- the admin API in-process, over the session's classifier -----------------------------


@pytest.fixture
async def make_api(dp: Datapath, tmp_path: Path) -> AsyncIterator[Factory]:
    """make_api(token=TOKEN, bind_hosts=(), datapath=dp, fail=None) -> a served Api."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(
        token: str | None = TOKEN,
        bind_hosts: tuple[str, ...] = (),
        datapath: Any = None,
        fail: list[bool] | None = None,
    ) -> Api:
        state_dir = tmp_path / f"state-{len(clients)}"
        store = make_store(dp, state_dir, fail)
        ctx = ApiContext(
            store=store,
            datapath=datapath if datapath is not None else dp,
            interfaces=["veth-test"],
            version="9.9.9",
            started_monotonic=time.monotonic(),
            token=token,
            bind_hosts=set(bind_hosts),
            registry=CollectorRegistry(),
        )
        client = TestClient(TestServer(make_app(ctx)))
        await client.start_server()
        clients.append(client)
        return Api(client, ctx, store, dp, state_dir)

    try:
        yield make
    finally:
        for c in clients:
            await c.close()


@pytest.fixture
async def api(make_api: Factory) -> Api:
    return await make_api()


# ---- the agent as a real process ----------------------------------------------------------


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """agent_factory(lab, policy_file, **AgentProcess kwargs) -> a new, not yet started
    `support.agentproc.AgentProcess` with its own instance and an events file in tmp_path.
    Every agent made is killed, detached and its pins removed after the test, whatever
    happened."""
    made: list[AgentProcess] = []

    def make(lab: Lab, policy_file: Path | None, **kwargs: Any) -> AgentProcess:
        kwargs.setdefault("events_file", tmp_path / f"events-{len(made)}.jsonl")
        agent = AgentProcess(lab, policy_file, **kwargs)
        made.append(agent)
        return agent

    try:
        yield make
    finally:
        for agent in reversed(made):
            agent.cleanup()


# ---- a real Kafka broker ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """One real Kafka broker (single-node KRaft, scripts/kafka.sh) on 127.0.0.1:<free port>
    for the whole session: a started `bench.kafkabroker.KafkaBroker`; `.bootstrap` is its
    address.

    Share it: use `bench.kafkabroker.unique_topic()` names. A test that takes it down uses
    `with kafka_broker.outage(): ...` (or stop() and start() in a finally), so it is up again
    for the next test. Destroyed (process and data) at the end of the session, whatever
    happened. The jars come from the cache `make setup` fills (if it is empty, the start
    fetches them first: minutes); a broker that cannot start fails the tests, never skips them.
    """
    broker = KafkaBroker()
    try:
        broker.start()
        yield broker
    finally:
        broker.destroy()
