"""Every Redis key lorafleet uses, in one place. All of them start with `lorafleet:`.

State lives only in Redis (persisted with AOF), so a scheduler or worker restart loses nothing.

| key | type | holds | written by |
|---|---|---|---|
| `lorafleet:schema_version` | string | data model version (`SCHEMA_VERSION`) | `JobStore.ensure_schema` |
| `lorafleet:tenants` | set | names of all tenants | `JobStore.create_tenant` |
| `lorafleet:tenant:<name>` | hash | `name`, `token_sha256`, `weight`, `max_queued`, `max_running`, `disabled` (0/1), `created_at` | `JobStore` tenant admin |
| `lorafleet:tenants_version` | string (int) | +1 per change of a tenant's record (create, quota, disable): the scheduler re-reads tenants only then | `JobStore` tenant admin (Lua) |
| `lorafleet:tokens` | hash | sha256(token) -> tenant name (tokens themselves are never stored) | `JobStore` tenant admin |
| `lorafleet:tenant:<name>:jobs` | sorted set | the tenant's job ids, score = submit time (unix s) | `JobStore.submit`; `JobStore.purge` removes |
| `lorafleet:tenant:<name>:requests` | hash | client request id -> job id: a second submit with the same id returns that job | `JobStore.submit` (Lua); `JobStore.purge` removes |
| `lorafleet:tenant:<name>:counts` | hash | state -> number of the tenant's jobs in that state (quotas read it) | submit / transitions (Lua) |
| `lorafleet:counts` | hash | state -> number of jobs in that state, all tenants | submit / transitions (Lua) |
| `lorafleet:job:<id>` | hash | one job: see `JOB_FIELDS` (read and written as `records.JobRecord`) | submit / store verbs (Lua) |
| `lorafleet:job:<id>:events` | stream | the job's events (`type` = state, requeued, checkpoint, error, progress); never trimmed: progress events are thinned as they are written (`store.progress_event_due`: about `PROGRESS_EVENTS` per job) | store verbs (Lua), `JobStore.append_event` |
| `lorafleet:state:<state>` | set | ids of jobs in that state (`records.JobState`) | submit / transitions (Lua) |
| `lorafleet:finished` | sorted set | ids of finished jobs, score = finished_at: what retention expires (`JobStore.purge`) | transitions (Lua) |
| `lorafleet:assign_seq` | string (int) | assignment counter, +1 per move to scheduled (stored as the job's `assigned_seq`) | transitions (Lua) |
| `lorafleet:executor:<id>:holding` | hash | job id -> attempt of every job scheduled on or running at that executor: what it reads to find its work | transitions (Lua) |
| `lorafleet:queue` | sorted set | queued job ids, lowest score first; score = digits `(9 - priority)` then the 14-digit submit sequence number, so priority 9 first, then oldest first; a requeued job keeps its score | submit / transitions (Lua) |
| `lorafleet:submit_seq` | string (int) | submit sequence counter (the queue's tie-break) | `JobStore.submit` (Lua) |
| `lorafleet:queue_version` | string (int) | +1 per job entering or leaving the queue | submit / transitions (Lua) |
| `lorafleet:queue_changes` | sorted set | job id -> the `queue_version` of its last entry into or exit from the queue: what a round reads instead of the whole queue (`JobStore.queue_changes`) | submit / transitions (Lua); trimmed by the leader as it reads |
| `lorafleet:queue_changes_trimmed` | string (int) | the version `queue_changes` is trimmed through: a reader behind it reads the whole queue | the leader (`JobStore.queue_changes`) |
| `lorafleet:scheduler:leader` | string, TTL | id of the scheduler holding the leader lock | `leader.LeaderLock` |
| `lorafleet:scheduler:fence` | string (int) | fencing counter, +1 per leader acquisition; `JobStore.transition(fence=...)` checks it | `leader.LeaderLock` |
| `lorafleet:executors` | set | ids of registered executors (alive or not yet reaped) | executors (`fleet.heartbeat`); the scheduler removes dead ones (`fleet.forget`) |
| `lorafleet:executor:<id>` | hash, TTL | heartbeat: the fields of `records.ExecutorHeartbeat` (raw measurements, the leases it holds, the assignment sequence it has seen); expires when heartbeats stop | the executor (`fleet.heartbeat`) |
| `lorafleet:executor:<id>:pause` | set | ids of jobs running there whose tenant asked for a pause: the executor checkpoints each at its next step boundary and moves it to `paused` | `JobStore.pause` (Lua); transitions (Lua) remove a job leaving the executor |
| `lorafleet:executor:<id>:drain` | string | "1": finish the current step, checkpoint every job, hand them back, exit | `lorafleet executors drain` |
| `lorafleet:tenant_gpu_seconds` | hash | tenant -> `"<GPU seconds> <unix time>"`: GPU seconds used (each cohort step split by tokens), decayed with a 4 h half-life, as of that time | executors (`JobStore.add_gpu_seconds`) |
| `lorafleet:tenant_gpu_seconds_total` | hash | tenant -> GPU seconds used, never decayed (exported by the leader as `lorafleet_tenant_gpu_seconds_total`) | executors (`JobStore.add_gpu_seconds`, same script) |
| `lorafleet:job_failures` | hash | `records.FailureReason` -> jobs failed for it (exported by the leader as `lorafleet_job_failures_total`) | whoever fails a job (`JobStore.fail`) |
| `lorafleet:memory_factors` | hash | compat key -> calibrated memory-model factor, learned from executors' measured peaks | scheduler (`service.Scheduler`) |
| `lorafleet:worker_queue` | list | nothing: the submission worker's Celery default queue, which no one writes (tenants' queues are below) | — |
| `lorafleet:dead_letters` | list, capped at `DEAD_LETTERS_MAXLEN` | submission messages the worker refused before any task ran: JSON `{queue, kind, reason, ts, task, id}` (never the body, which may hold a token) | the submission worker (`broker.dead_letter`) |
| `lorafleet:rejected_messages` | hash | kind (`broker.Refused.kind`) -> number of refused submission messages (exported by the scheduler as `lorafleet_submission_rejected_messages`) | the submission worker (`broker.dead_letter`) |
| `lorafleet:file:<id>` | hash | one tenant file (`files.FileRecord` fields, plus `seq` and `blob`, the name of its bytes in the dataset store) | `files.FileStore` (Lua) |
| `lorafleet:tenant:<name>:files` | sorted set | the tenant's file ids, score = `file_seq` at creation (newest last) | `files.FileStore` (Lua) |
| `lorafleet:tenant:<name>:file_usage` | hash | `bytes`, `count` of the tenant's uploaded files: what its file quota is checked against | `files.FileStore` (Lua) |
| `lorafleet:tenant:<name>:file_digests` | hash | blob name (`<sha256>.jsonl` / `.tar`) -> the tenant's file with those bytes: a second upload returns it | `files.FileStore` (Lua) |
| `lorafleet:tenant:<name>:artifact_files` | hash | artifact URI (an adapter or checkpoint) -> the tenant's file packed from it | `files.FileStore.file_for_artifact` |
| `lorafleet:tenant:<name>:uploads` | sorted set | the tenant's open chunked uploads, score = when each expires (at most `files.MAX_OPEN_UPLOADS`) | `files.FileStore` (Lua) |
| `lorafleet:upload:<id>` | hash, TTL | one chunked upload: `tenant`, `filename`, `purpose`, `bytes` declared, `reserved`, `written`; its bytes are `<dataset store>/.uploads/<id>.part` | `files.FileStore` (Lua) |
| `lorafleet:file_seq` | string (int) | file counter (the order of tenants' file lists) | `files.FileStore` (Lua) |
| `lorafleet:file_blob_refs` | hash | blob name -> number of files, of all tenants, with those bytes | `files.FileStore` (Lua) |
| `lorafleet:file_orphans` | sorted set | blob names no file names any more, score = since when: `FileStore.collect_garbage` removes them once no unfinished job trains on them | `files.FileStore` (Lua) |
| `lorafleet:generation:queue:<compat key>` | list, TTL | generation requests waiting for an executor with that base loaded (`generation.GenerationRequest` JSON), oldest first; expires a minute after its last caller's deadline | `generation.Generations.submit` (RPUSH); executors pop (`take_requests`, Lua) |
| `lorafleet:generation:bases` | hash | compat key -> `generation.ServedBase` JSON: the bases with requests waiting, what an idle executor loads to serve them | `Generations.submit`; `bases_unserved` removes a base whose queue is empty |
| `lorafleet:generation:server:<compat key>` | string, TTL | the id of an executor serving that base (its loaded one): idle executors leave the base to it | executors (`Generations.take_requests(server=...)` as they take requests between steps; `claim_base`) |
| `lorafleet:generation:result:<request id>` | list, TTL | the request's `generation.GenerationResult` JSON; expires after `generation.RESULT_TTL_SECONDS` | the executor that answered (`Generations.answer`); the caller pops it (BLPOP) |
| `lorafleet:generation:stream:<tenant>:<request id>` | stream, TTL | a streamed request's `generation.StreamEvent` JSON (field `event`): its text as it is generated (with the log-probs of the tokens each event completes, when asked), the last one with the `GenerationResult`; expires `generation.STREAM_TTL_SECONDS` after its last event, deleted once the caller read the last | the executor answering it (`Generations.publish_text`, `deliver`); the caller reads it (XREAD BLOCK, `stream_events`) |
| `lorafleet:generation:slots:<tenant>` | sorted set, TTL | the tenant's generation requests in progress in the whole service: slot id -> when its lease ends (the server's clock, ms), at most `config.max_generations_per_tenant()` unexpired; a holder renews its lease while its request runs; expires with its last lease | gateways (`generation_slots.GenerationSlots`, Lua: take, renew; ZREM gives back) |

Tenant-facing keys are outside `lorafleet:*`, which no tenant credential can touch. Each tenant's broker user
(`acl.tenant_username`) reaches only these, and only with the commands Celery's client needs to publish and fetch:

| key | type | holds | written by |
|---|---|---|---|
| `lorafleet-tenant.<name>.submit` (+ kombu's priority suffixes) | list | the tenant's submission-API messages; the worker consumes it and knows every message on it is this tenant's | the tenant's Celery client (LPUSH) |
| `_kombu.binding.lorafleet-tenant.<name>.submit`, `_kombu.binding_permanent.` the same | set | kombu's routing table of that queue | the tenant's client and the worker (kombu) |
| `lorafleet-tenant.<name>.results.celery-task-meta-<task id>` | string, expires after an hour | a task's result (and a channel of that name for its notification); the tenant may only read | the submission worker (`broker.TenantResultBackend`) |

Celery owns its other keys: `_kombu.*`, `unacked*`, `*.celery.pidbox` (remote control).
"""

from __future__ import annotations

from lorafleet.scheduler.records import JobState, TERMINAL_STATES as _TERMINAL

SCHEMA_VERSION = 2  # 1 -> 2: `JobStore.ensure_schema` migrates (holding and finished indexes, job plans)
PREFIX = "lorafleet:"
PROGRESS_EVENTS = 1000  # progress events per job, about: longer jobs record every n-th optimizer step

JOB_STATES = tuple(state.value for state in JobState)
TERMINAL_STATES = tuple(state.value for state in JobState if state in _TERMINAL)

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
    "pause_requested",  # "1" when a pause was asked while running: its executor checkpoints and pauses it
    "executor_losses",  # executors that died holding the job; at `store.MAX_EXECUTOR_LOSSES` it is failed
    "datasets",  # JSON: spec field -> the accepted copy (`datasets.AcceptedDataset`: uri, sha256, size, records)
    "plan",  # JSON `memory.JobPlan`: pinned base snapshot, sizes, token budget; decided at submission
    "checkpoints",  # JSON list: the checkpoints kept, oldest first (`store.KEEP_CHECKPOINTS`)
    "assigned_seq",  # ASSIGN_SEQ at its last move to scheduled
    "request_id",  # the client's idempotency key, if it gave one
    "model_deleted_at",  # unix seconds: its tenant deleted the fine-tuned model (`JobStore.delete_model`)
)

SCHEMA_VERSION_KEY = PREFIX + "schema_version"
TENANTS = PREFIX + "tenants"
TOKENS = PREFIX + "tokens"
TENANTS_VERSION = PREFIX + "tenants_version"
COUNTS = PREFIX + "counts"
QUEUE = PREFIX + "queue"
SUBMIT_SEQ = PREFIX + "submit_seq"
QUEUE_VERSION = PREFIX + "queue_version"
QUEUE_CHANGES = PREFIX + "queue_changes"
QUEUE_CHANGES_TRIMMED = PREFIX + "queue_changes_trimmed"
ASSIGN_SEQ = PREFIX + "assign_seq"
FINISHED = PREFIX + "finished"
SCHEDULER_LEADER = PREFIX + "scheduler:leader"
SCHEDULER_FENCE = PREFIX + "scheduler:fence"
EXECUTORS = PREFIX + "executors"
MEMORY_FACTORS = PREFIX + "memory_factors"
TENANT_GPU_SECONDS = PREFIX + "tenant_gpu_seconds"
TENANT_GPU_SECONDS_TOTAL = PREFIX + "tenant_gpu_seconds_total"
JOB_FAILURES = PREFIX + "job_failures"
WORKER_QUEUE = PREFIX + "worker_queue"
DEAD_LETTERS = PREFIX + "dead_letters"
DEAD_LETTERS_MAXLEN = 1000
REJECTED_MESSAGES = PREFIX + "rejected_messages"
FILE_SEQ = PREFIX + "file_seq"
FILE_BLOB_REFS = PREFIX + "file_blob_refs"
FILE_ORPHANS = PREFIX + "file_orphans"
GENERATION_BASES = PREFIX + "generation:bases"
TENANT_KEY_PREFIX = "lorafleet-tenant."


def tenant_queue(name: str) -> str:
    """The tenant's submission queue: the only queue its broker user may publish to."""
    return f"{TENANT_KEY_PREFIX}{name}.submit"


def tenant_result_prefix(name: str) -> str:
    """Celery's `global_keyprefix` for the tenant's task results (ends in '.', which Celery keeps as the separator)."""
    return f"{TENANT_KEY_PREFIX}{name}.results."


def tenant_of_queue(queue: str) -> str | None:
    """The tenant whose submission queue this is, else None."""
    if queue.startswith(TENANT_KEY_PREFIX) and queue.endswith(".submit"):
        return queue[len(TENANT_KEY_PREFIX):-len(".submit")] or None
    return None


def tenant(name: str) -> str:
    return f"{PREFIX}tenant:{name}"


def tenant_jobs(name: str) -> str:
    return f"{PREFIX}tenant:{name}:jobs"


def tenant_counts(name: str) -> str:
    return f"{PREFIX}tenant:{name}:counts"


def tenant_requests(name: str) -> str:
    return f"{PREFIX}tenant:{name}:requests"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def state_set(state: str) -> str:
    return f"{PREFIX}state:{state}"


def executor(executor_id: str) -> str:
    return f"{PREFIX}executor:{executor_id}"


def holding(executor_id: str) -> str:
    return f"{PREFIX}executor:{executor_id}:holding"


def executor_pauses(executor_id: str) -> str:
    return f"{PREFIX}executor:{executor_id}:pause"


def executor_drain(executor_id: str) -> str:
    return f"{PREFIX}executor:{executor_id}:drain"


def file(file_id: str) -> str:
    return f"{PREFIX}file:{file_id}"


def tenant_files(name: str) -> str:
    return f"{PREFIX}tenant:{name}:files"


def tenant_file_usage(name: str) -> str:
    return f"{PREFIX}tenant:{name}:file_usage"


def tenant_file_digests(name: str) -> str:
    return f"{PREFIX}tenant:{name}:file_digests"


def tenant_artifact_files(name: str) -> str:
    return f"{PREFIX}tenant:{name}:artifact_files"


def tenant_uploads(name: str) -> str:
    return f"{PREFIX}tenant:{name}:uploads"


def upload(upload_id: str) -> str:
    return f"{PREFIX}upload:{upload_id}"


def generation_queue(compat_key: str) -> str:
    return f"{PREFIX}generation:queue:{compat_key}"


def generation_server(compat_key: str) -> str:
    return f"{PREFIX}generation:server:{compat_key}"


def generation_result(request_id: str) -> str:
    return f"{PREFIX}generation:result:{request_id}"


def generation_stream(tenant: str, request_id: str) -> str:
    """Scoped by the tenant as well as by the (unguessable) request id: another tenant's name reads nothing."""
    return f"{PREFIX}generation:stream:{tenant}:{request_id}"


def generation_slots(tenant: str) -> str:
    return f"{PREFIX}generation:slots:{tenant}"
