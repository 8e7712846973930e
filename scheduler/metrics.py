"""Every Prometheus metric lorafleet exports, defined in one place.

Naming follows Prometheus conventions: base units (`_seconds`, `_bytes`, `_watts`, `_celsius`), `_total` for
counters, `_ratio` for 0..1. Labels are bounded: `tenant` (tenants are created by an operator), `state` (the job
states), `executor` (one per GPU process), `reason` and `resource` (enums here), `task` (the API's task names and
routes). The one label with job ids, `job_id` (not `job`, which Prometheus gives the scrape job), is on the
per-running-job series of an executor: at most its cohort's size, each removed when its job leaves the executor.

Each process builds its own registry (`scheduler_metrics()`, `executor_metrics()`, `api_metrics()`), which also
carries `lorafleet_build_info` and the `process_*` metrics, and serves it with `serve(registry, port, addr, health)`,
next to `/healthz` (its main loop comes round) and `/readyz` (it can do its work). Default ports (what a scrape
config relies on; `DEFAULT_PORTS`): scheduler 9464, submission worker 9463, executor 9465 + N for cuda:N (a CPU
executor 9465); the gateway serves /metrics on its own HTTP port. Port 0 picks a free port (logged).

The scheduler's fleet series (jobs, executors, cohorts, tenants, failures) are exported by the leader alone: a
standby exports none of them, so a plain `sum` over the schedulers is the fleet's, right after a failover too.
Counters kept in Redis (`lorafleet:job_failures`, `lorafleet:tenant_gpu_seconds_total`) are exported by the leader
from there (`RedisCounters`), so they do not restart with a scheduler.
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterable, Mapping, Optional

from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from lorafleet.scheduler.records import FailureReason, GpuStats, StepStats, SubmissionRefusal

# `lorafleet_scheduler_requeued_total{reason}`: its executor died; its executor looked past it without holding it
REQUEUED_EXECUTOR_LOST, REQUEUED_NOT_HELD = "executor_lost", "not_held"
REQUEUE_REASONS = (REQUEUED_EXECUTOR_LOST, REQUEUED_NOT_HELD)  # all exported from 0
FAILURE_REASONS = tuple(reason.value for reason in FailureReason)  # all exported from 0
REFUSALS = tuple(reason.value for reason in SubmissionRefusal)  # all exported from 0
QUOTA_RESOURCES = ("queued", "running")  # lorafleet_tenant_quota_used_ratio{resource}: count / the tenant's limit
API_OUTCOMES = ("ok", "refused", "error")  # refused: the caller's error (4xx, TENANT_ERRORS); error: ours
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PLAN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
QUEUE_WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
SNAPSHOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
PUBLISH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
SCHEDULER_PORT, WORKER_PORT, EXECUTOR_BASE_PORT = 9464, 9463, 9465
DEFAULT_PORTS = {"scheduler": SCHEDULER_PORT, "worker": WORKER_PORT, "executor": EXECUTOR_BASE_PORT}


def executor_port(device: str) -> int:
    """The default metrics port of the executor on `device`: 9465 + N for cuda:N, 9465 for a CPU."""
    index = device.partition(":")[2] if device.startswith("cuda") else ""
    return EXECUTOR_BASE_PORT + (int(index) if index.isdigit() else 0)


def _registry(component: str) -> CollectorRegistry:
    """A process's registry, with `lorafleet_build_info{version,component}` = 1 and the `process_*` metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    try:
        release = version("lorafleet")
    except PackageNotFoundError:  # run from a checkout that was never installed
        release = "unknown"
    Gauge("lorafleet_build_info", "lorafleet's version and the process's component (always 1)",
          ["version", "component", "python"], registry=registry).labels(
        version=release, component=component, python=platform.python_version()).set(1)
    return registry


class RedisCounters:
    """Counters whose values live in Redis (they outlive any one process): the leader sets them from there as it
    reads them, a standby withdraws them. Every label value in `initial` is exported from 0."""

    def __init__(self, name: str, doc: str, label: str, registry: CollectorRegistry, initial: Iterable[str] = ()):
        self.name, self.doc, self.label, self.initial = name, doc, label, tuple(initial)
        self.values: Optional[dict[str, float]] = None  # None: not exported (a standby)
        registry.register(self)

    def set_all(self, values: Mapping[str, float]) -> None:
        self.values = {**dict.fromkeys(self.initial, 0.0), **values}

    def withdraw(self) -> None:
        self.values = None

    def describe(self):
        return [CounterMetricFamily(self.name, self.doc, labels=[self.label])]

    def collect(self):
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        for value, count in sorted((self.values or {}).items()):
            family.add_metric([value], count)
        yield family


@dataclass
class SchedulerMetrics:
    registry: CollectorRegistry
    jobs: Gauge
    executors_alive: Gauge
    cohort_jobs: Gauge
    plan_duration: Histogram
    assignments: Counter
    requeued: Counter
    is_leader: Gauge
    rejected_messages: Gauge
    queue_wait: Histogram
    quota_used: Gauge
    job_failures: RedisCounters
    tenant_gpu_seconds: RedisCounters
    generation_queued: Gauge  # labelled base

    def withdraw_fleet_series(self) -> None:
        """What a standby does: export none of the fleet's series (the leader's are the fleet's)."""
        for gauge in (self.jobs, self.cohort_jobs, self.quota_used, self.generation_queued):
            gauge.clear()
        self.executors_alive.set(0)
        self.job_failures.withdraw()
        self.tenant_gpu_seconds.withdraw()


def scheduler_metrics() -> SchedulerMetrics:
    """The scheduler's metrics; labelled counters start at 0 for every label value they can take, so that
    `increase()` sees their first increment (a series born at 1 looks like no change)."""
    registry = _registry("scheduler")
    metrics = SchedulerMetrics(
        registry=registry,
        jobs=Gauge("lorafleet_jobs", "Jobs by tenant and state", ["tenant", "state"], registry=registry),
        executors_alive=Gauge("lorafleet_executors_alive", "Executors with a live heartbeat (0 on a standby)",
                              registry=registry),
        cohort_jobs=Gauge(
            "lorafleet_cohort_jobs", "Jobs assigned to each executor's cohort", ["executor"], registry=registry
        ),
        plan_duration=Histogram(
            "lorafleet_scheduler_plan_duration_seconds", "Time of one planning round", buckets=PLAN_BUCKETS,
            registry=registry,
        ),
        assignments=Counter(
            "lorafleet_scheduler_assignments_total", "Jobs assigned to executors", ["tenant"], registry=registry
        ),
        requeued=Counter(
            "lorafleet_scheduler_requeued_total", "Jobs the scheduler sent back to the queue (their executor stopped heartbeating)",
            ["reason"], registry=registry,
        ),
        is_leader=Gauge("lorafleet_scheduler_leader", "1 while this scheduler holds the leader lock", registry=registry),
        rejected_messages=Gauge(
            "lorafleet_submission_rejected_messages",
            "Submission messages the workers refused before running them, by kind, since the store began",
            ["kind"], registry=registry,
        ),
        queue_wait=Histogram(
            "lorafleet_queue_wait_seconds", "Time a job waited in the queue before it was assigned (since it last "
            "entered the queue)", ["tenant"], buckets=QUEUE_WAIT_BUCKETS, registry=registry,
        ),
        quota_used=Gauge(
            "lorafleet_tenant_quota_used_ratio", "A tenant's queued or running jobs over its limit",
            ["tenant", "resource"], registry=registry,
        ),
        job_failures=RedisCounters("lorafleet_job_failures", "Jobs failed, by reason (kept in Redis)", "reason",
                                   registry, FAILURE_REASONS),
        tenant_gpu_seconds=RedisCounters("lorafleet_tenant_gpu_seconds", "GPU seconds used by each tenant's jobs "
                                         "(a step's time shared by its tokens; kept in Redis)", "tenant", registry),
        generation_queued=Gauge("lorafleet_generation_queued", "Generation requests waiting for an executor, by "
                                 "base (as requests named it)", ["base"], registry=registry),
    )
    for reason in REQUEUE_REASONS:
        metrics.requeued.labels(reason=reason)
    return metrics


@dataclass
class ExecutorMetrics:
    registry: CollectorRegistry
    executor_id: str
    cohort_jobs: Gauge
    tokens_trained: Counter  # labelled executor, tenant
    steps: Counter
    graphed_steps: Counter
    step_duration: Histogram
    mfu: Gauge  # labelled executor; a series only where the peak is known
    packing_efficiency: Gauge
    memory_allocated: Gauge
    memory_peak: Gauge
    gpu: dict[str, Gauge]  # GpuStats field -> gauge labelled executor; series only once NVML measured them
    job_loss: Gauge  # labelled executor, tenant, job_id: one series per running job
    job_progress: Gauge
    generation_requests: Counter  # labelled executor, outcome (answered, failed)
    generation_tokens: Counter
    generation_batch_duration: Histogram
    snapshot_duration: Histogram
    publish_backlog: Gauge
    publish_duration: Histogram
    publications: Counter  # labelled executor, kind (checkpoint, result), outcome (recorded, refused, failed)

    def record_publication(self, kind: str, outcome: str, seconds: float) -> None:
        """One snapshot the publisher is done with (executor/publisher.py): its outcome, and the seconds from the
        loop handing it over to then."""
        self.publications.labels(executor=self.executor_id, kind=kind, outcome=outcome).inc()
        self.publish_duration.observe(seconds)

    def record_generation(self, seconds: float, answered: int, failed: int, tokens: int) -> None:
        """One batch of generation requests (executor/serving.py): the time training waited for it."""
        self.generation_batch_duration.observe(seconds)
        self.generation_requests.labels(executor=self.executor_id, outcome="answered").inc(answered)
        self.generation_requests.labels(executor=self.executor_id, outcome="failed").inc(failed)
        self.generation_tokens.inc(tokens)

    def record_step(self, step: StepStats, tokens_by_tenant: Mapping[str, int]) -> None:
        self.steps.inc()
        if step.graphed:
            self.graphed_steps.inc()
        self.step_duration.observe(step.seconds)
        for tenant, tokens in tokens_by_tenant.items():
            self.tokens_trained.labels(executor=self.executor_id, tenant=tenant).inc(tokens)
        if step.mfu is not None:
            self.mfu.labels(executor=self.executor_id).set(step.mfu)
        if step.packing_efficiency is not None:
            self.packing_efficiency.labels(executor=self.executor_id).set(step.packing_efficiency)

    def record_gpu(self, gpu: Optional[GpuStats]) -> None:
        if gpu is None:
            return
        for field, gauge in self.gpu.items():
            value = getattr(gpu, field)
            if value is not None:
                gauge.labels(executor=self.executor_id).set(value)

    def record_job(self, job_id: str, tenant: str, loss: Optional[float], step: int, total_steps: int) -> None:
        labels = {"executor": self.executor_id, "tenant": tenant, "job_id": job_id}
        if loss is not None:
            self.job_loss.labels(**labels).set(loss)
        self.job_progress.labels(**labels).set(step / total_steps if total_steps else 0.0)

    def forget_job(self, job_id: str, tenant: str) -> None:
        """The job left this executor: its series go (removing a series never set is no error)."""
        for gauge in (self.job_loss, self.job_progress):
            try:
                gauge.remove(self.executor_id, tenant, job_id)
            except KeyError:
                pass


GENERATION_OUTCOMES = ("answered", "failed")
PUBLICATION_KINDS = ("checkpoint", "result")
PUBLICATION_OUTCOMES = ("recorded", "refused", "failed")


def _generation_requests(registry: CollectorRegistry, executor_id: str) -> Counter:
    """Generation requests by outcome, each outcome exported from 0."""
    counter = Counter("lorafleet_generation_requests", "Generation requests this executor answered, by outcome "
                      "(answered, failed)", ["executor", "outcome"], registry=registry)
    for outcome in GENERATION_OUTCOMES:
        counter.labels(executor=executor_id, outcome=outcome)
    return counter


def _publications(registry: CollectorRegistry, executor_id: str) -> Counter:
    """Publications by kind and outcome, each exported from 0."""
    counter = Counter("lorafleet_publications", "Checkpoints and results the executor's publisher is done with, by "
                      "kind and outcome (recorded; refused: the lease had moved on; failed: storage)",
                      ["executor", "kind", "outcome"], registry=registry)
    for kind in PUBLICATION_KINDS:
        for outcome in PUBLICATION_OUTCOMES:
            counter.labels(executor=executor_id, kind=kind, outcome=outcome)
    return counter


def executor_metrics(executor_id: str) -> ExecutorMetrics:
    registry = _registry("executor")
    label = {"executor": executor_id}

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["executor"], registry=registry).labels(**label)

    def measured(name: str, doc: str) -> Gauge:  # no series until a value was measured: absent, not a false 0
        return Gauge(name, doc, ["executor"], registry=registry)

    per_job = ["executor", "tenant", "job_id"]
    return ExecutorMetrics(
        registry=registry,
        executor_id=executor_id,
        cohort_jobs=gauge("lorafleet_executor_cohort_jobs", "Jobs training in this executor's cohort"),
        tokens_trained=Counter("lorafleet_tokens_trained", "Target tokens trained, by tenant",
                               ["executor", "tenant"], registry=registry),
        steps=Counter("lorafleet_cohort_steps", "Cohort steps run", ["executor"], registry=registry).labels(**label),
        graphed_steps=Counter("lorafleet_cohort_graphed_steps", "Cohort steps run as a CUDA graph's replay (the rest "
                              "launched eagerly: a new layout, or a graph that could not be captured)", ["executor"],
                              registry=registry).labels(**label),
        step_duration=Histogram(
            "lorafleet_step_duration_seconds", "Wall time of one cohort step", ["executor"], buckets=STEP_BUCKETS,
            registry=registry,
        ).labels(**label),
        mfu=measured("lorafleet_executor_mfu_ratio", "Model FLOPs utilisation of the last step: 4 x frozen "
                     "parameters x tokens/s over the device's peak (absent where the peak is unknown)"),
        packing_efficiency=measured("lorafleet_packing_efficiency_ratio", "Share of the jobs' token budget "
                                    "(batch_size x max_seq_len) the last step filled"),
        memory_allocated=gauge("lorafleet_gpu_memory_allocated_bytes", "Device memory the allocator holds now"),
        memory_peak=measured("lorafleet_gpu_memory_peak_bytes", "Peak device memory of the last step (absent before "
                             "one)"),
        gpu=_gpu_gauges(measured),
        job_loss=Gauge("lorafleet_job_loss", "Training loss of each running job's last step", per_job,
                       registry=registry),
        job_progress=Gauge("lorafleet_job_progress_ratio", "Optimizer steps done over total, each running job",
                           per_job, registry=registry),
        generation_requests=_generation_requests(registry, executor_id),
        generation_tokens=Counter("lorafleet_generation_tokens", "Tokens generated for generation requests",
                                  ["executor"], registry=registry).labels(**label),
        generation_batch_duration=Histogram(
            "lorafleet_generation_batch_seconds", "Wall time of one batch of generation requests (between steps: "
            "what training waited)", ["executor"], buckets=STEP_BUCKETS, registry=registry).labels(**label),
        snapshot_duration=Histogram(
            "lorafleet_snapshot_seconds", "Training-loop time to take one job's snapshot to publish (a checkpoint or "
            "its result): what the cohort waits for", ["executor"], buckets=SNAPSHOT_BUCKETS,
            registry=registry).labels(**label),
        publish_backlog=gauge("lorafleet_publish_backlog", "Snapshots handed to the publisher and not yet done "
                              "with (growing: storage slower than the checkpoints come)"),
        publish_duration=Histogram(
            "lorafleet_publish_duration_seconds", "From a snapshot handed to the publisher to its artifact recorded: "
            "waiting behind earlier ones, writing, copying into the artifact store, recording", ["executor"],
            buckets=PUBLISH_BUCKETS, registry=registry).labels(**label),
        publications=_publications(registry, executor_id),
    )


def _gpu_gauges(measured: Callable[[str, str], Gauge]) -> dict[str, Gauge]:
    """The card's own readings, from NVML (the executor reads them through `executor.gpu`; absent where NVML cannot)."""
    return {
        "memory_total_bytes": measured("lorafleet_gpu_memory_total_bytes", "GPU memory, from NVML"),
        "memory_used_bytes": measured("lorafleet_gpu_memory_used_bytes", "GPU memory used (all processes), "
                                      "from NVML"),
        "memory_free_bytes": measured("lorafleet_gpu_memory_free_bytes", "GPU memory free, from NVML"),
        "utilization": measured("lorafleet_gpu_utilization_ratio", "GPU utilisation, from NVML"),
        "power_watts": measured("lorafleet_gpu_power_watts", "GPU power draw, from NVML"),
        "temperature_celsius": measured("lorafleet_gpu_temperature_celsius", "GPU temperature, from NVML"),
        "sm_clock_hertz": measured("lorafleet_gpu_sm_clock_hertz", "GPU streaming multiprocessors' clock, from "
                                   "NVML"),
    }


@dataclass
class ApiMetrics:
    """The tenant API's requests: the Celery submission worker (api="celery", task = task name) and the gateway
    (api="http", task = method and route template)."""

    registry: CollectorRegistry
    api: str
    requests: Counter
    duration: Histogram
    submissions_refused: Counter  # labelled api, reason

    def refused(self, reason: SubmissionRefusal) -> None:
        self.submissions_refused.labels(api=self.api, reason=SubmissionRefusal(reason).value).inc()

    def observe(self, task: str, outcome: str, seconds: float) -> None:
        self.requests.labels(api=self.api, task=task, outcome=outcome).inc()
        self.duration.labels(api=self.api, task=task).observe(seconds)

    def declare(self, task: str) -> None:
        """Export the task's series from 0, so that rate() and increase() see its first request."""
        self.duration.labels(api=self.api, task=task)
        for outcome in API_OUTCOMES:
            self.requests.labels(api=self.api, task=task, outcome=outcome)


def api_metrics(component: str, api: str, tasks: Iterable[str] = ()) -> ApiMetrics:
    """Every (task, outcome) in `tasks` is exported from 0."""
    registry = _registry(component)
    metrics = ApiMetrics(
        registry=registry, api=api,
        requests=Counter("lorafleet_api_requests", "Tenant API requests, by task and outcome",
                         ["api", "task", "outcome"], registry=registry),
        duration=Histogram("lorafleet_api_request_duration_seconds", "Tenant API request time, by task",
                           ["api", "task"], buckets=API_BUCKETS, registry=registry),
        submissions_refused=Counter("lorafleet_submissions_refused", "Job submissions refused, by the stage that "
                                    "refused them", ["api", "reason"], registry=registry),
    )
    for reason in REFUSALS:
        metrics.submissions_refused.labels(api=api, reason=reason)
    for task in tasks:
        metrics.declare(task)
    return metrics


def metric_names() -> set[str]:
    """Every metric family lorafleet defines, as Prometheus names it in an exposition (counters with `_total`,
    histograms as their base name); what the dashboards and alerts may use besides `up` and `process_*`."""
    names = set()
    for registry in (scheduler_metrics().registry, executor_metrics("x").registry,
                     api_metrics("worker", "celery").registry):
        for family in registry.collect():
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


class ServeError(RuntimeError):
    """The metrics and health listener could not start (its port is taken, say): the message says which and why."""


class Health:
    """What `/healthz` and `/readyz` answer. Live: the process's main loop came round within `stall_seconds` (it calls
    `tick`). Ready: live, and `not_ready` is None (it holds the reason it cannot do its work yet, e.g. Redis down)."""

    def __init__(self, stall_seconds: float):
        self.stall_seconds = stall_seconds
        self.last_tick = time.monotonic()
        self.not_ready: Optional[str] = "starting"

    def tick(self, not_ready: Optional[str] = None) -> None:
        self.last_tick, self.not_ready = time.monotonic(), not_ready

    def live(self) -> Optional[str]:
        stalled = time.monotonic() - self.last_tick
        return f"main loop stalled for {stalled:.0f} s" if stalled > self.stall_seconds else None

    def ready(self) -> Optional[str]:
        return self.live() or self.not_ready


def serve(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1", health: Optional[Health] = None) -> int:
    """Serve /metrics, /healthz and /readyz on addr:port in a daemon thread; return the bound port (port 0: any free
    one). ServeError naming the address when it cannot listen there."""
    health = health or Health(float("inf"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                return self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            if path in ("/healthz", "/readyz"):
                problem = health.live() if path == "/healthz" else health.ready()
                return self._answer(503 if problem else 200, (problem or "ok").encode() + b"\n", "text/plain")
            return self._answer(404, b"not found: /metrics, /healthz or /readyz\n", "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every 15 s are not worth a log line each
            pass

    try:
        server = ThreadingHTTPServer((addr, port), Handler)
    except OSError as exc:
        raise ServeError(f"cannot serve metrics and health on {addr}:{port}: {exc.strerror}; pass another "
                         "--metrics-port (0: any free port) or --metrics-addr") from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_address[1]
