"""Every long-running process answers /healthz (its main loop comes round) and /readyz (it can do its work) next to
/metrics, on the address and port its flags name; a taken port ends it at once with a message, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from prometheus_client import generate_latest

from helpers_polling import wait_until
from lorafleet.scheduler import fleet, keys
from lorafleet.scheduler.metrics import Health, ServeError, scheduler_metrics, serve
from lorafleet.scheduler.records import ExecutorHeartbeat
from lorafleet.scheduler.redis_server import free_port, start_redis_server
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.store import JobStore


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def test_health_says_why_a_process_is_not_live_or_not_ready():
    health = Health(stall_seconds=0.2)
    port = serve(scheduler_metrics().registry, 0, "127.0.0.1", health)
    base = f"http://127.0.0.1:{port}"
    assert get(base + "/healthz") == (200, "ok\n")
    assert get(base + "/readyz") == (503, "starting\n"), "not ready before its loop came round once"
    health.tick("Redis unreachable: connection refused")
    assert get(base + "/readyz") == (503, "Redis unreachable: connection refused\n")
    health.tick()
    assert get(base + "/readyz") == (200, "ok\n")
    status, text = get(base + "/metrics")
    assert status == 200 and "lorafleet_scheduler_leader" in text
    time.sleep(0.3)
    status, text = get(base + "/healthz")
    assert status == 503 and text.startswith("main loop stalled for")
    assert get(base + "/nothing")[0] == 404


def test_a_taken_port_is_named_in_the_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot serve metrics and health on 127.0.0.1:{port}: "):
            serve(scheduler_metrics().registry, port, "127.0.0.1")


def test_the_scheduler_process_serves_health_and_refuses_a_taken_port_cleanly(redis_server, worker_env, tmp_path):
    env = {**worker_env, "REDIS_URL": redis_server.role_url("scheduler")}
    port = free_port()
    command = [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", "scheduler", "--metrics-addr", "127.0.0.1"]
    process = subprocess.Popen([*command, "--metrics-port", str(port)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/readyz"), "the scheduler to be ready", timeout=60)
        assert get(f"http://127.0.0.1:{port}/healthz") == (200, "ok\n")
        second = subprocess.run([*command, "--metrics-port", str(port)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode != 0
        assert f"cannot serve metrics and health on 127.0.0.1:{port}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        process.terminate()
        process.wait(20)


def _answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def test_a_dead_executors_series_go_and_requeue_reasons_start_at_zero(tmp_path):
    """Labelled series a dashboard's increase() and absent() rely on: there from the start, gone with their subject.
    On a Valkey of its own: its scheduler must not take other tests' queued jobs."""
    server = start_redis_server(tmp_path / "redis")
    try:
        _series_follow_their_executor(JobStore(server.client()))
    finally:
        server.stop()


def _series_follow_their_executor(store: JobStore) -> None:
    store.ensure_schema()
    metrics = scheduler_metrics()
    text = generate_latest(metrics.registry).decode()
    assert 'lorafleet_scheduler_requeued_total{reason="executor_lost"} 0.0' in text
    assert 'lorafleet_scheduler_requeued_total{reason="not_held"} 0.0' in text
    scheduler = Scheduler(store, "sched-series", metrics=metrics)
    scheduler.lock.try_acquire()
    fleet.heartbeat(store.r, ExecutorHeartbeat("exec-series", total_bytes=64 * 2**30), ttl=60)
    scheduler.round()
    assert 'lorafleet_cohort_jobs{executor="exec-series"}' in generate_latest(metrics.registry).decode()
    store.r.delete(keys.executor("exec-series"))  # its heartbeat expired
    scheduler.last_export = 0.0
    scheduler.round()
    assert 'executor="exec-series"' not in generate_latest(metrics.registry).decode()
    scheduler.lock.release()


def test_after_a_failover_only_the_new_leader_exports_the_fleets_job_counts(tmp_path):
    """A dashboard sums lorafleet_jobs over the schedulers it scrapes: a deposed leader's stale series would count
    every job twice."""
    server = start_redis_server(tmp_path / "redis")
    try:
        store = JobStore(server.client())
        store.ensure_schema()
        store.create_tenant("acme")
        first, second = (Scheduler(store, name, metrics=scheduler_metrics()) for name in ("sched-a", "sched-b"))
        first.tick()
        assert 'lorafleet_jobs{state="queued",tenant="acme"}' in generate_latest(first.metrics.registry).decode()
        first.lock.release()  # its lease ran out (a pause, a partition)
        second.tick()
        first.tick()
        assert "lorafleet_jobs{" not in generate_latest(first.metrics.registry).decode()
        assert 'lorafleet_jobs{state="queued",tenant="acme"}' in generate_latest(second.metrics.registry).decode()
        assert "lorafleet_scheduler_leader 0.0" in generate_latest(first.metrics.registry).decode()
    finally:
        server.stop()


def test_gpu_readings_are_absent_until_measured_not_a_false_zero():
    from lorafleet.scheduler.metrics import executor_metrics
    from lorafleet.scheduler.records import GpuStats

    metrics = executor_metrics("exec-cpu")
    metrics.record_gpu(None)  # a CPU: NVML measured nothing
    text = generate_latest(metrics.registry).decode()
    assert "lorafleet_gpu_utilization_ratio{" not in text and "lorafleet_gpu_power_watts{" not in text
    metrics.record_gpu(GpuStats(memory_total_bytes=100, memory_used_bytes=40, utilization=0.75))
    text = generate_latest(metrics.registry).decode()
    assert 'lorafleet_gpu_utilization_ratio{executor="exec-cpu"} 0.75' in text
    assert 'lorafleet_gpu_memory_free_bytes{executor="exec-cpu"} 60.0' in text
    assert "lorafleet_gpu_power_watts{" not in text  # not reported by this GPU: still absent
    assert "lorafleet_gpu_sm_clock_hertz{" not in text
    metrics.record_gpu(GpuStats(memory_total_bytes=100, memory_used_bytes=40, utilization=0.75, sm_clock_hertz=1.425e9))
    text = generate_latest(metrics.registry).decode()
    assert 'lorafleet_gpu_sm_clock_hertz{executor="exec-cpu"} 1.425e+09' in text
