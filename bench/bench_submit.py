"""Control-plane benchmark: submit round-trip latency and submissions/s through one Celery worker (--pool=solo).

Starts a throwaway redis-server and worker, like the tests. Run: python -P bench/bench_submit.py [--n 1000]
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
        worker = subprocess.Popen(
            [sys.executable, "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker", "--pool=solo",
             "--loglevel=WARNING", "--without-gossip", "--without-mingle"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        control = make_celery(server.url, name="bench-control")
        app = make_celery(credentials.broker_url, name="bench", tenant="bench")
        try:
            while not control.control.ping(timeout=0.5):
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
            pending = [app.send_task("lorafleet.submit_job", args=[token, spec]) for _ in range(args.n)]
            for result in pending:
                result.get(timeout=120)
            burst_seconds = time.perf_counter() - start
        finally:
            worker.terminate()
            worker.wait(30)
            app.close()
            control.close()
            server.stop()

    ms = 1000
    report = {
        "n": args.n,
        "submit_round_trip_ms": {"p50": percentile(latencies, 0.5) * ms, "p95": percentile(latencies, 0.95) * ms,
                                 "mean": statistics.mean(latencies) * ms},
        "get_job_round_trip_ms": {"p50": percentile(get_latencies, 0.5) * ms,
                                  "p95": percentile(get_latencies, 0.95) * ms},
        "sequential_submissions_per_s": args.n / sum(latencies),
        "burst_submissions_per_s": args.n / burst_seconds,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
