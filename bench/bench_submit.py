"""Control-plane benchmark: submit round-trip latency and accepted submissions/s through real Celery workers.

Starts a throwaway redis-server and `--workers` worker processes (`--pool=solo` each, the documented setting: one
process per core), like the tests. Each submission is the whole operation a tenant sees: a task through the
tenant's own queue, the spec checked, the dataset accepted and read with the base's tokenizer, the job stored, the
answer back. Sequential: one call at a time (latency); burst: `--n` calls in flight at once (throughput).
Run: python -P bench/bench_submit.py [--n 1000] [--workers 2] [--out bench/results/x.json]
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

from lorafleet.scheduler.client import make_celery
from lorafleet.scheduler.redis_server import start_redis_server
from lorafleet.scheduler.stack import write_demo_base_model
from lorafleet.scheduler.store import JobStore


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="submissions per measurement")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, --pool=solo each")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = start_redis_server(tmp / "redis")
        store = JobStore(server.client())
        store.ensure_schema()
        _, token = store.create_tenant("bench", max_queued=100_000)
        credentials = store.issue_credentials("bench", token)  # the tenant's own broker user, as in production
        (tmp / "data" / "bench").mkdir(parents=True)
        (tmp / "data" / "bench" / "train.jsonl").write_text('{"text": "hello"}\n')
        write_demo_base_model(tmp / "model")  # submission reads the dataset with the base model's tokenizer
        spec = {"base_model": str(tmp / "model"), "dataset": "bench/train.jsonl", "adapter": {"r": 8}}
        env = {**os.environ, "REDIS_URL": server.role_url("worker"), "LORAFLEET_DATA_ROOT": str(tmp / "data"),
               "LORAFLEET_STATE_DIR": str(tmp / "state"), "LORAFLEET_MODEL_ROOTS": str(tmp)}
        workers = [subprocess.Popen(
            [sys.executable, "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker", "--pool=solo",
             "--loglevel=WARNING", "--without-gossip", "--without-mingle", "-n", f"bench-{i}@%h"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ) for i in range(args.workers)]
        control = make_celery(server.url, name="bench-control")
        app = make_celery(credentials.broker_url, name="bench", tenant="bench")
        try:
            while len(control.control.ping(timeout=0.5)) < args.workers:
                time.sleep(0.1)
            for _ in range(50):  # warm-up: imports, script loading, connections
                app.send_task("lorafleet.submit_job", args=[token, spec]).get(timeout=30)

            latencies = []
            for _ in range(args.n):
                start = time.perf_counter()
                app.send_task("lorafleet.submit_job", args=[token, spec]).get(timeout=30)
                latencies.append(time.perf_counter() - start)
            get_latencies = []
            job_id = store.list_jobs("bench", limit=1)[0]["job_id"]
            for _ in range(args.n):
                start = time.perf_counter()
                app.send_task("lorafleet.get_job", args=[token, job_id]).get(timeout=30)
                get_latencies.append(time.perf_counter() - start)

            start = time.perf_counter()
            pending = [app.send_task("lorafleet.submit_job", args=[token, spec, f"burst-{i}"]) for i in range(args.n)]
            for result in pending:
                result.get(timeout=300)
            burst_seconds = time.perf_counter() - start
            accepted = store.counts("bench")["queued"]
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(30)
            app.close()
            control.close()
            server.stop()

    ms = 1000
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join(sys.argv),
        "n": args.n,
        "workers": args.workers,
        "jobs_accepted": accepted,
        "submit_round_trip_ms": {"p50": percentile(latencies, 0.5) * ms, "p95": percentile(latencies, 0.95) * ms,
                                 "p99": percentile(latencies, 0.99) * ms, "mean": statistics.mean(latencies) * ms},
        "get_job_round_trip_ms": {"p50": percentile(get_latencies, 0.5) * ms,
                                  "p95": percentile(get_latencies, 0.95) * ms},
        "sequential_submissions_per_s": args.n / sum(latencies),
        "burst_submissions_per_s": args.n / burst_seconds,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
