"""Leader election among service replicas sharing one Redis (docs/decisions/0008).

The lease is one Redis key, ``PREFIX:lease = "REPLICA|FENCE|ADVERTISE"``, taken with a Lua
set-if-absent-with-expiry (``lease_s``) and renewed every ``lease_s / 3`` by the holder. Each
acquisition draws a new ``FENCE`` from a counter, so the whole value is a fencing token: every
write of the store compares it with the key inside the same Lua script, and a replica that lost
the lease (paused past its expiry, cut off, replaced) cannot write anything.

A follower tries to take the lease every ``lease_s / 3``, so it takes over at most
``lease_s + lease_s / 3`` after the leader's last renewal: within two lease periods.
The leader steps down when a renewal finds the lease gone, when it could not renew for a whole
lease period, or at once when any store call fails (its memory may then be ahead of Redis); it
reloads everything from Redis when it leads again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from eplb_service.store import StoreError

if TYPE_CHECKING:
    from eplb_service.control import ControlPlane

log = logging.getLogger(__name__)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Leadership:
    """Acquires, renews and gives up the leader lease for one :class:`ControlPlane`.

    Args:
        control: the control plane it makes leader (``become_leader``) or follower
            (``step_down``).
        store: a store with ``acquire_lease``/``renew_lease``/``release_lease``/``lease_holder``
            and a ``fence_token`` attribute (:class:`~eplb_service.redis_store.RedisStore`).
    """

    def __init__(self, control: ControlPlane, store: Any) -> None:
        s = control.settings
        self.control = control
        self.store = store
        self.lease_s = s.lease_s
        self.period_s = s.lease_s / 3.0
        self.replica_id = s.replica_id or default_replica_id()
        self.token: str | None = None
        self.deadline = 0.0  # monotonic: the lease surely held until then
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """One attempt now (a lone replica leads before it serves), then the loop."""
        await self.tick()
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        token, self.token = self.token, None
        self.store.fence_token = None
        if token is not None:
            with contextlib.suppress(StoreError, Exception):
                await asyncio.wait_for(self.store.release_lease(token), timeout=1.0)
                log.info("released the leader lease")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.period_s)
            if self._wake.is_set():
                self._wake.clear()
                await asyncio.sleep(min(self.period_s, 0.2))  # no busy loop on a dead store
            try:
                await self.tick()
            except Exception:  # never let the loop die
                log.exception("leadership tick failed")

    def lose(self, reason: str) -> None:
        """Stop leading now (no await: nothing may run in between); the loop retries."""
        self.token = None
        self.store.fence_token = None
        self.control.step_down(reason)
        self._wake.set()

    async def tick(self) -> None:
        control = self.control
        try:
            if self.token is None:
                started = time.monotonic()
                token = await self.store.acquire_lease(
                    self.replica_id, control.advertise, self.lease_s
                )
                control.store_ok()
                if token is None:
                    holder = await self.store.lease_holder()
                    control.leader_hint = (
                        None if holder is None else f"{holder[0]} at {holder[2]}"
                    )
                    return
                self.token = token
                self.store.fence_token = token
                self.deadline = started + self.lease_s
                control.telemetry.leader_changes.inc()
                log.warning(
                    "replica %s is now the leader (fence %s); loading state",
                    self.replica_id, token.split("|")[1],
                )
                try:
                    await control.become_leader()
                except StoreError:
                    self.token = None
                    self.store.fence_token = None
                    raise
                return
            started = time.monotonic()
            if await self.store.renew_lease(self.token, self.lease_s):
                self.deadline = started + self.lease_s
                control.store_ok()
            else:
                holder = await self.store.lease_holder()
                control.leader_hint = None if holder is None else f"{holder[0]} at {holder[2]}"
                self.lose(f"the lease is now held by {control.leader_hint or 'nobody'}")
        except StoreError as exc:
            if control.store_error is None:
                log.error("store failure: %s", exc)
                control.telemetry.store_errors.inc()
            control.store_error = str(exc)
            control.telemetry.store_up.set(0)
            if self.token is not None and time.monotonic() >= self.deadline:
                self.lose(f"could not renew the lease: {exc}")
