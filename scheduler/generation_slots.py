"""Each tenant's generation requests in progress, counted across the whole service: a gateway takes a slot in Redis
(`keys.generation_slots`) before it submits a request and gives it back when the request ends, so a tenant has at
most `limit` (`config.max_generations_per_tenant()`) in progress however many gateways a load balancer spreads its
requests over.

    slots = GenerationSlots(async_redis, limit=32)
    async with await slots.hold(tenant) as slot:  # AllSlotsTaken when the tenant has `limit` in progress already
        ...                                       # its lease renewed while the block runs; given back at its end

A slot is a member of the tenant's sorted set (a random id) scored by when its lease ends, in the server's clock
(milliseconds; gateways' clocks are never compared). Taking one is a single script: drop the members whose lease
ended, count the rest, add one if under the limit; so concurrent takers, on any gateway, never pass the limit.

The lease is short (`LEASE_SECONDS`) and renewed by the slot's holder every third of it while it holds it, rather
than long enough for the request's longest wait: a streamed answer has no fixed end (each event restarts its wait,
`generation._StreamCursor`), and a lease as long as `generation.MAX_TIMEOUT_SECONDS` would lock a tenant out for ten
minutes after a gateway crash. A gateway that dies stops renewing, and its slots are free again within one lease.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Awaitable, Callable, Optional

import redis
import redis.asyncio

from lorafleet.scheduler import keys

LEASE_SECONDS = 30.0
log = logging.getLogger("lorafleet.generation")

# The server's clock in ms, and the key's expiry set to its latest lease: an idle tenant's set disappears by itself.
_NOW_MS = """
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""
_EXPIRE_WITH_LAST_LEASE = """
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], last[2]) end
"""
# KEYS[1] the tenant's slots; ARGV slot id, limit, lease (ms). 1: taken; 0: the tenant has `limit` already.
_TAKE = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[3]), ARGV[1])
""" + _EXPIRE_WITH_LAST_LEASE + "return 1"
# KEYS[1] the tenant's slots; ARGV slot id, lease (ms). 1: renewed; 0: its lease had ended (another may have its place).
_RENEW = _NOW_MS + """
local ends = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not ends or tonumber(ends) <= now_ms then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[2]), ARGV[1])
""" + _EXPIRE_WITH_LAST_LEASE + "return 1"
# KEYS[1] the tenant's slots. The slots whose lease has not ended.
_COUNT = _NOW_MS + "return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf')"


class AllSlotsTaken(Exception):
    """The tenant has `limit` generation requests in progress already (a 429 at the gateway)."""

    def __init__(self, limit: int):
        super().__init__(f"too many generation requests in progress: at most {limit} per tenant at once in the "
                         "service; retry once one of them ended")


class GenerationSlots:
    """The tenants' slots, on an asyncio Redis client (a gateway gives them one of their own: `_take_slot` in
    gateway/completions.py says why)."""

    def __init__(self, r: redis.asyncio.Redis, limit: int, lease_seconds: float = LEASE_SECONDS):
        self.r, self.limit, self.lease_seconds = r, limit, lease_seconds
        self._take, self._renew, self._count = (r.register_script(script) for script in (_TAKE, _RENEW, _COUNT))

    async def hold(self, tenant: str) -> "Slot":
        """A slot of the tenant's, renewed until it is given back; AllSlotsTaken when it has `limit` already."""
        slot_id = await self.take(tenant)
        if slot_id is None:
            raise AllSlotsTaken(self.limit)
        return Slot(self, tenant, slot_id)

    async def take(self, tenant: str) -> Optional[str]:
        """A slot's id, held for one lease (not renewed: `hold` renews); None when the tenant has `limit` already."""
        slot_id = secrets.token_hex(8)
        taken = await self._take(keys=[keys.generation_slots(tenant)], args=[slot_id, self.limit, self._lease_ms])
        return slot_id if taken else None

    async def renew(self, tenant: str, slot_id: str) -> bool:
        """Extend the slot's lease by one from now; False if it had ended already (the slot is not the tenant's any
        more)."""
        return bool(await self._renew(keys=[keys.generation_slots(tenant)], args=[slot_id, self._lease_ms]))

    async def give_back(self, tenant: str, slot_id: str) -> None:
        await self.r.zrem(keys.generation_slots(tenant), slot_id)

    async def in_progress(self, tenant: str) -> int:
        """The tenant's slots whose lease has not ended, on every gateway."""
        return int(await self._count(keys=[keys.generation_slots(tenant)]))

    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))


class Slot:
    """One request's slot, its lease renewed in a task of the event loop until given back. `async with`: given back
    when the block ends, unless handed over to what goes on after it (a streamed answer that outlives its route)."""

    def __init__(self, slots: GenerationSlots, tenant: str, slot_id: str):
        self.slots, self.tenant, self.slot_id = slots, tenant, slot_id
        self.handed_over = self.given_back = False
        self._renewing = asyncio.create_task(self._renew_until_given_back())

    async def __aenter__(self) -> "Slot":
        return self

    async def __aexit__(self, *exc_info) -> None:
        if not self.handed_over:
            await self.give_back()

    def hand_over(self) -> Callable[[], Awaitable[None]]:
        """The block ends without giving the slot back; its new holder calls what this returns once it is done."""
        self.handed_over = True
        return self.give_back

    async def give_back(self) -> None:
        """Free the slot (once, however often called). Shielded: a holder cancelled as it gives back (its server
        stopping) still frees it, rather than leaving it to its lease."""
        if self.given_back:
            return
        self.given_back = True
        self._renewing.cancel()
        try:
            await asyncio.shield(self.slots.give_back(self.tenant, self.slot_id))
        except redis.RedisError as exc:  # the request's answer stands; the slot is free once its lease ends
            log.warning("giving back a generation slot of tenant %r failed: %s", self.tenant, exc)

    async def _renew_until_given_back(self) -> None:
        while True:
            await asyncio.sleep(self.slots.lease_seconds / 3)
            try:
                if not await self.slots.renew(self.tenant, self.slot_id):
                    log.warning("the generation slot of tenant %r lapsed (its store out of reach for a lease): "
                                "its request goes on uncounted", self.tenant)
                    return
            except redis.RedisError as exc:  # the next renewal may reach it; a lease is three tries long
                log.warning("renewing a generation slot of tenant %r failed: %s", self.tenant, exc)
