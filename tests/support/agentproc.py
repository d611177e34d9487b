"""`microseg run` as a real subprocess, for tests that drive the agent from outside.

Import as `from support.agentproc import AgentProcess, write_policy` (tests/ is on sys.path
under pytest). An AgentProcess is bound to one lab, one pin instance and one events file; it can be
started again after a stop or `kill9()` (same instance: the restart adopts the pinned state).
`cleanup()` (also the context manager's exit) always leaves nothing behind: the process is
killed, our filters are detached and the instance's pin and run directories are removed.

stderr (the agent's log) and stdout (stats lines, printed events) are read by threads into
line buffers, so waiting for a log line is a bounded poll, never a blocking read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from streamer.datapath.attach import detach
from streamer.datapath.config import DEFAULT_PIN_ROOT, DEFAULT_RUN_DIR
from streamer.lab.lab import Lab
from support import REPO

_counter = itertools.count(1)

STATS_RE = re.compile(r"^stats gen=(?P<gen>\d+) (?P<rest>.*)$")


def unique_agent_instance() -> str:
    """A pin-instance name unique to this test process and call: `ta<pid>x<n>`."""
    return f"ta{os.getpid()}x{next(_counter)}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (for `--api HOST:PORT`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def write_policy(path: Path, rules: Sequence[dict[str, Any]], default: str = "deny") -> Path:
    """Write a policy file (JSON) with `rules` and `default` to `path`; returns `path`.

    Written to a temporary name and renamed, so an agent reloading at the same moment
    never reads half a file.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"default_action": default, "policies": list(rules)}, indent=1))
    os.replace(tmp, path)
    return path


def rule(rule_id: int, protocol: str, action: str, **fields: Any) -> dict[str, Any]:
    """A rule document for `write_policy` (or the API), named `r<rule_id>`."""
    return {
        "rule_id": rule_id,
        "name": f"r{rule_id}",
        "protocol": protocol,
        "action": action,
        **fields,
    }


class AgentError(AssertionError):
    """The agent did not do what a test waited for; the message carries its log."""


class _LineReader:
    """Lines of one pipe, collected by a daemon thread; waiters poll with a bound."""

    def __init__(self, pipe: IO[bytes], name: str) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._read, args=(pipe,), name=name, daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        try:
            for raw in pipe:
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], start: int, timeout: float) -> str | None:
        """The first line at index >= `start` matching `pattern` within `timeout` s, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if pattern.search(line):
                        return line
                start = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return None
                self._cond.wait(min(left, 0.2))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class AgentProcess:
    """One `microseg run` instance against `lab`'s host-side interface.

    In: the lab, a policy file, an events file and optional extra flags. `start()` returns once
    the agent logs "enforcing on <iface>" (AgentError with the log if it exits or takes longer
    than `start_timeout`). Logs of earlier runs of the same object stay in `.previous_logs`.

    `command` is the `microseg` to run (default: this interpreter's `-m streamer`, the
    checkout's code); `cwd` (default: the repository) and `env` (default: ours) are its process's.
    `failsafe` is its --failsafe (default none; None: the agent's own default).
    `policy_file` None: no --policy-file (a fleet agent's policy comes from its topic).
    `side`: the lab end it attaches to, "host" (default) or "peer".
    """

    def __init__(
        self,
        lab: Lab,
        policy_file: Path | None,
        events_file: Path,
        *,
        instance: str | None = None,
        default_action: str | None = None,
        keep_on_exit: bool = False,
        stats_interval: float = 0.0,
        event_interval: float | None = None,
        failsafe: str | None = "none",
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        state_dir: Path | None = None,
        api: str | None = None,
        command: Sequence[str] = (sys.executable, "-m", "streamer"),
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        side: str = "host",
    ) -> None:
        assert side in ("host", "peer"), side
        self.lab = lab
        self.side = side
        self.policy_file = policy_file
        self.events_file = events_file
        self.instance = instance or unique_agent_instance()
        self.default_action = default_action
        self.keep_on_exit = keep_on_exit
        self.stats_interval = stats_interval
        self.event_interval = event_interval
        # Off unless a test asks: lab policies deny port 22 and DNS to show denials.
        self.failsafe = failsafe
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        # Each agent keeps its own applied set: restarts of this object restore from it.
        self.state_dir = state_dir or events_file.parent / f"state-{self.instance}"
        self.api = api
        self.command = list(command)
        self.cwd = cwd or REPO
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._err: _LineReader | None = None
        self._out: _LineReader | None = None
        self.previous_logs: list[str] = []

    @property
    def netns(self) -> str:
        return self.lab.host_ns if self.side == "host" else self.lab.peer_ns

    @property
    def iface(self) -> str:
        return self.lab.host_if if self.side == "host" else self.lab.peer_if

    # ---- the process -----------------------------------------------------------------------

    def argv(self) -> list[str]:
        argv = [
            *self.command,
            "run",
            "--netns",
            self.netns,
            "--iface",
            self.iface,
            *(["--policy-file", str(self.policy_file)] if self.policy_file is not None else []),
            "--events-file",
            str(self.events_file),
            "--instance",
            self.instance,
            "--state-dir",
            str(self.state_dir),
            "--api",
            self.api or "none",
        ]
        if self.default_action is not None:
            argv += ["--default-action", self.default_action]
        if self.keep_on_exit:
            argv.append("--keep-on-exit")
        if self.stats_interval:
            argv += ["--stats-interval", str(self.stats_interval)]
        if self.event_interval is not None:
            argv += ["--event-interval", str(self.event_interval)]
        if self.failsafe is not None:
            argv += ["--failsafe", self.failsafe]
        return argv + self.extra_args

    def start(self, wait: bool = True) -> AgentProcess:
        """Start the agent (again) and, if `wait`, wait until it enforces (AgentError if it
        does not within `start_timeout`; `wait_enforcing()` does the same later)."""
        if self.running:
            raise AgentError(f"agent {self.instance} is already running")
        if self._err is not None:
            self.previous_logs.append(self.log)
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Its own session: a Ctrl-C at the terminal reaches pytest, whose teardown then
            # stops the agent in order, instead of both racing.
            start_new_session=True,
            cwd=self.cwd,
            env=self.env,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._err = _LineReader(self.proc.stderr, f"agent-{self.instance}-stderr")
        self._out = _LineReader(self.proc.stdout, f"agent-{self.instance}-stdout")
        if wait:
            self.wait_enforcing()
        return self

    def wait_enforcing(self) -> None:
        """Wait for "enforcing on <iface>" in this run's log; AgentError with the log if the
        agent exits or takes longer than `start_timeout`."""
        assert self._err is not None and self.proc is not None, "agent never started"
        want = re.compile(rf"enforcing on {re.escape(self.iface)}\b")
        if self._err.wait_for(want, 0, self.start_timeout) is None:
            rc = self.proc.poll()
            state = f"exited with {rc}" if rc is not None else "still not enforcing"
            raise AgentError(
                f"agent {self.instance} {state} after {self.start_timeout}s:\n{self.log}"
            )

    def catches(self, sig: int) -> bool:
        """True when the agent process has a handler installed for `sig` (SigCgt in
        /proc/<pid>/status): from then on the signal cannot kill it by default action."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return False
        m = re.search(r"^SigCgt:\s*([0-9a-f]+)$", status, re.M)
        return m is not None and bool(int(m[1], 16) >> (sig - 1) & 1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log(self) -> str:
        """stderr of the current (or last) run, as text."""
        return "\n".join(self._err.lines) if self._err is not None else ""

    @property
    def stdout_lines(self) -> list[str]:
        """stdout lines of the current (or last) run so far (a copy)."""
        return list(self._out.lines) if self._out is not None else []

    def log_mark(self) -> int:
        """A position in the log: `wait_log(..., after=mark)` sees only later lines."""
        return len(self._err.lines) if self._err is not None else 0

    def wait_log(self, pattern: str, after: int = 0, timeout: float = 10.0) -> str:
        """The first log line at index >= `after` matching regex `pattern`; AgentError if none
        appears within `timeout` s."""
        assert self._err is not None, "agent never started"
        line = self._err.wait_for(re.compile(pattern), after, timeout)
        if line is None:
            raise AgentError(f"no log line matching {pattern!r} within {timeout}s:\n{self.log}")
        return line

    def reload(self, expect_applied: bool = True, timeout: float = 15.0) -> str:
        """SIGHUP, then wait for the agent's answer: "policy generation N applied" or
        "policy reload rejected". Returns that line; AgentError if the answer is the other
        one than `expect_applied` says, or none comes within `timeout` s."""
        mark = self.log_mark()
        self.signal(signal.SIGHUP)
        line = self.wait_log(
            r"policy generation \d+ applied|policy reload rejected", after=mark, timeout=timeout
        )
        if ("applied" in line) != expect_applied:
            raise AgentError(
                f"reload: expected {'applied' if expect_applied else 'rejected'}, "
                f"got: {line}\n{self.log}"
            )
        return line

    # ---- the admin API ---------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """`http://HOST:PORT` of the agent's TCP `api` (AssertionError for none or a socket)."""
        assert self.api and not self.api.startswith("unix:") and self.api != "none", (
            f"agent {self.instance} serves no TCP API (api={self.api!r})"
        )
        return f"http://{self.api}"

    def token(self) -> str | None:
        """The API token the agent keeps in `<state_dir>/api-token`; None before it exists."""
        try:
            return (self.state_dir / "api-token").read_text().strip() or None
        except FileNotFoundError:
            return None

    def wait_api(self, timeout: float = 15.0) -> None:
        """Wait until this run logs "API listening on" (after it enforces); AgentError with the
        log if it does not within `timeout` s."""
        self.wait_log(r"API listening on", timeout=timeout)

    def signal(self, sig: int) -> None:
        if not self.running:
            raise AgentError(f"agent {self.instance} is not running:\n{self.log}")
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code (AgentError, after a SIGKILL, if it hangs)."""
        assert self.proc is not None, "agent never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AgentError(
                    f"agent {self.instance} ignored SIGTERM for {timeout}s:\n{self.log}"
                ) from None
        self._drain_readers()
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL and reap: the agent dies without any chance to clean up."""
        assert self.proc is not None, "agent never started"
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._drain_readers()

    def _drain_readers(self) -> None:
        for r in (self._err, self._out):
            if r is not None:
                r.join(2.0)

    # ---- outputs ---------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every complete JSON line of the events file so far (a half-written last line is
        left for the next call)."""
        try:
            data = self.events_file.read_bytes()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def stats(self) -> list[dict[str, int]]:
        """Parsed `--stats-interval` lines: {"gen": .., "total": .., "denied": .., ...}."""
        out: list[dict[str, int]] = []
        for line in self.stdout_lines:
            m = STATS_RE.match(line)
            if m is None:
                continue
            row = {"gen": int(m["gen"])}
            for item in m["rest"].split():
                key, _, value = item.partition("=")
                with contextlib.suppress(ValueError):
                    row[key] = int(value)
            out.append(row)
        return out

    # ---- cleanup ---------------------------------------------------------------------------

    @property
    def pin_dir(self) -> Path:
        return DEFAULT_PIN_ROOT / self.instance

    @property
    def run_dir(self) -> Path:
        return DEFAULT_RUN_DIR / self.instance

    def cleanup(self) -> None:
        """Kill the agent, detach our filters, remove the instance's pins and run files.
        Idempotent; never raises for something already gone."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self._drain_readers()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
        if self.lab.exists():
            # Teardown must go on whatever pyroute2 raises (the interface may be gone).
            with contextlib.suppress(Exception):
                detach(self.iface, self.netns)
        # bpffs allows unlink and rmdir, which is all rmtree needs.
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


AgentFactory = Callable[..., AgentProcess]
"""The `agent_factory` fixture: (lab, policy file or None, **AgentProcess kwargs) -> agent."""


def flows(agent: AgentProcess) -> list[dict[str, Any]]:
    """The flow records (no lost or alert records) of the agent's events file so far."""
    return [e for e in agent.events() if e.get("type") == "flow"]
