"""Every Redis key lorafleet uses, in one place. All of them start with `lorafleet:`.

State lives only in Redis (persisted with AOF), so a scheduler or worker restart loses nothing.

| key | type | holds | written by |
|---|---|---|---|
| `lorafleet:schema_version` | string | data model version (`SCHEMA_VERSION`) | `JobStore.ensure_schema` |
| `lorafleet:tenants` | set | names of all tenants | `JobStore.create_tenant` |
| `lorafleet:tenant:<name>` | hash | `name`, `token_sha256`, `weight`, `max_queued`, `max_running`, `disabled` (0/1), `created_at` | `JobStore` tenant admin |
| `lorafleet:tokens` | hash | sha256(token) -> tenant name (tokens themselves are never stored) | `JobStore` tenant admin |
| `lorafleet:tenant:<name>:jobs` | sorted set | the tenant's job ids, score = submit time (unix s) | `JobStore.submit` |
| `lorafleet:tenant:<name>:counts` | hash | state -> number of the tenant's jobs in that state (quotas read it) | submit / transitions (Lua) |
| `lorafleet:counts` | hash | state -> number of jobs in that state, all tenants | submit / transitions (Lua) |
| `lorafleet:job:<id>` | hash | one job: see `JOB_FIELDS` | submit / transitions / progress (Lua) |
| `lorafleet:job:<id>:events` | stream | the job's events (`type` = state, progress, error, ...), capped at ~`EVENTS_MAXLEN` | `JobStore.append_event` and Lua |
| `lorafleet:state:<state>` | set | ids of jobs in that state | submit / transitions (Lua) |
| `lorafleet:queue` | sorted set | queued job ids, lowest score first; score = digits `(9 - priority)` then the 14-digit submit sequence number, so priority 9 first, then oldest first; a requeued job keeps its score | submit / transitions (Lua) |
| `lorafleet:submit_seq` | string (int) | submit sequence counter (the queue's tie-break) | `JobStore.submit` (Lua) |
| `lorafleet:scheduler:leader` | string, TTL | id of the scheduler holding the leader lock | `leader.LeaderLock` |
| `lorafleet:scheduler:fence` | string (int) | fencing counter, +1 per leader acquisition; `JobStore.transition(fence=...)` checks it | `leader.LeaderLock` |
| `lorafleet:executors` | set | ids of registered executors (alive or not yet reaped) | executors (`fleet.heartbeat`); the scheduler removes dead ones (`fleet.forget`) |
| `lorafleet:executor:<id>` | hash, TTL | heartbeat: `host`, `device`, `dtypes` (compute dtypes the device runs natively, comma separated; bfloat16 jobs go only where it is listed), `pid`, `total_bytes`, `free_bytes`, `peak_bytes`, `compat_key` (loaded base), `base_bytes`, `jobs`, `metrics_port`, `max_pass_tokens` (empty: no passes), `heartbeat_at`; expires when heartbeats stop | the executor (`fleet.heartbeat`) |
| `lorafleet:executor:<id>:drain` | string | "1": finish the current step, checkpoint every job, hand them back, exit | `lorafleet executors drain` |
| `lorafleet:tenant_gpu_seconds` | hash | tenant -> `"<GPU seconds> <unix time>"`: GPU seconds used (each cohort step split by tokens), decayed with a 4 h half-life, as of that time | executors (`JobStore.add_gpu_seconds`) |
| `lorafleet:memory_factors` | hash | compat key -> calibrated memory-model factor, learned from executors' reported peaks | scheduler (`service.Scheduler`) |

Celery (broker and result backend on the same Redis) owns its own keys: `celery`, `_kombu.*`, `unacked*`,
`celery-task-meta-<task id>` (results expire after an hour).
"""

from __future__ import annotations

SCHEMA_VERSION = 1
PREFIX = "lorafleet:"
EVENTS_MAXLEN = 1000

JOB_STATES = ("queued", "scheduled", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")

# Job hash fields. Numbers are stored as decimal strings; `spec` and `metrics` as JSON text.
JOB_FIELDS = (
    "job_id",  # "job-" + 16 hex digits
    "tenant",
    "name",  # the spec's name
    "state",
    "priority",  # 0..9, from the spec
    "queue_score",  # this job's score in the queue index
    "spec",  # validated spec, JSON
    "submitted_at", "updated_at", "scheduled_at", "started_at", "finished_at",  # unix seconds
    "step", "total_steps",  # progress
    "metrics",  # latest step metrics, JSON: loss, tokens_per_s, ...
    "error",
    "adapter_uri", "checkpoint_uri",
    "executor_id",  # the executor that holds the job while scheduled/running
    "attempt",  # lease fencing token: +1 each time the job is scheduled; stale holders are refused
    "cancel_requested",  # "1" when cancelled while scheduled/running: the executor must drop it
)

SCHEMA_VERSION_KEY = PREFIX + "schema_version"
TENANTS = PREFIX + "tenants"
TOKENS = PREFIX + "tokens"
COUNTS = PREFIX + "counts"
QUEUE = PREFIX + "queue"
SUBMIT_SEQ = PREFIX + "submit_seq"
SCHEDULER_LEADER = PREFIX + "scheduler:leader"
SCHEDULER_FENCE = PREFIX + "scheduler:fence"
EXECUTORS = PREFIX + "executors"
MEMORY_FACTORS = PREFIX + "memory_factors"
TENANT_GPU_SECONDS = PREFIX + "tenant_gpu_seconds"


def tenant(name: str) -> str:
    return f"{PREFIX}tenant:{name}"


def tenant_jobs(name: str) -> str:
    return f"{PREFIX}tenant:{name}:jobs"


def tenant_counts(name: str) -> str:
    return f"{PREFIX}tenant:{name}:counts"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def state_set(state: str) -> str:
    return f"{PREFIX}state:{state}"


def executor(executor_id: str) -> str:
    return f"{PREFIX}executor:{executor_id}"


def executor_drain(executor_id: str) -> str:
    return f"{PREFIX}executor:{executor_id}:drain"
