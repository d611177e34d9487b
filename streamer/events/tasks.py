"""How the event pipeline's tasks end: cancelled by their owner, or with an error it sees.

In: the tasks of the pipeline's TaskGroups (the pipeline's, each sink supervisor's, the Kafka
sink's own) and the exception groups those raise. Out: `stop_task` (cancel one task of a group
and wait for its end, leaving its error to the group, which raises it), `own_cancel_only` (a
CancelledError that the task was not asked for becomes an error), `raise_sole` (a group's
only error raised as itself, so a caller sees what failed rather than "1 sub-exception").
Nothing is dropped: these exist so that no task's end goes unseen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import NoReturn, TypeVar

T = TypeVar("T")


class StrayCancel(RuntimeError):
    """A task ended with a CancelledError nobody asked it for (a future it awaited was
    cancelled by its owner, e.g. a library closing)."""


def cancel_requested() -> bool:
    """Whether the current task has been asked to stop (`Task.cancel()`, not yet withdrawn):
    a CancelledError then is its own, not one of a future it happened to await."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


async def own_cancel_only(aw: Awaitable[T], what: str) -> T:
    """`await aw`, with a CancelledError the current task was not asked for raised as
    StrayCancel: a TaskGroup or a sink's supervisor takes a CancelledError for a requested
    stop and says nothing, so the work would end unseen."""
    try:
        return await aw
    except asyncio.CancelledError as e:
        if cancel_requested():
            raise
        raise StrayCancel(f"{what} ended: something it awaited was cancelled") from e


async def stop_task(task: asyncio.Task[T]) -> None:
    """Cancel `task` and wait until it has ended. Raises nothing of the task's: an error it
    ended with stays in it for its TaskGroup, which raises it on leaving."""
    task.cancel()
    await asyncio.wait([task])


def raise_sole(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise the one exception inside `group` (through groups of one), else `group` itself:
    what a TaskGroup with one failed task means to whoever awaited it. The exception keeps
    its own cause; the group it came in is left out of its context."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    raise exc from exc.__cause__
