"""The metric names in scheduler/metrics.py follow Prometheus conventions and keep labels bounded; what is served
is what the module defines."""

from __future__ import annotations

import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from lorafleet.scheduler.metrics import (
    FAILURE_REASONS, api_metrics, executor_metrics, executor_port, metric_names, scheduler_metrics, serve,
)
from lorafleet.scheduler.records import GpuStats, StepStats

BOUNDED_LABELS = {"tenant", "state", "executor", "reason", "resource", "kind", "api", "task", "outcome",
                  "version", "component", "python", "base"}  # base: one the operator's cache or roots hold
PER_JOB = {"lorafleet_job_loss", "lorafleet_job_progress_ratio"}  # the only families with a `job_id` label
UNITS = {"memory": "_bytes", "duration": "_seconds", "wait": "_seconds", "power": "_watts",
         "temperature": "_celsius", "utilization": "_ratio", "mfu": "_ratio", "efficiency": "_ratio"}


def exercised():
    """Every registry, with every labelled series set once."""
    sched, execu, api = scheduler_metrics(), executor_metrics("exec-1"), api_metrics("worker", "celery",
                                                                                     ["lorafleet.submit_job"])
    sched.jobs.labels(tenant="a", state="queued").set(1)
    sched.queue_wait.labels(tenant="a").observe(3)
    sched.assignments.labels(tenant="a").inc()
    sched.cohort_jobs.labels(executor="exec-1").set(2)
    sched.quota_used.labels(tenant="a", resource="queued").set(0.5)
    sched.job_failures.set_all({"sizing": 1})
    sched.tenant_gpu_seconds.set_all({"a": 2.5})
    sched.generation_queued.labels(base="org/model").set(2)
    execu.record_step(StepStats(0.5, 100, 80, 200, 0.4), {"a": 80})
    execu.record_gpu(GpuStats(2**30, 2**29, 0.5, 300.0, 60.0))
    execu.record_job("job-1", "a", 1.5, 3, 10)
    api.observe("lorafleet.submit_job", "ok", 0.01)
    return [family for registry in (sched.registry, execu.registry, api.registry) for family in registry.collect()]


def test_names_units_and_labels_follow_prometheus_conventions():
    for family in exercised():
        if family.name.startswith("process_"):
            continue  # prometheus_client's own
        assert re.fullmatch(r"lorafleet_[a-z_]+", family.name), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total"), "client adds _total to counter samples"
            assert any(s.name == family.name + "_total" for s in family.samples), family.name
        for word, unit in UNITS.items():
            if word in family.name and family.type != "counter":
                assert family.name.endswith(unit), (family.name, unit)
        for sample in family.samples:
            allowed = BOUNDED_LABELS | ({"job_id"} if family.name in PER_JOB else set())
            assert set(sample.labels) - {"le"} <= allowed, (family.name, sample.labels)
            assert "job" not in sample.labels, "Prometheus's own label: it would be renamed exported_job"


def test_every_family_served_is_one_the_module_lists():
    served = {family.name + "_total" if family.type == "counter" else family.name for family in exercised()}
    assert served == metric_names()
    assert {"lorafleet_build_info", "process_resident_memory_bytes", "lorafleet_queue_wait_seconds",
            "lorafleet_job_failures_total", "lorafleet_gpu_power_watts"} <= served


def test_counters_kept_in_redis_start_at_zero_and_a_standby_exports_no_fleet_series():
    metrics = scheduler_metrics()
    metrics.job_failures.set_all({"training": 2})
    metrics.jobs.labels(tenant="a", state="queued").set(3)
    samples = {(s.name, s.labels.get("reason")): s.value for f in metrics.registry.collect() for s in f.samples}
    assert samples[("lorafleet_job_failures_total", "training")] == 2
    assert all(samples[("lorafleet_job_failures_total", reason)] == 0 for reason in FAILURE_REASONS
               if reason != "training")
    metrics.withdraw_fleet_series()
    names = {s.name for f in metrics.registry.collect() for s in f.samples}
    assert "lorafleet_job_failures_total" not in names and "lorafleet_jobs" not in names


def test_a_finished_jobs_series_are_removed():
    metrics = executor_metrics("exec-1")
    metrics.record_job("job-1", "a", 1.0, 1, 4)
    metrics.record_job("job-2", "b", None, 2, 4)
    metrics.forget_job("job-1", "a")
    jobs = {s.labels["job_id"] for f in metrics.registry.collect() for s in f.samples if "job_id" in s.labels}
    assert jobs == {"job-2"}
    metrics.forget_job("job-never-seen", "a")  # no error


def test_executor_default_ports_follow_the_device():
    assert [executor_port(d) for d in ("cpu", "cuda:0", "cuda:3", "cuda")] == [9465, 9465, 9468, 9465]


def test_executor_metrics_are_served_over_http():
    metrics = executor_metrics("exec-http")
    metrics.record_step(StepStats(0.2, 2000, 1234, 4096, None), {"t": 1234})
    metrics.record_step(StepStats(0.2, 2000, 0, 4096, None, graphed=True), {})
    metrics.memory_peak.labels(executor="exec-http").set(2**30)
    port = serve(metrics.registry, 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    parsed = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert parsed["lorafleet_tokens_trained_total"].value == 1234
    assert parsed["lorafleet_cohort_steps_total"].value == 2
    assert parsed["lorafleet_cohort_graphed_steps_total"].value == 1
    assert parsed["lorafleet_tokens_trained_total"].labels == {"executor": "exec-http", "tenant": "t"}
    assert parsed["lorafleet_step_duration_seconds_count"].value == 2
    assert parsed["lorafleet_gpu_memory_peak_bytes"].value == 2**30
    assert parsed["lorafleet_packing_efficiency_ratio"].value == 2000 / 4096
    assert executor_metrics("idle").registry.get_sample_value("lorafleet_packing_efficiency_ratio",
                                                              {"executor": "idle"}) is None, "no step: absent"
    assert "lorafleet_executor_mfu_ratio" not in parsed  # no peak: absent, not 0
    assert "lorafleet_gpu_utilization_ratio" not in parsed  # never measured


def test_the_observability_docs_list_every_metric_the_module_defines():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "OBSERVABILITY.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| [^|]+ \| `(lorafleet_[a-z_]+)` \|", section, re.MULTILINE))
    defined = {name for name in metric_names() if not name.startswith("process_")} - {"lorafleet_build_info"}
    assert documented == defined, (sorted(defined - documented), sorted(documented - defined))
