"""One active scheduler at a time: a Redis lock with a TTL and a fencing token.

The holder renews the lock well inside its TTL. A standby polls `try_acquire`; when the leader dies its lock expires
and the standby takes over within about one TTL. Each acquisition increments a fencing counter; the scheduler passes
its token to every write it makes (`JobStore` checks it in Lua), so a paused ex-leader that wakes up after losing
the lock cannot change anything.
"""

from __future__ import annotations

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
