"""A real agent for the benchmarks: `microseg run` as a child process, its API and its memory.

In: a work directory, a policy document (the policy file that seeds an empty state dir) and
a lab (`streamer.lab.lab.Lab`; a fresh one when none is given). Out: `BenchAgent` (start,
stop leaving its pins, restart onto them, close removing everything it made), `Client` (one
keep-alive HTTP connection to its API) and `Memory` (VmRSS and the peak VmHWM of a process
from /proc/PID/status; the peak reset through /proc/PID/clear_refs). bench.api and
bench.compare use them.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.common import BenchError

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/api/v1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BenchAgent:
    """`microseg run --no-auth` on a lab's host interface, its log in a file. The lab is a
    fresh one unless `lab` is given (then the caller keeps it: `close` leaves it standing).
    With `keep_on_exit` the agent leaves its classifier attached and its maps pinned when it
    stops (`stop`), and `launch` again restarts onto them (same instance and state dir)."""

    def __init__(
        self, workdir: Path, base_doc: dict[str, Any], lab: Any = None, keep_on_exit: bool = False
    ) -> None:
        from streamer.lab.lab import Lab

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.instance = f"bench-api-{os.getpid()}-{time.time_ns() % 1_000_000:06d}"
        self.port = _free_port()
        self.policy_file = workdir / "policy.json"
        self.policy_file.write_bytes(orjson.dumps(base_doc))
        self.log_file = workdir / "agent.log"
        self.keep_on_exit = keep_on_exit
        self.own_lab = lab is None
        self.lab: Any = Lab.create() if lab is None else lab
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("the agent is not running")
        return self.proc.pid

    def launch(self) -> None:
        """Start the agent process and return at once (`wait_api` waits for its API)."""
        argv = [
            sys.executable, "-m", "streamer", "run",
            "--netns", self.lab.host_ns, "--iface", self.lab.host_if,
            "--policy-file", str(self.policy_file),
            "--state-dir", str(self.workdir / "state"),
            "--instance", self.instance,
            "--api", f"127.0.0.1:{self.port}", "--no-auth",
        ]  # fmt: skip
        if self.keep_on_exit:
            argv.append("--keep-on-exit")
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                cwd=ROOT, start_new_session=True,
            )  # fmt: skip

    def api_answers(self, timeout: float = 1.0) -> bool:
        """True when GET /health answers 200 (BenchError with the log if the agent exited)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the agent exited with {self.proc.returncode}:\n{self.log()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                conn.request("GET", f"{PREFIX}/health")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        return False

    def wait_api(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api_answers():
                return
            time.sleep(0.1)
        raise BenchError(f"the agent's API did not answer within {timeout:g} s:\n{self.log()}")

    def start(self, timeout: float = 60.0) -> None:
        """Start the agent and wait until its API answers (BenchError with its log if not)."""
        self.launch()
        self.wait_api(timeout)

    def log(self, last: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-last:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s; with `keep_on_exit` its pins stay for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        """Stop the agent, detach, remove its pins and (when it made it) the lab."""
        from streamer.datapath.attach import detach
        from streamer.datapath.config import DEFAULT_PIN_ROOT, DEFAULT_RUN_DIR

        self.stop()
        try:
            if self.lab.exists():
                with contextlib.suppress(Exception):  # whatever pyroute2 raises: go on
                    detach(self.lab.host_if, self.lab.host_ns)
        finally:
            shutil.rmtree(DEFAULT_PIN_ROOT / self.instance, ignore_errors=True)
            shutil.rmtree(DEFAULT_RUN_DIR / self.instance, ignore_errors=True)
            if self.own_lab:
                self.lab.destroy()


class Client:
    """One keep-alive HTTP connection to the agent's API."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            self.conn.request(method, PREFIX + path, body=body, headers=headers)
            resp = self.conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            raise BenchError(f"{method} {path}: {e}") from e

    def must(self, method: str, path: str, body: bytes | None, status: int) -> bytes:
        got, data = self.call(method, path, body)
        if got != status:
            raise BenchError(f"{method} {path}: HTTP {got}, expected {status}: {data[:300]!r}")
        return data

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class Memory:
    """A process's resident memory now and its peak since start or the last `reset_peak`."""

    rss_mib: float
    peak_mib: float

    @staticmethod
    def read(pid: int) -> Memory:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError as e:
            raise BenchError(f"reading the memory of process {pid}: {e}") from e
        kb: dict[str, int] = {}
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                kb[key] = int(value.split()[0])
        if len(kb) != 2:
            raise BenchError(f"/proc/{pid}/status has no VmRSS/VmHWM (a kernel thread?)")
        return Memory(round(kb["VmRSS"] / 1024, 1), round(kb["VmHWM"] / 1024, 1))

    @staticmethod
    def reset_peak(pid: int) -> None:
        """Set the process's VmHWM to its current VmRSS (proc(5): clear_refs, "5")."""
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError as e:
            raise BenchError(f"resetting the peak memory of process {pid}: {e}") from e

    def to_dict(self) -> dict[str, float]:
        return {"rss_mib": self.rss_mib, "peak_mib": self.peak_mib}
