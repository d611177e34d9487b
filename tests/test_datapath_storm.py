"""A storm of single-rule changes made in place (streamer.datapath.ruletables through
Banks.apply_change) while packets are judged beside it with BPF_PROG_TEST_RUN: every verdict
equals the reference model's under the generation before or after the change in flight, never
a mix; afterwards both banks hold exactly what a whole compile of the final set gives."""

from __future__ import annotations

import random
import struct
import threading
from typing import Any

from support.bpf import kernel_retval as run
from support.classifier import DROP, PASS, R, pk

from streamer.datapath.compiler import compile_policy, rule_ends
from streamer.datapath.datapath import Datapath
from streamer.datapath.layout import BANK, RULE_KEY4, RULE_KEY6, RULE_VAL, SHAPE
from streamer.datapath.reference import Packet, judge
from streamer.policy.model import PolicySet, Rule, parse_policy_document

CHANGES = 300


def _rule(rng: random.Random, rule_id: int) -> Rule:
    doc: dict[str, Any] = R(
        rule_id,
        src_ip=rng.choice(("10.0.0.0/8", f"10.{rng.randrange(4)}.0.0/16", "any")),
        dst_ip=rng.choice(("any", f"10.9.{rng.randrange(4)}.0/24", "10.9.0.1")),
        protocol=rng.choice(("tcp", "udp", "any")),
        action=rng.choice(("allow", "deny", "log")),
        priority=rng.randint(1, 9),
    )
    if doc["protocol"] != "any":
        doc["dst_port"] = rng.choice((80, 443, "1000-1999"))
    return Rule.model_validate(doc)


def _packets(rng: random.Random, n: int) -> list[Packet]:
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


def test_single_rule_storm_never_judges_by_half_a_change(dp: Datapath) -> None:
    rng = random.Random(18)
    rules = {i: _rule(rng, i) for i in range(1, 200)}
    policy = PolicySet(default_action="deny", policies=list(rules.values()))
    gen0 = dp.apply(compile_policy(policy, dp.config.max_shapes))
    by_gen: dict[int, PolicySet] = {gen0: policy}
    packets = _packets(rng, 20000)
    seen: list[tuple[int, int, int, int]] = []  # packet index, gen before, verdict, gen after
    stop = threading.Event()

    def probe() -> None:
        for i, p in enumerate(packets):
            if stop.is_set():
                return
            before = dp.active()[0]
            verdict = run(dp, p)
            seen.append((i, before, verdict, dp.active()[0]))

    t = threading.Thread(target=probe)
    t.start()
    try:
        for _ in range(CHANGES):
            ch = dp.begin_change()
            op = rng.random()
            if op < 0.35:
                rid = max(rules) + 1
                rules[rid] = r = _rule(rng, rid)
                ch.add_rule(r, *rule_ends(r))
            elif op < 0.65 and len(rules) > 20:
                r = rules.pop(rng.choice(list(rules)))
                ch.remove_rule(r, *rule_ends(r))
            else:
                rid = rng.choice(list(rules))
                old, rules[rid] = rules[rid], _rule(rng, rid)
                ch.remove(old, *rule_ends(old))
                ch.add(rules[rid], *rule_ends(rules[rid]))
            gen = dp.apply_change(ch)
            by_gen[gen] = PolicySet(default_action="deny", policies=list(rules.values()))
            if not t.is_alive():
                break
    finally:
        stop.set()
        t.join(timeout=120)
    assert not t.is_alive()
    assert len(seen) > 1000 and len(by_gen) > 20
    for i, before, verdict, after in seen:
        allowed = {
            PASS if judge(by_gen[g], packets[i]).passes else DROP for g in range(before, after + 1)
        }
        assert verdict in allowed, (packets[i], before, after, verdict)

    # After the storm both banks hold what a whole compile of the final set gives.
    dp.settle()
    final = parse_policy_document(
        {"default_action": "deny", "policies": [r.to_api() for r in rules.values()]}
    )
    live = _kernel_tables(dp, dp.active()[1])
    assert live == _kernel_tables(dp, dp.active()[1] ^ 1)
    fresh = dp.apply(compile_policy(final, dp.config.max_shapes))
    dp.settle()
    assert dp.active()[0] == fresh
    assert _kernel_tables(dp, dp.active()[1]) == live
    dp.clear_sessions()
