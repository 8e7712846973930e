"""Where the training loop's time goes when a cohort's jobs checkpoint together (issue 16's publish stall).

    python3 -P bench/bench_publish.py --shape 1b --jobs 8 --batch 4x512 --rounds 3 --out OUT

bench_service measures the stall from the service's progress events: the step after all jobs of a cohort checkpoint
at once takes 0.6-0.9 s longer than the others (run H5), while `Cohort.step` alone is unchanged. This takes the same
cohort in one process and, for each round, times:
1. a step (the reference), synchronised;
2. `Cohort.snapshot` of every job on the loop, as the executor takes them (export and training state), unsynchronised
   as there, then how long the device needs to finish what was queued;
3. the next step, with a writer thread writing the snapshots meanwhile as the executor's publisher does (`contended`)
   or only after that step (`alone`): the difference is what the writes cost the loop.
Rounds alternate, starting `contended`; the first round also pays for the copies' first buffers (pinned host memory,
device staging), so each round is reported on its own. Then rounds whose snapshots go to the writer each as it is
taken, or all once taken as the executor hands a step's over: what the writer's work beside the loop costs the taking.
One round's snapshots are also taken under cProfile: its top functions by own time name what the loop waits for. On a
GPU, what the first round's buffers cost: each round's time in the pinned allocator's growth (its own statistics), and
one round's copies allocated as pinned host memory and as device memory with the allocators' caches emptied and again
from the caches, and pinned once more by cudaHostRegister with 8 threads (PyTorch's alternative to cudaHostAlloc);
and the steps the loop takes while another thread pins that memory (each way): whether pinning ahead of the first
round, off the loop, stalls the steps beside it.
Results: OUT/publish_<shape>.json and the tables on stdout.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e as e2e  # noqa: E402  (bench/ is a folder of scripts)


class Writer:
    """The publisher's part that matters here: a thread writing snapshots in the order they come."""

    def __init__(self):
        self.pending: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.pending.get().write()
            self.pending.task_done()

    def write_all(self, snapshots: list) -> None:
        for snapshot in snapshots:
            self.pending.put(snapshot)


def take_snapshots(cohort, directory: Path, device) -> tuple[list, float, float]:
    """Every job's checkpoint snapshot; the loop's seconds for them and the device's seconds to finish after."""
    start = time.perf_counter()
    snapshots = [cohort.snapshot(job_id, directory / job_id, training_state=True) for job_id in cohort.jobs]
    taken = time.perf_counter()
    e2e.sync(device)
    return snapshots, taken - start, time.perf_counter() - taken


def handover_seconds(cohort, writer: Writer, directory: Path, device, rounds: int) -> dict[str, list[float]]:
    """The loop's seconds for a round of snapshots handed to the writer each as it is taken (`each`: the writer
    starts on the first while the loop takes the rest) or all once taken (`after`: as the executor hands a step's
    over), rounds alternating."""
    seconds: dict[str, list[float]] = {"each": [], "after": []}
    for index in range(2 * rounds):
        mode = "each" if index % 2 == 0 else "after"
        e2e.sync(device)
        start = time.perf_counter()
        snapshots = []
        for job_id in cohort.jobs:
            snapshot = cohort.snapshot(job_id, directory / f"{mode}-{index}" / job_id, training_state=True)
            writer.write_all([snapshot] if mode == "each" else [])
            snapshots.append(snapshot)
        seconds[mode].append(time.perf_counter() - start)
        writer.write_all(snapshots if mode == "after" else [])
        writer.pending.join()
    return seconds


def pinned_growth_s(device) -> float:
    """Seconds the pinned allocator has spent growing its pool so far (CUDA's host allocations); 0 off a GPU, NaN
    where this PyTorch keeps no such statistic."""
    if device.type != "cuda":
        return 0.0
    return torch.cuda.memory.host_memory_stats().get("host_alloc_time.total", float("nan")) / 1e6


def one_round(cohort, writer: Writer, directory: Path, device, contended: bool) -> dict:
    reference = e2e.timed_steps(cohort, 0, 1, device)
    pinned_before = pinned_growth_s(device)
    snapshots, loop_s, drain_s = take_snapshots(cohort, directory, device)
    pinned_s = pinned_growth_s(device) - pinned_before
    written = time.perf_counter()
    if contended:
        writer.write_all(snapshots)
    next_step = e2e.timed_steps(cohort, 0, 1, device)
    if not contended:
        writer.write_all(snapshots)
    writer.pending.join()
    return {"mode": "contended" if contended else "alone", "reference_step_s": reference, "snapshots_loop_s": loop_s,
            "device_drain_s": drain_s, "next_step_s": next_step, "writes_s": time.perf_counter() - written,
            "stall_s": loop_s + drain_s + next_step - reference, "pinned_growth_s": pinned_s}


def copy_sizes(snapshots: list) -> list[int]:
    """The bytes of each flat tensor of one round's copies."""
    return [flat.numel() * flat.element_size() for snapshot in snapshots
            for copy in (snapshot.export.tensors, snapshot.training_state) for _, _, flat in copy._flats]


def steps_beside_pinning(cohort, sizes: list[int], device) -> dict:
    """The loop's steps while another thread pins `sizes` (the pinned cache emptied first): whether pinning the
    copies' memory ahead, off the loop, would stall the steps that run meanwhile."""
    torch._C._host_emptyCache()
    pinning = threading.Thread(target=lambda: [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes])
    started = time.perf_counter()
    pinning.start()
    steps = []
    while pinning.is_alive() or not steps:
        steps.append(e2e.timed_steps(cohort, 0, 1, device))
    pinning.join()
    return {"pinning_s": time.perf_counter() - started, "steps_s": steps}


def buffer_costs(snapshots: list, device) -> dict:
    """Seconds to allocate one round's copies (their flat tensors' sizes) as pinned host and as device memory, each
    with its allocator's cache emptied first (`cold`) and then again (`cached`)."""
    sizes = copy_sizes(snapshots)
    costs = {"bytes": sum(sizes)}
    pinned = (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True), torch._C._host_emptyCache)
    for name, (allocate, empty) in (("pinned", pinned),
                                    ("device", (lambda n: torch.empty(n, dtype=torch.uint8, device=device),
                                                torch.cuda.empty_cache))):
        costs[f"{name}_cold_s"], costs[f"{name}_cached_s"] = allocation_seconds(sizes, allocate, empty, device)
    # PyTorch's other way to pin: cudaHostRegister of ordinary memory, paged in by several threads
    try:
        torch.cuda.memory._set_allocator_settings("pinned_use_cuda_host_register:True,pinned_num_register_threads:8")
    except RuntimeError as exc:  # this PyTorch does not take the setting at run time: say so, keep the rest
        costs["pinned_registered_cold_s"] = float("nan")
        print(f"cudaHostRegister not measured: {exc}")
        return costs
    costs["pinned_registered_cold_s"], _ = allocation_seconds(sizes, *pinned, device)
    return costs


def allocation_seconds(sizes: list[int], allocate, empty, device) -> tuple[float, float]:
    """Seconds to allocate `sizes` with the cache emptied first, then again from the cache."""
    empty()
    seconds = []
    for _ in range(2):
        e2e.sync(device)
        start = time.perf_counter()
        buffers = [allocate(size) for size in sizes]
        e2e.sync(device)
        seconds.append(time.perf_counter() - start)
        del buffers
    return seconds[0], seconds[1]


def profiled_snapshots(cohort, directory: Path, device, top: int) -> tuple[str, dict | None]:
    """cProfile's top functions of one round's snapshots, and on a GPU what their buffers cost."""
    profile = cProfile.Profile()
    profile.enable()
    snapshots, _, _ = take_snapshots(cohort, directory, device)
    profile.disable()
    costs = None
    if device.type == "cuda":
        beside = steps_beside_pinning(cohort, copy_sizes(snapshots), device)  # by cudaHostAlloc
        costs = buffer_costs(snapshots, device)  # ends with the allocator set to cudaHostRegister
        costs["beside_pinning"] = beside
        costs["beside_registering"] = steps_beside_pinning(cohort, copy_sizes(snapshots), device)
    del snapshots
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue(), costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(e2e.SHAPES))
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--batch", default="4x512")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each mode")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    from lorafleet.executor.cohort import Cohort
    from lorafleet.executor.worker import freeze_what_is_loaded

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    root = Path(tempfile.mkdtemp(prefix="bench-publish-"))
    model_dir, data_dir = root / "model", root / "data"
    data_dir.mkdir()
    e2e.build_base(args.shape, model_dir, device)
    for job in range(args.jobs):
        e2e.write_job_data(data_dir, args.batch, job, e2e.SHAPES[args.shape]["vocab_size"])
    cohort = Cohort(model_dir, device=str(device))
    freeze_what_is_loaded()  # as the executor does once its base loads
    e2e.add_jobs(cohort, model_dir, data_dir, args.batch, args.jobs)
    for _ in range(4):  # past the graph's capture
        cohort.step()
    writer = Writer()
    rounds = [one_round(cohort, writer, root / "out" / f"round-{i}", device, contended=i % 2 == 0)
              for i in range(2 * args.rounds)]
    handover = handover_seconds(cohort, writer, root / "out" / "handover", device, args.rounds)
    profile, buffers = profiled_snapshots(cohort, root / "out" / "profiled", device, top=25)
    report = {"shape": args.shape, "jobs": args.jobs, "batch": args.batch, "device": str(device),
              "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "graph_replays": cohort.graphs.replays, "rounds": rounds, "handover_s": handover, "buffers": buffers}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"publish_{args.shape}.json").write_text(json.dumps(report, indent=2))
    print_tables(rounds)
    print("\nsnapshots on the loop, handed to the writer each as taken / all once taken: " + " / ".join(
        ", ".join(f"{seconds:.3f}" for seconds in handover[mode]) for mode in ("each", "after")) + " s")
    if buffers is not None:
        print(f"\none round's copies, {buffers['bytes'] / 2**30:.2f} GiB: pinned {buffers['pinned_cold_s']:.3f} s "
              f"with the cache emptied, {buffers['pinned_cached_s']:.3f} s cached; device "
              f"{buffers['device_cold_s']:.3f} s / {buffers['device_cached_s']:.3f} s; pinned by cudaHostRegister "
              f"with 8 threads {buffers['pinned_registered_cold_s']:.3f} s with the cache emptied")
        for name, how in (("beside_pinning", "cudaHostAlloc"), ("beside_registering", "cudaHostRegister")):
            beside = buffers[name]
            print(f"steps while another thread pinned them by {how} ({beside['pinning_s']:.3f} s): "
                  + ", ".join(f"{step:.3f}" for step in beside["steps_s"]) + " s")
    print(profile)


def print_tables(rounds: list[dict]) -> None:
    """A row a round: the first pays for its host and device buffers (pinned memory, staging), later ones reuse them,
    so rounds are shown one by one rather than as medians."""
    fields = ["reference_step_s", "snapshots_loop_s", "pinned_growth_s", "device_drain_s", "next_step_s", "stall_s",
              "writes_s"]
    print("| round | writes | " + " | ".join(fields) + " |\n|" + "---|" * (len(fields) + 2))
    for index, r in enumerate(rounds):
        print(f"| {index} | {r['mode']} | " + " | ".join(f"{r[field]:.3f}" for field in fields) + " |")


if __name__ == "__main__":
    main()
