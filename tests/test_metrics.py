"""The metric names in scheduler/metrics.py follow Prometheus conventions and keep labels bounded."""

from __future__ import annotations

import re
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from lorafleet.scheduler.metrics import executor_metrics, scheduler_metrics, serve

BOUNDED_LABELS = {"tenant", "state", "executor", "reason"}


def families(registry):
    return list(registry.collect())


def test_names_units_and_labels_follow_prometheus_conventions():
    sched, execu = scheduler_metrics(), executor_metrics("exec-1")
    sched.jobs.labels(tenant="a", state="queued").set(1)
    sched.requeued.labels(reason="executor_lost").inc()
    sched.assignments.labels(tenant="a").inc()
    sched.cohort_jobs.labels(executor="exec-1").set(2)
    for family in families(sched.registry) + families(execu.registry):
        assert re.fullmatch(r"lorafleet_[a-z_]+", family.name), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total"), "client adds _total to counter samples"
            assert any(s.name == family.name + "_total" for s in family.samples)
        if "memory" in family.name:
            assert family.name.endswith("_bytes"), family.name
        if "duration" in family.name:
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} <= BOUNDED_LABELS, (family.name, sample.labels)
            assert "job_id" not in sample.labels


def test_executor_metrics_are_served_over_http():
    metrics = executor_metrics("exec-http")
    metrics.tokens_trained.inc(1234)
    metrics.step_duration.observe(0.2)
    metrics.memory_peak.set(2**30)
    port = serve(metrics.registry, 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    parsed = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    assert parsed["lorafleet_tokens_trained_total"].value == 1234
    assert parsed["lorafleet_tokens_trained_total"].labels == {"executor": "exec-http"}
    assert parsed["lorafleet_step_duration_seconds_count"].value == 1
    assert parsed["lorafleet_gpu_memory_peak_bytes"].value == 2**30


def test_grafana_dashboard_queries_only_metrics_we_export():
    import json
    from pathlib import Path

    exported = set()
    for registry in (scheduler_metrics().registry, executor_metrics("x").registry):
        for family in registry.collect():
            exported |= {family.name, family.name + "_total", family.name + "_bucket", family.name + "_count"}
    dashboard = json.loads((Path(__file__).parent.parent / "grafana" / "lorafleet-overview.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"lorafleet_[a-z_]+", target["expr"])}
    assert used and used <= exported, sorted(used - exported)
