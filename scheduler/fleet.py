"""The executor registry: heartbeats with a TTL, liveness, drain requests.

An executor is alive while its heartbeat hash exists: it re-writes the hash and its TTL every `interval` seconds,
so a process that dies (kill -9, lost host) disappears after at most one TTL. The registry set remembers every
executor id until the scheduler reaps it, which is how the scheduler learns that one died.
"""

from __future__ import annotations

import time
from dataclasses import replace

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


def executors(client: redis.Redis) -> tuple[list[ExecutorHeartbeat], list[str]]:
    """(alive executors' last heartbeats, ids of registered executors whose heartbeat expired)."""
    ids = sorted(client.smembers(keys.EXECUTORS))
    pipe = client.pipeline(transaction=False)
    for executor_id in ids:
        pipe.hgetall(keys.executor(executor_id))
    alive, dead = [], []
    for executor_id, raw in zip(ids, pipe.execute()):
        if raw:
            alive.append(ExecutorHeartbeat.from_hash(executor_id, raw))
        else:
            dead.append(executor_id)
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


def drain_requested(client: redis.Redis, executor_id: str) -> bool:
    return client.get(keys.executor_drain(executor_id)) == "1"
