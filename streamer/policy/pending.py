"""A change waiting to be confirmed (contract §6, confirm or revert), kept in the state dir.

In: the change's generation, the generation and set it replaced, its deadline (wall clock,
seconds since the epoch), the actor and what it was. Out: `pending.json` in the state dir,
written atomically (temporary file, fsync, rename) before the change itself is saved, so a
saved change that was never confirmed always has what to put back; read back at start
(`read_pending`), removed once confirmed or reverted (`clear_pending`); the API's view of it
(`to_api`: generation and RFC 3339 deadline).

Dropped: a damaged file is an error (PendingError, naming the file): the caller decides.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from streamer.policy.journal import write_atomic
from streamer.policy.model import PolicyError, PolicySet, parse_policy_document

PENDING_FILE: Final = "pending.json"
MIN_CONFIRM_S: Final = 1
MAX_CONFIRM_S: Final = 3600


class PendingError(ValueError):
    """The pending-change file cannot be read back; the message names it."""


def rfc3339(epoch: float) -> str:
    """Wall-clock seconds as RFC 3339 UTC, to the second (`2026-12-07T10:01:02Z`)."""
    return (
        datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


@dataclass
class PendingChange:
    """One applied change that the agent reverts at `deadline` unless it is confirmed.

    `previous` is the set the change replaced: what a revert applies (as a new generation).
    """

    generation: int
    base_generation: int
    deadline: float  # time.time() seconds
    confirm_within: int
    actor: str
    what: str
    previous: PolicySet
    applied_at: float

    def to_api(self) -> dict[str, Any]:
        return {"generation": self.generation, "deadline": rfc3339(self.deadline)}

    def status(self) -> dict[str, Any]:
        """What GET /status shows: the API view plus who made it and what it was."""
        return {
            **self.to_api(),
            "confirm_within": self.confirm_within,
            "actor": self.actor,
            "change": self.what,
            "replaces_generation": self.base_generation,
        }

    def document(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "base_generation": self.base_generation,
            "deadline": self.deadline,
            "deadline_text": rfc3339(self.deadline),
            "confirm_within": self.confirm_within,
            "actor": self.actor,
            "change": self.what,
            "applied_at": self.applied_at,
            "previous": self.previous.to_api(),
        }


def write_pending(state_dir: Path, pending: PendingChange) -> None:
    """Durable when this returns (OSError: not written; an older file stays as it was)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(state_dir / PENDING_FILE, orjson.dumps(pending.document()))


def clear_pending(state_dir: Path) -> None:
    """Remove the file, durably (OSError: it may still be there)."""
    path = state_dir / PENDING_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fd = os.open(state_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_pending(state_dir: Path) -> PendingChange | None:
    """The pending change the state dir holds, or None. PendingError when damaged."""
    path = state_dir / PENDING_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PendingError(f"{path}: unreadable pending change: {e}") from e
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        previous = parse_policy_document(doc["previous"], source=f"{path} (previous)")
        return PendingChange(
            generation=_int(doc["generation"]),
            base_generation=_int(doc["base_generation"]),
            deadline=float(doc["deadline"]),
            confirm_within=_int(doc["confirm_within"]),
            actor=str(doc.get("actor", "")),
            what=str(doc.get("change", "")),
            previous=previous,
            applied_at=float(doc.get("applied_at", 0.0)),
        )
    except PolicyError as e:
        raise PendingError(f"{path}: the set to put back is not valid: {e}") from e
    except (ValueError, KeyError, TypeError) as e:
        raise PendingError(f"{path}: damaged pending change: {e!r}") from e


def set_aside(state_dir: Path) -> Path | None:
    """Move a damaged file out of the way (kept for a person to read); its new path."""
    path = state_dir / PENDING_FILE
    aside = path.with_name(PENDING_FILE + ".damaged")
    with contextlib.suppress(OSError):
        os.replace(path, aside)
        return aside
    return None


def _int(value: Any) -> int:
    if type(value) is not int:
        raise ValueError(f"{value!r} is not an integer")
    return value
