"""The Redis implementation of :class:`~eplb_service.store.Store`, and the leader lease.

Keys (``P`` = ``redis_prefix``, ``D`` = a deployment name)::

    P:lease                 leader lease "REPLICA|FENCE|ADVERTISE" (SET NX PX, renewed)
    P:fence                 INCR counter: every lease acquisition gets a new fence number
    P:deployments           SET of deployment names
    P:d:D:record            JSON: shape, options, created_at, active/latest version
    P:d:D:placements        HASH version -> phy2log [L, P] int64 (.npy bytes); never rewritten
    P:d:D:rollouts          HASH rollout id -> JSON snapshot (with its outcome)
    P:d:D:rollout_order     ZSET rollout id by created_at (trimmed to rollouts_kept)
    P:d:D:dedup             HASH agent incarnation -> last counted sequence
    P:d:D:tokens            tokens_total (INCRBY)
    P:d:D:window            HASH bucket index -> [L, E] int64 (.npy bytes), replaced whole

Every write runs as one Lua script, so it is atomic, and first compares ``P:lease`` with this
replica's lease token (the *fence*): a replica that lost its lease (paused, partitioned, replaced)
cannot write anything, even if it does not know yet. A report is counted by one script that checks
the deduplication entry, advances it and adds to ``tokens`` together; the service acknowledges the
report only after that script returned. See docs/decisions/0008-durable-state-and-ha.md.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError
from redis.retry import Retry

from eplb_service.config import DeploymentOptions
from eplb_service.placement import Topology
from eplb_service.store import (
    DeploymentRecord,
    IngestState,
    StoreFenced,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]

_FENCE = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED this replica does not hold the leader lease')
end
"""

# KEYS[1] lease; ARGV[1] token ('' = unfenced), ARGV[2] number of commands, then per command
# its argument count followed by its arguments.
_WRITE = _FENCE + """
local i = 3
local n = tonumber(ARGV[2])
for c = 1, n do
  local argc = tonumber(ARGV[i])
  local cmd = {}
  for j = 1, argc do cmd[j] = ARGV[i + j] end
  i = i + argc + 1
  redis.call(unpack(cmd))
end
return n
"""

# KEYS: lease, dedup hash, tokens; ARGV: token, incarnation, sequence, tokens.
# Returns {counted (0/1), tokens_total, last sequence} as strings (Lua numbers are doubles).
_COMMIT_REPORT = _FENCE + """
local last = redis.call('HGET', KEYS[2], ARGV[2])
if last and tonumber(last) >= tonumber(ARGV[3]) then
  return {'0', redis.call('GET', KEYS[3]) or '0', last}
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local total = redis.call('INCRBY', KEYS[3], ARGV[4])
return {'1', tostring(total), ARGV[3]}
"""

# KEYS: lease, fence; ARGV: replica id, advertise, lease ms. A free lease, or one held by the
# same replica id (a restart), is taken with a new fence number. Returns the token or false.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. '|' then
  return false
end
local fence = redis.call('INCR', KEYS[2])
local token = ARGV[1] .. '|' .. fence .. '|' .. ARGV[2]
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
return token
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def redact_url(url: str) -> str:
    """``url`` without its password (for logs and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _to_bytes(array: IntArray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.int64), allow_pickle=False)
    return buf.getvalue()


def _from_bytes(data: bytes) -> IntArray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    return np.asarray(arr, dtype=np.int64)


def parse_lease(value: str | None) -> tuple[str, int, str] | None:
    """``"REPLICA|FENCE|ADVERTISE"`` -> (replica, fence, advertise); None when absent."""
    if not value:
        return None
    replica, _, rest = value.partition("|")
    fence, _, advertise = rest.partition("|")
    try:
        return replica, int(fence), advertise
    except ValueError:
        return replica, 0, advertise


class RedisStore:
    """Durable state in Redis (redis-py asyncio), every write fenced by the leader lease.

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` for TLS, passwords in the URL).
        prefix: prefix of every key.
        rollouts_kept: rollout snapshots kept per deployment.
        timeout_s: socket (connect and call) timeout.

    Attributes:
        fence_token: the lease token writes are checked against; None = this replica is not the
            leader and every write raises :class:`StoreFenced`. Set by the leadership loop.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "eplb",
        rollouts_kept: int = 100,
        timeout_s: float = 2.0,
        client: Any = None,
    ) -> None:
        self.url = redact_url(url)
        self.prefix = prefix
        self.rollouts_kept = rollouts_kept
        self.fence_token: str | None = None
        self.redis: Any = client or aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            health_check_interval=30,
        )
        self._write = self.redis.register_script(_WRITE)
        self._commit = self.redis.register_script(_COMMIT_REPORT)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    # -- keys ------------------------------------------------------------------------------

    @property
    def lease_key(self) -> str:
        return f"{self.prefix}:lease"

    def _k(self, deployment: str, what: str) -> str:
        return f"{self.prefix}:d:{deployment}:{what}"

    # -- plumbing --------------------------------------------------------------------------

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except ResponseError as exc:
            if "FENCED" in str(exc):
                raise StoreFenced(
                    "write refused: this replica no longer holds the leader lease"
                ) from None
            raise StoreUnavailable(f"redis {self.url}: {exc}") from None
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(
                f"redis {self.url}: {type(exc).__name__}: {exc or 'no answer'}"
            ) from None

    def _token(self) -> str:
        if self.fence_token is None:
            raise StoreFenced("write refused: this replica is not the leader")
        return self.fence_token

    async def _fenced_write(self, *commands: tuple[Any, ...]) -> None:
        args: list[Any] = [self._token(), len(commands)]
        for command in commands:
            args.append(len(command))
            args.extend(command)
        await self._call(self._write(keys=[self.lease_key], args=args))

    async def ping(self) -> None:
        await self._call(self.redis.ping())

    # -- lease -----------------------------------------------------------------------------

    async def acquire_lease(self, replica_id: str, advertise: str, lease_s: float) -> str | None:
        """Takes the lease if free (or ours from a previous run); the token, else None."""
        token = await self._call(
            self._acquire(
                keys=[self.lease_key, f"{self.prefix}:fence"],
                args=[replica_id, advertise, max(1, int(lease_s * 1000))],
            )
        )
        if not token:
            return None
        return token.decode() if isinstance(token, bytes) else str(token)

    async def renew_lease(self, token: str, lease_s: float) -> bool:
        renewed = await self._call(
            self._renew(keys=[self.lease_key], args=[token, max(1, int(lease_s * 1000))])
        )
        return bool(renewed)

    async def release_lease(self, token: str) -> None:
        await self._call(self._release(keys=[self.lease_key], args=[token]))

    async def lease_holder(self) -> tuple[str, int, str] | None:
        value = await self._call(self.redis.get(self.lease_key))
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        return parse_lease(value)

    # -- Store protocol --------------------------------------------------------------------

    async def save_deployment(self, record: DeploymentRecord) -> None:
        doc = {
            "name": record.name,
            "topology": asdict(record.topology),
            "options": asdict(record.options),
            "created_at": record.created_at,
            "active_version": record.active_version,
            "latest_version": record.latest_version,
        }
        await self._fenced_write(
            ("SADD", f"{self.prefix}:deployments", record.name),
            ("SET", self._k(record.name, "record"), json.dumps(doc)),
        )

    async def load_deployments(self) -> list[DeploymentRecord]:
        names = await self._call(self.redis.smembers(f"{self.prefix}:deployments"))
        records = []
        for raw_name in sorted(names):
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            raw = await self._call(self.redis.get(self._k(name, "record")))
            if raw is None:
                log.warning("redis: deployment %s has no record; skipped", name)
                continue
            doc = json.loads(raw)
            records.append(
                DeploymentRecord(
                    name=doc["name"],
                    topology=Topology(**doc["topology"]),
                    options=DeploymentOptions(**doc["options"]),
                    created_at=float(doc["created_at"]),
                    active_version=int(doc["active_version"]),
                    latest_version=int(doc["latest_version"]),
                )
            )
        return records

    async def save_placement(self, deployment: str, version: int, phy2log: IntArray) -> None:
        await self._fenced_write(
            ("HSETNX", self._k(deployment, "placements"), str(version), _to_bytes(phy2log))
        )

    async def load_placement(self, deployment: str, version: int) -> IntArray | None:
        raw = await self._call(self.redis.hget(self._k(deployment, "placements"), str(version)))
        if raw is None:
            return None
        arr = _from_bytes(raw)
        arr.setflags(write=False)
        return arr

    async def placement_versions(self, deployment: str) -> list[int]:
        keys = await self._call(self.redis.hkeys(self._k(deployment, "placements")))
        return sorted(int(k) for k in keys)

    async def save_rollout(self, deployment: str, rollout: dict[str, Any]) -> None:
        rid = str(rollout["id"])
        order = self._k(deployment, "rollout_order")
        await self._fenced_write(
            ("HSET", self._k(deployment, "rollouts"), rid, json.dumps(rollout)),
            ("ZADD", order, "NX", repr(float(rollout.get("created_at") or 0.0)), rid),
        )
        count = int(await self._call(self.redis.zcard(order)))
        if count > self.rollouts_kept:
            old = await self._call(self.redis.zrange(order, 0, count - self.rollouts_kept - 1))
            if old:
                await self._fenced_write(
                    ("HDEL", self._k(deployment, "rollouts"), *old), ("ZREM", order, *old)
                )

    async def load_rollouts(self, deployment: str) -> list[dict[str, Any]]:
        ids = await self._call(self.redis.zrange(self._k(deployment, "rollout_order"), 0, -1))
        if not ids:
            return []
        docs = await self._call(self.redis.hmget(self._k(deployment, "rollouts"), ids))
        return [json.loads(doc) for doc in docs if doc is not None]

    async def commit_report(
        self, deployment: str, incarnation: str, sequence: int, tokens: int
    ) -> bool:
        result = await self._call(
            self._commit(
                keys=[self.lease_key, self._k(deployment, "dedup"), self._k(deployment, "tokens")],
                args=[self._token(), incarnation, str(sequence), str(tokens)],
            )
        )
        return bool(int(result[0]))

    async def forget_incarnations(self, deployment: str, incarnations: list[str]) -> None:
        if incarnations:
            await self._fenced_write(("HDEL", self._k(deployment, "dedup"), *incarnations))

    async def load_ingest(self, deployment: str) -> IngestState:
        entries = await self._call(self.redis.hgetall(self._k(deployment, "dedup")))
        total = await self._call(self.redis.get(self._k(deployment, "tokens")))
        return IngestState(
            {
                (k.decode() if isinstance(k, bytes) else str(k)): int(v)
                for k, v in entries.items()
            },
            int(total or 0),
        )

    async def save_window(self, deployment: str, buckets: list[tuple[int, IntArray]]) -> None:
        key = self._k(deployment, "window")
        commands: list[tuple[Any, ...]] = [("DEL", key)]
        if buckets:
            fields: list[Any] = []
            for index, load in buckets:
                fields.extend((str(index), _to_bytes(load)))
            commands.append(("HSET", key, *fields))
        await self._fenced_write(*commands)

    async def load_window(self, deployment: str) -> list[tuple[int, IntArray]]:
        entries = await self._call(self.redis.hgetall(self._k(deployment, "window")))
        return sorted(((int(k), _from_bytes(v)) for k, v in entries.items()), key=lambda b: b[0])

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        except Exception:  # closing a connection to a dead server
            log.debug("redis close failed", exc_info=True)


__all__ = ["RedisStore", "parse_lease", "redact_url"]
