"""A real Apache Kafka broker for the tests and the events bench, and kcat (a consumer we did
not write) to talk to it.

Import as `from bench.kafkabroker import KafkaBroker, kcat_consume, kcat_produce, wait_topic`
(from a checkout: scripts/kafka.sh runs the broker). The tests' session-wide broker is the
`kafka_broker` fixture of tests/conftest.py; make a `KafkaBroker` of your own only when a test
must not share one. bench.events starts one of its own.

A `KafkaBroker` is one single-node KRaft broker run by scripts/kafka.sh (jars cached by
`make setup`, so a start only costs the JVM: ~5-8 s) on 127.0.0.1:<free port> of the given
network namespace, with its own directory (data, logs/server.log). `stop()` keeps that
directory, so `start()` again brings the same topics and records back on the same address;
`destroy()` (also the context manager's exit) removes everything. Directories of test processes
that died before their teardown are reaped on the next start.

The kcat helpers run Debian's `kcat`, each bounded by its `timeout`; records come back as
dicts with str keys and values (see `kcat_consume`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KAFKA_SH = ROOT / "scripts" / "kafka.sh"

_DIR_PREFIX = "microseg-kafka-test-"
_DIR_RE = re.compile(r"microseg-kafka-test-(\d+)-[0-9a-f]{8}")
# Below the kernel's ephemeral range (32768+): no outgoing connection takes a port we picked
# between picking and the broker's bind.
_PORT_RANGE = (20000, 32000)
# kafka.sh bounds its own steps; this only catches a hang of the script itself (a first
# start on a machine without the cache also fetches the jars: up to 15 min).
_SCRIPT_SLACK = 960.0

# kcat -P delimiters: ASCII record and unit separators, which no test value contains.
_RS, _US = "\x1e", "\x1f"

__all__ = [
    "KafkaBroker",
    "KafkaError",
    "KcatTimeout",
    "free_port",
    "kcat_consume",
    "kcat_produce",
    "reap_stale_brokers",
    "topic_names",
    "unique_topic",
    "wait_topic",
]


class KafkaError(RuntimeError):
    """The broker could not be started or stopped, or kcat failed; the message says why."""


class KcatTimeout(AssertionError):
    """Fewer records than asked for arrived in time; `.records` holds those that did."""

    def __init__(self, message: str, records: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.records = records


def _netns_argv(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns is not None else argv


def _port_free(port: int, netns: str | None) -> bool:
    from streamer.lab.netns import netns_socket

    try:
        with netns_socket(netns, socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def free_port(netns: str | None = None, avoid: Iterable[int] = ()) -> int:
    """A TCP port free on 127.0.0.1 of `netns` (None: ours) right now, outside `avoid`."""
    taken = set(avoid)
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port not in taken and _port_free(port, netns):
            return port
    raise KafkaError(f"no free port in {_PORT_RANGE} on 127.0.0.1 (netns {netns}) after 200 tries")


def unique_topic(tag: str = "t") -> str:
    """A topic name no other test or run uses: "test.<tag>.<random>"."""
    return f"test.{tag}.{uuid.uuid4().hex[:12]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_script(
    args: list[str], netns: str | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    argv = _netns_argv(netns, [str(KAFKA_SH), *args])
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise KafkaError(f"{' '.join(argv)} did not finish within {timeout:.0f}s") from e


def reap_stale_brokers() -> list[Path]:
    """Stop and remove the brokers of test processes that are gone (killed before their
    teardown); returns their directories. Only directories named by this module are touched."""
    reaped: list[Path] = []
    for d in Path(tempfile.gettempdir()).glob(_DIR_PREFIX + "*"):
        m = _DIR_RE.fullmatch(d.name)
        if not m or not d.is_dir() or _pid_alive(int(m[1])):
            continue
        # stop finds the JVM by its pid file and command line, whatever namespace it is in.
        _run_script(["stop", "--dir", str(d), "--timeout", "10"], None, 60.0)
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(d)
    return reaped


_reaped_once = False


class KafkaBroker:
    """One single-node KRaft broker on 127.0.0.1 of `netns` (None: our own namespace), or on
    `host` there (an address of one of its interfaces: clients in other namespaces reach it
    through that interface; it is also the address advertised).

    `port` / `controller_port` default to free ones picked at the first start; they stay the
    same across restarts. Not started by the constructor: call `start()` (or use `with`).
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        start_timeout: float = 60.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.netns = netns
        self.host = host
        self.port = port
        self.controller_port = controller_port
        self.start_timeout = start_timeout
        self.directory = Path(tempfile.gettempdir()) / (
            f"{_DIR_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.startup_seconds: float | None = None  # of the last start()

    # -- state ---------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """ "<host>:<port>" ("127.0.0.1:<port>" for clients in the broker's namespace);
        KafkaError before a port is known (no port given and never started)."""
        if self.port is None:
            raise KafkaError("the broker has no port yet: start() it first")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker JVM's pid while it runs, else None."""
        try:
            pid = int((self.directory / "kafka.pid").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.directory / "server.properties").encode() in cmdline else None

    @property
    def running(self) -> bool:
        """True while the broker's JVM is alive (it may still be starting or stopping)."""
        return self.pid is not None

    def log_tail(self, lines: int = 40) -> str:
        """The last `lines` lines of the broker's server.log ("" when there is none)."""
        try:
            text = (self.directory / "logs" / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- life cycle ------------------------------------------------------------------------

    def start(self) -> KafkaBroker:
        """Start (or restart, keeping topics and data) and wait until it answers metadata
        requests; returns self. Starting a running broker does nothing. KafkaError with the
        script's message when it fails (its logs stay in `directory` until `destroy()`)."""
        global _reaped_once
        if not _reaped_once:
            _reaped_once = True
            reap_stale_brokers()
        if self.running:
            return self
        fixed = self.port is not None
        for attempt in range(3):
            if self.port is None:
                self.port = free_port(self.netns)
            if self.controller_port is None:
                self.controller_port = free_port(self.netns, avoid=[self.port])
            self.directory.mkdir(mode=0o700, exist_ok=True)
            t0 = time.monotonic()
            proc = _run_script(
                [
                    "start",
                    "--dir",
                    str(self.directory),
                    *(
                        ["--port", str(self.port)]
                        if self.host == "127.0.0.1"
                        else ["--listen", f"{self.host}:{self.port}"]
                    ),
                    "--controller-port",
                    str(self.controller_port),
                    "--timeout",
                    str(max(1, round(self.start_timeout))),
                ],
                self.netns,
                self.start_timeout + _SCRIPT_SLACK,
            )
            if proc.returncode == 0:
                self.startup_seconds = time.monotonic() - t0
                return self
            # Someone took a port we picked in the meantime: pick again (first start only).
            if not fixed and attempt < 2 and "already in use" in proc.stderr:
                self.port = self.controller_port = None
                continue
            break
        raise KafkaError(
            f"cannot start Kafka (netns {self.netns}, dir {self.directory}):\n{proc.stderr.strip()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker (SIGTERM, SIGKILL after `timeout` s), keeping its data for a
        restart. Stopping a stopped broker does nothing."""
        if not (self.directory / ".microseg-kafka").exists():
            return
        proc = _run_script(
            [
                "stop",
                "--dir",
                str(self.directory),
                "--keep",
                "--timeout",
                str(max(1, round(timeout))),
            ],
            self.netns,
            timeout + 30.0,
        )
        if proc.returncode != 0:
            raise KafkaError(f"cannot stop Kafka in {self.directory}: {proc.stderr.strip()}")

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (data kept; `start()` recovers it)."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10.0
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            raise KafkaError(f"Kafka pid {pid} survived SIGKILL for 10 s")

    @contextlib.contextmanager
    def outage(self, timeout: float = 30.0) -> Iterator[None]:
        """`with broker.outage(): ...`: stopped inside the block, started again after it,
        also when the block raises (so a failing test leaves a usable broker behind)."""
        self.stop(timeout)
        try:
            yield
        finally:
            self.start()

    def destroy(self) -> None:
        """Stop the broker and remove its directory; safe to call at any time, repeatedly."""
        try:
            if (self.directory / ".microseg-kafka").exists():
                proc = _run_script(
                    ["stop", "--dir", str(self.directory), "--timeout", "30"], self.netns, 90.0
                )
                if proc.returncode != 0 and self.running:
                    raise KafkaError(
                        f"cannot stop Kafka in {self.directory}: {proc.stderr.strip()}"
                    )
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        try:
            return self.start()
        except BaseException:
            self.destroy()  # __exit__ will not run; the error carries the log's tail
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return (
            f"KafkaBroker(bootstrap={self.port and self.bootstrap!r}, netns={self.netns!r}, "
            f"running={self.running}, dir={str(self.directory)!r})"
        )


# ---- kcat -------------------------------------------------------------------------------------


def _kcat(
    bootstrap: str, args: list[str], *, netns: str | None, timeout: float, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv = _netns_argv(netns, ["kcat", "-b", bootstrap, *args])
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        check=False,
    )


def _metadata(bootstrap: str, *, netns: str | None, timeout: float) -> dict[str, Any] | None:
    # All topics, never `-t topic`: a metadata request naming a topic would create it.
    try:
        proc = _kcat(
            bootstrap,
            ["-L", "-J", "-m", str(max(1, round(timeout)))],
            netns=netns,
            timeout=timeout + 5.0,
        )
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def topic_names(bootstrap: str, *, netns: str | None = None, timeout: float = 5.0) -> list[str]:
    """The broker's topics (internal ones included); KafkaError when it does not answer."""
    meta = _metadata(bootstrap, netns=netns, timeout=timeout)
    if meta is None:
        raise KafkaError(f"no metadata from {bootstrap} (netns {netns}) within {timeout:.0f}s")
    return sorted(str(t["topic"]) for t in meta.get("topics", []))


def wait_topic(
    bootstrap: str, topic: str, timeout: float = 10.0, *, netns: str | None = None
) -> int:
    """Wait until `topic` exists with a leader for every partition; returns its partition
    count. Does not create it. TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        meta = _metadata(bootstrap, netns=netns, timeout=max(1.0, min(left, 5.0)))
        for t in (meta or {}).get("topics", []):
            parts = t.get("partitions") or []
            if (
                t.get("topic") == topic
                and not t.get("error")
                and parts
                and all(p.get("leader", -1) >= 0 and not p.get("error") for p in parts)
            ):
                return len(parts)
        if time.monotonic() >= deadline:
            state = "no answer from the broker" if meta is None else "not there"
            raise TimeoutError(
                f"topic {topic!r} on {bootstrap} (netns {netns}): {state} after {timeout:.0f}s"
            )
        time.sleep(0.2)


def _record(line: str) -> dict[str, Any]:
    raw = json.loads(line)
    headers = raw.get("headers") or []
    return {
        "topic": raw["topic"],
        "partition": raw["partition"],
        "offset": raw["offset"],
        "timestamp": raw.get("ts"),
        "key": raw.get("key"),
        "value": raw.get("payload"),
        "headers": list(zip(headers[::2], headers[1::2], strict=True)),
    }


def kcat_consume(
    bootstrap: str,
    topic: str,
    *,
    count: int | None = None,
    timeout: float = 10.0,
    from_beginning: bool = True,
    netns: str | None = None,
) -> list[dict[str, Any]]:
    """Read `topic` with kcat (no consumer group, all partitions) and return its records.

    Waits (within `timeout`) for the topic to exist. count=None: everything up to the
    current end of every partition. count=N: waits for N records, raising `KcatTimeout`
    (carrying the ones that came) when fewer arrive within `timeout`. from_beginning=False
    starts at the end, so only records produced after the call count (use with `count`).
    Each record: {"topic", "partition", "offset", "timestamp" (ms), "key" (str|None),
    "value" (str|None), "headers" [(name, value)]}, in the order kcat delivered them
    (per-partition offset order).
    """
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    deadline = time.monotonic() + timeout
    wait_topic(bootstrap, topic, timeout, netns=netns)
    left = max(1.0, deadline - time.monotonic())
    args = ["-C", "-u", "-t", topic, "-J", "-q", "-o", "beginning" if from_beginning else "end"]
    args += ["-e"] if count is None else ["-c", str(count)]
    try:
        proc = _kcat(bootstrap, args, netns=netns, timeout=left)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        got = [_record(line) for line in out.splitlines() if line.strip()]
        raise KcatTimeout(
            f"kcat got {len(got)} of {count} records from topic {topic!r} on "
            f"{bootstrap} within {timeout:.0f}s",
            got,
        ) from None
    if proc.returncode != 0:
        raise KafkaError(
            f"kcat -C on {bootstrap} topic {topic!r} failed "
            f"(exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return [_record(line) for line in proc.stdout.splitlines() if line.strip()]


def kcat_produce(
    bootstrap: str,
    topic: str,
    records: Iterable[str | tuple[str | None, str]],
    *,
    timeout: float = 10.0,
    netns: str | None = None,
) -> int:
    """Produce `records` (values, or (key, value) with key None for no key) to `topic` in
    order, with kcat; returns how many. The topic is created if missing (broker default:
    one partition). KafkaError when kcat fails or a delivery is not acknowledged; ValueError
    for a key or value holding the ASCII separators \\x1e or \\x1f (kcat's delimiters here)."""
    chunks: list[str] = []
    for rec in records:
        key, value = (None, rec) if isinstance(rec, str) else rec
        for part in (key or "", value):
            if _RS in part or _US in part:
                raise ValueError(f"record {rec!r} contains \\x1e or \\x1f, kcat's delimiters here")
        chunks.append(value if key is None else f"{key}{_US}{value}")
    if not chunks:
        return 0
    try:
        args = [
            "-P",
            "-t",
            topic,
            "-D",
            r"\x1e",
            "-K",
            r"\x1f",
            "-X",
            "acks=all",
            "-X",
            f"message.timeout.ms={int(timeout * 1000)}",
        ]
        proc = _kcat(bootstrap, args, netns=netns, timeout=timeout + 5.0, input=_RS.join(chunks))
    except subprocess.TimeoutExpired as e:
        raise KafkaError(f"kcat -P to {bootstrap} topic {topic!r} did not finish in time") from e
    if proc.returncode != 0 or "ERROR" in proc.stderr:
        raise KafkaError(
            f"kcat -P to {bootstrap} topic {topic!r} failed "
            f"(exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return len(chunks)
