"""Discrete-event simulation of a fleet driven by `policy.plan` (or a FIFO one-job-per-GPU baseline).

Everything here is a model; docs/SCHEDULING.md states its assumptions. The parts that matter:

Cohort step time on one GPU, for a cohort of n jobs with T tokens per step in total, base with P parameters:
    t = (A * sqrt(P / 8e9) + B * (P / 8e9) * q * T) / speed + C * n
A = 0.126 s fixed per-step cost, B = 8.33e-5 s/token, C = 2 ms per adapter (its optimizer step and kernel
segment), q = 1.3 for nf4 / 1.15 for int8 dequantisation, speed = GPU class relative to an H100. A and B are
solved from the developers' guide numbers for an 8B base on one H100: 4x512 tokens with PEFT alone = 6.9k tok/s,
and a compute-bound ceiling of 13.8k tok/s for the bare base, less 15% for the LoRA matmuls (1/B = 12k tok/s). So a
step's time grows sublinearly in tokens: one 2048-token job gets 6.9k tok/s, a 8192-token cohort 10.9k tok/s.
Loading a base: 5 s + bytes / 2 GB/s. Every job does one optimizer step per cohort step (fluid: between events the
cohort does not change, so each job's remaining steps fall linearly). A cohort step's GPU time is split between
its jobs by their tokens; that is the "GPU share" fairness is measured on.

Memory: each base has a true footprint factor (1.00-1.20) over the planner's estimate, unknown to the planner. An
executor reports its true usage; the planner calibrates from it (`policy.calibrate`). A cohort whose true memory
exceeds the device evicts its newest jobs back to the queue (counted as OOMs).
"""

from __future__ import annotations

import heapq
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from typing import Optional

from lorafleet.scheduler.memory import MemoryCalibration, ModelShape, calibrate, estimate_base_bytes, estimate_job_bytes
from lorafleet.scheduler.policy import (
    Assignment,
    ExecutorView,
    PlanConfig,
    QueuedJob,
    RunningJob,
    TenantView,
    USAGE_HALF_LIFE_SECONDS,
    decayed_usage,
    plan,
)

GiB = 1024**3
STEP_FIXED_S = 0.126
STEP_PER_TOKEN_S = 8.33e-5
STEP_PER_ADAPTER_S = 0.002
QUANT_COMPUTE_FACTOR = {"none": 1.0, "nf4": 1.3, "int8": 1.15}
LOAD_FIXED_S = 5.0
LOAD_BYTES_PER_S = 2e9
STRATEGIES = ("optimal-fit", "fast-fit", "trivial", "fifo")


@dataclass(frozen=True)
class SimBase:
    key: str
    shape: ModelShape
    quantization: str
    true_memory_factor: float
    max_tokens_per_step: int  # jobs on this base use micro-batches up to this size

    @property
    def params(self) -> int:
        return self.shape.num_params()

    @property
    def est_base_bytes(self) -> int:
        return estimate_base_bytes(self.params, self.quantization, "bfloat16")


@dataclass(frozen=True)
class GpuClass:
    name: str
    total_bytes: int
    speed: float  # compute relative to an H100


BASES = (
    SimBase("qwen2-1.5b||none|bfloat16", ModelShape(1536, 8960, 28, 12, 2, 151936), "none", 1.10, 8192),
    SimBase("llama3-8b||none|bfloat16", ModelShape(4096, 14336, 32, 32, 8, 128256), "none", 1.15, 4096),
    SimBase("llama3-8b||nf4|bfloat16", ModelShape(4096, 14336, 32, 32, 8, 128256), "nf4", 1.20, 4096),
    SimBase("mistral-7b||none|bfloat16", ModelShape(4096, 14336, 32, 32, 8, 32768), "none", 1.05, 4096),
    SimBase("llama3-70b||nf4|bfloat16", ModelShape(8192, 28672, 80, 64, 8, 128256), "nf4", 1.10, 1024),
)
BASE_POPULARITY = (0.30, 0.30, 0.15, 0.20, 0.05)
GPU_CLASSES = (GpuClass("24GB", 24 * GiB, 0.30), GpuClass("48GB", 48 * GiB, 0.50), GpuClass("80GB", 80 * GiB, 1.0))
GPU_MIX = (0.3, 0.3, 0.4)


def step_seconds(base: SimBase, gpu: GpuClass, total_tokens: int, num_jobs: int) -> float:
    scale = base.params / 8e9
    compute = STEP_FIXED_S * math.sqrt(scale) + STEP_PER_TOKEN_S * scale * QUANT_COMPUTE_FACTOR[base.quantization] \
        * total_tokens
    return compute / gpu.speed + STEP_PER_ADAPTER_S * num_jobs


def saturated_tokens_per_second(base: SimBase, gpu: GpuClass) -> float:
    return gpu.speed / (STEP_PER_TOKEN_S * base.params / 8e9 * QUANT_COMPUTE_FACTOR[base.quantization])


def load_seconds(base: SimBase) -> float:
    return LOAD_FIXED_S + base.est_base_bytes * base.true_memory_factor / LOAD_BYTES_PER_S


# --------------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class SimJob:
    job: QueuedJob
    base: SimBase
    true_bytes: int
    steps: int


def make_workload(num_jobs: int, num_tenants: int, num_executors: int, seed: int, load: float
                  ) -> tuple[list[SimJob], dict[str, TenantView], list[tuple[str, GpuClass]]]:
    """Skewed tenants (Zipf job counts, weights 1/2/4), log-normal job sizes, per-tenant bursts of arrivals."""
    rng = random.Random(seed)
    gpus = [(f"gpu{i:03d}", rng.choices(GPU_CLASSES, GPU_MIX)[0]) for i in range(num_executors)]
    tenants = {f"t{i:03d}": TenantView(f"t{i:03d}", weight=rng.choice((1.0, 1.0, 1.0, 2.0, 4.0)))
               for i in range(num_tenants)}
    names = list(tenants)
    zipf = [1 / (rank + 1) ** 0.9 for rank in range(num_tenants)]
    owners = rng.choices(names, zipf, k=num_jobs)
    per_tenant: dict[str, list[int]] = {}
    for index, owner in enumerate(owners):
        per_tenant.setdefault(owner, []).append(index)

    largest = max(gpu.total_bytes for _, gpu in gpus)
    fastest = max(GPU_CLASSES, key=lambda g: g.speed)
    bases = [b for b in BASES if (b.est_base_bytes + estimate_job_bytes(b.shape, 8, ("q_proj",), 1, 512, "bfloat16"))
             * b.true_memory_factor < 0.85 * largest]
    popularity = [p for b, p in zip(BASES, BASE_POPULARITY) if b in bases]
    favourite = {name: rng.choices(bases, popularity)[0] for name in names}
    specs = []
    for index, owner in enumerate(owners):
        base = favourite[owner] if rng.random() < 0.8 else rng.choices(bases, popularity)[0]
        while True:  # a tenant's spec that fits no GPU would be refused at submission; draw again
            seq = rng.choice((512, 512, 1024, 2048))
            batch = max(1, min(rng.choice((1, 2, 4, 4, 8)), base.max_tokens_per_step // seq))
            seq = min(seq, base.max_tokens_per_step)
            r = rng.choice((8, 16, 16, 32, 64))
            modules = rng.choice((("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                                  ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
            job_bytes = estimate_job_bytes(base.shape, r, modules, batch, seq, "bfloat16")
            if (job_bytes + base.est_base_bytes) * base.true_memory_factor < 0.85 * largest:
                break
        # bigger bases get smaller datasets, as in practice; sizes stay log-normal (a few huge jobs)
        median = 1.5e6 * math.sqrt(8e9 / base.params)
        tokens = int(min(30 * median, max(5e4, rng.lognormvariate(math.log(median), 1.2))))
        priority = rng.choices((2, 5, 8), (0.15, 0.7, 0.15))[0]
        specs.append((owner, base, batch * seq, job_bytes, tokens, priority))

    # arrival span chosen so the offered work is `load` times what the fleet can do at a 8192-token cohort size
    fleet_rate = sum(8192 / step_seconds(BASES[1], gpu, 8192, 4) for _, gpu in gpus)
    span = sum(s[4] for s in specs) / (fleet_rate * load)
    arrivals = [0.0] * num_jobs
    for owner, indices in per_tenant.items():
        cursor = 0
        while cursor < len(indices):
            burst = indices[cursor:cursor + max(1, int(rng.expovariate(1 / 12)))]
            start = rng.uniform(0, span)
            for offset, index in enumerate(burst):
                arrivals[index] = start + offset * rng.expovariate(1 / 20)
            cursor += len(burst)

    jobs = []
    for index, (owner, base, tokens_per_step, job_bytes, tokens, priority) in enumerate(specs):
        # the service would measure tokens per GPU-second per base; here: an 8k-token cohort on the fastest GPU
        gpu_seconds = tokens * step_seconds(base, fastest, 8192, 4) / 8192
        job = QueuedJob(f"j{index:05d}", owner, base.key, priority, arrivals[index], gpu_seconds, tokens_per_step,
                        job_bytes, base.est_base_bytes)
        jobs.append(SimJob(job, base, int(job_bytes * base.true_memory_factor),
                           max(1, math.ceil(tokens / tokens_per_step))))
    jobs.sort(key=lambda j: (j.job.submitted_at, j.job.job_id))
    return jobs, tenants, gpus


# --------------------------------------------------------------------------------------------------- baseline


def plan_fifo(queued, executors, config: PlanConfig):
    """Baseline: one job per GPU, oldest job first, onto an idle GPU that holds its base, else the first idle fit."""
    idle = [e for e in sorted(executors, key=lambda e: e.executor_id) if e.alive and not e.running]
    assignments = []
    for job in sorted(queued, key=lambda j: (j.submitted_at, j.job_id)):
        if not idle:
            break
        factor = config.memory_factors.get(job.compat_key, 1.0)
        need = (job.job_bytes + job.base_bytes) * factor
        fits = [e for e in idle if e.total_bytes * config.memory_fraction >= need]
        if not fits:
            continue
        chosen = next((e for e in fits if e.loaded_compat_key == job.compat_key), fits[0])
        idle.remove(chosen)
        assignments.append(Assignment(job.job_id, chosen.executor_id, job.compat_key))
    return assignments


# --------------------------------------------------------------------------------------------------- engine


class _Executor:
    def __init__(self, executor_id: str, gpu: GpuClass):
        self.executor_id = executor_id
        self.gpu = gpu
        self.base: Optional[SimBase] = None
        self.ready_at = 0.0
        self.updated_at = 0.0
        self.cohort: dict[str, float] = {}  # job_id -> remaining steps
        self.version = 0

    def true_used(self, jobs: dict[str, SimJob]) -> int:
        if self.base is None:
            return 0
        return int(self.base.est_base_bytes * self.base.true_memory_factor) + sum(
            jobs[j].true_bytes for j in self.cohort)


class _DecayingUsage:
    def __init__(self, half_life: float):
        self.half_life = half_life
        self.value: dict[str, tuple[float, float]] = {}

    def add(self, tenant: str, seconds: float, now: float) -> None:
        self.value[tenant] = (self.get(tenant, now) + seconds, now)

    def get(self, tenant: str, now: float) -> float:
        value, at = self.value.get(tenant, (0.0, now))
        return decayed_usage(value, at, now, self.half_life)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _jain(values: list[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


def simulate(jobs: list[SimJob], tenants: dict[str, TenantView], gpus: list[tuple[str, GpuClass]], strategy: str,
             plan_interval_s: float = 30.0, fairness_window_s: float = 3600.0,
             usage_half_life_s: float = USAGE_HALF_LIFE_SECONDS) -> dict:
    """Run one strategy ("fifo" or a `PlanConfig.packing`) over a workload; return its metrics."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    config = PlanConfig(packing="optimal-fit" if strategy == "fifo" else strategy)
    planner = plan_fifo if strategy == "fifo" else None
    by_id = {j.job.job_id: j for j in jobs}
    executors = {eid: _Executor(eid, gpu) for eid, gpu in gpus}
    calibration: dict[str, MemoryCalibration] = {}
    usage = _DecayingUsage(usage_half_life_s)
    queued: dict[str, QueuedJob] = {}
    running_count: dict[str, int] = {name: 0 for name in tenants}
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    window_gpu: dict[int, dict[str, float]] = {}
    window_backlogged: dict[int, set[str]] = {}
    first_arrival = min(j.job.submitted_at for j in jobs)
    last_arrival = max(j.job.submitted_at for j in jobs)
    busy_seconds = 0.0
    compute_seconds = 0.0  # busy time weighted by achieved / saturated throughput
    tokens_done = 0.0
    loads = reloads = ooms = 0
    plan_times: list[float] = []
    plan_queue_sizes: list[int] = []

    events: list = []
    seq = 0

    def push(at: float, kind: str, payload) -> None:
        nonlocal seq
        heapq.heappush(events, (at, seq, kind, payload))
        seq += 1

    def attribute(tenant: str, start: float, end: float, share: float) -> None:
        while start < end:
            window = int(start // fairness_window_s)
            cut = min(end, (window + 1) * fairness_window_s)
            bucket = window_gpu.setdefault(window, {})
            bucket[tenant] = bucket.get(tenant, 0.0) + (cut - start) * share
            start = cut

    def advance(executor: _Executor, now: float) -> None:
        nonlocal busy_seconds, compute_seconds, tokens_done
        start = max(executor.updated_at, executor.ready_at)
        executor.updated_at = now
        if not executor.cohort or now <= start:
            return
        members = [by_id[j] for j in executor.cohort]
        total_tokens = sum(m.job.tokens_per_step for m in members)
        step = step_seconds(executor.base, executor.gpu, total_tokens, len(members))
        steps = (now - start) / step
        for member in members:
            executor.cohort[member.job.job_id] -= steps
            share = member.job.tokens_per_step / total_tokens
            usage.add(member.job.tenant, (now - start) * share, now)
            attribute(member.job.tenant, start, now, share)
        rate = total_tokens / step
        tokens_done += rate * (now - start)
        offered = max(0.0, min(now, last_arrival) - max(start, first_arrival))  # utilisation counts this window
        busy_seconds += offered
        compute_seconds += offered * rate / saturated_tokens_per_second(executor.base, executor.gpu)

    def schedule_completion(executor: _Executor, now: float) -> None:
        executor.version += 1
        if not executor.cohort:
            return
        total_tokens = sum(by_id[j].job.tokens_per_step for j in executor.cohort)
        step = step_seconds(executor.base, executor.gpu, total_tokens, len(executor.cohort))
        at = max(now, executor.ready_at) + max(0.0, min(executor.cohort.values())) * step
        push(at, "tick", (executor.executor_id, executor.version))

    plan_pending = False
    last_plan = -math.inf

    def request_plan(now: float) -> None:
        nonlocal plan_pending
        if not plan_pending:
            plan_pending = True
            push(max(now, last_plan + plan_interval_s), "plan", None)

    def views(now: float) -> list[ExecutorView]:
        result = []
        for executor in executors.values():
            running = []
            for job_id, remaining in executor.cohort.items():
                job = by_id[job_id].job
                running.append(RunningJob(job_id, job.tenant, job.job_bytes, job.tokens_per_step,
                                          max(0.0, remaining) / by_id[job_id].steps * job.est_gpu_seconds))
            base = executor.base
            result.append(ExecutorView(
                executor.executor_id, executor.gpu.total_bytes,
                executor.gpu.total_bytes - executor.true_used(by_id),
                base.key if base else None,
                int(base.est_base_bytes * base.true_memory_factor) if base else 0,
                tuple(running)))
        return result

    def run_plan(now: float) -> None:
        nonlocal loads, reloads, ooms, last_plan
        last_plan = now
        tenant_views = {name: replace(view, running=running_count[name], gpu_seconds=usage.get(name, now))
                        for name, view in tenants.items()}
        config_now = replace(config, memory_factors={k: c.factor for k, c in calibration.items()})
        queue = list(queued.values())
        began = time.perf_counter()
        if planner is not None:
            decisions = planner(queue, views(now), config_now)
        else:
            decisions = plan(queue, views(now), tenant_views, now, config_now)
        plan_times.append(time.perf_counter() - began)
        plan_queue_sizes.append(len(queue))
        window = int(now // fairness_window_s)
        waiting = {job.tenant for job in queue}
        window_backlogged[window] = window_backlogged[window] & waiting if window in window_backlogged else waiting

        touched: dict[str, list[str]] = {}
        for decision in decisions:
            sim_job = by_id[decision.job_id]
            executor = executors[decision.executor_id]
            advance(executor, now)
            if not executor.cohort and (executor.base is None or executor.base.key != sim_job.base.key):
                loads += 1
                reloads += executor.base is not None
                executor.base = sim_job.base
                executor.ready_at = now + load_seconds(sim_job.base)
            elif executor.base.key != sim_job.base.key:
                raise AssertionError(f"plan put {decision.job_id} into a cohort of another base")
            executor.cohort[decision.job_id] = float(sim_job.steps)  # evicted jobs had not stepped yet
            del queued[decision.job_id]
            running_count[sim_job.job.tenant] += 1
            started.setdefault(decision.job_id, now)
            touched.setdefault(decision.executor_id, []).append(decision.job_id)
        for executor_id, joined in touched.items():
            executor = executors[executor_id]
            while executor.true_used(by_id) > executor.gpu.total_bytes and joined:
                evicted = joined.pop()
                del executor.cohort[evicted]
                queued[evicted] = by_id[evicted].job
                running_count[by_id[evicted].job.tenant] -= 1
                ooms += 1
                request_plan(now)
            if executor.cohort:
                predicted = executor.base.est_base_bytes + sum(by_id[j].job.job_bytes for j in executor.cohort)
                key = executor.base.key
                calibration[key] = calibrate(calibration.get(key, MemoryCalibration()),
                                             executor.true_used(by_id), predicted)
            schedule_completion(executor, now)

    for sim_job in jobs:
        push(sim_job.job.submitted_at, "arrive", sim_job.job.job_id)
    now = 0.0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            queued[payload] = by_id[payload].job
            request_plan(now)
        elif kind == "plan":
            plan_pending = False
            run_plan(now)
        else:
            executor_id, version = payload
            executor = executors[executor_id]
            if version != executor.version:
                continue
            advance(executor, now)
            for job_id in [j for j, remaining in executor.cohort.items() if remaining <= 1e-6]:
                del executor.cohort[job_id]
                finished[job_id] = now
                running_count[by_id[job_id].job.tenant] -= 1
            schedule_completion(executor, now)
            request_plan(now)
        if not events and queued:
            raise RuntimeError(f"{len(queued)} jobs can never be placed (e.g. {next(iter(queued))})")

    makespan = max(finished.values()) - first_arrival
    completion = [finished[j.job.job_id] - j.job.submitted_at for j in jobs]
    waits = [started[j.job.job_id] - j.job.submitted_at for j in jobs]
    jains = []
    for window, backlogged in window_backlogged.items():
        received = window_gpu.get(window, {})
        shares = [received.get(name, 0.0) / tenants[name].weight for name in backlogged]
        if len(shares) >= 2:
            jains.append(_jain(shares))
    fleet_seconds = (last_arrival - first_arrival) * len(executors)
    return {
        "strategy": strategy,
        "jobs_completed": len(finished),
        "makespan_hours": makespan / 3600,
        "gpu_busy": busy_seconds / fleet_seconds,
        "gpu_utilisation": compute_seconds / fleet_seconds,
        "tokens_per_second": tokens_done / makespan,
        "jct_mean_s": statistics.fmean(completion),
        "jct_p95_s": _percentile(completion, 0.95),
        "wait_mean_s": statistics.fmean(waits),
        "wait_p95_s": _percentile(waits, 0.95),
        "jain_backlogged": statistics.fmean(jains) if jains else 1.0,
        "base_loads": loads,
        "base_reloads": reloads,
        "oom_evictions": ooms,
        "calibration_error_max": max((abs(calibration[b.key].factor - b.true_memory_factor) / b.true_memory_factor
                                      for b in {j.base for j in jobs} if b.key in calibration), default=0.0),
        "plan_rounds": len(plan_times),
        "plan_ms_median": 1000 * statistics.median(plan_times),
        "plan_ms_p95": 1000 * _percentile(plan_times, 0.95),
        "plan_max_queue": max(plan_queue_sizes),
    }


def measure_decision_time(num_queued: int = 10_000, num_executors: int = 100, num_tenants: int = 200,
                          rounds: int = 50, seed: int = 0, packing: str = "optimal-fit") -> dict:
    """Time `plan` with `num_queued` jobs waiting while cohorts finish between rounds (the first round is an idle
    fleet: the most assignments one round ever makes)."""
    rng = random.Random(seed)
    sim_jobs, tenants, gpus = make_workload(num_queued, num_tenants, num_executors, seed, load=1.0)
    by_id = {j.job.job_id: j for j in sim_jobs}
    config = PlanConfig(packing=packing)
    queued = {j.job.job_id: j.job for j in sim_jobs}
    now = max(j.job.submitted_at for j in sim_jobs)
    cohorts: dict[str, list[str]] = {eid: [] for eid, _ in gpus}
    loaded: dict[str, Optional[SimBase]] = {eid: None for eid, _ in gpus}
    durations = []
    assigned = 0
    for _ in range(rounds):
        executor_views = []
        for eid, gpu in gpus:
            base = loaded[eid]
            members = [by_id[j] for j in cohorts[eid]]
            used = (int(base.est_base_bytes * base.true_memory_factor) if base else 0) + sum(
                m.true_bytes for m in members)
            executor_views.append(ExecutorView(
                eid, gpu.total_bytes, gpu.total_bytes - used, base.key if base else None,
                int(base.est_base_bytes * base.true_memory_factor) if base else 0,
                tuple(RunningJob(m.job.job_id, m.job.tenant, m.job.job_bytes, m.job.tokens_per_step,
                                 m.job.est_gpu_seconds) for m in members)))
        queue = list(queued.values())
        began = time.perf_counter()
        decisions = plan(queue, executor_views, tenants, now, config)
        durations.append(time.perf_counter() - began)
        for decision in decisions:
            cohorts[decision.executor_id].append(decision.job_id)
            loaded[decision.executor_id] = by_id[decision.job_id].base
            del queued[decision.job_id]
        assigned += len(decisions)
        for eid in cohorts:  # between rounds about a tenth of running jobs finish
            cohorts[eid] = [j for j in cohorts[eid] if rng.random() > 0.1]
        now += 30.0
    return {
        "queued": num_queued,
        "executors": num_executors,
        "rounds": rounds,
        "first_round_ms": 1000 * durations[0],
        "median_ms": 1000 * statistics.median(durations),
        "p95_ms": 1000 * _percentile(durations, 0.95),
        "max_ms": 1000 * max(durations),
        "assigned": assigned,
    }


def run_simulation(num_jobs: int = 10_000, num_tenants: int = 200, num_executors: int = 100, seed: int = 0,
                   load: float = 0.9, strategies: tuple[str, ...] = STRATEGIES, plan_interval_s: float = 30.0,
                   decision_rounds: int = 50) -> dict:
    """Simulate each strategy on the same workload and time the planner; a JSON-able dict of all numbers."""
    if num_jobs < 1 or num_tenants < 1 or num_executors < 1:
        raise ValueError("num_jobs, num_tenants and num_executors must be positive")
    if load <= 0:
        raise ValueError(f"load must be positive, got {load}")
    jobs, tenants, gpus = make_workload(num_jobs, num_tenants, num_executors, seed, load)
    result = {
        "workload": {"jobs": num_jobs, "tenants": num_tenants, "executors": num_executors, "seed": seed,
                     "load": load, "gpus": {g.name: sum(1 for _, x in gpus if x is g) for g in GPU_CLASSES}},
        "strategies": {s: simulate(jobs, tenants, gpus, s, plan_interval_s=plan_interval_s) for s in strategies},
    }
    if decision_rounds:
        result["decision_time"] = measure_decision_time(num_jobs, num_executors, num_tenants, decision_rounds, seed)
    return result


COLUMNS = (
    ("strategy", "strategy", "{}"),
    ("gpu_utilisation", "util", "{:.1%}"),
    ("gpu_busy", "busy", "{:.1%}"),
    ("tokens_per_second", "tok/s", "{:,.0f}"),
    ("makespan_hours", "makespan h", "{:.1f}"),
    ("jct_mean_s", "JCT mean s", "{:,.0f}"),
    ("jct_p95_s", "JCT p95 s", "{:,.0f}"),
    ("wait_mean_s", "wait mean s", "{:,.0f}"),
    ("wait_p95_s", "wait p95 s", "{:,.0f}"),
    ("jain_backlogged", "Jain", "{:.3f}"),
    ("base_loads", "base loads", "{}"),
    ("base_reloads", "reloads", "{}"),
    ("oom_evictions", "OOMs", "{}"),
    ("plan_ms_median", "plan ms p50", "{:.2f}"),
    ("plan_ms_p95", "plan ms p95", "{:.2f}"),
)


def format_table(result: dict) -> str:
    """A Markdown table of the strategies plus one line of decision time."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for metrics in result["strategies"].values():
        lines.append("| " + " | ".join(fmt.format(metrics[key]) for key, _, fmt in COLUMNS) + " |")
    decision = result.get("decision_time")
    if decision:
        lines.append("")
        lines.append(f"plan() with {decision['queued']:,} queued jobs on {decision['executors']} executors, "
                     f"{decision['rounds']} rounds: median {decision['median_ms']:.1f} ms, "
                     f"p95 {decision['p95_ms']:.1f} ms, max {decision['max_ms']:.1f} ms "
                     f"(first round, idle fleet: {decision['first_round_ms']:.1f} ms)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    result = run_simulation()
    print(json.dumps(result, indent=2) if "--json" in args else format_table(result))


if __name__ == "__main__":
    main()
