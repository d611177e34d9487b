"""A seeded fuzzer: 100,000 random and mutated frames per run through BPF_PROG_TEST_RUN, each
verdict equal to the reference model's, and the kernel's counters (what every packet became;
sessions, TCP transitions, fragments, related ICMP) equal to the model's every 2,000 frames.

Frames come from small pools of addresses and ports, so flows repeat, replies and TCP state
sequences happen, ICMP errors quote live flows and fragments meet their firsts: plain TCP (any
flags), UDP, ICMP echo and errors, other protocols; VLAN/QinQ (sometimes a tag too many), IPv4
options, IPv6 extension chains (sometimes too long); fragmented datagrams in and out of order,
with pieces missing or overlapping, their IDs now and then reused by other datagrams; and
mutations of earlier frames (flipped bytes, cuts, garbage tails). The policy changes twice,
so live sessions are judged again.

The seed is random unless PYTEST_SEED is set; it is printed, and a failure names it.
"""

from __future__ import annotations

import ipaddress
import os
import random
from typing import Any

from support.diffkit import Harness
from support.packets import (
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    ah_ext,
    dstopts_ext,
    eth,
    frag_ext,
    hbh_ext,
    icmp,
    icmpv6,
    ipv4,
    ipv6,
    routing_ext,
    tcp,
    udp,
)

from streamer.datapath.compiler import compile_policy
from streamer.datapath.datapath import Datapath
from streamer.policy.model import PolicySet, parse_policy_document

N_PACKETS = 100_000
CHECK_EVERY = 2_000
V4 = ["10.0.0.1", "10.0.0.2", "10.0.1.3", "192.0.2.9"]
V6 = ["2001:db8::1", "2001:db8::2", "2001:db8:1::3", "fd00::9"]
PORTS = [22, 53, 80, 443, 5050, 40000, 40001, 40002]
FLAGS = [0x02, 0x12, 0x10, 0x18, 0x11, 0x01, 0x04, 0x14, 0x00, 0x03, 0x29, 0xFF]


def _seed() -> int:
    env = os.environ.get("PYTEST_SEED")
    return int(env, 0) if env else random.SystemRandom().randrange(2**32)


def _policy(rng: random.Random) -> PolicySet:
    rules: list[dict[str, Any]] = []
    for rid in range(1, 25):
        proto = rng.choice(["tcp", "udp", "any", "icmp", "icmpv6"])
        rule: dict[str, Any] = {
            "rule_id": rid,
            "protocol": proto,
            "action": rng.choice(["allow", "allow", "deny", "log"]),
            "priority": rng.choice([100, 100, 200]),
            "direction": rng.choice(["ingress", "egress", "any"]),
        }
        fam = 4 if proto == "icmp" else 6 if proto == "icmpv6" else rng.choice([4, 6, 0])
        if fam and rng.random() < 0.6:
            pool = V4 if fam == 4 else V6
            net = ipaddress.ip_network(
                rng.choice(pool)
                + (rng.choice(["/24", "/32"]) if fam == 4 else rng.choice(["/64", "/128"])),
                strict=False,
            )
            rule[rng.choice(["src_ip", "dst_ip"])] = str(net)
        if proto in ("tcp", "udp") and rng.random() < 0.7:
            rule["dst_port"] = rng.choice(PORTS)
        rules.append(rule)
    return parse_policy_document(
        {"default_action": rng.choice(["allow", "deny"]), "policies": rules}
    )


class FrameMaker:
    """Random frames from small pools; remembers recent ones to reply to, quote and mutate."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.recent: list[tuple[bytes, str, tuple[Any, ...]]] = []  # (frame, dir, flow)
        self.ident = 1

    def _ext(self) -> list[tuple[int, bytes]]:
        rng = self.rng
        n = rng.choice([0, 0, 0, 1, 2, 3, 8, 9])
        makers = [
            lambda: hbh_ext(8 * rng.randint(1, 3)),
            lambda: routing_ext(8 * rng.randint(1, 2)),
            lambda: dstopts_ext(8 * rng.randint(1, 4)),
            lambda: ah_ext(8 * rng.randint(2, 3)),
            lambda: frag_ext(),  # atomic
        ]
        return [rng.choice(makers)() for _ in range(n)]

    def _tags(self) -> list[tuple[int, int]]:
        rng = self.rng
        n = rng.choice([0] * 8 + [1, 2, 3])
        return [(rng.choice([ETH_P_8021Q, ETH_P_8021AD]), rng.randint(1, 4094)) for _ in range(n)]

    def _l4(self, fam: int, proto: int, src: str, dst: str, sport: int, dport: int) -> bytes:
        rng = self.rng
        payload = bytes(rng.choice([0, 0, 4, 16, 40]))
        if proto == 6:
            return tcp(sport, dport, rng.choice(FLAGS), payload, src=src, dst=dst)
        if proto == 17:
            return udp(sport, dport, payload, src=src, dst=dst)
        if proto == 1:
            return icmp(rng.choice([8, 0, 8, 0, 13]), 0, sport, 1, payload)
        if proto == 58:
            return icmpv6(
                rng.choice([128, 129, 128, 129, 130]), 0, sport, 1, payload, src=src, dst=dst
            )
        return payload + bytes(8)

    def _flow(self) -> tuple[Any, ...]:
        rng = self.rng
        fam = rng.choice([4, 6])
        pool = V4 if fam == 4 else V6
        own_icmp = 1 if fam == 4 else 58
        proto = rng.choice([6, 6, 6, 17, 17, own_icmp, 47])
        src, dst = rng.choice(pool), rng.choice(pool)
        sport, dport = rng.choice(PORTS), rng.choice(PORTS)
        if proto in (1, 58):
            sport = dport = rng.randint(1, 4)
        direction = rng.choice(["ingress", "egress"])
        return fam, proto, src, dst, sport, dport, direction

    def _packet(self, flow: tuple[Any, ...], reply: bool = False) -> tuple[bytes, str]:
        fam, proto, src, dst, sport, dport, direction = flow
        if reply:
            src, dst, sport, dport = dst, src, dport, sport
            direction = "egress" if direction == "ingress" else "ingress"
        seg = self._l4(fam, proto, src, dst, sport, dport)
        if fam == 4:
            words = self.rng.choice([0] * 6 + list(range(1, 11)))
            ip = ipv4(src, dst, proto, seg, options=bytes([1] * 4 * words))
            return eth(ip, ETH_P_IP, self._tags()), direction
        return eth(ipv6(src, dst, proto, seg, ext=self._ext()), ETH_P_IPV6, self._tags()), direction

    def _fragments(self, flow: tuple[Any, ...]) -> list[tuple[bytes, str]]:
        rng = self.rng
        fam, proto, src, dst, sport, dport, direction = flow
        seg = self._l4(fam, proto, src, dst, sport, dport) + bytes(rng.choice([16, 40, 64]))
        size = rng.choice([8, 16, 24])
        # IDs wrap and repeat: now and then one of the first few again, for other ports
        self.ident = rng.randint(1, 4) if rng.random() < 0.2 else self.ident + 1
        pieces = []
        for off in range(0, len(seg), size):
            start = off
            if rng.random() < 0.05 and off:  # overlap backwards
                start = max(0, off - 8 * rng.randint(1, 2))
            chunk = seg[start : off + size]
            more = off + size < len(seg)
            if fam == 4:
                ip = ipv4(
                    src,
                    dst,
                    proto,
                    chunk,
                    frag_offset=start // 8,
                    mf=more,
                    ident=self.ident & 0xFFFF,
                )
                pieces.append((eth(ip, ETH_P_IP), direction))
            else:
                fh = frag_ext(offset=start // 8, more=more, ident=self.ident)
                pieces.append((eth(ipv6(src, dst, proto, chunk, ext=[fh]), ETH_P_IPV6), direction))
        r = rng.random()
        if r < 0.2:
            rng.shuffle(pieces)
        elif r < 0.3:
            pieces = pieces[1:]
        elif r < 0.4 and len(pieces) > 2:
            del pieces[rng.randrange(1, len(pieces))]
        return pieces

    def _icmp_error(self) -> tuple[bytes, str] | None:
        if not self.recent:
            return None
        rng = self.rng
        frame, direction, flow = rng.choice(self.recent)
        fam = flow[0]
        # the quoted packet: the recent frame's IP part (VLAN tags stripped)
        off = 14
        while frame[off - 2 : off] in (b"\x81\x00", b"\x88\xa8") and off + 4 <= len(frame):
            off += 4
        inner = frame[off:]
        sender = flow[2] if direction == flow[6] else flow[3]
        dst = sender if rng.random() < 0.85 else rng.choice(V4 if fam == 4 else V6)
        other = "ingress" if direction == "egress" else "egress"
        if fam == 4:
            kind = rng.choice([3, 3, 11, 12, 5])
            msg = icmp(kind, rng.choice([0, 3, 4]), 0, 0, inner[: rng.choice([28, 48, 20, 24])])
            return eth(ipv4("10.0.9.9", dst, 1, msg), ETH_P_IP), other
        kind = rng.choice([1, 2, 3, 4])
        msg = icmpv6(kind, 0, 0, 0, inner[: rng.choice([48, 64, 40, 44])])
        return eth(ipv6("2001:db8:9::9", dst, 58, msg), ETH_P_IPV6), other

    def _mutate(self) -> tuple[bytes, str] | None:
        if not self.recent:
            return None
        rng = self.rng
        frame, direction, _ = rng.choice(self.recent)
        data = bytearray(frame)
        r = rng.random()
        if r < 0.5:
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(12, len(data))
                data[i] = (
                    rng.randrange(256) if rng.random() < 0.5 else data[i] ^ (1 << rng.randrange(8))
                )
        elif r < 0.8:
            data = data[: rng.randrange(14, len(data) + 1)]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 24)))
        return bytes(data), direction

    def batch(self) -> list[tuple[bytes, str]]:
        """The next few frames."""
        rng = self.rng
        r = rng.random()
        if r < 0.1:
            got = self._mutate()
            return [got] if got else []
        if r < 0.17:
            got = self._icmp_error()
            return [got] if got else []
        if self.recent and r < 0.45:
            _, _, flow = rng.choice(self.recent)
            return [self._packet(flow, reply=rng.random() < 0.6)]
        flow = self._flow()
        if r < 0.55 and flow[1] in (6, 17, 1, 58):
            return self._fragments(flow)
        frame, direction = self._packet(flow)
        self.recent.append((frame, direction, flow))
        if len(self.recent) > 400:
            del self.recent[: len(self.recent) - 400]
        return [(frame, direction)]


def test_fuzz_kernel_against_reference(datapath: Datapath) -> None:
    seed = _seed()
    print(f"fuzz seed: {seed} (PYTEST_SEED={seed} to repeat)")
    rng = random.Random(seed)
    policy = _policy(rng)
    h = Harness(datapath, policy)
    maker = FrameMaker(rng)
    changes = {N_PACKETS // 3, 2 * N_PACKETS // 3}
    try:
        next_check = CHECK_EVERY
        while h.sent < N_PACKETS:
            for frame, direction in maker.batch():
                h.send(frame, direction)
            if h.sent >= next_check:
                h.check(f"seed {seed}, by packet {h.sent} (PYTEST_SEED={seed} to repeat)")
                next_check += CHECK_EVERY
                if any(next_check - CHECK_EVERY <= c < next_check for c in changes):
                    policy = _policy(rng)
                    datapath.apply(compile_policy(policy, datapath.config.max_shapes))
                    h.ref.set_policy(policy)
        h.check(f"seed {seed}, at the end (PYTEST_SEED={seed} to repeat)")
        c = h.ref.counters
        # the run reached what it is for
        for name in (
            "fragments_followed",
            "fragments_replaced",
            "fragment_drops_no_first",
            "related_passed",
            "closed_sessions",
            "renewed_closed",
            "half_open_opened",
        ):
            assert c[name] > 0, (name, seed)
    finally:
        h.close()
