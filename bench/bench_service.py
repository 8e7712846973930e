"""The same cohort through the whole service against `Cohort.step` alone, and the time from submission to the first
step, cold and warm (issue 16).

    python3 -P bench/bench_service.py --shape 1b --jobs 8 --batch 4x512 --steps 30 --out OUT

1. A random base of `--shape` (bench_e2e's builder) and one dataset per job (bench_e2e's sequences as text records;
   `--micro-batches` of them: one, tokenised once, or enough that every step tokenises first-epoch records).
2. The service on this machine: embedded Valkey, the Celery submission worker, the scheduler and one executor on the
   device (one pass a step, as the bench's "off" row), each its own process started as `lorafleet up` starts them.
3. Cold: N jobs submitted through the tenant's Celery task with an empty Triton cache and no base loaded; warm: N more
   once those finished (base loaded, kernels compiled). Time to first step = a job's first progress event minus the
   moment its submission was sent; the service's step = the median gap between consecutive progress events of the
   last job to join while all N train (what the executor's loop takes per step: the step, its Redis writes, the joins
   it checks), and `Cohort.step`'s own time inside it (each progress event's tokens / tokens_per_s): the loop's
   overhead is the difference. Publish stall: each job checkpoints every `--checkpoint-every` steps and publishes its
   adapter at its end (the jobs joined one after another, so they finish while others train); the stall of a publish
   is how much longer than the median the last job's step right after it took (0 when publishing is off the loop).
4. The service stopped, the same N jobs in one `Cohort` in this process: its median step (bench_e2e.run_cohort).
Results: OUT/service_<shape>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e as e2e  # noqa: E402  (bench/ is a folder of scripts)

TENANT = "bench"


def prepare(root: Path, shape: str, jobs: int, batch: str, device: torch.device,
            micro_batches: int = 1) -> tuple[Path, int]:
    """The base under root/models and datasets root/data/bench/job-<i>.jsonl; the environment the service reads."""
    os.environ.update(LORAFLEET_STATE_DIR=str(root / "state"), LORAFLEET_DATA_ROOT=str(root / "data"),
                      LORAFLEET_MODEL_ROOTS=str(root / "models"), TRITON_CACHE_DIR=str(root / "triton"),
                      HF_HUB_OFFLINE="1", LORAFLEET_METRICS_ADDR="127.0.0.1", LORAFLEET_METRICS_PORT="0")
    model_dir = root / "models" / shape
    params = e2e.build_base(shape, model_dir, device)
    data = root / "data" / TENANT
    data.mkdir(parents=True)
    vocab = e2e.SHAPES[shape]["vocab_size"]
    for job in range(jobs):
        e2e.write_job_data(data, batch, job, vocab, micro_batches).rename(data / f"job-{job}.jsonl")
    return model_dir, params


def start_service(device: str):
    from lorafleet.scheduler import fleet, stack

    running = stack.start_redis()
    stack.start_worker(running)
    scheduler = stack.start_process(running, "scheduler", ["scheduler", "--metrics-port", "0", "--metrics-addr",
                                                           "127.0.0.1", "--interval", "0.2"])
    stack.wait_for_leader(running, scheduler)
    stack.start_process(running, "executor", ["executor", "--device", device, "--metrics-port", "0",
                                              "--metrics-addr", "127.0.0.1", "--max-pass-tokens", "0"])
    from lorafleet.scheduler.store import JobStore

    store = JobStore.from_url(running.redis_url)
    deadline = time.monotonic() + 300
    while not fleet.executors(store.r)[0]:
        if time.monotonic() > deadline:
            raise RuntimeError("the executor did not register within 300 s")
        time.sleep(0.5)
    return running, store


def submit_batch(token: str, redis_url: str, model_dir: Path, batch: str, jobs: int, steps: int,
                 checkpoint_every: int) -> list[tuple[str, float]]:
    """N jobs through the tenant's own Celery queue; (job id, time its submission was sent)."""
    from lorafleet.scheduler.client import make_celery

    app = make_celery(redis_url, name="bench-service", tenant=TENANT)
    spec = e2e.job_spec(model_dir, batch, 0).model_dump(mode="json")
    submitted = []
    try:
        for job in range(jobs):
            hp = {**spec["hyperparameters"], "max_steps": steps, "checkpoint_every": checkpoint_every, "seed": job}
            sent = time.time()
            view = app.send_task("lorafleet.submit_job", args=[token, {
                **spec, "name": f"bench-{job}", "dataset": f"{TENANT}/job-{job}.jsonl", "hyperparameters": hp,
            }]).get(timeout=120)
            submitted.append((view["job_id"], sent))
    finally:
        app.close()
    return submitted


def progress_events(store, job_id: str) -> dict[int, dict]:
    """Optimizer step -> its progress event."""
    events = store.events_for(None, job_id, limit=1000)  # every step's while a job has under 1,000 (PROGRESS_EVENTS)
    return {event["step"]: event for event in events if event["type"] == "progress"}


def measure_batch(store, running, submitted: list[tuple[str, float]], steps: int, checkpoint_every: int) -> dict:
    from lorafleet.scheduler import stack

    finished = stack.wait_for_jobs(running, [job_id for job_id, _ in submitted], lambda jobs: None, timeout=3600)
    failed = [job["error"] for job in finished if job["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"a job failed: {failed[0]}")
    events = {job_id: progress_events(store, job_id) for job_id, _ in submitted}
    times = {job_id: {step: event["ts"] for step, event in job_events.items()} for job_id, job_events in events.items()}
    first_steps = [times[job_id][min(times[job_id])] - sent for job_id, sent in submitted]
    last = times[submitted[-1][0]]  # the last to join: its steps from the first after it joined had all N jobs
    last_steps = sorted(last)
    ordered = [last[step] for step in last_steps]
    all_in = min(max(job_times.values()) for job_times in times.values())  # until the first job finished
    timed = [(earlier, later) for earlier, later in zip(last_steps[2:], last_steps[3:]) if last[later] <= all_in]
    gaps = [last[later] - last[earlier] for earlier, later in timed]  # after 2 warm-up steps
    # Cohort.step's own time inside the service: a step's event holds its tokens and tokens per second of that time
    last_events = events[submitted[-1][0]]
    in_service = [last_events[step]["tokens"] / last_events[step]["tokens_per_s"] for _, step in timed
                  if last_events[step]["tokens_per_s"] > 0]
    if not gaps:
        raise RuntimeError(f"the {len(submitted)} jobs never trained together past the last one's 2 warm-up steps "
                           f"(it joined too late): raise --steps")
    step_s, in_service_s = statistics.median(gaps), statistics.median(in_service)
    stall_gaps = publishing_gaps(times, ordered, steps, checkpoint_every)
    stalls = [max(0.0, ordered[i + 1] - ordered[i] - step_s) for i in stall_gaps]
    # the part of a stall inside the next Cohort.step (it ran slower: the publisher's work beside it, a recapture),
    # the rest on the loop between the steps (the snapshots taken, their buffers allocated)
    next_step = [last_events[last_steps[i + 1]] for i in stall_gaps]
    in_step = [max(0.0, event["tokens"] / event["tokens_per_s"] - in_service_s) for event in next_step
               if event["tokens_per_s"] > 0]
    return {"first_step_s": {"min": min(first_steps), "median": statistics.median(first_steps),
                             "max": max(first_steps)},
            "service_step_s": step_s, "steps_timed": len(gaps),
            "cohort_step_in_service_s": in_service_s,
            "publish_stall_s": {"publishing_steps": len(stalls), "median": _median(stalls),
                                "max": max(stalls, default=0.0), "in_next_step_median": _median(in_step),
                                "in_next_step_max": max(in_step, default=0.0)}}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def publishing_gaps(times: dict[str, dict[int, float]], ordered: list[float], steps: int,
                    checkpoint_every: int) -> list[int]:
    """The gaps of the last job's steps (index i: from its ith event to the next) in which some job published (a
    checkpoint, or its adapter at its end): a publish stall is how much longer than the median such a gap took. A
    step's progress events are written together, before its publishes, so the publishes of a step fall in the last
    job's gap that starts at that step's events."""
    publishing = set()
    for job_times in times.values():
        for step, ts in job_times.items():
            if step % checkpoint_every == 0 or step == steps:
                later = [i for i, t in enumerate(ordered) if t <= ts + 1e-3]
                if later and later[-1] + 1 < len(ordered):
                    publishing.add(later[-1])
    return sorted(publishing)


def executor_steps(store) -> dict[str, int]:
    """The executor's steps and how many of them replayed a CUDA graph, from its metrics: a cohort whose graph could
    not be captured steps eagerly, and its service step is then not the bench's graphed one."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from lorafleet.scheduler import fleet

    (heartbeat,), _ = fleet.executors(store.r)
    text = urllib.request.urlopen(f"http://127.0.0.1:{heartbeat.metrics_port}/metrics", timeout=10).read().decode()
    samples = {sample.name: sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    return {"steps": int(samples["lorafleet_cohort_steps_total"]),
            "graphed": int(samples["lorafleet_cohort_graphed_steps_total"])}


def keep_logs(running, directory: Path) -> None:
    """The service processes' logs, beside the report (a capture's failure is a warning in the executor's)."""
    directory.mkdir(parents=True, exist_ok=True)
    for log in running.logs.values():
        if log.is_file():
            (directory / log.name).write_bytes(log.read_bytes())


def bench_alone(model_dir: Path, data_dir: Path, batch: str, jobs: int, device: torch.device) -> tuple[float, float]:
    """bench_e2e's cohort on the same jobs: its data files are named as bench_e2e names them."""
    from lorafleet.executor.cohort import Cohort

    for job in range(jobs):
        (data_dir / f"{batch}-{job}.jsonl").write_bytes((data_dir / f"job-{job}.jsonl").read_bytes())
    cohort = Cohort(model_dir, device=str(device))
    return e2e.run_cohort(cohort, model_dir, data_dir, batch, jobs, warmup=3, steps=10, checkpointing="off",
                          device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(e2e.SHAPES))
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch", default="4x512")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of each service job")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="optimizer steps between checkpoints")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="micro-batches of distinct records per job (bench_e2e's --micro-batches): at least "
                        "--steps, and every step reads and tokenises first-epoch records")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    root = Path(tempfile.mkdtemp(prefix="bench-service-"))
    model_dir, params = prepare(root, args.shape, args.jobs, args.batch, device, args.micro_batches)
    running, store = start_service(str(device))
    try:
        _, token = store.create_tenant(TENANT, max_queued=1000, max_running=args.jobs)
        time.sleep(2)  # the worker consumes a new tenant's queue within a second
        cold, warm = ({**measure_batch(store, running, submit_batch(token, running.redis_url, model_dir, args.batch,
                                                                    args.jobs, args.steps, args.checkpoint_every),
                                       args.steps, args.checkpoint_every), "batch": name} for name in ("cold", "warm"))
        steps = executor_steps(store)
    finally:
        running.stop()
        keep_logs(running, args.out / "logs")
    alone_s, peak = bench_alone(model_dir, root / "data" / TENANT, args.batch, args.jobs, device)
    report = {"shape": args.shape, "jobs": args.jobs, "batch": args.batch, "device": str(device),
              "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "non_embedding_params": params, "checkpoint_every": args.checkpoint_every,
              "micro_batches": args.micro_batches, "cold": cold, "warm": warm, "bench_step_s": alone_s,
              "bench_peak_gib": peak, "service_over_bench": alone_s / warm["service_step_s"], "executor_steps": steps}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"service_{args.shape}.json").write_text(json.dumps(report, indent=2))
    print(f"| shape | jobs x batch | bench step s | service step s (warm) | service/bench speed | first step cold s "
          f"(min/median/max) | first step warm s |\n|---|---|---|---|---|---|---|\n"
          f"| {args.shape} | {args.jobs} x {args.batch} | {alone_s:.3f} | {warm['service_step_s']:.3f} | "
          f"{report['service_over_bench']:.3f} | {cold['first_step_s']['min']:.1f} / "
          f"{cold['first_step_s']['median']:.1f} / {cold['first_step_s']['max']:.1f} | "
          f"{warm['first_step_s']['min']:.1f} / {warm['first_step_s']['median']:.1f} / "
          f"{warm['first_step_s']['max']:.1f} |")
    print(f"\nthe executor's steps: {steps['steps']}, of which {steps['graphed']} replayed a CUDA graph (its log: "
          f"{args.out / 'logs'})")
    print(f"\nCohort.step inside the service (warm): {warm['cohort_step_in_service_s']:.4f} s; the loop around it: "
          f"{(warm['service_step_s'] - warm['cohort_step_in_service_s']) * 1e3:.1f} ms a step")
    print("\n| batch | publishing steps | publish stall s (median / max) | of it in the next Cohort.step s (median / "
          "max) |\n|---|---|---|---|")
    for batch in (cold, warm):
        stall = batch["publish_stall_s"]
        print(f"| {batch['batch']} | {stall['publishing_steps']} | {stall['median']:.3f} / {stall['max']:.3f} | "
              f"{stall['in_next_step_median']:.3f} / {stall['in_next_step_max']:.3f} |")


if __name__ == "__main__":
    main()
