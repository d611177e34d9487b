"""A storm of single-rule and group-member changes made in place (the agent's own path:
streamer.agent.edits.change_tables, then Datapath.apply_change) while packets are judged
beside it, real UDP traffic through a lab's veth and BPF_PROG_TEST_RUN packets: every verdict
equals the reference model's under the generation before or after the change in flight,
never a mix; afterwards both banks hold exactly what a whole compile of the final set gives."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from support.bpf import kernel_retval as run
from support.classifier import DROP, PASS, R, pk

from streamer.agent.edits import change_tables
from streamer.datapath.attach import detach
from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import BANK, RULE_KEY4, RULE_KEY6, RULE_VAL, SHAPE
from streamer.datapath.reference import Packet, judge
from streamer.lab.lab import Lab
from streamer.lab.netns import netns_socket
from streamer.policy.model import Group, PolicySet, Rule, parse_policy_document
from streamer.policy.state import Edit, PolicyState
from streamer.vocabulary import DefaultAction

CHANGES = 300
REAL_PORTS = (80, 443, 1500, 22)
MARKER_PORT = 9  # always allowed (rule 1, above every storm rule): it follows each probe
REAL_FLOWS = 600  # sockets a real probe run may use, each once per port: new flows only
TIME_LIMIT = 90.0


@dataclass
class Pools:
    """Addresses the storm's rules and group members are drawn from: the lab's own (so the
    real traffic's verdicts change) and the test-run packets' 10.0.0.0/8."""

    srcs: tuple[str, ...]
    dsts: tuple[str, ...]


def _pools(lab: Lab) -> Pools:
    peer_net = lab.peer_v4.rsplit(".", 1)[0] + ".0/24"
    return Pools(
        srcs=(
            f"{lab.peer_v4}/32",
            peer_net,
            "10.1.0.0/16",
            "10.2.3.4",
            "10.0.0.0/8",
            "10.3.7.0/24",
        ),
        dsts=(f"{lab.host_v4}/32", "10.9.0.1", "10.9.1.0/24", "10.9.2.7", "10.9.3.0/28"),
    )


def _rule(rng: random.Random, rule_id: int, pools: Pools) -> Rule:
    doc: dict[str, Any] = R(
        rule_id,
        protocol=rng.choice(("tcp", "udp", "udp", "any")),
        action=rng.choice(("allow", "deny", "log")),
        priority=rng.randint(1, 9),
    )
    src = rng.random()
    if src < 0.25:
        doc["src_group"] = "srcs"
    elif src < 0.8:
        doc["src_ip"] = rng.choice(pools.srcs)
    dst = rng.random()
    if dst < 0.25:
        doc["dst_group"] = "dsts"
    elif dst < 0.8:
        doc["dst_ip"] = rng.choice(pools.dsts)
    if doc["protocol"] != "any":
        doc["dst_port"] = rng.choice((80, 443, "1000-1999", "20-30"))
    return Rule.model_validate(doc)


def _edit(rng: random.Random, state: PolicyState, pools: Pools, next_id: int) -> Edit:
    """One random change of `state`: a rule added, removed or changed, or one member of a
    group added or removed."""
    op = rng.random()
    storm = [rid for rid in state.rules if rid != 1]
    if op < 0.25 or len(storm) < 20:
        return Edit("add", added=[_rule(rng, next_id, pools)])
    if op < 0.45:
        return Edit("remove", removed=[state.rules[rng.choice(storm)]])
    if op < 0.7:
        rid = rng.choice(storm)
        return Edit("change", changed=[(state.rules[rid], _rule(rng, rid, pools))])
    name = rng.choice(("srcs", "dsts"))
    old = state.groups[name]
    pool = pools.srcs if name == "srcs" else pools.dsts
    absent = [m for m in map(_canonical, pool) if m not in old.members]
    if old.members and (not absent or rng.random() < 0.5):
        new, removed, _ = old.without_members([rng.choice(old.members)])
        return Edit("members", groups={name: (old, new, [], removed)})
    new, added, _ = old.with_members([rng.choice(absent)])
    return Edit("members", groups={name: (old, new, added, [])})


def _canonical(member: str) -> str:
    return Group.model_validate({"members": [member]}).members[0]


def _test_run_packets(rng: random.Random, n: int) -> list[Packet]:
    return [
        pk(
            f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            f"10.9.{rng.randrange(4)}.{rng.choice((1, 7))}",
            rng.choice(("tcp", "udp")),
            1024 + i % 60000,
            rng.choice((80, 443, 1500, 22)),
        )
        for i in range(n)
    ]


def _kernel_tables(dp: Datapath, bank: int) -> dict[tuple[int, bytes, bytes], tuple[int, int]]:
    """The entries of one bank: (family, the shape's masks, the key after its shape field)
    -> (score, rule_id)."""
    ms = dp.config.max_shapes
    header = dp._maps.lookup("banks", struct.pack("<I", bank), BANK.size)
    assert header is not None
    counts = BANK.unpack(header)[1:3]
    masks: dict[tuple[int, int], bytes] = {}
    for fidx, family in ((0, 4), (1, 6)):
        for i in range(counts[fidx]):
            raw = dp._maps.lookup("shapes", struct.pack("<I", (bank * 2 + fidx) * ms + i), 64)
            assert raw is not None
            fields = SHAPE.unpack(raw[: SHAPE.size])
            masks[(family, fields[SHAPE.index("key_shape")])] = bytes(raw[:37])
    out = {}
    for family, layout in ((4, RULE_KEY4), (6, RULE_KEY6)):
        for key, val in dp._maps.walk(f"rules{family}", layout.size, RULE_VAL.size):
            shape = struct.unpack_from("<H", key)[0]
            if shape // ms != bank:
                continue
            assert (family, shape) in masks, "an entry of a shape the bank does not probe"
            v = RULE_VAL.unpack(val)
            out[(family, masks[(family, shape)], key[2:])] = (v[0], v[1])
    return out


@pytest.fixture
def lab_dp(dp: Datapath, lab: Lab) -> Iterator[Datapath]:
    """The session's classifier attached to a fresh lab's host side, detached afterwards."""
    dp.attach(lab.host_if, lab.host_ns)
    try:
        yield dp
    finally:
        detach(lab.host_if, lab.host_ns, dp.config.run_dir)
        dp.clear_sessions()


class RealProbes:
    """UDP datagrams from the lab's peer to its host, each a new flow, each followed by one
    on the always-allowed marker port: once the marker is in, the probe has been judged.
    `seen`: (sport, dport, generation before sending, delivered, generation after)."""

    def __init__(self, dp: Datapath, lab: Lab) -> None:
        self.dp, self.lab = dp, lab
        self.seen: list[tuple[int, int, int, bool, int]] = []

    def run(self, stop: threading.Event) -> None:
        lab, host = self.lab, self.lab.host_v4
        rx = {}
        txs: list[socket.socket] = []
        try:
            for port in (*REAL_PORTS, MARKER_PORT):
                rx[port] = s = netns_socket(lab.host_ns, socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((host, port))
                s.setblocking(False)
            rx[MARKER_PORT].settimeout(2.0)
            for _ in range(REAL_FLOWS):
                tx = netns_socket(lab.peer_ns, socket.AF_INET, socket.SOCK_DGRAM)
                tx.bind((lab.peer_v4, 0))
                txs.append(tx)
            self._marker(txs[0], rx[MARKER_PORT])  # the neighbour entries are in place
            n = 0
            for tx in txs:
                sport = tx.getsockname()[1]
                for port in REAL_PORTS:
                    if stop.is_set():
                        return
                    n += 1
                    token = b"probe %d" % n
                    before = self.dp.active()[0]
                    tx.sendto(token, (host, port))
                    self._marker(tx, rx[MARKER_PORT])
                    after = self.dp.active()[0]
                    self.seen.append((sport, port, before, _drain(rx[port], token), after))
        finally:
            for s in (*rx.values(), *txs):
                s.close()

    def _marker(self, tx: socket.socket, rx: socket.socket) -> None:
        tx.sendto(b"marker", (self.lab.host_v4, MARKER_PORT))
        assert rx.recv(64) == b"marker", "a marker datagram (always allowed) did not arrive"


def _drain(sock: socket.socket, token: bytes) -> bool:
    """Was `token` delivered to `sock` (nothing else may be waiting there)?"""
    got = []
    while True:
        try:
            got.append(sock.recv(64))
        except BlockingIOError:
            break
    assert got in ([], [token]), got
    return bool(got)


def test_change_storm_never_judges_by_half_a_change(lab_dp: Datapath, lab: Lab) -> None:
    dp = lab_dp
    rng = random.Random(18)
    pools = _pools(lab)
    marker = Rule.model_validate(
        R(1, protocol="udp", dst_port=MARKER_PORT, action="allow", priority=100)
    )
    rules = {1: marker} | {i: _rule(rng, i, pools) for i in range(2, 200)}
    groups = {
        "srcs": Group.model_validate({"members": list(pools.srcs[:3])}),
        "dsts": Group.model_validate({"members": list(pools.dsts[:2])}),
    }
    state = PolicyState(DefaultAction.DENY, rules, groups)
    gen0 = dp.apply(compile_policy(state.policy_set(), dp.config.max_shapes))
    by_gen: dict[int, PolicySet] = {gen0: state.policy_set()}
    packets = _test_run_packets(rng, 20000)
    seen: list[tuple[int, int, int, int]] = []  # packet index, gen before, verdict, gen after
    stop = threading.Event()
    deadline = time.monotonic() + TIME_LIMIT

    def test_runs() -> None:
        for i, p in enumerate(packets):
            if stop.is_set() or time.monotonic() > deadline:
                return
            before = dp.active()[0]
            verdict = run(dp, p)
            seen.append((i, before, verdict, dp.active()[0]))

    real = RealProbes(dp, lab)
    errors: list[BaseException] = []

    def real_traffic() -> None:
        try:
            real.run(stop)
        except BaseException as e:  # reported by the test below
            errors.append(e)

    threads = [threading.Thread(target=test_runs), threading.Thread(target=real_traffic)]
    for t in threads:
        t.start()
    members_changed = 0
    try:
        next_id = 200
        for _ in range(CHANGES):
            if time.monotonic() > deadline:
                break
            edit = _edit(rng, state, pools, next_id)
            next_id += len(edit.added)
            members_changed += bool(edit.groups)
            change = dp.begin_change()
            change_tables(change, edit, state)
            gen = dp.apply_change(change)
            state.apply(edit)
            by_gen[gen] = state.policy_set()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(by_gen) > CHANGES * 0.9 and members_changed > 30
    assert len(seen) > 1000 and len(real.seen) > 200, (len(seen), len(real.seen))

    for i, before, verdict, after in seen:
        allowed = {
            PASS if judge(by_gen[g], packets[i]).passes else DROP for g in range(before, after + 1)
        }
        assert verdict in allowed, (packets[i], before, after, verdict)
    outcomes = set()
    for sport, dport, before, delivered, after in real.seen:
        p = pk(lab.peer_v4, lab.host_v4, "udp", sport, dport)
        allowed_real = {judge(by_gen[g], p).passes for g in range(before, after + 1)}
        assert delivered in allowed_real, (sport, dport, before, after, delivered)
        outcomes.add(delivered)
    assert outcomes == {True, False}, "the real traffic saw only one verdict"

    # After the storm both banks hold what a whole compile of the final set gives.
    dp.settle()
    final = parse_policy_document(
        {
            "default_action": "deny",
            "groups": {n: {"members": list(g.members)} for n, g in state.groups.items()},
            "policies": [r.to_api() for r in state.rules.values()],
        }
    )
    live = _kernel_tables(dp, dp.active()[1])
    assert live == _kernel_tables(dp, dp.active()[1] ^ 1)
    fresh = dp.apply(compile_policy(final, dp.config.max_shapes))
    dp.settle()
    assert dp.active()[0] == fresh
    assert _kernel_tables(dp, dp.active()[1]) == live
