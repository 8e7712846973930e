"""The job store: jobs, tenants and per-job event streams in Redis (keys in `lorafleet.scheduler.keys`).

Every change that touches more than one key runs as one Lua script, so a crash or a concurrent writer never leaves
a half-made job, a wrong per-state count or a job in the queue index that is not queued.

Job states and the only legal moves (`TRANSITIONS`):

    queued -> scheduled -> running -> succeeded | failed | cancelled
    queued -> cancelled | failed (it can never run);  scheduled -> failed | cancelled
    scheduled | running -> queued   (preempted or orphaned; keeps its checkpoint_uri)

Cancellation: a queued job becomes `cancelled` at once. A scheduled or running job also becomes `cancelled` at once
(so it stops counting against quotas) and gets `cancel_requested = 1`. The signal to the executor is the state: it
drops every job whose state is no longer scheduled/running or whose attempt moved on (its `record_progress`,
`record_checkpoint` and `set_result` are refused from then on); `is_cancel_requested` says why a held job went away.

Leases: each move to `scheduled` increments the job's `attempt`. An executor passes the attempt it was given to
`transition` / `record_progress` / `set_result`; a stale attempt is refused, so an executor that lost its job (requeued
while it was stalled) cannot overwrite the new holder's state. The leader scheduler passes its fencing token
(`fence=`); a write with a stale token raises `StaleFence`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from typing import Any, Iterable, Optional

import redis

from lorafleet.scheduler import acl, keys
from lorafleet.scheduler.policy import USAGE_HALF_LIFE_SECONDS, decayed_usage
from lorafleet.scheduler.datasets import AcceptedDataset
from lorafleet.scheduler.spec import JobSpec

TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("scheduled", "cancelled", "failed"),
    "scheduled": ("running", "queued", "failed", "cancelled"),
    "running": ("succeeded", "failed", "cancelled", "queued"),
    "succeeded": (),
    "failed": (),
    "cancelled": (),
}

# What a transition may set besides the state; identity, spec, lease counter and timestamps are the store's own.
SETTABLE_FIELDS = {"error", "adapter_uri", "checkpoint_uri", "executor_id", "cancel_requested", "step", "total_steps"}

JOB_ID_RE = re.compile(r"^job-[0-9a-f]{16}$")
TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
RESERVED_TENANT_NAMES = ("shared",)  # the data root's area readable by every tenant
MAX_LIST_LIMIT = 1000
MAX_EXECUTOR_LOSSES = 3  # executors that died holding a job, before the job is failed
MAX_TOKEN_CHARS = 128  # ours are 47; a longer one is refused before it is hashed
_STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")


class IllegalTransition(ValueError):
    """A state change the job state machine does not allow."""


class StaleFence(RuntimeError):
    """A write from a scheduler that is no longer the leader."""


class QuotaExceeded(ValueError):
    """The tenant already has max_queued jobs waiting."""


# KEYS: tenant, tenant counts, job, tenant jobs, queue, queued set, global counts, events, submit sequence.
# ARGV: job id, tenant, name, priority, spec JSON, now, events maxlen, accepted datasets JSON.
_SUBMIT = """
local quota = redis.call('HMGET', KEYS[1], 'max_queued', 'disabled')
if not quota[1] then return redis.error_reply('NO_TENANT') end
if quota[2] == '1' then return redis.error_reply('DISABLED') end
local queued = tonumber(redis.call('HGET', KEYS[2], 'queued') or '0')
if queued >= tonumber(quota[1]) then return redis.error_reply('QUOTA ' .. queued .. ' ' .. quota[1]) end
if redis.call('EXISTS', KEYS[3]) == 1 then return redis.error_reply('JOB_EXISTS') end
local id, now = ARGV[1], ARGV[6]
local score = string.format('%d%014d', 9 - tonumber(ARGV[4]), redis.call('INCR', KEYS[9]))
redis.call('HSET', KEYS[3], 'job_id', id, 'tenant', ARGV[2], 'name', ARGV[3], 'state', 'queued',
  'priority', ARGV[4], 'spec', ARGV[5], 'submitted_at', now, 'updated_at', now, 'queue_score', score,
  'step', '0', 'total_steps', '0', 'metrics', '{}', 'attempt', '0', 'cancel_requested', '0', 'datasets', ARGV[8])
redis.call('ZADD', KEYS[4], now, id)
redis.call('ZADD', KEYS[5], score, id)
redis.call('SADD', KEYS[6], id)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
redis.call('HINCRBY', KEYS[7], 'queued', 1)
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[7], '*', 'type', 'state', 'ts', now,
  'data', cjson.encode({['from'] = cjson.null, to = 'queued'}))
return 1
"""

# KEYS: job, global counts, queue, events, fence. ARGV: from_states (comma separated), to, now, fence or '',
# attempt or '', key prefix, events maxlen, fields as JSON object.
_TRANSITION = """
local job = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'tenant', 'job_id', 'queue_score')
local cur = job[1]
if not cur then return redis.error_reply('NO_JOB') end
if ARGV[4] ~= '' and redis.call('GET', KEYS[5]) ~= ARGV[4] then return redis.error_reply('STALE_FENCE') end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == cur then allowed = true end end
if not allowed or (ARGV[5] ~= '' and job[2] ~= ARGV[5]) then return {0, cur} end
local to, now, prefix, id = ARGV[2], ARGV[3], ARGV[6], job[4]
local fields = cjson.decode(ARGV[8])
redis.call('HSET', KEYS[1], 'state', to, 'updated_at', now)
for k, v in pairs(fields) do redis.call('HSET', KEYS[1], k, v) end
if to == 'scheduled' then
  redis.call('HINCRBY', KEYS[1], 'attempt', 1)
  redis.call('HSET', KEYS[1], 'scheduled_at', now)
elseif to == 'running' then
  redis.call('HSET', KEYS[1], 'started_at', now)
elseif to == 'queued' then
  redis.call('HSET', KEYS[1], 'executor_id', '')
elseif to == 'succeeded' or to == 'failed' or to == 'cancelled' then
  redis.call('HSET', KEYS[1], 'finished_at', now)
end
if to == 'queued' then redis.call('ZADD', KEYS[3], job[5], id) else redis.call('ZREM', KEYS[3], id) end
redis.call('SMOVE', prefix .. 'state:' .. cur, prefix .. 'state:' .. to, id)
local tcounts = prefix .. 'tenant:' .. job[3] .. ':counts'
redis.call('HINCRBY', tcounts, cur, -1)
redis.call('HINCRBY', tcounts, to, 1)
redis.call('HINCRBY', KEYS[2], cur, -1)
redis.call('HINCRBY', KEYS[2], to, 1)
fields['from'] = cur
fields['to'] = to
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'type', 'state', 'ts', now, 'data', cjson.encode(fields))
return {1, cur}
"""

# KEYS: job, events. ARGV: step, total_steps, metrics JSON, now, attempt or '', events maxlen, event data JSON.
_PROGRESS = """
local job = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if job[1] ~= 'running' or (ARGV[5] ~= '' and job[2] ~= ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[1], 'total_steps', ARGV[2], 'metrics', ARGV[3], 'updated_at', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'type', 'progress', 'ts', ARGV[4], 'data', ARGV[7])
return 1
"""

# KEYS: job. ARGV: checkpoint uri, attempt, now.
_CHECKPOINT = """
local job = redis.call('HMGET', KEYS[1], 'state', 'attempt')
if job[1] ~= 'running' or job[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'checkpoint_uri', ARGV[1], 'updated_at', ARGV[3])
return 1
"""

# KEYS: usage hash (tenant -> "<gpu seconds> <as of unix time>"). ARGV: now, decay rate, then tenant, seconds pairs.
_ADD_USAGE = """
local now, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local value, at = 0, now
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if old then
    local space = string.find(old, ' ')
    value, at = tonumber(string.sub(old, 1, space - 1)), tonumber(string.sub(old, space + 1))
  end
  value = value * math.exp(-rate * math.max(0, now - at)) + tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.17g %.17g', value, now))
end
return 1
"""

# KEYS: tenant, tenants set, tokens. ARGV: name, token hash, weight, max_queued, max_running, now.
_CREATE_TENANT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'token_sha256', ARGV[2], 'weight', ARGV[3], 'max_queued', ARGV[4],
  'max_running', ARGV[5], 'disabled', '0', 'created_at', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
return 1
"""

# KEYS: tenant, tokens. ARGV: name, new token hash.
_ROTATE_TOKEN = """
local old = redis.call('HGET', KEYS[1], 'token_sha256')
if not old then return 0 end
redis.call('HDEL', KEYS[2], old)
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[1], 'token_sha256', ARGV[2])
return 1
"""

_UPDATE_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return "lft_" + secrets.token_urlsafe(32)


def _float(value: Optional[str]) -> Optional[float]:
    return float(value) if value not in (None, "") else None


def job_view(raw: dict[str, str], with_spec: bool = True) -> dict[str, Any]:
    """The public, JSON-ready form of a job hash (what `lorafleet.get_job` returns)."""
    view = {
        "job_id": raw["job_id"],
        "tenant": raw["tenant"],
        "name": raw.get("name", ""),
        "state": raw["state"],
        "priority": int(raw.get("priority", 0)),
        "submitted_at": _float(raw.get("submitted_at")),
        "updated_at": _float(raw.get("updated_at")),
        "scheduled_at": _float(raw.get("scheduled_at")),
        "started_at": _float(raw.get("started_at")),
        "finished_at": _float(raw.get("finished_at")),
        "progress": {"step": int(raw.get("step", 0)), "total_steps": int(raw.get("total_steps", 0))},
        "metrics": json.loads(raw.get("metrics") or "{}"),
        "error": raw.get("error") or None,
        "adapter_uri": raw.get("adapter_uri") or None,
        "checkpoint_uri": raw.get("checkpoint_uri") or None,
        "executor_id": raw.get("executor_id") or None,
        "attempt": int(raw.get("attempt", 0)),
        "cancel_requested": raw.get("cancel_requested") == "1",
        "executor_losses": int(raw.get("executor_losses") or 0),
    }
    if with_spec:
        view["spec"] = json.loads(raw["spec"])
    return view


def _check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit: must be an integer from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
    return limit


class JobStore:
    def __init__(self, client: redis.Redis):
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("JobStore needs a Redis client with decode_responses=True")
        self.r = client
        self._submit = client.register_script(_SUBMIT)
        self._transition = client.register_script(_TRANSITION)
        self._progress = client.register_script(_PROGRESS)
        self._checkpoint = client.register_script(_CHECKPOINT)
        self._add_usage = client.register_script(_ADD_USAGE)
        self._create_tenant = client.register_script(_CREATE_TENANT)
        self._rotate_token = client.register_script(_ROTATE_TOKEN)
        self._update_if_exists = client.register_script(_UPDATE_IF_EXISTS)

    @classmethod
    def from_url(cls, url: str) -> "JobStore":
        return cls(redis.Redis.from_url(url, decode_responses=True))

    def ensure_schema(self) -> None:
        """Stamp an empty database with our schema version; refuse one written by a different version."""
        self.r.setnx(keys.SCHEMA_VERSION_KEY, keys.SCHEMA_VERSION)
        found = int(self.r.get(keys.SCHEMA_VERSION_KEY))
        if found != keys.SCHEMA_VERSION:
            raise RuntimeError(f"Redis holds lorafleet schema version {found}, this code needs {keys.SCHEMA_VERSION}")

    # ---- tenants ----

    def create_tenant(
        self, name: str, weight: float = 1.0, max_queued: int = 100, max_running: int = 4
    ) -> tuple[dict[str, Any], str]:
        """Create a tenant; returns (tenant, token). The token is not stored anywhere, only its sha256."""
        if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name) or name in RESERVED_TENANT_NAMES:
            raise ValueError(
                f"tenant name {name!r}: use 1-32 lowercase letters, digits, '_' or '-' (and not 'shared')"
            )
        _check_quota(weight, max_queued, max_running)
        token = new_token()
        created = self._create_tenant(
            keys=[keys.tenant(name), keys.TENANTS, keys.TOKENS],
            args=[name, hash_token(token), weight, max_queued, max_running, time.time()],
        )
        if not created:
            raise ValueError(f"tenant {name!r} already exists")
        return self.get_tenant(name), token

    def get_tenant(self, name: str) -> dict[str, Any]:
        raw = self.r.hgetall(keys.tenant(name))
        if not raw:
            raise LookupError(f"no tenant {name!r}")
        return {
            "name": raw["name"],
            "weight": float(raw["weight"]),
            "max_queued": int(raw["max_queued"]),
            "max_running": int(raw["max_running"]),
            "disabled": raw["disabled"] == "1",
            "created_at": float(raw["created_at"]),
            "counts": self.counts(name),
        }

    def list_tenants(self) -> list[dict[str, Any]]:
        return [self.get_tenant(name) for name in sorted(self.r.smembers(keys.TENANTS))]

    def set_quota(
        self,
        name: str,
        weight: Optional[float] = None,
        max_queued: Optional[int] = None,
        max_running: Optional[int] = None,
    ) -> dict[str, Any]:
        current = self.get_tenant(name)
        weight = current["weight"] if weight is None else weight
        max_queued = current["max_queued"] if max_queued is None else max_queued
        max_running = current["max_running"] if max_running is None else max_running
        _check_quota(weight, max_queued, max_running)
        args = ["weight", weight, "max_queued", max_queued, "max_running", max_running]
        if not self._update_if_exists(keys=[keys.tenant(name)], args=args):
            raise LookupError(f"no tenant {name!r}")
        return self.get_tenant(name)

    def rotate_token(self, name: str) -> str:
        token = new_token()
        if not self._rotate_token(keys=[keys.tenant(name), keys.TOKENS], args=[name, hash_token(token)]):
            raise LookupError(f"no tenant {name!r}")
        return token

    def set_disabled(self, name: str, disabled: bool = True) -> dict[str, Any]:
        """A disabled tenant's token and broker user are refused at once (its open connections closed); its queued
        jobs stay queued but never start, its running ones run on (cancel them separately)."""
        if not self._update_if_exists(keys=[keys.tenant(name)], args=["disabled", int(disabled)]):
            raise LookupError(f"no tenant {name!r}")
        if disabled:
            acl.revoke_tenant(self.r, name)
        else:
            acl.enable_tenant(self.r, name)
        return self.get_tenant(name)

    def enabled_tenants(self) -> list[str]:
        names = sorted(self.r.smembers(keys.TENANTS))
        with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(keys.tenant(name), "disabled")
            flags = pipe.execute()
        return [name for name, disabled in zip(names, flags) if disabled != "1"]

    def issue_credentials(self, name: str, token: str) -> acl.TenantCredentials:
        """A new broker user password for the tenant (its old connections are closed), with `token`: what the
        tenant needs to submit. Needs the operator's connection (ACL SETUSER)."""
        tenant = self.get_tenant(name)
        password = secrets.token_urlsafe(24)
        acl.set_tenant_user(self.r, name, password, enabled=not tenant["disabled"])  # a disabled one stays off
        acl.close_connections(self.r, name)
        return acl.TenantCredentials(name, token, acl.url_for(self.server_url(), acl.tenant_username(name), password))

    def server_url(self) -> str:
        """This store's server, without credentials (what other users' URLs are built on)."""
        kwargs = self.r.connection_pool.connection_kwargs
        return f"redis://{kwargs.get('host', '127.0.0.1')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"

    def authenticate(self, token: Any) -> str:
        """The tenant name for a token; PermissionError for a missing, unknown or disabled one."""
        if not isinstance(token, str) or not token:
            raise PermissionError("missing token: pass your tenant token as the first argument")
        if len(token) > MAX_TOKEN_CHARS:
            raise PermissionError("invalid token")
        name = self.r.hget(keys.TOKENS, hash_token(token))
        if name is None:
            raise PermissionError("invalid token")
        if self.r.hget(keys.tenant(name), "disabled") == "1":
            raise PermissionError(f"tenant {name!r} is disabled")
        return name

    def counts(self, tenant: Optional[str] = None) -> dict[str, int]:
        raw = self.r.hgetall(keys.tenant_counts(tenant) if tenant else keys.COUNTS)
        return {state: int(raw.get(state, 0)) for state in keys.JOB_STATES}

    # ---- jobs ----

    def submit(self, tenant: str, spec: JobSpec, now: Optional[float] = None,
               datasets: Optional[dict[str, AcceptedDataset]] = None) -> dict[str, Any]:
        """Insert a validated job as `queued`, enforcing the tenant's max_queued in the same atomic step.

        `datasets`: the accepted copies of the spec's datasets (the API always passes them); a job without them
        (submitted here directly, by operator tools and tests) is read from the data root by path."""
        now = time.time() if now is None else now
        job_id = "job-" + secrets.token_hex(8)
        try:
            self._submit(
                keys=[
                    keys.tenant(tenant), keys.tenant_counts(tenant), keys.job(job_id), keys.tenant_jobs(tenant),
                    keys.QUEUE, keys.state_set("queued"), keys.COUNTS, keys.job_events(job_id), keys.SUBMIT_SEQ,
                ],
                args=[job_id, tenant, spec.name, spec.priority, spec.model_dump_json(), repr(now), keys.EVENTS_MAXLEN,
                      json.dumps({field: d.to_json() for field, d in (datasets or {}).items()})],
            )
        except redis.ResponseError as exc:
            reason = str(exc)
            if reason.startswith("QUOTA"):
                _, queued, limit = reason.split()
                raise QuotaExceeded(
                    f"quota exceeded: tenant {tenant!r} has {queued} queued jobs, max_queued is {limit}"
                ) from None
            if reason == "DISABLED":
                raise PermissionError(f"tenant {tenant!r} is disabled") from None
            if reason == "NO_TENANT":
                raise PermissionError(f"no tenant {tenant!r}") from None
            raise
        return self.get_job(job_id)

    def get_job(self, job_id: str, with_spec: bool = True) -> Optional[dict[str, Any]]:
        # Checked before any key is built from it: "<id>:events" would otherwise name another key.
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            return None
        raw = self.r.hgetall(keys.job(job_id))
        return job_view(raw, with_spec) if raw else None

    def accepted_datasets(self, job_id: str) -> dict[str, AcceptedDataset]:
        raw = self.r.hget(keys.job(job_id), "datasets")
        return {field: AcceptedDataset.from_json(d) for field, d in json.loads(raw or "{}").items()}

    def get_job_for(self, tenant: Optional[str], job_id: Any) -> dict[str, Any]:
        """The job if `tenant` owns it (tenant None = operator, any job). Unknown and foreign look the same."""
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):  # never echo what is not an id
            raise LookupError("no such job: a job id is 'job-' and 16 hex digits")
        job = self.get_job(job_id)
        if job is None or (tenant is not None and job["tenant"] != tenant):
            raise LookupError(f"no job {job_id!r}")
        return job

    def list_jobs(self, tenant: Optional[str], state: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first; tenant None = all tenants."""
        _check_limit(limit)
        if state is not None and state not in keys.JOB_STATES:
            raise ValueError(f"state: must be one of {', '.join(keys.JOB_STATES)}, got {state!r}")
        tenants = [tenant] if tenant is not None else sorted(self.r.smembers(keys.TENANTS))
        found: list[tuple[str, float]] = []
        for name in tenants:
            found += self._newest(name, state, limit)
        found.sort(key=lambda item: item[1], reverse=True)
        return self._views([job_id for job_id, _ in found[:limit]], with_spec=False)

    def _newest(self, tenant: str, state: Optional[str], limit: int, chunk: int = 500) -> list[tuple[str, float]]:
        """Up to `limit` (job id, submit time) of the tenant's newest jobs in `state` (any state if None)."""
        if state is None:
            return self.r.zrevrange(keys.tenant_jobs(tenant), 0, limit - 1, withscores=True)
        found: list[tuple[str, float]] = []
        start = 0
        while len(found) < limit:
            page = self.r.zrevrange(keys.tenant_jobs(tenant), start, start + chunk - 1, withscores=True)
            if not page:
                break
            pipe = self.r.pipeline(transaction=False)
            for job_id, _ in page:
                pipe.hget(keys.job(job_id), "state")
            found += [item for item, job_state in zip(page, pipe.execute()) if job_state == state]
            start += chunk
        return found[:limit]

    def list_queued(self, limit: Optional[int] = None) -> list[dict[str, Any]]:
        """Queued jobs in scheduling order: priority 9 first, then oldest first. Includes each job's spec."""
        ids = self.r.zrange(keys.QUEUE, 0, -1 if limit is None else limit - 1)
        return self._views(ids, with_spec=True)

    def jobs_in_state(self, state: str) -> list[dict[str, Any]]:
        return self._views(sorted(self.r.smembers(keys.state_set(state))), with_spec=True)

    def _views(self, job_ids: Iterable[str], with_spec: bool) -> list[dict[str, Any]]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return [job_view(raw, with_spec) for raw in pipe.execute() if raw]

    def transition(
        self,
        job_id: str,
        from_states: Iterable[str] | str,
        to_state: str,
        *,
        fence: Optional[int] = None,
        attempt: Optional[int] = None,
        **fields: Any,
    ) -> bool:
        """Atomically move a job from one of `from_states` to `to_state`, setting `fields` on it.

        Returns False (and changes nothing) when the job is in none of `from_states` or `attempt` is stale — the
        normal outcome of a race. Raises IllegalTransition for a move the state machine forbids, LookupError for an
        unknown job, StaleFence when `fence` is not the current leader's token.
        """
        from_states = (from_states,) if isinstance(from_states, str) else tuple(from_states)
        for state in from_states:
            if state not in TRANSITIONS:
                raise IllegalTransition(f"unknown state {state!r}")
            if to_state not in TRANSITIONS[state]:
                raise IllegalTransition(f"illegal transition {state} -> {to_state}")
        not_settable = set(fields) - SETTABLE_FIELDS
        if not_settable:
            raise ValueError(f"transition cannot set {sorted(not_settable)}")
        try:
            done, _ = self._transition(
                keys=[keys.job(job_id), keys.COUNTS, keys.QUEUE, keys.job_events(job_id), keys.SCHEDULER_FENCE],
                args=[
                    ",".join(from_states), to_state, repr(time.time()), "" if fence is None else fence,
                    "" if attempt is None else attempt, keys.PREFIX, keys.EVENTS_MAXLEN,
                    json.dumps({k: str(v) for k, v in fields.items()}),
                ],
            )
        except redis.ResponseError as exc:
            if str(exc) == "NO_JOB":
                raise LookupError(f"no job {job_id!r}") from None
            if str(exc) == "STALE_FENCE":
                raise StaleFence(f"fencing token {fence} is stale: this scheduler is no longer the leader") from None
            raise
        return bool(done)

    def claim(self, job_id: str, executor_id: str, fence: Optional[int] = None) -> Optional[int]:
        """queued -> scheduled for `executor_id`; returns the new attempt (the executor's lease token) or None."""
        if not self.transition(job_id, "queued", "scheduled", fence=fence, executor_id=executor_id):
            return None
        return int(self.r.hget(keys.job(job_id), "attempt"))

    def cancel(self, tenant: Optional[str], job_id: Any) -> dict[str, Any]:
        """Cancel a job the tenant owns (tenant None = operator). Cancelling a cancelled job is a no-op."""
        while True:
            job = self.get_job_for(tenant, job_id)
            state = job["state"]
            if state == "cancelled":
                return job
            if state in keys.TERMINAL_STATES:
                raise ValueError(f"job {job_id} already {state}; nothing to cancel")
            fields = {} if state == "queued" else {"cancel_requested": 1}
            if self.transition(job_id, state, "cancelled", **fields):
                return self.get_job(job_id)

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(keys.job(job_id), "cancel_requested") == "1"

    def record_progress(
        self,
        job_id: str,
        step: int,
        total_steps: int,
        metrics: Optional[dict[str, float]] = None,
        attempt: Optional[int] = None,
    ) -> bool:
        """Store the latest step and metrics (loss, tokens_per_s, ...) and add a progress event.

        Returns False when the job is no longer running (cancelled, requeued) or `attempt` is stale: drop the job.
        """
        metrics = dict(metrics or {})
        data = json.dumps({"step": step, "total_steps": total_steps, **metrics})
        done = self._progress(
            keys=[keys.job(job_id), keys.job_events(job_id)],
            args=[
                int(step), int(total_steps), json.dumps(metrics), repr(time.time()),
                "" if attempt is None else attempt, keys.EVENTS_MAXLEN, data,
            ],
        )
        return bool(done)

    def record_checkpoint(self, job_id: str, checkpoint_uri: str, attempt: int) -> bool:
        """Point the job at its newest checkpoint; refused (False) unless the caller still holds the running lease."""
        return bool(self._checkpoint(keys=[keys.job(job_id)], args=[checkpoint_uri, attempt, repr(time.time())]))

    def add_gpu_seconds(self, usage: dict[str, float], now: Optional[float] = None) -> None:
        """Charge tenants for their share of cohort steps; older charges decay (fair share forgets slowly)."""
        if usage:
            now = time.time() if now is None else now
            args = [repr(now), repr(math.log(2) / USAGE_HALF_LIFE_SECONDS)]
            for tenant, seconds in usage.items():
                args += [tenant, repr(float(seconds))]
            self._add_usage(keys=[keys.TENANT_GPU_SECONDS], args=args)

    def gpu_seconds(self, now: Optional[float] = None) -> dict[str, float]:
        """Tenant -> decayed GPU seconds used, as of `now`."""
        now = time.time() if now is None else now
        usage = {}
        for tenant, raw in self.r.hgetall(keys.TENANT_GPU_SECONDS).items():
            value, at = raw.split()
            usage[tenant] = decayed_usage(float(value), float(at), now)
        return usage

    def requeue(
        self,
        job_id: str,
        from_states: Iterable[str] | str,
        reason: str,
        *,
        attempt: Optional[int] = None,
        fence: Optional[int] = None,
        executor_id: Optional[str] = None,
        executor_died: bool = False,
    ) -> bool:
        """Hand a job back to the queue (it resumes from its checkpoint_uri) and say why in its events.

        `executor_died`: the process that held it is gone (killed, crashed, restarted). Such jobs are counted
        (`executor_losses`); one lost `MAX_EXECUTOR_LOSSES` times is failed instead, so that a job whose data or
        shape kills executors cannot take them down for ever (the scheduler runs a job lost before in a cohort of
        its own, so innocent cohort members are not counted again)."""
        if not self.transition(job_id, from_states, "queued", attempt=attempt, fence=fence):
            return False
        losses = self.r.hincrby(keys.job(job_id), "executor_losses", 1) if executor_died else 0
        job = self.get_job(job_id, with_spec=False)
        self.append_event(job_id, "requeued", reason=reason, executor_id=executor_id,
                          checkpoint_uri=job["checkpoint_uri"] if job else None)
        if losses >= MAX_EXECUTOR_LOSSES:
            self.transition(job_id, "queued", "failed", fence=fence, error=(
                f"job {job_id} failed: the executor training it stopped {losses} times ({reason}); the last times it "
                "ran in a cohort of its own, so it is this job's data or shape that takes executors down"))
        return True

    def set_result(self, job_id: str, adapter_uri: str, attempt: Optional[int] = None) -> bool:
        """running -> succeeded with the exported adapter's location."""
        return self.transition(job_id, "running", "succeeded", attempt=attempt, adapter_uri=adapter_uri)

    # ---- events ----

    def append_event(self, job_id: str, type: str, **data: Any) -> str:
        return self.r.xadd(
            keys.job_events(job_id),
            {"type": type, "ts": repr(time.time()), "data": json.dumps(data)},
            maxlen=keys.EVENTS_MAXLEN,
            approximate=True,
        )

    def events_for(self, tenant: Optional[str], job_id: Any, after: Optional[str] = None, limit: int = 100
                   ) -> list[dict[str, Any]]:
        """`events` of a job `tenant` owns (tenant None = operator); LookupError otherwise, as `get_job_for`."""
        self.get_job_for(tenant, job_id)
        return self.events(job_id, after, limit)

    def events(self, job_id: str, after: Optional[str] = None, limit: int = 100) -> list[dict[str, Any]]:
        """Events oldest first; `after` = the id of the last event seen (exclusive)."""
        _check_limit(limit)
        if after is not None and not (isinstance(after, str) and _STREAM_ID_RE.fullmatch(after)):
            raise ValueError(f"after: not an event id like '1700000000000-0': {after!r}")
        entries = self.r.xrange(keys.job_events(job_id), "-" if after is None else "(" + after, "+", count=limit)
        return [
            {"id": event_id, "type": fields["type"], "ts": float(fields["ts"]), **json.loads(fields["data"])}
            for event_id, fields in entries
        ]


def _check_quota(weight: Any, max_queued: Any, max_running: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
        raise ValueError(f"weight: must be a number in (0, 1000], got {weight!r}")
    for field, value in (("max_queued", max_queued), ("max_running", max_running)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
            raise ValueError(f"{field}: must be an integer from 0 to 100000, got {value!r}")
