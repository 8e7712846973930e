"""Every dashboard panel and alert expression (grafana/queries.py), evaluated by a real Prometheus scraping a real
stack (tests/prometheus_stack.py), returns what the fleet shows: while jobs train, after a scheduler failover, after
an executor is killed mid-job (a requeue), after jobs fail, and with no scheduler left.

Each query has an expectation here (`EXPECTED` must cover `queries.all_queries()`, so a new panel without one fails);
the value a query should return comes from the store, which the test reads itself, not from the metrics.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from prometheus_stack import REPO, RULES, prometheus_binaries, start_stack, stop_stack, wait_for
from helpers_models import alpaca_rows, write_jsonl
from lorafleet.scheduler.datasets import accepted_path
from lorafleet.scheduler.records import JobState

sys.path.insert(0, str(REPO / "grafana"))
import queries  # noqa: E402  (grafana/ is a folder of scripts, not a package)

pytestmark = pytest.mark.slow
WINDOW = {"__rate_interval": "2m"}  # scrapes are every second: a 2-minute window sees the whole test's counters
LONG = {"max_steps": 5000, "checkpoint_every": 5000}  # jobs that train for the whole test


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    running = start_stack(tmp_path_factory.mktemp("prometheus-stack"))
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.fixture(scope="module")
def tenants(stack):
    """alice: two long jobs, bob: one that checkpoints every few steps, carol: one job that fails (its dataset was
    damaged on disk after it was accepted); a refused call."""
    tokens = {name: stack.make_tenant(name) for name in ("alice", "bob", "carol")}
    jobs = {"alice": [stack.submit(tokens["alice"], "alice", **LONG) for _ in range(2)],
            "bob": [stack.submit(tokens["bob"], "bob", **{**LONG, "checkpoint_every": 4})],
            "carol": failing_jobs(stack, "carol", tokens["carol"], 1)}
    with pytest.raises(LookupError):
        stack.call("lorafleet.get_job", tokens["bob"], jobs["alice"][0])  # another tenant's job: refused
    with pytest.raises(ValueError):
        stack.call("lorafleet.submit_job", tokens["bob"], {"name": "no base, no dataset"})  # refused: its spec
    wait_for(stack, "three jobs running and carol's failed", lambda: running_count(stack) == 3
             and stack.store.job(jobs["carol"][0]).state == JobState.FAILED, 120)
    answer = stack.call("lorafleet.generate", tokens["bob"], {  # answered by the executor with the base loaded
        "model": str(stack.model), "prompt": "Hello", "max_tokens": 4, "temperature": 0, "timeout": 25})
    assert answer["usage"]["completion_tokens"] > 0
    return tokens, jobs


def failing_jobs(stack, tenant: str, token: str, count: int) -> list[str]:
    """`count` jobs that fail as they start: submitted while the tenant may run none, their accepted dataset then
    overwritten on disk (the executor checks its digest), then the tenant's limit raised."""
    rows = alpaca_rows(16, seed=len(stack.ports) + count)  # data no other tenant has: its own accepted copy
    write_jsonl(stack.root / "data" / tenant / "train.jsonl", rows)
    stack.store.set_quota(tenant, max_running=0)
    jobs = [stack.submit(token, tenant) for _ in range(count)]
    accepted = stack.store.accepted_datasets(jobs[0])["dataset"]
    copy = accepted_path(stack.root / "state" / "datasets", accepted.sha256)
    copy.chmod(0o600)
    copy.write_text(copy.read_text().replace("a", "b"))
    stack.store.set_quota(tenant, max_running=4)
    return jobs


def running_count(stack) -> int:
    return len(stack.store.r.smembers("lorafleet:state:running"))


def fleet_counts(stack) -> dict[tuple[str, str], int]:
    """(tenant, state) -> jobs, from the store."""
    counts = stack.store.tenant_counts(["alice", "bob", "carol"])
    return {(tenant, state): count for tenant, by_state in counts.items() for state, count in by_state.items()}


def by(result: dict, *labels: str) -> dict:
    """A query result keyed by the values of `labels` (one label: the bare value)."""
    keyed = {}
    for key, value in result.items():
        named = dict(key)
        values = tuple(named.get(label, "") for label in labels)
        keyed[values[0] if len(labels) == 1 else values] = value
    return keyed


def number(value) -> bool:
    return value is not None and not math.isnan(value)


# ---- what each query returns while alice's two and bob's one job train and carol's has failed ----

def _running_by_tenant(stack, result):
    return by(result, "tenant") == {t: float(fleet_counts(stack).get((t, "running"), 0)) for t in by(result, "tenant")}


def _empty(stack, result):
    return result == {}


def _positive_for_trainers(stack, result):
    values = by(result, "tenant")
    return values.get("alice", 0) > 0 and values.get("bob", 0) > 0 and values.get("carol", 0) == 0


def _positive_where_stepped(stack, result):
    """A positive value for each executor that ran steps; an idle one's histogram has no rate (NaN) or no series."""
    return any(number(v) and v > 0 for v in result.values()) and all(not number(v) or v > 0 for v in result.values())


def _cohort_sizes(stack, result):
    return sum(result.values()) == running_count(stack)


EXPECTED = {
    "leaders": lambda stack, r: r == {(): 1.0},
    "leader_by_scheduler": lambda stack, r: sorted(r.values()) == [0.0, 1.0],
    "executors_alive": lambda stack, r: r == {(): 2.0},
    "executors_scraped": lambda stack, r: r == {(): 2.0},
    "queued_jobs": lambda stack, r: r == {(): float(len(stack.store.r.zrange("lorafleet:queue", 0, -1)))},
    "running_jobs": lambda stack, r: r == {(): float(running_count(stack))},
    "queued_by_tenant": lambda stack, r: by(r, "tenant") == {"alice": 0.0, "bob": 0.0, "carol": 0.0},
    "running_by_tenant": _running_by_tenant,
    "tokens_per_second": lambda stack, r: r[()] > 0,
    "tokens_per_second_by_tenant": _positive_for_trainers,
    "requeues_by_reason": lambda stack, r: by(r, "reason") == {"executor_lost": 0.0, "not_held": 0.0},
    "failures_by_reason": lambda stack, r: 0.9 <= by(r, "reason")["start"] <= 1.5
    and sum(r.values()) == by(r, "reason")["start"],
    "submissions_refused_by_reason": lambda stack, r: 0.9 <= by(r, "reason")["spec"] <= 1.5
    and sum(r.values()) == by(r, "reason")["spec"] and set(by(r, "reason")) == {"spec", "admission", "quota", "tenant"},
    "plan_round_p95": lambda stack, r: 0 < r[()] < 1,
    "queue_wait_p50": lambda stack, r: 0 <= r[()] < 60,
    "queue_wait_p95": lambda stack, r: 0 <= r[()] < 60,
    "step_time_p50": _positive_where_stepped,
    "step_time_p95": _positive_where_stepped,
    "steps_per_second": lambda stack, r: sum(r.values()) > 0,
    # a CPU cohort never replays a CUDA graph: 0 of its steps where it stepped, no value (not NaN) where it did not
    "graphed_step_share": lambda stack, r: bool(r) and all(v == 0 for v in r.values()),
    "tokens_per_second_by_executor": lambda stack, r: sum(r.values()) > 0,
    "mfu": _empty,  # a CPU has no known peak: absent, not 0
    "packing_efficiency": lambda stack, r: bool(r) and all(0 < v <= 1 for v in r.values()),
    "cohort_training": _cohort_sizes,
    "cohort_assigned": _cohort_sizes,
    "gpu_memory_total": _empty,  # no NVML on a CPU
    "gpu_memory_used": _empty,
    "gpu_memory_allocated": lambda stack, r: len(r) == 2 and all(v > 0 for v in r.values()),
    "gpu_memory_peak": _positive_where_stepped,
    "gpu_utilization": _empty,
    "gpu_power": _empty,
    "gpu_temperature": _empty,
    "gpu_sm_clock": _empty,
    "tenant_jobs_by_state": lambda stack, r: by(r, "tenant", "state") == {
        (t, s): float(fleet_counts(stack).get((t, s), 0)) for t in ("alice", "bob", "carol")
        for s in ("queued", "running", "paused")},
    "tenant_tokens_per_second": _positive_for_trainers,
    "tenant_gpus_in_use": _positive_for_trainers,
    "tenant_gpu_hours_24h": _positive_for_trainers,
    "tenant_quota_used": lambda stack, r: by(r, "tenant", "resource")[("alice", "running")] == 0.5
    and by(r, "tenant", "resource")[("bob", "running")] == 0.25 and by(r, "tenant", "resource")[("bob", "queued")] == 0,
    "tenant_queue_wait_p95": lambda stack, r: all(number(by(r, "tenant")[t]) for t in ("alice", "bob", "carol")),
    "tenant_assignments": lambda stack, r: 1.8 <= by(r, "tenant")["alice"] <= 3 and 0.9 <= by(r, "tenant")["bob"] <= 1.5,
    "api_requests": lambda stack, r: by(r, "api", "task", "outcome")[("celery", "lorafleet.submit_job", "ok")] > 0
    and by(r, "api", "task", "outcome")[("celery", "lorafleet.get_job", "refused")] > 0,
    "api_error_ratio": lambda stack, r: bool(r) and all(math.isnan(v) or v == 0 for v in r.values()),
    "api_latency_p50": lambda stack, r: 0 < by(r, "api", "task")[("celery", "lorafleet.submit_job")] <= 10,
    # the first submission of a worker loads the tokenizer: seconds on a busy CPU (the top bucket is 10 s)
    "api_latency_p95": lambda stack, r: 0 < by(r, "api", "task")[("celery", "lorafleet.submit_job")] <= 10,
    "job_loss": lambda stack, r: len(r) == running_count(stack) and all(v > 0 for v in r.values()),
    "job_progress": lambda stack, r: len(r) == running_count(stack) and all(0 < v < 1 for v in r.values()),
    "job_executor": lambda stack, r: len(r) == running_count(stack) and set(r.values()) == {1.0},
    "tenant_job_states": lambda stack, r: by(r, "state")["running"] == running_count(stack)
    and by(r, "state")["failed"] == 1,
    # bob's one generation request, answered between training steps
    "generation_requests": lambda stack, r: sum(v for (_, outcome), v in by(r, "executor", "outcome").items()
                                                if outcome == "answered") > 0
    and all(v == 0 for (_, outcome), v in by(r, "executor", "outcome").items() if outcome == "failed"),
    "generation_tokens_per_second": lambda stack, r: sum(r.values()) > 0,
    "generation_time_share": lambda stack, r: any(v > 0 for v in r.values()) and all(0 <= v <= 1 for v in r.values()),
    "generation_batch_p95": _positive_where_stepped,
    # bob's checkpoints: snapshots on the loop, written and recorded beside it; nothing refused or failed
    "publish_stall_share": lambda stack, r: any(v > 0 for v in r.values()) and all(0 <= v < 1 for v in r.values()),
    "publish_backlog": lambda stack, r: bool(r) and all(0 <= v <= 3 for v in r.values()),
    "publications": lambda stack, r: sum(v for (_, kind, outcome), v in by(r, "executor", "kind", "outcome").items()
                                         if (kind, outcome) == ("checkpoint", "recorded")) > 0
    and all(v == 0 for (_, _, outcome), v in by(r, "executor", "kind", "outcome").items() if outcome != "recorded"),
    "publish_duration_p95": _positive_where_stepped,
    "generation_queued": lambda stack, r: all(v == 0 for v in r.values()),  # taken at once (or the base forgotten)
    # alerts: none fires on a healthy fleet with one failure
    "executor_down": _empty, "scheduler_down": _empty, "worker_down": _empty, "gateway_down": _empty,
    "no_leader": _empty, "queue_wait_high": _empty, "queue_stalled": _empty, "job_failure_rate_high": _empty,
    "gpu_memory_near_full": _empty, "generation_backlog": _empty, "publish_behind": _empty, "publish_failing": _empty,
    "firing_alerts": _empty,  # every rule holds its condition a minute or more before it fires: none in this test
}


def evaluate(stack, names=None) -> dict[str, dict]:
    return {query.name: stack.query(query.render(**WINDOW)) for query in queries.all_queries()
            if names is None or query.name in names}


def mismatches(stack, expected: dict, names=None) -> dict[str, dict]:
    results = evaluate(stack, names or expected.keys())
    return {name: result for name, result in results.items() if not holds(expected[name], stack, result)}


def holds(expectation, stack, result) -> bool:
    try:
        return bool(expectation(stack, result))
    except (KeyError, StopIteration):  # a series it needs is not there (yet)
        return False


def settled(stack, expected: dict, names=None, timeout: float = 60.0) -> None:
    """Every query in `names` returns what `expected` says, within `timeout` (Prometheus scrapes every second)."""
    wait_for(stack, f"queries to match: {sorted(names or expected)}",
             lambda: not mismatches(stack, expected, names), timeout)


def test_every_query_has_an_expectation():
    assert {query.name for query in queries.all_queries()} == set(EXPECTED)


def test_promtool_accepts_the_scrape_config_the_rules_and_every_processs_metrics(stack, tmp_path):
    _, promtool = prometheus_binaries()
    config = stack.root / "prometheus.yml"
    for args in (["check", "config", str(config)], ["check", "rules", str(RULES)]):
        checked = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    for name in stack.ports:
        linted = subprocess.run([promtool, "check", "metrics"], input=stack.scrape(name), capture_output=True,
                                text=True)
        assert linted.returncode == 0, (name, linted.stdout + linted.stderr)


def test_every_panel_and_alert_shows_the_fleet_while_jobs_train(stack, tenants):
    try:
        settled(stack, EXPECTED)
    except AssertionError:
        raise AssertionError(f"mismatched: {mismatches(stack, EXPECTED)}")


def test_after_a_leader_failover_each_job_is_counted_once(stack, tenants):
    leader = next(name for name in stack.ports if name.startswith("scheduler")
                  and stack.scrape(name).count("lorafleet_scheduler_leader 1.0"))
    stack.kill(leader)
    after = {**EXPECTED, "scheduler_down": lambda stack, r: len(r) == 1,
             "leader_by_scheduler": lambda stack, r: sorted(r.values()) == [1.0]}
    names = ["leaders", "leader_by_scheduler", "scheduler_down", "running_jobs", "running_by_tenant",
             "queued_by_tenant", "tenant_jobs_by_state", "executors_alive", "cohort_assigned", "no_leader",
             "failures_by_reason", "tenant_quota_used"]
    try:
        settled(stack, after, names, timeout=60)
    except AssertionError:
        raise AssertionError(f"mismatched after failover: {mismatches(stack, after, names)}")


def test_an_executor_killed_mid_job_shows_down_and_its_jobs_requeued(stack, tenants):
    holding = {name: 0 for name in stack.ports if name.startswith("executor")}
    for job_id in stack.store.r.smembers("lorafleet:state:running"):
        holding[stack.store.job(job_id).executor_id] += 1
    victim = max(holding, key=holding.get)
    survivor = next(name for name in holding if name != victim)
    stack.kill(victim)
    # Its jobs go back to the queue; each runs alone on an executor next time (it may have killed this one), so
    # they may wait there while the survivor trains others.
    wait_for(stack, f"{victim}'s jobs requeued", lambda: not any(
        stack.store.job(j).executor_id == victim for j in stack.store.r.smembers("lorafleet:state:running")
        | stack.store.r.smembers("lorafleet:state:scheduled")), 60)
    after = {**EXPECTED,
             "executor_down": lambda stack, r: list(by(r, "instance")) == [f"127.0.0.1:{stack.ports[victim]}"],
             "executors_scraped": lambda stack, r: r == {(): 1.0},
             "executors_alive": lambda stack, r: r == {(): 1.0},
             "requeues_by_reason": lambda stack, r: by(r, "reason")["executor_lost"] >= holding[victim] * 0.9,
             "cohort_assigned": lambda stack, r: list(by(r, "executor")) == [survivor]
             and sum(r.values()) == running_count(stack) + len(stack.store.r.smembers("lorafleet:state:scheduled")),
             "job_loss": lambda stack, r: len(r) == running_count(stack),
             "job_progress": lambda stack, r: len(r) == running_count(stack)}
    names = ["executor_down", "executors_scraped", "executors_alive", "requeues_by_reason", "cohort_assigned",
             "running_jobs", "queued_jobs", "job_loss", "job_progress", "job_executor"]
    try:
        settled(stack, after, names, timeout=90)
    except AssertionError:
        raise AssertionError(f"mismatched after the executor died: {mismatches(stack, after, names)}")


def test_a_restarted_executor_is_one_executor_again(stack, tenants):
    victim = next(name for name, process in stack.processes.items()
                  if name.startswith("executor") and process.poll() is not None)
    stack.start_executor(victim)  # the same id and port, as systemd or Kubernetes restarts it
    after = {**EXPECTED,
             "executors_scraped": lambda stack, r: r == {(): 2.0},
             "gpu_memory_allocated": lambda stack, r: set(by(r, "executor")) == {"executor-a", "executor-b"},
             "cohort_assigned": lambda stack, r: set(by(r, "executor")) == {"executor-a", "executor-b"}
             and sum(r.values()) == running_count(stack) + len(stack.store.r.smembers("lorafleet:state:scheduled"))}
    names = ["executor_down", "executors_scraped", "executors_alive", "gpu_memory_allocated", "cohort_assigned",
             "running_jobs", "job_loss", "job_progress"]
    try:
        settled(stack, after, names, timeout=90)
    except AssertionError:
        raise AssertionError(f"mismatched after the restart: {mismatches(stack, after, names)}")


def test_failed_jobs_are_counted_by_reason_and_raise_the_failure_rate_alert(stack, tenants):
    tokens, jobs = tenants
    for job_id in jobs["alice"] + jobs["bob"]:  # the survivor trains carol's next jobs, not the requeued long ones
        stack.store.cancel(None, job_id)
    failing = failing_jobs(stack, "carol", tokens["carol"], 5)
    wait_for(stack, "carol's five jobs to fail",
             lambda: all(stack.store.job(job_id).state == JobState.FAILED for job_id in failing), 120)
    after = {"failures_by_reason": lambda stack, r: 5.5 <= by(r, "reason")["start"] <= 9,
             "job_failure_rate_high": lambda stack, r: len(r) == 1 and next(iter(r.values())) > 0.2,
             "tenant_job_states": lambda stack, r: by(r, "state")["failed"] == 6}
    try:
        settled(stack, after, timeout=60)
    except AssertionError:
        raise AssertionError(f"mismatched after failures: {mismatches(stack, after)}")


def test_with_no_scheduler_left_the_no_leader_alert_fires(stack, tenants):
    for name in [name for name in stack.ports if name.startswith("scheduler")]:
        if stack.processes[name].poll() is None:
            stack.kill(name)
    after = {"no_leader": lambda stack, r: r == {(): 1.0},
             "scheduler_down": lambda stack, r: len(r) == 2,
             "leaders": _empty}
    try:
        settled(stack, after, timeout=60)
    except AssertionError:
        raise AssertionError(f"mismatched with no scheduler: {mismatches(stack, after)}")
