"""The agent's side of the fleet (contract §7): follow the policy topic, enforce this host's
part of each generation, and tell the fleet what it enforces.

In: the fleet settings (`FleetConfig`), the agent's policy store, a reader of the attached
interfaces' addresses. Out: each generation, once read to the end of the topic, scoped to this
host (streamer/fleet/scope.py) and applied whole through the store's incremental path
(`PolicyStore.sync`); the newest only when several wait. `select` groups are resolved again
whenever an agent joins, leaves, is lost or changes addresses (a new local generation, no new
fleet generation). Status records go to the agents topic on every change and as a heartbeat;
a clean stop removes ours (tombstone).

Fail-static: the broker away changes nothing here. The last generation applied stays in force
(the store keeps the set; `fleet.json` in the state dir keeps which fleet generation it is), the
follower reconnects with backoff, and reads the topic again from its start when it is back.

`--confirm` (fleet form): a generation published with `confirm_within` and not yet confirmed is
put back by this agent by itself when no confirmed copy of it arrives within that time after it
applied it, broker or no broker: an agent the new policy cut off from the broker reverts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from streamer.fleet.config import FleetConfig
from streamer.fleet.records import AgentStatus, PolicyRecord
from streamer.fleet.scope import FleetHost, scope_policy
from streamer.fleet.topic import FleetView, PolicyReader, StatusPublisher
from streamer.policy.journal import write_atomic
from streamer.policy.model import PolicyError, PolicySet, parse_policy_document
from streamer.policy.store import PolicyStore, StoreError, WriteOptions

__all__ = ["FleetConfig", "Follower"]

log = logging.getLogger("microseg.fleet")

FLEET_STATE_FILE: Final = "fleet.json"
_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0)
# Long enough for a tombstone to reach a broker that is up, short enough not to hold a stop.
_TOMBSTONE_TIMEOUT_S: Final = 3.0


@dataclass
class _Applied:
    """What `fleet.json` keeps: the fleet generation in force and, while it waits for its
    confirmation, the deadline and the local set it replaced."""

    generation: int = 0
    document: dict[str, Any] | None = None
    confirm_deadline: float | None = None
    previous_generation: int = 0
    previous_document: dict[str, Any] | None = None
    previous_local: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def read(cls, path: Path) -> _Applied:
        data = orjson.loads(path.read_bytes())
        if not isinstance(data, dict) or not isinstance(data.get("generation"), int):
            raise ValueError("not a fleet state record")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class Follower:
    """One agent's membership of the fleet. `run()` until cancelled (call `stopping()` first
    for a clean stop: our status record is then removed)."""

    def __init__(
        self,
        config: FleetConfig,
        store: PolicyStore,
        state_dir: Path,
        addresses: Callable[[], Awaitable[tuple[str, ...]]],
        version: str,
    ) -> None:
        self.config = config
        self._store = store
        self._path = state_dir / FLEET_STATE_FILE
        self._addresses = addresses
        self._version = version
        self.applied = _Applied()
        self._policy: PolicySet | None = None  # the applied generation's fleet document
        self.state = "enforcing"
        self.error: str | None = None
        self.applied_at: float | None = None
        self.addresses: tuple[str, ...] = ()
        self.connected = False
        # Publication to enforcement here, of the last generation applied (seconds).
        self.last_latency_s: float | None = None
        self.applies = 0
        self.latency_sum_s = 0.0
        self._latest: PolicyRecord | None = None
        self._hosts: dict[str, FleetHost] = {}
        self._wake = asyncio.Event()
        self._members_dirty = False
        self._status_dirty = asyncio.Event()
        self._deadline_changed = asyncio.Event()
        self._stopping = False
        self._reverted = 0  # a generation this agent put back: not taken again unconfirmed
        self._settled: PolicyRecord | None = None  # the record last taken (applied or not)

    # ---- state dir --------------------------------------------------------------------------

    def restore(self) -> None:
        """At start: which fleet generation the store's set is (fleet.json), so the agent
        enforces and reports it with the broker away. A damaged record is set aside."""
        try:
            applied = _Applied.read(self._path)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as e:
            log.error(
                "%s: unreadable (%s): set aside; the fleet's newest is applied", self._path, e
            )
            return
        self.applied = applied
        if applied.document is not None:
            try:
                self._policy = parse_policy_document(
                    applied.document, source=str(self._path), fleet=True
                )
            except PolicyError as e:
                log.error("%s: %s", self._path, e)
        log.info("fleet generation %d restored from %s", applied.generation, self._path)

    def _save(self) -> None:
        write_atomic(self._path, self.applied.to_json())

    # ---- what others read -------------------------------------------------------------------

    @property
    def generation(self) -> int:
        return self.applied.generation

    def status(self) -> AgentStatus:
        return AgentStatus(
            host=self.config.host,
            labels=dict(self.config.labels),
            addresses=list(self.addresses),
            generation=self.applied.generation,
            applied_at=self.applied_at,
            state=self.state,
            error=self.error,
            version=self._version,
            heartbeat_at=time.time(),
        )

    def describe(self) -> dict[str, Any]:
        """For /status: this host's place in the fleet."""
        return {
            "bootstrap": self.config.bootstrap,
            "policy_topic": self.config.policy_topic,
            "agents_topic": self.config.agents_topic,
            "host": self.config.host,
            "labels": dict(self.config.labels),
            "addresses": list(self.addresses),
            "generation": self.applied.generation,
            "state": self.state,
            "error": self.error,
            "connected": self.connected,
            "agents": sorted(self._hosts),
            "confirm_deadline": self.applied.confirm_deadline,
        }

    def scope(self, policy: PolicySet) -> PolicySet:
        """This host's part of a fleet policy, with the fleet's members as known now."""
        return scope_policy(policy, self._me(), self._hosts.values())

    def stopping(self) -> None:
        """A clean stop follows: remove our status record on the way out."""
        self._stopping = True

    # ---- life -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the fleet until cancelled; the broker may come and go meanwhile."""
        self.addresses = await self._addresses()
        self._hosts[self.config.host] = self._me()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._revert_timer(), name="fleet-revert")
            tg.create_task(self._connected(), name="fleet")

    async def _connected(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a broker away or refusing: keep enforcing, try again
                self.connected = False
                wait = _BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)]
                attempt += 1
                log.warning("fleet brokers %s: %s; again in %.1f s", self.config.bootstrap, e, wait)
                await asyncio.sleep(wait)

    async def _session(self) -> None:
        cfg = self.config
        async with contextlib.AsyncExitStack() as stack:
            reader = await stack.enter_async_context(
                PolicyReader(cfg.bootstrap, cfg.policy_topic, on_bad=self._bad_record)
            )
            publisher = await stack.enter_async_context(
                StatusPublisher(cfg.bootstrap, cfg.agents_topic)
            )
            view = await stack.enter_async_context(
                FleetView(
                    cfg.bootstrap,
                    cfg.agents_topic,
                    heartbeat_s=cfg.heartbeat_s,
                    on_change=lambda: self._members_changed(view),
                )
            )
            self.connected = True
            log.info("following the fleet: %s on %s", cfg.policy_topic, cfg.bootstrap)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(view.run(), name="fleet-view")
                    tg.create_task(self._read(reader), name="fleet-read")
                    tg.create_task(self._heartbeat(publisher), name="fleet-heartbeat")
                    tg.create_task(self._apply_loop(reader, view), name="fleet-apply")
            finally:
                self.connected = False
                if self._stopping:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(publisher.tombstone(cfg.host), _TOMBSTONE_TIMEOUT_S)
                        log.info("removed %s from %s", cfg.host, cfg.agents_topic)

    async def _read(self, reader: PolicyReader) -> None:
        async for record in reader.records():
            self._latest = record
            self._wake.set()

    def _bad_record(self, message: str) -> None:
        log.error("fleet policy topic: %s (changes nothing here)", message)
        self.state, self.error = "error", message
        self._status_dirty.set()

    def _me(self) -> FleetHost:
        return FleetHost(self.config.host, dict(self.config.labels), self.addresses)

    def _members_changed(self, view: FleetView) -> None:
        hosts: dict[str, FleetHost] = {}
        for name, status in view.live().items():
            try:
                hosts[name] = FleetHost.parse(name, status.labels, status.addresses)
            except ValueError as e:
                log.warning("agent %s: its status record is not usable (%s): left out", name, e)
        hosts[self.config.host] = self._me()
        if hosts != self._hosts:
            self._hosts = hosts
            self._members_dirty = True
            self._wake.set()

    # ---- applying ---------------------------------------------------------------------------

    async def _apply_loop(self, reader: PolicyReader, view: FleetView) -> None:
        # The whole topic first: never a generation the fleet has already replaced.
        await reader.caught_up.wait()
        # And the fleet's members, so a first apply resolves its select groups whole.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(view.caught_up.wait(), timeout=self.config.heartbeat_s * 2)
        self._members_changed(view)
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            record = self._latest
            if record is not None and self._is_news(record):
                # Taken once, whatever comes of it: a generation refused here waits for the
                # next one, and meanwhile members' changes still apply to the one in force.
                self._settled = record
                self._members_dirty = False  # the take scopes with the members as they are
                await self._take(record)
            elif self._members_dirty:
                await self._rescope()

    def _is_news(self, record: PolicyRecord) -> bool:
        if record is self._settled:
            return False
        gen = self.applied.generation
        if record.generation == self._reverted and not record.confirmed:
            return False
        if record.generation > gen:
            return True
        return (
            record.generation == gen
            and record.confirmed
            and self.applied.confirm_deadline is not None
        )

    async def _take(self, record: PolicyRecord) -> None:
        gen = record.generation
        if gen == self.applied.generation:  # its confirmed copy
            self.applied.confirm_deadline = None
            self.applied.previous_local = None
            await asyncio.to_thread(self._save)
            self._deadline_changed.set()
            log.info("fleet generation %d confirmed", gen)
            return
        if (
            record.confirm_within is not None
            and not record.confirmed
            and time.time() > record.published_at + record.confirm_within
        ):
            log.warning("fleet generation %d was not confirmed in time: not applied", gen)
            return
        try:
            policy = parse_policy_document(
                record.document, source=f"fleet generation {gen}", fleet=True
            )
        except PolicyError as e:
            self._failed(gen, str(e))
            return
        previous_local = self._store.policy
        if not await self._enforce(policy, f"fleet generation {gen}"):
            return
        now = time.time()
        applied = _Applied(gen, record.document)
        if record.confirm_within is not None and not record.confirmed:
            applied.confirm_deadline = now + record.confirm_within
            applied.previous_generation = self.applied.generation
            applied.previous_document = self.applied.document
            applied.previous_local = previous_local.to_api()
        self.applied, self._policy = applied, policy
        await asyncio.to_thread(self._save)
        self.applied_at = now
        self.last_latency_s = max(0.0, now - record.published_at)
        self.applies += 1
        self.latency_sum_s += self.last_latency_s
        self.state, self.error = "enforcing", None
        self._status_dirty.set()
        self._deadline_changed.set()
        log.info(
            "fleet generation %d enforced (%.3f s after its publication)%s",
            gen,
            self.last_latency_s,
            f"; reverted unless confirmed within {record.confirm_within:g} s"
            if applied.confirm_deadline is not None
            else "",
        )

    async def _rescope(self) -> None:
        self._members_dirty = False
        if self._policy is None:
            return
        await self._enforce(self._policy, f"fleet generation {self.applied.generation} (members)")

    async def _enforce(self, policy: PolicySet, what: str) -> bool:
        """This host's part of `policy` in the kernel; False (and the status says why) when
        it cannot be (the set in force stays)."""
        try:
            local = self.scope(policy)
            await self._store.sync(local, "fleet", what, WriteOptions(fleet=True))
        except (StoreError, PolicyError, ValueError) as e:
            self._failed(self.applied.generation, f"{what}: {e}")
            return False
        return True

    def _failed(self, gen: int, message: str) -> None:
        log.error("fleet: %s; generation %d stays in force", message, self.applied.generation)
        self.state, self.error = "error", message
        self._status_dirty.set()

    # ---- confirm or revert ------------------------------------------------------------------

    async def _revert_timer(self) -> None:
        while True:
            deadline = self.applied.confirm_deadline
            self._deadline_changed.clear()
            if deadline is None:
                await self._deadline_changed.wait()
                continue
            left = deadline - time.time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._deadline_changed.wait(), timeout=left)
                continue
            await self._revert()

    async def _revert(self) -> None:
        a = self.applied
        gen = a.generation
        try:
            local = parse_policy_document(a.previous_local or {"policies": []})
            await self._store.sync(
                local, "revert", f"revert fleet generation {gen}", WriteOptions(fleet=True)
            )
        except (StoreError, PolicyError) as e:
            log.error("fleet generation %d could not be reverted: %s", gen, e)
            self.state, self.error = "error", f"revert of generation {gen} failed: {e}"
            a.confirm_deadline = None
            self._status_dirty.set()
            return
        self._reverted = gen
        self.applied = _Applied(a.previous_generation, a.previous_document)
        self._policy = None
        if a.previous_document is not None:
            with contextlib.suppress(PolicyError):
                self._policy = parse_policy_document(a.previous_document, fleet=True)
        await asyncio.to_thread(self._save)
        self.error = f"generation {gen} reverted: not confirmed in time"
        log.warning("fleet generation %d reverted by this agent: not confirmed in time", gen)
        self._status_dirty.set()

    # ---- status -----------------------------------------------------------------------------

    async def _heartbeat(self, publisher: StatusPublisher) -> None:
        while True:
            addresses = await self._addresses()
            if addresses != self.addresses:
                self.addresses = addresses
                self._members_dirty = True
                self._hosts[self.config.host] = self._me()
                self._wake.set()
            self._status_dirty.clear()
            await publisher.publish(self.status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._status_dirty.wait(), timeout=self.config.heartbeat_s)
