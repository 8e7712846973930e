"""Every Prometheus metric lorafleet exports, defined in one place.

Naming follows Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` for counters, `_ratio` for 0..1.
Labels are bounded: `tenant` (tenants are created by an operator), `state` (the six job states), `executor`
(one per GPU process). Job ids never become labels.

Each process builds its own registry with `scheduler_metrics()` or `executor_metrics()` and serves it with
`serve(registry, port)`; port 0 picks a free port (its number is returned and logged).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PLAN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


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


@dataclass
class ExecutorMetrics:
    registry: CollectorRegistry
    cohort_jobs: Gauge
    tokens_trained: Counter
    steps: Counter
    step_duration: Histogram
    memory_allocated: Gauge
    memory_peak: Gauge
    gpu_utilization: Gauge
    job_failures: Counter


def scheduler_metrics() -> SchedulerMetrics:
    registry = CollectorRegistry()
    return SchedulerMetrics(
        registry=registry,
        jobs=Gauge("lorafleet_jobs", "Jobs by tenant and state", ["tenant", "state"], registry=registry),
        executors_alive=Gauge("lorafleet_executors_alive", "Executors with a live heartbeat", registry=registry),
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
    )


def executor_metrics(executor_id: str) -> ExecutorMetrics:
    registry = CollectorRegistry()
    label = {"executor": executor_id}

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(name, doc, ["executor"], registry=registry).labels(**label)

    return ExecutorMetrics(
        registry=registry,
        cohort_jobs=gauge("lorafleet_executor_cohort_jobs", "Jobs training in this executor's cohort"),
        tokens_trained=Counter(
            "lorafleet_tokens_trained_total", "Tokens trained, all jobs", ["executor"], registry=registry
        ).labels(**label),
        steps=Counter("lorafleet_cohort_steps_total", "Cohort steps run", ["executor"], registry=registry).labels(
            **label
        ),
        step_duration=Histogram(
            "lorafleet_step_duration_seconds", "Wall time of one cohort step", ["executor"], buckets=STEP_BUCKETS,
            registry=registry,
        ).labels(**label),
        memory_allocated=gauge("lorafleet_gpu_memory_allocated_bytes", "Accelerator memory allocated now"),
        memory_peak=gauge("lorafleet_gpu_memory_peak_bytes", "Peak accelerator memory since the last step"),
        gpu_utilization=gauge("lorafleet_gpu_utilization_ratio", "GPU utilisation from NVML (absent without NVML)"),
        job_failures=Counter(
            "lorafleet_job_failures_total", "Jobs this executor failed", ["executor"], registry=registry
        ).labels(**label),
    )


def serve(registry: CollectorRegistry, port: int, addr: str = "127.0.0.1") -> int:
    """Serve /metrics on addr:port in a daemon thread; return the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server.server_address[1]
