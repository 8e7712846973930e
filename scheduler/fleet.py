"""The executor registry: heartbeats with a TTL, liveness, drain requests.

An executor is alive while its heartbeat hash exists: it re-writes the hash and its TTL every `interval` seconds,
so a process that dies (kill -9, lost host) disappears after at most one TTL. The registry set remembers every
executor id until the scheduler reaps it, which is how the scheduler learns that one died.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Mapping, Optional

import redis

from lorafleet.scheduler import keys
from lorafleet.scheduler.records import ExecutorHeartbeat

HEARTBEAT_TTL_SECONDS = 10.0


def heartbeat(client: redis.Redis, beat: ExecutorHeartbeat, ttl: float = HEARTBEAT_TTL_SECONDS) -> None:
    fields = replace(beat, heartbeat_at=time.time()).to_hash()
    pipe = client.pipeline(transaction=True)
    pipe.sadd(keys.EXECUTORS, beat.executor_id)
    pipe.hset(keys.executor(beat.executor_id), mapping=fields)
    pipe.pexpire(keys.executor(beat.executor_id), int(ttl * 1000))
    pipe.execute()


def executors(client: redis.Redis, known: Optional[Mapping[str, ExecutorHeartbeat]] = None
              ) -> tuple[list[ExecutorHeartbeat], list[str]]:
    """(alive executors' last heartbeats, ids of registered executors whose heartbeat expired). With `known` (the
    heartbeats as last read), only the time of each is read, and the whole heartbeat only where it is newer."""
    ids = sorted(client.smembers(keys.EXECUTORS))
    pipe = client.pipeline(transaction=False)
    if known is not None:
        for executor_id in ids:
            pipe.hget(keys.executor(executor_id), "heartbeat_at")
    times = pipe.execute() if known is not None else [""] * len(ids)
    unchanged: dict[str, ExecutorHeartbeat] = {}
    expired = set()
    for executor_id, at in zip(ids, times):
        last = (known or {}).get(executor_id)
        if at is None:
            expired.add(executor_id)
        elif last is not None and at == repr(last.heartbeat_at):
            unchanged[executor_id] = last
        else:
            pipe.hgetall(keys.executor(executor_id))
    fresh = iter(pipe.execute())
    alive, dead = [], []
    for executor_id in ids:
        raw = None if executor_id in expired or executor_id in unchanged else next(fresh)
        beat = unchanged.get(executor_id) or (ExecutorHeartbeat.from_hash(executor_id, raw) if raw else None)
        if beat is None:
            dead.append(executor_id)
        else:
            alive.append(beat)
    return alive, dead


def is_registered(client: redis.Redis, executor_id: str) -> bool:
    """Whether the executor is alive and has not deregistered (its heartbeat hash exists)."""
    return bool(client.exists(keys.executor(executor_id)))


def forget(client: redis.Redis, executor_id: str) -> None:
    """Drop an executor from the registry (after its jobs were handed back)."""
    client.srem(keys.EXECUTORS, executor_id)
    client.delete(keys.executor(executor_id), keys.executor_drain(executor_id))  # not its holding: jobs' state


def request_drain(client: redis.Redis, executor_id: str) -> bool:
    """Ask an executor to checkpoint its jobs, hand them back and exit. False if no such executor is alive."""
    if not client.exists(keys.executor(executor_id)):
        return False
    client.set(keys.executor_drain(executor_id), "1")
    return True
