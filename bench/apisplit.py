"""The pieces of the API bench's whole-set PUT, timed in-process in a fresh interpreter.

In: the rule-set kind, the size of the PUT and of the set it replaces, the seed, the number of
runs, an instance name for a private classifier (never attached) and a state dir. Out: the
median seconds of each piece (parse JSON, validate, compile, kernel apply, persist, diff and
log, encode the answer), as a dict (`split_pieces`), or as a JSON line on stdout from
`python -m bench.apisplit split KIND RULES BASE SEED RUNS INSTANCE STATE_DIR`, which
`split_in_subprocess` runs. The classifier's pins are removed at the end, also on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson

from bench.apidocs import bulk_doc, live_doc
from bench.common import BenchError

ROOT = Path(__file__).resolve().parent.parent
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
    kind: str, rules: int, base_rules: int, seed: int, runs: int, instance: str, workdir: Path
) -> dict[str, float]:
    """The pieces of a whole-set replace of `bulk_doc(kind, rules)` over `live_doc(kind,
    base_rules)`, timed as the agent runs them: the store's own steps on a private classifier
    (`instance`, not attached) persisting into `workdir`. Median of `runs` per piece, in s.

    Run it in a fresh interpreter (`split_in_subprocess`): in the bench process, the garbage
    collector walking everything the bench keeps alive would be timed too.
    """
    from streamer.datapath.compiler import compile_policy
    from streamer.datapath.config import DatapathConfig
    from streamer.datapath.datapath import Datapath
    from streamer.policy.model import PolicySet, parse_policy_document
    from streamer.policy.store import PolicyStore

    dp = Datapath(DatapathConfig(instance=instance, failsafe=()))
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
    base = parse_policy_document(live_doc(kind, base_rules, seed))
    body = orjson.dumps(bulk_doc(kind, rules, seed))
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


def split_in_subprocess(
    kind: str, rules: int, base_rules: int, seed: int, runs: int, workdir: Path
) -> dict[str, float]:
    """`split_pieces` in a fresh `python -m bench.apisplit`; BenchError when it fails (it
    drives the policy store's internals, which a new store may not have)."""
    from streamer.datapath.config import DEFAULT_PIN_ROOT

    instance = f"bench-apisplit-{os.getpid()}-{time.time_ns() % 1_000_000:06d}"
    state = workdir / f"split-state-{kind}"
    argv = [
        sys.executable, "-m", "bench.apisplit", "split", kind, str(rules), str(base_rules),
        str(seed), str(runs), instance, str(state),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
    finally:
        # A child killed with us (SIGTERM, timeout) leaves its pins: ours to remove.
        shutil.rmtree(DEFAULT_PIN_ROOT / instance, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)
    if proc.returncode != 0:
        raise BenchError(f"timing the pieces of the PUT failed:\n{proc.stderr[-2000:]}")
    try:
        pieces: dict[str, float] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise BenchError(f"timing the pieces of the PUT: unreadable answer {proc.stdout!r}") from e
    return pieces


def _main(argv: list[str]) -> int:
    usage = "usage: python -m bench.apisplit split KIND RULES BASE SEED RUNS INSTANCE STATE_DIR"
    if len(argv) != 8 or argv[0] != "split":
        print(usage, file=sys.stderr)
        return 2
    try:
        rules, base, seed, runs = (int(x) for x in argv[2:6])
    except ValueError:
        print(usage, file=sys.stderr)
        return 2
    pieces = split_pieces(argv[1], rules, base, seed, runs, argv[6], Path(argv[7]))
    print(orjson.dumps(pieces).decode())
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: remove our pins
    raise SystemExit(_main(sys.argv[1:]))
