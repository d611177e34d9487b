"""The console sink (`--print-events`): one line per record on stdout, for people.

In: a channel of Items. Out: the line `flows observe -o compact` prints (streamer.events.text),
for flow, lost and alert records alike. Writes are synchronous (stdout is a terminal or a pipe
someone reads).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from streamer.events.fanout import Channel
from streamer.events.text import compact_line


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
            out.write("".join(compact_line(i.obj) + "\n" for i in items))
            out.flush()
            self.printed += len(items)

    def stats(self) -> dict[str, Any]:
        return {"delivered": self.printed}
