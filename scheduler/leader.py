"""One active scheduler at a time: a Redis lock with a TTL and a fencing token.

The holder renews the lock well inside its TTL, from a thread of its own (`keep_renewed`), so no planning round,
however long, can let it lapse while the process lives. A standby polls `try_acquire`; when the leader dies (or is
paused) its lock expires and the standby takes over within about one TTL. Each acquisition increments a fencing counter; the scheduler passes
its token to every write it makes (`JobStore` checks it in Lua), so a paused ex-leader that wakes up after losing
the lock cannot change anything.
"""

from __future__ import annotations

import threading

import redis

from lorafleet.scheduler import keys

# KEYS: lock, fence. ARGV: holder, ttl ms. The lock and its fencing token are taken together or not at all.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLock:
    def __init__(self, client: redis.Redis, holder: str, ttl_seconds: float = 3.0):
        self.client = client
        self.holder = holder
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token: int | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def try_acquire(self) -> int | None:
        """Take the lock if it is free; return the new fencing token, or None."""
        token = self._acquire(keys=[keys.SCHEDULER_LEADER, keys.SCHEDULER_FENCE], args=[self.holder, self.ttl_ms])
        self.token = None if token is None else int(token)
        return self.token

    def renew(self) -> bool:
        """Extend the lock; False means it was lost and this process must stop acting as leader."""
        held = bool(self._renew(keys=[keys.SCHEDULER_LEADER], args=[self.holder, self.ttl_ms]))
        if not held:
            self.token = None
        return held

    def release(self) -> None:
        self._release(keys=[keys.SCHEDULER_LEADER], args=[self.holder])
        self.token = None

    def keep_renewed(self, stopping: threading.Event) -> threading.Thread:
        """Renew the lock every third of its TTL while it is held, until `stopping` is set; a failed renewal (the lock
        was lost) clears the token, which the scheduler's next tick sees."""

        def renew_until_stopped() -> None:
            while not stopping.wait(self.ttl_ms / 3000):
                if self.token is None:
                    continue
                try:
                    self.renew()
                except redis.ConnectionError:
                    self.token = None  # cannot prove we still hold it: stop acting as leader

        thread = threading.Thread(target=renew_until_stopped, name="leader-lock", daemon=True)
        thread.start()
        return thread
