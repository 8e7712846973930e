"""Dashboards and alert rules as code (grafana/queries.py -> grafana/build.py -> grafana/dashboards/*.json and
deploy/prometheus/rules.yml): the committed files are what build.py writes now; every panel's expression is one of
queries.py; every expression parses (promtool) and uses only metrics lorafleet exports; the provisioning and the
deploy files point at the dashboards, the datasource and the rules; and promtool's rule unit tests, on synthetic
series, show the expressions mean what they say: a failover counts each job once, a first requeue shows, a requeued
job stays one line, and each alert fires when it should and not otherwise.

A real Prometheus scraping a real stack evaluates the same expressions in tests/test_prometheus.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet.scheduler.metrics import metric_names

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
sys.path.insert(0, str(GRAFANA))
import queries  # noqa: E402  (grafana/ is a folder of scripts, not a package)


def _load_build():
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
PROVISIONING = ROOT / "deploy/grafana/provisioning"
BUILTIN_SERIES = {"up", "ALERTS"}  # Prometheus's own


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip("needs promtool (Debian's prometheus package)")
    return path


def run_promtool(promtool: str, *args: str) -> None:
    done = subprocess.run([promtool, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((ROOT / build.DASHBOARD_DIR).glob("*.json"))}


def panels_of(board: dict) -> list[dict]:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


# --- the committed files are build.py's output -------------------------------------------------------------------
def test_the_committed_dashboards_and_rules_are_what_build_writes_now():
    """Edit a query without running `python grafana/build.py` and this fails, naming the stale files."""
    assert build.stale_files(ROOT) == []


def run_build(root: Path, *args: str) -> subprocess.CompletedProcess:
    # another hash seed than this process's: the output must not depend on set or dict ordering
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    return subprocess.run([sys.executable, str(GRAFANA / "build.py"), "--root", str(root), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_build_check_names_an_edited_and_a_left_over_file_and_build_repairs_both(tmp_path):
    for path in build.rendered():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / path, tmp_path / path)
    assert run_build(tmp_path, "--check").returncode == 0  # a fresh process writes byte for byte the same
    edited = tmp_path / build.DASHBOARD_DIR / "lorafleet-fleet.json"
    edited.write_text(edited.read_text().replace("lorafleet_jobs", "lorafleet_jobz", 1))
    (tmp_path / build.DASHBOARD_DIR / "old-overview.json").write_text("{}")

    checked = run_build(tmp_path, "--check")
    assert checked.returncode == 1
    assert "grafana/dashboards/lorafleet-fleet.json" in checked.stderr
    assert "grafana/dashboards/old-overview.json" in checked.stderr

    assert run_build(tmp_path).returncode == 0
    assert run_build(tmp_path, "--check").returncode == 0
    assert not (tmp_path / build.DASHBOARD_DIR / "old-overview.json").exists()


# --- panels and their queries ------------------------------------------------------------------------------------
def test_every_panel_shows_queries_of_queries_py_with_their_legend_and_unit():
    known = {query.expr: query for query in queries.panel_queries()}
    wrong = []
    for name, board in dashboards().items():
        for panel in panels_of(board):
            targets = panel.get("targets") or []
            if not targets:
                wrong.append((name, panel["title"], "no target"))
            for target in targets:
                query = known.get(target.get("expr"))
                if query is None:
                    wrong.append((name, panel["title"], target.get("expr")))
                elif (target.get("legendFormat"), panel["fieldConfig"]["defaults"].get("unit")) != (
                        query.legend, query.unit):
                    wrong.append((name, panel["title"], "legend or unit differs from", query.name))
    assert wrong == []


def test_every_panel_query_is_shown_by_some_panel():
    shown = {target["expr"] for board in dashboards().values() for panel in panels_of(board)
             for target in panel["targets"]}
    assert [query.name for query in queries.panel_queries() if query.expr not in shown] == []


def test_query_names_are_unique_and_alerts_use_no_grafana_variables():
    names = [query.name for query in queries.all_queries()]
    assert len(names) == len(set(names))
    assert {alert.query.name: alert.query.variables() for alert in queries.ALERTS if alert.query.variables()} == {}


def test_dashboards_have_stable_uids_unique_panel_ids_and_query_the_datasource_variable():
    boards = dashboards()
    assert sorted(boards) == ["lorafleet-executors.json", "lorafleet-fleet.json", "lorafleet-job.json",
                              "lorafleet-tenants.json"]
    for name, board in boards.items():
        assert board["uid"] == name.removesuffix(".json")
        ids = [panel["id"] for panel in board["panels"]]
        assert len(ids) == len(set(ids)), name
        assert all(panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24 for panel in board["panels"]), name
        sources = [panel["datasource"] for panel in panels_of(board)]
        sources += [target["datasource"] for panel in panels_of(board) for target in panel["targets"]]
        assert {json.dumps(source, sort_keys=True) for source in sources} == {
            json.dumps({"type": "prometheus", "uid": "${datasource}"}, sort_keys=True)}, name


def test_each_variable_a_query_uses_is_defined_on_its_dashboard():
    by_expr = {query.expr: query for query in queries.panel_queries()}
    for name, board in dashboards().items():
        defined = {variable["name"] for variable in board["templating"]["list"]} | {"__rate_interval"}
        used = {var for panel in panels_of(board) for target in panel["targets"]
                for var in by_expr[target["expr"]].variables()}
        used |= {var for variable in board["templating"]["list"] for var in re.findall(r"\$(\w+)",
                                                                                        variable.get("query", ""))}
        assert used - defined == set(), name


def test_render_fills_in_every_variable_and_names_an_unknown_one():
    assert "$" not in queries.JOB_LOSS.render()
    assert 'tenant=~"alice"' in queries.JOB_LOSS.render(tenant="alice")
    with pytest.raises(KeyError, match="job_loss.*nope"):
        queries.Query("job_loss", "up{a=~\"$nope\"}").render()


# --- every expression parses and uses exported metrics -----------------------------------------------------------
def test_every_expression_parses(promtool, tmp_path):
    """Each panel, alert and annotation expression, as Prometheus would get it, as a recording rule."""
    rules = [{"record": f"lorafleet_check:{query.name}", "expr": query.render()} for query in queries.all_queries()]
    rules += [{"record": f"lorafleet_check:variable_{variable.name}", "expr": variable.series.replace(
        "$tenant", ".+")} for variable in queries.VARIABLES]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def test_promtool_accepts_the_alert_rules(promtool):
    run_promtool(promtool, "check", "rules", str(ROOT / build.RULES_FILE))


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS_AND_WINDOWS = re.compile(r"\{[^}]*\}|\[[^\]]*\]")
_NAME = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?")
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names_in(expr: str) -> set[str]:
    """The series names an expression selects (label names, functions and keywords left out)."""
    bare = _MATCHERS_AND_WINDOWS.sub(" ", _GROUPINGS.sub(" ", _STRINGS.sub('""', expr)))
    return {name for name, call in _NAME.findall(bare) if not call and name.lower() not in KEYWORDS}


def test_metric_names_in_finds_series_not_labels_functions_or_keywords():
    expr = ('sum by (tenant, le) (rate(a_bucket{x="y z"}[5m])) / on() group_left (b) '
            'max without (c) (b_total offset 5m) and bool up or vector(0)')
    assert metric_names_in(expr) == {"a_bucket", "b_total", "up"}


def exported(name: str, families: set[str]) -> bool:
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return name in families or base in families or name in BUILTIN_SERIES or name.startswith("process_")


def test_every_metric_a_query_or_variable_uses_is_one_lorafleet_exports():
    families = metric_names()
    used = {query.name: metric_names_in(query.render()) for query in queries.all_queries()}
    used |= {f"variable {variable.name}": metric_names_in(variable.series) for variable in queries.VARIABLES}
    assert all(used.values())  # the parser found a series in each
    unknown = {name: sorted(n for n in names if not exported(n, families)) for name, names in used.items()}
    assert {name: names for name, names in unknown.items() if names} == {}


# --- provisioning and the deploy files --------------------------------------------------------------------------
def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_provisioned_datasource_is_the_dashboards_default():
    sources = load_yaml(PROVISIONING / "datasources/prometheus.yml")["datasources"]
    assert [(s["type"], s["uid"], s["isDefault"]) for s in sources] == [("prometheus", build.DATASOURCE_UID, True)]
    for name, board in dashboards().items():
        variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
        assert (variable["type"], variable["query"], variable["current"]["value"]) == (
            "datasource", "prometheus", build.DATASOURCE_UID), name


def compose_grafana_mounts() -> dict[str, str]:
    """deploy/compose.yaml's grafana service: path in the repository -> path in the container."""
    service = load_yaml(ROOT / "deploy/compose.yaml")["services"]["grafana"]
    mounts = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[str((ROOT / "deploy" / source).resolve().relative_to(ROOT))] = target
    return mounts


def test_the_dashboard_provider_reads_the_folder_compose_mounts_the_dashboards_at():
    providers = load_yaml(PROVISIONING / "dashboards/lorafleet.yml")["providers"]
    assert [provider["type"] for provider in providers] == ["file"]
    mounts = compose_grafana_mounts()
    assert mounts[str(build.DASHBOARD_DIR)] == providers[0]["options"]["path"]
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def test_prometheus_loads_these_rules_and_scrapes_the_jobs_the_queries_select():
    config_path = ROOT / "deploy/prometheus.yml"
    config = load_yaml(config_path)
    rule_files = {(config_path.parent / name).resolve() for name in config["rule_files"]}
    assert (ROOT / build.RULES_FILE).resolve() in rule_files
    jobs = {scrape["job_name"] for scrape in config["scrape_configs"]}
    selected = {job for query in queries.all_queries() for job in re.findall(r'\bjob="([^"]+)"', query.expr)}
    assert selected and selected <= jobs


# --- what the expressions mean (promtool test rules on synthetic series) ----------------------------------------
SCRAPE = "15s"


def series(name: str, values: str, **labels: str) -> dict:
    inside = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{inside}}}", "values": values}


def expect(query: queries.Query, at: str, *samples: tuple[dict, float]) -> dict:
    """`query` evaluated at `at` returns exactly `samples` (labels, value)."""
    return {"expr": query.render(), "eval_time": at, "exp_samples": [
        {"labels": "{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "value": value}
        for labels, value in samples]}


def run_rule_tests(promtool: str, tmp_path: Path, tests: list[dict], rules: list[dict] | None = None) -> None:
    rules_path = tmp_path / "rules.yml"
    rules_path.write_text(yaml.safe_dump({"groups": [{"name": "lorafleet", "rules": rules or []}]}))
    tests_path = tmp_path / "tests.yml"
    tests_path.write_text(yaml.safe_dump({"rule_files": [rules_path.name], "evaluation_interval": SCRAPE,
                                          "tests": tests}, sort_keys=False))
    run_promtool(promtool, "test", "rules", str(tests_path))


def test_a_failover_counts_each_job_once_and_shows_one_leader(promtool, tmp_path):
    """Scheduler a leads for 5 minutes, then is deposed (its fleet series go, Prometheus marks them stale) and b
    leads: every fleet panel counts alice's two running jobs once, before, during and after."""
    a, b = {"instance": "a:9464", "job": "lorafleet-scheduler"}, {"instance": "b:9464", "job": "lorafleet-scheduler"}
    running = {"tenant": "alice", "state": "running"}
    inputs = [
        series("lorafleet_scheduler_leader", "1x20 0x20", **a),
        series("lorafleet_scheduler_leader", "0x20 1x20", **b),
        series("lorafleet_jobs", "2x20 stale", **a, **running),
        series("lorafleet_jobs", "_x21 2x20", **b, **running),
        series("lorafleet_executors_alive", "2x20 0x20", **a),  # a standby exports 0
        series("lorafleet_executors_alive", "0x20 2x20", **b),
    ]
    checks = []
    for at in ("4m", "5m15s", "8m"):
        checks += [expect(queries.RUNNING_BY_TENANT, at, ({"tenant": "alice"}, 2)),
                   expect(queries.RUNNING_JOBS, at, ({}, 2)),
                   expect(queries.TENANT_JOBS_BY_STATE, at, ({"tenant": "alice", "state": "running"}, 2)),
                   expect(queries.LEADERS, at, ({}, 1)),
                   expect(queries.EXECUTORS_ALIVE, at, ({}, 2))]
    checks.append(expect(queries.LEADER_BY_SCHEDULER, "8m", ({"instance": "a:9464"}, 0), ({"instance": "b:9464"}, 1)))
    run_rule_tests(promtool, tmp_path, [{"interval": SCRAPE, "input_series": inputs, "promql_expr_test": checks}])


def test_the_first_requeue_and_failures_across_a_failover_show_in_the_last_hour(promtool, tmp_path):
    """Requeue reasons are exported from 0, so the first requeue is an increase of 1. The failure counter lives in
    Redis: the new leader b exports it from where a left it (3), and the hour shows a's 3 and b's 1, not 7."""
    a, b = {"instance": "a:9464"}, {"instance": "b:9464"}
    inputs = [
        series("lorafleet_scheduler_requeued_total", "0x10 1x10", reason="executor_lost", **a),
        series("lorafleet_scheduler_requeued_total", "0x20", reason="not_held", **a),
        series("lorafleet_job_failures_total", "0x5 3x5 stale", reason="training", **a),
        series("lorafleet_job_failures_total", "_x11 3x4 4x4", reason="training", **b),
    ]
    checks = [expect(queries.REQUEUES_BY_REASON, "5m", ({"reason": "executor_lost"}, 1), ({"reason": "not_held"}, 0)),
              # rounded: increase() extrapolates a little at a series' ends (4.2 here; 7 if b's 3 counted again)
              {**expect(queries.FAILURES_BY_REASON, "4m45s", ({"reason": "training"}, 4)),
               "expr": f"round({queries.FAILURES_BY_REASON.render()})"}]
    run_rule_tests(promtool, tmp_path, [{"interval": SCRAPE, "input_series": inputs, "promql_expr_test": checks}])


def test_a_requeued_job_is_one_line_and_its_executor_changes(promtool, tmp_path):
    """Job j trains on executor e1, which dies; it continues on e2: its loss and progress are one line each, the
    executor panel shows where it trains now."""
    j = {"tenant": "alice", "job_id": "j"}
    inputs = [
        series("lorafleet_job_loss", "2.5x8 stale", executor="e1", instance="h1:9465", **j),
        series("lorafleet_job_loss", "_x12 2.0x8", executor="e2", instance="h2:9465", **j),
        series("lorafleet_job_progress_ratio", "0.25x8 stale", executor="e1", instance="h1:9465", **j),
        series("lorafleet_job_progress_ratio", "_x12 0.5x8", executor="e2", instance="h2:9465", **j),
    ]
    checks = [expect(queries.JOB_LOSS, "4m", ({"job_id": "j"}, 2.0)),
              expect(queries.JOB_PROGRESS, "4m", ({"job_id": "j"}, 0.5)),
              expect(queries.JOB_EXECUTOR, "4m", ({"job_id": "j", "executor": "e2"}, 1))]
    run_rule_tests(promtool, tmp_path, [{"interval": SCRAPE, "input_series": inputs, "promql_expr_test": checks}])


def alert_rules() -> list[dict]:
    """The generated rules without their annotations (promtool would compare the rendered text; `promtool check
    rules` checks the templates)."""
    rules = build.rules_document()["groups"][0]["rules"]
    return [{key: value for key, value in rule.items() if key != "annotations"} for rule in rules]


def fires(alert: str, at: str, *label_sets: dict) -> dict:
    return {"alertname": alert, "eval_time": at,
            "exp_alerts": [{"exp_labels": {"severity": severity(alert), **labels}} for labels in label_sets]}


def severity(alert: str) -> str:
    return next(a.severity for a in queries.ALERTS if a.name == alert)


def case(inputs: list[dict], *alert_tests: dict) -> dict:
    return {"interval": SCRAPE, "input_series": inputs, "alert_rule_test": list(alert_tests)}


def down_cases() -> list[dict]:
    """A target of each job stops answering at 75 s: pending for 2 minutes, then firing; a healthy one never."""
    cases = []
    for alert in queries.ALERTS:
        job = re.fullmatch(r'up\{job="([^"]+)"\} == 0', alert.query.expr)
        if job:
            broken, healthy = {"job": job[1], "instance": "h1:1"}, {"job": job[1], "instance": "h2:1"}
            cases.append(case([series("up", "1x4 0x30", **broken), series("up", "1x34", **healthy)],
                              fires(alert.name, "2m"), fires(alert.name, "4m", broken)))
    return cases


def queue_wait_buckets(slow: bool) -> list[dict]:
    """One job assigned every 15 s, each after ~50 minutes in the queue (slow) or ~10 s."""
    counts = {"15": "0+0x80" if slow else "0+1x80", "1800": "0+0x80" if slow else "0+1x80",
              "3600": "0+1x80", "+Inf": "0+1x80"}
    return [series("lorafleet_queue_wait_seconds_bucket", values, le=le) for le, values in counts.items()]


SCHEDULER_A, SCHEDULER_B = {"instance": "a:9464"}, {"instance": "b:9464"}
FAILURES, ASSIGNMENTS = "lorafleet_job_failures_total", "lorafleet_scheduler_assignments_total"
SIX_FAILURES = "0x20 1+1x5 6x60"  # 6 failures between 5 and 6.5 minutes
ALERT_CASES = down_cases() + [
    # no leader: every scheduler reports 0, or none is scraped at all; one leader across a failover is fine
    case([series("lorafleet_scheduler_leader", "0x20", **SCHEDULER_A),
          series("lorafleet_scheduler_leader", "0x20", **SCHEDULER_B)],
         fires("LorafleetNoLeader", "3m", {})),
    case([series("up", "1x20", job="lorafleet-executor")], fires("LorafleetNoLeader", "3m", {})),
    case([series("lorafleet_scheduler_leader", "1x4 0x20", **SCHEDULER_A),
          series("lorafleet_scheduler_leader", "0x4 1x20", **SCHEDULER_B)],
         fires("LorafleetNoLeader", "3m")),
    # failures: 6 of 10 assignments fire; 6 with no assignment series at all fire; 6 of ~300 and 3 of 3 do not
    case([series(FAILURES, SIX_FAILURES, reason="training"), series(ASSIGNMENTS, "0x20 1+1x9 10x60", tenant="a")],
         fires("LorafleetJobFailureRateHigh", "15m", {})),
    case([series(FAILURES, SIX_FAILURES, reason="sizing")], fires("LorafleetJobFailureRateHigh", "15m", {})),
    case([series(FAILURES, SIX_FAILURES, reason="training"), series(ASSIGNMENTS, "0+4x80", tenant="a")],
         fires("LorafleetJobFailureRateHigh", "15m")),
    case([series(FAILURES, "0x20 1+1x2 3x60", reason="training"),
          series(ASSIGNMENTS, "0x20 1+1x2 3x60", tenant="a")],
         fires("LorafleetJobFailureRateHigh", "15m")),
    # GPU memory: executor a at 97% fires after 5 minutes, b at 80% never
    case([series("lorafleet_gpu_memory_used_bytes", "97x40", executor="a", instance="h:9465"),
          series("lorafleet_gpu_memory_total_bytes", "100x40", executor="a", instance="h:9465"),
          series("lorafleet_gpu_memory_used_bytes", "80x40", executor="b", instance="h:9466"),
          series("lorafleet_gpu_memory_total_bytes", "100x40", executor="b", instance="h:9466")],
         fires("LorafleetGpuMemoryNearFull", "4m"), fires("LorafleetGpuMemoryNearFull", "10m", {"executor": "a"})),
    # queue wait: jobs assigned after ~50 minutes in the queue fire; after ~10 s do not
    case(queue_wait_buckets(slow=True), fires("LorafleetQueueWaitHigh", "20m", {})),
    case(queue_wait_buckets(slow=False), fires("LorafleetQueueWaitHigh", "20m")),
    # a queue nothing leaves: 3 jobs queued and no assignment for the hour (or no assignment series at all) fire
    # after 10 minutes; assignments going on do not
    case([series("lorafleet_jobs", "3x60", tenant="a", state="queued"), series(ASSIGNMENTS, "5x60", tenant="a")],
         fires("LorafleetQueueStalled", "5m"), fires("LorafleetQueueStalled", "12m", {})),
    case([series("lorafleet_jobs", "3x60", tenant="a", state="queued")], fires("LorafleetQueueStalled", "12m", {})),
    case([series("lorafleet_jobs", "3x60", tenant="a", state="queued"), series(ASSIGNMENTS, "0+1x60", tenant="a")],
         fires("LorafleetQueueStalled", "12m")),
    # generation: a base whose queue is never empty fires after 10 minutes; one that empties between requests, or a
    # queue that empties after 8 minutes, does not
    case([series("lorafleet_generation_queued", "3x60", base="org/busy"),
          series("lorafleet_generation_queued", " ".join(["2 0"] * 30), base="org/served"),
          series("lorafleet_generation_queued", "5x32 0x28", base="org/caught-up")],
         fires("LorafleetGenerationBacklog", "8m"), fires("LorafleetGenerationBacklog", "12m", {"base": "org/busy"})),
    # publishing: a backlog never empty fires after 15 minutes; one that empties between checkpoint rounds, or after
    # 10 minutes, does not
    case([series("lorafleet_publish_backlog", "3x80", executor="slow", instance="h:9465"),
          series("lorafleet_publish_backlog", " ".join(["8 0"] * 40), executor="keeping-up", instance="h:9466"),
          series("lorafleet_publish_backlog", "5x40 0x40", executor="caught-up", instance="h:9467")],
         fires("LorafleetPublishBehind", "12m"), fires("LorafleetPublishBehind", "17m", {"executor": "slow"})),
    # a publication failing at 5 minutes fires from a minute later; publications recorded never do
    case([series("lorafleet_publications_total", "0x20 1x60", executor="a", kind="checkpoint", outcome="failed"),
          series("lorafleet_publications_total", "0+1x80", executor="b", kind="checkpoint", outcome="recorded"),
          series("lorafleet_publications_total", "0x80", executor="b", kind="result", outcome="failed")],
         fires("LorafleetPublishFailing", "4m"), fires("LorafleetPublishFailing", "8m", {"executor": "a"})),
]


def test_every_alert_has_rule_tests_where_it_fires_and_where_it_does_not():
    firing = {test["alertname"] for c in ALERT_CASES for test in c["alert_rule_test"] if test["exp_alerts"]}
    silent = {test["alertname"] for c in ALERT_CASES for test in c["alert_rule_test"] if not test["exp_alerts"]}
    every = {alert.name for alert in queries.ALERTS}
    assert (firing, silent) == (every, every)


def test_alerts_fire_when_they_should_and_not_otherwise(promtool, tmp_path):
    run_rule_tests(promtool, tmp_path, ALERT_CASES, alert_rules())
