"""The agent (`microseg run`): a policy's life from file to kernel, and the agent's own.

Start: load the classifier (adopting pinned state), restore the applied set from the state dir
(or seed it from the policy file when the state dir holds none), attach to every interface
(replacing a previous agent's filters atomically), then serve the API. SIGHUP re-reads the
policy file as a whole-set replace (a bad file is rejected whole and the live set stays);
SIGINT/SIGTERM stop cleanly and detach unless --keep-on-exit. Flow events go through the
pipeline (streamer/events/pipeline.py) to the events file, Kafka, the API's live feed and stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from pyroute2 import config as pyroute2_config

from streamer.agent.edits import change_tables
from streamer.agent.pressure import AlertChange, PressureCollector, PressureConfig, PressureWatch
from streamer.agent.rollback import Rollback
from streamer.datapath.attach import detach
from streamer.datapath.compiler import (
    CompileError,
    compile_policy,
)
from streamer.datapath.config import DatapathConfig, DatapathError
from streamer.datapath.datapath import Datapath
from streamer.datapath.ruletables import NeedsRecompile, TablesOutOfStep
from streamer.events.enrich import Enricher
from streamer.events.fleetfeed import FleetFeed
from streamer.events.ocsf import EventFormat
from streamer.events.pipeline import Pipeline, PipelineConfig, register_metrics, tune_gc
from streamer.events.sinks.file import DEFAULT_KEEP, DEFAULT_MAX_BYTES, FileSinkConfig
from streamer.events.sinks.kafka import DEFAULT_SPOOL_MAX_BYTES, DEFAULT_TOPIC, KafkaSinkConfig
from streamer.events.sinks.websocket import WebSocketConfig, WebSocketHub
from streamer.fleet.addresses import interface_addresses
from streamer.fleet.config import FleetConfig
from streamer.fleet.follower import Follower
from streamer.fleet.metrics import FleetCollector
from streamer.policy.lockout import LockoutGuard
from streamer.policy.model import (
    PolicyError,
    PolicySet,
    load_policy_file,
)
from streamer.policy.pending import PendingError
from streamer.policy.state import Edit, PolicyState
from streamer.policy.store import ChangeResult, PolicyStore, StoreError, WriteOptions
from streamer.vocabulary import DefaultAction, Mode

log = logging.getLogger("microseg.agent")
# How often expired sessions and fragments are removed (the timeouts themselves are in
# DatapathConfig.timeouts; an expired entry is already treated as gone by the datapath).
REAP_INTERVAL_S = 5.0


@dataclass(frozen=True)
class AgentConfig:
    """Everything `microseg run` was told, validated once."""

    ifaces: tuple[str, ...]
    datapath: DatapathConfig
    netns: str | None = None
    policy_file: Path | None = None
    default_action: DefaultAction | None = None
    state_dir: Path = Path("/var/lib/microseg")
    events_file: Path | None = None
    events_file_max_bytes: int = DEFAULT_MAX_BYTES
    events_file_keep: int = DEFAULT_KEEP
    events_file_format: EventFormat = "microseg"
    kafka: str | None = None  # HOST:PORT[,HOST:PORT...]
    kafka_topic: str = DEFAULT_TOPIC
    kafka_spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    kafka_format: EventFormat = "microseg"
    flow_feed_queue: int = 4096
    keep_on_exit: bool = False
    stats_interval: float = 0.0
    print_events: bool = False
    api_listen: tuple[str, ...] = ()
    no_auth: bool = False
    pressure: PressureConfig = field(default_factory=PressureConfig)
    # --fleet (contract §7): the policy comes from the fleet's topic, local writes are refused.
    fleet: FleetConfig | None = None
    # The `host` of every record this agent sends (None: the machine's hostname).
    host_name: str | None = None
    # (bootstrap, topic) of the fleet's flows topic: the API serves it as the fleet feed
    # (`/api/v1/flows?source=fleet`, the viewer's fleet view). None: no fleet feed.
    fleet_flows: tuple[str, str] | None = None


def default_instance(netns: str | None) -> str:
    """One pin directory per network namespace: named by the namespace's inode."""
    path = f"/run/netns/{netns}" if netns else "/proc/self/ns/net"
    return f"net{os.stat(path).st_ino}"


class PolicyLoadError(RuntimeError):
    """The policy could not be loaded or compiled; the message is for a person."""


@dataclass
class Agent:
    config: AgentConfig
    datapath: Datapath = field(init=False)
    generation: int = 0
    _enricher: Enricher | None = None
    pipeline: Pipeline | None = None
    # The fleet feed (config.fleet_flows with the API on): its hub, served as ?source=fleet.
    fleet_feed: FleetFeed | None = None
    store: PolicyStore = field(init=False)
    pressure: PressureWatch = field(init=False)
    # Confirm or revert, and the lockout guard (contract §6).
    rollback: Rollback = field(init=False)
    lockout: LockoutGuard = field(init=False)
    ifindexes: dict[int, str] = field(default_factory=dict)  # attached: ifindex -> name
    follower: Follower | None = None  # fleet mode
    _heap_dirty: bool = False  # a policy was applied since the heap was last trimmed

    def __post_init__(self) -> None:
        self.datapath = Datapath(self.config.datapath)
        self.store = PolicyStore(
            self.config.state_dir,
            self.apply,
            self.datapath.sessions,
            self.apply_edit,
            failsafe=self.config.datapath.failsafe,
            staged_all=self.config.datapath.staged_all,
        )
        fleet = self.config.fleet
        if fleet is not None:
            from streamer import __version__

            self.store.managed_by = f"topic {fleet.policy_topic} on {fleet.bootstrap}"
            self.follower = Follower(
                fleet, self.store, self.config.state_dir, self._addresses, __version__
            )
        self.pressure = PressureWatch(self.config.pressure, on_alert=self._alert)
        self.rollback = Rollback(self.store, on_alert=self._publish_alert)
        self.lockout = LockoutGuard(
            self.datapath.session_of,
            self.ifindexes,
            failsafe=self.config.datapath.failsafe,
            staged_all=self.config.datapath.staged_all,
        )

    # ---- policy --------------------------------------------------------------------------

    def read_policy(self) -> PolicySet:
        """The policy file (or an empty set), with --default-action applied over it."""
        if self.config.policy_file is not None:
            try:
                policy = load_policy_file(self.config.policy_file)
            except PolicyError as e:
                raise PolicyLoadError(str(e)) from e
        else:
            policy = PolicySet()
        if self.config.default_action is not None:
            policy = policy.model_copy(update={"default_action": self.config.default_action})
        return policy

    def apply(self, policy: PolicySet, generation: int | None = None) -> int:
        """Compile and switch the kernel to a whole set `policy` (the store's applier).

        Raises StoreError for a policy the classifier cannot hold; the live set stays.
        """
        try:
            dp = self.config.datapath
            compiled = compile_policy(policy, dp.max_shapes, staged_all=dp.staged_all)
        except CompileError as e:
            raise StoreError(str(e)) from e
        enricher = self._enricher
        live = self.datapath.active()[0]
        if generation and self.datapath.adopted and live == generation:
            # A restart: the pinned maps already enforce this generation, written by us before
            # the state dir recorded it. Both banks are written again (we do not know what the
            # other one holds) but the generation stays, and with it the sessions' verdicts.
            self.datapath.adopted = False
            self.generation = self._switch(
                generation,
                lambda g: enricher.add_generation(g, policy) if enricher else None,
                lambda: self.datapath.apply(compiled, generation, keep=True),
            )
            log.info("policy generation %d kept: the pinned maps already enforce it", generation)
            return generation
        expected = generation if generation is not None and generation > live else live + 1
        gen = self._switch(
            expected,
            lambda g: enricher.add_generation(g, policy) if enricher else None,
            lambda: self.datapath.apply(compiled, generation),
        )
        self.generation = gen
        self._heap_dirty = True
        log.info(
            "policy generation %d applied: %d rules, default %s, %d shapes, %d entries",
            gen,
            len(policy.policies),
            policy.default_action.value,
            compiled.shape_count,
            compiled.entry_count,
        )
        return gen

    def _switch(
        self, expected: int, register: Callable[[int], None], switch: Callable[[], int]
    ) -> int:
        """Switch the kernel (`switch`, returning the generation it took) with the enricher
        knowing the new generation's rules first: its events can be drained the moment the
        kernel switches, so they are registered (`register`) under the number expected, again
        under the one taken if the datapath picked another, and forgotten if it failed."""
        enricher = self._enricher
        register(expected)
        try:
            gen = switch()
        except BaseException:
            if enricher is not None:
                enricher.forget(expected)
            raise
        if enricher is not None:
            if gen != expected:
                register(gen)
                enricher.forget(expected)
            enricher.switched(gen)
        return gen

    def apply_edit(self, edit: Edit, state: PolicyState) -> int:
        """Switch the kernel by one edit of `state` (the store's edit applier), writing only
        the table entries it touches; a whole-set apply when it cannot be made in place."""
        dp = self.datapath
        if dp.tables is None:
            return self.apply(state.after(edit))
        change = dp.begin_change()
        try:
            changes = change_tables(change, edit, state)
        except NeedsRecompile as e:
            log.info("%s: %s", edit.what, e)
            return self.apply(state.after(edit))
        except TablesOutOfStep as e:
            log.warning(
                "%s: the tables are out of step (%s): compiling the whole set", edit.what, e
            )
            return self.apply(state.after(edit))
        enricher = self._enricher
        gen = self._switch(
            dp.active()[0] + 1,
            lambda g: enricher.add_changes(g, changes) if enricher else None,
            lambda: dp.apply_change(change),
        )
        self.generation = gen
        delta = change.finish()
        log.info(
            "policy generation %d applied: %s, %d table entries written",
            gen,
            edit.what,
            delta.entry_writes,
        )
        return gen

    async def reload(self, actor: str = "sighup", opts: WriteOptions | None = None) -> ChangeResult:
        """SIGHUP and `microseg policy load`: the policy file as a whole-set replace.

        A bad file changes nothing: the error is logged and raised (StoreError). An agent
        started without a policy file has nothing to reload (never an empty set by accident).
        """
        if self.config.policy_file is None:
            log.error("policy reload ignored: the agent was started without --policy-file")
            raise StoreError("this agent was started without --policy-file: nothing to reload")
        try:
            policy = self.read_policy()
        except PolicyLoadError as e:
            log.error("policy reload rejected, generation %d stays: %s", self.generation, e)
            raise StoreError(str(e)) from e
        try:
            return await self.store.replace(policy, actor, opts=opts)
        except StoreError as e:
            log.error("policy reload rejected, generation %d stays: %s", self.generation, e)
            raise

    async def _addresses(self) -> tuple[str, ...]:
        """The attached interfaces' addresses (what the fleet's select groups hold of us)."""
        cfg = self.config
        try:
            return await asyncio.to_thread(interface_addresses, cfg.ifaces, cfg.netns)
        except OSError as e:
            log.warning("reading the interfaces' addresses failed: %s", e)
            return self.follower.addresses if self.follower is not None else ()

    def _restore(self) -> None:
        """At start: the state dir's set if it has one, else the policy file seeds it."""
        if self.follower is not None:
            self.follower.restore()
        persisted = self.store.read_persisted()
        if persisted is None:
            self.store.restore(self.read_policy(), 0)
            self._adopt_pending(None)
            return
        policy, gen = persisted
        log.info(
            "restoring %d rules at generation %d from %s",
            len(policy.policies),
            gen,
            self.store.path,
        )
        if self.config.policy_file is not None:
            log.info("the policy file seeds only an empty state dir: SIGHUP applies it")
        self.store.restore(policy, gen)
        self._adopt_pending(gen)

    def _adopt_pending(self, saved_generation: int | None) -> None:
        """The change still waiting for its confirmation, if any; a damaged record is not a
        reason to stay down (the set restored stays, unconfirmed or not)."""
        try:
            self.store.adopt_pending(saved_generation)
        except PendingError as e:
            log.error("%s: set aside; the restored set stays as it is", e)

    # ---- events ----------------------------------------------------------------------------

    def pipeline_config(self) -> PipelineConfig:
        cfg = self.config
        return PipelineConfig(
            file=FileSinkConfig(
                cfg.events_file,
                cfg.events_file_max_bytes,
                cfg.events_file_keep,
                format=cfg.events_file_format,
            )
            if cfg.events_file is not None
            else None,
            kafka=KafkaSinkConfig(
                bootstrap=cfg.kafka,
                topic=cfg.kafka_topic,
                spool_dir=cfg.state_dir / "spool",
                spool_max_bytes=cfg.kafka_spool_max_bytes,
                format=cfg.kafka_format,
            )
            if cfg.kafka
            else None,
            websocket=WebSocketConfig(client_queue=cfg.flow_feed_queue) if cfg.api_listen else None,
            console=cfg.print_events,
        )

    # ---- life ------------------------------------------------------------------------------

    async def run(self) -> int:
        cfg = self.config
        # Handlers first: a signal during startup must not kill us with the default action
        # once filters are attached (they would stay, enforcing, with nobody to remove them).
        # The handlers run at our first await (attaching), so a SIGHUP then reloads and a
        # SIGTERM stops cleanly right after startup.
        # pyroute2 forks a helper for each netns socket and SIGTERMs it when done; the child
        # shares our signal wakeup fd, so unless it resets SIGTERM first its signal reaches our
        # loop as if we had been told to stop.
        pyroute2_config.disable_mp_signal = True
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        loop.add_signal_handler(signal.SIGHUP, self._queue_reload, reloads)
        with contextlib.ExitStack() as loaded:
            # The one place our references to the classifier are taken and released, however
            # run() ends (pinned maps and attachments stay unless detached below).
            try:
                loaded.enter_context(self.datapath)
            except DatapathError as e:
                log.error("%s", e)
                return 1
            loaded.callback(self.store.close)
            code = await self._start_enforcing()
            if code:
                return code
            await self._serve(loop, stop, reloads)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if not cfg.keep_on_exit:
                for ifname in cfg.ifaces:
                    with contextlib.suppress(DatapathError):
                        await asyncio.to_thread(
                            detach, ifname, cfg.netns, cfg.datapath.run_dir, cfg.datapath.pin_root
                        )
        if not cfg.keep_on_exit:
            self.datapath.remove_pins()
            # Our attachment record (/run/microseg/<instance>) is obsolete once detached.
            shutil.rmtree(cfg.datapath.attachments_file.parent, ignore_errors=True)
            log.info("detached from %s", ", ".join(cfg.ifaces))
        else:
            log.info(
                "exiting; %s stay attached and enforcing (--keep-on-exit)",
                ", ".join(f"{i} ({self._attached_as(i)}s)" for i in cfg.ifaces),
            )
        return 0

    async def _start_enforcing(self) -> int:
        """Restore the policy and attach to every interface; 0, or the exit code after
        logging why not."""
        cfg = self.config
        ifindexes = self.ifindexes
        self._enricher = Enricher(ifindexes, host=cfg.host_name)
        try:
            self._restore()
            for ifname in cfg.ifaces:
                # pyroute2's synchronous API runs its own event loop: keep it off ours.
                idx = await asyncio.to_thread(self.datapath.attach, ifname, cfg.netns)
                ifindexes[idx] = ifname
                log.info(
                    "enforcing on %s%s (%s)",
                    ifname,
                    f" in netns {cfg.netns}" if cfg.netns else "",
                    self._attached_as(ifname),
                )
            self._enricher.add_interfaces(ifindexes)
        except (PolicyLoadError, PolicyError, StoreError, DatapathError, OSError) as e:
            log.error("%s", e)
            return 2 if isinstance(e, PolicyLoadError | PolicyError) else 1
        return 0

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event, reloads: asyncio.Queue[str]
    ) -> None:
        """The pipeline, the API and the agent's own tasks until `stop` is set; then, in this
        order: intake stops, the sinks write out, the API closes."""
        cfg = self.config
        assert self._enricher is not None
        pipeline = self.pipeline = Pipeline(self.pipeline_config(), self.datapath, self._enricher)
        if cfg.fleet_flows is not None and cfg.api_listen:
            bootstrap, topic = cfg.fleet_flows
            hub = WebSocketHub(WebSocketConfig(client_queue=cfg.flow_feed_queue))
            self.fleet_feed = FleetFeed(bootstrap, topic, hub)
        tune_gc()
        # A change left unconfirmed past its deadline while we were down: before the API.
        await self.rollback.revert_overdue()
        async with contextlib.AsyncExitStack() as stack:
            if cfg.api_listen:
                runner = await self._start_api(loop)
                stack.push_async_callback(runner.cleanup)
            async with asyncio.TaskGroup() as tg:
                # The pipeline opens the ring buffer as it starts: events of the moments
                # since attaching wait there for it.
                tg.create_task(pipeline.run(), name="pipeline")
                tasks = [tg.create_task(self._reloader(reloads))]
                tasks.append(tg.create_task(self._reaper(REAP_INTERVAL_S), name="reaper"))
                tasks.append(
                    tg.create_task(self.pressure.run(self.datapath.pressure), name="pressure")
                )
                tasks.append(tg.create_task(self.rollback.run(), name="rollback"))
                if self.fleet_feed is not None:
                    tasks.append(tg.create_task(self.fleet_feed.run(), name="fleet-feed"))
                if cfg.stats_interval > 0:
                    tasks.append(tg.create_task(self._print_stats(cfg.stats_interval)))
                if self.follower is not None:
                    tasks.append(tg.create_task(self.follower.run(), name="fleet"))
                await stop.wait()
                log.info("stopping")
                if self.follower is not None:
                    self.follower.stopping()
                for t in tasks:
                    t.cancel()
                # Drains the ring buffer a last time and lets the sinks write out.
                pipeline.stop()

    def _attached_as(self, ifname: str) -> str:
        """What the datapath attached on `ifname`, as the operator knows it."""
        return "tcx link" if self.datapath.attached_as.get(ifname) == "tcx" else "clsact filter"

    @staticmethod
    def _queue_reload(reloads: asyncio.Queue[str]) -> None:
        # Several SIGHUPs before the reloader runs read the same file: one reload is enough.
        with contextlib.suppress(asyncio.QueueFull):
            reloads.put_nowait("sighup")

    async def _reloader(self, reloads: asyncio.Queue[str]) -> None:
        while True:
            actor = await reloads.get()
            with contextlib.suppress(StoreError):
                await self.reload(actor)

    async def _start_api(self, loop: asyncio.AbstractEventLoop) -> Any:
        from prometheus_client import CollectorRegistry

        from streamer import __version__
        from streamer.api.context import ApiContext
        from streamer.api.serve import start_api
        from streamer.api.tokens import load_or_create_token

        cfg = self.config
        token = None if cfg.no_auth else load_or_create_token(cfg.state_dir)
        registry = CollectorRegistry()
        ctx = ApiContext(
            store=self.store,
            datapath=self.datapath,
            interfaces=list(cfg.ifaces),
            version=__version__,
            started_monotonic=time.monotonic(),
            token=token,
            bind_hosts=set(),  # start_api adds the hosts it listens on
            registry=registry,
            reload=self.reload if cfg.policy_file is not None else None,
            extra_stats=self._extra_stats,
            flows=self.pipeline.websocket if self.pipeline is not None else None,
            fleet_flows=self.fleet_feed.hub if self.fleet_feed is not None else None,
            policy_mode=Mode.STAGED if cfg.datapath.staged_all else Mode.ENFORCE,
            failsafe=cfg.datapath.failsafe,
            lockout=self.lockout,
            fleet=self.follower,
        )
        if self.pipeline is not None:
            register_metrics(registry, self.pipeline)
        registry.register(PressureCollector(self.pressure))
        if self.follower is not None:
            registry.register(FleetCollector(self.follower))
        runner = await start_api(ctx, list(cfg.api_listen))
        for addr in cfg.api_listen:
            log.info("API listening on %s%s", addr, " (no auth)" if cfg.no_auth else "")
        tcp = [a for a in cfg.api_listen if not a.startswith("unix:")]
        if tcp:
            auth = (
                ""
                if cfg.no_auth
                else (f' -H "Authorization: Bearer $(cat {cfg.state_dir / "api-token"})"')
            )
            log.info("try: curl%s http://%s/api/v1/stats", auth, tcp[0])
            log.info("  or: microseg stats --api %s --state-dir %s", tcp[0], cfg.state_dir)
            self._announce_viewer(ctx, tcp[0])
        return runner

    def _extra_stats(self) -> dict[str, Any]:
        """For /api/v1/stats and /metrics: the pipeline's counters and the pressure watch's
        last reading (rates, active alerts)."""
        out = self.pipeline.extra_stats() if self.pipeline is not None else {}
        out["pressure"] = self.pressure.snapshot()
        if self.fleet_feed is not None:
            out["fleet_feed"] = self.fleet_feed.stats()
        return out

    def _alert(self, change: AlertChange) -> None:
        self._publish_alert(change.fields())

    def _publish_alert(self, fields: dict[str, Any]) -> None:
        if self.pipeline is not None:
            self.pipeline.publish_alert(fields)

    def _announce_viewer(self, ctx: Any, listen: str) -> None:
        # The one-time sign-in link goes to stdout only, never into the log.
        from streamer.api.viewer import viewer_url

        cfg = self.config
        print(f"viewer: {viewer_url(ctx, listen)}", flush=True)
        log.info(
            "viewer: open the one-time sign-in link printed on stdout (valid %d min); another:"
            " microseg viewer-url --api %s --state-dir %s",
            int(ctx.viewer.code_ttl // 60),
            listen,
            cfg.state_dir,
        )

    async def _reaper(self, interval: float) -> None:
        """Remove expired sessions and fragments every `interval` s (Datapath.reap_expired,
        in a thread: it walks the tables). A failed round is logged and the next one tried."""
        while True:
            await asyncio.sleep(interval)
            try:
                got = await asyncio.to_thread(self.datapath.reap_expired)
            except DatapathError as e:
                log.warning("reaping expired sessions failed: %s", e)
                continue
            if any(got.values()):
                log.debug("reaped %s", got)
            if self._heap_dirty:
                # By now the replaced set (and its retired generation) is garbage; hand the
                # freed heap back, or each large replace leaves its peak in the RSS.
                self._heap_dirty = False
                await asyncio.to_thread(release_heap)

    async def _print_stats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            c = self.datapath.counters()
            print(
                f"stats gen={self.generation} total={c['total_packets']}"
                f" allowed={c['allowed_packets']} denied={c['denied_packets']}"
                f" logged={c['logged_packets']} sessions+={c['new_sessions']}"
                f" hits={c['session_hits']} parse_drops={c['parse_drops']}"
                f" events={c['events_sent']} lost={c['events_lost']}",
                flush=True,
            )


def release_heap() -> None:
    """Return free heap pages to the system (glibc's malloc_trim); a no-op elsewhere."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def run_agent(config: AgentConfig) -> int:
    """Run the agent in the foreground until SIGINT/SIGTERM; returns the exit code."""
    return asyncio.run(Agent(config).run())


def describe(obj: Any) -> str:
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode()
