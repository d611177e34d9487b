"""Safe rollout on the command line (contract §6): `--confirm SECONDS` and `--force` on every
write command, and `microseg policy confirm GENERATION`.

In: a write command's arguments (`--dry-run`, `--confirm`, `--force`) and its request. Out:
the request sent with `dry_run`, `confirm_within` and `force` (`write`); with `--confirm`, once
the agent answers that the change is pending, a confirmation over a new connection (a fresh
session: a new TCP connection, as an operator whose change cut them off could not make). If
the write's answer or the confirmation does not arrive, the command fails (exit 1) saying the
agent reverts the change by itself at its deadline. A write's answer without `pending` (a dry
run, a change that changed nothing) has nothing to confirm.

`add_write_flags` registers the flags; a new write command (e.g. `policy promote`) takes
them with `add_write_flags(p)` and sends its request with `await write(api, args, ...)`.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from typing import Any, Final

from streamer.cli import argtypes
from streamer.cli.connection import TIMEOUT, Api, expect_dict
from streamer.cli.errors import ApiError, ClientError
from streamer.cli.output import print_json

__all__ = ["MAX_CONFIRM_S", "add_write_flags", "cmd_confirm", "confirm", "write", "write_params"]

MAX_CONFIRM_S: Final = 3600

_confirm_seconds = argtypes.bounded_int(
    1, MAX_CONFIRM_S, f"a whole number of seconds 1..{MAX_CONFIRM_S}", digits=True
)


def add_write_flags(p: argparse.ArgumentParser) -> None:
    """--confirm SECONDS and --force (a write command's --dry-run is its own)."""
    g = p.add_argument_group("safe rollout (docs/contract.md §6)")
    g.add_argument(
        "--confirm",
        type=_confirm_seconds,
        metavar="SECONDS",
        help="the agent reverts the change after SECONDS unless confirmed; the command "
        "confirms it over a new connection once it is applied (and fails, exit 1, if it "
        "cannot: the change is then reverted at the deadline)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="apply even if the change would cut off this command's own connection to the "
        "API (refused otherwise: HTTP 409 lockout)",
    )


def write_params(args: argparse.Namespace) -> dict[str, str]:
    """The query of a write: dry_run, confirm_within, force as the arguments say."""
    params: dict[str, str] = {}
    if getattr(args, "dry_run", False):
        params["dry_run"] = "1"
    if getattr(args, "confirm", None) is not None:
        params["confirm_within"] = str(args.confirm)
    if getattr(args, "force", False):
        params["force"] = "1"
    return params


async def write(
    api: Api, args: argparse.Namespace, method: str, path: str, body: Any = None
) -> Any:
    """Send a write with the rollout parameters; with --confirm, confirm it over a new
    connection once applied. Returns the write's answer."""
    window: int | None = getattr(args, "confirm", None)
    params = write_params(args)
    if window is None:
        return await api.call(method, path, params=params, body=body)
    # An answer arriving long after the window is of no use: the change is being reverted.
    limit = min(api.timeout, window + TIMEOUT)
    try:
        result = await api.call(method, path, params=params, body=body, timeout=limit)
    except ApiError:
        raise  # the agent refused it: nothing was applied
    except ClientError as e:
        raise ClientError(
            f"{e}; if the agent applied the change, it reverts it by itself within "
            f"{window} s (--confirm {window}), since it cannot be confirmed from here"
        ) from None
    pending = result.get("pending") if isinstance(result, dict) else None
    if not isinstance(pending, dict) or type(pending.get("generation")) is not int:
        return result  # nothing pends: a dry run, or a change that changed nothing
    generation: int = pending["generation"]
    deadline = str(pending.get("deadline", ""))
    try:
        await confirm(api, generation, _left(deadline, window))
    except ApiError as e:
        if e.code != "not_pending":
            raise ClientError(
                f"the change was applied as generation {generation}, but confirming it "
                f"failed: {e}; the agent reverts it at {deadline or 'its deadline'}"
            ) from None
        raise ClientError(
            f"the change was applied as generation {generation}, but it was no longer "
            f"pending when the confirmation got through ({e.api_message}): the agent has "
            "reverted it (its deadline passed)"
        ) from None
    except ClientError as e:
        raise ClientError(
            f"the change was applied as generation {generation}, but confirming it over a "
            f"new connection failed: {e}; the agent reverts it at {deadline or 'its deadline'}"
        ) from None
    if getattr(args, "output", "table") != "json":
        print(f"generation {generation} confirmed over a new connection: it stays")
    return result


async def confirm(api: Api, generation: int, timeout: float = TIMEOUT) -> dict[str, Any]:
    """POST /policies/confirm over a new session (a new connection) to `api`'s agent."""
    async with Api(api.endpoint, api.token, timeout) as fresh:
        answer = await fresh.call("POST", "/policies/confirm", body={"generation": generation})
        return expect_dict(answer, fresh, "POST /policies/confirm")


def _left(deadline: str, window: int) -> float:
    """Seconds until `deadline` (RFC 3339) as this clock tells, within 0.5..TIMEOUT; the
    window when the deadline cannot be read."""
    try:
        at = datetime.fromisoformat(deadline.replace("Z", "+00:00")).timestamp()
        left = at - time.time()
    except ValueError:
        left = float(window)
    return max(0.5, min(TIMEOUT, left))


async def cmd_confirm(api: Api, args: argparse.Namespace) -> int:
    """`policy confirm GENERATION`: keep the pending change of that generation."""
    answer = expect_dict(
        await api.call("POST", "/policies/confirm", body={"generation": args.generation}),
        api,
        "POST /policies/confirm",
    )
    if args.output == "json":
        print_json(answer)
    else:
        print(f"generation {answer.get('generation', args.generation)} confirmed: it stays")
    return 0
