"""Benchmark of one full scheduling round, `Scheduler.round()`, with all its Redis I/O, against a real Valkey server.

    python -P bench/bench_round.py [--queued 1000,10000,100000] [--executors 100] [--tenants 200] [--rounds 30]
                                   [--out bench/results/bench_round.json] [--profile bench/results/round.prof]

What is timed: only `scheduler.round()` (time.perf_counter around it): reading heartbeats, reconciling held jobs,
reading tenants, the queue and new queued records, planning, and claiming in one pipeline. Setup (submitting jobs,
executors picking up their jobs and heartbeating, jobs finishing) is done between rounds and not timed. The scheduler
is `Scheduler(store, "bench")`: no Prometheus metrics (`lorafleet scheduler` exports some after each round) and no
retention purge.

For each queue size a fresh server (`start_redis_server`, temp dir) gets `--tenants` tenants and `--executors`
executors (H200-like: 141 GiB, bf16); jobs are Llama-8B-shaped LoRA jobs (r=16, all 7 projections, batch 4 x 512) on
4 bases, tenant i always on base i % 4. The queue is topped back up to the wanted size before every round, so the
backlog stays at `queued` whatever the fleet took. The simulated executors act as real ones do between rounds: read
their holding index, start what was assigned (scheduled -> running), heartbeat the leases they hold with the
assignment sequence they saw, and a peak equal to the model's prediction (calibration factor 1). Also, like real
executors beating every TTL/4 = 2.5 s against a 0.5 s round interval, a fifth of the fleet re-heartbeats before
each round (`--beats-per-round`), so a round calibrates about as many new heartbeats as in production.

Scenarios per size:
  cold       the first round of a new scheduler on an empty fleet: it reads every queued record once, and fills
             the fleet; "failover" is the first round of a second scheduler taking over a full fleet.
  full       the fleet is full (rounds run until one assigns nothing first): steady state under overload.
  churn      before each round `--churn` executors finish every job they hold (running -> succeeded) and say so
             in their heartbeat, so each round really plans and claims a few dozen jobs.

The leader lock has a 3 s TTL and is renewed by the scheduler's own thread (`LeaderLock.keep_renewed`) throughout;
a lost lock is one where the token is None after a round (the lock is then re-taken and counting goes on).

Targets (on the 2-core CI-like machine, 100 executors): round p95 <= 50 ms at 10,000 queued, <= 500 ms at 100,000
queued, and no lost lock.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import hashlib
import io
import json
import os
import platform
import pstats
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import redis

from lorafleet.scheduler import fleet, keys
from lorafleet.scheduler.memory import JobPlan, ModelShape, plan_job
from lorafleet.scheduler.records import ExecutorHeartbeat, JobRecord, JobState
from lorafleet.scheduler.redis_server import redis_server_binary, start_redis_server
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.spec import ALL_PROJECTIONS, JobSpec, parse_spec
from lorafleet.scheduler.store import JobStore

REPO = Path(__file__).resolve().parent.parent
LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128256)
BASES = 4
EXECUTOR_BYTES = 141 * 2**30
HEARTBEAT_TTL = 600.0  # long: the benchmark's setup must not let an executor lapse between its beats
LOCK_TTL = 3.0
MAX_RUNNING_PER_TENANT = 50
MAX_QUEUED_PER_TENANT = 100_000  # the store's upper bound
MAX_FILL_ROUNDS = 50
TARGETS_P95_S = {10_000: 0.050, 100_000: 0.500}


# ------------------------------------------------------------------------------------------------ the workload


def base_of(tenant_index: int) -> int:
    return tenant_index % BASES


def job_plan(base: int) -> JobPlan:
    return plan_job(f"/models/base-{base}|none|auto", f"/models/base-{base}", LLAMA_8B, 16, ALL_PROJECTIONS,
                    batch_size=4, max_seq_len=512, quantization="none", dtype="auto", tokens=100 * 4 * 512)


def job_spec(tenant: str, base: int) -> JobSpec:
    return parse_spec({"base_model": f"/models/base-{base}", "dataset": f"{tenant}/train.jsonl",
                       "hyperparameters": {"max_steps": 100}})


class Workload:
    """Tenants and their jobs: submits round-robin over tenants, through the store's own `submit`."""

    def __init__(self, store: JobStore, tenants: int):
        self.store = store
        self.tenants = [f"tenant-{i:03d}" for i in range(tenants)]
        for name in self.tenants:
            store.create_tenant(name, max_queued=MAX_QUEUED_PER_TENANT, max_running=MAX_RUNNING_PER_TENANT)
        self.plans = [job_plan(base) for base in range(BASES)]
        self.specs = [job_spec(name, base_of(i)) for i, name in enumerate(self.tenants)]
        self.submitted = 0

    def submit(self, count: int) -> None:
        for _ in range(count):
            i = self.submitted % len(self.tenants)
            self.store.submit(self.tenants[i], self.specs[i], plan=self.plans[base_of(i)])
            self.submitted += 1

    def top_up(self, queued: int) -> int:
        """Submit jobs until `queued` are queued; returns how many it submitted."""
        missing = max(0, queued - self.store.r.zcard(keys.QUEUE))
        self.submit(missing)
        return missing


# ------------------------------------------------------------------------------------------------ the executors


class SimulatedFleet:
    """Executors that do between rounds what real ones do: take their assignments and heartbeat their leases."""

    def __init__(self, store: JobStore, count: int):
        self.store = store
        self.ids = [f"exec-{i:03d}" for i in range(count)]
        self.loaded: dict[str, Optional[JobPlan]] = {executor_id: None for executor_id in self.ids}
        self.next_beat = 0
        for executor_id in self.ids:
            self.beat(executor_id, [], 0)

    def beat(self, executor_id: str, records: list[JobRecord], synced_seq: int) -> None:
        """A heartbeat for the leases in `records`; the measured peak is what the memory model predicts."""
        base = self.loaded[executor_id]
        size = base.size("bfloat16") if base else None
        peak = (size.base_bytes if size else 0) + sum(r.plan.size("bfloat16").job_bytes for r in records)
        fleet.heartbeat(self.store.r, ExecutorHeartbeat(
            executor_id, host="bench", device="cuda:0", dtypes=("bfloat16", "float32"), auto_dtype="bfloat16",
            total_bytes=EXECUTOR_BYTES, peak_bytes=peak, compat_key=base.compat_key if base else None,
            base_bytes=size.base_bytes if size else 0, jobs={r.job_id: r.attempt for r in records},
            synced_seq=synced_seq,
        ), ttl=HEARTBEAT_TTL)

    def sync(self, executor_id: str) -> None:
        """Read the holding index, start what was assigned, heartbeat the held leases (as the worker's loop does)."""
        seq, held = self.store.holding(executor_id)
        records = [r for r in self.store.jobs(sorted(held)) if r.executor_id == executor_id]
        for record in records:
            if record.state == JobState.SCHEDULED:
                self.store.start(record.job_id, record.attempt, executor_id)
        if records:
            self.loaded[executor_id] = records[0].plan
        self.beat(executor_id, records, seq)

    def finish_all(self, executor_id: str) -> int:
        """Every job the executor holds succeeds; it keeps its base loaded and says it holds nothing."""
        seq, held = self.store.holding(executor_id)
        records = self.store.jobs(sorted(held))
        for record in records:
            if record.state == JobState.SCHEDULED:
                self.store.start(record.job_id, record.attempt, executor_id)
            self.store.succeed(record.job_id, "file:///x", record.attempt, executor_id)
        self.beat(executor_id, [], seq)
        return len(records)

    def background_beats(self, count: int) -> None:
        """The next `count` executors (in rotation) send their periodic heartbeat."""
        for _ in range(count):
            self.sync(self.ids[self.next_beat % len(self.ids)])
            self.next_beat += 1


# ------------------------------------------------------------------------------------------------ timing rounds


@dataclass
class RoundStats:
    seconds: list[float] = field(default_factory=list)
    assignments: list[int] = field(default_factory=list)
    lost_locks: int = 0

    def summary(self) -> dict:
        ordered = sorted(self.seconds)
        return {
            "rounds": len(ordered), "p50_s": percentile(ordered, 0.50), "p95_s": percentile(ordered, 0.95),
            "max_s": ordered[-1] if ordered else None,
            "mean_s": sum(ordered) / len(ordered) if ordered else None,
            "assignments_per_round": sum(self.assignments) / len(self.assignments) if self.assignments else 0.0,
            "lost_locks": self.lost_locks,
        }


def percentile(ordered: list[float], q: float) -> Optional[float]:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


class RoundTimer:
    """Times `scheduler.round()` only (and profiles only it, when given a profiler); counts lost leader locks."""

    def __init__(self, profiler: Optional[cProfile.Profile] = None):
        self.profiler = profiler

    def run(self, scheduler: Scheduler, stats: RoundStats) -> list:
        if self.profiler:
            self.profiler.enable()
        started = time.perf_counter()
        assignments = scheduler.round()
        elapsed = time.perf_counter() - started
        if self.profiler:
            self.profiler.disable()
        stats.seconds.append(elapsed)
        stats.assignments.append(len(assignments))
        if scheduler.lock.token is None:
            stats.lost_locks += 1
            scheduler.lock.try_acquire()
        return assignments


class Leader:
    """A scheduler holding the leader lock, renewed by its own thread, as `Scheduler.run` does."""

    def __init__(self, store: JobStore, holder: str):
        self.scheduler = Scheduler(store, holder, lock_ttl=LOCK_TTL)
        if self.scheduler.lock.try_acquire() is None:
            raise RuntimeError(f"{holder} could not take the leader lock")
        self.stopping = threading.Event()
        self.renewal = self.scheduler.lock.keep_renewed(self.stopping)

    def step_down(self) -> None:
        self.stopping.set()
        self.renewal.join()
        if self.scheduler.lock.token is not None:
            self.scheduler.lock.release()


def sync_assigned(executors: SimulatedFleet, assignments: list) -> None:
    for executor_id in sorted({a.executor_id for a in assignments}):
        executors.sync(executor_id)


def before_round(workload: Workload, executors: SimulatedFleet, queued: int, beats: int) -> None:
    workload.top_up(queued)
    executors.background_beats(beats)


# ------------------------------------------------------------------------------------------------ scenarios


def fill_fleet(leader: Leader, workload: Workload, executors: SimulatedFleet, queued: int, beats: int) -> int:
    """Rounds until one assigns nothing (the fleet is full); returns the rounds it took."""
    for rounds in range(1, MAX_FILL_ROUNDS + 1):
        before_round(workload, executors, queued, beats)
        assignments = leader.scheduler.round()
        sync_assigned(executors, assignments)
        if not assignments:
            return rounds
    raise RuntimeError(f"the fleet still took jobs after {MAX_FILL_ROUNDS} rounds")


def fleet_full(leader: Leader, workload: Workload, executors: SimulatedFleet, queued: int, rounds: int,
               beats: int, timer: RoundTimer) -> RoundStats:
    stats = RoundStats()
    for _ in range(rounds):
        before_round(workload, executors, queued, beats)
        sync_assigned(executors, timer.run(leader.scheduler, stats))
    return stats


def churn(leader: Leader, workload: Workload, executors: SimulatedFleet, queued: int, rounds: int, freed: int,
          beats: int, timer: RoundTimer) -> tuple[RoundStats, int]:
    """Each round `freed` executors (in rotation) first finish all their jobs. Returns the stats, jobs finished."""
    stats, finished = RoundStats(), 0
    for r in range(rounds):
        for i in range(freed):
            finished += executors.finish_all(executors.ids[(r * freed + i) % len(executors.ids)])
        before_round(workload, executors, queued, beats)
        sync_assigned(executors, timer.run(leader.scheduler, stats))
    return stats, finished


def held_jobs(store: JobStore) -> int:
    return store.r.scard(keys.state_set(JobState.SCHEDULED)) + store.r.scard(keys.state_set(JobState.RUNNING))


def bench_size(queued: int, args: argparse.Namespace, profiler: Optional[cProfile.Profile]) -> dict:
    """Every scenario at one queue size, on a fresh server."""
    beats = args.beats_per_round
    with tempfile.TemporaryDirectory(prefix="bench-round-") as tmp:
        server = start_redis_server(Path(tmp) / "redis")
        try:
            store = JobStore(server.client())
            store.ensure_schema()
            started = time.perf_counter()
            workload = Workload(store, args.tenants)
            workload.submit(queued)
            submit_s = time.perf_counter() - started
            log(f"[{queued:,}] submitted {queued:,} jobs in {submit_s:.1f} s ({submit_s / queued * 1e3:.2f} ms/job)")
            executors = SimulatedFleet(store, args.executors)
            leader = Leader(store, "bench")
            timer, unprofiled = RoundTimer(profiler), RoundTimer()

            cold = RoundStats()
            sync_assigned(executors, unprofiled.run(leader.scheduler, cold))
            log(f"[{queued:,}] cold round {cold.seconds[0]:.3f} s, {cold.assignments[0]} assignments")
            fill_rounds = fill_fleet(leader, workload, executors, queued, beats)
            log(f"[{queued:,}] fleet full after {fill_rounds} more rounds: {held_jobs(store)} jobs held")

            full = fleet_full(leader, workload, executors, queued, args.rounds, beats, timer)
            log(f"[{queued:,}] full: p50 {full.summary()['p50_s']:.3f} s, p95 {full.summary()['p95_s']:.3f} s")
            churned, finished = churn(leader, workload, executors, queued, args.rounds, args.churn, beats, timer)
            log(f"[{queued:,}] churn: p50 {churned.summary()['p50_s']:.3f} s, p95 {churned.summary()['p95_s']:.3f} s")
            leader.step_down()

            standby = Leader(store, "bench-standby")
            failover = RoundStats()
            before_round(workload, executors, queued, beats)
            sync_assigned(executors, unprofiled.run(standby.scheduler, failover))
            standby.step_down()
            log(f"[{queued:,}] failover round {failover.seconds[0]:.3f} s")
            return {
                "queued": queued, "jobs_held_when_full": held_jobs(store), "jobs_submitted": workload.submitted,
                "jobs_finished_in_churn": finished, "setup_submit_s": submit_s,
                "cold_round": {"empty_fleet": cold.summary(), "failover_full_fleet": failover.summary()},
                "fill_rounds": fill_rounds,
                "scenarios": {"full": full.summary(), "churn": churned.summary()},
                "redis_used_memory_bytes": int(store.r.info("memory")["used_memory"]),
            }
        finally:
            server.stop()


# ------------------------------------------------------------------------------------------------ report


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def git(*argv: str) -> str:
    try:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict:
    server = redis_server_binary()
    version = subprocess.run([server, "--version"], capture_output=True, text=True).stdout.strip()
    try:
        import hiredis  # redis-py parses replies with it when installed: much faster on large replies
        parser = f"hiredis {hiredis.__version__}"
    except ImportError:
        parser = "pure Python"
    return {"nproc": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "redis_server": version, "redis_py": redis.__version__,
            "reply_parser": parser}


def ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def table(results: list[dict]) -> str:
    head = ("queued", "scenario", "rounds", "p50 ms", "p95 ms", "max ms", "assign/round", "lost locks", "target p95")
    rows = []
    for result in results:
        target = TARGETS_P95_S.get(result["queued"])
        cases = [("cold (empty fleet)", result["cold_round"]["empty_fleet"]),
                 ("cold (failover)", result["cold_round"]["failover_full_fleet"]),
                 ("full", result["scenarios"]["full"]), ("churn", result["scenarios"]["churn"])]
        for name, s in cases:
            steady = not name.startswith("cold")
            verdict = ("-" if target is None or not steady
                       else f"{'ok' if s['p95_s'] <= target else 'MISSED'} ({target * 1e3:.0f})")
            rows.append((f"{result['queued']:,}", name, str(s["rounds"]), ms(s["p50_s"]), ms(s["p95_s"]),
                         ms(s["max_s"]), f"{s['assignments_per_round']:.1f}", str(s["lost_locks"]), verdict))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def profile_report(profiler: cProfile.Profile, path: Path, queued: int, top: int = 30) -> str:
    profiler.dump_stats(str(path))
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return f"---- profile of the timed rounds at {queued:,} queued ({path}) ----\n{out.getvalue()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", default="1000,10000,100000", help="comma-separated queue sizes")
    parser.add_argument("--executors", type=int, default=100)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per scenario")
    parser.add_argument("--churn", type=int, default=5, help="executors that finish their jobs before a churn round")
    parser.add_argument("--beats-per-round", type=int, default=20,
                        help="executors re-heartbeating before each round (a fifth of 100: 2.5 s beats, 0.5 s rounds)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "bench_round.json"))
    parser.add_argument("--profile", default=None,
                        help="profile the timed rounds (full + churn) with cProfile; write <this>.<queued>.prof "
                             "and print the top functions (timings are then inflated: do not compare them)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the server (timeout, kill)
    sizes = [int(q) for q in args.queued.split(",")]
    load_before = os.getloadavg()
    commit, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain").splitlines()  # as imported
    scheduler_diff = git("diff", "HEAD", "--", "scheduler")

    results = []
    for queued in sizes:
        profiler = cProfile.Profile() if args.profile else None
        results.append(bench_size(queued, args, profiler))
        if profiler:
            print(profile_report(profiler, Path(f"{args.profile}.{queued}.prof"), queued))

    report = {
        "benchmark": "bench_round", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "worktree_changes": changes,
        "scheduler_diff_vs_head_sha256": hashlib.sha256(scheduler_diff.encode()).hexdigest()[:12] if scheduler_diff
        else None,
        "machine": {**machine(), "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {"executors": args.executors, "tenants": args.tenants, "rounds": args.rounds, "churn": args.churn,
                   "beats_per_round": args.beats_per_round, "lock_ttl_s": LOCK_TTL, "bases": BASES,
                   "executor_bytes": EXECUTOR_BYTES, "max_running_per_tenant": MAX_RUNNING_PER_TENANT,
                   "profiled": bool(args.profile)},
        "targets_p95_s": {str(k): v for k, v in TARGETS_P95_S.items()}, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
