"""Discrete-event simulation of a fleet driven by `policy.plan` (or a FIFO one-job-per-GPU baseline).

docs/SCHEDULING.md states its assumptions. What is shared with the service, not modelled (the service's code called;
where that code needs Redis or torch, its rule restated here and tests/test_simulate.py compares the two):

- Sizing: every job is a `memory.plan_job` of a real spec (base shape, r, target modules, batch size, max_seq_len,
  quantization, dtype "auto" / "bfloat16" / "float32", tokens), as `submission.plan_for` makes it, with the compat key
  `snapshot|quantization|dtype`. It is stored as JSON in a `records.JobRecord` and turned into the planner's
  `QueuedJob` / `RunningJob` by the service's own `service._queued_job` / `service._running_job`. So fair share
  charges the service's `est_gpu_seconds` (`memory.estimate_gpu_seconds`), and auto, bfloat16 and float32 jobs of one
  base are three keys that never share a cohort, as in the service.
- Executors: each simulated executor says what it is in a real `records.ExecutorHeartbeat` (device dtypes,
  `auto_dtype` by `memory.auto_dtype`, the memory it offers, its raw measured peak, the tokens of its largest pass,
  `max_pass_tokens`), and the planner's `ExecutorView` is built from it field by field as `Scheduler._executor_views`
  builds it. Jobs are priced in the dtype they compute in there (`memory.effective_dtype`): an "auto" job is fp32 on
  an fp32-only GPU.
- Passes: an executor started with `--max-pass-tokens N` (the default, 8192) sizes each step's passes as the worker
  does (`memory.pass_tokens` over its memory left after base and adapter state, by the estimate times the factor
  the scheduler has learned for the base so far, as `Executor.pass_size` reads it) and
  splits the cohort's sequences into passes by the rule of `executor.cohort.split_passes` (mirrored over lengths here:
  that module needs torch).
- Calibration: the scheduler folds every new heartbeat into its compat key's `MemoryCalibration` by the rule of
  `Scheduler._calibrate`: prediction = base bytes + `memory.cohort_bytes(jobs, the pass size the step ran)`, observed
  = the executor's raw peak, through `memory.calibrate`.
- Out of memory: a step whose true peak exceeds the GPU hands every job back to the queue from its last checkpoint
  (`checkpoint_every` = 100 steps), drops the cohort and offers 85% of the memory from then on (`worker.OOM_SHRINK`),
  as `Worker.recover_from_oom` does.

Modelled (the rest of this docstring):

Cohort step time on one GPU, for a cohort of n jobs with T tokens per step in total, in p passes, base with P
parameters, computing in dtype d:
    t = (A * sqrt(P / 8e9) * p + B * (P / 8e9) * q * T) / speed[d] + C * n
A = 0.126 s fixed per-pass cost (every pass pays the step's host time again), B = 8.33e-5 s/token, C = 2 ms per
adapter (its optimizer step and kernel segment), q = 1.3 for nf4 / 1.15 for int8 dequantisation, speed[d] = the GPU
class in that dtype relative to an H100 in bf16. A and B are solved from the developers' guide numbers for an 8B base
on one H100: 4x512 tokens with PEFT alone = 6.9k tok/s, and a compute-bound ceiling of 13.8k tok/s for the bare base,
less 15% for the LoRA matmuls (1/B = 12k tok/s). So a step's time grows sublinearly in tokens: one 2048-token job
gets 6.9k tok/s, a 8192-token cohort 10.9k tok/s. fp32 (lorafleet leaves TF32 off) runs at a quarter of a class's
bf16 speed (the A10 and A6000 peak ratio; an H100's is lower); the V100 class computes in fp32 only.
Loading a base: 5 s + bytes / 2 GB/s. Every job does one optimizer step per cohort step (fluid: between events the
cohort does not change, so each job's remaining steps fall linearly); every sequence is max_seq_len long (the size
the planner assumes). A cohort step's GPU time is split between its jobs by their tokens; that is the "GPU share"
fairness is measured on. An executor's heartbeat right after its cohort changed reports the step it runs with that
cohort (the next round, 30 s on, reads it; only the slowest V100 steps take longer than that).

Memory: each base has a true footprint factor (1.05-1.20) over the estimate, unknown to the planner and the
executors: true bytes of a step = factor x (base + `cohort_bytes(cohort, its largest pass)`).
"""

from __future__ import annotations

import heapq
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Iterable, Optional, Sequence

from lorafleet.scheduler.memory import (
    JobPlan,
    MemoryCalibration,
    ModelShape,
    auto_dtype,
    calibrate,
    cohort_bytes,
    effective_dtype,
    estimate_activation_bytes,
    estimate_base_bytes,
    estimate_job_bytes,
    pass_tokens,
    plan_job,
)
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
from lorafleet.scheduler.records import ExecutorHeartbeat, JobRecord, JobState
from lorafleet.scheduler.service import _queued_job, _running_job

GiB = 1024**3
STEP_FIXED_S = 0.126
STEP_PER_TOKEN_S = 8.33e-5
STEP_PER_ADAPTER_S = 0.002
QUANT_COMPUTE_FACTOR = {"none": 1.0, "nf4": 1.3, "int8": 1.15}
FP32_OF_BF16_SPEED = 0.25  # fp32 (no TF32) throughput / bf16 throughput on a GPU that has both
LOAD_FIXED_S = 5.0
LOAD_BYTES_PER_S = 2e9
DEFAULT_MAX_PASS_TOKENS = 8192  # `lorafleet executor --max-pass-tokens` default
PASSES_SHARE = 0.8  # executors started with the default; the rest with --max-pass-tokens 0 (one pass)
CHECKPOINT_EVERY = 100  # JobSpec hyperparameters.checkpoint_every default: a job handed back resumes from there
OOM_SHRINK = 0.85  # executor.worker.OOM_SHRINK (that module needs torch): memory offered after an out-of-memory step
DTYPES = ("auto", "bfloat16", "float32")
DTYPE_MIX = (0.85, 0.10, 0.05)
STRATEGIES = ("optimal-fit", "fast-fit", "trivial", "fifo")
_EXECUTOR_MEMORY_FRACTION = PlanConfig().memory_fraction  # what `Worker.pass_size` fills with its passes
_RUNNING_FIELDS = [f.name for f in fields(RunningJob)]
_REMAINING = _RUNNING_FIELDS.index("remaining_gpu_seconds")


@dataclass(frozen=True)
class SimBase:
    name: str
    shape: ModelShape
    quantization: str
    true_memory_factor: float  # true bytes / the memory model's estimate, for everything on a device
    max_tokens_per_step: int  # jobs on this base use micro-batches up to this size

    @property
    def snapshot(self) -> str:
        """The resolved base directory a plan pins (`JobPlan.base_snapshot`)."""
        return f"/models/{self.name}"

    def compat_key(self, dtype: str) -> str:
        """The key `submission.plan_for` gives a job of this base and `JobSpec.dtype`."""
        return "|".join((self.snapshot, self.quantization, dtype))

    @property
    def params(self) -> int:
        return self.shape.num_params()

    def base_bytes(self, dtype: str) -> int:
        """The estimate of the base's bytes computing in effective `dtype`."""
        return estimate_base_bytes(self.params, self.quantization, dtype)


@dataclass(frozen=True)
class GpuClass:
    name: str
    total_bytes: int
    bf16_speed: Optional[float]  # compute in bf16 relative to an H100 in bf16; None: no native bf16 (pre-Ampere)
    fp32_speed: float  # the same in fp32

    @property
    def dtypes(self) -> tuple[str, ...]:
        """What its executor's heartbeat lists (`worker._supported_dtypes`)."""
        return ("bfloat16", "float32") if self.bf16_speed is not None else ("float32",)

    @property
    def auto_dtype(self) -> str:
        return auto_dtype("cuda", self.bf16_speed is not None)

    def speed(self, dtype: str) -> float:
        speed = self.bf16_speed if dtype == "bfloat16" else self.fp32_speed
        if speed is None:
            raise ValueError(f"{self.name} does not compute in {dtype}")
        return speed


@dataclass(frozen=True)
class Machine:
    """One executor: its GPU and how it was started."""

    executor_id: str
    gpu: GpuClass
    max_pass_tokens: Optional[int]  # `--max-pass-tokens`; None: 0, one pass


BASES = (
    SimBase("qwen2-1.5b", ModelShape(1536, 8960, 28, 12, 2, 151936), "none", 1.10, 8192),
    SimBase("llama3-8b", ModelShape(4096, 14336, 32, 32, 8, 128256), "none", 1.15, 4096),
    SimBase("llama3-8b", ModelShape(4096, 14336, 32, 32, 8, 128256), "nf4", 1.20, 4096),
    SimBase("mistral-7b", ModelShape(4096, 14336, 32, 32, 8, 32768), "none", 1.05, 4096),
    SimBase("llama3-70b", ModelShape(8192, 28672, 80, 64, 8, 128256), "nf4", 1.10, 1024),
)
BASE_POPULARITY = (0.30, 0.30, 0.15, 0.20, 0.05)
GPU_CLASSES = (
    GpuClass("A10-24GB", 24 * GiB, 0.30, 0.30 * FP32_OF_BF16_SPEED),
    GpuClass("V100-32GB", 32 * GiB, None, 0.04),  # fp32 only: 15.7 TFLOP/s, 0.4x an A6000's fp32
    GpuClass("A6000-48GB", 48 * GiB, 0.50, 0.50 * FP32_OF_BF16_SPEED),
    GpuClass("H100-80GB", 80 * GiB, 1.0, 1.0 * FP32_OF_BF16_SPEED),
)
GPU_MIX = (0.2, 0.1, 0.3, 0.4)


def step_seconds(base: SimBase, gpu: GpuClass, total_tokens: int, num_jobs: int, dtype: str = "bfloat16",
                 passes: int = 1) -> float:
    scale = base.params / 8e9
    compute = STEP_FIXED_S * math.sqrt(scale) * passes \
        + STEP_PER_TOKEN_S * scale * QUANT_COMPUTE_FACTOR[base.quantization] * total_tokens
    return compute / gpu.speed(dtype) + STEP_PER_ADAPTER_S * num_jobs


def saturated_tokens_per_second(base: SimBase, gpu: GpuClass, dtype: str = "bfloat16") -> float:
    return gpu.speed(dtype) / (STEP_PER_TOKEN_S * base.params / 8e9 * QUANT_COMPUTE_FACTOR[base.quantization])


def load_seconds(base: SimBase, dtype: str = "bfloat16") -> float:
    return LOAD_FIXED_S + base.base_bytes(dtype) * base.true_memory_factor / LOAD_BYTES_PER_S


def split_pass_tokens(lengths: Sequence[int], max_tokens: Optional[int]) -> list[int]:
    """Tokens of each pass `executor.cohort.split_passes` makes of sequences of these lengths, in this order (the
    same rule over lengths: consecutive groups of whole sequences of at most `max_tokens`, each closed once it
    reaches an equal share; None: one group)."""
    total = sum(lengths)
    share = -(-total // -(-total // max_tokens)) if max_tokens is not None and total else None
    passes, size = [], 0
    for length in lengths:
        if not length:
            continue
        if share is not None and size and (size + length > max_tokens or size >= share):
            passes.append(size)
            size = 0
        size += length
    if size:
        passes.append(size)
    return passes


def predicted_peak(base_bytes: int, jobs: Sequence[RunningJob], pass_tokens: int) -> float:
    """The uncalibrated prediction a heartbeat's measured peak is compared with: base + the cohort in the passes the
    step really ran. The rule of `Scheduler._calibrate` (which computes it inline), through the same
    `memory.cohort_bytes`."""
    return base_bytes + cohort_bytes(jobs, pass_tokens or None) if jobs else 0


# --------------------------------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class SimJob:
    job: QueuedJob  # `service._queued_job(record, record.plan)`: what the planner sees while it waits
    record: JobRecord  # as the store holds it (its plan as JSON)
    plan: JobPlan  # record.plan
    base: SimBase
    batch_size: int
    steps: int  # micro-batches (= optimizer steps: no gradient accumulation), its spec's max_steps


def job_plan(base: SimBase, r: int, target_modules: Sequence[str], batch_size: int, max_seq_len: int, dtype: str,
             max_steps: int) -> JobPlan:
    """`submission.plan_for` of a spec with these fields and `max_steps` (no gradient accumulation), for a base whose
    config.json has `base.shape` at `base.snapshot` (tests/test_simulate.py checks it against plan_for)."""
    return plan_job(base.compat_key(dtype), base.snapshot, base.shape, r, target_modules, batch_size, max_seq_len,
                    base.quantization, dtype, max_steps * batch_size * max_seq_len)


def job_spec(base: SimBase, r: int, target_modules: Sequence[str], batch_size: int, max_seq_len: int, dtype: str,
             max_steps: int, priority: int, tenant: str, job_id: str) -> dict:
    """The JobSpec (as JSON) of a simulated job."""
    return {"base_model": base.snapshot, "dataset": f"{tenant}/{job_id}.jsonl", "quantization": base.quantization,
            "dtype": dtype, "adapter": {"r": r, "target_modules": list(target_modules)},
            "hyperparameters": {"batch_size": batch_size, "max_seq_len": max_seq_len, "max_steps": max_steps},
            "priority": priority}


def make_job(job_id: str, tenant: str, base: SimBase, dtype: str, r: int, target_modules: Sequence[str],
             batch_size: int, max_seq_len: int, steps: int, priority: int, submitted_at: float) -> SimJob:
    """A queued job as the store holds it (its plan as JSON in its record) and as the scheduler reads it."""
    spec = job_spec(base, r, target_modules, batch_size, max_seq_len, dtype, steps, priority, tenant, job_id)
    record = JobRecord.from_hash({
        "job_id": job_id, "tenant": tenant, "name": "adapter", "state": JobState.QUEUED.value,
        "priority": str(priority), "spec": json.dumps(spec, sort_keys=True), "submitted_at": repr(submitted_at),
        "total_steps": str(steps),
        "plan": job_plan(base, r, target_modules, batch_size, max_seq_len, dtype, steps).to_json(),
    })
    return SimJob(_queued_job(record, record.plan), record, record.plan, base, batch_size, steps)


def _fits_some_gpu(base: SimBase, classes: Iterable[GpuClass], dtype: str, r: int, modules: Sequence[str],
                   batch: int, seq: int) -> bool:
    """Whether one job alone fits some GPU class that computes its dtype, with room to spare."""
    for gpu in classes:
        if dtype != "auto" and dtype not in gpu.dtypes:
            continue
        computes = effective_dtype(dtype, gpu.auto_dtype)
        need = base.base_bytes(computes) + estimate_job_bytes(base.shape, r, modules, batch, seq, computes)
        if need * base.true_memory_factor < 0.85 * gpu.total_bytes:
            return True
    return False


def make_workload(num_jobs: int, num_tenants: int, num_executors: int, seed: int, load: float
                  ) -> tuple[list[SimJob], dict[str, TenantView], list[Machine]]:
    """Skewed tenants (Zipf job counts, weights 1/2/4), log-normal job sizes, per-tenant bursts of arrivals."""
    rng = random.Random(seed)
    machines = [Machine(f"gpu{i:03d}", rng.choices(GPU_CLASSES, GPU_MIX)[0],
                        DEFAULT_MAX_PASS_TOKENS if rng.random() < PASSES_SHARE else None)
                for i in range(num_executors)]
    tenants = {f"t{i:03d}": TenantView(f"t{i:03d}", weight=rng.choice((1.0, 1.0, 1.0, 2.0, 4.0)))
               for i in range(num_tenants)}
    names = list(tenants)
    zipf = [1 / (rank + 1) ** 0.9 for rank in range(num_tenants)]
    owners = rng.choices(names, zipf, k=num_jobs)
    per_tenant: dict[str, list[int]] = {}
    for index, owner in enumerate(owners):
        per_tenant.setdefault(owner, []).append(index)

    classes = [g for g in GPU_CLASSES if any(m.gpu is g for m in machines)]
    bases = [b for b in BASES if _fits_some_gpu(b, classes, "auto", 8, ("q_proj",), 1, 512)]
    popularity = [p for b, p in zip(BASES, BASE_POPULARITY) if b in bases]
    favourite = {name: rng.choices(bases, popularity)[0] for name in names}
    specs = []
    for index, owner in enumerate(owners):
        base = favourite[owner] if rng.random() < 0.8 else rng.choices(bases, popularity)[0]
        while True:  # a tenant's spec that fits no GPU would be refused at submission; draw again
            dtype = rng.choices(DTYPES, DTYPE_MIX)[0]
            seq = rng.choice((512, 512, 1024, 2048))
            batch = max(1, min(rng.choice((1, 2, 4, 4, 8)), base.max_tokens_per_step // seq))
            seq = min(seq, base.max_tokens_per_step)
            r = rng.choice((8, 16, 16, 32, 64))
            modules = rng.choice((("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
                                  ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
            if _fits_some_gpu(base, classes, dtype, r, modules, batch, seq):
                break
        # bigger bases get smaller datasets, as in practice; sizes stay log-normal (a few huge jobs)
        median = 1.5e6 * math.sqrt(8e9 / base.params)
        tokens = int(min(30 * median, max(5e4, rng.lognormvariate(math.log(median), 1.2))))
        priority = rng.choices((2, 5, 8), (0.15, 0.7, 0.15))[0]
        specs.append((owner, base, dtype, r, modules, batch, seq, max(1, math.ceil(tokens / (batch * seq))),
                      priority))

    # arrival span chosen so the offered work is `load` times what the fleet can do at a 8192-token cohort size
    fleet_rate = sum(8192 / step_seconds(BASES[1], m.gpu, 8192, 4, m.gpu.auto_dtype) for m in machines)
    span = sum(s[7] * s[5] * s[6] for s in specs) / (fleet_rate * load)
    arrivals = [0.0] * num_jobs
    for owner, indices in per_tenant.items():
        cursor = 0
        while cursor < len(indices):
            burst = indices[cursor:cursor + max(1, int(rng.expovariate(1 / 12)))]
            start = rng.uniform(0, span)
            for offset, index in enumerate(burst):
                arrivals[index] = start + offset * rng.expovariate(1 / 20)
            cursor += len(burst)

    jobs = [make_job(f"j{index:05d}", owner, base, dtype, r, modules, batch, seq, steps, priority, arrivals[index])
            for index, (owner, base, dtype, r, modules, batch, seq, steps, priority) in enumerate(specs)]
    jobs.sort(key=lambda j: (j.job.submitted_at, j.job.job_id))
    return jobs, tenants, machines


# --------------------------------------------------------------------------------------------------- executors


class _Executor:
    """A simulated `lorafleet executor`: its cohort, the step it runs with it, and the heartbeat it sends."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.executor_id = machine.executor_id
        self.gpu = machine.gpu
        self.offered = machine.gpu.total_bytes  # the total_bytes it offers (less after an out-of-memory step)
        self.key: Optional[str] = None  # compat key of the loaded base
        self.base: Optional[SimBase] = None
        self.dtype: Optional[str] = None  # what the loaded base computes in here
        self.ready_at = 0.0
        self.updated_at = 0.0
        self.cohort: dict[str, float] = {}  # job id -> remaining steps
        self.running: dict[str, RunningJob] = {}  # job id -> `service._running_job` of its record at step 0
        self.running_fields: dict[str, list] = {}  # job id -> that RunningJob's fields, in order
        self.attempts: dict[str, int] = {}
        self.tokens, self.passes, self.step_s = 0, 0, 0.0  # of the step it runs with its cohort
        self.version = 0
        self.beat = ExecutorHeartbeat(self.executor_id, device="cuda", dtypes=self.gpu.dtypes,
                                      auto_dtype=self.gpu.auto_dtype, total_bytes=self.offered,
                                      max_pass_tokens=machine.max_pass_tokens)

    def true_base_bytes(self) -> int:
        return int(self.base.base_bytes(self.dtype) * self.base.true_memory_factor) if self.base else 0

    def load(self, sim_job: SimJob, now: float) -> None:
        self.base, self.key = sim_job.base, sim_job.job.compat_key
        self.dtype = effective_dtype(sim_job.plan.dtype, self.gpu.auto_dtype)
        self.ready_at = now + load_seconds(self.base, self.dtype)

    def join(self, sim_job: SimJob, remaining_steps: float, attempt: int) -> None:
        record = replace(sim_job.record, state=JobState.RUNNING, executor_id=self.executor_id, attempt=attempt,
                         step=0)
        running = _running_job(record, sim_job.plan, self.gpu.auto_dtype)
        self.running[sim_job.job.job_id] = running
        self.running_fields[sim_job.job.job_id] = [getattr(running, name) for name in _RUNNING_FIELDS]
        self.cohort[sim_job.job.job_id] = remaining_steps
        self.attempts[sim_job.job.job_id] = attempt

    def leave(self, job_id: str) -> None:
        del self.cohort[job_id], self.running[job_id], self.running_fields[job_id], self.attempts[job_id]

    def running_now(self, steps: dict[str, int]) -> list[RunningJob]:
        """`service._running_job` of each job's record as it stands: its `step` = steps done, as the executor reports
        them (the rule `remaining = est_gpu_seconds x (1 - step / total_steps)` applied to the cached step-0 view)."""
        result = []
        for job_id, remaining in self.cohort.items():
            values, total = list(self.running_fields[job_id]), steps[job_id]
            step = int(total - max(0.0, remaining))
            values[_REMAINING] *= 1 - step / total
            result.append(RunningJob(*values))  # dataclasses.replace, without its cost (it is called very often)
        return result

    def measure(self, by_id: dict[str, SimJob], now: float, learned_factor: float = 1.0) -> bool:
        """Run a step with the cohort as it is now, as the worker does (`Worker.pass_size`, then the cohort's passes):
        its time, and a heartbeat with its raw peak. False: the step ran out of memory (nothing is reported)."""
        jobs = [self.running[j] for j in self.cohort]
        if not jobs:
            self.tokens, self.passes, self.step_s = 0, 0, 0.0
            self._send(now, self.true_base_bytes(), 0)
            return True
        base, factor = self.base, self.base.true_memory_factor
        base_estimate = base.base_bytes(self.dtype)
        self.tokens = sum(j.tokens_per_step for j in jobs)
        planned = self.machine.max_pass_tokens
        if planned is None:
            parts, largest = [self.tokens], None
        else:
            allocated = factor * (base_estimate + sum(j.job_bytes - j.activation_bytes for j in jobs))
            size = pass_tokens(planned, self.offered * _EXECUTOR_MEMORY_FRACTION - allocated,
                               estimate_activation_bytes(base.shape, 1, 1, self.dtype) * max(1.0, learned_factor))
            lengths = [by_id[j].plan.max_seq_len for j in self.cohort for _ in range(by_id[j].batch_size)]
            parts = split_pass_tokens(lengths, size)
            largest = max(parts)
        self.passes = len(parts)
        self.step_s = step_seconds(base, self.gpu, self.tokens, len(jobs), self.dtype, self.passes)
        peak = factor * (base_estimate + cohort_bytes(jobs, largest))
        if peak > self.gpu.total_bytes:
            return False
        self._send(now, int(peak), largest or 0)
        return True

    def recover_from_oom(self, now: float) -> dict[str, float]:
        """`Worker.recover_from_oom`: offer less memory, drop the cohort and its base; the jobs (id -> remaining steps)
        go back to the queue."""
        handed_back = dict(self.cohort)
        self.offered = int(self.offered * OOM_SHRINK)
        self.cohort, self.running, self.running_fields, self.attempts = {}, {}, {}, {}
        self.base = self.key = self.dtype = None
        self.tokens, self.passes, self.step_s = 0, 0, 0.0
        self._send(now, 0, 0)
        return handed_back

    def _send(self, now: float, peak: int, largest_pass: int) -> None:
        self.beat = ExecutorHeartbeat(
            self.executor_id, device="cuda", dtypes=self.gpu.dtypes, auto_dtype=self.gpu.auto_dtype,
            total_bytes=self.offered, peak_bytes=peak, pass_tokens=largest_pass if self.cohort else 0,
            compat_key=self.key, base_bytes=self.true_base_bytes(), jobs=dict(self.attempts),
            max_pass_tokens=self.machine.max_pass_tokens, heartbeat_at=max(now, self.beat.heartbeat_at + 1e-6))


class _SimScheduler:
    """What `service.Scheduler` does with heartbeats, without Redis: the planner's `ExecutorView`s, built as
    `Scheduler._executor_views` builds them, and calibration, folded in as `Scheduler._calibrate` does."""

    def __init__(self):
        self.calibrations: dict[str, MemoryCalibration] = {}
        self.calibrated_beats: dict[str, float] = {}

    def factors(self) -> dict[str, float]:
        return {key: c.factor for key, c in self.calibrations.items()}

    def views(self, executors: Iterable[_Executor], by_id: dict[str, SimJob], steps: dict[str, int]
              ) -> list[ExecutorView]:
        views = []
        for executor in executors:
            beat = executor.beat
            running = tuple(executor.running_now(steps))
            on_device = [job for job in running if beat.jobs.get(job.job_id) == executor.attempts[job.job_id]]
            base_bytes = by_id[on_device[0].job_id].plan.size(beat.auto_dtype).base_bytes if on_device else 0
            self.calibrate(beat, base_bytes, on_device)
            views.append(ExecutorView(
                executor_id=beat.executor_id, total_bytes=beat.total_bytes, free_bytes=beat.free_bytes,
                loaded_compat_key=executor.key if running else beat.compat_key, loaded_base_bytes=beat.base_bytes,
                running=running, max_pass_tokens=beat.max_pass_tokens, dtypes=frozenset(beat.dtypes) or None,
                auto_dtype=beat.auto_dtype, pass_tokens=beat.pass_tokens,
            ))
        return views

    def calibrate(self, beat: ExecutorHeartbeat, base_bytes: int, jobs: Sequence[RunningJob]) -> None:
        if self.calibrated_beats.get(beat.executor_id) == beat.heartbeat_at:
            return  # checked first only because it is cheaper; the service computes the prediction first
        predicted = predicted_peak(base_bytes, jobs, beat.pass_tokens)
        if not (beat.compat_key and beat.peak_bytes and predicted):
            return
        self.calibrated_beats[beat.executor_id] = beat.heartbeat_at
        current = self.calibrations.get(beat.compat_key, MemoryCalibration())
        self.calibrations[beat.compat_key] = calibrate(current, beat.peak_bytes, round(predicted))


# --------------------------------------------------------------------------------------------------- baseline


def plan_fifo(queued, executors, config: PlanConfig):
    """Baseline: one job per GPU, oldest job first, onto an idle GPU that holds its base, else the first idle fit."""
    idle = [e for e in sorted(executors, key=lambda e: e.executor_id) if e.alive and not e.running]
    assignments = []
    for job in sorted(queued, key=lambda j: (j.submitted_at, j.job_id)):
        if not idle:
            break
        factor = config.memory_factors.get(job.compat_key, 1.0)
        fits = []
        for executor in idle:
            if job.dtype != "auto" and executor.dtypes is not None and job.dtype not in executor.dtypes:
                continue
            sized = job.on(executor.auto_dtype)
            need = (sized.base_bytes + cohort_bytes([sized], executor.max_pass_tokens)) * factor
            if executor.total_bytes * config.memory_fraction >= need:
                fits.append(executor)
        if not fits:
            continue
        chosen = next((e for e in fits if e.loaded_compat_key == job.compat_key), fits[0])
        idle.remove(chosen)
        assignments.append(Assignment(job.job_id, chosen.executor_id, job.compat_key))
    return assignments


# --------------------------------------------------------------------------------------------------- engine


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


def simulate(jobs: list[SimJob], tenants: dict[str, TenantView], machines: list[Machine], strategy: str,
             plan_interval_s: float = 30.0, fairness_window_s: float = 3600.0,
             usage_half_life_s: float = USAGE_HALF_LIFE_SECONDS) -> dict:
    """Run one strategy ("fifo" or a `PlanConfig.packing`) over a workload; return its metrics."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    simulation = _Simulation(jobs, tenants, machines, strategy, plan_interval_s, fairness_window_s, usage_half_life_s)
    simulation.run()
    return simulation.metrics()


class _Simulation:
    """One strategy over one workload: an event queue of arrivals, plan rounds and executors' cohort changes ("tick":
    the first job of a cohort ends), with the fleet's state and the running sums the metrics are made of."""

    def __init__(self, jobs: list[SimJob], tenants: dict[str, TenantView], machines: list[Machine], strategy: str,
                 plan_interval_s: float, fairness_window_s: float, usage_half_life_s: float):
        self.jobs, self.tenants, self.strategy = jobs, tenants, strategy
        self.plan_interval_s, self.fairness_window_s = plan_interval_s, fairness_window_s
        self.config = PlanConfig(packing="optimal-fit" if strategy == "fifo" else strategy)
        self.planner = plan_fifo if strategy == "fifo" else None
        self.by_id = {j.job.job_id: j for j in jobs}
        self.steps_of = {job_id: j.steps for job_id, j in self.by_id.items()}
        self.executors = {m.executor_id: _Executor(m) for m in machines}
        self.scheduler = _SimScheduler()
        self.usage = _DecayingUsage(usage_half_life_s)
        self.queued: dict[str, QueuedJob] = {}
        self.running_count: dict[str, int] = {name: 0 for name in tenants}
        self.attempts: dict[str, int] = {job_id: 0 for job_id in self.by_id}
        self.checkpointed: dict[str, int] = {job_id: 0 for job_id in self.by_id}  # steps of its last checkpoint
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.window_gpu: dict[int, dict[str, float]] = {}  # fairness window -> tenant -> GPU seconds received
        self.window_backlogged: dict[int, set[str]] = {}  # fairness window -> tenants waiting at every round in it
        self.first_arrival = min(j.job.submitted_at for j in jobs)
        self.last_arrival = max(j.job.submitted_at for j in jobs)
        self.busy_seconds = 0.0
        self.compute_seconds = 0.0  # busy time weighted by achieved / saturated throughput
        self.tokens_done = 0.0
        self.loads = self.reloads = self.oom_steps = self.oom_jobs = self.steps_lost = 0
        self.plan_times: list[float] = []
        self.plan_queue_sizes: list[int] = []
        self.events: list = []
        self.seq = 0
        self.plan_pending = False
        self.last_plan = -math.inf

    def push(self, at: float, kind: str, payload) -> None:
        heapq.heappush(self.events, (at, self.seq, kind, payload))
        self.seq += 1

    def run(self) -> None:
        for sim_job in self.jobs:
            self.push(sim_job.job.submitted_at, "arrive", sim_job.job.job_id)
        while self.events:
            now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self.queued[payload] = self.by_id[payload].job
                self.request_plan(now)
            elif kind == "plan":
                self.plan_pending = False
                self.run_plan(now)
            else:
                self.tick(now, *payload)
            if not self.events and self.queued:
                raise RuntimeError(f"{len(self.queued)} jobs can never be placed (e.g. {next(iter(self.queued))})")

    def tick(self, now: float, executor_id: str, version: int) -> None:
        """The executor's earliest job is done (unless its cohort changed since the tick was set: a stale one)."""
        executor = self.executors[executor_id]
        if version != executor.version:
            return
        self.advance(executor, now)
        for job_id in [j for j, remaining in executor.cohort.items() if remaining <= 1e-6]:
            executor.leave(job_id)
            self.finished[job_id] = now
            self.running_count[self.by_id[job_id].job.tenant] -= 1
        self.step_changed_cohort(executor, now)
        self.request_plan(now)

    def attribute(self, tenant: str, start: float, end: float, share: float) -> None:
        """Credit `share` of the GPU over [start, end) to the tenant, split at fairness-window boundaries."""
        while start < end:
            window = int(start // self.fairness_window_s)
            cut = min(end, (window + 1) * self.fairness_window_s)
            bucket = self.window_gpu.setdefault(window, {})
            bucket[tenant] = bucket.get(tenant, 0.0) + (cut - start) * share
            start = cut

    def advance(self, executor: _Executor, now: float) -> None:
        """Bring the executor's cohort up to `now`: remaining steps, usage, tokens and busy time."""
        start = max(executor.updated_at, executor.ready_at)
        executor.updated_at = now
        if not executor.cohort or now <= start:
            return
        step = executor.step_s
        steps = (now - start) / step
        for job_id in executor.cohort:
            executor.cohort[job_id] -= steps
            share = executor.running[job_id].tokens_per_step / executor.tokens
            tenant = self.by_id[job_id].job.tenant
            self.usage.add(tenant, (now - start) * share, now)
            self.attribute(tenant, start, now, share)
        rate = executor.tokens / step
        self.tokens_done += rate * (now - start)
        offered = max(0.0, min(now, self.last_arrival) - max(start, self.first_arrival))  # utilisation's window
        self.busy_seconds += offered
        self.compute_seconds += offered * rate / saturated_tokens_per_second(executor.base, executor.gpu,
                                                                             executor.dtype)

    def schedule_completion(self, executor: _Executor, now: float) -> None:
        executor.version += 1
        if not executor.cohort:
            return
        at = max(now, executor.ready_at) + max(0.0, min(executor.cohort.values())) * executor.step_s
        self.push(at, "tick", (executor.executor_id, executor.version))

    def step_changed_cohort(self, executor: _Executor, now: float) -> None:
        """The executor steps with its new cohort; out of memory, every job goes back from its last checkpoint."""
        if not executor.measure(self.by_id, now, self.scheduler.factors().get(executor.key, 1.0)):
            self.oom_steps += 1
            for job_id, remaining in executor.recover_from_oom(now).items():
                done = self.by_id[job_id].steps - max(0.0, remaining)
                checkpoint = int(done) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
                self.checkpointed[job_id] = max(self.checkpointed[job_id], checkpoint)
                self.steps_lost += int(done) - self.checkpointed[job_id]
                self.queued[job_id] = self.by_id[job_id].job
                self.running_count[self.by_id[job_id].job.tenant] -= 1
                self.oom_jobs += 1
            self.request_plan(now)
        self.schedule_completion(executor, now)

    def request_plan(self, now: float) -> None:
        """A plan round at the next interval, unless one is already set."""
        if not self.plan_pending:
            self.plan_pending = True
            self.push(max(now, self.last_plan + self.plan_interval_s), "plan", None)

    def run_plan(self, now: float) -> None:
        """One plan round, timed, with the views the service would build; its decisions carried out."""
        self.last_plan = now
        tenant_views = {name: replace(view, running=self.running_count[name], gpu_seconds=self.usage.get(name, now))
                        for name, view in self.tenants.items()}
        views = self.scheduler.views(self.executors.values(), self.by_id, self.steps_of)
        config_now = replace(self.config, memory_factors=self.scheduler.factors())
        queue = list(self.queued.values())
        began = time.perf_counter()
        if self.planner is not None:
            decisions = self.planner(queue, views, config_now)
        else:
            decisions = plan(queue, views, tenant_views, now, config_now)
        self.plan_times.append(time.perf_counter() - began)
        self.plan_queue_sizes.append(len(queue))
        window = int(now // self.fairness_window_s)
        waiting = {job.tenant for job in queue}
        backlogged = self.window_backlogged
        backlogged[window] = backlogged[window] & waiting if window in backlogged else waiting
        touched: list[_Executor] = []
        for decision in decisions:
            executor = self.assign(decision, now)
            if executor not in touched:
                touched.append(executor)
        for executor in touched:
            self.step_changed_cohort(executor, now)

    def assign(self, decision, now: float) -> _Executor:
        """Put a planned job into its executor's cohort (loading the base into an empty executor first)."""
        sim_job = self.by_id[decision.job_id]
        executor = self.executors[decision.executor_id]
        self.advance(executor, now)
        if not executor.cohort and executor.key != sim_job.job.compat_key:
            self.loads += 1
            self.reloads += executor.key is not None
            executor.load(sim_job, now)
        elif executor.key != sim_job.job.compat_key:
            raise AssertionError(f"plan put {decision.job_id} into a cohort of another base")
        self.attempts[decision.job_id] += 1
        remaining = float(sim_job.steps - self.checkpointed[decision.job_id])
        executor.join(sim_job, remaining, self.attempts[decision.job_id])
        del self.queued[decision.job_id]
        self.running_count[sim_job.job.tenant] += 1
        self.started.setdefault(decision.job_id, now)
        return executor

    def jain_backlogged(self) -> float:
        """The mean over fairness windows of Jain's index of the weighted GPU shares of tenants backlogged all
        window long (1.0 when no window had two). Summed in name order: the same digits in every process."""
        jains = []
        for window, backlogged in self.window_backlogged.items():
            received = self.window_gpu.get(window, {})
            shares = [received.get(name, 0.0) / self.tenants[name].weight for name in sorted(backlogged)]
            if len(shares) >= 2:
                jains.append(_jain(shares))
        return statistics.fmean(jains) if jains else 1.0

    def metrics(self) -> dict:
        jobs, finished = self.jobs, self.finished
        makespan = max(finished.values()) - self.first_arrival
        completion = [finished[j.job.job_id] - j.job.submitted_at for j in jobs]
        waits = [self.started[j.job.job_id] - j.job.submitted_at for j in jobs]
        fleet_seconds = (self.last_arrival - self.first_arrival) * len(self.executors)
        true_factor = {j.job.compat_key: j.base.true_memory_factor for j in jobs}
        calibrations = self.scheduler.calibrations
        return {
            "strategy": self.strategy,
            "jobs_completed": len(finished),
            "makespan_hours": makespan / 3600,
            "gpu_busy": self.busy_seconds / fleet_seconds,
            "gpu_utilisation": self.compute_seconds / fleet_seconds,
            "tokens_per_second": self.tokens_done / makespan,
            "jct_mean_s": statistics.fmean(completion),
            "jct_p95_s": _percentile(completion, 0.95),
            "wait_mean_s": statistics.fmean(waits),
            "wait_p95_s": _percentile(waits, 0.95),
            "jain_backlogged": self.jain_backlogged(),
            "base_loads": self.loads,
            "base_reloads": self.reloads,
            "oom_steps": self.oom_steps,
            "oom_evictions": self.oom_jobs,
            "oom_steps_lost": self.steps_lost,
            "executors_shrunk": sum(1 for e in self.executors.values() if e.offered < e.gpu.total_bytes),
            "calibration_error_max": max((abs(c.factor - true_factor[key]) / true_factor[key]
                                          for key, c in calibrations.items()), default=0.0),
            "calibration_factors": {key: c.factor for key, c in sorted(calibrations.items())},
            "plan_rounds": len(self.plan_times),
            "plan_ms_median": 1000 * statistics.median(self.plan_times),
            "plan_ms_p95": 1000 * _percentile(self.plan_times, 0.95),
            "plan_max_queue": max(self.plan_queue_sizes),
        }


def measure_decision_time(num_queued: int = 10_000, num_executors: int = 100, num_tenants: int = 200,
                          rounds: int = 50, seed: int = 0, packing: str = "optimal-fit") -> dict:
    """Time `plan` with `num_queued` jobs waiting while cohorts finish between rounds (the first round is an idle
    fleet: the most assignments one round ever makes). Executors and their views as in `simulate`."""
    rng = random.Random(seed)
    sim_jobs, tenants, machines = make_workload(num_queued, num_tenants, num_executors, seed, load=1.0)
    by_id = {j.job.job_id: j for j in sim_jobs}
    steps_of = {job_id: j.steps for job_id, j in by_id.items()}
    config = PlanConfig(packing=packing)
    queued = {j.job.job_id: j.job for j in sim_jobs}
    now = max(j.job.submitted_at for j in sim_jobs)
    executors = {m.executor_id: _Executor(m) for m in machines}
    scheduler = _SimScheduler()
    durations = []
    assigned = 0

    def step(executor: _Executor) -> None:
        if not executor.measure(by_id, now, scheduler.factors().get(executor.key, 1.0)):
            for job_id in executor.recover_from_oom(now):
                queued[job_id] = by_id[job_id].job

    for _ in range(rounds):
        views = scheduler.views(executors.values(), by_id, steps_of)
        config_now = replace(config, memory_factors=scheduler.factors())
        queue = list(queued.values())
        began = time.perf_counter()
        decisions = plan(queue, views, tenants, now, config_now)
        durations.append(time.perf_counter() - began)
        touched = []
        for decision in decisions:
            executor, sim_job = executors[decision.executor_id], by_id[decision.job_id]
            if not executor.cohort and executor.key != sim_job.job.compat_key:
                executor.load(sim_job, now)
            executor.join(sim_job, float(sim_job.steps), 1)
            del queued[decision.job_id]
            if executor not in touched:
                touched.append(executor)
        for executor in touched:
            step(executor)
        assigned += len(decisions)
        for executor in executors.values():  # between rounds about a tenth of running jobs finish
            done = [j for j in executor.cohort if rng.random() <= 0.1]
            for job_id in done:
                executor.leave(job_id)
            if done:
                step(executor)
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
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    jobs, tenants, machines = make_workload(num_jobs, num_tenants, num_executors, seed, load)
    result = {
        "workload": {"jobs": num_jobs, "tenants": num_tenants, "executors": num_executors, "seed": seed,
                     "load": load, "gpus": {g.name: sum(1 for m in machines if m.gpu is g) for g in GPU_CLASSES},
                     "executors_in_passes": sum(1 for m in machines if m.max_pass_tokens is not None),
                     "dtypes": {d: sum(1 for j in jobs if j.plan.dtype == d) for d in DTYPES}},
        "strategies": {s: simulate(jobs, tenants, machines, s, plan_interval_s=plan_interval_s) for s in strategies},
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
