"""Building and installing the package as a user would, for tests/test_wheel.py and
tests/test_install.py: a source tree without a checkout's local state (`NOT_SOURCE`), an
environment that cannot import the checkout (`clean_env`), `run_ok` (a command that must
succeed; its output in the assertion when it does not) and `scratch_dir` (a temporary
directory, always removed)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["NOT_SOURCE", "clean_env", "run_ok", "scratch_dir"]

# Local state of a checkout that a source tree handed to the build does not contain.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".state",
    ".setup.lock",
    "artifacts",
    "results.json",
    "*.log",
)


def clean_env() -> dict[str, str]:
    """Our environment without what would let a venv import this checkout's code."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run_ok(argv: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `argv` (no stdin, output captured); it must exit 0."""
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
        **kwargs,
    )
    assert proc.returncode == 0, (
        f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A new temporary directory, removed afterwards whatever happens."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
