"""Suite-wide rules and fixtures.

- The suite runs as root with bpffs at /sys/fs/bpf (real kernel, real traffic). If not,
  every test errors with the reason: nothing is skipped.
- Skips count as failures: a skipped test (or module) is reported as failed/error.
- `lab` (per test) and `module_lab` (per module) give a fresh `streamer.lab.Lab` that is
  always destroyed afterwards, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from streamer.lab import Lab


def _environment_problems() -> list[str]:
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("the test suite must run as root (network namespaces, eBPF)")
    try:
        mounts = Path("/proc/self/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        mounts = []
    if not any(m.split()[1:3] == ["/sys/fs/bpf", "bpf"] for m in mounts if len(m.split()) > 2):
        problems.append("bpffs is not mounted at /sys/fs/bpf (run `make setup`, or "
                        "`mount -t bpf bpf /sys/fs/bpf`)")
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
