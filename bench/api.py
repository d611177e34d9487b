"""The admin API benchmarks: a real agent (`microseg run`) in a lab of our own, timed from here.

In: `ApiSettings` (request count, rule counts, seed). Out: a results dict (`run_api_bench`) and
its plain-text table (`render_api`). Everything made is removed at the end, also on failure or
SIGTERM (SystemExit): the agent, its pins, the lab, the temporary state dir.

Measured:
- single-rule write -> enforced: the round trip of one `POST /api/v1/policies` (its answer means
  the kernel enforces the rule), over `requests` requests with distinct rule_ids, each on a
  keep-alive loopback connection, one at a time. After each answer (untimed) a connection
  through the new rule must pass, then the rule is deleted (`DELETE`, timed too); every tenth
  delete is checked the same way (a new connection must be refused). The live set is a seeded
  palette set (bench.rulesets) of `base_rules` rules: the first row is the target's; larger
  sets follow (each write recompiles and re-applies the whole set, so the cost grows with it).
- `PUT /api/v1/policies` of `bulk_rules` palette rules (replacing the base set): the wall time
  of the request, seen by the client, median of `bulk_runs`; then its pieces timed in-process
  on a private classifier with the store's own steps (parse JSON, validate, compile, kernel
  apply, persist with the diff, encode the answer); the rest is HTTP and the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.common import BenchError
from bench.rulesets import palette_policy

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/api/v1"
PORT = 7443  # no palette rule names it (bench.rulesets._PORTS, BOTTOM_PORT, 8000-8099)
BENCH_PRIORITY = 60000  # above every palette rule but the top ones (which never match the lab)
FIRST_ID = 1_000_000  # rule_ids of the single-rule writes: above every palette id
DELETE_CHECK_EVERY = 10
NEG_TIMEOUT = 0.2
# Informational targets (printed next to the numbers, never a failure).
TARGET_P99_MS = 20.0
TARGET_BULK_S = 3.0


@dataclass(frozen=True)
class ApiSettings:
    """How much to measure. `write_rows`: (base rules, requests) per single-rule row; the
    first row is the one the p99 target is read from."""

    write_rows: tuple[tuple[int, int], ...]
    bulk_rules: int
    bulk_runs: int
    seed: int
    quick: bool


FULL_API = ApiSettings(((100, 1000), (1_000, 200), (10_000, 20)), 100_000, 3, 1, False)
QUICK_API = ApiSettings(((100, 50),), 1_000, 1, 1, True)


def settings_for(
    quick: bool, requests: int | None, bulk_rules: int | None, seed: int
) -> ApiSettings:
    """FULL_API or QUICK_API with the first row's request count and the bulk size overridden."""
    base = QUICK_API if quick else FULL_API
    rows = list(base.write_rows)
    if requests is not None:
        rows[0] = (rows[0][0], requests)
    return ApiSettings(tuple(rows), bulk_rules or base.bulk_rules, base.bulk_runs, seed, base.quick)


# ---- the agent ---------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BenchAgent:
    """`microseg run --no-auth` on a lab's host interface, its log in a file. The lab is a
    fresh one unless `lab` is given (then the caller keeps it: `close` leaves it standing)."""

    def __init__(self, workdir: Path, base_doc: dict[str, Any], lab: Any = None) -> None:
        from streamer.lab.lab import Lab

        self.workdir = workdir
        self.instance = f"bench-api-{os.getpid()}-{time.time_ns() % 1_000_000:06d}"
        self.port = _free_port()
        self.policy_file = workdir / "policy.json"
        self.policy_file.write_bytes(orjson.dumps(base_doc))
        self.log_file = workdir / "agent.log"
        self.own_lab = lab is None
        self.lab: Any = Lab.create() if lab is None else lab
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the agent and wait until its API answers (BenchError with its log if not)."""
        argv = [
            sys.executable, "-m", "streamer", "run",
            "--netns", self.lab.host_ns, "--iface", self.lab.host_if,
            "--policy-file", str(self.policy_file),
            "--state-dir", str(self.workdir / "state"),
            "--instance", self.instance,
            "--api", f"127.0.0.1:{self.port}", "--no-auth",
        ]  # fmt: skip
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                cwd=ROOT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the agent exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                try:
                    conn.request("GET", f"{PREFIX}/health")
                    if conn.getresponse().status == 200:
                        return
                finally:
                    conn.close()
            time.sleep(0.1)
        raise BenchError(f"the agent's API did not answer within {timeout:g} s:\n{self.log()}")

    def log(self, last: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-last:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Stop the agent (SIGTERM, then SIGKILL), detach, remove its pins and the lab."""
        from streamer.datapath.attach import detach
        from streamer.datapath.config import DEFAULT_PIN_ROOT, DEFAULT_RUN_DIR

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
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


# ---- measuring ---------------------------------------------------------------------------------


def _pct(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), interpolated between samples (never beyond the largest)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values_s]
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(_pct(ms, 99), 3),
        "max_ms": round(max(ms), 3),
    }


class ApiBench:
    def __init__(self, settings: ApiSettings, agent: BenchAgent, client: Client) -> None:
        self.s = settings
        self.agent = agent
        self.client = client
        self.next_id = FIRST_ID
        lab = agent.lab
        self.targets = [lab.host_v4, lab.host_v6]

    def _passes(self, i: int, timeout: float) -> bool:
        from streamer.lab.probes import tcp_exchange

        return tcp_exchange(self.agent.lab.peer_ns, self.targets[i % 2], PORT, timeout)

    def replace(self, doc: dict[str, Any]) -> float:
        body = orjson.dumps(doc)
        t0 = time.perf_counter()
        self.client.must("PUT", "/policies", body, 200)
        return time.perf_counter() - t0

    def writes(self, base_rules: int, requests: int) -> dict[str, Any]:
        """`requests` POST+DELETE pairs on a live set of `base_rules` palette rules."""
        self.replace(palette_policy(base_rules, self.s.seed))
        post: list[float] = []
        delete: list[float] = []
        delete_checks = 0
        for i in range(requests):
            rid = self.next_id
            self.next_id += 1
            body = orjson.dumps({
                "rule_id": rid, "name": "bench", "protocol": "tcp", "dst_port": PORT,
                "direction": "ingress", "action": "allow", "priority": BENCH_PRIORITY,
            })  # fmt: skip
            t0 = time.perf_counter()
            status, data = self.client.call("POST", "/policies", body)
            t1 = time.perf_counter()
            if status != 201:
                raise BenchError(f"POST rule {rid}: HTTP {status}: {data[:300]!r}")
            if not self._passes(i, 2.0):
                raise BenchError(
                    f"rule {rid} was answered 201 but a connection to port {PORT} it allows"
                    " did not pass: not enforced when the answer came"
                )
            t2 = time.perf_counter()
            status, data = self.client.call("DELETE", f"/policies/{rid}")
            t3 = time.perf_counter()
            if status != 200:
                raise BenchError(f"DELETE rule {rid}: HTTP {status}: {data[:300]!r}")
            if i % DELETE_CHECK_EVERY == 0:
                delete_checks += 1
                if self._passes(i, NEG_TIMEOUT):
                    raise BenchError(f"rule {rid} was deleted but port {PORT} still passes")
            post.append(t1 - t0)
            delete.append(t3 - t2)
        return {
            "base_rules": base_rules,
            "requests": requests,
            "post": _summary_ms(post),
            "delete": _summary_ms(delete),
            "enforcement_checks": {"after_post": requests, "after_delete": delete_checks},
        }

    def bulk(self) -> dict[str, Any]:
        """PUT of `bulk_rules` rules replacing the first row's base set, `bulk_runs` times."""
        s = self.s
        base_doc = palette_policy(s.write_rows[0][0], s.seed)
        doc = bulk_doc(s.bulk_rules, s.seed)
        body = orjson.dumps(doc)
        walls: list[float] = []
        backs: list[float] = []
        for run in range(s.bulk_runs):
            self.replace(base_doc)
            if self._passes(run, NEG_TIMEOUT):
                raise BenchError(f"port {PORT} passes under the base set (default deny)")
            t0 = time.perf_counter()
            self.client.must("PUT", "/policies", body, 200)
            walls.append(time.perf_counter() - t0)
            if not self._passes(run, 2.0):
                raise BenchError(
                    f"the {s.bulk_rules:,}-rule set was answered 200 but is not"
                    f" enforced (port {PORT} does not pass)"
                )
            backs.append(self.replace(base_doc))
        return {
            "rules": s.bulk_rules,
            "replacing": s.write_rows[0][0],
            "body_bytes": len(body),
            "runs": s.bulk_runs,
            "wall_s": round(statistics.median(walls), 3),
            "wall_min_s": round(min(walls), 3),
            "wall_max_s": round(max(walls), 3),
            "back_to_base_s": round(statistics.median(backs), 3),
        }


def bulk_doc(count: int, seed: int) -> dict[str, Any]:
    """`count` rules: the palette set of count - 1, and one rule allowing PORT (the check)."""
    doc = palette_policy(count - 1, seed)
    doc["policies"].append({
        "rule_id": count, "name": "bench-check", "protocol": "tcp", "dst_port": PORT,
        "direction": "ingress", "action": "allow", "priority": BENCH_PRIORITY,
    })  # fmt: skip
    return doc


SPLIT_PIECES = (
    ("parse_json_s", "parse JSON"),
    ("validate_s", "validate"),
    ("compile_s", "compile"),
    ("kernel_apply_s", "kernel apply"),
    ("persist_s", "persist"),
    ("diff_s", "diff + log"),
    ("answer_s", "encode answer"),
)


def split_pieces(
    rules: int, base_rules: int, seed: int, runs: int, instance: str, workdir: Path
) -> dict[str, float]:
    """The pieces of a whole-set replace of `bulk_doc(rules)` over `palette_policy(base_rules)`,
    timed as the agent runs them: the store's own steps on a private classifier (`instance`,
    not attached) persisting into `workdir`. Median of `runs` per piece, in seconds.

    Run it in a fresh interpreter (`split_in_subprocess`): in the bench process, the garbage
    collector walking everything the bench keeps alive would be timed too.
    """
    from streamer.datapath.compiler import compile_policy
    from streamer.datapath.config import DatapathConfig
    from streamer.datapath.datapath import Datapath
    from streamer.policy.model import PolicySet, parse_policy_document
    from streamer.policy.store import PolicyStore

    dp = Datapath(DatapathConfig(instance=instance))
    t: dict[str, float] = {}

    def applier(policy: PolicySet, generation: int | None) -> int:
        t0 = time.perf_counter()
        compiled = compile_policy(policy, dp.config.max_shapes)
        t1 = time.perf_counter()
        gen = dp.apply(compiled, generation)
        t["compile_s"] = t1 - t0
        t["kernel_apply_s"] = time.perf_counter() - t1
        return gen

    samples: dict[str, list[float]] = {key: [] for key, _ in SPLIT_PIECES}
    base = parse_policy_document(palette_policy(base_rules, seed))
    body = orjson.dumps(bulk_doc(rules, seed))
    try:
        dp.load()
        store = PolicyStore(workdir, applier)
        persist = store._persist

        def timed_persist(policy: PolicySet, generation: int) -> None:
            t0 = time.perf_counter()
            persist(policy, generation)
            t["persist_s"] = time.perf_counter() - t0

        store._persist = timed_persist  # type: ignore[method-assign]
        store.restore(base, 0)

        async def measure() -> None:
            # One event loop for all runs, as in the agent (no loop or thread pool set-up timed).
            for _ in range(runs):
                await store.replace(base, "bench")
                t0 = time.perf_counter()
                data = orjson.loads(body)
                t1 = time.perf_counter()
                policy = parse_policy_document(data)
                t2 = time.perf_counter()
                result = await store.replace(policy, "bench")
                t3 = time.perf_counter()
                orjson.dumps(result.to_api())
                t4 = time.perf_counter()
                t.update(parse_json_s=t1 - t0, validate_s=t2 - t1, answer_s=t4 - t3)
                t["diff_s"] = t3 - t2 - t["compile_s"] - t["kernel_apply_s"] - t["persist_s"]
                for key in samples:
                    samples[key].append(t[key])
                del data, policy, result

        asyncio.run(measure())
    finally:
        try:
            dp.close()
        finally:
            dp.remove_pins()
    return {key: round(statistics.median(v), 3) for key, v in samples.items()}


def split_in_subprocess(settings: ApiSettings, workdir: Path) -> dict[str, float]:
    """`split_pieces` for the bulk PUT of `settings`, in a fresh `python -m bench.api`."""
    from streamer.datapath.config import DEFAULT_PIN_ROOT

    instance = f"bench-apisplit-{os.getpid()}-{time.time_ns() % 1_000_000:06d}"
    argv = [
        sys.executable, "-m", "bench.api", "split", str(settings.bulk_rules),
        str(settings.write_rows[0][0]), str(settings.seed), str(settings.bulk_runs), instance,
        str(workdir / "split-state"),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
        )
    finally:
        # A child killed with us (SIGTERM, timeout) leaves its pins: ours to remove.
        shutil.rmtree(DEFAULT_PIN_ROOT / instance, ignore_errors=True)
    if proc.returncode != 0:
        raise BenchError(f"timing the pieces of the PUT failed:\n{proc.stderr[-2000:]}")
    try:
        pieces: dict[str, float] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise BenchError(f"timing the pieces of the PUT: unreadable answer {proc.stdout!r}") from e
    return pieces


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    first = res["writes"][0]
    bulk = res["bulk"]
    full = bulk["rules"] >= 100_000
    return [
        {
            "what": f"single-rule POST -> enforced, p99 under {TARGET_P99_MS:g} ms"
            f" ({first['base_rules']:,} rules live, {first['requests']:,} requests)",
            "value": first["post"]["p99_ms"],
            "unit": "ms",
            "met": first["post"]["p99_ms"] < TARGET_P99_MS,
        },
        {
            "what": f"100,000 rules applied (PUT wall time) under {TARGET_BULK_S:g} s"
            + ("" if full else f" (QUICK: {bulk['rules']:,} rules only)"),
            "value": bulk["wall_s"],
            "unit": "s",
            "met": bulk["wall_s"] < TARGET_BULK_S,
        },
    ]


def run_api_bench(settings: ApiSettings, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every API benchmark of `settings`; the results dict (see render_api)."""
    from pyroute2 import config as pyroute2_config

    # pyroute2 forks a helper per netns operation and SIGTERMs it when done; our SIGTERM
    # handler (SystemExit, for cleanup) must not run in that child, or the lab comes out
    # half-built. The agent does the same.
    pyroute2_config.disable_mp_signal = True
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="microseg-bench-api-"))
    agent: BenchAgent | None = None
    client: Client | None = None
    try:
        base_doc = palette_policy(settings.write_rows[0][0], settings.seed)
        agent = BenchAgent(workdir, base_doc)
        progress(f"api: starting an agent in lab {agent.lab.name} ...")
        agent.start()
        client = Client(agent.port)
        bench = ApiBench(settings, agent, client)
        from streamer.lab.probes import EchoServer

        with EchoServer(agent.lab.host_ns, [PORT]).start():
            writes = []
            for base_rules, requests in settings.write_rows:
                progress(f"api: {requests:,} single-rule writes on {base_rules:,} rules ...")
                writes.append(bench.writes(base_rules, requests))
            progress(f"api: PUT of {settings.bulk_rules:,} rules x{settings.bulk_runs} ...")
            bulk = bench.bulk()
        client.close()
        client = None
        agent.close()
        agent = None
        progress("api: timing the pieces of the PUT in a fresh process ...")
        bulk["split"] = split_in_subprocess(settings, workdir)
    finally:
        if client is not None:
            client.close()
        try:
            if agent is not None:
                agent.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    res: dict[str, Any] = {
        "meta": {
            "cpus": os.cpu_count(),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "quick": settings.quick,
            "seed": settings.seed,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "writes": writes,
        "bulk": bulk,
    }
    res["targets"] = _targets(res)
    res["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    return res


# ---- output ------------------------------------------------------------------------------------


def render_api(res: dict[str, Any]) -> str:
    """The plain-text table of an API results dict."""
    lines: list[str] = []
    add = lines.append
    m = res["meta"]
    add("microseg admin API benchmarks (a real agent on a lab veth, HTTP over loopback,")
    add(f"one request at a time on a keep-alive connection){'; QUICK mode' if m['quick'] else ''}")
    add(
        f"{m['cpus']} CPUs, load average {m['load_before']:.2f} before and {m['load_after']:.2f}"
        " after (other work on the machine shows in the tails)"
    )
    add("")
    add("Single-rule write -> enforced: round trip of the request; its answer means the kernel")
    add("enforces the change (checked: a connection through each new rule passes, and after")
    add(
        f"every {DELETE_CHECK_EVERY}th DELETE a new one is refused). Live set: seeded palette"
        " rules."
    )
    add(
        f"  {'live rules':>10} {'requests':>9}   {'POST p50':>8} {'p99':>7} {'max':>7}"
        f"   {'DELETE p50':>10} {'p99':>7} {'max':>7}  (ms)"
    )
    for w in res["writes"]:
        p, d = w["post"], w["delete"]
        add(
            f"  {w['base_rules']:>10,} {w['requests']:>9,}"
            f"   {p['p50_ms']:>8.1f} {p['p99_ms']:>7.1f} {p['max_ms']:>7.1f}"
            f"   {d['p50_ms']:>10.1f} {d['p99_ms']:>7.1f} {d['max_ms']:>7.1f}"
        )
    b = res["bulk"]
    add("")
    add(
        f"PUT {PREFIX}/policies of {b['rules']:,} rules ({b['body_bytes'] / 2**20:.1f} MiB)"
        f" replacing {b['replacing']:,}, wall time of the request:"
    )
    spread = f" (median of {b['runs']}, {b['wall_min_s']:.2f}..{b['wall_max_s']:.2f})"
    add(
        f"  {b['wall_s']:.2f} s{spread if b['runs'] > 1 else ''};"
        f" back to {b['replacing']:,} rules: {b['back_to_base_s']:.2f} s"
    )
    sp = b.get("split")
    if sp:
        total = sum(sp[key] for key, _ in SPLIT_PIECES)
        add(
            "  its pieces, the store's own steps timed in a fresh process on a private"
            f" classifier{' (median of ' + str(b['runs']) + ')' if b['runs'] > 1 else ''}:"
        )
        shown = [f"{name} {sp[key]:.2f} s" for key, name in SPLIT_PIECES]
        add("  " + ", ".join(shown[:4]) + ",")
        add("  " + ", ".join(shown[4:]))
        rest = b["wall_s"] - total
        add(
            f"  = {total:.2f} s; HTTP transfer, event loop and the rest ~{rest:.2f} s"
            if rest >= 0
            else f"  = {total:.2f} s (more than the request took: timing noise)"
        )
    add("")
    add("Targets (informational, not pass/fail)")
    for t in res["targets"]:
        value = f"{t['value']:.1f} ms" if t["unit"] == "ms" else f"{t['value']:.2f} s"
        add(f"  [{'met' if t['met'] else 'NOT met':>7}] {t['what']}: {value}")
    add(f"API bench time {m['elapsed_s']:.0f} s.")
    return "\n".join(lines)


def _split_main(argv: list[str]) -> int:
    """`python -m bench.api split RULES BASE SEED RUNS INSTANCE STATE_DIR`: split_pieces as a
    JSON line on stdout (used by split_in_subprocess)."""
    if len(argv) != 7 or argv[0] != "split":
        print(
            "usage: python -m bench.api split RULES BASE SEED RUNS INSTANCE STATE_DIR",
            file=sys.stderr,
        )
        return 2
    rules, base, seed, runs = (int(x) for x in argv[1:5])
    pieces = split_pieces(rules, base, seed, runs, argv[5], Path(argv[6]))
    print(orjson.dumps(pieces).decode())
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: remove our pins
    raise SystemExit(_split_main(sys.argv[1:]))
