"""The demo/test lab: two network namespaces joined by a veth pair.

The "host" namespace holds the end the classifier attaches to; the "peer" namespace
plays the remote side. Every lab has its own names and its own addresses (IPv4 from
198.18.0.0/15, IPv6 from fd6d:7365:67::/48), so several labs can live side by side and
no lab traffic ever leaves the lab's namespaces.

In: a name prefix and an address slot (or none: random ones), or a state file. Out: the
namespaces, veth pair and addresses built (`Lab.create`) and removed (`Lab.destroy`, which
also stops whatever still runs inside), and the lab's description as text, a dict or a
state file. Entering a namespace is `streamer.lab.netns`, the echo servers and probes
`streamer.lab.probes`, the demo traffic `streamer.lab.traffic`, and the `microseg lab`
command `streamer.cli.lab`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from streamer.lab.netns import (
    LabError,
    kill_pids,
    netns_exists,
    netns_id,
    pids_in_netns,
    write_sysctl,
)

DEFAULT_STATE_FILE = Path("/run/microseg/lab.json")

# Labs only ever use these ranges; `Lab.load` refuses anything else so a tampered
# state file cannot point the traffic generator at someone else's network.
LAB_NET_V4 = ipaddress.IPv4Network("198.18.0.0/15")
LAB_NET_V6 = ipaddress.IPv6Network("fd6d:7365:67::/48")
LAB_SLOTS = 512  # number of /24s in 198.18.0.0/15

IFNAMSIZ = 15
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,12}$")  # + "-h" stays <= 15
_IFA_F_NODAD = 0x02


def _slot_v4(slot: int) -> tuple[str, str]:
    base = int(LAB_NET_V4.network_address) + slot * 256
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def _slot_v6(slot: int) -> tuple[str, str]:
    net = ipaddress.IPv6Network(f"fd6d:7365:67:{slot:x}::/64")
    return str(net.network_address + 1), str(net.network_address + 2)


@dataclass
class Lab:
    """Two named netns (`host_ns`, `peer_ns`) joined by veth `host_if` <-> `peer_if`.

    Addresses are plain strings without prefix length (/24 and /64 on the link).
    `host_ifindex` / `peer_ifindex` are the interface indexes inside their namespaces;
    `slot` (0-511) is what the addresses were derived from.
    """

    name: str
    host_ns: str
    peer_ns: str
    host_if: str
    peer_if: str
    host_v4: str
    peer_v4: str
    host_v6: str
    peer_v6: str
    host_ifindex: int
    peer_ifindex: int = 0
    slot: int = 0

    V4_PREFIXLEN = 24
    V6_PREFIXLEN = 64

    # -- creation / removal -------------------------------------------------------

    @staticmethod
    def names_for(prefix: str) -> dict[str, str]:
        """Namespace and interface names a lab with `prefix` uses; ValueError if bad."""
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"invalid lab prefix {prefix!r}: use 1-13 characters from [A-Za-z0-9_-], "
                "starting with a letter or digit"
            )
        return {
            "host_ns": f"{prefix}-host",
            "peer_ns": f"{prefix}-peer",
            "host_if": f"{prefix}-h",
            "peer_if": f"{prefix}-p",
        }

    @classmethod
    def create(cls, prefix: str | None = None, slot: int | None = None) -> Lab:
        """Build a new lab and return it, everything up and addressed.

        `prefix` (1-13 chars) names it; None picks a random unused one. `slot` (0-511)
        picks its /24 and /64; None picks one at random. ValueError for a bad prefix or
        slot; LabError (after removing anything half-built) when the names are taken or
        the kernel refuses.
        """
        if slot is not None and not 0 <= slot < LAB_SLOTS:
            raise ValueError(f"invalid lab slot {slot}: must be 0..{LAB_SLOTS - 1}")
        attempts = 1 if prefix is not None else 8
        last: LabError | None = None
        for _ in range(attempts):
            pfx = prefix if prefix is not None else "ms" + secrets.token_hex(3)
            lab = cls._blank(pfx, secrets.randbelow(LAB_SLOTS) if slot is None else slot)
            try:
                lab._build()
                return lab
            except FileExistsError:
                last = LabError(
                    f"lab {pfx!r} already exists (netns {lab.host_ns} or {lab.peer_ns} is taken)"
                )
        assert last is not None
        raise last

    @classmethod
    def _blank(cls, prefix: str, slot: int) -> Lab:
        names = cls.names_for(prefix)
        host_v4, peer_v4 = _slot_v4(slot)
        host_v6, peer_v6 = _slot_v6(slot)
        return cls(
            name=prefix,
            host_ns=names["host_ns"],
            peer_ns=names["peer_ns"],
            host_if=names["host_if"],
            peer_if=names["peer_if"],
            host_v4=host_v4,
            peer_v4=peer_v4,
            host_v6=host_v6,
            peer_v6=peer_v6,
            host_ifindex=0,
            slot=slot,
        )

    def _build(self) -> None:
        # Imported here: pyroute2 costs ~0.2 s to import and most users of this module
        # (CLI parsing, state files) never touch netlink.
        from pyroute2 import IPRoute, netns
        from pyroute2 import config as pyroute2_config

        # pyroute2 forks helpers that would inherit a caller's Python SIGTERM handler and
        # its wakeup fd: without this, a caller with such a handler gets a half-built lab.
        pyroute2_config.disable_mp_signal = True
        try:
            netns.create(self.host_ns)
        except FileExistsError:
            raise  # create() retries with another prefix or reports the clash
        except OSError as e:
            raise LabError(f"cannot create netns {self.host_ns}: {e}") from e
        created_peer = False
        try:
            netns.create(self.peer_ns)
            created_peer = True
            for ns in (self.host_ns, self.peer_ns):
                # Addresses get `nodad` below; this covers the link-local ones too, so
                # IPv6 (including neighbour discovery) works the moment links are up.
                write_sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")
                write_sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
                write_sysctl(ns, "net.ipv6.conf.default.router_solicitations", "0")
            with IPRoute(netns=self.host_ns) as ipr:
                ipr.link(
                    "add",
                    ifname=self.host_if,
                    kind="veth",
                    peer={"ifname": self.peer_if, "net_ns_fd": self.peer_ns},
                )
                self.host_ifindex = self._configure(ipr, self.host_if, self.host_v4, self.host_v6)
            with IPRoute(netns=self.peer_ns) as ipr:
                self.peer_ifindex = self._configure(ipr, self.peer_if, self.peer_v4, self.peer_v6)
            self._wait_carrier()
        except BaseException as e:
            if created_peer:
                self.destroy()
            else:
                # The peer name may be someone else's: remove only what we made.
                self._remove_netns(self.host_ns)
                if isinstance(e, FileExistsError):
                    raise
            if isinstance(e, Exception) and not isinstance(e, LabError):
                raise LabError(f"cannot build lab {self.name}: {e}") from e
            raise

    @staticmethod
    def _configure(ipr: Any, ifname: str, v4: str, v6: str) -> int:
        idx = int(ipr.link_lookup(ifname=ifname)[0])
        ipr.addr("add", index=idx, address=v4, prefixlen=Lab.V4_PREFIXLEN)
        ipr.addr("add", index=idx, address=v6, prefixlen=Lab.V6_PREFIXLEN, flags=_IFA_F_NODAD)
        ipr.link("set", index=idx, state="up")
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        return idx

    def _wait_carrier(self, timeout: float = 2.0) -> None:
        # veth reports carrier as soon as both ends are up; poll briefly rather than
        # trusting that, so the first probe of a test never races the link.
        from pyroute2 import IPRoute

        deadline = time.monotonic() + timeout
        with IPRoute(netns=self.host_ns) as ipr:
            while True:
                link = ipr.get_links(self.host_ifindex)[0]
                if link.get_attr("IFLA_OPERSTATE") == "UP":
                    return
                if time.monotonic() > deadline:
                    raise LabError(f"{self.host_if} did not come up within {timeout}s")
                time.sleep(0.01)

    @staticmethod
    def _remove_netns(name: str) -> None:
        from pyroute2 import netns

        if netns_exists(name):
            with contextlib.suppress(FileNotFoundError):
                netns.remove(name)

    def destroy(self) -> None:
        """Remove both namespaces, the veth pair and any process left inside. Idempotent."""
        ns_ids = {i for ns in (self.host_ns, self.peer_ns) if (i := netns_id(ns)) is not None}
        kill_pids(pids_in_netns(ns_ids))
        if netns_exists(self.host_ns):
            # Deleting the veth explicitly makes it vanish now, even if some socket still
            # pins the namespace (netns teardown would otherwise be deferred).
            from pyroute2 import IPRoute
            from pyroute2.netlink.exceptions import NetlinkError

            with contextlib.suppress(NetlinkError, OSError), IPRoute(netns=self.host_ns) as ipr:
                for idx in ipr.link_lookup(ifname=self.host_if):
                    ipr.link("del", index=idx)
        for ns in (self.host_ns, self.peer_ns):
            self._remove_netns(ns)
        # A process caught entering a namespace while we looked (`ip netns exec` between
        # open() and setns()) shows up only now, and would keep the namespace alive.
        kill_pids(pids_in_netns(ns_ids))

    def exists(self) -> bool:
        """True when both namespaces of this lab are still there."""
        return netns_exists(self.host_ns) and netns_exists(self.peer_ns)

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- state file ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The lab as a JSON-ready dict (what `save` writes)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the lab to `path` as JSON (parents created, replaced atomically)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, p)

    @classmethod
    def from_dict(cls, data: Any, source: str = "lab description") -> Lab:
        """A Lab from `data` (as `to_dict` made it); LabError naming the bad field."""
        if not isinstance(data, dict):
            raise LabError(f"{source}: expected a JSON object")
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                if field.default is not dataclasses.MISSING:
                    continue
                raise LabError(f"{source}: missing field {field.name!r}")
            value = data[field.name]
            want = int if field.type in ("int", int) else str
            if type(value) is not want:
                raise LabError(f"{source}: field {field.name!r} must be {want.__name__}")
            kwargs[field.name] = value
        lab = cls(**kwargs)
        lab._check(source)
        return lab

    def _check(self, source: str) -> None:
        try:
            names = self.names_for(self.name)
        except ValueError as e:
            raise LabError(f"{source}: {e}") from None
        for key, value in names.items():
            if getattr(self, key) != value:
                raise LabError(
                    f"{source}: {key} {getattr(self, key)!r} does not belong "
                    f"to lab {self.name!r} (expected {value!r})"
                )
        for key, net in (
            ("host_v4", LAB_NET_V4),
            ("peer_v4", LAB_NET_V4),
            ("host_v6", LAB_NET_V6),
            ("peer_v6", LAB_NET_V6),
        ):
            value = getattr(self, key)
            try:
                ok = ipaddress.ip_address(value) in net
            except ValueError:
                ok = False
            if not ok:
                raise LabError(f"{source}: {key} {value!r} is not a lab address (inside {net})")

    @classmethod
    def load(cls, path: str | Path) -> Lab:
        """Read a lab saved by `save`; LabError when missing, unreadable or invalid."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LabError(f"no lab recorded: {p} does not exist") from None
        except OSError as e:
            raise LabError(f"cannot read lab state file {p}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LabError(f"lab state file {p} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=f"lab state file {p}")

    def describe(self) -> str:
        """A few human-readable lines naming the lab's namespaces, links and addresses."""
        return "\n".join(
            [
                f"lab {self.name}:",
                f"  host  netns {self.host_ns:<16} iface {self.host_if}"
                f" (ifindex {self.host_ifindex})"
                f"  {self.host_v4}/{self.V4_PREFIXLEN}  {self.host_v6}/{self.V6_PREFIXLEN}",
                f"  peer  netns {self.peer_ns:<16} iface {self.peer_if}"
                f" (ifindex {self.peer_ifindex})"
                f"  {self.peer_v4}/{self.V4_PREFIXLEN}  {self.peer_v6}/{self.V6_PREFIXLEN}",
            ]
        )
