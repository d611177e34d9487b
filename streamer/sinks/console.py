"""The console sink (`--print-events`): one line per event on stdout, for people.

In: a channel of Items. Out: `event <verdict> <direction> <protocol> <src>:<port> -> <dst>:<port>
rule=<id> pkts=<n>` lines, and `lost <n> at <stage>` for lost records. Writes are synchronous
(stdout is a terminal or a pipe someone reads).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from streamer.fanout import Channel


def format_event(obj: dict[str, Any]) -> str:
    if obj.get("type") == "lost":
        return f"lost {obj['lost']} events at {obj['stage']} (seq {obj['seq']})"
    return (
        f"event {obj['verdict']:5} {obj['direction']:7} {obj['protocol']:6}"
        f" {obj['src_ip']}:{obj['src_port']} -> {obj['dst_ip']}:{obj['dst_port']}"
        f" rule={(obj['rule'] or {}).get('rule_id', '-')} pkts={obj['packets']}"
    )


class ConsoleSink:
    name = "console"

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out
        self.printed = 0

    async def run(self, channel: Channel) -> None:
        out = self._out or sys.stdout
        while True:
            items = await channel.get_batch(1024)
            if not items:
                return
            out.write("".join(format_event(i.obj) + "\n" for i in items))
            out.flush()
            self.printed += len(items)

    def stats(self) -> dict[str, Any]:
        return {"delivered": self.printed}
