"""Control-plane benchmark: submit round-trip latency and accepted submissions/s through real Celery workers.

Starts a throwaway redis-server and `--workers` worker processes (`--pool=solo` each, the documented setting: one
process per core), like the tests. Each submission is the whole operation a tenant sees: a task through the
tenant's own queue, the spec checked, the dataset accepted and read with the base's tokenizer, the job stored, the
answer back. Sequential: one call at a time (latency); burst: `--n` calls in flight at once (throughput), the
client sharing the cores with the workers and Valkey; drain: `--n` calls queued for a tenant whose queue no worker
consumed yet, then the workers alone (the client idle) until the last is stored: what the workers and Valkey do on
these cores when the tenants' clients run elsewhere; batch (with `--batch B`): the same `--n` jobs as `--n / B`
`lorafleet.submit_jobs` calls of B specs each, all in flight at once (a sweep submitted in one go).
Run: python -P bench/bench_submit.py [--n 1000] [--workers 2] [--batch 50] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorafleet.scheduler import keys
from lorafleet.scheduler.client import make_celery
from lorafleet.scheduler.redis_server import start_redis_server
from lorafleet.scheduler.stack import write_demo_base_model
from lorafleet.scheduler.store import JobStore


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_now(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of this process (the client) and of each named group of processes."""
    times = {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}
    return {"client": cpu_seconds(os.getpid()), **times}


def measure_drain(server, store: JobStore, pids: dict[str, list[int]], spec: dict, n: int) -> dict:
    """Accepted/s and CPU ms per submission of the workers emptying a queue that was filled before they saw it."""
    _, token = store.create_tenant("drain", max_queued=100_000)
    store.issue_credentials("drain", token)
    store.set_disabled("drain")  # its queue is not consumed while it fills
    sender = make_celery(server.url, name="bench-drain", tenant="drain")  # the operator's user: the tenant's is off
    try:
        spec = {**spec, "dataset": "drain/train.jsonl"}
        pending = [sender.send_task("lorafleet.submit_job", args=[token, spec, f"drain-{i}"]) for i in range(n)]
        cpu_before = cpu_now(pids)
        store.set_disabled("drain", False)  # the workers start consuming it within broker.SYNC_SECONDS
        deadline = time.monotonic() + 300
        while store.counts("drain")["queued"] < n and time.monotonic() < deadline:
            time.sleep(0.05)
        cpu_after = cpu_now(pids)
        for result in pending:
            result.get(timeout=30)  # each one accepted
    finally:
        sender.close()
    submitted = [at for _, at in store.r.zrange(keys.tenant_jobs("drain"), 0, -1, withscores=True)]  # by time
    return {"drain_submissions_per_s": (len(submitted) - 1) / (submitted[-1] - submitted[0]),
            "drain_cpu_ms_per_submission": {name: (cpu_after[name] - cpu_before[name]) * 1000 / n
                                            for name in pids}}


def measure_batch(app, store: JobStore, pids: dict[str, list[int]], token: str, spec: dict, n: int, size: int
                  ) -> dict:
    """`n` jobs as `lorafleet.submit_jobs` calls of `size` specs, all in flight at once; accepted jobs/s."""
    before, cpu_before = store.counts("bench")["queued"], cpu_now(pids)
    start = time.perf_counter()
    pending = [app.send_task("lorafleet.submit_jobs",
                             args=[token, [spec] * size, [f"batch-{i}-{j}" for j in range(size)]])
               for i in range(n // size)]
    refused = sum(1 for result in pending for job in result.get(timeout=300) if "job_id" not in job)
    seconds = time.perf_counter() - start
    cpu_after = cpu_now(pids)
    accepted = store.counts("bench")["queued"] - before
    return {"batch_size": size, "batch_jobs_accepted": accepted, "batch_jobs_refused": refused,
            "batch_submissions_per_s": accepted / seconds,
            "batch_cpu_ms_per_submission": {name: (cpu_after[name] - cpu_before[name]) * 1000 / max(1, accepted)
                                            for name in cpu_after}}


def round_trips_s(app, task: str, args: list, n: int) -> list[float]:
    """Seconds of each of n calls of `task`, one after another, each waited for."""
    latencies = []
    for _ in range(n):
        start = time.perf_counter()
        app.send_task(task, args=args).get(timeout=30)
        latencies.append(time.perf_counter() - start)
    return latencies


def measure_burst(app, store: JobStore, pids: dict[str, list[int]], token: str, spec: dict, n: int) -> dict:
    """n submissions sent at once, then waited for: submissions/s and CPU time per submission by process."""
    cpu_before = cpu_now(pids)
    start = time.perf_counter()
    pending = [app.send_task("lorafleet.submit_job", args=[token, spec, f"burst-{i}"]) for i in range(n)]
    for result in pending:
        result.get(timeout=300)
    seconds = time.perf_counter() - start
    cpu_after = cpu_now(pids)
    return {
        "jobs_accepted": store.counts("bench")["queued"],
        "burst_submissions_per_s": n / seconds,
        # CPU time per submission in the burst, by process: what the 2 cores are spent on
        "burst_cpu_ms_per_submission": {name: (cpu_after[name] - cpu_before[name]) * 1000 / n for name in cpu_after},
    }


def start_workers(count: int, env: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    """`count` Celery workers, each logging to logs/worker-<i>.log."""
    return [subprocess.Popen(
        [sys.executable, "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker", "--pool=solo",
         "--loglevel=WARNING", "--without-gossip", "--without-mingle", "-n", f"bench-{i}@%h"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(logs / f"worker-{i}.log", "wb"),
    ) for i in range(count)]


def prepare_tenant_files(tmp: Path) -> dict:
    """The tenants' datasets and a demo base on disk; the spec every submission sends."""
    for tenant in ("bench", "drain"):
        (tmp / "data" / tenant).mkdir(parents=True)
        (tmp / "data" / tenant / "train.jsonl").write_text('{"text": "hello"}\n')
    write_demo_base_model(tmp / "model")  # submission reads the dataset with the base model's tokenizer
    return {"base_model": str(tmp / "model"), "dataset": "bench/train.jsonl", "adapter": {"r": 8}}


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    """Every measurement against a real Valkey and `args.workers` real Celery workers."""
    server = start_redis_server(tmp / "redis")
    store = JobStore(server.client())
    store.ensure_schema()
    _, token = store.create_tenant("bench", max_queued=100_000)
    credentials = store.issue_credentials("bench", token)  # the tenant's own broker user, as in production
    spec = prepare_tenant_files(tmp)
    workers = start_workers(args.workers, {
        **os.environ, "REDIS_URL": server.role_url("worker"), "LORAFLEET_DATA_ROOT": str(tmp / "data"),
        "LORAFLEET_STATE_DIR": str(tmp / "state"), "LORAFLEET_MODEL_ROOTS": str(tmp),
        "LORAFLEET_METRICS_PORT": "0"}, tmp)  # each worker's metrics on a free port: one fixed port fits one worker
    control = make_celery(server.url, name="bench-control")
    app = make_celery(credentials.broker_url, name="bench", tenant="bench")
    try:
        while len(control.control.ping(timeout=0.5)) < args.workers:
            if exited := [i for i, worker in enumerate(workers) if worker.poll() is not None]:
                log = (tmp / f"worker-{exited[0]}.log").read_text()[-2000:]
                raise RuntimeError(f"Celery worker {exited[0]} exited before answering a ping; its log ends:\n{log}")
            time.sleep(0.1)
        round_trips_s(app, "lorafleet.submit_job", [token, spec], 50)  # warm-up: imports, scripts, connections
        submits = round_trips_s(app, "lorafleet.submit_job", [token, spec], args.n)
        job_id = store.list_jobs("bench", limit=1)[0]["job_id"]
        gets = round_trips_s(app, "lorafleet.get_job", [token, job_id], args.n)
        pids = {"workers": [worker.pid for worker in workers], "valkey": [server.process.pid]}
        burst = measure_burst(app, store, pids, token, spec, args.n)
        drain = measure_drain(server, store, pids, spec, args.n)
        batch = measure_batch(app, store, pids, token, spec, args.n, args.batch) if args.batch else {}
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(30)
        app.close()
        control.close()
        server.stop()
    ms = 1000
    return {
        "submit_round_trip_ms": {"p50": percentile(submits, 0.5) * ms, "p95": percentile(submits, 0.95) * ms,
                                 "p99": percentile(submits, 0.99) * ms, "mean": statistics.mean(submits) * ms},
        "get_job_round_trip_ms": {"p50": percentile(gets, 0.5) * ms, "p95": percentile(gets, 0.95) * ms},
        "sequential_submissions_per_s": args.n / sum(submits),
        **burst, **drain, **batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="submissions per measurement")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, --pool=solo each")
    parser.add_argument("--batch", type=int, default=0, help="also submit --n jobs in submit_jobs calls of this many")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(args, Path(tmp))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join(sys.argv),
        "n": args.n,
        "workers": args.workers,
        **measured,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],  # other work on the machine skews every figure above
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
