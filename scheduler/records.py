"""The typed records every process reads and writes: a job's state and record, an executor's heartbeat.

Redis holds them as hashes of strings (`keys`); these classes are the only code that turns one into the other, so a
field is named, typed and defaulted once. `JobRecord.view()` is the public JSON form the task API returns.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, Mapping, Optional

from lorafleet.scheduler.memory import JobPlan


class JobState(str, Enum):
    """A job's state. A `str`, so `JobState.RUNNING == "running"` and it goes into JSON and Lua as its value."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # left its cohort at a step boundary with a checkpoint (optimizer state kept); resume queues it

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def holding(self) -> bool:
        """An executor holds the job (its lease) in this state."""
        return self in HOLDING_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
HOLDING_STATES = frozenset({JobState.SCHEDULED, JobState.RUNNING})

# The only legal moves; the store refuses every other.
TRANSITIONS: dict[JobState, tuple[JobState, ...]] = {
    JobState.QUEUED: (JobState.SCHEDULED, JobState.CANCELLED, JobState.FAILED, JobState.PAUSED),
    JobState.SCHEDULED: (JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED, JobState.PAUSED),
    JobState.RUNNING: (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED, JobState.PAUSED),
    JobState.PAUSED: (JobState.QUEUED, JobState.CANCELLED),
    JobState.SUCCEEDED: (),
    JobState.FAILED: (),
    JobState.CANCELLED: (),
}


def _float(value: Optional[str]) -> Optional[float]:
    return float(value) if value not in (None, "") else None


def _int(value: Optional[str]) -> int:
    return int(value) if value not in (None, "") else 0


@dataclass(frozen=True)
class JobRecord:
    """One job as stored in `lorafleet:job:<id>` (hash fields of the same names; see `keys.JOB_FIELDS`)."""

    job_id: str
    tenant: str
    name: str
    state: JobState
    priority: int
    queue_score: str
    spec_json: str  # the validated spec (field `spec`)
    submitted_at: Optional[float]
    updated_at: Optional[float]
    scheduled_at: Optional[float]
    started_at: Optional[float]
    finished_at: Optional[float]
    step: int
    total_steps: int
    metrics: Mapping[str, Any]
    error: Optional[str]
    adapter_uri: Optional[str]
    checkpoint_uri: Optional[str]
    checkpoints: tuple[str, ...]  # the recorded checkpoints still kept, oldest first (the last is checkpoint_uri)
    executor_id: Optional[str]
    attempt: int  # the lease: +1 each time the job is scheduled
    assigned_seq: int  # `keys.ASSIGN_SEQ` when it was last scheduled (reconciliation compares heartbeats with it)
    cancel_requested: bool
    pause_requested: bool  # asked while running: its executor pauses it at its next step boundary
    executor_losses: int
    datasets_json: str  # field `datasets`: spec field -> accepted copy
    plan_json: str  # field `plan`: decided at submission ('' for a job written by schema version 1, not sized yet)
    request_id: Optional[str]  # the client's idempotency key
    model_deleted_at: Optional[float] = None  # its tenant deleted the fine-tuned model: the adapter is gone

    @classmethod
    def from_hash(cls, raw: Mapping[str, str]) -> "JobRecord":
        return cls(
            job_id=raw["job_id"], tenant=raw["tenant"], name=raw.get("name", ""), state=JobState(raw["state"]),
            priority=_int(raw.get("priority")), queue_score=raw.get("queue_score", ""), spec_json=raw["spec"],
            submitted_at=_float(raw.get("submitted_at")), updated_at=_float(raw.get("updated_at")),
            scheduled_at=_float(raw.get("scheduled_at")), started_at=_float(raw.get("started_at")),
            finished_at=_float(raw.get("finished_at")), step=_int(raw.get("step")),
            total_steps=_int(raw.get("total_steps")), metrics=json.loads(raw.get("metrics") or "{}"),
            error=raw.get("error") or None, adapter_uri=raw.get("adapter_uri") or None,
            checkpoint_uri=raw.get("checkpoint_uri") or None,
            checkpoints=tuple(json.loads(raw.get("checkpoints") or "[]")),
            executor_id=raw.get("executor_id") or None, attempt=_int(raw.get("attempt")),
            assigned_seq=_int(raw.get("assigned_seq")), cancel_requested=raw.get("cancel_requested") == "1",
            pause_requested=raw.get("pause_requested") == "1",
            executor_losses=_int(raw.get("executor_losses")), datasets_json=raw.get("datasets") or "{}",
            plan_json=raw.get("plan") or "",
            request_id=raw.get("request_id") or None, model_deleted_at=_float(raw.get("model_deleted_at")),
        )

    @cached_property
    def plan(self) -> Optional[JobPlan]:
        return JobPlan.from_json(self.plan_json) if self.plan_json else None

    @cached_property
    def spec(self):
        from lorafleet.scheduler.spec import JobSpec  # pydantic: only where a spec is really read

        return JobSpec.model_validate_json(self.spec_json)

    def view(self, with_spec: bool = True) -> dict[str, Any]:
        """The public, JSON-ready form (what `lorafleet.get_job` returns)."""
        view = {
            "job_id": self.job_id, "tenant": self.tenant, "name": self.name, "state": self.state.value,
            "priority": self.priority, "submitted_at": self.submitted_at, "updated_at": self.updated_at,
            "scheduled_at": self.scheduled_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "progress": {"step": self.step, "total_steps": self.total_steps}, "metrics": dict(self.metrics),
            "error": self.error, "adapter_uri": self.adapter_uri, "checkpoint_uri": self.checkpoint_uri,
            "checkpoints": list(self.checkpoints), "executor_id": self.executor_id, "attempt": self.attempt,
            "cancel_requested": self.cancel_requested,
            "pause_requested": self.pause_requested, "executor_losses": self.executor_losses,
            "request_id": self.request_id, "model_deleted_at": self.model_deleted_at,
        }
        if with_spec:
            view["spec"] = json.loads(self.spec_json)
        return view


@dataclass(frozen=True)
class JobSummary:
    """The few fields of a job that a scheduling round needs, read alone (`JobStore.summaries`) rather than the whole
    record: a round reads them for every held job, and once for every job new to the queue."""

    job_id: str
    tenant: str
    state: JobState
    priority: int
    submitted_at: float
    attempt: int
    executor_id: Optional[str]
    assigned_seq: int
    step: int
    total_steps: int
    executor_losses: int
    updated_at: float  # of a queued job: when it entered the queue (what its queue wait counts from)

    FIELDS = ("tenant", "state", "priority", "submitted_at", "attempt", "executor_id", "assigned_seq", "step",
              "total_steps", "executor_losses", "updated_at")

    @classmethod
    def from_fields(cls, job_id: str, values: list[Optional[str]]) -> "JobSummary":
        tenant, state, priority, submitted_at, attempt, executor_id, assigned_seq, step, total_steps, losses, updated = values
        return cls(job_id, tenant or "", JobState(state), _int(priority), _float(submitted_at) or 0.0, _int(attempt),
                   executor_id or None, _int(assigned_seq), _int(step), _int(total_steps), _int(losses),
                   _float(updated) or 0.0)


class FailureReason(str, Enum):
    """Why a job failed, as counted in `lorafleet:job_failures` and exported as `lorafleet_job_failures_total{reason}`
    (the tenant reads the full message in the job's `error`)."""

    SIZING = "sizing"  # the scheduler could not size it: its base model or dataset is gone
    START = "start"  # its executor could not load it (base, dataset, checkpoint)
    TRAINING = "training"  # a step failed for it alone (bad data at a step, non-finite loss)
    VALIDATION = "validation"  # its validation data failed at a checkpoint
    UNTRAINED = "untrained"  # a whole epoch had no target token
    PUBLISH = "publish"  # the trained adapter could not be stored
    EXECUTOR_LOST = "executor_lost"  # executors died holding it `store.MAX_EXECUTOR_LOSSES` times


class SubmissionRefusal(str, Enum):
    """Why a submission was refused, by the stage that refused it (`lorafleet_submissions_refused_total{reason}`;
    the tenant reads the full message)."""

    SPEC = "spec"  # the spec, its dataset (a record, the format) or its base model
    ADMISSION = "admission"  # no executor class of the fleet could ever hold the job
    QUOTA = "quota"  # the tenant's max_queued
    TENANT = "tenant"  # the tenant is disabled or gone


@dataclass(frozen=True)
class StepStats:
    """An executor's last cohort step, measured: in its heartbeat (for `lorafleet top`) and in its metrics."""

    seconds: float = 0.0  # wall time of the step
    input_tokens: int = 0  # every token the step computed (prompts too)
    trained_tokens: int = 0  # target tokens: what "tokens trained" counts everywhere
    planned_tokens: int = 0  # the jobs' token budget: sum of batch_size * max_seq_len
    mfu: Optional[float] = None  # model FLOPs utilisation: 4 * frozen params * input tokens / s / peak; None: no peak
    graphed: bool = False  # the step replayed a captured CUDA graph (executor/step_graph.py), not launched eagerly

    @property
    def packing_efficiency(self) -> Optional[float]:
        """The share of the planned token budget the step filled (low: sequences far shorter than max_seq_len)."""
        return self.input_tokens / self.planned_tokens if self.planned_tokens else None


@dataclass(frozen=True)
class GpuStats:
    """What NVML measured of an executor's GPU; an executor without NVML (a CPU) has none."""

    memory_total_bytes: int
    memory_used_bytes: int
    utilization: float  # 0..1
    power_watts: Optional[float] = None
    temperature_celsius: Optional[float] = None
    # Below its top clock under a held load when the card is at its power limit: the matmul rate falls with it
    sm_clock_hertz: Optional[float] = None

    @property
    def memory_free_bytes(self) -> int:
        return max(0, self.memory_total_bytes - self.memory_used_bytes)


def _json_record(cls, text: Optional[str]):
    """A StepStats or GpuStats from its heartbeat field (JSON of its fields), None when absent."""
    return cls(**json.loads(text)) if text else None


@dataclass(frozen=True)
class ExecutorHeartbeat:
    """What an executor says of itself every few seconds (`lorafleet:executor:<id>`). Raw measurements only: the
    scheduler's memory model is applied by the scheduler, never by the executor."""

    executor_id: str
    host: str = ""
    device: str = ""
    dtypes: tuple[str, ...] = ()  # compute dtypes the device runs natively: bfloat16 jobs go only where listed
    auto_dtype: str = "float32"  # what `dtype: auto` computes in here (`memory.auto_dtype`)
    pid: int = 0
    total_bytes: int = 0  # device memory it offers
    peak_bytes: int = 0  # measured peak of its last step (or allocated bytes when idle)
    pass_tokens: int = 0  # tokens of the largest pass of that step (0: not in passes)
    compat_key: Optional[str] = None  # the loaded base
    base_bytes: int = 0  # measured bytes of the loaded base
    pool_bytes: int = 0  # bytes of its generation pool, allocated beside the base (in peak_bytes); 0: none made
    jobs: Mapping[str, int] = field(default_factory=dict)  # job id -> attempt, the leases it holds
    synced_seq: int = 0  # the `keys.ASSIGN_SEQ` its last completed look at its assignments saw
    metrics_port: int = 0
    max_pass_tokens: Optional[int] = None  # runs steps in passes of at most this many tokens (planned)
    heartbeat_at: float = 0.0
    last_step: Optional[StepStats] = None  # None until it ran a step
    gpu: Optional[GpuStats] = None  # None where NVML cannot measure

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.peak_bytes)

    def to_hash(self) -> dict[str, str]:
        return {
            "host": self.host, "device": self.device, "dtypes": ",".join(self.dtypes), "auto_dtype": self.auto_dtype,
            "pid": str(self.pid), "total_bytes": str(self.total_bytes), "peak_bytes": str(self.peak_bytes),
            "pass_tokens": str(self.pass_tokens), "compat_key": self.compat_key or "",
            "base_bytes": str(self.base_bytes), "pool_bytes": str(self.pool_bytes),
            "jobs": json.dumps(dict(self.jobs), sort_keys=True),
            "synced_seq": str(self.synced_seq), "metrics_port": str(self.metrics_port),
            "max_pass_tokens": "" if self.max_pass_tokens is None else str(self.max_pass_tokens),
            "heartbeat_at": repr(self.heartbeat_at or time.time()),
            "last_step": json.dumps(self.last_step.__dict__) if self.last_step else "",
            "gpu": json.dumps(self.gpu.__dict__) if self.gpu else "",
        }

    @classmethod
    def from_hash(cls, executor_id: str, raw: Mapping[str, str]) -> "ExecutorHeartbeat":
        return cls(
            executor_id=executor_id, host=raw.get("host", ""), device=raw.get("device", ""),
            dtypes=tuple(d for d in raw.get("dtypes", "").split(",") if d),
            auto_dtype=raw.get("auto_dtype") or "float32", pid=_int(raw.get("pid")),
            total_bytes=_int(raw.get("total_bytes")), peak_bytes=_int(raw.get("peak_bytes")),
            pass_tokens=_int(raw.get("pass_tokens")), compat_key=raw.get("compat_key") or None,
            base_bytes=_int(raw.get("base_bytes")), pool_bytes=_int(raw.get("pool_bytes")),
            jobs={job: int(attempt) for job, attempt in json.loads(raw.get("jobs") or "{}").items()},
            synced_seq=_int(raw.get("synced_seq")), metrics_port=_int(raw.get("metrics_port")),
            max_pass_tokens=_int(raw.get("max_pass_tokens")) or None,
            heartbeat_at=_float(raw.get("heartbeat_at")) or 0.0,
            last_step=_json_record(StepStats, raw.get("last_step")), gpu=_json_record(GpuStats, raw.get("gpu")),
        )
