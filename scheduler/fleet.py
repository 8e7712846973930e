"""The executor registry: heartbeats with a TTL, liveness, drain requests.

An executor is alive while its heartbeat hash exists: it re-writes the hash and its TTL every `interval` seconds,
so a process that dies (kill -9, lost host) disappears after at most one TTL. The registry set remembers every
executor id until the scheduler reaps it, which is how the scheduler learns that one died.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from lorafleet.scheduler import keys

HEARTBEAT_TTL_SECONDS = 10.0

_INT_FIELDS = ("pid", "total_bytes", "free_bytes", "peak_bytes", "base_bytes", "jobs", "metrics_port",
               "max_pass_tokens")


def heartbeat(client: redis.Redis, executor_id: str, info: dict[str, Any], ttl: float = HEARTBEAT_TTL_SECONDS) -> None:
    fields = {name: "" if value is None else str(value) for name, value in info.items()}
    fields["heartbeat_at"] = repr(time.time())
    pipe = client.pipeline(transaction=True)
    pipe.sadd(keys.EXECUTORS, executor_id)
    pipe.hset(keys.executor(executor_id), mapping=fields)
    pipe.pexpire(keys.executor(executor_id), int(ttl * 1000))
    pipe.execute()


def _parse(executor_id: str, raw: dict[str, str]) -> dict[str, Any]:
    view: dict[str, Any] = {"executor_id": executor_id, **raw}
    for name in _INT_FIELDS:
        view[name] = int(raw[name]) if raw.get(name) else 0
    view["heartbeat_at"] = float(raw.get("heartbeat_at") or 0)
    view["compat_key"] = raw.get("compat_key") or None
    return view


def executors(client: redis.Redis) -> tuple[list[dict[str, Any]], list[str]]:
    """(alive executors with their last heartbeat, ids of registered executors whose heartbeat expired)."""
    ids = sorted(client.smembers(keys.EXECUTORS))
    pipe = client.pipeline(transaction=False)
    for executor_id in ids:
        pipe.hgetall(keys.executor(executor_id))
    alive, dead = [], []
    for executor_id, raw in zip(ids, pipe.execute()):
        if raw:
            alive.append(_parse(executor_id, raw))
        else:
            dead.append(executor_id)
    return alive, dead


def is_registered(client: redis.Redis, executor_id: str) -> bool:
    """Whether the executor is alive and has not deregistered (its heartbeat hash exists)."""
    return bool(client.exists(keys.executor(executor_id)))


def forget(client: redis.Redis, executor_id: str) -> None:
    """Drop an executor from the registry (after its jobs were handed back)."""
    client.srem(keys.EXECUTORS, executor_id)
    client.delete(keys.executor(executor_id), keys.executor_drain(executor_id))


def request_drain(client: redis.Redis, executor_id: str) -> bool:
    """Ask an executor to checkpoint its jobs, hand them back and exit. False if no such executor is alive."""
    if not client.exists(keys.executor(executor_id)):
        return False
    client.set(keys.executor_drain(executor_id), "1")
    return True


def drain_requested(client: redis.Redis, executor_id: str) -> bool:
    return client.get(keys.executor_drain(executor_id)) == "1"
