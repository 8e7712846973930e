"""Every PromQL expression of lorafleet's dashboards and alert rules, each defined once, by name.

`grafana/build.py` builds the dashboards (`grafana/dashboards/*.json`) and the alert rules
(`deploy/prometheus/rules.yml`) from these; `tests/test_dashboards.py` checks that they parse, use only exported
metrics and mean what they say (promtool's rule unit tests); a test against a real Prometheus evaluates each of them
(`panel_queries()`, `alert_queries()`, `Query.render()` for Grafana's variables).

Two rules keep them right while the fleet changes under them:
- A scheduler failover: the fleet's series (`lorafleet_jobs`, `lorafleet_executors_alive`, the cohort, quota and
  Redis-kept counters) are exported by the leader alone, so a plain `sum` over every scheduler is the fleet's, right
  after a failover too. Nothing joins on the leader gauge (`and on() lorafleet_scheduler_leader == 1` counted the
  deposed leader's last values as long as Prometheus kept them).
- An executor restart: counters only through `rate()`/`increase()`, which see a counter reset, and summed
  `by (tenant)` or `by (executor)` across executors; gauges `max by (executor)`, so an executor restarted on another
  port (a second `instance` for one executor id) is still one line.
Counters that hit rarely (requeues, failures, assignments) are shown as `increase(...[1h])`, "in the last hour",
which reads the same at any zoom; throughput is a per-second `rate(...[$__rate_interval])`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Prometheus job names (the scrape config's `job_name`s) the expressions select on.
SCHEDULER_JOB, WORKER_JOB = "lorafleet-scheduler", "lorafleet-worker"
EXECUTOR_JOB, GATEWAY_JOB = "lorafleet-executor", "lorafleet-gateway"
# The per-running-job series' label with the job id (not `job`: Prometheus gives that to the scrape job).
JOB_ID = "job_id"

# What `Query.render()` puts where Grafana would put a variable's value: every executor, tenant and job, and the
# rate window Grafana computes from the datasource's scrape interval (`timeInterval`, 15s: 4 of them).
VARIABLE_DEFAULTS = {"__rate_interval": "1m", "executor": ".+", "tenant": ".+", "job": ".+"}
_VARIABLE = re.compile(r"\$(\w+)")


@dataclass(frozen=True)
class Query:
    """One PromQL expression: `name` (unique, a recording-rule-safe identifier), `legend` (Grafana's legendFormat)
    and `unit` (a Grafana unit id, e.g. `bytes`, `percentunit`, `suffix: tok/s`)."""

    name: str
    expr: str
    legend: str = ""
    unit: str = "short"

    def variables(self) -> set[str]:
        return set(_VARIABLE.findall(self.expr))

    def render(self, **values: str) -> str:
        """The expression Prometheus evaluates: each Grafana variable (`$executor`, `$__rate_interval`, ...) replaced
        by `values`, else by `VARIABLE_DEFAULTS` (every value; a 1m window)."""
        chosen = {**VARIABLE_DEFAULTS, **values}
        unknown = self.variables() - chosen.keys()
        if unknown:
            raise KeyError(f"query {self.name}: no value for the variable(s) {sorted(unknown)}")
        return _VARIABLE.sub(lambda match: chosen[match.group(1)], self.expr)


@dataclass(frozen=True)
class Variable:
    """A dashboard's template variable: the values of `label` on the series `series` selects (Grafana's
    `label_values`), multi-valued with an All option (a regex matcher `=~"$name"` in the queries)."""

    name: str
    series: str
    label: str

    def grafana_query(self) -> str:
        return f"label_values({self.series}, {self.label})"


# Every executor exports its cohort gauge from the start; the leader exports every tenant's job counts.
EXECUTOR_VARIABLE = Variable("executor", "lorafleet_executor_cohort_jobs", "executor")
TENANT_VARIABLE = Variable("tenant", "lorafleet_jobs", "tenant")
# Tenants and jobs with a running job (the per-job series exist while a job trains); Grafana lists those the
# dashboard's time range saw.
RUNNING_TENANT_VARIABLE = Variable("tenant", "lorafleet_job_progress_ratio", "tenant")
JOB_VARIABLE = Variable("job", 'lorafleet_job_progress_ratio{tenant=~"$tenant"}', JOB_ID)
VARIABLES = (EXECUTOR_VARIABLE, TENANT_VARIABLE, RUNNING_TENANT_VARIABLE, JOB_VARIABLE)

_PANEL_QUERIES: dict[str, Query] = {}


def panel(name: str, expr: str, legend: str = "", unit: str = "short") -> Query:
    """A dashboard panel's query, registered so that `panel_queries()` lists it."""
    if name in _PANEL_QUERIES:
        raise ValueError(f"two panel queries are named {name!r}")
    query = _PANEL_QUERIES[name] = Query(name, expr, legend, unit)
    return query


def panel_queries() -> tuple[Query, ...]:
    return tuple(_PANEL_QUERIES.values())


# Shapes used more than once. `selector` is a label matcher list without braces ('' for none).
def _braces(selector: str) -> str:
    return "{" + selector + "}" if selector else ""


def _rate(metric: str, selector: str = "", window: str = "$__rate_interval") -> str:
    return f"rate({metric}{_braces(selector)}[{window}])"


def _last_hour(metric: str, by: str, selector: str = "") -> str:
    return f"sum by ({by}) (increase({metric}{_braces(selector)}[1h]))"


def _quantile(q: float, histogram: str, by: str = "", selector: str = "", window: str = "$__rate_interval") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({_rate(histogram + '_bucket', selector, window)}))"


def _up(job: str) -> str:
    return f'up{{job="{job}"}}'


EXECUTOR = 'executor=~"$executor"'
TENANT = 'tenant=~"$tenant"'
TENANT_JOB = f'tenant=~"$tenant", {JOB_ID}=~"$job"'
OUR_ERRORS = 'outcome="error"'  # the API's own faults; "refused" is the caller's error
TOKENS_PER_S = "suffix: tok/s"

# --- fleet overview ------------------------------------------------------------------------------------------------
LEADERS = panel("leaders", "sum(lorafleet_scheduler_leader)", "leaders")
LEADER_BY_SCHEDULER = panel("leader_by_scheduler", "max by (instance) (lorafleet_scheduler_leader)", "{{instance}}")
EXECUTORS_ALIVE = panel("executors_alive", "sum(lorafleet_executors_alive)", "heartbeat alive")
EXECUTORS_SCRAPED = panel("executors_scraped", f"sum({_up(EXECUTOR_JOB)})", "scraped")
QUEUED_JOBS = panel("queued_jobs", 'sum(lorafleet_jobs{state="queued"})', "queued")
RUNNING_JOBS = panel("running_jobs", 'sum(lorafleet_jobs{state="running"})', "running")
QUEUED_BY_TENANT = panel("queued_by_tenant", 'sum by (tenant) (lorafleet_jobs{state="queued"})', "{{tenant}}")
RUNNING_BY_TENANT = panel("running_by_tenant", 'sum by (tenant) (lorafleet_jobs{state="running"})', "{{tenant}}")
TOKENS_PER_SECOND = panel(
    "tokens_per_second", f"sum({_rate('lorafleet_tokens_trained_total')})", "fleet", TOKENS_PER_S)
TOKENS_PER_SECOND_BY_TENANT = panel(
    "tokens_per_second_by_tenant", f"sum by (tenant) ({_rate('lorafleet_tokens_trained_total')})", "{{tenant}}",
    TOKENS_PER_S)
REQUEUES_BY_REASON = panel(
    "requeues_by_reason", _last_hour("lorafleet_scheduler_requeued_total", "reason"), "{{reason}}")
FAILURES_BY_REASON = panel("failures_by_reason", _last_hour("lorafleet_job_failures_total", "reason"), "{{reason}}")
SUBMISSIONS_REFUSED_BY_REASON = panel(
    "submissions_refused_by_reason", _last_hour("lorafleet_submissions_refused_total", "reason"), "{{reason}}")
PLAN_ROUND_P95 = panel(
    "plan_round_p95", _quantile(0.95, "lorafleet_scheduler_plan_duration_seconds"), "plan round p95", "s")
QUEUE_WAIT_P50 = panel("queue_wait_p50", _quantile(0.5, "lorafleet_queue_wait_seconds"), "p50", "s")
QUEUE_WAIT_P95 = panel("queue_wait_p95", _quantile(0.95, "lorafleet_queue_wait_seconds"), "p95", "s")

# --- executors and GPUs (`$executor`) ------------------------------------------------------------------------------
STEP_TIME_P50 = panel(
    "step_time_p50", _quantile(0.5, "lorafleet_step_duration_seconds", "executor", EXECUTOR), "{{executor}} p50", "s")
STEP_TIME_P95 = panel(
    "step_time_p95", _quantile(0.95, "lorafleet_step_duration_seconds", "executor", EXECUTOR), "{{executor}} p95",
    "s")
STEPS_PER_SECOND = panel(
    "steps_per_second", f"sum by (executor) ({_rate('lorafleet_cohort_steps_total', EXECUTOR)})", "{{executor}}",
    "suffix: steps/s")
# Steps that replayed a CUDA graph over all steps: below 1 while the cohort's jobs stay the same means its graph
# could not be captured and it steps eagerly (slower; the executor's log says why). No value, not NaN, for an
# executor that did not step in the window.
GRAPHED_STEP_SHARE = panel(
    "graphed_step_share",
    f"sum by (executor) ({_rate('lorafleet_cohort_graphed_steps_total', EXECUTOR)}) / "
    f"(sum by (executor) ({_rate('lorafleet_cohort_steps_total', EXECUTOR)}) > 0)", "{{executor}}", "percentunit")
TOKENS_PER_SECOND_BY_EXECUTOR = panel(
    "tokens_per_second_by_executor", f"sum by (executor) ({_rate('lorafleet_tokens_trained_total', EXECUTOR)})",
    "{{executor}}", TOKENS_PER_S)


def _executor_gauge(name: str, metric: str, legend: str, unit: str) -> Query:
    return panel(name, f"max by (executor) ({metric}{{{EXECUTOR}}})", legend, unit)


MFU = _executor_gauge("mfu", "lorafleet_executor_mfu_ratio", "{{executor}}", "percentunit")
PACKING_EFFICIENCY = _executor_gauge(
    "packing_efficiency", "lorafleet_packing_efficiency_ratio", "{{executor}}", "percentunit")
COHORT_TRAINING = _executor_gauge(
    "cohort_training", "lorafleet_executor_cohort_jobs", "{{executor}} training", "short")
# The scheduler's side of the same cohort (what it assigned), exported by the leader alone.
COHORT_ASSIGNED = panel(
    "cohort_assigned", f"sum by (executor) (lorafleet_cohort_jobs{{{EXECUTOR}}})", "{{executor}} assigned")
GPU_MEMORY_TOTAL = _executor_gauge(
    "gpu_memory_total", "lorafleet_gpu_memory_total_bytes", "{{executor}} total (NVML)", "bytes")
GPU_MEMORY_USED = _executor_gauge(
    "gpu_memory_used", "lorafleet_gpu_memory_used_bytes", "{{executor}} used, all processes (NVML)", "bytes")
GPU_MEMORY_ALLOCATED = _executor_gauge(
    "gpu_memory_allocated", "lorafleet_gpu_memory_allocated_bytes", "{{executor}} allocated (torch)", "bytes")
GPU_MEMORY_PEAK = _executor_gauge(
    "gpu_memory_peak", "lorafleet_gpu_memory_peak_bytes", "{{executor}} last step's peak (torch)", "bytes")
GPU_UTILIZATION = _executor_gauge("gpu_utilization", "lorafleet_gpu_utilization_ratio", "{{executor}}", "percentunit")
GPU_POWER = _executor_gauge("gpu_power", "lorafleet_gpu_power_watts", "{{executor}}", "watt")
GPU_TEMPERATURE = _executor_gauge("gpu_temperature", "lorafleet_gpu_temperature_celsius", "{{executor}}", "celsius")
GPU_SM_CLOCK = _executor_gauge("gpu_sm_clock", "lorafleet_gpu_sm_clock_hertz", "{{executor}}", "hertz")

# Generation between training steps (executor/serving.py): requests answered, tokens generated, and the share of
# the executor's wall time its generation batches took (training waited for them).
GENERATION_REQUESTS = panel(
    "generation_requests",
    f"sum by (executor, outcome) ({_rate('lorafleet_generation_requests_total', EXECUTOR)})",
    "{{executor}} {{outcome}}", "reqps")
GENERATION_TOKENS_PER_SECOND = panel(
    "generation_tokens_per_second", f"sum by (executor) ({_rate('lorafleet_generation_tokens_total', EXECUTOR)})",
    "{{executor}}", TOKENS_PER_S)
GENERATION_TIME_SHARE = panel(
    "generation_time_share",
    f"sum by (executor) ({_rate('lorafleet_generation_batch_seconds_sum', EXECUTOR)})", "{{executor}}",
    "percentunit")
GENERATION_BATCH_P95 = panel(
    "generation_batch_p95", _quantile(0.95, "lorafleet_generation_batch_seconds", "executor", EXECUTOR),
    "{{executor}} p95", "s")
# Publishing checkpoints and results (executor/publisher.py): the share of the executor's wall time its training loop
# spent taking snapshots (the publish stall: the rest runs on the publisher's thread), what waits to be written, what
# came of each, and how long one took from hand-over to recorded.
PUBLISH_STALL_SHARE = panel(
    "publish_stall_share", f"sum by (executor) ({_rate('lorafleet_snapshot_seconds_sum', EXECUTOR)})",
    "{{executor}}", "percentunit")
PUBLISH_BACKLOG = _executor_gauge("publish_backlog", "lorafleet_publish_backlog", "{{executor}}", "short")
PUBLICATIONS = panel(
    "publications", f"sum by (executor, kind, outcome) ({_rate('lorafleet_publications_total', EXECUTOR)})",
    "{{executor}} {{kind}} {{outcome}}", "ops")
PUBLISH_DURATION_P95 = panel(
    "publish_duration_p95", _quantile(0.95, "lorafleet_publish_duration_seconds", "executor", EXECUTOR),
    "{{executor}} p95", "s")
# Exported by the leader alone (a fleet series): requests no executor has taken yet, by base.
GENERATION_QUEUED = panel("generation_queued", "sum by (base) (lorafleet_generation_queued)", "{{base}}")

# --- tenants (`$tenant`) -------------------------------------------------------------------------------------------
TENANT_JOBS_BY_STATE = panel(
    "tenant_jobs_by_state", f'sum by (tenant, state) (lorafleet_jobs{{{TENANT}, state=~"queued|running|paused"}})',
    "{{tenant}} {{state}}")
TENANT_TOKENS_PER_SECOND = panel(
    "tenant_tokens_per_second", f"sum by (tenant) ({_rate('lorafleet_tokens_trained_total', TENANT)})", "{{tenant}}",
    TOKENS_PER_S)
# GPU-seconds per second: how many GPUs' worth of time the tenant's jobs use now.
TENANT_GPUS_IN_USE = panel(
    "tenant_gpus_in_use", f"sum by (tenant) ({_rate('lorafleet_tenant_gpu_seconds_total', TENANT)})", "{{tenant}}",
    "suffix: GPUs")
TENANT_GPU_HOURS_24H = panel(
    "tenant_gpu_hours_24h",
    f"sum by (tenant) (increase(lorafleet_tenant_gpu_seconds_total{{{TENANT}}}[24h])) / 3600", "{{tenant}}",
    "suffix: GPU-h")
TENANT_QUOTA_USED = panel(
    "tenant_quota_used", f"max by (tenant, resource) (lorafleet_tenant_quota_used_ratio{{{TENANT}}})",
    "{{tenant}} {{resource}}", "percentunit")
TENANT_QUEUE_WAIT_P95 = panel(
    "tenant_queue_wait_p95", _quantile(0.95, "lorafleet_queue_wait_seconds", "tenant", TENANT), "{{tenant}} p95", "s")
TENANT_ASSIGNMENTS = panel(
    "tenant_assignments", _last_hour("lorafleet_scheduler_assignments_total", "tenant", TENANT), "{{tenant}}")
API_REQUESTS = panel(
    "api_requests", f"sum by (api, task, outcome) ({_rate('lorafleet_api_requests_total')})",
    "{{api}} {{task}} {{outcome}}", "reqps")
API_ERROR_RATIO = panel(
    "api_error_ratio",
    f"sum by (api, task) ({_rate('lorafleet_api_requests_total', OUR_ERRORS)})"
    f" / sum by (api, task) ({_rate('lorafleet_api_requests_total')})",
    "{{api}} {{task}}", "percentunit")
API_LATENCY_P50 = panel(
    "api_latency_p50", _quantile(0.5, "lorafleet_api_request_duration_seconds", "api, task"), "{{api}} {{task}} p50",
    "s")
API_LATENCY_P95 = panel(
    "api_latency_p95", _quantile(0.95, "lorafleet_api_request_duration_seconds", "api, task"),
    "{{api}} {{task}} p95", "s")

# --- one job (`$tenant`, `$job`) -----------------------------------------------------------------------------------
# `max by (job id)`: a requeued job continues on another executor (another `executor` label); one line per job.
JOB_LOSS = panel("job_loss", f"max by ({JOB_ID}) (lorafleet_job_loss{{{TENANT_JOB}}})", f"{{{{{JOB_ID}}}}}")
JOB_PROGRESS = panel(
    "job_progress", f"max by ({JOB_ID}) (lorafleet_job_progress_ratio{{{TENANT_JOB}}})", f"{{{{{JOB_ID}}}}}",
    "percentunit")
JOB_EXECUTOR = panel(
    "job_executor", f"count by ({JOB_ID}, executor) (lorafleet_job_progress_ratio{{{TENANT_JOB}}})",
    f"{{{{{JOB_ID}}}}} on {{{{executor}}}}")
TENANT_JOB_STATES = panel(
    "tenant_job_states", f"sum by (state) (lorafleet_jobs{{{TENANT}}})", "{{state}}")


# --- alerts --------------------------------------------------------------------------------------------------------
QUEUE_WAIT_ALERT_SECONDS = 1800  # p95 over 15 minutes above 30 minutes
FAILURE_ALERT_RATIO, FAILURE_ALERT_MIN_COUNT = 0.2, 5  # failures / assignments over 15 minutes, at least 5 failures
GPU_MEMORY_ALERT_RATIO = 0.95
GENERATION_BACKLOG_MINUTES = 10  # a base's generation queue not empty at any evaluation for this long
PUBLISH_BACKLOG_MINUTES = 15  # an executor's publisher not done with its snapshots at any evaluation for this long


@dataclass(frozen=True)
class Alert:
    """A Prometheus alerting rule: fires when `query` returns a series for `hold` (the rule's `for`). `summary` and
    `description` are annotation templates ({{ $labels.x }}, {{ $value }}); `description` says what to look at."""

    name: str
    query: Query
    hold: str
    severity: str
    summary: str
    description: str


def _down(component: str, job: str, consequence: str) -> Alert:
    return Alert(
        name=f"Lorafleet{component.title()}Down",
        query=Query(f"{component}_down", f"{_up(job)} == 0"),
        hold="2m", severity="warning",
        summary=f"lorafleet {component} {{{{ $labels.instance }}}} is down (not scraped for 2 minutes)",
        description=(f"Prometheus cannot scrape {{{{ $labels.instance }}}} (job {job}). {consequence} Look at the "
                     f"process (its log, `curl {{{{ $labels.instance }}}}/healthz` and `/readyz`, which says why it is "
                     "not ready) and the host."),
    )


_FAILURES_15M = "sum(increase(lorafleet_job_failures_total[15m]))"
_ASSIGNMENTS_15M = "(sum(increase(lorafleet_scheduler_assignments_total[15m])) or vector(0))"

ALERTS: tuple[Alert, ...] = (
    _down("executor", EXECUTOR_JOB,
          "Its jobs go back to the queue once its heartbeat lapses (lorafleet_scheduler_requeued_total"
          "{reason=\"executor_lost\"}); `lorafleet executors list` shows whether the scheduler still sees it, "
          "`nvidia-smi` on the host whether the GPU is healthy."),
    _down("scheduler", SCHEDULER_JOB,
          "With one scheduler left there is no standby to fail over to; LorafleetNoLeader fires if none leads."),
    _down("worker", WORKER_JOB,
          "Submissions wait in the broker until a submission worker consumes them (the Celery API's callers "
          "wait for their results); the HTTP gateway submits without it."),
    _down("gateway", GATEWAY_JOB, "The tenants' HTTP API (and the tenant page) is unreachable through it."),
    Alert(
        name="LorafleetNoLeader",
        query=Query("no_leader", "sum(lorafleet_scheduler_leader) < 1 or absent(lorafleet_scheduler_leader)"),
        hold="1m", severity="critical",
        summary="No lorafleet scheduler is the leader: nothing is being scheduled",
        description=("No scheduler reports lorafleet_scheduler_leader 1 (or none is scraped). Queued jobs wait and "
                     "dead executors' jobs are not requeued. Look at whether any scheduler process runs at all, "
                     "at their logs and /readyz (Redis unreachable?); `lorafleet executors list` answers from Redis "
                     "without a leader."),
    ),
    Alert(
        name="LorafleetQueueWaitHigh",
        query=Query("queue_wait_high",
                    f"{_quantile(0.95, 'lorafleet_queue_wait_seconds', window='15m')} > {QUEUE_WAIT_ALERT_SECONDS}",
                    unit="s"),
        hold="5m", severity="warning",
        summary="Jobs waited {{ $value | humanizeDuration }} in the queue (p95 over 15 minutes)",
        description=("The 95th percentile of the time jobs waited before being assigned is above "
                     f"{QUEUE_WAIT_ALERT_SECONDS // 60} minutes. The lorafleet tenants dashboard (queue wait by "
                     "tenant, quota use) shows whether one tenant waits at its own quota (expected) or every tenant "
                     "waits (the fleet is full: add executors, or look for executors that are alive but take no "
                     "jobs in the executors dashboard)."),
    ),
    Alert(
        name="LorafleetQueueStalled",
        query=Query("queue_stalled",
                    f'sum(lorafleet_jobs{{state="queued"}}) > 0 and '
                    f"(sum(increase(lorafleet_scheduler_assignments_total[1h])) or vector(0)) == 0"),
        hold="10m", severity="warning",
        summary="Jobs are queued and none was assigned for an hour",
        description=("The queue-wait histogram only sees jobs once they are assigned, so a queue nothing leaves "
                     "is caught here. Either no executor can take the queued jobs (`lorafleet executors list`: none "
                     "alive, all draining, or none with the memory or dtype they need) or long jobs fill the fleet. "
                     "The fleet overview dashboard shows executors alive and running jobs."),
    ),
    Alert(
        name="LorafleetJobFailureRateHigh",
        query=Query("job_failure_rate_high",
                    f"({_FAILURES_15M} / {_ASSIGNMENTS_15M} > {FAILURE_ALERT_RATIO}) "
                    f"and ({_FAILURES_15M} >= {FAILURE_ALERT_MIN_COUNT})",
                    unit="percentunit"),
        hold="5m", severity="warning",
        summary="{{ $value | humanizePercentage }} of job assignments failed in the last 15 minutes",
        description=(f"More than {FAILURE_ALERT_RATIO:.0%} of assignments (and at least {FAILURE_ALERT_MIN_COUNT} "
                     "jobs) failed in 15 minutes. The fleet overview's failures by reason says where: sizing/start "
                     "(the job does not fit or its base does not load), training/validation (bad data or a "
                     "diverging run), publish (the artifact store), executor_lost (executors dying). "
                     "`lorafleet jobs list --state failed` and a job's events carry the error."),
    ),
    Alert(
        name="LorafleetGenerationBacklog",
        query=Query("generation_backlog", "sum by (base) (lorafleet_generation_queued) > 0"),
        hold=f"{GENERATION_BACKLOG_MINUTES}m", severity="warning",
        summary="Generation requests for base {{ $labels.base }} have been queued without a break for "
                f"{GENERATION_BACKLOG_MINUTES} minutes",
        description=("The base's generation queue was not empty at any evaluation of the last "
                     f"{GENERATION_BACKLOG_MINUTES} minutes: requests come faster than executors take them, or "
                     "no executor serves the base (an executor serves requests for the base it has loaded, between "
                     "its cohort's steps; an idle one loads the base of waiting requests). Requests that wait past "
                     "their timeout fail with 504. The executors dashboard's generation panels show who answers "
                     "and how much of their time it takes; `lorafleet executors list` shows which bases are loaded "
                     "and whether any executor is idle."),
    ),
    Alert(
        name="LorafleetPublishBehind",
        query=Query("publish_behind", "max by (executor) (lorafleet_publish_backlog) > 0"),
        hold=f"{PUBLISH_BACKLOG_MINUTES}m", severity="warning",
        summary="Executor {{ $labels.executor }} has had snapshots waiting to be published for "
                f"{PUBLISH_BACKLOG_MINUTES} minutes",
        description=("The executor's publisher was behind at every evaluation of the last "
                     f"{PUBLISH_BACKLOG_MINUTES} minutes: checkpoints and results are taken faster than the artifact "
                     "store takes them. Training goes on (the snapshots wait in the executor's host memory), but "
                     "jobs are recorded succeeded, and resumable from their newest checkpoints, "
                     "only once published, and a drain waits for all of it. The executors dashboard's publish "
                     "panels show the backlog and the time per publication; look at the store's throughput, or "
                     "checkpoint less often (checkpoint_every)."),
    ),
    Alert(
        name="LorafleetPublishFailing",
        query=Query("publish_failing",
                    'sum by (executor) (increase(lorafleet_publications_total{outcome="failed"}[15m])) > 0'),
        hold="1m", severity="warning",
        summary="Executor {{ $labels.executor }} could not store a checkpoint or result in the last 15 minutes",
        description=("The artifact store refused a write (full, unreachable, permissions). A failed checkpoint "
                     "leaves its job training on from its previous one (an `error` event on the job says "
                     "\"checkpoint not saved\"); a failed result fails its job (reason publish). The executor's "
                     "log names the error; the executors dashboard's publications panel shows which kind fails."),
    ),
    Alert(
        name="LorafleetGpuMemoryNearFull",
        query=Query("gpu_memory_near_full",
                    "max by (executor) (lorafleet_gpu_memory_used_bytes) / "
                    f"max by (executor) (lorafleet_gpu_memory_total_bytes) > {GPU_MEMORY_ALERT_RATIO}",
                    unit="percentunit"),
        hold="5m", severity="warning",
        summary="GPU memory of executor {{ $labels.executor }} is {{ $value | humanizePercentage }} used",
        description=("NVML reports the GPU nearly full for 5 minutes: the next cohort change or a longer batch may "
                     "run out of memory. The executors dashboard compares torch's allocated and peak with NVML's "
                     "used: used far above torch's peak means another process on the GPU (`nvidia-smi`), or the "
                     "caching allocator holding freed blocks; peak near total means the cohort is packed too "
                     "tightly (`lorafleet executors list`, the memory model in docs/SCHEDULING.md)."),
    ),
)


# Every dashboard marks the times lorafleet's alerts fired (Prometheus's own ALERTS series, from the rules above).
FIRING_ALERTS = Query("firing_alerts", 'ALERTS{alertstate="firing", alertname=~"Lorafleet.*"}', "{{alertname}}")


def alert_queries() -> tuple[Query, ...]:
    return tuple(alert.query for alert in ALERTS)


def all_queries() -> tuple[Query, ...]:
    return panel_queries() + alert_queries() + (FIRING_ALERTS,)
