"""The applied set on disk: a snapshot (`policy.json`) and a journal of the changes since.

In: whole sets (written as a new snapshot) and single changes (one journal line each: appended
and fsynced before the change is answered). Out: at start, the snapshot's document and
generation and the journal records after it (`read_state`), so a crash at any moment leaves
the last acknowledged change on disk. A single change costs one short append, never a rewrite
of the set; once the journal holds `COMPACT_RECORDS` records, a new snapshot is written beside
the caller and the records it covers are dropped.

Dropped: a torn last journal line (a crash while appending: it was never acknowledged), with a
warning. A damaged snapshot or a damaged line before the last is an error: the agent must not
silently start with less than it acknowledged.

Snapshot writes are atomic (temporary file, fsync, rename, fsync of the directory). While a
snapshot is being written the journal goes on in a new file; the old one is removed only once
the snapshot is durable, so reading both (old first) always gives the whole history.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("microseg.store")

STATE_FILE = "policy.json"
JOURNAL_FILE = "policy.journal"
OLD_JOURNAL_FILE = "policy.journal.old"
COMPACT_RECORDS = 2000


class JournalError(ValueError):
    """The state on disk cannot be read back; the message names the file."""


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise JournalError(f"{path}: unreadable policy journal: {e}") from e
    lines = data.split(b"\n")
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("generation"), int):
                raise ValueError("not a journal record")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: an append that never finished
                log.warning("%s: dropping a torn last record (a crash while writing it)", path)
                break
            raise JournalError(f"{path}: line {i + 1}: damaged policy journal: {e}") from e
        out.append(rec)
    return out


def read_state(state_dir: Path) -> tuple[dict[str, Any], int, list[dict[str, Any]]] | None:
    """(snapshot document, its generation, journal records after it in order), or None when
    the state dir holds no snapshot."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        doc = orjson.loads(path.read_bytes())
        generation = int(doc.pop("generation", 0))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise JournalError(f"{path}: unreadable policy state: {e}") from e
    records = [
        r
        for name in (OLD_JOURNAL_FILE, JOURNAL_FILE)
        for r in _records(state_dir / name)
        if r["generation"] > generation
    ]
    records.sort(key=lambda r: int(r["generation"]))
    return doc, generation, records


class Journal:
    """The snapshot and journal files of one state dir. `append` and `snapshot` may run in
    worker threads; a lock keeps them apart."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.records = 0  # in the current journal file
        self._compacting: threading.Thread | None = None

    @property
    def path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _open(self) -> int:
        if self._fd is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(
                self.state_dir / JOURNAL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
        return self._fd

    def append(self, record: dict[str, Any]) -> None:
        """One record, durable when this returns (OSError: it was not written)."""
        line = orjson.dumps(record) + b"\n"
        with self._lock:
            fd = self._open()
            os.write(fd, line)
            os.fsync(fd)
            self.records += 1

    def snapshot(self, document: dict[str, Any], generation: int) -> None:
        """A whole set as the new snapshot; the journal starts empty (OSError: unchanged)."""
        with self._lock:
            self._wait_compaction()
            doc = dict(document, generation=generation)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, orjson.dumps(doc))
            self._close()
            for name in (JOURNAL_FILE, OLD_JOURNAL_FILE):
                (self.state_dir / name).unlink(missing_ok=True)
            self.records = 0

    def due(self) -> bool:
        """Whether the journal is long enough for `compact` (and none is running)."""
        t = self._compacting
        if t is not None and not t.is_alive():
            t.join()
            self._compacting = t = None
        return self.records >= COMPACT_RECORDS and t is None

    def compact(self, document: Callable[[], dict[str, Any]], generation: int) -> None:
        """A new snapshot of `document()` at `generation` (called and written beside the
        caller: it must not change meanwhile), then the journal it covers is dropped."""
        with self._lock:
            self._close()
            old = self.state_dir / OLD_JOURNAL_FILE
            if old.exists():  # a compaction that did not finish: keep its records first
                return
            os.replace(self.state_dir / JOURNAL_FILE, old)
            self.records = 0
        t = threading.Thread(
            target=self._compact, args=(document, generation), name="microseg-snapshot"
        )
        self._compacting = t
        t.start()

    def _compact(self, document: Callable[[], dict[str, Any]], generation: int) -> None:
        try:
            doc = dict(document(), generation=generation)
            write_atomic(self.path, orjson.dumps(doc))
            (self.state_dir / OLD_JOURNAL_FILE).unlink(missing_ok=True)
            _fsync_dir(self.state_dir)
        except OSError as e:
            log.warning("writing a policy snapshot failed (the journal keeps the changes): %s", e)

    def _wait_compaction(self) -> None:
        t = self._compacting
        if t is not None:
            t.join()
            self._compacting = None

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        with self._lock:
            self._wait_compaction()
            self._close()
