"""Scheduling policy: pure functions from a snapshot of the fleet to decisions. No Redis, no clocks, no randomness.

The scheduler service reads queued jobs, executors and tenants from Redis, calls `plan(...)`, and writes the
assignments back; the simulator (`lorafleet.scheduler.simulate`) calls the very same `plan`. See docs/SCHEDULING.md.

Memory is priced with `lorafleet.scheduler.memory` (the memory model, its one dtype rule and calibration factors).
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterable, Mapping, Optional, Sequence

from lorafleet.scheduler.memory import JobPlan, JobSize, _CohortMemory, cohort_bytes, effective_dtype

PACKINGS = ("optimal-fit", "fast-fit", "trivial")

USAGE_HALF_LIFE_SECONDS = 4 * 3600.0  # fair share forgets GPU time used this long ago by half


def decayed_usage(value: float, at: float, now: float, half_life: float = USAGE_HALF_LIFE_SECONDS) -> float:
    """GPU seconds `value` recorded at time `at`, as they count at `now` (exponential decay)."""
    return value * math.exp(-math.log(2) / half_life * max(0.0, now - at))


# --------------------------------------------------------------------------------------------------- plan inputs


_SHAPE_CLASSES: dict[tuple, int] = {}  # (key, dtype, need signature) -> `QueuedJob.shape_class`


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    tenant: str
    compat_key: str
    priority: int  # 0 lowest .. 9 highest, as in JobSpec
    submitted_at: float  # seconds, same clock as `now`
    est_gpu_seconds: float  # GPU time it needs (estimate_gpu_seconds), charged to its tenant's fair share
    tokens_per_step: int  # batch_size * max_seq_len
    job_bytes: int  # estimate_job_bytes(...), uncalibrated
    base_bytes: int  # estimate_base_bytes(...) of its base, uncalibrated
    activation_bytes: int = 0  # the part of job_bytes that is one micro-batch's activations (estimate_activation_bytes)
    max_seq_len: int = 0  # its longest sequence: a pass of an executor running in passes holds at least that
    dtype: str = "auto"  # JobSpec.dtype; "auto" runs anywhere (each executor picks what its device computes natively)
    # effective dtype -> size (`memory.JobPlan.sizes`): the size on each kind of executor; None: the fields above
    sizes: Optional[Mapping[str, JobSize]] = None
    queued_at: float = 0.0  # when it last entered the queue: its queue wait is measured from here (not planning)
    pool_bytes: int = 0  # the generation pool beside its base (`memory.JobSize.pool_bytes`): exact, never calibrated

    @cached_property
    def need_signature(self) -> tuple:
        """The parts of this job's size that what it needs of any slot grows with (`_Slot.need`, `_Slot.room`), in
        each dtype it may compute in: adapter state, activations, activations per token, base; its tokens, its
        longest sequence. Computed once per job (the scheduler keeps a queued job's record across rounds)."""
        sizes = [self.sizes[dtype] for dtype in sorted(self.sizes)] if self.sizes else [self]
        parts = []
        for size in sizes:
            per_token = size.activation_bytes / self.tokens_per_step if self.tokens_per_step else 0.0
            parts += [size.job_bytes - size.activation_bytes, size.activation_bytes, per_token, size.base_bytes,
                      size.pool_bytes]
        return (*parts, self.tokens_per_step, self.max_seq_len)

    @cached_property
    def least_added(self) -> tuple[int, int]:
        """The least this job can add to a cohort of its key, over the dtypes it may compute in: (on an executor in
        passes: its adapter state; on one without: its bytes)."""
        sizes = self.sizes.values() if self.sizes else (self,)
        return (min(s.job_bytes - s.activation_bytes for s in sizes), min(s.job_bytes for s in sizes))

    @cached_property
    def shape_class(self) -> int:
        """One small id for every job of this key, dtype and need signature: they need the same of every slot."""
        return _SHAPE_CLASSES.setdefault((self.compat_key, self.dtype, self.need_signature), len(_SHAPE_CLASSES))

    @classmethod
    def from_plan(cls, job_id: str, tenant: str, priority: int, submitted_at: float, plan: JobPlan,
                  queued_at: float = 0.0) -> "QueuedJob":
        """A job's planning record, from the plan decided at its submission."""
        bf16 = plan.size("bfloat16")
        return cls(job_id, tenant, plan.compat_key, priority, submitted_at, plan.est_gpu_seconds, plan.tokens_per_step,
                   bf16.job_bytes, bf16.base_bytes, bf16.activation_bytes, plan.max_seq_len, plan.dtype,
                   sizes=plan.sizes, queued_at=queued_at, pool_bytes=bf16.pool_bytes)

    def bytes_alone(self, device_auto_dtype: str, max_pass_tokens: Optional[int]) -> float:
        """Uncalibrated bytes of this job alone on an idle executor of that kind: its base and a cohort of one."""
        sized = self.on(device_auto_dtype)
        return sized.base_bytes + sized.pool_bytes + cohort_bytes([sized], max_pass_tokens)

    def on(self, device_auto_dtype: str) -> "QueuedJob":
        """This job as sized on a device whose `dtype: auto` computes in `device_auto_dtype`."""
        if self.sizes is None:
            return self
        size = self.sizes[effective_dtype(self.dtype, device_auto_dtype)]
        if (size.job_bytes, size.activation_bytes, size.base_bytes, size.pool_bytes) == (
                self.job_bytes, self.activation_bytes, self.base_bytes, self.pool_bytes):
            return self
        return replace(self, job_bytes=size.job_bytes, activation_bytes=size.activation_bytes,
                       base_bytes=size.base_bytes, pool_bytes=size.pool_bytes, sizes=None)

    def fixed_bytes(self, factor: float) -> float:
        """What a new cohort of this job holds whatever its jobs, calibrated: its base and the generation pool."""
        return self.base_bytes * factor + self.pool_bytes


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    tenant: str
    job_bytes: int
    tokens_per_step: int
    remaining_gpu_seconds: float = 0.0
    activation_bytes: int = 0
    max_seq_len: int = 0


@dataclass(frozen=True)
class ExecutorView:
    executor_id: str
    total_bytes: int
    free_bytes: int  # total minus the peak allocated over the last step, as the executor reports it
    loaded_compat_key: Optional[str] = None
    loaded_base_bytes: int = 0  # measured size of the loaded base
    running: tuple[RunningJob, ...] = ()  # the cohort; all of it shares loaded_compat_key
    alive: bool = True
    max_pass_tokens: Optional[int] = None  # the executor runs each step in passes of at most this many tokens
    dtypes: Optional[frozenset[str]] = None  # compute dtypes the device runs natively; None: not reported, any
    auto_dtype: str = "bfloat16"  # what `dtype: auto` computes in there (`memory.auto_dtype`)
    pass_tokens: int = 0  # tokens of the largest pass of its last step (0: not measured), as `peak` was measured
    # The generation pool beside its loaded base: reserved (the plan's, `memory.generation_pool_bytes`), counted as
    # used whether or not made yet; and of it what the executor reports allocated (in its measured memory).
    pool_bytes: int = 0
    pool_allocated_bytes: int = 0

    def runs(self, job: QueuedJob) -> bool:
        """Whether this executor's device computes in the job's dtype."""
        return job.dtype == "auto" or self.dtypes is None or job.dtype in self.dtypes

    @cached_property
    def cohort_memory(self) -> _CohortMemory:
        """Its cohort's memory sums, made once per view (the scheduler keeps a view while nothing in it changed)."""
        return _CohortMemory().add_all(self.running)


@dataclass(frozen=True)
class TenantView:
    name: str
    weight: float = 1.0
    max_running: Optional[int] = None
    running: int = 0  # jobs assigned or running now
    gpu_seconds: float = 0.0  # GPU time used so far (the service may decay it), cohort steps split by tokens


@dataclass(frozen=True)
class PlanConfig:
    packing: str = "optimal-fit"
    memory_fraction: float = 0.92  # of an executor's total bytes the planner may fill; the rest is slack
    max_cohort_jobs: int = 16
    target_cohort_tokens: int = 8192  # past this a step is compute-bound: join another cohort or an idle GPU first
    aging_seconds: float = 900.0  # waiting this long raises a job one priority level within its tenant
    reserve_after_seconds: float = 3600.0  # a job that waited this long and fits nowhere holds an executor back
    max_reservations: int = 4
    memory_factors: Mapping[str, float] = field(default_factory=dict)  # compat_key -> MemoryCalibration.factor

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"PlanConfig.packing must be one of {PACKINGS}, got {self.packing!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"PlanConfig.memory_fraction must be in (0, 1], got {self.memory_fraction}")
        for name in ("max_cohort_jobs", "target_cohort_tokens", "aging_seconds", "reserve_after_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PlanConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_reservations < 0:
            raise ValueError(f"PlanConfig.max_reservations must be >= 0, got {self.max_reservations}")


@dataclass(frozen=True)
class Assignment:
    job_id: str
    executor_id: str
    compat_key: str


# --------------------------------------------------------------------------------------------------- the backlog


def plan_order(job: QueuedJob, aging_seconds: float) -> tuple:
    """A job's place in its tenant's turn: priority raised one level per `aging_seconds` waited, then oldest first.
    priority + (now - submitted) / aging orders the same for every `now`, so this is its `now`-free part."""
    return (job.submitted_at / aging_seconds - job.priority, job.submitted_at, job.job_id)


class _TenantBacklog:
    """One tenant's queued jobs, in the two orders `plan` walks them, and what it sums over them."""

    __slots__ = ("in_turn", "by_age", "keys", "classes", "least")

    def __init__(self):
        self.in_turn: list[tuple] = []  # (*plan_order, job): the order the tenant's turns take its jobs
        self.by_age: list[tuple] = []  # (submitted_at, job_id, job): oldest first, for reservations
        self.keys: Counter[str] = Counter()  # compat key -> its jobs (a base's demand)
        self.classes: Counter[int] = Counter()  # `QueuedJob.shape_class` -> its jobs
        self.least: dict[str, Counter[tuple[int, int]]] = {}  # compat key -> `QueuedJob.least_added` -> its jobs

    def add(self, job: QueuedJob, order: tuple) -> None:
        bisect.insort(self.in_turn, (*order, job))
        bisect.insort(self.by_age, (job.submitted_at, job.job_id, job))
        self.keys[job.compat_key] += 1
        self.classes[job.shape_class] += 1
        if job.compat_key not in self.least:
            self.least[job.compat_key] = Counter()
        self.least[job.compat_key][job.least_added] += 1

    def remove(self, job: QueuedJob, order: tuple) -> None:
        del self.in_turn[bisect.bisect_left(self.in_turn, order)]
        del self.by_age[bisect.bisect_left(self.by_age, (job.submitted_at, job.job_id))]
        for counter, item in ((self.keys, job.compat_key), (self.classes, job.shape_class),
                              (self.least[job.compat_key], job.least_added)):
            counter[item] -= 1
            if not counter[item]:
                del counter[item]


class Backlog:
    """The queued jobs in the form `plan` reads them: each tenant's jobs already in turn order and oldest first, and
    what a round sums over them (demand per base, the least a job of each key adds, the shapes a tenant has).

    The scheduler keeps one between rounds and adds or removes only the jobs that entered or left the queue, so a
    round costs what changed, not the queue's length; `plan` also takes a plain list and builds one. The same jobs
    give the same backlog whatever order they were added and removed in."""

    def __init__(self, jobs: Iterable[QueuedJob] = (), aging_seconds: float = 900.0):
        self.aging_seconds = aging_seconds
        self.jobs: dict[str, QueuedJob] = {}
        self.tenants: dict[str, _TenantBacklog] = {}
        for job in jobs:
            self.add(job)

    def add(self, job: QueuedJob) -> None:
        if job.job_id in self.jobs:
            raise ValueError(f"queued jobs have duplicate job_id {job.job_id!r}")
        self.jobs[job.job_id] = job
        self.tenants.setdefault(job.tenant, _TenantBacklog()).add(job, plan_order(job, self.aging_seconds))

    def discard(self, job_id: str) -> Optional[QueuedJob]:
        """Remove a job; returns it, or None when it was not here."""
        job = self.jobs.pop(job_id, None)
        if job is not None:
            tenant = self.tenants[job.tenant]
            tenant.remove(job, plan_order(job, self.aging_seconds))
            if not tenant.in_turn:
                del self.tenants[job.tenant]
        return job

    def __len__(self) -> int:
        return len(self.jobs)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self.jobs


# --------------------------------------------------------------------------------------------------- plan


class _Slot:
    """One executor as the planner fills it during a round."""

    __slots__ = ("view", "usable", "key", "used", "foreign", "jobs", "tokens", "reserved", "passes", "cohort", "pool")

    def __init__(self, view: ExecutorView, memory_fraction: float, factors: Mapping[str, float]):
        self.view = view
        self.usable = int(view.total_bytes * memory_fraction)
        self.key = view.loaded_compat_key if view.running else None  # None: idle, may take any key
        self.passes = view.max_pass_tokens
        self.cohort = view.cohort_memory.copy()
        reported_used = view.total_bytes - view.free_bytes
        modelled_cohort = self.cohort.bytes(self.passes)
        # The peak was measured in passes of `view.pass_tokens` (an executor borrows free memory for larger passes
        # than planned): what those larger passes took is not in use at the planned pass size.
        measured_cohort = self.cohort.bytes(view.pass_tokens) if view.pass_tokens and self.passes else modelled_cohort
        self.pool = view.pool_bytes if view.loaded_compat_key is not None else 0
        if view.loaded_compat_key is None:
            self.used = reported_used
        else:
            factor = factors.get(view.loaded_compat_key, 1.0)
            self.used = max(view.loaded_base_bytes + self.pool + modelled_cohort * factor,
                            reported_used - (measured_cohort - modelled_cohort) * factor)
        # memory held by something other than our base, its generation pool and cohort (another process, fragments)
        self.foreign = max(0, reported_used - view.loaded_base_bytes - view.pool_allocated_bytes - measured_cohort)
        self.jobs = len(view.running)
        self.tokens = self.cohort.tokens
        self.reserved = False

    def _new_cohort(self, key: str) -> bool:
        return self.key is None and self.view.loaded_compat_key != key

    def room(self, key: str, base_bytes: float) -> float:
        """Bytes a job of `key` could still take here (negative: none)."""
        if self._new_cohort(key):
            return self.usable - self.foreign - base_bytes
        return self.usable - self.used

    def runs(self, job: QueuedJob) -> bool:
        return self.view.runs(job)

    def need(self, job: QueuedJob, factor: float) -> float:
        """Calibrated bytes `job` would add to what `room` counts: with passes, less than its own estimate; joining
        a loaded base, also the part of its generation pool not yet counted there (a view made before the pool was
        planned or made)."""
        if self._new_cohort(job.compat_key):
            return cohort_bytes([job], self.passes) * factor
        joined = (self.cohort.with_job(job).bytes(self.passes) - self.cohort.bytes(self.passes)) * factor
        return joined + max(0, job.pool_bytes - self.pool)

    def take(self, job: QueuedJob, factor: float, base_bytes: float) -> None:
        """Place `job` here; `base_bytes`: what a new cohort holds besides its jobs (`QueuedJob.fixed_bytes`)."""
        added = self.need(job, factor)
        if self._new_cohort(job.compat_key):
            self.used, self.cohort, self.pool = self.foreign + base_bytes, _CohortMemory(), 0
        self.pool = max(self.pool, job.pool_bytes)
        self.key = job.compat_key
        self.used += added
        self.cohort.add(job)
        self.jobs += 1
        self.tokens += job.tokens_per_step


def _fleet_full(tenants: list[_TenantBacklog], slots: list["_Slot"], config: PlanConfig) -> bool:
    """Whether no queued job can go anywhere: no executor is idle, and no cohort with a free place has room for the
    least any queued job of its key adds there (`QueuedJob.least_added`, calibrated). The common case under load,
    answered from the backlog's per-tenant sums (one entry per distinct job shape), before any sorting."""
    open_cohorts = [s for s in slots if s.key is None or s.jobs < config.max_cohort_jobs]
    if any(s.key is None for s in open_cohorts):
        return False
    least: dict[str, list[float]] = {s.key: [math.inf, math.inf] for s in open_cohorts}
    for tenant in tenants:
        for key, shapes in tenant.least.items():
            if key in least:
                best = least[key]
                for in_passes, whole in shapes:
                    best[0], best[1] = min(best[0], in_passes), min(best[1], whole)
    factors = config.memory_factors
    return all(s.room(s.key, 0) < least[s.key][0 if s.passes is not None else 1] * factors.get(s.key, 1.0)
               for s in open_cohorts)


def plan(
    queued: Backlog | Sequence[QueuedJob],
    executors: Sequence[ExecutorView],
    tenants: Mapping[str, TenantView] | Sequence[TenantView],
    now: float,
    config: PlanConfig = PlanConfig(),
    skip_tenants: frozenset[str] | set[str] = frozenset(),
) -> list[Assignment]:
    """Decide which queued jobs start where in this round. `queued`: a `Backlog` (kept between rounds) or a list;
    `skip_tenants`: tenants whose queued jobs wait this round (disabled).

    Tenants take turns by weighted fair share: the next job comes from the tenant with the least (GPU seconds used +
    seconds its running and just-assigned jobs still need) / weight, skipping tenants at their `max_running` quota.
    Within a tenant, jobs go by priority, each raised one level per `aging_seconds` waited, then by submission time.
    Each job goes to, in order of preference: an idle executor that already holds its base, a cohort of its key
    that is below `target_cohort_tokens`, an empty idle executor, an idle executor holding another base (prefer one
    whose base no queued job wants), then any cohort of its key with room. Within a class `packing` picks the
    executor: optimal-fit = tightest fit, fast-fit = first fit over executors smallest first, trivial = first fit in
    id order with no base affinity. An executor runs one compatibility key at a time and at most `max_cohort_jobs`.
    Before that loop, up to `max_reservations` jobs that have waited `reserve_after_seconds` are placed first (in
    fair-share order); one that fits nowhere reserves the executor where it would fit once drained, so small jobs
    backfilling every gap cannot starve a big one. Same inputs, same output.
    """
    tenant_views = dict(tenants) if isinstance(tenants, Mapping) else {t.name: t for t in tenants}
    for name, view in tenant_views.items():
        if view.weight <= 0:
            raise ValueError(f"tenant {name!r}: weight must be positive, got {view.weight}")
    if len({e.executor_id for e in executors}) != len(executors):
        raise ValueError("executors have duplicate executor_id")
    backlog = queued if isinstance(queued, Backlog) and queued.aging_seconds == config.aging_seconds \
        else Backlog(queued, config.aging_seconds)
    waiting = {name: tenant for name, tenant in backlog.tenants.items() if name not in skip_tenants}

    slots = [_Slot(e, config.memory_fraction, config.memory_factors)
             for e in sorted(executors, key=lambda e: e.executor_id) if e.alive]
    if config.packing == "fast-fit":
        slots.sort(key=lambda s: (s.view.total_bytes, s.view.executor_id))
    if not waiting or not slots or _fleet_full(list(waiting.values()), slots, config):
        return []
    demand: Counter[str] = Counter()
    for tenant in waiting.values():
        demand.update(tenant.keys)
    return _Round(slots, tenant_views, demand, config).run(waiting, now)


class _Round:
    """One round's placements: the slots as they fill, each tenant's share as it grows, the assignments so far."""

    def __init__(self, slots: list[_Slot], tenant_views: dict[str, TenantView], demand: Mapping[str, int],
                 config: PlanConfig):
        self.slots, self.tenant_views, self.demand, self.config = slots, tenant_views, demand, config
        self.factors = config.memory_factors
        self.order = {id(s): i for i, s in enumerate(slots)}
        self.idle_by_loaded: dict[Optional[str], list[_Slot]] = {}
        self.cohorts: dict[str, list[_Slot]] = {}
        for slot in slots:
            if slot.key is None:
                self.idle_by_loaded.setdefault(slot.view.loaded_compat_key, []).append(slot)
            else:
                self.cohorts.setdefault(slot.key, []).append(slot)
        self.assignments: list[Assignment] = []
        self.running_now = {name: view.running for name, view in tenant_views.items()}
        self.charged: dict[str, float] = {}  # tenant -> seconds of work its running and newly placed jobs still need
        for slot in slots:
            for job in slot.view.running:
                self.charged[job.tenant] = self.charged.get(job.tenant, 0.0) + job.remaining_gpu_seconds

    def run(self, waiting: dict[str, _TenantBacklog], now: float) -> list[Assignment]:
        placed_early = self._reserve_overdue(waiting, now)
        self._fair_share_turns(waiting, placed_early)
        return self.assignments

    # ---- where a job goes ----

    def _first_or_best(self, candidates, job: QueuedJob, factor: float, best_fit: bool) -> Optional[_Slot]:
        best, best_left = None, None
        for slot in candidates:
            if slot.reserved or slot.jobs >= self.config.max_cohort_jobs or not slot.runs(job):
                continue
            sized = job.on(slot.view.auto_dtype)
            left = slot.room(job.compat_key, sized.fixed_bytes(factor)) - slot.need(sized, factor)
            if left < 0:
                continue
            if not best_fit:
                return slot
            if best is None or left < best_left:
                best, best_left = slot, left
        return best

    def place(self, job: QueuedJob) -> Optional[_Slot]:
        key, config = job.compat_key, self.config
        factor = self.factors.get(key, 1.0)
        if config.packing == "trivial":
            candidates = (s for s in self.slots if s.key is None or s.key == key)
            return self._first_or_best(candidates, job, factor, best_fit=False)
        best_fit = config.packing == "optimal-fit"
        mine = self.cohorts.get(key, ())
        target = config.target_cohort_tokens
        idle = self.idle_by_loaded
        other_bases = sorted((loaded for loaded in idle if loaded not in (None, key)),
                             key=lambda loaded: (self.demand.get(loaded, 0) > 0, loaded))
        classes = (
            idle.get(key, ()),
            (s for s in mine if s.tokens < target),
            idle.get(None, ()),
            [s for loaded in other_bases for s in idle[loaded]],
            (s for s in mine if s.tokens >= target),
        )
        for candidates in classes:
            slot = self._first_or_best(candidates, job, factor, best_fit)
            if slot is not None:
                return slot
        return None

    def commit(self, job: QueuedJob, slot: _Slot) -> None:
        key = job.compat_key
        if slot.key is None:
            self.idle_by_loaded[slot.view.loaded_compat_key].remove(slot)
            bisect.insort(self.cohorts.setdefault(key, []), slot, key=lambda s: self.order[id(s)])
        sized = job.on(slot.view.auto_dtype)
        factor = self.factors.get(key, 1.0)
        slot.take(sized, factor, sized.fixed_bytes(factor))
        self.assignments.append(Assignment(job.job_id, slot.view.executor_id, key))
        self.running_now[job.tenant] = self.running_now.get(job.tenant, 0) + 1
        self.charged[job.tenant] = self.charged.get(job.tenant, 0.0) + job.est_gpu_seconds

    # ---- whose turn ----

    def at_quota(self, name: str) -> bool:
        view = self.tenant_views.get(name)
        return view is not None and view.max_running is not None and self.running_now.get(name, 0) >= view.max_running

    def share_used(self, name: str) -> float:
        view = self.tenant_views.get(name) or TenantView(name=name)
        return (view.gpu_seconds + self.charged.get(name, 0.0)) / view.weight

    def _reserve_overdue(self, waiting: dict[str, _TenantBacklog], now: float) -> set[str]:
        """A few overdue jobs (waited reserve_after_seconds) go before the fair-share turns, in fair-share order and
        then oldest first; one that fits nowhere holds back the executor where it would fit once drained, so small
        jobs backfilling every gap cannot starve a big one. Under overload every job is overdue and this stays fair.
        Only each tenant's oldest `max_reservations` can be among the first `max_reservations` (a tenant's jobs
        share its usage), so only those are looked at."""
        config, reservations = self.config, self.config.max_reservations
        overdue = []
        for name, tenant in waiting.items():
            for submitted_at, _, job in tenant.by_age[:reservations]:
                if now - submitted_at < config.reserve_after_seconds:
                    break
                overdue.append(job)
        usage_now = {job.tenant: self.share_used(job.tenant) for job in overdue}
        placed = set()
        for job in heapq.nsmallest(reservations, overdue,
                                   key=lambda j: (usage_now[j.tenant], j.submitted_at, j.job_id)):
            if self.at_quota(job.tenant):
                continue
            slot = self.place(job)
            if slot is not None:
                self.commit(job, slot)
                placed.add(job.job_id)
                continue
            factor = self.factors.get(job.compat_key, 1.0)
            could_fit = [s for s in self.slots if not s.reserved and s.runs(job) and s.usable - s.foreign
                         >= job.bytes_alone(s.view.auto_dtype, s.passes) * factor]
            if could_fit:
                min(could_fit, key=lambda s: (s.key != job.compat_key, -s.view.total_bytes, s.view.executor_id)
                    ).reserved = True
        return placed

    def _fair_share_turns(self, waiting: dict[str, _TenantBacklog], placed_early: set[str]) -> None:
        """Tenants take turns, least share used first, each turn placing the tenant's next job that fits.

        Room only shrinks within a round, and what a job needs of a slot grows with each part of its size
        (`QueuedJob.need_signature`), so a job no smaller in any part than one of its key and dtype that fit nowhere
        fits nowhere either: skipped without trying the slots. With equal jobs a full fleet costs one try per key,
        and a tenant all of whose shapes failed is passed over without walking its jobs."""
        heap = [(self.share_used(name), name, 0) for name in waiting if not self.at_quota(name)]
        heapq.heapify(heap)
        failures: dict[tuple[str, str], list[tuple]] = {}
        failed_classes: set[int] = set()  # `shape_class` of every failure: the common case is one int lookup
        while heap:
            _, name, cursor = heapq.heappop(heap)
            tenant = waiting[name]
            if failed_classes.issuperset(tenant.classes):
                continue
            jobs = tenant.in_turn
            while cursor < len(jobs):
                job = jobs[cursor][-1]
                cursor += 1
                if job.shape_class in failed_classes or job.job_id in placed_early:
                    continue
                signature, kind = job.need_signature, (job.compat_key, job.dtype)
                if any(all(mine >= theirs for mine, theirs in zip(signature, other))
                       for other in failures.get(kind, ())):
                    failed_classes.add(job.shape_class)
                    continue
                slot = self.place(job)
                if slot is None:
                    failed_classes.add(job.shape_class)
                    if len(failures.setdefault(kind, [])) < 4:  # a few shapes per key: bounded for adversarial queues
                        failures[kind].append(signature)
                    continue
                self.commit(job, slot)
                if cursor < len(jobs) and not self.at_quota(name):
                    heapq.heappush(heap, (self.share_used(name), name, cursor))
                break
