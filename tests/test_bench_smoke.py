"""Smoke test of `python -m bench` (the `make bench` suite) in its tiny --quick mode.

Checks that it runs end to end on the real kernel, prints its table, writes its JSON where
--out says, removes its pinned maps, and refuses bad options without a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_ROOT = Path("/sys/fs/bpf/microseg")


def _bench_pins() -> set[str]:
    if not PIN_ROOT.is_dir():
        return set()
    return {p.name for p in PIN_ROOT.iterdir() if p.name.startswith("bench-")}


def test_quick_run_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    pins_before = _bench_pins()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
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


def test_bad_option_is_a_clean_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--runs", "0", "--out", str(tmp_path / "x.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--runs" in proc.stderr and "out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()
