"""The scheduler process: `lorafleet scheduler`. Leader election, then planning rounds.

A round, in a handful of Redis round trips whatever the queue's length:
1. reconcile: read the held (scheduled/running) jobs and the heartbeats; requeue each job whose executor's heartbeat
   expired (a loss, counted) or whose executor looked at its assignments after this one was made and does not hold
   it (a lost write, or a job it dropped);
2. calibrate the memory model from each new heartbeat's raw peak;
3. read the queue's ids; only jobs new to the queue are read, once, and turned into planning records from the plan
   stored at submission (no spec, model or dataset is read again);
4. hand the snapshot to the pure `policy.plan`, and claim every assignment in one pipelined round trip.
Every write carries the leader's fencing token, so a scheduler that lost the lock (paused, partitioned) cannot change
anything once a standby took over; the lock is renewed by a thread of its own, so no round is too long to keep it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import redis

from lorafleet.scheduler import config, fleet, keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.files import FileLimits, FileStore
from lorafleet.scheduler.generation import queued_by_base
from lorafleet.scheduler.leader import LeaderLock
from lorafleet.scheduler.memory import JobPlan, MemoryCalibration, calibrate, cohort_bytes
from lorafleet.scheduler.logs import configure_logging
from lorafleet.scheduler.metrics import (
    REQUEUED_EXECUTOR_LOST, REQUEUED_NOT_HELD, Health, SchedulerMetrics, scheduler_metrics, serve,
)
from lorafleet.scheduler.policy import Backlog, ExecutorView, PlanConfig, QueuedJob, RunningJob, TenantView, plan
from lorafleet.scheduler.records import ExecutorHeartbeat, FailureReason, JobSummary, JobRecord, JobState
from lorafleet.scheduler.store import JobStore, StaleFence
from lorafleet.scheduler.submission import plan_from_files

log = logging.getLogger("lorafleet.scheduler")

PURGE_EVERY_SECONDS = 60.0  # how often the leader expires finished jobs past the retention time
STALL_SECONDS = 120.0  # /healthz fails when no round came round for this long (a new leader's first round at 100k
# queued takes about 10 s)
EXPORT_EVERY_SECONDS = 1.0  # how often the leader exports per-tenant job counts (a scrape is every 15 s or so)
REREAD_HELD_EVERY = 10  # rounds between full re-reads of the held jobs (their progress only weighs fair share)


def _reread_turn(job_id: str) -> int:
    """The round (modulo REREAD_HELD_EVERY) in which a held job's summary is read again."""
    return zlib.crc32(job_id.encode()) % REREAD_HELD_EVERY


def _queued_job(record: JobRecord | JobSummary, plan: JobPlan) -> QueuedJob:
    return QueuedJob.from_plan(record.job_id, record.tenant, record.priority, record.submitted_at or 0.0, plan,
                               queued_at=record.updated_at or record.submitted_at or 0.0)


def _running_job(record: JobRecord | JobSummary, plan: JobPlan, auto_dtype: str) -> RunningJob:
    size = plan.size(auto_dtype)
    done = record.step / record.total_steps if record.total_steps else 0.0
    return RunningJob(record.job_id, record.tenant, size.job_bytes, plan.tokens_per_step,
                      plan.est_gpu_seconds * (1 - done), size.activation_bytes, plan.max_seq_len)


def _plan_isolating(backlog: Backlog, suspects: list[QueuedJob], executors: list[ExecutorView],
                    tenants: dict[str, TenantView], now: float, cfg: PlanConfig, isolated: set[str],
                    disabled: set[str]) -> list:
    """`plan`, except that a job whose executor died before (a suspect, kept out of the backlog) runs alone: only
    on an executor with no other job, which then takes no other job, so that if the job kills it again it takes no
    one else down and only its own count of losses grows. `isolated`: executors already running a suspect."""
    assignments, taken = [], set(isolated)
    for job in sorted(suspects, key=lambda q: (-q.priority, q.submitted_at, q.job_id)):  # queue order
        if job.tenant in disabled:
            continue
        for executor in executors:
            if executor.executor_id in taken or executor.running:
                continue
            alone = plan([job], [executor], tenants, now, cfg)
            if alone:
                assignments += alone
                taken.add(executor.executor_id)
                break
    free = [e for e in executors if e.executor_id not in taken]
    return assignments + plan(backlog, free, tenants, now, cfg, skip_tenants=disabled)


@dataclass(frozen=True)
class _MadeView:
    """An executor's view for the planner, with what it was made from (`Scheduler._executor_view`)."""

    beat: ExecutorHeartbeat
    held: list[JobSummary]
    view: ExecutorView
    on_device: tuple[int, list[RunningJob]]  # (base bytes, its jobs in the measured peak): for calibration


class Scheduler:
    """Rounds that read only what changed: a queued job's planning record is built once from the plan stored at
    submission and kept while the job stays queued; each round reads the queue's ids, the few held jobs, the
    heartbeats and the tenants, in a handful of round trips, and claims all its assignments in one."""

    def __init__(self, store: JobStore, holder: str, plan_config: PlanConfig = PlanConfig(),
                 lock_ttl: float = 3.0, interval: float = 0.5, metrics: SchedulerMetrics | None = None,
                 artifacts: Optional[ArtifactStore] = None, retention_seconds: Optional[float] = None,
                 files: Optional[FileStore] = None, health: Optional[Health] = None):
        self.store, self.holder, self.plan_config = store, holder, plan_config
        self.lock = LeaderLock(store.r, holder, lock_ttl)
        self.interval = interval
        self.metrics = metrics
        self.artifacts, self.retention_seconds = artifacts, retention_seconds
        self.files = files  # whose deleted files' bytes the purge removes
        self.health = health or Health(float("inf"))
        self.stopping = threading.Event()
        self.calibrations: dict[str, MemoryCalibration] = {}
        self.calibrated_beats: dict[str, float] = {}  # executor id -> heartbeat already folded into calibrations
        # Queued jobs' planning records (a queued job never changes), kept in step with the queue's change index
        # (`JobStore.queue_changes`) from `queue_version` on; None: read the whole queue next round.
        self.backlog = Backlog(aging_seconds=plan_config.aging_seconds)
        self.suspects: dict[str, QueuedJob] = {}  # queued jobs whose executor died before (they run alone)
        self.queue_version: Optional[int] = None
        self.plans: dict[str, Optional[JobPlan]] = {}  # held job id -> its plan (fixed at submission)
        self.held: dict[str, JobSummary] = {}  # held job id -> its summary as last read
        self.views: dict[str, _MadeView] = {}  # executor id -> its view as last made
        self.beats: dict[str, ExecutorHeartbeat] = {}  # executor id -> its heartbeat as last read
        self.tenant_records: list[dict] = []  # as of `tenants_version`
        self.tenants_version: Optional[int] = None
        self.rounds = 0
        self.last_purge = self.last_export = 0.0
        self.exported_executors: set[str] = set()  # executors whose series the last export set
        self.exported_bases: set[str] = set()  # bases whose waiting requests the last export set

    def run(self) -> None:
        """Rounds until stopped. A Redis outage pauses the scheduler (retrying every 2 s) instead of ending it."""
        renewal = self.lock.keep_renewed(self.stopping)
        while not self.stopping.is_set():
            try:
                self.tick()
            except redis.ConnectionError as exc:
                log.warning("Redis unreachable (%s); retrying in 2 s", exc)
                self.lock.token = None
                self.health.tick(f"Redis unreachable: {exc}")
                self.stopping.wait(2.0)
                continue
            self.health.tick()  # ready as leader or as standby
            self.stopping.wait(self.interval)
        renewal.join()
        if self.lock.token is not None:
            self.lock.release()

    def tick(self) -> None:
        """Keep or take the leader lock; plan one round while holding it."""
        if self.lock.token is None:
            if self.lock.try_acquire() is not None:
                log.info("%s is now the leader (fencing token %d)", self.holder, self.lock.token)
                self.queue_version = None  # another leader consumed the queue's changes meanwhile
                self.calibrations = {key: MemoryCalibration(float(factor), 1)  # what the last leader learned
                                     for key, factor in self.store.r.hgetall(keys.MEMORY_FACTORS).items()}
        elif not self.lock.renew():  # the renewal thread keeps it between ticks; this also notices a loss at once
            log.warning("%s lost the leader lock", self.holder)
        if self.lock.token is not None:
            try:
                self.round()
            except StaleFence:
                log.warning("%s: a newer leader exists; standing by", self.holder)
                self.lock.token = None
        if self.metrics:
            self.metrics.is_leader.set(1 if self.lock.token is not None else 0)
            if self.lock.token is None:
                self._withdraw_fleet_series()

    def _withdraw_fleet_series(self) -> None:
        """A standby exports no fleet series: after a failover the deposed leader's would be stale, and a sum over
        the schedulers would count every job twice. Only the leader's series are the fleet's."""
        self.metrics.withdraw_fleet_series()
        self.exported_executors, self.exported_bases = set(), set()
        self.last_export = 0.0  # export at once when leading again

    def round(self) -> list:
        now, fence = time.time(), self.lock.token
        alive, dead = fleet.executors(self.store.r, known=self.beats)
        self.beats = beats = {beat.executor_id: beat for beat in alive}
        holding = self._reconcile(beats, fence)
        for executor_id in dead:
            fleet.forget(self.store.r, executor_id)
        executors, running_by_executor = self._executor_views(beats, holding)
        tenant_records = self._tenants()
        disabled = {t["name"] for t in tenant_records if t["disabled"]}  # their jobs wait, never start
        self._sync_backlog(fence)
        usage = self.store.gpu_seconds(now)
        held_by_tenant = Counter(job.tenant for job in holding)  # what max_running counts: scheduled and running
        tenants = {t["name"]: TenantView(t["name"], t["weight"], t["max_running"], held_by_tenant[t["name"]],
                                         usage.get(t["name"], 0.0))
                   for t in tenant_records}
        cfg = PlanConfig(**{**self.plan_config.__dict__,
                            "memory_factors": {k: c.factor for k, c in self.calibrations.items()}})
        started = time.perf_counter()
        isolated = {job.executor_id for job in holding if job.executor_losses}
        assignments = _plan_isolating(self.backlog, list(self.suspects.values()), executors, tenants, now, cfg,
                                      isolated, disabled)
        if self.metrics:
            self.metrics.plan_duration.observe(time.perf_counter() - started)
        self._claim(assignments, fence, now)
        self._purge_expired(now)
        if self.metrics and now - self.last_export >= EXPORT_EVERY_SECONDS:
            self.last_export = now
            self._export(alive, running_by_executor, tenant_records)
        return assignments

    # ---- the parts of a round ----

    def _reconcile(self, beats: dict[str, ExecutorHeartbeat], fence: int) -> list[JobSummary]:
        """Requeue held jobs that no live executor holds: their executor's heartbeat expired (it died: a loss, counted),
        or it looked at its assignments after this one was made and does not hold it (a write was lost, or it dropped
        the job). Returns the jobs still held."""
        held = []
        for job in self._held_jobs():
            beat = beats.get(job.executor_id or "")
            if beat is None:
                reason, died = "executor lost", True
            elif job.assigned_seq <= beat.synced_seq and beat.jobs.get(job.job_id) != job.attempt:
                reason, died = "its executor does not hold it", False
            else:
                held.append(job)
                continue
            if self.store.requeue(job.job_id, (JobState.SCHEDULED, JobState.RUNNING), reason, fence=fence,
                                  attempt=job.attempt, executor_id=job.executor_id, executor_died=died):
                log.info("job %s requeued: %s (executor %s)", job.job_id, reason, job.executor_id)
                if self.metrics:
                    self.metrics.requeued.labels(reason=REQUEUED_EXECUTOR_LOST if died else REQUEUED_NOT_HELD).inc()
        self.plans = {job.job_id: self.plans[job.job_id] for job in held if job.job_id in self.plans}
        unknown = [job.job_id for job in held if job.job_id not in self.plans]
        for job_id, stored in self.store.plans(unknown).items():
            self.plans[job_id] = stored or self._size_from_files(job_id)
        return held

    def _tenants(self) -> list[dict]:
        """Every tenant's record (weight, quotas, disabled), read again only after an admin changed one
        (`keys.TENANTS_VERSION`). Its counts are as of that read: a round counts held jobs itself."""
        version = self.store.tenants_version()
        if version != self.tenants_version:
            self.tenant_records, self.tenants_version = self.store.list_tenants(), version
            if self.metrics:  # before any of a tenant's jobs is assigned: increase() sees its first assignment
                for tenant in self.tenant_records:
                    self.metrics.assignments.labels(tenant=tenant["name"])
                    self.metrics.queue_wait.labels(tenant=tenant["name"])
        return self.tenant_records

    def _held_jobs(self) -> list[JobSummary]:
        """Summaries of every held job. A held job's lease fields do not change until it leaves the held set (a
        new lease passes through this scheduler's `_claim`, which forgets it), so only jobs new to the set are read,
        and a tenth of the others in turn (each every REREAD_HELD_EVERY rounds, for its progress and after a Redis
        restart), so that no round reads them all."""
        self.rounds += 1
        turn = self.rounds % REREAD_HELD_EVERY
        ids = self.store.held_ids()
        stale = [job_id for job_id in ids if job_id not in self.held or _reread_turn(job_id) == turn]
        for job in self.store.summaries(stale):
            self.held[job.job_id] = job
        self.held = {job_id: self.held[job_id] for job_id in ids if job_id in self.held}
        return [job for job in self.held.values() if job.state.holding]

    def _size_from_files(self, job_id: str) -> Optional[JobPlan]:
        """The plan of a job stored without one (schema 1, operator tools), sized from its files once and stored."""
        job = self.store.job(job_id)
        if job is None:
            return None
        try:
            plan = plan_from_files(job.spec, job.tenant, config.data_root(), config.hf_hub_cache(),
                                   config.model_roots())
        except Exception as exc:  # its model or data vanished: the caller decides
            log.warning("job %s cannot be sized: %s", job.job_id, exc)
            return None
        self.store.set_plan(job.job_id, plan)
        return plan

    def _executor_views(self, beats: dict[str, ExecutorHeartbeat], holding: list[JobSummary]
                        ) -> tuple[list[ExecutorView], dict[str, list[RunningJob]]]:
        """The planner's view of each live executor (`beats`: id -> its heartbeat), and its cohort; calibrates the
        memory model from each new heartbeat's measured peak against the model's prediction for what it ran."""
        held_by: dict[str, list[JobSummary]] = {}
        for job in holding:
            held_by.setdefault(job.executor_id, []).append(job)
        views, running_by_executor, learned = [], {}, {}
        for beat in beats.values():
            made = self._executor_view(beat, held_by.get(beat.executor_id, []))
            if self._calibrate(beat, *made.on_device):
                learned[beat.compat_key] = self.calibrations[beat.compat_key].factor
            views.append(made.view)
            if made.view.running:
                running_by_executor[beat.executor_id] = list(made.view.running)
        self.views = {beat.executor_id: self.views[beat.executor_id] for beat in beats.values()}
        if learned:  # for the next leader, in one write
            self.store.r.hset(keys.MEMORY_FACTORS, mapping=learned)
        return views, running_by_executor

    def _executor_view(self, beat: ExecutorHeartbeat, held: list[JobSummary]) -> "_MadeView":
        """One executor's view, made again only when its heartbeat or one of its held jobs' summaries was read anew
        (the planner then also keeps the cohort's memory sums it made from the view)."""
        made = self.views.get(beat.executor_id)
        if made is not None and made.beat is beat and len(made.held) == len(held) and all(
                a is b for a, b in zip(made.held, held)):
            return made
        running, in_peak, base_bytes, cohort_key, pool_bytes = [], [], 0, None, beat.pool_bytes
        for job in held:
            plan = self.plans.get(job.job_id)
            if plan is None:
                continue  # its files vanished mid-run: the executor will fail it; plan around it meanwhile
            running.append(_running_job(job, plan, beat.auto_dtype))
            # A job only scheduled may not have reached the executor yet: the cohort's key is still its key
            # (the heartbeat's loaded base can lag behind), but its memory is not in the measured peak.
            cohort_key = plan.compat_key
            pool_bytes = max(pool_bytes, plan.size(beat.auto_dtype).pool_bytes)
            if beat.jobs.get(job.job_id) == job.attempt:  # the executor holds it: it is in the measured peak
                base_bytes = plan.size(beat.auto_dtype).base_bytes
                in_peak.append(running[-1])
        view = ExecutorView(
            executor_id=beat.executor_id, total_bytes=beat.total_bytes, free_bytes=beat.free_bytes,
            loaded_compat_key=cohort_key or beat.compat_key, loaded_base_bytes=beat.base_bytes,
            running=tuple(running), max_pass_tokens=beat.max_pass_tokens,
            dtypes=frozenset(beat.dtypes) or None, auto_dtype=beat.auto_dtype, pass_tokens=beat.pass_tokens,
            pool_bytes=pool_bytes, pool_allocated_bytes=beat.pool_bytes,
        )
        made = self.views[beat.executor_id] = _MadeView(beat, held, view, (base_bytes, in_peak))
        return made

    def _calibrate(self, beat: ExecutorHeartbeat, base_bytes: int, jobs: list[RunningJob]) -> bool:
        """Fold a new measured peak into its base's calibration: the prediction is for the passes the step really
        ran (`pass_tokens`), so the factor learns the model's error, not the executor's choice of pass size; the
        generation pool, allocated exactly as planned, is taken out of the peak (the factor calibrates estimates)."""
        predicted = base_bytes + cohort_bytes(jobs, beat.pass_tokens or None) if jobs else 0
        if self.calibrated_beats.get(beat.executor_id) == beat.heartbeat_at or not (
                beat.compat_key and beat.peak_bytes and predicted):
            return False
        self.calibrated_beats[beat.executor_id] = beat.heartbeat_at
        current = self.calibrations.get(beat.compat_key, MemoryCalibration())
        self.calibrations[beat.compat_key] = calibrate(current, max(1, beat.peak_bytes - beat.pool_bytes),
                                                       round(predicted))
        return True

    def _sync_backlog(self, fence: int) -> None:
        """Bring the backlog in step with the queue: only jobs that entered or left it since the last round are
        read (the queue's change index), or, on a new leader's first round, the whole queue's ids once. A job new
        to the queue is read once (its summary and stored plan) and turned into its planning record."""
        changes = None if self.queue_version is None else self.store.queue_changes(self.queue_version)
        if changes is None:
            self.queue_version, ids = self.store.queue_snapshot()
            queued = set(ids)
            left = [job_id for job_id in [*self.backlog.jobs, *self.suspects] if job_id not in queued]
            entered = [job_id for job_id in ids if job_id not in self.backlog and job_id not in self.suspects]
        else:
            self.queue_version, changed = changes
            left = [job_id for job_id, queued in changed.items() if not queued]
            entered = [job_id for job_id, queued in changed.items() if queued]
        for job_id in [*left, *entered]:  # one that left and came back (a requeue) is read again
            self.backlog.discard(job_id)
            self.suspects.pop(job_id, None)
        self._read_queued(entered, fence)

    def _read_queued(self, job_ids: list[str], fence: int) -> None:
        for job, stored in self.store.summaries_and_plans(job_ids):
            if job.state != JobState.QUEUED:
                continue  # it moved on since the queue was read
            plan = stored or self._size_from_files(job.job_id)
            if plan is None:
                self.store.fail(job.job_id, JobState.QUEUED, fence=fence, reason=FailureReason.SIZING,
                                error=f"job {job.job_id} failed: cannot size it: its base model or dataset is gone")
                continue
            if job.executor_losses:
                self.suspects[job.job_id] = _queued_job(job, plan)
            else:
                self.backlog.add(_queued_job(job, plan))

    def _claim(self, assignments: list, fence: int, now: float) -> None:
        """Claim every assignment in one round trip; a claim for an executor whose heartbeat is gone (it
        deregistered since the round read it: a drain hands its jobs back after deregistering) is refused."""
        attempts = self.store.claim_many([(a.job_id, a.executor_id) for a in assignments], fence=fence)
        for a, attempt in zip(assignments, attempts):
            self.held.pop(a.job_id, None)
            if attempt is None:
                continue
            job = self.backlog.discard(a.job_id) or self.suspects.pop(a.job_id, None)
            log.info("job %s -> executor %s (attempt %d)", a.job_id, a.executor_id, attempt)
            if self.metrics and job is not None:
                self.metrics.assignments.labels(tenant=job.tenant).inc()
                if job.queued_at:
                    self.metrics.queue_wait.labels(tenant=job.tenant).observe(max(0.0, now - job.queued_at))

    def _purge_expired(self, now: float) -> None:
        """Expire finished jobs older than the retention time, with their artifacts, a batch at a time; remove the
        bytes of deleted files and abandoned uploads (`FileStore.collect_garbage`)."""
        if now - self.last_purge < PURGE_EVERY_SECONDS:
            return
        self.last_purge = now
        if self.files is not None:
            self.files.collect_garbage(now)
        if self.retention_seconds is None:
            return
        removed = self.store.purge(now - self.retention_seconds, self._delete_artifacts, limit=100)
        if removed:
            log.info("expired %d finished jobs (retention %.0f s)", len(removed), self.retention_seconds)

    def _delete_artifacts(self, job: JobRecord) -> None:
        """A purged job's artifacts, and the files packed from them for download."""
        if self.artifacts is not None:
            self.artifacts.delete_job(job.tenant, job.job_id)
        if self.files is not None:
            self.files.forget_artifacts(job.tenant, [uri for uri in (job.adapter_uri, *job.checkpoints) if uri])

    def _export(self, alive, running_by_executor, tenant_records) -> None:
        """Gauges for Prometheus: at most every EXPORT_EVERY_SECONDS (the per-tenant counts cost a read each)."""
        self.metrics.executors_alive.set(len(alive))
        for kind, count in self.store.r.hgetall(keys.REJECTED_MESSAGES).items():
            self.metrics.rejected_messages.labels(kind=kind).set(int(count))
        for gone in self.exported_executors - {beat.executor_id for beat in alive}:  # a dead executor's series go
            self.metrics.cohort_jobs.remove(gone)
        self.exported_executors = {beat.executor_id for beat in alive}
        for beat in alive:
            self.metrics.cohort_jobs.labels(executor=beat.executor_id).set(
                len(running_by_executor.get(beat.executor_id, ())))
        counts = self.store.tenant_counts([t["name"] for t in tenant_records])
        for name, by_state in counts.items():
            for state, count in by_state.items():
                self.metrics.jobs.labels(tenant=name, state=state).set(count)
        for tenant in tenant_records:
            by_state = counts.get(tenant["name"], {})
            held = by_state.get(JobState.SCHEDULED.value, 0) + by_state.get(JobState.RUNNING.value, 0)
            for resource, used, limit in (("queued", by_state.get(JobState.QUEUED.value, 0), tenant["max_queued"]),
                                          ("running", held, tenant["max_running"])):
                self.metrics.quota_used.labels(tenant=tenant["name"], resource=resource).set(
                    used / limit if limit else 0.0)
        self.metrics.job_failures.set_all(self.store.failure_counts())
        self.metrics.tenant_gpu_seconds.set_all(self.store.gpu_seconds_total())
        self._export_generation_queued()

    def _export_generation_queued(self) -> None:
        """Requests waiting per base; a base whose queue went away loses its series."""
        waiting = queued_by_base(self.store.r)
        for gone in self.exported_bases - waiting.keys():
            self.metrics.generation_queued.remove(gone)
        self.exported_bases = set(waiting)
        for base, count in waiting.items():
            self.metrics.generation_queued.labels(base=base).set(count)


def main(metrics_port: int, interval: float, lock_ttl: float, packing: str, metrics_addr: str = "0.0.0.0") -> None:
    """Entry point of `lorafleet scheduler`."""
    configure_logging("scheduler")
    metrics, health = scheduler_metrics(), Health(STALL_SECONDS)
    port = serve(metrics.registry, metrics_port, metrics_addr, health)  # first: a taken port ends it at once
    store = JobStore.from_url(config.redis_url())
    store.ensure_schema()
    holder = f"{socket.gethostname()}-{os.getpid()}"
    log.info("scheduler %s: metrics on http://%s:%d/metrics (and /healthz, /readyz)", holder, metrics_addr, port)
    scheduler = Scheduler(store, holder, PlanConfig(packing=packing), lock_ttl=lock_ttl, interval=interval,
                          metrics=metrics, artifacts=ArtifactStore(config.artifact_root()),
                          retention_seconds=config.job_retention_seconds(),
                          files=FileStore(store.r, config.dataset_store(), FileLimits.from_env()), health=health)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: scheduler.stopping.set())
    scheduler.run()
