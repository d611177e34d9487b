"""The admin API suite's targets (issue 18) and its plain-text table.

In: the results dict of bench.api.run_api_bench. Out: `targets` (one dict per target and rule
set: what, value, unit, limit, met: True / False / None when not measurable, e.g. an agent
without address groups) and `render_api` (the table, the targets marked met / NOT met).
A missed target is printed, never a failure.
"""

from __future__ import annotations

from typing import Any

from bench.apisplit import SPLIT_PIECES

WRITE_P99_MS = 10.0  # single-rule POST / PUT / DELETE, one group member add / remove
BULK_S = 1.0  # PUT of 100,000 rules
GROUP_REPLACE_S = 0.5  # a 100,000-member group replaced
RSS_MIB = 250.0  # after the PUT, after a start, after 1,000 single-rule writes
PEAK_MIB = 400.0  # during the PUT
STARTUP_S = 2.0  # process start to enforcing, 100,000 rules
TARGET_SIZES = (100, 10_000, 100_000)
NOT_SUPPORTED = "groups: not supported by this agent"
DELETE_CHECK_EVERY = 10


def _sizes(values: dict[int, float]) -> str:
    return " / ".join(f"{n:,}" for n in values)


def _target(
    kind: str, key: str, what: str, value: float | None, unit: str, limit: float,
    detail: str = "", complete: bool = True,
) -> dict[str, Any]:  # fmt: skip
    met = None if value is None else (value <= limit and complete)
    return {
        "set": kind, "id": key, "what": what, "value": value, "unit": unit, "limit": limit,
        "met": met, "detail": detail,
    }  # fmt: skip


def _p99_target(kind: str, key: str, what: str, rows: list[dict[str, Any]], op: str
                ) -> dict[str, Any]:  # fmt: skip
    values = {r["base_rules"]: r[op]["p99_ms"] for r in rows}
    shown = " / ".join(f"{v:.1f}" for v in values.values())
    missing = [n for n in TARGET_SIZES if n not in values]
    note = f" (not at {' / '.join(f'{n:,}' for n in missing)})" if missing else ""
    return _target(
        kind, key, f"{what} -> enforced p99 <= {WRITE_P99_MS:g} ms at {_sizes(values)} rules"
        f"{note}", max(values.values()), "ms", WRITE_P99_MS, f"{shown} ms",
    )  # fmt: skip


def _nft_s(n: dict[str, Any]) -> str:
    return f"> {n['bound_s']:.0f} s" if n["over_bound"] else f"{n['seconds']:.2f} s"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 18, per rule set."""
    out: list[dict[str, Any]] = []
    for kind, r in res["sets"].items():
        writes = r["writes"]
        for op, name in (("post", "POST"), ("put", "PUT"), ("delete", "DELETE")):
            out.append(_p99_target(kind, f"write_{op}_p99", f"single-rule {name}", writes, op))
        g = r["groups"]
        for op, name in (("add", "add"), ("remove", "remove")):
            if g["supported"]:
                out.append(_p99_target(kind, f"group_{op}_p99", f"one group member {name}",
                                       g["rows"], op))  # fmt: skip
            else:
                out.append(_target(kind, f"group_{op}_p99", f"one group member {name} ->"
                                   f" enforced p99 <= {WRITE_P99_MS:g} ms", None, "ms",
                                   WRITE_P99_MS, NOT_SUPPORTED))  # fmt: skip
        b = r["bulk"]
        nft = b.get("nft")
        beside = ""
        if nft:
            ns = nft["ns"]
            beside = f"nft -f as sets {_nft_s(ns)}, as a chain {_nft_s(nft['nl'])}"
        out.append(_target(kind, "bulk_put_s", f"PUT of {b['rules']:,} rules <= {BULK_S:g} s",
                           b["wall_s"], "s", BULK_S, beside))  # fmt: skip
        rep = g["replace"]
        members = res["meta"]["group_members"]
        out.append(_target(
            kind, "group_replace_s",
            f"a {members:,}-member group replaced <= {GROUP_REPLACE_S:g} s",
            rep["wall_s"] if rep else None, "s", GROUP_REPLACE_S, "" if rep else NOT_SUPPORTED,
        ))  # fmt: skip
        out.append(_target(kind, "rss_after_put_mib", f"RSS after the PUT <= {RSS_MIB:g} MiB",
                           b["memory"]["rss_mib"], "MiB", RSS_MIB))  # fmt: skip
        out.append(_target(kind, "peak_in_put_mib", f"peak during the PUT <= {PEAK_MIB:g} MiB",
                           b["memory"]["peak_mib"], "MiB", PEAK_MIB))  # fmt: skip
        starts = {"restart": r["restart"], "first start": r["first_start"]}
        rss = {k: v["memory"]["rss_mib"] for k, v in starts.items()}
        out.append(_target(
            kind, "rss_after_start_mib", f"RSS after a start <= {RSS_MIB:g} MiB",
            max(rss.values()), "MiB", RSS_MIB, ", ".join(f"{k} {v:.0f}" for k, v in rss.items()),
        ))  # fmt: skip
        w = r["after_writes"]
        short = f"only {w['writes']:,} of {w['of']:,} writes in the time budget"
        out.append(_target(
            kind, "rss_after_writes_mib", f"RSS after {w['of']:,} single-rule writes <="
            f" {RSS_MIB:g} MiB", w["memory"]["rss_mib"], "MiB", RSS_MIB,
            short if w["budget_hit"] else "", complete=not w["budget_hit"],
        ))  # fmt: skip
        up = {k: v["startup_s"] for k, v in starts.items()}
        out.append(_target(
            kind, "startup_s", f"start-up with {b['rules']:,} rules to enforcing <="
            f" {STARTUP_S:g} s", max(up.values()), "s", STARTUP_S,
            ", ".join(f"{k} {v:.2f} s" for k, v in up.items()),
        ))  # fmt: skip
    return out


# ---- output ------------------------------------------------------------------------------------


def _rounds(row: dict[str, Any]) -> str:
    return f"{row['done']:,}/{row['requests']:,}"


def _p99_mark(row: dict[str, Any], ops: tuple[str, ...]) -> str:
    late = [op.upper() for op in ops if row[op]["p99_ms"] > WRITE_P99_MS]
    return "met" if not late else f"NOT met ({', '.join(late)})"


def _mem(m: dict[str, float]) -> str:
    return f"{m['rss_mib']:.0f} ({m['peak_mib']:.0f})"


def render_api(res: dict[str, Any]) -> str:
    """The plain-text table of an API results dict."""
    lines: list[str] = []
    add = lines.append
    m = res["meta"]
    sets = res["sets"]
    add("microseg admin API benchmarks (a real agent on a lab veth, HTTP over loopback,")
    add(f"one request at a time on a keep-alive connection){'; QUICK mode' if m['quick'] else ''}")
    add(
        f"{m['cpus']} CPUs, load average {m['load_before']:.2f} before and {m['load_after']:.2f}"
        " after (other work on the machine shows in the tails)"
    )
    add("")
    add("Rule sets (seeded; compiled here as the agent compiles them):")
    add(f"  {'set':<10} {'rules':>8} {'shapes':>7} {'(v4+v6)':>9} {'entries':>9}")
    for rs in res["rule_sets"]:
        add(
            f"  {rs['set']:<10} {rs['rules']:>8,} {rs['shapes']:>7,}"
            f" {'(' + str(rs['shapes_v4']) + '+' + str(rs['shapes_v6']) + ')':>9}"
            f" {rs['entries']:>9,}"
        )
    add("")
    add("Single-rule write -> enforced: round trip of the request; its answer means the kernel")
    add("enforces the change (checked: after each POST a connection through the rule passes;")
    add("after each PUT, which moves the rule to another port and priority, one to the new port")
    add(f"passes; every {DELETE_CHECK_EVERY}th round the old port and, after DELETE, the new one"
        " are refused). ms;")  # fmt: skip
    add(f"a row stops after {m['budget_s']:g} s (rounds: done/asked).")
    head = (f"  {'set':<10} {'live rules':>10} {'rounds':>9}   {'POST p50':>8} {'p99':>7}"
            f"   {'PUT p50':>7} {'p99':>7}   {'DELETE p50':>10} {'p99':>7}"
            f"   p99 <= {WRITE_P99_MS:g} ms")  # fmt: skip
    add(head)
    for kind, r in sets.items():
        for w in r["writes"]:
            p, u, d = w["post"], w["put"], w["delete"]
            add(
                f"  {kind:<10} {w['base_rules']:>10,} {_rounds(w):>9}"
                f"   {p['p50_ms']:>8.1f} {p['p99_ms']:>7.1f}"
                f"   {u['p50_ms']:>7.1f} {u['p99_ms']:>7.1f}"
                f"   {d['p50_ms']:>10.1f} {d['p99_ms']:>7.1f}"
                f"   {_p99_mark(w, ('post', 'put', 'delete'))}"
            )
    add("")
    add("Group member write -> enforced (SPEC §5): a rule allows the port from a group; one")
    add("member (the lab peer's address) added, a connection passes; removed, it is refused")
    add(f"(checked every {DELETE_CHECK_EVERY}th round). ms.")
    add(f"  {'set':<10} {'live rules':>10} {'rounds':>9}   {'add p50':>8} {'p99':>7}"
        f"   {'remove p50':>10} {'p99':>7}   p99 <= {WRITE_P99_MS:g} ms")  # fmt: skip
    for kind, r in sets.items():
        g = r["groups"]
        if not g["supported"]:
            add(f"  {kind:<10} {NOT_SUPPORTED}")
            continue
        for row in g["rows"]:
            a, x = row["add"], row["remove"]
            add(
                f"  {kind:<10} {row['base_rules']:>10,} {_rounds(row):>9}"
                f"   {a['p50_ms']:>8.1f} {a['p99_ms']:>7.1f}"
                f"   {x['p50_ms']:>10.1f} {x['p99_ms']:>7.1f}   {_p99_mark(row, ('add', 'remove'))}"
            )
    add("")
    for kind, r in sets.items():
        b = r["bulk"]
        add(
            f"PUT /api/v1/policies of {b['rules']:,} {kind} rules ({b['body_bytes'] / 2**20:.1f}"
            f" MiB) replacing {b['replacing']:,}, wall time of the request:"
        )
        spread = f" (median of {b['runs']}, {b['wall_min_s']:.2f}..{b['wall_max_s']:.2f})"
        add(
            f"  {b['wall_s']:.2f} s{spread if b['runs'] > 1 else ''};"
            f" back to {b['replacing']:,} rules: {b['back_to_base_s']:.2f} s"
        )
        nft = b.get("nft")
        if nft:
            cells = []
            for key, name in (("ns", "as sets (NS)"), ("nl", "as one chain (NL)")):
                n = nft[key]
                cells.append(f"{name} {_nft_s(n)} ({n['nft_rules']:,} nft rules)")
            add(f"  beside it, nft -f of the same policy (ingress rules): {cells[0]},")
            add(f"  {cells[1]}")
        sp = b.get("split")
        if sp:
            total = sum(sp[key] for key, _ in SPLIT_PIECES)
            add("  its pieces, the store's own steps timed in a fresh process on a private"
                " classifier:")  # fmt: skip
            shown = [f"{name} {sp[key]:.2f} s" for key, name in SPLIT_PIECES]
            add("  " + ", ".join(shown[:4]) + ",")
            add("  " + ", ".join(shown[4:]))
            rest = b["wall_s"] - total
            add(
                f"  = {total:.2f} s; HTTP transfer, event loop and the rest ~{rest:.2f} s"
                if rest >= 0
                else f"  = {total:.2f} s (more than the request took: timing noise)"
            )
        elif "split_error" in b:
            add(f"  its pieces: not timed ({b['split_error']})")
        rep = r["groups"]["replace"]
        if rep:
            add(
                f"A group of {rep['members']:,} members replaced (PUT /api/v1/groups/{{name}}),"
                f" {rep['rules']:,} rules live: {rep['wall_s']:.3f} s"
            )
            add(
                f"  (median of {rep['replacements']},"
                f" {rep['wall_min_s']:.3f}..{rep['wall_max_s']:.3f});"
                f' set up by a whole-set PUT with "groups": {rep["setup_s"]:.2f} s;'
            )
            add(f"  agent memory after: {_mem(rep['memory'])} MiB")
        add("")
    rules = f"{m['bulk_rules']:,}"
    add(f"Agent memory in MiB: VmRSS (peak VmHWM), and start-up with {rules} rules: process")
    add("start until its API answers and a connection the policy allows passes (one it does not")
    add("is refused). Restart: stopped leaving its pins, started onto them; first start: a fresh")
    add("instance, no pins, the policy file seeding an empty state dir.")
    add(f"  {'set':<10} {'after PUT':>12} {'after writes':>28} {'restart':>20}"
        f" {'first start':>20}")  # fmt: skip
    for kind, r in sets.items():
        w = r["after_writes"]
        writes = f"{_mem(w['memory'])}, {w['writes']:,}{'!' if w['budget_hit'] else ''} writes"
        starts = [
            f"{x['startup_s']:.2f} s {_mem(x['memory'])}" for x in (r["restart"], r["first_start"])
        ]
        add(
            f"  {kind:<10} {_mem(r['bulk']['memory']):>12} {writes:>28}"
            f" {starts[0]:>20} {starts[1]:>20}"
        )
    if any(r["after_writes"]["budget_hit"] for r in sets.values()):
        add(f"  (!: fewer than {m['rss_writes']:,} single-rule writes done in the time budget)")
    add("")
    add("Targets (informational: a missed target is printed, never a failure)")
    for t in res["targets"]:
        mark = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        if t["value"] is None or t["unit"] == "ms":
            value = t["detail"]
        else:
            fmt = f"{t['value']:.0f} MiB" if t["unit"] == "MiB" else f"{t['value']:.2f} s"
            value = fmt + (f" ({t['detail']})" if t["detail"] else "")
        add(f"  [{mark:>7}] {t['set']}: {t['what']}: {value}")
    add(f"API bench time {m['elapsed_s']:.0f} s.")
    return "\n".join(lines)
