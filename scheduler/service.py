"""The scheduler process: `lorafleet scheduler`. Leader election, then planning rounds.

Each round reads a snapshot from Redis (queued jobs, live executors and their cohorts, tenants), hands it to the pure
`policy.plan`, and writes the assignments back with the leader's fencing token. Before planning it sends jobs of
executors whose heartbeat expired back to the queue with their latest checkpoint. Every write carries the fencing
token, so a scheduler that lost the lock (paused, partitioned) cannot assign anything once a standby took over.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from functools import lru_cache
from pathlib import Path

import redis

from lorafleet.scheduler import config, fleet, keys
from lorafleet.scheduler.leader import LeaderLock
from lorafleet.scheduler.metrics import SchedulerMetrics, scheduler_metrics, serve
from lorafleet.scheduler.policy import (
    ExecutorView,
    MemoryCalibration,
    ModelShape,
    PlanConfig,
    QueuedJob,
    RunningJob,
    TenantView,
    calibrate,
    cohort_bytes,
    estimate_activation_bytes,
    estimate_base_bytes,
    estimate_gpu_seconds,
    estimate_job_bytes,
    plan,
)
from lorafleet.scheduler.spec import JobSpec, resolve_dataset
from lorafleet.scheduler.store import JobStore, StaleFence
from lorafleet.scheduler.submission import resolve_base_model

log = logging.getLogger("lorafleet.scheduler")

BYTES_PER_TOKEN_GUESS = 4  # dataset bytes per token, to size a job before its data is tokenised


@lru_cache(maxsize=256)
def _model_shape(model_dir: str) -> ModelShape:
    return ModelShape.from_config(json.loads((Path(model_dir) / "config.json").read_text()))


def _job_size(spec: JobSpec, tenant: str) -> tuple[float, int, int, int, int]:
    """(GPU seconds the job needs, tokens per micro-batch, job bytes, of them activation bytes, base bytes) from its
    spec and files."""
    hp = spec.hyperparameters
    model_dir = resolve_base_model(spec.base_model, config.hf_hub_cache(), spec.base_model_revision, config.model_roots())
    shape = _model_shape(str(model_dir))
    tokens_per_step = hp.batch_size * hp.max_seq_len
    if hp.max_steps is not None:
        tokens = hp.max_steps * hp.gradient_accumulation_steps * tokens_per_step
    else:
        size = resolve_dataset(spec.dataset, config.data_root(), tenant).stat().st_size
        tokens = hp.epochs * min(size // BYTES_PER_TOKEN_GUESS + 1, 10**12)
    dtype = spec.dtype
    job_bytes = estimate_job_bytes(shape, spec.adapter.r, spec.adapter.target_modules, hp.batch_size, hp.max_seq_len, dtype)
    activation_bytes = estimate_activation_bytes(shape, hp.batch_size, hp.max_seq_len, dtype)
    base_bytes = estimate_base_bytes(shape.num_params(), spec.quantization, dtype)
    return estimate_gpu_seconds(tokens, shape.num_params()), tokens_per_step, job_bytes, activation_bytes, base_bytes


def _plan_isolating(queued: list[QueuedJob], executors: list[ExecutorView], tenants: dict[str, TenantView], now: float,
                    cfg: PlanConfig, suspects: set[str], isolated: set[str]) -> list:
    """`plan`, except that a job whose executor died before (a suspect) runs alone: only on an executor with no
    other job, which then takes no other job, so that if the job kills it again it takes no one else down and only
    its own count of losses grows. `isolated`: executors already running a suspect."""
    assignments, taken = [], set(isolated)
    for job in (q for q in queued if q.job_id in suspects):
        for executor in executors:
            if executor.executor_id in taken or executor.running:
                continue
            alone = plan([job], [executor], tenants, now, cfg)
            if alone:
                assignments += alone
                taken.add(executor.executor_id)
                break
    others = [q for q in queued if q.job_id not in suspects]
    return assignments + plan(others, [e for e in executors if e.executor_id not in taken], tenants, now, cfg)


class Scheduler:
    def __init__(self, store: JobStore, holder: str, plan_config: PlanConfig = PlanConfig(),
                 lock_ttl: float = 3.0, interval: float = 0.5, metrics: SchedulerMetrics | None = None):
        self.store, self.holder, self.plan_config = store, holder, plan_config
        self.lock = LeaderLock(store.r, holder, lock_ttl)
        self.interval = interval
        self.metrics = metrics
        self.stopping = threading.Event()
        self.calibrations: dict[str, MemoryCalibration] = {}
        self.calibrated_beats: dict[str, float] = {}  # executor id -> heartbeat already folded into calibrations

    def run(self) -> None:
        """Rounds until stopped. A Redis outage pauses the scheduler (retrying every 2 s) instead of ending it."""
        renewal = self.lock.keep_renewed(self.stopping)
        while not self.stopping.is_set():
            try:
                self.tick()
            except redis.ConnectionError as exc:
                log.warning("Redis unreachable (%s); retrying in 2 s", exc)
                self.lock.token = None
                self.stopping.wait(2.0)
                continue
            self.stopping.wait(self.interval)
        renewal.join()
        if self.lock.token is not None:
            self.lock.release()

    def tick(self) -> None:
        """Keep or take the leader lock; plan one round while holding it."""
        if self.lock.token is None:
            if self.lock.try_acquire() is not None:
                log.info("%s is now the leader (fencing token %d)", self.holder, self.lock.token)
                self.calibrations = {key: MemoryCalibration(float(factor), 1)  # what the last leader learned
                                     for key, factor in self.store.r.hgetall(keys.MEMORY_FACTORS).items()}
        elif not self.lock.renew():  # the renewal thread keeps it between ticks; this also notices a loss at once
            log.warning("%s lost the leader lock", self.holder)
        if self.metrics:
            self.metrics.is_leader.set(1 if self.lock.token is not None else 0)
        if self.lock.token is not None:
            try:
                self.round()
            except StaleFence:
                log.warning("%s: a newer leader exists; standing by", self.holder)
                self.lock.token = None

    def round(self) -> list:
        now = time.time()
        fence = self.lock.token
        alive, dead = fleet.executors(self.store.r)
        alive_ids = {e["executor_id"] for e in alive}
        holding = self.store.jobs_in_state("scheduled") + self.store.jobs_in_state("running")
        for job in holding:
            if job["executor_id"] not in alive_ids:
                if self.store.requeue(job["job_id"], ("scheduled", "running"), "executor lost", fence=fence,
                                      attempt=job["attempt"], executor_id=job["executor_id"], executor_died=True):
                    log.info("job %s requeued: executor %s is gone", job["job_id"], job["executor_id"])
                    if self.metrics:
                        self.metrics.requeued.labels(reason="executor_lost").inc()
        for executor_id in dead:
            fleet.forget(self.store.r, executor_id)

        running_by_executor: dict[str, list[RunningJob]] = {}
        on_device: dict[str, tuple[int, list[RunningJob]]] = {}  # executor -> (base bytes, its jobs in the peak)
        cohort_key: dict[str, str] = {}
        for job in holding:
            if job["executor_id"] in alive_ids:
                spec = JobSpec.model_validate(job["spec"])  # validated at submission; stored by us
                try:
                    gpu_seconds, per_step, job_bytes, activation_bytes, base_bytes = _job_size(spec, job["tenant"])
                except Exception:  # its files vanished mid-run: the executor will fail it; plan around it meanwhile
                    gpu_seconds, per_step, job_bytes, activation_bytes, base_bytes = 0.0, 0, 0, 0, 0
                progress = job["progress"]
                done = progress["step"] / progress["total_steps"] if progress["total_steps"] else 0.0
                running = RunningJob(job["job_id"], job["tenant"], job_bytes, per_step, gpu_seconds * (1 - done),
                                     activation_bytes, spec.hyperparameters.max_seq_len)
                running_by_executor.setdefault(job["executor_id"], []).append(running)
                # A job only scheduled may not have reached the executor yet: the cohort's key is still its key
                # (the heartbeat's loaded base can lag behind), but its memory is not in the reported peak.
                cohort_key[job["executor_id"]] = spec.compatibility_key()
                if job["state"] == "running":
                    on_device.setdefault(job["executor_id"], (base_bytes, []))[1].append(running)
        executors = []
        for e in alive:
            passes = e["max_pass_tokens"] or None
            base_bytes, jobs = on_device.get(e["executor_id"], (0, []))
            predicted = base_bytes + cohort_bytes(jobs, passes)
            fresh = self.calibrated_beats.get(e["executor_id"]) != e["heartbeat_at"]
            if fresh and e["compat_key"] and e["peak_bytes"] and predicted:
                self.calibrated_beats[e["executor_id"]] = e["heartbeat_at"]
                current = self.calibrations.get(e["compat_key"], MemoryCalibration())
                self.calibrations[e["compat_key"]] = calibrate(current, e["peak_bytes"], round(predicted))
                self.store.r.hset(keys.MEMORY_FACTORS, e["compat_key"], self.calibrations[e["compat_key"]].factor)
            executors.append(ExecutorView(
                executor_id=e["executor_id"], total_bytes=e["total_bytes"], free_bytes=e["free_bytes"],
                loaded_compat_key=cohort_key.get(e["executor_id"], e["compat_key"]), loaded_base_bytes=e["base_bytes"],
                running=tuple(running_by_executor.get(e["executor_id"], ())), max_pass_tokens=passes,
                dtypes=frozenset(e["dtypes"].split(",")) if e.get("dtypes") else None,
            ))

        tenant_records = self.store.list_tenants()
        disabled = {t["name"] for t in tenant_records if t["disabled"]}
        queued, suspects = [], set()
        for job in self.store.list_queued():
            if job["tenant"] in disabled:  # stays queued, never starts, until the tenant is enabled again
                continue
            try:
                spec = JobSpec.model_validate(job["spec"])
                gpu_seconds, per_step, job_bytes, activation_bytes, base_bytes = _job_size(spec, job["tenant"])
            except Exception as exc:  # its model or data vanished since submission: fail it with the reason
                self.store.transition(job["job_id"], "queued", "failed", fence=fence, error=f"cannot size job: {exc}")
                continue
            if job["executor_losses"]:
                suspects.add(job["job_id"])
            queued.append(QueuedJob(job["job_id"], job["tenant"], spec.compatibility_key(), spec.priority,
                                    job["submitted_at"], gpu_seconds, per_step, job_bytes, base_bytes,
                                    activation_bytes, spec.hyperparameters.max_seq_len, spec.dtype))

        usage = self.store.gpu_seconds()
        tenants = {}
        for t in tenant_records:
            counts = self.store.counts(t["name"])
            tenants[t["name"]] = TenantView(t["name"], t["weight"], t["max_running"],
                                            counts.get("scheduled", 0) + counts.get("running", 0),
                                            usage.get(t["name"], 0.0))
        cfg = PlanConfig(**{**self.plan_config.__dict__,
                            "memory_factors": {k: c.factor for k, c in self.calibrations.items()}})
        started = time.perf_counter()
        isolated = {job["executor_id"] for job in holding if job["executor_losses"]}
        assignments = _plan_isolating(queued, executors, tenants, now, cfg, suspects, isolated)
        if self.metrics:
            self.metrics.plan_duration.observe(time.perf_counter() - started)
        tenant_of = {job.job_id: job.tenant for job in queued}
        for a in assignments:
            # The executor list was read before the queue: one that deregistered since (a drain hands its jobs back
            # after deregistering) must not get them again.
            if not fleet.is_registered(self.store.r, a.executor_id):
                continue
            attempt = self.store.claim(a.job_id, a.executor_id, fence=fence)
            if attempt is not None:
                log.info("job %s -> executor %s (attempt %d)", a.job_id, a.executor_id, attempt)
                if self.metrics:
                    self.metrics.assignments.labels(tenant=tenant_of[a.job_id]).inc()
        if self.metrics:
            self._export(alive, running_by_executor, tenants)
        return assignments

    def _export(self, alive, running_by_executor, tenants) -> None:
        self.metrics.executors_alive.set(len(alive))
        for kind, count in self.store.r.hgetall(keys.REJECTED_MESSAGES).items():
            self.metrics.rejected_messages.labels(kind=kind).set(int(count))
        for e in alive:
            self.metrics.cohort_jobs.labels(executor=e["executor_id"]).set(len(running_by_executor.get(e["executor_id"], ())))
        for name in tenants:
            counts = self.store.counts(name)
            for state in keys.JOB_STATES:
                self.metrics.jobs.labels(tenant=name, state=state).set(counts.get(state, 0))


def main(metrics_port: int, interval: float, lock_ttl: float, packing: str) -> None:
    """Entry point of `lorafleet scheduler`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    store = JobStore.from_url(config.redis_url())
    store.ensure_schema()
    metrics = scheduler_metrics()
    port = serve(metrics.registry, metrics_port)
    holder = f"{socket.gethostname()}-{os.getpid()}"
    log.info("scheduler %s: metrics on http://127.0.0.1:%d/metrics", holder, port)
    scheduler = Scheduler(store, holder, PlanConfig(packing=packing), lock_ttl=lock_ttl, interval=interval,
                          metrics=metrics)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: scheduler.stopping.set())
    scheduler.run()
