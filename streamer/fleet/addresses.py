"""The addresses an agent reports to the fleet: those of its attached interfaces.

In: interface names and the network namespace they are in. Out: their IPv4 and global IPv6
addresses, canonical, sorted, each once. Link-local IPv6 (fe80::/10) is left out: it is not
an address another host reaches a workload by. An interface that is gone gives nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["interface_addresses"]


def interface_addresses(ifnames: Iterable[str], netns: str | None) -> tuple[str, ...]:
    """The addresses of `ifnames` (blocking: pyroute2; run it in a thread)."""
    from pyroute2 import IPRoute

    found: set[str] = set()
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        for ifname in ifnames:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                continue
            for msg in ipr.get_addr(index=idx[0]):
                text = msg.get_attr("IFA_ADDRESS")
                if not text:
                    continue
                addr = ipaddress.ip_address(text)
                if addr.is_link_local:
                    continue
                found.add(str(addr))
    return tuple(sorted(found, key=lambda a: (":" in a, ipaddress.ip_address(a).packed)))
