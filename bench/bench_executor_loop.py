"""The executor's own time per training turn, around a real cohort, against a real Valkey/Redis server (CPU).

    python3 -P bench/bench_executor_loop.py [--jobs 8] [--turns 300] [--warmup 20] [--out OUT]

Through the service a cohort steps at the bench's rate less what the worker's loop adds around `Cohort.step` (on the
H200 2.9 ms a step, 1.6%, in run P12: docs/BENCHMARKS.md). This times that loop on the CPU: an `Executor` holding a
cohort of `--jobs` running jobs on the tiny random-init Llama (each its own data, batch 2 x 64), turned as `run` turns
it (`executor_view`, the step, `record_step`, `take_requests`, metrics); each turn's time less its `Cohort.step` is
the loop's. `record_step` (the step's one write round trip) is timed on its own as well, with its I/O, inside the
loop and then repeated back to back with the last turn's writes. Results: OUT/executor_loop.json and a line on
stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench_e2e's model and data builders under -P

import bench_e2e as e2e  # noqa: E402

from lorafleet.executor.cohort import Cohort  # noqa: E402
from lorafleet.executor.worker import Executor, Lease  # noqa: E402
from lorafleet.scheduler.artifacts import ArtifactStore  # noqa: E402
from lorafleet.scheduler.memory import ModelShape, plan_job  # noqa: E402
from lorafleet.scheduler.metrics import executor_metrics  # noqa: E402
from lorafleet.scheduler.redis_server import start_redis_server  # noqa: E402
from lorafleet.scheduler.spec import parse_spec  # noqa: E402
from lorafleet.scheduler.store import JobStore  # noqa: E402

EXECUTOR = "exec-loop"


def held_cohort(store: JobStore, root: Path, jobs: int) -> Executor:
    """An executor holding `jobs` running jobs of one tenant in one cohort, as `admit` would leave it."""
    model_dir, data_dir = root / "model", root / "data"
    data_dir.mkdir()
    e2e.build_base("tiny", model_dir, torch.device("cpu"))
    tenant = f"t-{secrets.token_hex(4)}"
    store.create_tenant(tenant)
    executor = Executor(store, EXECUTOR, "cpu", ArtifactStore(str(root / "artifacts")),
                        metrics=executor_metrics(EXECUTOR))
    executor.cohort = Cohort(model_dir)
    shape = e2e.SHAPES["tiny"]
    for job in range(jobs):
        data = e2e.write_job_data(data_dir, "2x64", job, shape["vocab_size"])
        spec = parse_spec({"base_model": str(model_dir), "dataset": "train.jsonl", "adapter": {"r": 4},
                           "hyperparameters": {"batch_size": 2, "max_steps": 1_000_000,
                                               "checkpoint_every": 1_000_000}})
        plan = plan_job(str(model_dir), str(model_dir),
                        ModelShape(shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"],
                                   shape["num_attention_heads"], shape["num_key_value_heads"], shape["vocab_size"]),
                        4, spec.adapter.target_modules, 2, spec.hyperparameters.max_seq_len, "none", "auto", 128)
        job_id = store.submit(tenant, spec, plan=plan)["job_id"]
        attempt = store.claim(job_id, EXECUTOR)
        store.transition(job_id, "scheduled", "running", attempt=attempt)
        executor.leases[job_id] = Lease(job_id, tenant, attempt, spec, plan)
        executor.cohort.add_job(job_id, spec, data)
    return executor


def timed(owner, name: str, into: list[float], calls: list | None = None):
    """Wrap owner.name so that each call's wall time is appended to `into` (and its arguments to `calls`); returns
    the original."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if calls is not None:
            calls.append((args, kwargs))
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)

    setattr(owner, name, wrapper)
    return original


def measure(executor: Executor, turns: int, warmup: int) -> dict:
    steps, records, loops, record_calls = [], [], [], []
    timed(executor.cohort, "step", steps)
    record_step = timed(executor.store, "record_step", records, record_calls)
    for _ in range(warmup):
        executor.turn()
    del steps[:], records[:]
    for _ in range(turns):
        started = time.perf_counter()
        executor.turn()
        loops.append(time.perf_counter() - started - steps[-1])
    alone = []  # the last turn's record_step again, back to back: the same writes without a step before each
    args, kwargs = record_calls[-1]
    for _ in range(turns):
        started = time.perf_counter()
        record_step(*args, **kwargs)
        alone.append(time.perf_counter() - started)
    p90 = lambda values: 1e3 * statistics.quantiles(values, n=10)[8]
    return {"loop_ms": 1e3 * statistics.median(loops), "loop_p90_ms": p90(loops),
            "record_step_ms": 1e3 * statistics.median(records), "record_step_p90_ms": p90(records),
            "record_step_alone_ms": 1e3 * statistics.median(alone), "cohort_step_ms": 1e3 * statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="turns before the timed ones")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_redis_server(root / "redis")
        try:
            store = JobStore.from_url(server.url)
            store.ensure_schema()
            result = measure(held_cohort(store, root, args.jobs), args.turns, args.warmup)
        finally:
            server.stop()
    result.update(jobs=args.jobs, turns=args.turns, host=platform.node(), python=platform.python_version(),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "executor_loop.json").write_text(json.dumps(result, indent=1))
    print(f"{args.jobs} jobs: the loop {result['loop_ms']:.2f} ms a turn (p90 {result['loop_p90_ms']:.2f}), of it "
          f"record_step {result['record_step_ms']:.2f} ms (p90 {result['record_step_p90_ms']:.2f}; back to back "
          f"{result['record_step_alone_ms']:.2f}); "
          f"Cohort.step {result['cohort_step_ms']:.1f} ms")


if __name__ == "__main__":
    main()
