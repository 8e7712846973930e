"""`lorafleet top` on a real Valkey, in real terminals (tmux at 80x24 and 160x40): executors, cohorts and the queue
by tenant as the store has them, ids whole on one line, refreshed as Redis changes, `q` quits; `--once`, `--json`;
the pure rendering at 80 columns. And `lorafleet up --metrics-port` with a taken port: one error line."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from helpers_polling import wait_until
from lorafleet.scheduler import fleet, top
from lorafleet.scheduler.generation import Generations
from lorafleet.scheduler.leader import LeaderLock
from lorafleet.scheduler.records import ExecutorHeartbeat, GpuStats, StepStats
from lorafleet.scheduler.redis_server import RedisServer, start_redis_server
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.store import JobStore

GIB = 1024**3
# Long, as real host-device ids are: they must still come out whole at 80 columns.
TRAINING = "gpu-node-0042.fleet.internal-cuda:0"
IDLE = "gpu-node-0042.fleet.internal-cuda:1"
CLI = [sys.executable, "-P", "-m", "lorafleet.scheduler.cli"]


class Fleet:
    """A fleet written through the store's own API on a server of its own: two tenants, two executors (one
    training a cohort of two jobs), a leader."""

    def __init__(self, server: RedisServer):
        self.server, self.url = server, server.url
        self.store = store = JobStore.from_url(server.url)
        store.ensure_schema()
        suffix = secrets.token_hex(3)
        self.alice, self.bob = f"alice-{suffix}", f"bob-{suffix}"
        store.create_tenant(self.alice, max_running=3)
        store.create_tenant(self.bob, max_running=5)
        self.cohort = [self.submit(self.alice), self.submit(self.bob)]
        self.queued = [self.submit(self.alice) for _ in range(3)] + [self.submit(self.bob)]
        self.attempts = {job_id: store.claim(job_id, TRAINING) for job_id in self.cohort}
        for step, (job_id, attempt) in enumerate(self.attempts.items(), start=7):
            assert store.start(job_id, attempt, TRAINING)
            assert store.record_progress(job_id, step, 200, {"loss": 1.25, "tokens_per_s": 950.0}, attempt=attempt,
                                         executor_id=TRAINING)
        self.beat(TRAINING, jobs=self.attempts, peak=61 * GIB, step=StepStats(seconds=0.5, trained_tokens=1900, graphed=True),
                  gpu=GpuStats(memory_total_bytes=80 * GIB, memory_used_bytes=62 * GIB, utilization=0.93))
        self.beat(IDLE, jobs={}, peak=1 * GIB, step=None, gpu=None)
        self.leader = f"sched-{suffix}-4242"
        assert LeaderLock(store.r, self.leader, ttl_seconds=300).try_acquire() is not None

    def submit(self, tenant: str) -> str:
        spec = parse_spec({"base_model": "/models/tiny", "dataset": f"{tenant}/train.jsonl", "name": "top-test"})
        return self.store.submit(tenant, spec)["job_id"]

    def beat(self, executor_id: str, jobs: dict, peak: int, step, gpu) -> None:
        fleet.heartbeat(self.store.r, ExecutorHeartbeat(
            executor_id=executor_id, host="gpu-node-0042", device=executor_id.rsplit("-", 1)[1], total_bytes=80 * GIB,
            peak_bytes=peak, jobs=jobs, compat_key="tiny|none|bfloat16" if jobs else None, last_step=step, gpu=gpu,
        ), ttl=600)


@pytest.fixture
def fleet_view(tmp_path) -> Fleet:
    server = start_redis_server(tmp_path / "redis")  # its own: `lorafleet top` shows every executor of a server
    try:
        yield Fleet(server)
    finally:
        server.stop()


def lorafleet(fleet_view: Fleet, *args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "REDIS_URL": fleet_view.url, "COLUMNS": str(columns)}
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def line_with(screen: str, text: str) -> str:
    """The one line of `screen` that holds `text` whole (AssertionError when it is split or absent)."""
    lines = [line for line in screen.splitlines() if text in line]
    assert lines, f"{text!r} is not whole on any line of:\n{screen}"
    return lines[0]


def queue_row(screen: str, tenant: str) -> list[str]:
    """The tenant's row of the queue table: tenant, queued, scheduled, running, max_running, ..."""
    return line_with(screen.split("queue by tenant", 1)[1], tenant).split()


def header(screen: str, first: str) -> str:
    """The header line of the table whose first column is `first`."""
    return next(line for line in screen.splitlines() if line.split()[:1] == [first])


# ---- --json and --once ----


def test_json_is_one_snapshot_of_the_store(fleet_view):
    result = lorafleet(fleet_view, "top", "--json")
    assert result.returncode == 0, result.stderr
    snapshot = json.loads(result.stdout)
    executors = {e["heartbeat"]["executor_id"]: e for e in snapshot["executors"]}
    assert set(executors) == {TRAINING, IDLE}
    training = executors[TRAINING]
    assert training["state"] == "training" and executors[IDLE]["state"] == "idle"
    assert sorted(job["job_id"] for job in training["cohort"]) == sorted(fleet_view.cohort)
    assert {job["step"] for job in training["cohort"]} == {7, 8}
    assert training["tokens_per_s"] == pytest.approx(1900 / 0.5)
    assert training["heartbeat"]["last_step"]["graphed"] is True  # the step replayed a CUDA graph
    assert training["memory_used_bytes"] == 62 * GIB and training["utilization"] == pytest.approx(0.93)
    assert executors[IDLE]["utilization"] is None, "no NVML reading: no utilisation, not a false 0"
    tenants = {t["tenant"]: t for t in snapshot["tenants"]}
    assert (tenants[fleet_view.alice]["queued"], tenants[fleet_view.alice]["running"]) == (3, 1)
    assert (tenants[fleet_view.bob]["queued"], tenants[fleet_view.bob]["max_running"]) == (1, 5)
    assert snapshot["leader"] == fleet_view.leader
    assert snapshot["jobs"]["queued"] == 4 and snapshot["jobs"]["running"] == 2
    assert snapshot["totals"]["executors"] == 2


def test_json_and_the_summary_count_the_generation_requests_waiting_by_base(fleet_view, hf_cache, base_model_dir):
    generations = Generations(fleet_view.store, hf_cache, [base_model_dir.parent.parent])
    for prompt in ("one", "two"):
        generations.submit(fleet_view.alice, str(base_model_dir), prompt=prompt, timeout=60)
    generations.submit(fleet_view.bob, "test-org/tiny-model", prompt="three", timeout=60)
    snapshot = json.loads(lorafleet(fleet_view, "top", "--json").stdout)
    assert snapshot["generation_queued"] == {str(base_model_dir): 2, "test-org/tiny-model": 1}
    assert "generation: 3 queued" in lorafleet(fleet_view, "top", "--once").stdout


def test_once_prints_one_frame_within_80_columns_with_ids_whole(fleet_view):
    result = lorafleet(fleet_view, "top", "--once", columns=80)
    assert result.returncode == 0, result.stderr
    screen = result.stdout
    assert max(len(line) for line in screen.splitlines()) <= 80, screen
    for whole in (TRAINING, IDLE, *fleet_view.cohort, fleet_view.leader):
        line_with(screen, whole)
    assert queue_row(screen, fleet_view.alice)[1:3] == ["3", "0"], "queued 3, scheduled 0"


def test_top_without_redis_access_is_one_error_line(fleet_view):
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([*CLI, "top", "--once"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("Error: cannot reach Redis") and len(result.stderr.splitlines()) == 1


# ---- the pure rendering ----


def _snapshot(executors: int) -> top.FleetSnapshot:
    jobs = tuple(top.CohortJob(f"job-{i:016x}", f"tenant-with-a-long-name-{i}", "a-rather-long-job-name", "running",
                               1234, 100000, 0.987654, 12345.6) for i in range(3))
    statuses = tuple(
        top.ExecutorStatus(
            ExecutorHeartbeat(f"an-unusually-long-hostname-{n}.example.com-cuda:{n}", host=f"host-{n}",
                              device=f"cuda:{n}", total_bytes=141 * GIB, peak_bytes=100 * GIB,
                              compat_key="meta-llama/Llama-3.1-70B|nf4|bfloat16", heartbeat_at=1_000_000.0,
                              last_step=StepStats(1.5, 9000, 8000, 9000, 0.41),
                              gpu=GpuStats(141 * GIB, 120 * GIB, 0.97, 650.0, 71.0)),
            draining=n == 1, cohort=jobs)
        for n in range(executors))
    tenants = tuple(top.TenantQueue(f"tenant-with-a-long-name-{i}", 1000 + i, 2, 3, 4, 16, 100000, 2.5, i == 0)
                    for i in range(3))
    return top.FleetSnapshot(1_000_001.0, "scheduler-host.example.com-123456", statuses, tenants,
                             {"queued": 3003, "running": 9})


def _screen(snapshot: top.FleetSnapshot, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(top.render(snapshot, width, footer="every 2 s; q quits"))
    return console.export_text()


def test_no_line_of_the_view_is_longer_than_80_columns_and_ids_stay_whole():
    snapshot = _snapshot(executors=3)
    screen = _screen(snapshot, 80)
    assert max(len(line) for line in screen.splitlines()) <= 80, screen
    for status in snapshot.executors:
        assert line_with(screen, status.heartbeat.executor_id)
    for job in snapshot.executors[0].cohort:
        assert line_with(screen, job.job_id)
    assert "draining" in line_with(screen, snapshot.executors[1].heartbeat.executor_id)


def test_a_wider_terminal_shows_more_columns():
    snapshot = _snapshot(executors=1)
    narrow, wide = _screen(snapshot, 80), _screen(snapshot, 200)
    narrow_header, wide_header = header(narrow, "executor"), header(wide, "executor")
    for column in ("device", "host", "mfu", "mem use"):
        assert column not in narrow_header and column in wide_header, (column, narrow, wide)
    assert max(len(line) for line in wide.splitlines()) <= 200


# ---- live, in tmux ----


class Tmux:
    """One tmux server of its own (its own socket), running one command in a pane of a given size. When the command
    ends, the pane says so with its exit status (tmux's own dead-pane flag lags at times)."""

    def __init__(self, command: list[str], env: dict[str, str], width: int, height: int, cwd: Path):
        self.socket = f"lorafleet-top-{secrets.token_hex(4)}"
        # Without COLUMNS and LINES (pytest exports 80x24): the pane's own size is what is tested.
        line = shlex.join(["env", "-u", "COLUMNS", "-u", "LINES", *(f"{k}={v}" for k, v in env.items()), *command])
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", str(width), "-y", str(height), "-s", "top",
                  "-c", str(cwd), f'{line}; echo "command exited with $?"; exec sleep 600')

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True,
                              timeout=30).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def exit_status(self) -> str | None:
        """The command's exit status once it ended, else None."""
        found = re.search(r"command exited with (\d+)", self.screen())
        return found.group(1) if found else None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux_top(fleet_view, tmp_path):
    if shutil.which("tmux") is None:
        pytest.fail("tmux is needed to check the screens (apt-get install tmux)")
    started = []

    def start(width: int, height: int) -> Tmux:
        env = {"REDIS_URL": fleet_view.url, "TERM": "xterm-256color", "PATH": os.environ["PATH"]}
        started.append(Tmux([*CLI, "top", "--interval", "0.5"], env, width, height, tmp_path))
        return started[-1]

    yield start
    for session in started:
        session.close()


def screen_where(session: Tmux, holds, what: str, timeout: float = 30) -> str:
    """The first screen for which `holds(screen)` is true (a screen it cannot parse yet does not hold)."""
    def check() -> str | None:
        screen = session.screen()
        try:
            return screen if holds(screen) else None
        except (AssertionError, IndexError):
            return None

    return wait_until(check, what, timeout=timeout, details=session.screen)


def _wait_for_screen(session: Tmux, *texts: str) -> str:
    return screen_where(session, lambda screen: all(text in screen for text in texts), f"{texts} on screen")


def test_live_view_at_80x24_shows_whole_ids_refreshes_and_quits_on_q(fleet_view, tmux_top):
    session = tmux_top(80, 24)
    screen = _wait_for_screen(session, "queue by tenant", fleet_view.alice)
    assert max(len(line.rstrip()) for line in screen.splitlines()) <= 80
    for whole in (TRAINING, IDLE, *fleet_view.cohort):
        line_with(screen, whole)
    assert queue_row(screen, fleet_view.alice)[1] == "3" and queue_row(screen, fleet_view.bob)[1] == "1"

    fleet_view.submit(fleet_view.bob)
    fleet_view.submit(fleet_view.bob)  # bob: 3 queued now
    assert fleet.request_drain(fleet_view.store.r, IDLE)
    screen = screen_where(session, lambda screen: queue_row(screen, fleet_view.bob)[1] == "3",
                          "bob's queued count to reach 3 on screen", timeout=10)
    assert "draining" in line_with(screen, IDLE)

    session.tmux("send-keys", "-t", "top", "q")
    assert wait_until(session.exit_status, "top to exit on q", timeout=10) == "0"


def test_live_view_at_160x40_uses_the_width(fleet_view, tmux_top):
    session = tmux_top(160, 40)
    screen = _wait_for_screen(session, "queue by tenant", fleet_view.bob)
    executors = header(screen, "executor")
    for column in ("device", "util", "mem use", "step"):
        assert column in executors, screen
    assert "93%" in line_with(screen, TRAINING)
    assert max(len(line.rstrip()) for line in screen.splitlines()) <= 160
    session.tmux("send-keys", "-t", "top", "C-c")
    assert wait_until(session.exit_status, "top to exit on Ctrl-C", timeout=10) == "0"


def test_live_view_says_redis_is_unreachable_and_still_quits_on_q(fleet_view, tmux_top):
    session = tmux_top(80, 24)
    _wait_for_screen(session, "queue by tenant")
    fleet_view.server.stop()
    _wait_for_screen(session, "cannot read Redis")
    session.tmux("send-keys", "-t", "top", "q")
    assert wait_until(session.exit_status, "top to exit on q", timeout=10) == "0"


# ---- lorafleet up ----


def test_up_with_a_taken_metrics_port_ends_with_one_error_line_naming_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(LORAFLEET_STATE_DIR=str(tmp_path / "state"), COLUMNS="200")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*CLI, "up", "--device", "cpu", "--metrics-port", str(port)], env=env,
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: scheduler exited"), result.stderr
    assert f"cannot serve metrics and health on 127.0.0.1:{port}: Address already in use" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
