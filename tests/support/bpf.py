"""The classifier loaded for BPF_PROG_TEST_RUN, for tests that run frames through it.

`loaded_datapath(cfg)` loads one (closed and its pins removed on leaving); `unique_instance`
names its pin directory so that no other run or test shares it, and `remove_stale_test_pins`
removes the pins of test runs that died before their teardown (only ours, only of processes
that are gone). `kernel_retval` runs one packet or frame through a loaded classifier and gives
the TC action; `EventSink` collects its ring-buffer records. The conftest's `datapath`,
`datapath_events` and `verdict` fixtures are built from these.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

from streamer.datapath.bindings import test_run
from streamer.datapath.config import DatapathConfig
from streamer.datapath.datapath import Datapath, prog_fd
from streamer.datapath.reference import Packet
from support.packets import frame


def unique_instance(tag: str) -> str:
    """A pin-directory name no other run or test uses."""
    return f"test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_TEST_PIN = re.compile(r"test-[a-z]+-(\d+)-[0-9a-f]{8}")


def remove_stale_test_pins() -> None:
    """Pins of test runs that died before their teardown (killed, timed out): by name, only
    ours (unique_instance), only of processes that are gone."""
    from streamer.datapath.config import DEFAULT_PIN_ROOT
    from streamer.datapath.loader import remove_tree

    if not DEFAULT_PIN_ROOT.is_dir():
        return
    for d in DEFAULT_PIN_ROOT.iterdir():
        m = _TEST_PIN.fullmatch(d.name)
        if m and not Path(f"/proc/{m[1]}").exists():
            with contextlib.suppress(OSError):
                remove_tree(d)


def kernel_retval(dp: Datapath, pkt_or_frame: Packet | bytes, direction: str | None = None) -> int:
    """Run one packet (built with packets.frame) or raw frame through the ingress or egress
    program: the TC action (0 pass, 2 drop). A Packet's own direction is used by default."""
    if isinstance(pkt_or_frame, Packet):
        data = frame(pkt_or_frame)
        direction = direction or pkt_or_frame.direction
    else:
        data = pkt_or_frame
    if direction not in ("ingress", "egress"):
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    return test_run(prog_fd(dp, direction), data)[0]


@contextlib.contextmanager
def loaded_datapath(cfg: DatapathConfig) -> Iterator[Datapath]:
    """A classifier loaded from `cfg`; closed and its pins removed on leaving, also on failure."""
    dp = Datapath(cfg)
    try:
        with dp:
            yield dp
    finally:
        dp.remove_pins()


class EventSink:
    """Ring-buffer records (raw struct ms_event bytes) of one datapath, in arrival order."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.records: list[bytes] = []
        dp.open_events(self.records.append)

    def drain(self) -> list[bytes]:
        """Everything that arrived since the last drain."""
        self.dp.consume_events()
        out = self.records[:]
        self.records.clear()
        return out
