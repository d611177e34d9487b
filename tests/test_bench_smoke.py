"""Smoke test of `python -m bench` (the `make bench` suite) in its tiny --quick mode.

Checks that it runs end to end on the real kernel, prints its tables (datapath, then the admin
API against a real agent in a lab of its own, then flow events through the pipeline to a Kafka
broker of its own, then microseg side by side with nftables and no filter on real traffic,
then a fleet of agents following one policy through Kafka), writes its JSON and plot where
--out says, removes its pinned maps, its labs and its broker, keeps the other suites' results
on `--only`, and refuses bad options without a traceback. The fleet suite also runs alone
with one agent and two changes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from support import REPO

PIN_ROOT = Path("/sys/fs/bpf/microseg")


def _lab_of(stderr: str) -> str:
    m = re.search(r"api: starting an agent in lab (\S+) ", stderr)
    assert m, f"the API bench names no lab:\n{stderr[-2000:]}"
    return m[1]


def _check_api_results(api: dict[str, Any], stdout: str, requests: int, rules: int) -> None:
    """The quick API section: both rule sets, every measurement, every target marked."""
    for heading in (
        "microseg admin API benchmarks",
        "Rule sets (seeded",
        "Single-rule write -> enforced",
        "Group member write -> enforced",
        f"PUT /api/v1/policies of {rules:,} palette rules",
        f"PUT /api/v1/policies of {rules:,} irregular rules",
        "beside it, nft -f of the same policy",
        "Agent memory in MiB",
        "Targets",
    ):
        assert heading in stdout, f"{heading!r} missing from:\n{stdout}"
    assert set(api["sets"]) == {"palette", "irregular"}
    shapes = {(r["set"], r["rules"]): r for r in api["rule_sets"]}
    assert {(k, n) for k in api["sets"] for n in (100, 1000, rules)} <= set(shapes)
    # The irregular set is the one with many shapes.
    assert shapes[("irregular", 1000)]["shapes"] > 4 * shapes[("palette", 1000)]["shapes"]
    for kind, r in api["sets"].items():
        assert [w["base_rules"] for w in r["writes"]] == [100, 1000], kind
        for w in r["writes"]:
            assert w["requests"] == requests and 1 <= w["done"] <= requests
            for op in ("post", "put", "delete"):
                s = w[op]
                assert s["n"] == w["done"] and 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"], s
            assert w["enforcement_checks"]["passed_after_put"] == w["done"]
        g = r["groups"]
        if g["supported"]:
            assert [row["base_rules"] for row in g["rows"]] == [100, 1000]
            assert g["replace"]["wall_s"] > 0
        else:
            assert "groups: not supported by this agent" in stdout
        bulk = r["bulk"]
        assert bulk["rules"] == rules and bulk["wall_s"] > 0
        assert bulk["memory"]["peak_mib"] >= bulk["memory"]["rss_mib"] > 0
        assert bulk["nft"]["ns"]["seconds"] > 0 and bulk["nft"]["nl"]["seconds"] > 0
        assert bulk["split"] is None or set(bulk["split"]) == {
            "parse_json_s",
            "validate_s",
            "compile_s",
            "kernel_apply_s",
            "persist_s",
            "diff_s",
            "answer_s",
        }
        assert r["after_writes"]["writes"] > 0 and r["after_writes"]["memory"]["rss_mib"] > 0
        for start in ("restart", "first_start"):
            assert r[start]["startup_s"] > 0 and r[start]["memory"]["rss_mib"] > 0
    assert len(api["targets"]) == 12 * 2
    for t in api["targets"]:
        assert t["met"] in (True, False, None), t
    assert "[    met]" in stdout or "[NOT met]" in stdout


def _check_events_results(ev: dict[str, Any], stdout: str) -> None:
    """The quick flow-event section: one step of 5,000 events, every one in Kafka once."""
    for heading in ("microseg flow-event benchmarks", "offered/s", "Sustained:", "p99 packet"):
        assert heading in stdout, f"{heading!r} missing from:\n{stdout}"
    assert ev["meta"]["quick"] is True and ev["meta"]["acks"] == "all"
    assert ev["warmup"]["generated"] == ev["warmup"]["acked"] > 0
    (step,) = ev["steps"]
    assert step["sent"] == step["generated"] == 5000, step
    assert step["kernel_lost"] == 0 and step["pipeline_dropped"] == 0, step
    assert step["acked"] == step["consumed"] == step["generated"], step
    assert step["duplicates"] == 0 and step["nothing_lost"], step
    assert step["delivered_eps"] > 0
    assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["max_ms"], step
    assert step["latency_samples"] >= 0.99 * step["consumed"]  # those stamped in the window
    assert len(ev["targets"]) == 2


def _check_compare_results(cmp: dict[str, Any], stdout: str, stderr: str, plot: Path) -> None:
    """The quick side-by-side section: every configuration measured, on the intended path."""
    for heading in ("microseg side by side with nftables", "microseg against nftables",
                    "Time to apply the rule set", "Not controlled on this machine"):  # fmt: skip
        assert heading in stdout, f"{heading!r} missing from:\n{stdout}"
    assert cmp["meta"]["quick"] is True
    seen = {(p["config"], p["family"], p["case"]) for p in cmp["points"]}
    assert {("B0", 4, "-"), ("B1", 4, "-")} <= seen
    for config in ("MS", "NL", "NS"):
        assert {(config, 4, c) for c in ("first", "last", "default")} <= seen, config
        assert (config, 6, "default") in seen, config
    for p in cmp["points"]:
        for w in ("tcp", "udp", "rr", "crr"):
            got = p["workloads"][w]
            assert got["median"] > 0 and got["b0"]["median"] > 0, (p["config"], w)
            assert got["vs_b0"]["min"] <= got["vs_b0"]["median"] <= got["vs_b0"]["max"]
        # The counters saw the intended rule (or the default) decide the traffic.
        assert p["rx_packets"] > 0 and p["decided_packets"] >= 0.95 * p["rx_packets"] - 50, p
        if p["config"] in ("B1", "MS"):
            assert (p["classifier_ns"] or {}).get("ingress", 0) > 0, p
    assert {a["config"] for a in cmp["apply"]} == {"MS", "NL", "NS"}
    assert cmp["agent"][0]["when"] == "start" and cmp["agent"][0]["rss_mib"] > 0
    assert cmp["targets"]
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    m = re.search(r"compare: lab (\S+),", stderr)
    assert m, stderr[-2000:]
    assert not Path(f"/run/netns/{m[1]}-host").exists(), f"lab {m[1]} left behind"


def _kafka_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("microseg-kafka-test-*")}


def _bench_pins() -> set[str]:
    if not PIN_ROOT.is_dir():
        return set()
    return {p.name for p in PIN_ROOT.iterdir() if p.name.startswith("bench-")}


def test_quick_run_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    pins_before = _bench_pins()
    kafka_before = _kafka_dirs()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for heading in ("Floor:", "Rule sets", "Per packet.", "Cost against shapes:", "Targets"):
        assert heading in proc.stdout, f"{heading!r} missing from:\n{proc.stdout}"
    for row in ("session hit, IPv4", "new flow, IPv4, top rule", "new flow, IPv6, default"):
        assert row in proc.stdout
    assert str(out) in proc.stdout

    res = json.loads(out.read_text())
    assert res["meta"]["quick"] is True
    assert {f["case"] for f in res["floor"]} >= {"floor-rep-v4", "floor-new-v4"}
    rule_counts = {r["rules"] for r in res["rule_sets"] if r["section"] == "rules"}
    assert rule_counts == {10, 1000}
    cases = {(c["rules"], c["case"]) for c in res["cases"] if c["section"] == "rules"}
    for rules in (10, 1000):
        for case in ("hit-v4", "top-v4", "late-v4", "default-v4", "hit-v6", "top-v6"):
            assert (rules, case) in cases
    for c in res["cases"]:
        assert c["min_ns"] <= c["median_ns"] <= c["max_ns"]
        assert c["median_ns"] > 0
    # Shapes, not rules: 10 and 1,000 palette rules compile to the same shapes.
    shapes = {(r["shapes_v4"], r["shapes_v6"]) for r in res["rule_sets"] if r["section"] == "rules"}
    assert len(shapes) == 1
    assert res["shape_sweep"]["points"]
    assert res["targets"]
    assert _bench_pins() <= pins_before

    _check_api_results(res["api"], proc.stdout, 10, 1000)
    assert res["api"]["meta"]["quick"] is True
    lab = _lab_of(proc.stderr)
    assert not Path(f"/run/netns/{lab}-host").exists(), f"lab {lab} left behind"

    # Flow events to Kafka: the broker and its directory are gone afterwards.
    _check_events_results(res["events"], proc.stdout)
    assert _kafka_dirs() <= kafka_before, "the events bench left its Kafka broker behind"

    # Side by side on real traffic; the quick plot goes next to --out, not to docs/.
    _check_compare_results(res["compare"], proc.stdout, proc.stderr, out.with_suffix(".png"))

    # The fleet: its quick rows (1 and 5 agents).
    assert [r["agents"] for r in res["fleet"]["rows"]] == [1, 5]
    assert "microseg fleet benchmarks" in proc.stdout

    # --only api: a new API section, the datapath results kept as they were.
    again = tmp_path / "again.json"
    shutil.copy(out, again)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "api", "--api-requests", "5",
         "--api-rules", "200", "--out", str(again)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Floor:" not in proc.stdout and "kept the datapath results" in proc.stdout
    assert "kept the events results" in proc.stdout
    assert "kept the compare results" in proc.stdout
    assert "kept the fleet results" in proc.stdout
    res2 = json.loads(again.read_text())
    _check_api_results(res2["api"], proc.stdout, 5, 200)
    assert {k: v for k, v in res2.items() if k != "api"} == {
        k: v for k, v in res.items() if k != "api"
    }
    assert _bench_pins() <= pins_before


def _check_fleet_results(fl: dict[str, Any], stdout: str, changes: int) -> None:
    """A fleet section: every row, the big set, the group change, every target marked."""
    for heading in (
        "microseg fleet benchmarks",
        "One-rule change",
        "rules to 1 agent(s)",
        "Label-group change at 1 agents",
        "Targets",
    ):
        assert heading in stdout, f"{heading!r} missing from:\n{stdout}"
    assert [r["agents"] for r in fl["rows"]] == [1]
    row = fl["rows"][0]
    assert row["convergence"]["n"] == changes and len(row["convergence_s"]) == changes
    assert 0 <= row["convergence"]["p50_ms"] <= row["convergence"]["max_ms"]
    assert row["agent_reported"]["n"] == changes
    assert row["rss"]["max_mib"] > 0 and len(row["rss"]["each_mib"]) == 1
    assert fl["big"]["agents"] == 1 and fl["big"]["converged_s"] >= 0
    assert fl["big"]["rss"]["max_mib"] > 0
    g = fl["group"]
    for key in ("join_from_status", "join_from_start", "leave_from_tombstone"):
        assert g[key]["n"] == 1, g
    assert len(fl["targets"]) == 4
    assert all(("met" if t["met"] else "NOT met") in stdout for t in fl["targets"])


def test_fleet_suite_with_one_agent(tmp_path: Path) -> None:
    """`--only fleet` with one agent and two changes: the table, the JSON, nothing left."""
    out = tmp_path / "fleet.json"
    pins_before = _bench_pins()
    kafka_before = _kafka_dirs()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "fleet", "--fleet-counts", "1",
         "--fleet-changes", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"fleet"} and res["fleet"]["meta"]["quick"] is True
    _check_fleet_results(res["fleet"], proc.stdout, 2)
    assert _bench_pins() <= pins_before, "the fleet bench left pins behind"
    # Other processes' brokers may come meanwhile: a new one whose maker has exited is ours.
    left = [
        d for d in _kafka_dirs() - kafka_before if not Path(f"/proc/{d.split('-')[3]}").exists()
    ]
    assert not left, f"the fleet bench left its Kafka broker behind: {left}"
    labs = re.findall(r"fleet: lab (\S+) for ", proc.stderr)
    assert labs, proc.stderr[-2000:]
    for lab in labs:
        assert not Path(f"/run/netns/{lab}-host").exists(), f"lab {lab} left behind"
    assert not list(Path(tempfile.gettempdir()).glob("microseg-bench-fleet-*"))


def test_bad_option_is_a_clean_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--runs", "0", "--out", str(tmp_path / "x.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--runs" in proc.stderr and "out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_bad_only_is_a_clean_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "kafka", "--out", str(tmp_path / "x.json")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--only" in proc.stderr and "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()
