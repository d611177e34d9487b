"""The classifier in the real kernel, applying policies: generations and banks, no packet sees a
half-applied set, a failed retire of the old bank raised at the next settle, more shapes than
it holds, out of rule slots, events and the event rate limit, attach modes replacing each
other, a restart adopting the pinned state; through BPF_PROG_TEST_RUN on the session's
classifier or a small one of this module's."""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.bpf import kernel_retval as run
from support.bpf import loaded_datapath
from support.classifier import DROP, PASS, R, install, pb, pk, rule_keys
from support.packets import frame

from streamer.datapath.attach import detach, tcx_programs
from streamer.datapath.bindings import test_run as bpf_test_run
from streamer.datapath.compiler import CompiledPolicy, compile_policy
from streamer.datapath.config import DatapathConfig, DatapathError
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.layout import EVENT, JUDGING
from streamer.datapath.maps import KeysLeft, array_key
from streamer.datapath.reference import judge
from streamer.policy.model import PolicySet, parse_policy_document

if TYPE_CHECKING:
    from streamer.lab.lab import Lab


# ---- atomic apply --------------------------------------------------------------------------


def test_apply_increments_generation_and_flips_bank(dp: Datapath) -> None:
    gen, bank = dp.active()
    pol = parse_policy_document({"default_action": "allow", "policies": []})
    c = compile_policy(pol, dp.config.max_shapes)
    assert dp.apply(c) == gen + 1
    assert dp.active() == (gen + 1, bank ^ 1)
    assert dp.apply(c) == gen + 2
    assert dp.active() == (gen + 2, bank)
    assert dp.apply(c, generation=gen + 10) == gen + 10
    assert dp.apply(c, generation=1) == gen + 11  # never backwards


def test_packets_never_see_a_half_applied_set(dp: Datapath) -> None:
    """While sets are swapped back and forth, every new flow is judged by one whole set: the
    probe is allowed by both sets, by rules in different shapes, each of which also holds a
    deny that would catch the probe if its allow were missing."""
    filler = [
        R(
            1000 + i,
            src_ip=f"172.{16 + i % 16}.{i // 16 % 256}.0/24",
            protocol="udp",
            dst_port=1000 + i,
            action="deny",
        )
        for i in range(3000)
    ]
    set_a = parse_policy_document(
        {
            "default_action": "deny",
            "policies": [
                R(1, dst_ip="10.1.2.3", protocol="tcp", priority=200),
                R(2, dst_ip="10.0.0.0/8", action="deny", priority=150),
                *filler,
            ],
        }
    )
    set_b = parse_policy_document(
        {
            "default_action": "deny",
            "policies": [
                R(3, dst_ip="10.1.0.0/16", dst_port="1-65535", protocol="tcp", priority=300),
                R(4, action="deny", priority=250),
                *filler,
            ],
        }
    )
    compiled = [compile_policy(s, dp.config.max_shapes) for s in (set_a, set_b)]
    dp.apply(compiled[0])
    dp.clear_sessions()
    stop = threading.Event()
    results = {"sent": 0, "dropped": 0}
    prog = prog_fd(dp, "ingress")
    frames = [
        frame(pk(f"192.168.{i // 250}.{i % 250 + 1}", "10.1.2.3", "tcp", 1024 + i, 443))
        for i in range(20000)
    ]

    def probe() -> None:
        for data in frames:
            if stop.is_set():
                break
            results["sent"] += 1
            if bpf_test_run(prog, data)[0] != PASS:
                results["dropped"] += 1

    t = threading.Thread(target=probe)
    t.start()
    applied = 0
    try:
        # at least 12 swaps, and on until the probe has run for a while alongside them
        for i in range(400):
            dp.apply(compiled[(i + 1) % 2])
            applied += 1
            if applied >= 12 and (results["sent"] >= 3000 or not t.is_alive()):
                break
    finally:
        stop.set()
        t.join(timeout=60)
    dp.clear_sessions()
    assert not t.is_alive()
    assert results["sent"] >= 1000, (results, applied)
    assert results["dropped"] == 0, (results, applied)


def test_judges_count_themselves_out_and_a_retired_bank_waits_for_them(dp: Datapath) -> None:
    """Every judge counts itself in for the bank it reads and out when done (`judging` is 0
    everywhere after packets); `Maps.quiesce` waits while a count is not 0, and gives up
    after its timeout for the RCU barrier."""
    install(dp, "deny", R(1, dst_ip="10.9.0.1", protocol="tcp", dst_port=80))
    for i in range(200):
        run(dp, pk("10.0.0.1", "10.9.0.1", "tcp", 1000 + i, 80 + i % 2))
    counts = [JUDGING.unpack(v) for v in dp._maps.percpu("judging", 0)]
    assert counts == [(0, 0)] * len(counts)
    maps, bank = dp._maps, dp.active()[1] ^ 1
    assert maps.quiesce(bank)
    # A judge of `bank` in flight on the last CPU (written by hand): waited for until it ends.
    busy = [JUDGING.pack(0, 0)] * (len(counts) - 1) + [
        JUDGING.pack(*((1, 0) if bank == 0 else (0, 1)))
    ]
    maps.update_batch("judging", [array_key(0)], [b"".join(busy)])
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(maps.quiesce(bank, timeout=30)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive() and not done
    maps.update_batch("judging", [array_key(0)], [JUDGING.pack(0, 0) * len(counts)])
    waiter.join(10)
    assert done == [True]
    # One that never ends: the timeout, then the RCU barrier.
    maps.update_batch("judging", [array_key(0)], [b"".join(busy)])
    try:
        assert maps.quiesce(bank, timeout=0.05) is False
    finally:
        maps.update_batch("judging", [array_key(0)], [JUDGING.pack(0, 0) * len(counts)])
    dp.clear_sessions()


def test_failed_bank_writes_change_nothing_and_are_repaired(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both banks hold the live set. A failure writing the idle bank fails the apply and
    changes nothing (that bank is rewritten whole at the next apply). After a flip the other
    bank is brought level beside the caller; a failure there is not lost with its thread: the
    next settle (every apply and close runs one) tries again, rewriting it whole, and logs what
    failed; if that fails too it raises, the live bank stays, and a later apply repairs it."""
    cfg = DatapathConfig(
        instance=f"test-retire-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=1024,
        max_shapes=8,
        rule_slots=64,
        rule_entries=4096,
    )

    def pol(*ids: int) -> CompiledPolicy:
        rules = [R(i, src_ip=f"10.{i}.0.0/16", dst_port=i) for i in ids]
        return compile_policy(parse_policy_document({"policies": rules}), cfg.max_shapes)

    with loaded_datapath(cfg) as dp:
        failures = {"apply": 0, "thread": 0}
        real_delete = dp._maps.delete_batch

        def flaky(name: str, keys: list[bytes]) -> None:
            where = "thread" if threading.current_thread().name == "microseg-retire" else "apply"
            if failures[where] and name == "rules4" and keys:
                failures[where] -= 1
                raise KeysLeft(name, keys, errno.EBUSY)
            real_delete(name, keys)

        monkeypatch.setattr(dp._maps, "delete_batch", flaky)

        def stored() -> int:
            return rule_keys(dp, 4)

        def retired() -> None:  # the catch-up thread has run (whatever became of it)
            for t in threading.enumerate():
                if t.name == "microseg-retire":
                    t.join()

        dp.apply(pol(1, 2))
        dp.settle()
        live = stored() // 2
        assert live > 0 and stored() == 2 * live == dp.map_fill()["rules4"].entries

        # Writing the idle bank fails: nothing changes; the next apply repairs that bank.
        gen = dp.active()[0]
        failures["apply"] = 1
        with pytest.raises(KeysLeft):
            dp.apply(pol(3, 4))
        assert dp.active()[0] == gen
        assert run(dp, pk("10.1.0.1", "10.0.0.2", "tcp", 1, 1)) == PASS
        gen = dp.apply(pol(3, 4))
        dp.settle()
        assert dp.active()[0] == gen and stored() == 2 * live
        assert dp.map_fill()["rules4"].entries == 2 * live

        # The catch-up fails once: the retry at the next settle rewrites the bank, and says so.
        failures["thread"] = 1
        dp.apply(pol(5, 6))
        retired()
        with caplog.at_level(logging.WARNING, logger="streamer.datapath.banks"):
            dp.settle()
        assert "updating the other policy bank" in caplog.text
        assert os.strerror(errno.EBUSY) in caplog.text
        assert stored() == 2 * live and dp.map_fill()["rules4"].entries == 2 * live

        # Fails twice (in the thread and on the retry): the next apply raises and changes
        # nothing; the one after repairs the bank and applies.
        failures["thread"] = 1
        gen = dp.apply(pol(7, 8))
        retired()
        failures["apply"] = 1  # the retry runs in the caller's thread
        with pytest.raises(DatapathError, match="updating the other policy bank"):
            dp.apply(pol(9, 10))
        assert dp.active()[0] == gen
        assert run(dp, pk("10.7.0.1", "10.0.0.2", "tcp", 1, 7)) == PASS  # still enforcing
        gen = dp.apply(pol(9, 10))
        dp.settle()
        assert dp.active()[0] == gen and stored() == 2 * live
        assert set(dp.all_rule_counters()) == {9, 10}

        # A catch-up that fails at close is raised there, once our references are released;
        # what it left stays in the pinned maps, where the next load finds it and the next
        # apply clears it.
        failures["thread"] = 1
        dp.apply(pol(11))
        retired()
        failures["apply"] = 1
        with pytest.raises(DatapathError, match="updating the other policy bank"):
            dp.close()
        assert not dp.loaded
        dp.close()  # nothing left to wait for
        with Datapath(cfg) as again:
            assert rule_keys(again, 4) == live + live // 2
            again.apply(pol(12))
            again.settle()
            assert rule_keys(again, 4) == live
        assert not again.loaded


@pytest.fixture(scope="module")
def small_dp() -> Iterator[Datapath]:
    """A classifier with room for 8 shapes per family and 15 rule counter slots (slots 0 and
    1 are the default action's and failsafe traffic's)."""
    cfg = DatapathConfig(
        instance=f"test-small-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=1024,
        max_shapes=8,
        rule_slots=17,
        rule_entries=4096,
        event_interval_ns=50_000_000,
    )
    with loaded_datapath(cfg) as dp:
        yield dp


def _many_shapes(n: int, first_id: int = 100) -> PolicySet:
    return parse_policy_document(
        {
            "default_action": "allow",
            "policies": [
                R(first_id + p, src_ip=f"10.0.0.0/{p}", action="deny") for p in range(8, 8 + n)
            ],
        }
    )


def test_more_shapes_than_the_classifier_holds_are_merged(small_dp: Datapath) -> None:
    dp = small_dp
    install(dp, "deny", R(1, protocol="tcp", dst_port=22))
    gen = dp.active()
    # A set compiled for a larger table must not be written past this one's shape slots.
    too_big = compile_policy(_many_shapes(12), 1024)
    assert len(too_big.v4.shapes) == 12
    with pytest.raises(DatapathError):
        dp.apply(too_big)
    assert dp.active() == gen
    # Compiled for this table, the 12 shapes are merged into 8 and judge exactly the same.
    pol = _many_shapes(12)
    fitted = compile_policy(pol, dp.config.max_shapes)
    assert len(fitted.v4.shapes) <= 8
    assert dp.apply(fitted) == gen[0] + 1
    rng = random.Random(7)
    for p in range(6, 22):
        for _ in range(4):
            inside = ipaddress.IPv4Address(
                int(ipaddress.IPv4Address("10.0.0.0")) | rng.getrandbits(32 - p)
            )
            dp.clear_sessions()
            pkt = pk(str(inside), "192.0.2.1", "udp", 1, 2)
            assert run(dp, pkt) == (PASS if judge(pol, pkt).passes else DROP), (p, inside)


def test_out_of_rule_slots_raises_and_live_set_keeps_enforcing(small_dp: Datapath) -> None:
    dp = small_dp
    install(dp, "deny")  # no rule holds a slot
    install(dp, "deny", *[R(200 + i, dst_port=1000 + i, protocol="tcp") for i in range(10)])
    gen = dp.active()
    # 10 live + 6 new > 15 slots
    crowd = parse_policy_document(
        {
            "default_action": "allow",
            "policies": [
                R(300 + i, dst_port=2000 + i, protocol="tcp", action="deny") for i in range(6)
            ],
        }
    )
    with pytest.raises(DatapathError, match="slots"):
        dp.apply(compile_policy(crowd, dp.config.max_shapes))
    assert dp.active() == gen
    dp.clear_sessions()
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 1005)) == PASS
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 2005)) == DROP
    # A failed apply must not leak slots: 10 live + 5 new fit.
    fits = parse_policy_document(
        {
            "default_action": "allow",
            "policies": [
                R(400 + i, dst_port=3000 + i, protocol="tcp", action="deny") for i in range(5)
            ],
        }
    )
    dp.apply(compile_policy(fits, dp.config.max_shapes))
    dp.clear_sessions()
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 3004)) == DROP
    assert run(dp, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 1005)) == PASS


def test_events_update_after_interval(small_dp: Datapath) -> None:
    dp = small_dp
    install(dp, "deny")
    records: list[bytes] = []
    dp.open_events(records.append)

    def drain() -> list[bytes]:
        dp.consume_events()
        out = records[:]
        records.clear()
        return out

    drain()
    p = pk("10.0.0.1", "10.0.0.2", "udp", 7, 8, length=100)
    assert run(dp, p) == DROP
    assert run(dp, p) == DROP
    (new,) = drain()
    threading.Event().wait(dp.config.event_interval_ns / 1e9 * 3)
    assert run(dp, p.reply()) == DROP
    (upd,) = drain()
    e_new, e_upd = EVENT.unpack(new), EVENT.unpack(upd)
    assert (e_new[1], e_new[2], e_new[15]) == (1, 100, 1)  # packets, bytes, kind new
    assert (e_upd[1], e_upd[2], e_upd[15]) == (2, 200, 2)  # since the first event; update
    assert e_upd[0] > e_new[0]


def test_full_table_keeps_the_event_rate_limit() -> None:
    """A denied flow that finds the session table full is judged on every packet, but sends
    one `new` event and then, after the interval, one `update` with every packet since."""
    cfg = DatapathConfig(
        instance=f"test-full-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=4,
        event_interval_ns=50_000_000,
    )
    with loaded_datapath(cfg) as dp:
        install(dp, "deny")
        records: list[bytes] = []
        dp.open_events(records.append)
        for i in range(8):  # fill the table (4 flows; the rest are turned away)
            run(dp, pk(f"10.1.0.{i + 1}", "10.0.0.2", "udp", 7, 8))
        assert dp.counters()["active_sessions"] == 4
        dp.consume_events()
        records.clear()
        c0 = dp.counters()["session_create_failed"]
        p = pk("10.0.0.1", "10.0.0.2", "udp", 7, 9, length=100)
        for _ in range(5):
            assert run(dp, p) == DROP
        dp.consume_events()
        assert dp.counters()["session_create_failed"] == c0 + 5
        (new,) = records
        records.clear()
        threading.Event().wait(cfg.event_interval_ns / 1e9 * 3)
        assert run(dp, p) == DROP
        dp.consume_events()
        (upd,) = records
        e_new, e_upd = EVENT.unpack(new), EVENT.unpack(upd)
        assert (e_new[1], e_new[2], e_new[15]) == (1, 100, 1)  # packets, bytes, kind new
        assert (e_upd[1], e_upd[2], e_upd[15]) == (5, 500, 2)  # the 4 held back and this one


def test_attach_modes_replace_each_other(lab: Lab) -> None:
    """tcx links and clsact filters: each mode replaces the other's attachment (after its own
    is in), a second attach in the same mode swaps the program in place, and detach removes
    whatever is there; traffic is judged by one of ours throughout."""
    cfg = DatapathConfig(
        instance=f"test-attach-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        session_entries=1024,
        run_dir=Path(tempfile.mkdtemp(prefix="ms-attach-")),
    )

    def ours() -> dict[str, list[int]]:
        tcx = tcx_programs(lab.host_if, lab.host_ns)
        out = {h: [i for i, n in progs if n == f"ms_{h}"] for h, progs in tcx.items()}
        for h in out:
            shown = subprocess.run(
                ["tc", "-n", lab.host_ns, "filter", "show", "dev", lab.host_if, h],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            out[h] += [-int(m[1]) for m in re.finditer(rf"ms_{h} .*?\bid (\d+)", shown)]
        return out  # tcx ids positive, clsact filter ids negative

    try:
        with loaded_datapath(replace(cfg, attach_mode="tc")) as dp:
            dp.apply(compile_policy(parse_policy_document({"default_action": "allow"}), 1024))
            dp.attach(lab.host_if, lab.host_ns)
            first = ours()
            assert all(len(v) == 1 and v[0] < 0 for v in first.values()), first
            for mode, sign in (("tcx", 1), ("tcx", 1), ("auto", 1), ("tc", -1)):
                again = Datapath(replace(cfg, attach_mode=mode))
                again.load()
                try:
                    again.attach(lab.host_if, lab.host_ns)
                    # what was attached, never the mode asked ("auto")
                    attached = "tc" if sign < 0 else "tcx"
                    assert again.attached_as == {lab.host_if: attached}, mode
                    record = json.loads(cfg.attachments_file.read_text())
                    assert record[f"{lab.host_ns}/{lab.host_if}"]["mode"] == attached, record
                finally:
                    again.close()
                now = ours()
                assert all(len(v) == 1 and v[0] * sign > 0 for v in now.values()), (mode, now)
                assert now != first, mode  # the new programs, in place
                first = now
            with pytest.raises(DatapathError, match="attach mode"):
                Datapath(replace(cfg, attach_mode="xdp")).attach(lab.host_if, lab.host_ns)
            removed = detach(lab.host_if, lab.host_ns, cfg.run_dir)
            # the first attach made the clsact qdisc, so it goes too
            want = [f"{lab.host_if} {x}" for x in ("clsact", "egress", "ingress")]
            assert sorted(removed) == want
            assert ours() == {"ingress": [], "egress": []}
    finally:
        detach(lab.host_if, lab.host_ns, cfg.run_dir)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)


def test_restart_adopts_pinned_state(small_dp: Datapath) -> None:
    """A second Datapath on the same pins (an agent restart) keeps enforcing, knows the live
    bank's rules and counters, and replaces the set cleanly. Runs last in this module: the
    first instance's bookkeeping is stale afterwards."""
    dp = small_dp
    install(
        dp,
        "deny",
        R(31, src_ip="2001:db8::/32", protocol="udp", dst_port="100-103"),
        R(32, src_ip="10.0.0.0/8", protocol="tcp"),
    )
    p6 = pk("2001:db8::1", "2001:db8::2", "udp", 9, 101)
    assert run(dp, p6) == PASS
    gen = dp.active()
    second = Datapath(dp.config)
    try:
        second.load()
        assert second.active() == gen
        assert run(second, pk("10.0.0.1", "10.0.0.2", "tcp", 1, 2)) == PASS
        assert run(second, pk("11.0.0.1", "10.0.0.2", "tcp", 1, 2)) == DROP
        assert pb(second.rule_counters(31)) == (1, len(frame(p6)))
        second.apply(
            compile_policy(
                parse_policy_document(
                    {
                        "default_action": "allow",
                        "policies": [R(33, dst_ip="2001:db8::2", action="deny")],
                    }
                ),
                8,
            )
        )
        second.settle()  # the other bank is brought level beside the caller
        assert rule_keys(second, 4) == 0
        assert rule_keys(second, 6) == 2 * 2  # one key per direction, in both banks
        second.clear_sessions()
        assert run(second, p6) == DROP
        assert run(second, pk("11.0.0.1", "10.0.0.2", "tcp", 1, 2)) == PASS
    finally:
        second.close()
