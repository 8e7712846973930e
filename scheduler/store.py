"""The job store: jobs, tenants and per-job event streams in Redis (keys in `lorafleet.scheduler.keys`).

Jobs are read as `records.JobRecord` and changed only through the verbs below (`submit`, `claim`, `start`,
`record_progress`, `record_checkpoint`, `succeed`, `fail`, `requeue`, `cancel`, `purge`), each one Lua script
(`scripts`), so that a crash or a concurrent writer never leaves a half-made job, a wrong per-state count or an index
(queue, per-state sets, each executor's holding, finished) that disagrees with a job's state.

Job states and the only legal moves (`records.TRANSITIONS`):

    queued -> scheduled -> running -> succeeded | failed | cancelled
    queued -> cancelled | failed (it can never run);  scheduled -> failed | cancelled
    scheduled | running -> queued   (preempted or orphaned; keeps its checkpoint_uri)

Cancellation: a queued job becomes `cancelled` at once. A scheduled or running job also becomes `cancelled` at once
(so it stops counting against quotas) and gets `cancel_requested = 1`; it leaves its executor's holding index, which
is how the executor learns to drop it, and every write of the old lease is refused from then on.

Leases: each move to `scheduled` increments the job's `attempt`. An executor passes the attempt it was given and
its own id to every write about the job; a write whose lease is not the job's current one is refused, so an
executor that lost its job (requeued while it was stalled) cannot change its state, metrics or artifact pointers.
The leader scheduler passes its fencing token (`fence=`); a write with a stale token raises `StaleFence`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

import redis

from lorafleet.scheduler import acl, keys, scripts
from lorafleet.scheduler.datasets import AcceptedDataset
from lorafleet.scheduler.memory import JobPlan
from lorafleet.scheduler.policy import USAGE_HALF_LIFE_SECONDS, decayed_usage
from lorafleet.scheduler.records import HOLDING_STATES, TRANSITIONS, FailureReason, JobRecord, JobState, JobSummary
from lorafleet.scheduler.spec import JobSpec

# What a transition may set besides the state; identity, spec, lease counter and timestamps are the store's own.
SETTABLE_FIELDS = {"error", "adapter_uri", "checkpoint_uri", "executor_id", "cancel_requested", "step", "total_steps"}

JOB_ID_RE = re.compile(r"^job-[0-9a-f]{16}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
RESERVED_TENANT_NAMES = ("shared",)  # the data root's area readable by every tenant
MAX_LIST_LIMIT = 1000
FILTER_CHUNK = 256  # jobs read at a time when a list is filtered (`tenant_jobs_after(keep=...)`)
MAX_EXECUTOR_LOSSES = 3  # executors that died holding a job, before the job is failed
MAX_TOKEN_CHARS = 128  # ours are 47; a longer one is refused before it is hashed
KEEP_CHECKPOINTS = 2  # checkpoints of a job kept; older ones are deleted when a newer one is recorded
_STREAM_ID_RE = re.compile(r"^\d{1,20}-\d{1,20}$")


class IllegalTransition(ValueError):
    """A state change the job state machine does not allow."""


class StaleFence(RuntimeError):
    """A write from a scheduler that is no longer the leader."""


class QuotaExceeded(ValueError):
    """The tenant already has max_queued jobs waiting."""


def progress_event_due(step: int, total_steps: int, events: int = keys.PROGRESS_EVENTS) -> bool:
    """Whether optimizer step `step` of `total_steps` gets a progress event: every step of a short job, every n-th of
    a long one (n = total_steps / events, rounded up) and always the last, so a job has about `events` of them."""
    every = max(1, math.ceil(total_steps / events)) if total_steps > 0 else 1
    return step % every == 0 or step >= total_steps


# KEYS: usage hash (tenant -> "<gpu seconds> <as of unix time>"), totals hash (tenant -> seconds, never decayed).
# ARGV: now, decay rate, then tenant, seconds pairs.
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
  redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1])
end
return 1
"""

# KEYS: tenant, tenants set, tokens, tenants version. ARGV: name, token hash, weight, max_queued, max_running, now.
_CREATE_TENANT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'token_sha256', ARGV[2], 'weight', ARGV[3], 'max_queued', ARGV[4],
  'max_running', ARGV[5], 'disabled', '0', 'created_at', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
redis.call('INCR', KEYS[4])
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

# KEYS: tenant, tenants version. ARGV: field, value, ... (a tenant's quota or disabled flag)
_UPDATE_TENANT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
redis.call('INCR', KEYS[2])
return 1
"""




def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return "lft_" + secrets.token_urlsafe(32)


def _check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit: must be an integer from 1 to {MAX_LIST_LIMIT}, got {limit!r}")
    return limit


def _states(states: Iterable[str] | str) -> tuple[JobState, ...]:
    return (JobState(states),) if isinstance(states, str) else tuple(JobState(s) for s in states)


@functools.lru_cache(maxsize=4096)
def _parsed_plan(text: str) -> JobPlan:
    """Jobs of one shape on one dataset store the same plan text: each text is parsed once (plans are frozen)."""
    return JobPlan.from_json(text)


def with_metadata(wanted: Any) -> Callable[[JobRecord], bool]:
    """A `tenant_jobs_after` filter: the jobs whose spec's metadata has every pair of `wanted` (OpenAI's list filter
    `metadata[k]=v`); ValueError unless `wanted` maps strings to strings."""
    if not isinstance(wanted, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wanted.items()):
        raise ValueError("metadata: an object of strings to strings, e.g. {\"team\": \"search\"}")
    pairs = dict(wanted).items()
    return lambda record: pairs <= record.spec.metadata.items()


def page_start(client: redis.Redis, index: str, after: Any, what: str) -> int:
    """Where a newest-first page of the sorted set `index` starts: just after its member `after` (None: at the
    newest). LookupError when `after` is not one of the tenant's (`what`: job, file), the same for any other id."""
    if after is None:
        return 0
    rank = client.zrevrank(index, after) if isinstance(after, str) else None
    if rank is None:
        raise LookupError(f"after: no such {what} of yours")
    return rank + 1


def submit_keys(tenant: str, job_id: str) -> list[str]:
    """The keys of `scripts.SUBMIT`, in its order."""
    return [keys.tenant(tenant), keys.tenant_counts(tenant), keys.job(job_id), keys.tenant_jobs(tenant), keys.QUEUE,
            keys.state_set(JobState.QUEUED), keys.COUNTS, keys.job_events(job_id), keys.SUBMIT_SEQ,
            keys.tenant_requests(tenant), keys.QUEUE_CHANGES, keys.QUEUE_VERSION]


def _lease_args(attempt: Optional[int], executor_id: Optional[str]) -> list:
    return ["" if attempt is None else attempt, executor_id or ""]


def _usage_args(usage: dict[str, float], now: float) -> list:
    """The usage script's arguments: now, the decay rate, then tenant, seconds pairs."""
    args = [repr(now), repr(math.log(2) / USAGE_HALF_LIFE_SECONDS)]
    for tenant, seconds in usage.items():
        args += [tenant, repr(float(seconds))]
    return args


@dataclass(frozen=True)
class ProgressUpdate:
    """One job's step for `JobStore.record_step`."""

    job_id: str
    step: int
    total_steps: int
    metrics: dict
    attempt: Optional[int] = None


@dataclass(frozen=True)
class ExecutorView:
    """What an executor reads between two steps, in one round trip (`JobStore.executor_view`)."""

    seq: int  # the assignment sequence when read: every assignment up to it is in `held`, or was taken away since
    held: dict[str, int]  # job id -> attempt of every job scheduled on or running at the executor
    pauses: set[str]  # jobs whose tenant asked for a pause
    drain: bool  # `lorafleet executors drain` asked the executor to hand its jobs back and exit


class JobStore:
    def __init__(self, client: redis.Redis):
        if not client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("JobStore needs a Redis client with decode_responses=True")
        self.r = client
        self._submit = client.register_script(scripts.SUBMIT)
        self._transition = client.register_script(scripts.TRANSITION)
        self._progress = client.register_script(scripts.PROGRESS)
        self._checkpoint = client.register_script(scripts.CHECKPOINT)
        self._purge = client.register_script(scripts.PURGE)
        self._queue_changes = client.register_script(scripts.QUEUE_CHANGES)
        self._request_pause = client.register_script(scripts.REQUEST_PAUSE)
        self._delete_model = client.register_script(scripts.DELETE_MODEL)
        self._add_usage = client.register_script(_ADD_USAGE)
        self._create_tenant = client.register_script(_CREATE_TENANT)
        self._rotate_token = client.register_script(_ROTATE_TOKEN)
        self._update_tenant = client.register_script(_UPDATE_TENANT)

    @classmethod
    def from_url(cls, url: str) -> "JobStore":
        return cls(redis.Redis.from_url(url, decode_responses=True))

    def ensure_schema(self) -> None:
        """Stamp an empty database with our schema version, migrate one written by version 1, refuse any other."""
        self.r.setnx(keys.SCHEMA_VERSION_KEY, keys.SCHEMA_VERSION)
        found = int(self.r.get(keys.SCHEMA_VERSION_KEY))
        if found == 1:
            self._migrate_from_1()
            self.r.set(keys.SCHEMA_VERSION_KEY, keys.SCHEMA_VERSION)
            found = keys.SCHEMA_VERSION
        if found != keys.SCHEMA_VERSION:
            raise RuntimeError(f"Redis holds lorafleet schema version {found}, this code needs {keys.SCHEMA_VERSION}")

    def _migrate_from_1(self) -> None:
        """Version 1 had no holding or finished indexes and no job plans. Builds the indexes (idempotent, so two
        processes starting at once do no harm); jobs without a plan are sized by the scheduler when it first sees
        them (`service.Scheduler`), from the files, as version 1 did every round."""
        for state in HOLDING_STATES:
            for job_id in self.r.smembers(keys.state_set(state)):
                executor_id, attempt = self.r.hmget(keys.job(job_id), "executor_id", "attempt")
                if executor_id:
                    self.r.hset(keys.holding(executor_id), job_id, attempt or "0")
        for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
            for job_id in self.r.smembers(keys.state_set(state)):
                finished_at = self.r.hget(keys.job(job_id), "finished_at")
                self.r.zadd(keys.FINISHED, {job_id: float(finished_at or 0)})
        for state in JobState:
            for job_id in self.r.smembers(keys.state_set(state)):
                uri = self.r.hget(keys.job(job_id), "checkpoint_uri")
                self.r.hsetnx(keys.job(job_id), "checkpoints", json.dumps([uri] if uri else []))

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
            keys=[keys.tenant(name), keys.TENANTS, keys.TOKENS, keys.TENANTS_VERSION],
            args=[name, hash_token(token), weight, max_queued, max_running, time.time()],
        )
        if not created:
            raise ValueError(f"tenant {name!r} already exists")
        return self.get_tenant(name), token

    def get_tenant(self, name: str) -> dict[str, Any]:
        raw = self.r.hgetall(keys.tenant(name))
        if not raw:
            raise LookupError(f"no tenant {name!r}")
        return _tenant_view(raw, self.r.hgetall(keys.tenant_counts(name)))

    def list_tenants(self) -> list[dict[str, Any]]:
        """Every tenant with its per-state counts, in one round trip (what a scheduling round reads)."""
        names = sorted(self.r.smembers(keys.TENANTS))
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.tenant(name))
            pipe.hgetall(keys.tenant_counts(name))
        found = pipe.execute()
        return [_tenant_view(raw, counts) for raw, counts in zip(found[::2], found[1::2]) if raw]

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
        if not self._update_tenant(keys=[keys.tenant(name), keys.TENANTS_VERSION], args=args):
            raise LookupError(f"no tenant {name!r}")
        return self.get_tenant(name)

    def tenants_version(self) -> int:
        """+1 on every change of a tenant's record other than its token: whether `list_tenants` must be read again."""
        return int(self.r.get(keys.TENANTS_VERSION) or 0)

    def tenant_counts(self, names: list[str]) -> dict[str, dict[str, int]]:
        """Per-state job counts of each of `names`, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.tenant_counts(name))
        return {name: _counts(raw) for name, raw in zip(names, pipe.execute())}

    def rotate_token(self, name: str) -> str:
        token = new_token()
        if not self._rotate_token(keys=[keys.tenant(name), keys.TOKENS], args=[name, hash_token(token)]):
            raise LookupError(f"no tenant {name!r}")
        return token

    def set_disabled(self, name: str, disabled: bool = True) -> dict[str, Any]:
        """A disabled tenant's token and broker user are refused at once (its open connections closed); its queued
        jobs stay queued but never start, its running ones run on (cancel them separately)."""
        if not self._update_tenant(keys=[keys.tenant(name), keys.TENANTS_VERSION], args=["disabled", int(disabled)]):
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
        return _counts(self.r.hgetall(keys.tenant_counts(tenant) if tenant else keys.COUNTS))

    # ---- jobs ----

    def submit(self, tenant: str, spec: JobSpec, now: Optional[float] = None,
               datasets: Optional[dict[str, AcceptedDataset]] = None, plan: Optional[JobPlan] = None,
               request_id: Optional[str] = None) -> dict[str, Any]:
        """Insert a validated job as `queued`, enforcing the tenant's max_queued in the same atomic step.

        `datasets`: the accepted copies of the spec's datasets; `plan`: its size, decided at submission (the API
        always passes both; a job without a plan, submitted here by operator tools and tests, is sized by the
        scheduler when it first sees it). `request_id`: a client's idempotency key; a second submit with the same
        key returns the first job (whatever its state) instead of making another."""
        if request_id is not None and not (isinstance(request_id, str) and REQUEST_ID_RE.fullmatch(request_id)):
            raise ValueError("request_id: use 1-128 letters, digits, '.', '_', ':' or '-'")
        now = time.time() if now is None else now
        job_id = "job-" + secrets.token_hex(8)
        try:
            _, job_id, fields = self._submit(
                keys=submit_keys(tenant, job_id),
                args=[job_id, tenant, spec.name, spec.priority, spec.model_dump_json(), repr(now),
                      json.dumps({field: d.to_json() for field, d in (datasets or {}).items()}),
                      plan.to_json() if plan else "", request_id or ""],
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
        return JobRecord.from_hash(dict(zip(fields[::2], fields[1::2]))).view()

    def job(self, job_id: str) -> Optional[JobRecord]:
        # Checked before any key is built from it: "<id>:events" would otherwise name another key.
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            return None
        raw = self.r.hgetall(keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def jobs(self, job_ids: Iterable[str]) -> list[JobRecord]:
        """The records of those of `job_ids` that exist, in order (one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        return [JobRecord.from_hash(raw) for raw in pipe.execute() if raw]

    def get_job(self, job_id: str, with_spec: bool = True) -> Optional[dict[str, Any]]:
        """The public view of a job (`JobRecord.view`), or None."""
        record = self.job(job_id)
        return record.view(with_spec) if record else None

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

    def list_jobs(self, tenant: Optional[str], state: Optional[str] = None, limit: int = 100,
                  metadata: Optional[Mapping[str, str]] = None) -> list[dict[str, Any]]:
        """Newest first; tenant None = all tenants; with `metadata` (a tenant's jobs only), those whose metadata has
        every pair of it."""
        _check_limit(limit)
        if state is not None and state not in keys.JOB_STATES:
            raise ValueError(f"state: must be one of {', '.join(keys.JOB_STATES)}, got {state!r}")
        if metadata is not None:
            if tenant is None:
                raise ValueError("metadata: filters one tenant's jobs, give the tenant")
            wanted = with_metadata(metadata)
            records, _ = self.tenant_jobs_after(
                tenant, None, limit, lambda record: (state is None or record.state.value == state) and wanted(record))
            return [record.view(with_spec=False) for record in records]
        tenants = [tenant] if tenant is not None else sorted(self.r.smembers(keys.TENANTS))
        found: list[tuple[str, float]] = []
        for name in tenants:
            found += self._newest(name, state, limit)
        found.sort(key=lambda item: item[1], reverse=True)
        return [record.view(with_spec=False) for record in self.jobs(job_id for job_id, _ in found[:limit])]

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

    def tenant_jobs_after(self, tenant: str, after: Optional[str], limit: int,
                          keep: Optional[Callable[[JobRecord], bool]] = None) -> tuple[list[JobRecord], bool]:
        """A page of the tenant's jobs, newest first, starting after the job `after` (None: from the newest), and
        whether more follow; with `keep`, of the jobs it keeps only (read `FILTER_CHUNK` at a time until the page is
        full). LookupError when `after` is not one of the tenant's jobs."""
        _check_limit(limit)
        index = keys.tenant_jobs(tenant)
        start = page_start(self.r, index, after, "job")
        if keep is None:
            ids = self.r.zrevrange(index, start, start + limit)
            return self.jobs(ids[:limit]), len(ids) > limit
        kept: list[JobRecord] = []
        while len(kept) <= limit and (ids := self.r.zrevrange(index, start, start + FILTER_CHUNK - 1)):
            kept += [record for record in self.jobs(ids) if keep(record)]
            start += len(ids)
        return kept[:limit], len(kept) > limit

    def tenant_jobs_in(self, tenant: str, state: JobState) -> list[JobRecord]:
        """Every job of the tenant in `state`, newest first."""
        return self.jobs([job_id for job_id, _ in self._newest(tenant, state.value, limit=1 << 62)])

    def queued_ids(self) -> list[str]:
        """Queued job ids in scheduling order: priority 9 first, then oldest first."""
        return self.r.zrange(keys.QUEUE, 0, -1)

    def queue_snapshot(self) -> tuple[int, list[str]]:
        """(the queue's version, its job ids), read together: `queue_changes(version)` then says what changed."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(keys.QUEUE_VERSION)
        pipe.zrange(keys.QUEUE, 0, -1)
        version, ids = pipe.execute()
        return int(version or 0), ids

    def queue_changes(self, since: int) -> Optional[tuple[int, dict[str, bool]]]:
        """(the queue's version now, job id -> whether it is queued now, for every job that entered or left the
        queue after version `since`), or None when those changes are no longer kept (read `queue_snapshot`). Trims
        what it returns: only the leader calls it."""
        result = self._queue_changes(keys=[keys.QUEUE_CHANGES, keys.QUEUE, keys.QUEUE_VERSION,
                                           keys.QUEUE_CHANGES_TRIMMED], args=[since])
        if int(result[0]) < 0:
            return None
        return int(result[0]), {job_id: queued == "1" for job_id, queued in zip(result[1::2], result[2::2])}

    def held_ids(self) -> list[str]:
        """Ids of every scheduled or running job."""
        return sorted(self.r.sunion(keys.state_set(JobState.SCHEDULED), keys.state_set(JobState.RUNNING)))

    def summaries(self, job_ids: Iterable[str]) -> list[JobSummary]:
        """`JobSummary` of each of `job_ids` that exists, in order (one round trip)."""
        job_ids = list(job_ids)
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), JobSummary.FIELDS)
        return [JobSummary.from_fields(job_id, values) for job_id, values in zip(job_ids, pipe.execute())
                if values[1] is not None]

    def plans(self, job_ids: list[str]) -> dict[str, Optional[JobPlan]]:
        """The stored plans of `job_ids` (None: a job without one)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "plan")
        return {job_id: _parsed_plan(raw) if raw else None for job_id, raw in zip(job_ids, pipe.execute())}

    def summaries_and_plans(self, job_ids: list[str]) -> list[tuple[JobSummary, Optional[JobPlan]]]:
        """`summaries` with each job's stored plan, in one read per job (a new leader reads every queued job's)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), (*JobSummary.FIELDS, "plan"))
        return [(JobSummary.from_fields(job_id, values[:-1]), _parsed_plan(values[-1]) if values[-1] else None)
                for job_id, values in zip(job_ids, pipe.execute()) if values[1] is not None]

    def holding(self, executor_id: str) -> tuple[int, dict[str, int]]:
        """(the assignment sequence now, job id -> attempt of every job scheduled on or running at `executor_id`),
        read together: every assignment up to that sequence number is in the map, or was taken away since."""
        view = self.executor_view(executor_id)
        return view.seq, view.held

    def executor_view(self, executor_id: str) -> ExecutorView:
        """The assignment sequence, holding index, pause requests and drain request of `executor_id`, read together:
        an executor's loop reads them between every two steps, in one round trip."""
        pipe = self.r.pipeline(transaction=True)
        pipe.get(keys.ASSIGN_SEQ)
        pipe.hgetall(keys.holding(executor_id))
        pipe.smembers(keys.executor_pauses(executor_id))
        pipe.get(keys.executor_drain(executor_id))
        seq, held, pauses, drain = pipe.execute()
        return ExecutorView(int(seq or 0), {job_id: int(attempt) for job_id, attempt in held.items()}, set(pauses),
                            drain == "1")

    def holds(self, job_id: str, attempt: int, executor_id: Optional[str] = None) -> bool:
        """Whether the lease (`attempt`, `executor_id`) is the running job's current one."""
        state, current, holder = self.r.hmget(keys.job(job_id), "state", "attempt", "executor_id")
        return state == JobState.RUNNING and current == str(attempt) and (executor_id is None or holder == executor_id)

    def set_plan(self, job_id: str, plan: JobPlan) -> None:
        """Store the size of a job written without one (schema version 1, operator tools)."""
        self.r.hset(keys.job(job_id), "plan", plan.to_json())

    # ---- transitions ----

    def transition(
        self,
        job_id: str,
        from_states: Iterable[str] | str,
        to_state: str,
        *,
        fence: Optional[int] = None,
        attempt: Optional[int] = None,
        executor_id: Optional[str] = None,
        **fields: Any,
    ) -> bool:
        """Atomically move a job from one of `from_states` to `to_state`, setting `fields` on it; the primitive under
        the verbs, which callers should prefer.

        Returns False (and changes nothing) when the job is in none of `from_states`, or `attempt` / `executor_id`
        (the lease, when given) is not the job's — the normal outcome of a race. Raises IllegalTransition for a
        move the state machine forbids, LookupError for an unknown job, StaleFence when `fence` is not the current
        leader's token. For a move to scheduled, `executor_id` is the field it sets (the new holder), not a check.
        """
        moved = self._move(job_id, from_states, to_state, fence=fence, attempt=attempt, executor_id=executor_id,
                           fields=fields)
        return moved is not None

    def _move(self, job_id: str, from_states, to_state, *, fence=None, attempt=None, executor_id=None,
              fields: Optional[dict] = None) -> Optional[int]:
        """`transition`; returns the job's attempt after the move, or None when it did not move."""
        _, script_keys, args = self._move_call(job_id, from_states, to_state, fence=fence, attempt=attempt,
                                               executor_id=executor_id, fields=fields)
        try:
            result = self._transition(keys=script_keys, args=args)
        except redis.ResponseError as exc:
            raise _transition_error(exc, job_id, fence) from None
        return int(result[2]) if result[0] else None

    def _move_call(self, job_id: str, from_states, to_state, *, fence=None, attempt=None, executor_id=None,
                   fields: Optional[dict] = None, must_exist: str = "") -> tuple:
        """The transition script's call (script, keys, args) for `transition`, checked against the state machine."""
        states, to = _states(from_states), JobState(to_state)
        for state in states:
            if to not in TRANSITIONS[state]:
                raise IllegalTransition(f"illegal transition {state} -> {to}")
        fields = dict(fields or {})
        not_settable = set(fields) - SETTABLE_FIELDS
        if not_settable:
            raise ValueError(f"transition cannot set {sorted(not_settable)}")
        if to == JobState.SCHEDULED:
            fields["executor_id"], executor_id = executor_id, None
            if not fields["executor_id"]:
                raise ValueError("a move to scheduled needs the executor_id it goes to")
        args = [",".join(states), to.value, repr(time.time()), "" if fence is None else fence,
                *_lease_args(attempt, executor_id), json.dumps({k: str(v) for k, v in fields.items()}), must_exist]
        script_keys = [keys.job(job_id), keys.COUNTS, keys.QUEUE, keys.job_events(job_id), keys.SCHEDULER_FENCE,
                       keys.FINISHED, keys.ASSIGN_SEQ, keys.QUEUE_CHANGES, keys.QUEUE_VERSION]
        return self._transition, script_keys, args

    def claim(self, job_id: str, executor_id: str, fence: Optional[int] = None) -> Optional[int]:
        """queued -> scheduled for `executor_id`; returns the new attempt (the executor's lease token) or None."""
        return self._move(job_id, JobState.QUEUED, JobState.SCHEDULED, fence=fence, executor_id=executor_id)

    def claim_many(self, claims: list[tuple[str, str]], fence: Optional[int] = None) -> list[Optional[int]]:
        """`claim` for each (job id, executor id), in one round trip, each only while that executor's heartbeat
        exists (what the scheduler uses: one that deregistered since it was read gets nothing)."""
        results = scripts.run_pipelined(self.r, [
            self._move_call(job_id, JobState.QUEUED, JobState.SCHEDULED, fence=fence, executor_id=executor_id,
                            must_exist=keys.executor(executor_id)) for job_id, executor_id in claims])
        attempts = []
        for (job_id, _), result in zip(claims, results):
            if isinstance(result, redis.ResponseError):
                raise _transition_error(result, job_id, fence)
            attempts.append(int(result[2]) if result[0] else None)
        return attempts

    def start(self, job_id: str, attempt: int, executor_id: str) -> bool:
        """scheduled -> running, by the lease holder."""
        return self.transition(job_id, JobState.SCHEDULED, JobState.RUNNING, attempt=attempt, executor_id=executor_id)

    def succeed(self, job_id: str, adapter_uri: str, attempt: int, executor_id: Optional[str] = None) -> bool:
        """running -> succeeded with the published adapter's location; False: the lease is not the caller's."""
        return self.transition(job_id, JobState.RUNNING, JobState.SUCCEEDED, attempt=attempt, executor_id=executor_id,
                               adapter_uri=adapter_uri)

    def fail(self, job_id: str, from_states: Iterable[str] | str, error: str, *, reason: FailureReason,
             attempt: Optional[int] = None, executor_id: Optional[str] = None, fence: Optional[int] = None) -> bool:
        """Move a job to failed with the message the tenant reads (an `error` event comes with it); `reason` is
        counted (`keys.JOB_FAILURES`) for the metrics."""
        failed = self.transition(job_id, from_states, JobState.FAILED, attempt=attempt, executor_id=executor_id,
                                 fence=fence, error=error)
        if failed:
            self.append_event(job_id, "error", message=error)
            self.r.hincrby(keys.JOB_FAILURES, FailureReason(reason).value, 1)
        return failed

    def cancel(self, tenant: Optional[str], job_id: Any) -> dict[str, Any]:
        """Cancel a job the tenant owns (tenant None = operator). Cancelling a cancelled job is a no-op."""
        while True:
            job = self.get_job_for(tenant, job_id)
            state = JobState(job["state"])
            if state == JobState.CANCELLED:
                return job
            if state.terminal:
                raise ValueError(f"job {job_id} already {state}; nothing to cancel")
            fields = {} if state in (JobState.QUEUED, JobState.PAUSED) else {"cancel_requested": 1}
            if self.transition(job_id, state, JobState.CANCELLED, **fields):
                return self.get_job(job_id)

    def pause(self, tenant: Optional[str], job_id: Any) -> dict[str, Any]:
        """Pause a job the tenant owns: a queued or scheduled job at once; a running one is asked to pause, and its
        executor checkpoints it at its next step boundary (optimizer state kept) and moves it to `paused`."""
        while True:
            job = self.get_job_for(tenant, job_id)
            state = JobState(job["state"])
            if state == JobState.PAUSED or (state == JobState.RUNNING and job["pause_requested"]):
                return job
            if state.terminal:
                raise IllegalTransition(f"job {job_id} already {state}; it cannot be paused")
            if state == JobState.RUNNING:
                if self._request_pause(keys=[keys.job(job_id), keys.job_events(job_id)], args=[repr(time.time())])[0]:
                    return self.get_job(job_id)
            elif self.transition(job_id, state, JobState.PAUSED):
                return self.get_job(job_id)

    def resume(self, tenant: Optional[str], job_id: Any) -> dict[str, Any]:
        """Put a paused job back in the queue, at its old place; it resumes from its checkpoint on any executor."""
        job = self.get_job_for(tenant, job_id)
        if job["state"] == JobState.RUNNING and job["pause_requested"]:
            raise IllegalTransition(f"job {job_id} is being paused; resume it once it is paused")
        if job["state"] != JobState.PAUSED:
            raise IllegalTransition(f"job {job_id} is {job['state']}, not paused; only a paused job can be resumed")
        if not self.transition(job_id, JobState.PAUSED, JobState.QUEUED):
            raise IllegalTransition(f"job {job_id} changed state meanwhile; look at it again")
        return self.get_job(job_id)

    def delete_model(self, tenant: str, job_id: str) -> JobRecord:
        """Mark the fine-tuned model of a succeeded job of the tenant deleted (an event `model_deleted`), once; the
        record after. LookupError for an unknown job, another tenant's, or a model deleted already; ValueError for a
        job that has not succeeded. Its files are the caller's to remove (`results.JobResults.delete_model`)."""
        done = self._delete_model(keys=[keys.job(job_id), keys.job_events(job_id)], args=[tenant, repr(time.time())])
        if not done[0]:
            why = done[1]
            if why == "":
                raise LookupError(f"no job {job_id!r}")
            if why == "deleted":
                raise LookupError(f"the fine-tuned model of job {job_id} was deleted")
            raise ValueError(f"job {job_id} is {why}: only a succeeded job has a fine-tuned model")
        return self.job(job_id)

    def paused_at_checkpoint(self, job_id: str, attempt: int, executor_id: str) -> bool:
        """running -> paused, by the lease holder once the job's checkpoint is recorded."""
        return self.transition(job_id, JobState.RUNNING, JobState.PAUSED, attempt=attempt, executor_id=executor_id)

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(keys.job(job_id), "cancel_requested") == "1"

    def record_progress(self, job_id: str, step: int, total_steps: int, metrics: Optional[dict[str, float]] = None,
                        attempt: Optional[int] = None, executor_id: Optional[str] = None) -> bool:
        """Store the latest step and metrics (loss, tokens_per_s, ...); a progress event when `progress_event_due`.

        Returns False when the job is no longer running (cancelled, requeued) or the lease is stale: drop the job.
        """
        return self.record_step([ProgressUpdate(job_id, step, total_steps, metrics or {}, attempt)], executor_id)[0]

    def record_step(self, updates: list["ProgressUpdate"], executor_id: Optional[str] = None,
                    usage: Optional[dict[str, float]] = None) -> list[bool]:
        """`record_progress` of every job of a cohort step and the step's `add_gpu_seconds`, in one round trip (a
        step's writes cost one network latency, not one per job); a bool per update, as `record_progress`."""
        now = repr(time.time())
        calls = []
        for update in updates:
            metrics = dict(update.metrics)
            calls.append((self._progress, [keys.job(update.job_id), keys.job_events(update.job_id)], [
                *_lease_args(update.attempt, executor_id), int(update.step), int(update.total_steps),
                json.dumps(metrics), now,
                # a validation loss is measured only at checkpoints: its event is never thinned away
                "1" if progress_event_due(update.step, update.total_steps) or "eval_loss" in metrics else "0",
                json.dumps({"step": update.step, "total_steps": update.total_steps, **metrics})]))
        if usage:
            calls.append((self._add_usage, [keys.TENANT_GPU_SECONDS, keys.TENANT_GPU_SECONDS_TOTAL],
                          _usage_args(usage, time.time())))
        replies = scripts.run_pipelined(self.r, calls)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [bool(reply[0]) for reply in replies[:len(updates)]]

    def record_checkpoint(self, job_id: str, checkpoint_uri: str, attempt: int, executor_id: Optional[str] = None,
                          step: int = 0, keep: int = KEEP_CHECKPOINTS) -> Optional[list[str]]:
        """Point the job at its newest checkpoint, keeping the last `keep`. Returns the URIs no longer kept (the
        caller deletes them), or None when refused: the caller no longer holds the running lease."""
        result = self._checkpoint(keys=[keys.job(job_id), keys.job_events(job_id)],
                                  args=[*_lease_args(attempt, executor_id), checkpoint_uri, repr(time.time()),
                                        max(1, keep), step])
        return list(result[1:]) if result[0] else None

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

        `executor_id`, when given, must be the job's holder (a lease check like `attempt`). `executor_died`: the
        process that held it is gone (killed, crashed, restarted). Such jobs are counted (`executor_losses`); one
        lost `MAX_EXECUTOR_LOSSES` times is failed instead, so that a job whose data or shape kills executors
        cannot take them down for ever (the scheduler runs a job lost before in a cohort of its own, so innocent
        cohort members are not counted again)."""
        if not self.transition(job_id, from_states, JobState.QUEUED, attempt=attempt, fence=fence,
                               executor_id=executor_id):
            return False
        losses = self.r.hincrby(keys.job(job_id), "executor_losses", 1) if executor_died else 0
        self.append_event(job_id, "requeued", reason=reason, executor_id=executor_id,
                          checkpoint_uri=self.r.hget(keys.job(job_id), "checkpoint_uri") or None)
        if losses >= MAX_EXECUTOR_LOSSES:
            self.fail(job_id, JobState.QUEUED, fence=fence, reason=FailureReason.EXECUTOR_LOST, error=(
                f"job {job_id} failed: the executor training it stopped {losses} times ({reason}); the last times it "
                "ran in a cohort of its own, so it is this job's data or shape that takes executors down"))
        return True

    # ---- retention ----

    def finished_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Ids of jobs that finished before `cutoff` (unix s), oldest first."""
        return self.r.zrangebyscore(keys.FINISHED, "-inf", f"({cutoff}", start=0, num=limit)

    def purge(self, cutoff: float, delete_artifacts: Callable[[JobRecord], None], limit: int = 1000
              ) -> list[JobRecord]:
        """Remove up to `limit` jobs that finished before `cutoff`: their artifacts first (`delete_artifacts`),
        then record, events and index entries. Returns the records removed."""
        removed = []
        for record in self.jobs(self.finished_before(cutoff, limit)):
            if not record.state.terminal or (record.finished_at or 0) >= cutoff:
                continue
            delete_artifacts(record)
            if self._purge(keys=[keys.job(record.job_id), keys.job_events(record.job_id), keys.FINISHED, keys.COUNTS],
                           args=[record.job_id, repr(cutoff)]):
                removed.append(record)
        return removed

    # ---- usage ----

    def add_gpu_seconds(self, usage: dict[str, float], now: Optional[float] = None) -> None:
        """Charge tenants for their share of cohort steps; older charges decay (fair share forgets slowly)."""
        if usage:
            self._add_usage(keys=[keys.TENANT_GPU_SECONDS, keys.TENANT_GPU_SECONDS_TOTAL],
                            args=_usage_args(usage, time.time() if now is None else now))

    def gpu_seconds(self, now: Optional[float] = None) -> dict[str, float]:
        """Tenant -> decayed GPU seconds used, as of `now`."""
        now = time.time() if now is None else now
        usage = {}
        for tenant, raw in self.r.hgetall(keys.TENANT_GPU_SECONDS).items():
            value, at = raw.split()
            usage[tenant] = decayed_usage(float(value), float(at), now)
        return usage

    def gpu_seconds_total(self) -> dict[str, float]:
        """Tenant -> GPU seconds used since the store began (not decayed): what the metrics export."""
        return {tenant: float(value) for tenant, value in self.r.hgetall(keys.TENANT_GPU_SECONDS_TOTAL).items()}

    def failure_counts(self) -> dict[str, int]:
        """`FailureReason` value -> jobs failed for it since the store began."""
        return {reason: int(count) for reason, count in self.r.hgetall(keys.JOB_FAILURES).items()}

    # ---- events ----

    def append_event(self, job_id: str, type: str, **data: Any) -> str:
        return self.r.xadd(keys.job_events(job_id), {"type": type, "ts": repr(time.time()), "data": json.dumps(data)})

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





def _counts(raw: dict[str, str]) -> dict[str, int]:
    return {state: int(raw.get(state, 0)) for state in keys.JOB_STATES}


def _tenant_view(raw: dict[str, str], counts: dict[str, str]) -> dict[str, Any]:
    return {
        "name": raw["name"],
        "weight": float(raw["weight"]),
        "max_queued": int(raw["max_queued"]),
        "max_running": int(raw["max_running"]),
        "disabled": raw["disabled"] == "1",
        "created_at": float(raw["created_at"]),
        "counts": _counts(counts),
    }


def _transition_error(exc: redis.ResponseError, job_id: str, fence: Optional[int]) -> Exception:
    if str(exc) == "NO_JOB":
        return LookupError(f"no job {job_id!r}")
    if str(exc) == "STALE_FENCE":
        return StaleFence(f"fencing token {fence} is stale: this scheduler is no longer the leader")
    return exc

def _check_quota(weight: Any, max_queued: Any, max_running: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
        raise ValueError(f"weight: must be a number in (0, 1000], got {weight!r}")
    for field, value in (("max_queued", max_queued), ("max_running", max_running)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100_000:
            raise ValueError(f"{field}: must be an integer from 0 to 100000, got {value!r}")
