"""Scheduling policy: pure functions from a snapshot of the fleet to decisions. No Redis, no clocks, no randomness.

The scheduler service reads queued jobs, executors and tenants from Redis, calls `plan(...)`, and writes the
assignments back; the simulator (`lorafleet.scheduler.simulate`) calls the very same `plan`. See docs/SCHEDULING.md.

Memory model (bytes on the device):
    executor = base weights + sum over its cohort of (adapter/optimizer state + activations of one micro-batch)
each term estimated from the model's shape and the job's spec, then multiplied by a per-compatibility-key
calibration factor learned from the peaks executors report (`calibrate`). An executor that runs its steps in passes
(`--max-pass-tokens N`) holds the activations of one pass, not of every job at once (`cohort_bytes`).
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

PACKINGS = ("optimal-fit", "fast-fit", "trivial")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto = bfloat16 on a GPU
# Storage per parameter of the frozen base. nf4: 4-bit codes + one fp32 absmax per 64-value block (bitsandbytes
# default); int8: 1 byte + one fp32 scale per row, negligible for real widths.
_QUANT_BYTES_PER_PARAM = {"nf4": 0.5 + 4 / 64, "int8": 1.0}
# Trainable adapter parameter: fp32 weight + fp32 grad + Adam's two fp32 moments.
_ADAPTER_STATE_BYTES_PER_PARAM = 16
# Activations kept for the backward of one transformer layer, per token, in units of hidden_size * 2-byte elements
# (Korthikanti et al. 2022, "Reducing Activation Recomputation", 34*s*b*h per layer with flash attention).
_ACTIVATION_ELEMENTS_PER_TOKEN_PER_HIDDEN = 17


# --------------------------------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only base model that its memory footprint depends on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    vocab_size: int

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_kv_heads",
                     "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("ModelShape.hidden_size must be a multiple of num_attention_heads")

    @classmethod
    def from_config(cls, config: Mapping) -> "ModelShape":
        """From a Hugging Face `config.json` dict (Llama/Mistral/Qwen2/Gemma naming)."""
        try:
            heads = config["num_attention_heads"]
            return cls(
                hidden_size=config["hidden_size"],
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_attention_heads=heads,
                num_kv_heads=config.get("num_key_value_heads") or heads,
                vocab_size=config["vocab_size"],
            )
        except KeyError as exc:
            raise ValueError(f"model config lacks {exc.args[0]!r}") from None

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection LoRA can target."""
        h, kv = self.hidden_size, self.hidden_size // self.num_attention_heads * self.num_kv_heads
        i = self.intermediate_size
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def num_params(self) -> int:
        per_layer = sum(d_in * d_out for d_in, d_out in self.projection_dims().values()) + 2 * self.hidden_size
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size + self.hidden_size


def estimate_base_bytes(params: int, quantization: str, dtype: str) -> int:
    """Bytes of the frozen base weights on the device ("auto" dtype counts as bfloat16, a GPU's choice)."""
    if not isinstance(params, int) or params < 1:
        raise ValueError(f"params must be a positive integer, got {params!r}")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    if quantization == "none":
        return params * _DTYPE_BYTES[dtype]
    if quantization not in _QUANT_BYTES_PER_PARAM:
        raise ValueError(f"unknown quantization {quantization!r}; expected 'none', 'nf4' or 'int8'")
    return math.ceil(params * _QUANT_BYTES_PER_PARAM[quantization])


def estimate_job_bytes(
    shape: ModelShape,
    r: int,
    target_modules: Sequence[str],
    batch_size: int,
    max_seq_len: int,
    dtype: str,
) -> int:
    """Bytes one job adds to a cohort: adapter weights, grads and Adam state, plus activations of one micro-batch."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    for name, value in (("r", r), ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    dims = shape.projection_dims()
    adapter_params = 0
    for module in target_modules:
        if module not in dims:
            raise ValueError(f"cannot size target module {module!r}; the memory model knows {sorted(dims)}")
        d_in, d_out = dims[module]
        adapter_params += r * (d_in + d_out)
    adapter_params *= shape.num_layers
    return (adapter_params * _ADAPTER_STATE_BYTES_PER_PARAM
            + estimate_activation_bytes(shape, batch_size, max_seq_len, dtype))


def estimate_activation_bytes(shape: ModelShape, batch_size: int, max_seq_len: int, dtype: str) -> int:
    """The activations part of `estimate_job_bytes`: what one micro-batch keeps for the backward."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_BYTES)}")
    element = _DTYPE_BYTES[dtype]
    per_token = (shape.num_layers * _ACTIVATION_ELEMENTS_PER_TOKEN_PER_HIDDEN * shape.hidden_size * element
                 + shape.vocab_size * (element + 4))  # logits, plus their fp32 copy for the loss
    return batch_size * max_seq_len * per_token


def estimate_gpu_seconds(tokens: int, params: int, tokens_per_second_at_8b: float = 10_000.0) -> float:
    """GPU time a job of `tokens` needs, for fair-share accounting: training FLOPs grow with parameters x tokens.

    The default rate is an 8B base in a full cohort on one H100 (the developers' guide: 6.9k tok/s for one 4x512 job,
    13.8k tok/s ceiling for the bare base); pass a measured one when the fleet has it.
    """
    if tokens < 0 or params < 1 or tokens_per_second_at_8b <= 0:
        raise ValueError(f"need tokens >= 0, params >= 1 and a positive rate, got {tokens}, {params}, "
                         f"{tokens_per_second_at_8b}")
    return tokens * (params / 8e9) / tokens_per_second_at_8b


@dataclass(frozen=True)
class MemoryCalibration:
    """observed / predicted device memory for one compatibility key; multiplies every estimate for that key."""

    factor: float = 1.0
    observations: int = 0


def calibrate(model: MemoryCalibration, observed_peak: int, predicted: int, smoothing: float = 0.2
              ) -> MemoryCalibration:
    """Fold one reported peak into the calibration.

    `predicted` is the uncalibrated estimate (base + cohort jobs) for the executor that reported `observed_peak`.
    Under-estimates are corrected at once (an OOM costs far more than idle memory); over-estimates decay slowly
    by exponential smoothing so one quiet step does not shrink the safety margin.
    """
    if predicted <= 0 or observed_peak <= 0:
        raise ValueError(f"observed_peak and predicted must be positive, got {observed_peak} and {predicted}")
    if not 0 < smoothing <= 1:
        raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
    ratio = observed_peak / predicted
    if model.observations == 0 or ratio > model.factor:
        factor = ratio
    else:
        factor = model.factor + smoothing * (ratio - model.factor)
    return MemoryCalibration(factor=factor, observations=model.observations + 1)


def cohort_bytes(jobs: Sequence["QueuedJob | RunningJob"], max_pass_tokens: Optional[int]) -> float:
    """Bytes a cohort of `jobs` adds to its base (uncalibrated).

    Without passes a step holds every job's micro-batch activations at once: the sum of the jobs' bytes. An executor
    started with `--max-pass-tokens N` runs the forward + backward in passes of whole sequences of at most N tokens
    (a longer sequence is a pass of its own), so it holds one pass's activations: bytes per token x
    min(the cohort's tokens, max(N, its longest sequence)), next to every job's adapter state.
    """
    return _CohortMemory().add_all(jobs).bytes(max_pass_tokens)


class _CohortMemory:
    """The sums `cohort_bytes` needs, kept as jobs join so the planner prices a join in O(1)."""

    __slots__ = ("state", "activations", "tokens", "per_token", "longest")

    def __init__(self):
        self.state, self.activations, self.tokens, self.per_token, self.longest = 0, 0, 0, 0.0, 0

    def add_all(self, jobs) -> "_CohortMemory":
        for job in jobs:
            self.add(job)
        return self

    def add(self, job) -> None:
        self.state += job.job_bytes - job.activation_bytes
        self.activations += job.activation_bytes
        self.tokens += job.tokens_per_step
        if job.tokens_per_step:
            self.per_token = max(self.per_token, job.activation_bytes / job.tokens_per_step)
        self.longest = max(self.longest, job.max_seq_len)

    def with_job(self, job) -> "_CohortMemory":
        joined = _CohortMemory()
        joined.state, joined.activations, joined.tokens, joined.per_token, joined.longest = (
            self.state, self.activations, self.tokens, self.per_token, self.longest)
        joined.add(job)
        return joined

    def bytes(self, max_pass_tokens: Optional[int]) -> float:
        if max_pass_tokens is None:
            return self.state + self.activations
        held_tokens = min(self.tokens, max(max_pass_tokens, self.longest))
        return self.state + min(self.activations, self.per_token * held_tokens)


def pass_tokens(planned: int, free_bytes: float, bytes_per_token: float) -> int:
    """Tokens per pass for an executor the planner counts on passes of `planned` tokens: the most whose activations
    fit in `free_bytes` (its usable memory less what is allocated before the step), never fewer than `planned`.
    Fewer, larger passes are faster: each pass pays the step's host time again."""
    if bytes_per_token <= 0 or free_bytes <= 0:
        return planned
    return max(planned, int(free_bytes // bytes_per_token))


def peak_at_planned_passes(peak: int, allocated_before: int, step_tokens: int, largest_pass_tokens: int,
                           planned: int, bytes_per_token: float) -> int:
    """The peak a step would have had in passes of `planned` tokens, from the one it had: what the executor reports,
    so that the planner's model and its calibration see the memory they planned, not what the executor borrowed
    from free memory for speed. The larger of two guesses, so as not to under-report: the step's activations (peak
    less what was allocated before it) scaled from its largest pass to the planned one, which misses what does not
    grow with tokens (16% low on 1B, run J9), and the planner's own per-token estimate."""
    planned_pass = min(step_tokens, planned)
    if largest_pass_tokens <= planned_pass:
        return peak
    scaled = max(0, peak - allocated_before) * planned_pass / largest_pass_tokens
    return int(allocated_before + max(scaled, bytes_per_token * planned_pass))


USAGE_HALF_LIFE_SECONDS = 4 * 3600.0  # fair share forgets GPU time used this long ago by half


def decayed_usage(value: float, at: float, now: float, half_life: float = USAGE_HALF_LIFE_SECONDS) -> float:
    """GPU seconds `value` recorded at time `at`, as they count at `now` (exponential decay)."""
    return value * math.exp(-math.log(2) / half_life * max(0.0, now - at))


# --------------------------------------------------------------------------------------------------- plan inputs


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


# --------------------------------------------------------------------------------------------------- plan


class _Slot:
    """One executor as the planner fills it during a round."""

    __slots__ = ("view", "usable", "key", "used", "foreign", "jobs", "tokens", "reserved", "passes", "cohort")

    def __init__(self, view: ExecutorView, memory_fraction: float, factors: Mapping[str, float]):
        self.view = view
        self.usable = int(view.total_bytes * memory_fraction)
        self.key = view.loaded_compat_key if view.running else None  # None: idle, may take any key
        self.passes = view.max_pass_tokens
        self.cohort = _CohortMemory().add_all(view.running)
        reported_used = view.total_bytes - view.free_bytes
        modelled_cohort = self.cohort.bytes(self.passes)
        if view.loaded_compat_key is None:
            self.used = reported_used
        else:
            factor = factors.get(view.loaded_compat_key, 1.0)
            self.used = max(view.loaded_base_bytes + modelled_cohort * factor, reported_used)
        # memory held by something other than our base and cohort (another process, fragmentation)
        self.foreign = max(0, reported_used - view.loaded_base_bytes - modelled_cohort)
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
        """Whether this executor's device computes in the job's dtype."""
        return job.dtype == "auto" or self.view.dtypes is None or job.dtype in self.view.dtypes

    def need(self, job: QueuedJob, factor: float) -> float:
        """Calibrated bytes `job` would add to what `room` counts: with passes, less than its own estimate."""
        if self._new_cohort(job.compat_key):
            return cohort_bytes([job], self.passes) * factor
        return (self.cohort.with_job(job).bytes(self.passes) - self.cohort.bytes(self.passes)) * factor

    def take(self, job: QueuedJob, factor: float, base_bytes: float) -> None:
        added = self.need(job, factor)
        if self._new_cohort(job.compat_key):
            self.used, self.cohort = self.foreign + base_bytes, _CohortMemory()
        self.key = job.compat_key
        self.used += added
        self.cohort.add(job)
        self.jobs += 1
        self.tokens += job.tokens_per_step


def plan(
    queued: Sequence[QueuedJob],
    executors: Sequence[ExecutorView],
    tenants: Mapping[str, TenantView] | Sequence[TenantView],
    now: float,
    config: PlanConfig = PlanConfig(),
) -> list[Assignment]:
    """Decide which queued jobs start where in this round.

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
    if len({j.job_id for j in queued}) != len(queued):
        raise ValueError("queued jobs have duplicate job_id")
    if len({e.executor_id for e in executors}) != len(executors):
        raise ValueError("executors have duplicate executor_id")

    factors = config.memory_factors
    slots = [_Slot(e, config.memory_fraction, factors) for e in sorted(executors, key=lambda e: e.executor_id)
             if e.alive]
    if config.packing == "fast-fit":
        slots.sort(key=lambda s: (s.view.total_bytes, s.view.executor_id))
    if not queued or not slots:
        return []
    if not any(s.key is None or s.jobs < config.max_cohort_jobs and s.room(s.key, 0) > 0 for s in slots):
        return []  # the whole fleet is full: the common case under load, answered before any sorting
    order = {id(s): i for i, s in enumerate(slots)}
    idle_by_loaded: dict[Optional[str], list[_Slot]] = {}
    cohorts: dict[str, list[_Slot]] = {}
    for slot in slots:
        if slot.key is None:
            idle_by_loaded.setdefault(slot.view.loaded_compat_key, []).append(slot)
        else:
            cohorts.setdefault(slot.key, []).append(slot)

    def first_or_best(candidates, job, factor, base_bytes, best_fit):
        best, best_left = None, None
        for slot in candidates:
            if slot.reserved or slot.jobs >= config.max_cohort_jobs or not slot.runs(job):
                continue
            left = slot.room(job.compat_key, base_bytes) - slot.need(job, factor)
            if left < 0:
                continue
            if not best_fit:
                return slot
            if best is None or left < best_left:
                best, best_left = slot, left
        return best

    demand: dict[str, int] = {}
    for job in queued:
        demand[job.compat_key] = demand.get(job.compat_key, 0) + 1

    def place(job: QueuedJob) -> Optional[_Slot]:
        key = job.compat_key
        factor = factors.get(key, 1.0)
        base_bytes = job.base_bytes * factor
        if config.packing == "trivial":
            candidates = (s for s in slots if s.key is None or s.key == key)
            return first_or_best(candidates, job, factor, base_bytes, best_fit=False)
        best_fit = config.packing == "optimal-fit"
        mine = cohorts.get(key, ())
        target = config.target_cohort_tokens
        other_bases = sorted((loaded for loaded in idle_by_loaded if loaded not in (None, key)),
                             key=lambda loaded: (demand.get(loaded, 0) > 0, loaded))
        classes = (
            idle_by_loaded.get(key, ()),
            (s for s in mine if s.tokens < target),
            idle_by_loaded.get(None, ()),
            [s for loaded in other_bases for s in idle_by_loaded[loaded]],
            (s for s in mine if s.tokens >= target),
        )
        for candidates in classes:
            slot = first_or_best(candidates, job, factor, base_bytes, best_fit)
            if slot is not None:
                return slot
        return None

    assignments: list[Assignment] = []
    running_now = {name: view.running for name, view in tenant_views.items()}
    charged: dict[str, float] = {}  # tenant -> seconds of work its running and newly placed jobs still need
    for slot in slots:
        for job in slot.view.running:
            charged[job.tenant] = charged.get(job.tenant, 0.0) + job.remaining_gpu_seconds

    def at_quota(name: str) -> bool:
        view = tenant_views.get(name)
        return view is not None and view.max_running is not None and running_now.get(name, 0) >= view.max_running

    def commit(job: QueuedJob, slot: _Slot) -> None:
        key = job.compat_key
        factor = factors.get(key, 1.0)
        if slot.key is None:
            idle_by_loaded[slot.view.loaded_compat_key].remove(slot)
            bisect.insort(cohorts.setdefault(key, []), slot, key=lambda s: order[id(s)])
        slot.take(job, factor, job.base_bytes * factor)
        assignments.append(Assignment(job.job_id, slot.view.executor_id, key))
        running_now[job.tenant] = running_now.get(job.tenant, 0) + 1
        charged[job.tenant] = charged.get(job.tenant, 0.0) + job.est_gpu_seconds

    def share_used(name: str) -> float:
        view = tenant_views.get(name) or TenantView(name=name)
        return (view.gpu_seconds + charged.get(name, 0.0)) / view.weight

    # A few overdue jobs (waited reserve_after_seconds) go before the fair-share loop, in fair-share order and then
    # oldest first; one that fits nowhere holds back the executor where it would fit once drained, so small jobs
    # backfilling every gap cannot starve a big one. Under overload every job is overdue and this stays fair.
    overdue = [j for j in queued if now - j.submitted_at >= config.reserve_after_seconds]
    usage_now = {j.tenant: share_used(j.tenant) for j in overdue}
    placed_early = set()
    for job in heapq.nsmallest(config.max_reservations, overdue,
                               key=lambda j: (usage_now[j.tenant], j.submitted_at, j.job_id)):
        if at_quota(job.tenant):
            continue
        slot = place(job)
        if slot is not None:
            commit(job, slot)
            placed_early.add(job.job_id)
            continue
        factor = factors.get(job.compat_key, 1.0)
        could_fit = [s for s in slots if not s.reserved and s.runs(job)
                     and s.usable - s.foreign >= (job.base_bytes + cohort_bytes([job], s.passes)) * factor]
        if could_fit:
            min(could_fit, key=lambda s: (s.key != job.compat_key, -s.view.total_bytes, s.view.executor_id)
                ).reserved = True

    by_tenant: dict[str, list[QueuedJob]] = {}
    for job in queued:
        if job.job_id not in placed_early:
            by_tenant.setdefault(job.tenant, []).append(job)
    # priority + (now - submitted) / aging orders the same for every `now`, so sort by its `now`-free part
    aging = config.aging_seconds
    heap = []
    for name, jobs in by_tenant.items():
        jobs.sort(key=lambda j: (j.submitted_at / aging - j.priority, j.submitted_at, j.job_id))
        if not at_quota(name):
            heap.append((share_used(name), name, 0))
    heapq.heapify(heap)

    # Room only shrinks within a round, so a job that needs at least what a failed job of its key needed at most
    # fails too. A job needs exactly its bytes everywhere without passes; in passes at least its adapter state and
    # at most its bytes.
    smallest_failure: dict[str, float] = {}
    any_passes = any(s.passes is not None for s in slots)
    while heap:
        _, name, cursor = heapq.heappop(heap)
        jobs = by_tenant[name]
        while cursor < len(jobs):
            job = jobs[cursor]
            cursor += 1
            factor = factors.get(job.compat_key, 1.0)
            least = (job.job_bytes - job.activation_bytes if any_passes else job.job_bytes) * factor
            if least >= smallest_failure.get(job.compat_key, math.inf):
                continue
            slot = place(job)
            if slot is None:
                smallest_failure[job.compat_key] = min(job.job_bytes * factor,
                                                       smallest_failure.get(job.compat_key, math.inf))
                continue
            commit(job, slot)
            if cursor < len(jobs) and not at_quota(name):
                heapq.heappush(heap, (share_used(name), name, cursor))
            break
    return assignments
