"""Whether any executor of the fleet could ever run a job: a job no executor class can hold is refused at submission,
naming what to change, instead of waiting in the queue forever.

An executor class is what the planner needs of a live executor's heartbeat to place a job on it when empty: its
memory, the dtypes its device computes natively, what `dtype: auto` becomes there, its pass size. The job must fit
one class alone, as `policy.plan` would place it (same memory model, same calibration factors, same dtype rule).
With no executor alive there is nothing to judge by, and the job waits for one. The classes are read at most every
CLASSES_SECONDS per process: a submission pays for the fleet's heartbeats once a second, not once per call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import redis

from lorafleet.scheduler import config, fleet, keys
from lorafleet.scheduler.files import FileStore
from lorafleet.scheduler.memory import JobPlan
from lorafleet.scheduler.policy import ExecutorView, PlanConfig, QueuedJob, plan
from lorafleet.scheduler.records import SubmissionRefusal
from lorafleet.scheduler.spec import JobSpec, SpecError
from lorafleet.scheduler.store import JobStore, QuotaExceeded
from lorafleet.scheduler.submission import accept_submission

CLASSES_SECONDS = 1.0
GIB = 2**30


@dataclass(frozen=True)
class ExecutorClass:
    total_bytes: int
    dtypes: frozenset[str]
    auto_dtype: str
    max_pass_tokens: Optional[int]

    def empty(self) -> ExecutorView:
        """An idle executor of this class, as the planner sees one."""
        return ExecutorView("class", self.total_bytes, self.total_bytes, max_pass_tokens=self.max_pass_tokens,
                            dtypes=self.dtypes or None, auto_dtype=self.auto_dtype)


_read: tuple[float, tuple[ExecutorClass, ...], dict[str, float]] = (-CLASSES_SECONDS, (), {})


def fleet_classes(client: redis.Redis) -> tuple[tuple[ExecutorClass, ...], dict[str, float]]:
    """(the classes of the live executors, the calibrated memory factors), as of at most CLASSES_SECONDS ago."""
    global _read
    now = time.monotonic()
    if now - _read[0] >= CLASSES_SECONDS:
        alive, _ = fleet.executors(client)
        classes = {ExecutorClass(b.total_bytes, frozenset(b.dtypes), b.auto_dtype, b.max_pass_tokens) for b in alive}
        factors = {key: float(factor) for key, factor in client.hgetall(keys.MEMORY_FACTORS).items()}
        _read = (now, tuple(sorted(classes, key=lambda c: -c.total_bytes)), factors)
    return _read[1], _read[2]


def check_some_executor_holds(client: redis.Redis, spec: JobSpec, job_plan: JobPlan) -> None:
    """SpecError naming the field to change when no live executor class could run the job even alone."""
    classes, factors = fleet_classes(client)
    if not classes:
        return
    job = QueuedJob.from_plan("admission", "admission", spec.priority, 0.0, job_plan)
    config = PlanConfig(memory_factors=factors)
    if any(plan([job], [c.empty()], {}, 0.0, config) for c in classes):
        return
    native = [c for c in classes if c.empty().runs(job)]
    if not native:
        offered = sorted({dtype for c in classes for dtype in c.dtypes})
        raise SpecError(f"invalid job spec: dtype: no executor of this deployment computes in {job.dtype} "
                        f"(they offer {', '.join(offered)}); use 'auto'")
    largest = native[0]
    need = job.bytes_alone(largest.auto_dtype, largest.max_pass_tokens) * factors.get(job.compat_key, 1.0)
    usable = largest.total_bytes * config.memory_fraction
    hp = spec.hyperparameters
    remedy = ("lower batch_size or max_seq_len (a GaLore job trains a whole copy of its base: it cannot be quantized)"
              if spec.adapter.type == "galore" else
              "lower batch_size or max_seq_len, or quantize the base (quantization: nf4)")
    raise SpecError(
        f"invalid job spec: hyperparameters.batch_size: no executor of this deployment can hold this job, even "
        f"alone: it needs about {need / GIB:.1f} GiB (its base and, at batch_size={hp.batch_size} x "
        f"max_seq_len={hp.max_seq_len}, its adapter and activations) and the largest executor offers "
        f"{usable / GIB:.1f} GiB; {remedy}")


def submit_job(store: JobStore, tenant: str, raw: object, files: Optional[FileStore] = None,
               request_id: Optional[str] = None,
               refused: Callable[[SubmissionRefusal], None] = lambda reason: None) -> dict:
    """The whole submission, as the Celery task and the gateway both make it: the spec, its data and base accepted
    (`accept_submission`), some executor class able to hold it, then stored. Returns the job's public view; a
    refusal raises, after telling `refused` which stage refused (for the metrics)."""
    try:
        accepted = accept_submission(raw, tenant, config.data_root(), config.hf_hub_cache(), config.model_roots(),
                                     config.dataset_store(), files)
    except (ValueError, LookupError, PermissionError):
        refused(SubmissionRefusal.SPEC)
        raise
    try:
        check_some_executor_holds(store.r, accepted.spec, accepted.plan)
    except ValueError:
        refused(SubmissionRefusal.ADMISSION)
        raise
    try:
        return store.submit(tenant, accepted.spec, datasets=accepted.datasets, plan=accepted.plan,
                            request_id=request_id)
    except QuotaExceeded:
        refused(SubmissionRefusal.QUOTA)
        raise
    except (PermissionError, LookupError):
        refused(SubmissionRefusal.TENANT)
        raise
