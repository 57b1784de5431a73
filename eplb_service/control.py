"""The control plane: what the service does, independent of gRPC and HTTP.

:class:`ControlPlane` owns every deployment, the store, the planner and the rollout controller.
The gRPC servicer calls :meth:`ControlPlane.hello`, :meth:`~ControlPlane.report`,
:meth:`~ControlPlane.plan_ack`, :meth:`~ControlPlane.heartbeat` and
:meth:`~ControlPlane.disconnect`; the REST app calls :meth:`~ControlPlane.rebalance`,
:meth:`~ControlPlane.put_placement` and reads deployments. Everything runs on one event loop
(no locks needed for state); only the planner runs on a worker thread, on copies of the data.
Refusals raise :class:`~eplb_service.errors.EplbError` with a message naming the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from eplb_proto.v1 import eplb_pb2
from eplb_service import codec
from eplb_service.config import Settings
from eplb_service.deployments import NAME_RE, AgentLink, Deployment, Outbox, window_balance
from eplb_service.errors import Code, EplbError, RolloutBusy
from eplb_service.placement import Placement, PlacementError, Topology
from eplb_service.planning import Planner, PlanOutcome, PlanRequest, known_policies
from eplb_service.rollout import Rollout, RolloutController, RolloutState
from eplb_service.store import DeploymentRecord, MemoryStore, Store, StoreError
from eplb_service.telemetry import Telemetry
from eplb_service.window import LoadWindow

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
MAX_INCARNATION_LEN = 128


@dataclass(frozen=True)
class RebalanceResult:
    """What ``POST .../rebalance`` did: the plan, and the rollout it started (if any)."""

    deployment: str
    policy: str
    dry_run: bool
    from_version: int
    outcome: PlanOutcome
    rollout: Rollout | None


class ControlPlane:
    """Deployments, ingestion, planning and rollouts of one service process.

    Args:
        settings: validated settings.
        store: durable state (a fresh :class:`MemoryStore` by default).
        telemetry: metrics (a fresh registry by default).
        clock: unix seconds; mono: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.token = settings.bearer_token()  # ConfigError if token_file is bad; never logged
        self.store: Store = store if store is not None else MemoryStore(settings.rollouts_kept)
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self._clock = clock
        self._mono = mono
        self.deployments: dict[str, Deployment] = {}
        self.rollouts = RolloutController(
            self.store, self.telemetry, settings.rollout_timeout_s, clock=clock, mono=mono
        )
        self.rollouts.on_store_error = self.on_store_error
        self.planner = Planner(settings.planner_threads, settings.planner_processes)
        self._auto_task: asyncio.Task[None] | None = None
        self._window_task: asyncio.Task[None] | None = None
        self.started = False
        # Leadership (docs/decisions/0008): a store with a lease (Redis) elects one leader among
        # the replicas; only the leader ingests, plans and rolls out. Without one, always leader.
        self.leader = False
        self.leader_hint: str | None = None  # who leads, as followers tell clients
        self.store_error: str | None = None  # the last store failure, until the store answers
        self.advertise = settings.advertise_address or f"{settings.host}:{settings.grpc_port}"
        self.leadership: Any = None  # eplb_service.ha.Leadership with a leased store
        self._saved_generation: dict[str, int] = {}
        self._rate: dict[tuple[str, int], tuple[float, float]] = {}  # (tokens, at) per rank

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Warms the planner; then, with a leased store, starts the leadership loop (which
        restores state when it wins the lease), else restores state and leads at once."""
        await self.planner.warm()
        if hasattr(self.store, "acquire_lease"):
            from eplb_service.ha import Leadership

            self.leadership = Leadership(self, self.store)
            await self.leadership.start()
        else:
            await self.become_leader()
        self.started = True

    async def become_leader(self) -> None:
        """Loads every deployment from the store and starts the leader's tasks.

        Raises:
            StoreError: the store failed while loading (nothing is left half-loaded).
        """
        self.deployments.clear()
        self._rate.clear()
        try:
            await self._restore()
        except BaseException:
            self.deployments.clear()
            raise
        self._saved_generation = {
            name: dep.window.generation for name, dep in self.deployments.items()
        }
        self.leader = True
        self.leader_hint = None
        self.telemetry.leader.set(1)
        if self.settings.rebalance_interval_s > 0:
            self._auto_task = asyncio.create_task(
                self._auto_rebalance_loop(), name="auto-rebalance"
            )
        self._window_task = asyncio.create_task(self._window_save_loop(), name="window-save")

    def step_down(self, reason: str) -> None:
        """Stops acting as the leader at once: agent streams end with UNAVAILABLE (agents
        reconnect and resend what was not acknowledged), rollout timers stop without writing,
        in-memory state is dropped (the next leader, maybe this one, reloads it)."""
        if not self.leader:
            return
        self.leader = False
        self.telemetry.leader.set(0)
        for task in (self._auto_task, self._window_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._auto_task = self._window_task = None
        log.warning("stepping down as leader: %s", reason)
        self.disconnect_all(f"this replica stopped leading ({reason}); reconnect")
        self.rollouts.abandon(sum(dep.rollout is not None for dep in self.deployments.values()))
        for name in self.deployments:
            self.telemetry.agents_connected.labels(name).set(0)
        self.deployments.clear()
        self.telemetry.deployments.set(0)

    def on_store_error(self, exc: StoreError) -> None:
        """A store call failed: memory may now be ahead of the store, so stop leading; the
        leadership loop takes the lease back (and reloads) once the store answers."""
        self.store_error = str(exc)
        self.telemetry.store_up.set(0)
        self.telemetry.store_errors.inc()
        log.error("store failure: %s", exc)
        if self.leadership is not None:
            self.leadership.lose(f"store unavailable: {exc}")
        else:
            self.step_down(f"store unavailable: {exc}")

    def store_ok(self) -> None:
        if self.store_error is not None:
            log.warning("store answers again")
        self.store_error = None
        self.telemetry.store_up.set(1)

    def not_ready(self) -> str | None:
        """None when this replica serves agents, else why not (for /readyz)."""
        if not self.started:
            return "starting"
        if self.store_error is not None:
            return f"store unavailable: {self.store_error}"
        if not self.leader:
            return self.not_leader_message()
        return None

    def not_leader_message(self) -> str:
        hint = f"; the leader is {self.leader_hint}" if self.leader_hint else ""
        return f"this replica is not the leader{hint}"

    def require_leader(self) -> None:
        """Raises EplbError(UNAVAILABLE) unless this replica leads and its store answers."""
        if self.store_error is not None:
            raise EplbError(
                Code.UNAVAILABLE, f"store unavailable: {self.store_error}; retry later", "store"
            )
        if not self.leader:
            raise EplbError(Code.UNAVAILABLE, self.not_leader_message(), "not_leader")

    async def close(self) -> None:
        was_leader = self.leader
        self.started = False
        for task in (self._auto_task, self._window_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.disconnect_all("service shutting down")
        await self.rollouts.close()
        if was_leader and self.store_error is None:
            with contextlib.suppress(StoreError):
                await self.save_windows()
        if self.leadership is not None:
            await self.leadership.close()
        self.leader = False
        self.planner.close()
        await self.store.close()

    async def save_windows(self) -> None:
        """Writes the window of every deployment whose window changed since its last save."""
        for name, dep in list(self.deployments.items()):
            generation = dep.window.generation
            if self._saved_generation.get(name) == generation:
                continue
            await self.store.save_window(name, dep.window.snapshot())
            self._saved_generation[name] = generation

    async def _window_save_loop(self) -> None:
        interval = self.settings.window_save_s or self.settings.report_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.save_windows()
            except StoreError as exc:
                self.on_store_error(exc)
                return

    def disconnect_all(self, reason: str) -> None:
        """Ends every agent stream with UNAVAILABLE (agents reconnect with backoff)."""
        for dep in self.deployments.values():
            for link in list(dep.links.values()):
                link.outbox.close(Code.UNAVAILABLE, reason)

    async def _restore(self) -> None:
        for record in await self.store.load_deployments():
            window = self._new_window(record.topology)
            placements: dict[int, Placement] = {}
            versions = await self.store.placement_versions(record.name)
            older = [v for v in versions if v != record.active_version]
            keep = [*older[-(self.settings.versions_kept - 1) :], record.active_version]
            for version in sorted(keep):
                phy2log = await self.store.load_placement(record.name, version)
                if phy2log is None:
                    continue
                placements[version] = Placement(phy2log, record.topology)
                window.add_version(version, placements[version].phy2log)
            dep = Deployment(
                record, placements, window, rollouts_kept=self.settings.rollouts_kept
            )
            ingest = await self.store.load_ingest(record.name)
            dep.last_sequence.update(ingest.last_sequence)
            dep.tokens_total = ingest.tokens_total
            window.restore(await self.store.load_window(record.name))
            resume: Rollout | None = None
            for snapshot in await self.store.load_rollouts(record.name):
                phy2log = await self.store.load_placement(record.name, int(snapshot["version"]))
                if phy2log is None:
                    continue
                placement = Placement(phy2log, record.topology)
                rollout = Rollout.from_dict(snapshot, placement, self._mono())
                if rollout.in_flight:
                    resume = rollout
                dep.remember(rollout)
            if resume is not None:
                # In flight when the previous leader died: finish it (docs/decisions/0008).
                # Its version and map are durable and ranks may hold it staged or have
                # switched already, so cancelling could undo a switch the group made on its
                # own; reconnecting ranks get the plan again (or report they switched) and
                # the timeout (restarted now) still cancels it if a rank never comes back.
                if resume.version not in dep.placements:
                    dep.placements[resume.version] = resume.placement
                    window.add_version(resume.version, resume.placement.phy2log)
                dep.rollout = resume
                self.rollouts.resume(dep, resume)
            self.deployments[record.name] = dep
            self.telemetry.active_version.labels(dep.name).set(dep.active_version)
        self.telemetry.deployments.set(len(self.deployments))

    def _new_window(self, topology: Topology) -> LoadWindow:
        s = self.settings
        return LoadWindow(
            topology.num_layers,
            topology.num_experts,
            topology.num_slots,
            span_s=s.window_s,
            buckets=s.window_buckets,
            versions_kept=s.versions_kept,
            clock=self._clock,
        )

    # -- lookups ---------------------------------------------------------------------------

    def get(self, name: str) -> Deployment:
        """Raises EplbError(NOT_FOUND) for an unknown deployment."""
        dep = self.deployments.get(name)
        if dep is None:
            raise EplbError(Code.NOT_FOUND, f"unknown deployment {name!r}", "not_found")
        return dep

    def settings_message(self) -> eplb_pb2.ServiceMessage:
        s = self.settings
        return eplb_pb2.ServiceMessage(
            settings=eplb_pb2.Settings(
                report_interval_s=s.report_interval_s,
                agreement_period_steps=s.agreement_period_steps,
                layers_per_step=s.layers_per_step,
            )
        )

    # -- agent stream ----------------------------------------------------------------------

    async def hello(self, hello: eplb_pb2.Hello, outbox: Outbox, peer: str = "") -> AgentLink:
        """Registers or checks the deployment, attaches the stream, sends settings (and the
        plan when the rank is behind).

        Raises:
            EplbError: INVALID_ARGUMENT (malformed hello), FAILED_PRECONDITION (shape differs
                from the registered one; version never issued or placement differs).
        """

        def bad(message: str) -> EplbError:
            return EplbError(Code.INVALID_ARGUMENT, f"hello.{message}", "bad_hello")

        self.require_leader()
        s = self.settings
        for wire, limit, setting in (
            ("num_layers", s.max_layers, "max_layers"),
            ("num_experts", s.max_experts, "max_experts"),
            ("num_slots", s.max_slots, "max_slots"),
        ):
            if getattr(hello, wire) > limit:
                raise EplbError(
                    Code.INVALID_ARGUMENT,
                    f"hello.{wire}: {getattr(hello, wire)} exceeds the limit {setting}={limit} "
                    f"(raise it with --{setting.replace('_', '-')} or EPLB_{setting.upper()})",
                    "limit",
                )

        if not NAME_RE.match(hello.deployment):
            raise bad(f"deployment: {hello.deployment!r} must match [A-Za-z0-9._-]{{1,63}}")
        if hello.world_size < 1:
            raise bad("world_size: must be >= 1")
        if hello.rank >= hello.world_size:
            raise bad(f"rank: {hello.rank} >= world_size {hello.world_size}")
        if not hello.incarnation or len(hello.incarnation) > MAX_INCARNATION_LEN:
            raise bad(f"incarnation: must be 1..{MAX_INCARNATION_LEN} characters")
        try:
            topology = Topology(
                num_layers=hello.num_layers,
                num_experts=hello.num_experts,
                num_slots=hello.num_slots,
                num_ranks=hello.world_size,
                num_nodes=hello.num_nodes,
            )
        except PlacementError as exc:
            raise bad(str(exc).replace("num_ranks", "world_size")) from None

        dep = self.deployments.get(hello.deployment)
        version = hello.active_version
        if dep is None:
            if len(self.deployments) >= s.max_deployments:
                raise EplbError(
                    Code.FAILED_PRECONDITION,
                    f"hello.deployment: cannot register {hello.deployment!r}: the service has "
                    f"max_deployments={s.max_deployments} deployments (raise it with "
                    "--max-deployments or EPLB_MAX_DEPLOYMENTS)",
                    "limit",
                )
            dep = await self._register(hello, topology)
        else:
            mismatch = dep.shape_mismatch(topology)
            if mismatch:
                raise EplbError(
                    Code.FAILED_PRECONDITION,
                    f"hello: deployment {dep.name!r}: {mismatch}",
                    "shape_mismatch",
                )
            if version > dep.latest_version:
                raise EplbError(
                    Code.FAILED_PRECONDITION,
                    f"hello.active_version: {version} was never issued "
                    f"(latest is {dep.latest_version})",
                    "future_version",
                )
            known = dep.placements.get(version)
            if known is not None and len(hello.placement.shape):
                theirs = self._decode_placement(hello.placement, topology)
                if theirs != known:
                    diff = np.argwhere(theirs.phy2log != known.phy2log)[0]
                    raise EplbError(
                        Code.FAILED_PRECONDITION,
                        f"hello.placement: differs from registered version {version} "
                        f"(first at layer {int(diff[0])}, slot {int(diff[1])})",
                        "placement_mismatch",
                    )

        now = self._clock()
        link = AgentLink(dep.name, hello.rank, hello.incarnation, peer, outbox, now)
        old = dep.links.get(hello.rank)
        if old is not None:
            old.outbox.close(
                Code.ABORTED, f"superseded by a newer stream for rank {hello.rank} ({peer})"
            )
        dep.links[hello.rank] = link
        status = dep.rank(hello.rank)
        status.incarnation, status.connected = hello.incarnation, True
        status.active_version, status.step, status.last_seen = version, hello.step, now
        self.telemetry.agents_connected.labels(dep.name).set(dep.ranks_connected)
        log.info(
            "%s rank %d connected (incarnation %s, version %d, %s)",
            dep.name, hello.rank, hello.incarnation, version, peer,
        )

        outbox.send(self.settings_message())
        if dep.rollout is not None:
            await self.rollouts.on_hello(dep, link, version)
        elif version < dep.active_version:
            outbox.send(
                self.rollouts.plan_message(
                    self._rollout_id_of(dep, dep.active_version),
                    dep.active_version,
                    dep.active_placement,
                )
            )
        else:
            await self._adopt_rank_version(dep, hello.rank, version)
        return link

    async def _adopt_rank_version(self, dep: Deployment, rank: int, version: int) -> None:
        """Makes ``version`` active when a rank routes with it and no rollout is in flight.

        Ranks switch only together (the in-band agreement), so one rank routing with an issued
        version newer than the active one means the whole group switched under a rollout this
        process did not see finish: it restarted mid-rollout, or the rollout timed out just
        after the switch. The ranks are the truth.
        """
        if dep.rollout is not None or version <= dep.active_version:
            return
        if version not in dep.placements:
            return
        log.warning("%s: rank %d routes with v%d; adopting it", dep.name, rank, version)
        dep.activate(version)
        self.telemetry.active_version.labels(dep.name).set(version)
        await self.store.save_deployment(dep.record())

    @staticmethod
    def _rollout_id_of(dep: Deployment, version: int) -> str:
        for rollout in dep.rollouts.values():
            if rollout.version == version:
                return rollout.id
        return ""

    @staticmethod
    def _decode_placement(tensor: eplb_pb2.Tensor, topology: Topology) -> Placement:
        try:
            arr = codec.decode(
                tensor, "hello.placement", shape=(topology.num_layers, topology.num_slots)
            )
            return Placement(arr, topology)
        except codec.CodecError as exc:
            raise EplbError(Code.INVALID_ARGUMENT, str(exc), "bad_hello") from None
        except PlacementError as exc:
            raise EplbError(
                Code.INVALID_ARGUMENT, f"hello.placement: {exc}", "bad_hello"
            ) from None

    async def _register(self, hello: eplb_pb2.Hello, topology: Topology) -> Deployment:
        if len(hello.placement.shape) or hello.placement.data:
            placement = self._decode_placement(hello.placement, topology)
        else:
            placement = Placement.identity(topology)
        version = hello.active_version
        record = DeploymentRecord(
            name=hello.deployment,
            topology=topology,
            options=self.settings.options_for(hello.deployment),
            created_at=self._clock(),
            active_version=version,
            latest_version=version,
        )
        window = self._new_window(topology)
        window.add_version(version, placement.phy2log)
        dep = Deployment(
            record, {version: placement}, window, rollouts_kept=self.settings.rollouts_kept
        )
        # In memory first (no await in between): a concurrent hello sees the registration.
        self.deployments[dep.name] = dep
        self.telemetry.deployments.set(len(self.deployments))
        self.telemetry.active_version.labels(dep.name).set(version)
        log.info(
            "registered deployment %s: L=%d E=%d P=%d R=%d N=%d at v%d",
            dep.name, topology.num_layers, topology.num_experts, topology.num_slots,
            topology.num_ranks, topology.num_nodes, version,
        )
        await self.store.save_placement(dep.name, version, placement.phy2log)
        await self.store.save_deployment(record)
        return dep

    async def report(self, link: AgentLink, report: eplb_pb2.LoadReport) -> None:
        """Counts a load report once and acknowledges it (cumulatively).

        Raises:
            EplbError: INVALID_ARGUMENT (sequence 0, steps, dtype, shape, length, negative),
                FAILED_PRECONDITION (stale or future placement version).
        """
        arrived = time.perf_counter()
        dep = self._dep_of(link)
        self._rate_limit(dep, link.rank)
        seq = report.sequence
        if seq == 0:
            raise EplbError(Code.INVALID_ARGUMENT, "report.sequence: must be >= 1", "protocol")
        last = dep.seen(link.incarnation)
        if seq <= last:
            # Already counted (a resend after a reconnect): acknowledge again, count nothing.
            # Checked before anything else so that a resend can never loop on a refusal.
            self.telemetry.reports_duplicate.labels(dep.name).inc()
            link.outbox.send(eplb_pb2.ServiceMessage(ack=eplb_pb2.Ack(sequence=last)))
            return
        if report.step_end < report.step_begin:
            raise EplbError(
                Code.INVALID_ARGUMENT,
                f"report.step_end: {report.step_end} < step_begin {report.step_begin}",
                "protocol",
            )
        t = dep.topology
        try:
            counts = codec.decode(
                report.counts, "report.counts", shape=(t.num_layers, t.num_slots), nonnegative=True
            )
        except codec.CodecError as exc:
            raise EplbError(Code.INVALID_ARGUMENT, str(exc), exc.reason) from None
        version = report.placement_version
        if version > dep.latest_version:
            raise EplbError(
                Code.FAILED_PRECONDITION,
                f"report.placement_version: {version} was never issued "
                f"(latest is {dep.latest_version})",
                "future_version",
            )
        if not dep.window.has_version(version):
            kept = dep.window.versions
            raise EplbError(
                Code.FAILED_PRECONDITION,
                f"report.placement_version: {version} is stale; the service keeps the maps of "
                f"versions {kept[0]}..{kept[-1]}",
                "stale_version",
            )
        logical = dep.window.to_logical(version, counts)
        tokens = int(counts.sum())
        # Durable first (dedup check + tokens_total in one atomic store call), then memory,
        # then the ack: an acknowledged report is counted exactly once, even across a crash.
        counted = await self.store.commit_report(dep.name, link.incarnation, seq, tokens)
        if self.deployments.get(dep.name) is not dep:  # stepped down meanwhile: the next
            # leader reloads tokens_total and deduplication from the store, this one included
            raise EplbError(Code.UNAVAILABLE, "leadership changed while counting; resend", "other")
        if not counted or seq <= dep.seen(link.incarnation):
            # The store had counted it already (a commit whose answer was lost, or a resend
            # racing on a superseded stream): acknowledge without counting again.
            self.telemetry.reports_duplicate.labels(dep.name).inc()
            link.outbox.send(eplb_pb2.ServiceMessage(ack=eplb_pb2.Ack(sequence=seq)))
            return
        now = self._clock()
        dep.window.add(logical, now)
        evicted = dep.count(link.incarnation, seq, tokens, now)
        status = dep.rank(link.rank)
        status.last_seen = now
        status.step = report.step_end
        self.telemetry.reports_received.labels(dep.name).inc()
        self.telemetry.tokens.labels(dep.name).inc(tokens)
        if evicted:
            await self.store.forget_incarnations(dep.name, evicted)
        link.outbox.send(eplb_pb2.ServiceMessage(ack=eplb_pb2.Ack(sequence=seq)))
        self.telemetry.report_ingest_seconds.observe(time.perf_counter() - arrived)

    def _dep_of(self, link: AgentLink) -> Deployment:
        """The deployment of an open stream; UNAVAILABLE once the stream was closed (e.g. this
        replica stepped down: its messages must not touch state reloaded since)."""
        dep = self.deployments.get(link.deployment)
        if dep is None or link.outbox.closed is not None or dep.links.get(link.rank) is not link:
            raise EplbError(
                Code.UNAVAILABLE,
                f"stream of {link.deployment} rank {link.rank} is closed; reconnect",
                "other",
            )
        return dep

    def _rate_limit(self, dep: Deployment, rank: int) -> None:
        """Token bucket per rank: ``max_reports_per_s``, bursts up to two seconds' worth."""
        rate = self.settings.max_reports_per_s
        burst = max(2.0 * rate, 8.0)
        key = (dep.name, rank)
        now = self._mono()
        tokens, at = self._rate.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._rate[key] = (tokens, now)
            raise EplbError(
                Code.RESOURCE_EXHAUSTED,
                f"report: {dep.name} rank {rank} sends more than max_reports_per_s={rate:g} "
                "reports per second (raise it with --max-reports-per-s or "
                "EPLB_MAX_REPORTS_PER_S, or lower the agents' report rate)",
                "rate_limited",
            )
        self._rate[key] = (tokens - 1.0, now)

    async def plan_ack(self, link: AgentLink, ack: eplb_pb2.PlanAck) -> None:
        dep = self._dep_of(link)
        status = dep.rank(link.rank)
        status.last_seen = self._clock()
        if ack.status == eplb_pb2.PlanAck.STATUS_APPLIED:
            status.active_version = ack.version
            status.step = ack.step
        await self.rollouts.on_ack(dep, link, ack)
        if ack.status == eplb_pb2.PlanAck.STATUS_APPLIED:
            await self._adopt_rank_version(dep, link.rank, ack.version)

    async def heartbeat(self, link: AgentLink, heartbeat: eplb_pb2.Heartbeat) -> None:
        dep = self._dep_of(link)
        status = dep.rank(link.rank)
        status.last_seen = self._clock()
        status.step = heartbeat.step
        if heartbeat.active_version <= dep.latest_version:
            status.active_version = heartbeat.active_version
            await self.rollouts.on_rank_version(dep, link.rank, heartbeat.active_version)
            await self._adopt_rank_version(dep, link.rank, heartbeat.active_version)

    def disconnect(self, link: AgentLink) -> None:
        dep = self.deployments.get(link.deployment)
        if dep is None or dep.links.get(link.rank) is not link:
            return  # superseded by a newer stream of the same rank
        del dep.links[link.rank]
        dep.rank(link.rank).connected = False
        self.telemetry.agents_connected.labels(dep.name).set(dep.ranks_connected)
        log.info("%s rank %d disconnected", dep.name, link.rank)

    def get_placement(self, name: str) -> tuple[int, Placement]:
        dep = self.get(name)
        return dep.active_version, dep.active_placement

    # -- operator actions ------------------------------------------------------------------

    def plan_request(
        self,
        dep: Deployment,
        *,
        policy: str | None = None,
        min_gain: float | None = None,
        max_moves: int | None = None,
    ) -> PlanRequest:
        """A PlanRequest with the deployment's options and the service defaults filled in.

        Raises:
            EplbError: INVALID_ARGUMENT for an unknown policy.
        """
        policy = policy or self.settings.policy
        if policy not in known_policies():
            raise EplbError(
                Code.INVALID_ARGUMENT,
                f"policy: unknown policy {policy!r}; known: {', '.join(known_policies())}",
            )
        return PlanRequest(
            policy=policy,
            min_gain=0.0 if min_gain is None else min_gain,
            max_moves=max_moves,
            num_groups=dep.options.num_groups,
            expert_bytes=dep.options.expert_bytes,
        )

    async def _plan(self, dep: Deployment, request: PlanRequest) -> tuple[int, PlanOutcome]:
        version, current = dep.active_version, dep.active_placement
        load = dep.window.total()
        try:
            outcome = await self.planner.run(load, current, request)
        except ValueError as exc:
            raise EplbError(Code.FAILED_PRECONDITION, f"planner: {exc}", "planner") from None
        self.telemetry.planner_seconds.labels(request.policy).observe(outcome.seconds)
        self.telemetry.predicted_balancedness.labels(dep.name).set(
            outcome.after.balancedness_mean
        )
        dep.last_predicted = outcome.after.balancedness_mean
        return version, outcome

    async def rebalance(
        self,
        name: str,
        *,
        dry_run: bool = False,
        policy: str | None = None,
        min_gain: float | None = None,
        max_moves: int | None = None,
        trigger: str = "rebalance",
    ) -> RebalanceResult:
        """Plans from the current window; unless ``dry_run``, rolls the plan out if worth it.

        Raises:
            EplbError: NOT_FOUND, INVALID_ARGUMENT (policy), RolloutBusy (a rollout runs or a
                rebalance is being planned), FAILED_PRECONDITION (the planner refused).
        """
        self.require_leader()
        dep = self.get(name)
        request = self.plan_request(dep, policy=policy, min_gain=min_gain, max_moves=max_moves)
        if dry_run:
            version, outcome = await self._plan(dep, request)
            return RebalanceResult(dep.name, request.policy, True, version, outcome, None)
        if dep.rollout is not None:
            raise RolloutBusy(dep.name, dep.rollout.id)
        if dep.plan_lock.locked():
            raise EplbError(
                Code.ALREADY_EXISTS, f"deployment {name!r}: a rebalance is being planned",
                "rollout_busy",
            )
        async with dep.plan_lock:
            version, outcome = await self._plan(dep, request)
            if dep.rollout is not None:
                raise RolloutBusy(dep.name, dep.rollout.id)
            if dep.active_version != version:
                raise EplbError(
                    Code.ALREADY_EXISTS,
                    f"deployment {name!r}: the active version moved from {version} to "
                    f"{dep.active_version} while planning; retry",
                    "rollout_busy",
                )
            rollout = None
            if outcome.worth_it:
                rollout = await self.rollouts.start(
                    dep, outcome.placement, trigger=trigger, plan=plan_summary(outcome)
                )
            else:
                self.telemetry.rebalances.labels(dep.name, "skipped_no_gain").inc()
            return RebalanceResult(dep.name, request.policy, False, version, outcome, rollout)

    async def put_placement(self, name: str, phy2log: Any) -> Rollout | None:
        """Rolls out a given map; None when it equals the active placement (nothing to do).

        Raises:
            EplbError: NOT_FOUND, INVALID_ARGUMENT (naming the problem in the map), RolloutBusy.
        """
        self.require_leader()
        dep = self.get(name)
        try:
            placement = Placement(phy2log, dep.topology)
        except PlacementError as exc:
            raise EplbError(
                Code.INVALID_ARGUMENT, f"physical_to_logical_map: {exc}", "bad_placement"
            ) from None
        if dep.rollout is not None:
            raise RolloutBusy(dep.name, dep.rollout.id)
        if placement == dep.active_placement:
            return None
        if dep.plan_lock.locked():
            raise EplbError(
                Code.ALREADY_EXISTS, f"deployment {name!r}: a rebalance is being planned",
                "rollout_busy",
            )
        async with dep.plan_lock:
            before = dep.balance()
            load = dep.window.total()
            predicted = window_balance(load, placement) if load.any() else None
            plan = {
                "before": None if before is None else {"mean": before.mean, "worst": before.worst},
                "after": None if predicted is None else {
                    "mean": predicted.mean, "worst": predicted.worst
                },
            }
            return await self.rollouts.start(dep, placement, trigger="placement", plan=plan)

    # -- auto-rebalance --------------------------------------------------------------------

    async def _auto_rebalance_loop(self) -> None:
        interval = self.settings.rebalance_interval_s
        while True:
            await asyncio.sleep(interval)
            for dep in list(self.deployments.values()):
                try:
                    await self.auto_rebalance(dep)
                except EplbError as exc:
                    log.info("auto-rebalance of %s skipped: %s", dep.name, exc.message)
                except StoreError as exc:
                    self.on_store_error(exc)
                    return
                except Exception:
                    log.exception("auto-rebalance of %s failed", dep.name)

    async def auto_rebalance(self, dep: Deployment) -> Rollout | None:
        """One auto-rebalance decision for ``dep``: plan with ``min_gain`` from the current
        placement and roll out if worth it, unless a rollout runs, the cooldown is on, a rank
        is missing or the window is empty."""
        s = self.settings
        if dep.rollout is not None or dep.plan_lock.locked():
            return None
        if dep.last_rollout_end is not None and self._mono() - dep.last_rollout_end < s.cooldown_s:
            return None
        if dep.ranks_connected < dep.topology.num_ranks:
            return None
        if not dep.window.total().any():
            return None
        result = await self.rebalance(dep.name, min_gain=s.min_gain, trigger="auto")
        return result.rollout


def plan_summary(outcome: PlanOutcome) -> dict[str, Any]:
    """JSON summary of a plan, kept with its rollout."""
    return {
        "before": {
            "mean": outcome.before.balancedness_mean,
            "worst": outcome.before.balancedness_worst,
        },
        "after": {
            "mean": outcome.after.balancedness_mean,
            "worst": outcome.after.balancedness_worst,
        },
        "gain": outcome.gain,
        "migration": outcome.migration.to_dict(),
        "planner_seconds": outcome.seconds,
    }


__all__ = ["ControlPlane", "RebalanceResult", "RolloutState", "plan_summary"]
