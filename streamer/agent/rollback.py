"""Confirm or revert, the agent's half (contract §6): the timer of the pending change.

In: the store (its `pending` change, `pending_changed` event and `revert`) and where alert
records go (`on_alert`: the event pipeline's alert path, so the events file, Kafka and the
WebSocket feed all get them). Out: a change not confirmed by its deadline is reverted through
the store (a new generation, actor `revert`, in changes.log like every change), logged, and
reported as an `alert` record `policy_reverted`; a revert that cannot be applied is logged and
reported as `policy_revert_failed` (critical), and the agent goes on with the change in force.

`run()` is a task of the agent's TaskGroup (cancelled and awaited on shutdown): it sleeps until
the pending change's deadline or until the pending change changes, whichever comes first.
`revert_overdue()` is for the start, before the API answers: a change whose deadline passed
while the agent was down is reverted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from streamer.policy.pending import PendingChange, rfc3339
from streamer.policy.store import PolicyStore, StoreError

log = logging.getLogger("microseg.rollback")


class Rollback:
    def __init__(
        self, store: PolicyStore, on_alert: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.store = store
        self.on_alert = on_alert
        self.reverted = 0
        self.failed = 0

    async def run(self) -> None:
        """Until cancelled: revert each pending change that reaches its deadline."""
        changed = self.store.pending_changed
        while True:
            changed.clear()
            pending = self.store.pending
            if pending is None:
                await changed.wait()
                continue
            left = pending.deadline - time.time()
            if left > 0:
                # Woken early by a confirmation (or anything else): look again.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await changed.wait()
                continue
            await self.revert(pending)

    async def revert_overdue(self) -> None:
        """At start: revert the pending change now if its deadline has passed."""
        pending = self.store.pending
        if pending is None:
            return
        if pending.deadline <= time.time():
            await self.revert(pending)
        else:
            log.warning(
                "generation %d (%s) is pending: reverted at %s unless confirmed",
                pending.generation,
                pending.what,
                rfc3339(pending.deadline),
            )

    async def revert(self, pending: PendingChange) -> None:
        """Put back what `pending` replaced; never raises for a revert that fails."""
        late = time.time() - pending.applied_at
        try:
            result = await self.store.revert(pending)
        except StoreError as e:
            self.failed += 1
            message = (
                f"generation {pending.generation} ({pending.what}) was not confirmed by "
                f"{rfc3339(pending.deadline)}, and putting back generation "
                f"{pending.base_generation}'s set failed: {e}; the change stays in force"
            )
            log.error("%s", message)
            self._alert("policy_revert_failed", "critical", pending, late, message, None)
            return
        except Exception as e:  # never let a revert take the agent down
            self.failed += 1
            log.exception("reverting generation %d failed", pending.generation)
            message = f"reverting generation {pending.generation} failed: {e}"
            self._alert("policy_revert_failed", "critical", pending, late, message, None)
            return
        if result is None:
            return  # confirmed meanwhile
        self.reverted += 1
        message = (
            f"generation {pending.generation} ({pending.what}, by {pending.actor}) was not "
            f"confirmed by {rfc3339(pending.deadline)}: reverted to the set of generation "
            f"{pending.base_generation}, now generation {result.generation}"
        )
        log.warning("%s", message)
        self._alert("policy_reverted", "warning", pending, late, message, result.generation)

    def _alert(
        self,
        alert: str,
        severity: str,
        pending: PendingChange,
        late: float,
        message: str,
        now_generation: int | None,
    ) -> None:
        if self.on_alert is None:
            return
        fields: dict[str, Any] = {
            "alert": alert,
            "subject": "policy",
            "state": "firing",
            "severity": severity,
            # As for every alert: the value that crossed the line, and the line.
            "value": round(late, 3),
            "threshold": pending.confirm_within,
            "message": message,
            "generation": pending.generation,
            "restored_generation": pending.base_generation,
            "deadline": rfc3339(pending.deadline),
            "actor": pending.actor,
            "change": pending.what,
        }
        if now_generation is not None:
            fields["policy_generation"] = now_generation
        try:
            self.on_alert(fields)
        except Exception:
            log.exception("sending the %s alert failed", alert)
