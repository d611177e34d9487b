"""The lockout guard (contract §6): a write must not cut off the API connection it came on.

In: the caller's connection as the API's transport sees it (`Connection`: both ends), the
interfaces the classifier is attached to (ifindex -> name, filled as the agent attaches), the
datapath's direct session lookup and the agent's failsafe entries. Out: for a connection the
classifier holds a session of on an attached interface (it crosses one), a check for the
store (`streamer.policy.store.WriteOptions.check`): the set a write leads to is judged by the
reference model (streamer.datapath.reference.judge) for that session's first packet, in its
original direction; a deny raises LockedOut (409 `lockout`) naming the connection and the rule
(or the default action) that denies it. Loopback callers, Unix sockets and connections with no
session on an attached interface get no check: they pay nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Final, Protocol

from streamer.datapath.layout import MS_DENY
from streamer.datapath.reference import Packet, judge
from streamer.policy.failsafe import FailsafeRule
from streamer.policy.model import PolicySet
from streamer.policy.store import LiveSession, StoreError

IPAddress = IPv4Address | IPv6Address
_TCP: Final = 6


class LockedOut(StoreError):
    """The write would deny the caller's own connection to the API."""

    status = 409
    code = "lockout"


class SessionLookup(Protocol):
    """`Datapath.session_of`."""

    def __call__(
        self, ifindex: int, proto: int, src: IPAddress, dst: IPAddress, sport: int, dport: int
    ) -> LiveSession | None: ...


@dataclass(frozen=True)
class Connection:
    """A TCP connection to the API: `local` is the agent's end, `remote` the caller's."""

    local: IPAddress
    local_port: int
    remote: IPAddress
    remote_port: int

    @classmethod
    def of(cls, sockname: Any, peername: Any) -> Connection | None:
        """From a transport's `sockname` and `peername` (None for a Unix socket or anything
        that is not an IP address pair)."""
        try:
            local, remote = _address(sockname[0]), _address(peername[0])
            return cls(local, int(sockname[1]), remote, int(peername[1]))
        except (TypeError, ValueError, IndexError):
            return None

    def __str__(self) -> str:
        return f"tcp {_end(self.remote, self.remote_port)} -> {_end(self.local, self.local_port)}"


def _address(text: Any) -> IPAddress:
    addr = ip_address(str(text).split("%", 1)[0])
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack socket's IPv4 peer: the classifier sees IPv4
    return addr


def _end(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class LockoutGuard:
    """One agent's guard. `interfaces` may be filled after the guard is made (as the agent
    attaches); `failsafe` are the agent's FailsafeRule entries; `staged_all`: the agent
    stages every rule (--policy-mode staged), so nothing is enforced as a deny."""

    def __init__(
        self,
        sessions: SessionLookup,
        interfaces: Mapping[int, str],
        failsafe: Sequence[FailsafeRule] = (),
        staged_all: bool = False,
    ) -> None:
        self._sessions = sessions
        self.interfaces = interfaces
        self._failsafe = tuple(failsafe)
        self._staged_all = staged_all

    def check_for(self, conn: Connection | None) -> Callable[[PolicySet], None] | None:
        """The check of writes that came on `conn`; None when it cannot cross an attached
        interface (no connection, loopback)."""
        if conn is None or conn.remote.is_loopback or not self.interfaces:
            return None
        return functools.partial(self.check, conn)

    def check(self, conn: Connection, policy: PolicySet) -> None:
        """LockedOut when `policy` denies `conn` on an attached interface it crosses. Runs
        beside the event loop (the store's commit thread): lookups and the judging are
        synchronous."""
        for ifindex, ifname in list(self.interfaces.items()):
            session = self._sessions(
                ifindex, _TCP, conn.remote, conn.local, conn.remote_port, conn.local_port
            )
            if session is None:
                continue
            pkt = Packet(
                family=session.family,
                src=ip_address(session.src_ip),
                dst=ip_address(session.dst_ip),
                proto=session.protocol,
                sport=session.src_port,
                dport=session.dst_port,
                direction="egress" if session.direction == "egress" else "ingress",
                ifindex=session.ifindex,
            )
            decision = judge(policy, pkt, self._failsafe, self._staged_all)
            if int(decision.verdict) == MS_DENY:
                raise LockedOut(
                    f"this change would cut off the connection it came on: {conn} "
                    f"({session.direction} on {ifname}) would be denied by "
                    f"{_decider(decision.rule, policy)}; nothing was changed (add ?force=1 "
                    "to apply it anyway: the connection then dies)"
                )


def _decider(rule: Any, policy: PolicySet) -> str:
    if rule is None:
        return f"the default action ({policy.default_action.value})"
    name = f" {rule.name!r}" if rule.name else ""
    return f"rule {rule.rule_id}{name} ({rule.action.value}, priority {rule.priority})"
