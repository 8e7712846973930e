"""Every Prometheus metric lorafleet exports, defined in one place.

Naming follows Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` for counters, `_ratio` for 0..1.
Labels are bounded: `tenant` (tenants are created by an operator), `state` (the six job states), `executor`
(one per GPU process). Job ids never become labels.

Each process builds its own registry with `scheduler_metrics()` or `executor_metrics()` and serves it with
`serve(registry, port, addr, health)`, next to `/healthz` (its main loop comes round) and `/readyz` (it can do its
work); port 0 picks a free port (its number is returned and logged).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# `lorafleet_scheduler_requeued_total{reason}`: its executor died; its executor looked past it without holding it
REQUEUED_EXECUTOR_LOST, REQUEUED_NOT_HELD = "executor_lost", "not_held"
REQUEUE_REASONS = (REQUEUED_EXECUTOR_LOST, REQUEUED_NOT_HELD)  # all exported from 0
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
    gpu_utilization: Gauge  # labelled by executor; a series only once a value was measured
    job_failures: Counter


def scheduler_metrics() -> SchedulerMetrics:
    """The scheduler's metrics; labelled counters start at 0 for every label value they can take, so that
    `increase()` sees their first increment (a series born at 1 looks like no change)."""
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(
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
    for reason in REQUEUE_REASONS:
        metrics.requeued.labels(reason=reason)
    return metrics


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
        # no series until measured: a CPU or a GPU without NVML shows no utilisation rather than a false 0
        gpu_utilization=Gauge("lorafleet_gpu_utilization_ratio", "GPU utilisation from NVML (absent without NVML)",
                              ["executor"], registry=registry),
        job_failures=Counter(
            "lorafleet_job_failures_total", "Jobs this executor failed", ["executor"], registry=registry
        ).labels(**label),
    )


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
