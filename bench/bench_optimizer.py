"""A cohort's optimizer updates alone: every job's norm, clip and AdamW update as the cohort launches them after a
graphed step, with `FlatAdamW` (executor/optim.py: one kernel per parameter group) against torch's fused AdamW over
each parameter.

    python3 -P bench/bench_optimizer.py [--shape 1b] [--jobs 8] [--rank 16] [--steps 20] [--out OUT]

Each job holds LoRA factors of the shape's 7 projections in every layer (fp32), its gradients views of one buffer as
while a step graph holds them (executor/step_graph.py). A timed step launches every job's `grad_norm`, `launch_step`
and `step` (the window's end: schedule, the buffer zeroed), as `Cohort._step_optimizers_and_sync` does; CUDA events
around all of it, the median of --steps. AdamW moves 7 x 4 bytes a parameter (reads the parameter, its gradient and
two moments, writes three), set against the copy rate. Results: OUT/optimizer.json and a table on stdout. Without
CUDA it runs the tiny shape on the CPU (with torch's fused AdamW there), as the smoke test does; those numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import SHAPES, copy_gbps  # noqa: E402

from lorafleet.executor.optim import JobOptimizer  # noqa: E402
from lorafleet.scheduler.spec import Hyperparameters  # noqa: E402

ADAM_BYTES = 7 * 4  # a parameter's fp32 reads (itself, its gradient, two moments) and writes (three)
VARIANTS = ("per parameter", "flat")


def projection_shapes(shape: str) -> list[tuple[int, int]]:
    """(in, out) of each adapted projection of the shape, layer by layer."""
    config = SHAPES[shape]
    d, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    layer = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]
    return layer * layers


def job_optimizer(shape: str, rank: int, device: torch.device, flat: bool) -> JobOptimizer:
    """One job's factors (A [r, in], B [out, r]) and optimizer, its gradients views of one random buffer. Not flat:
    torch's fused AdamW handed in, which JobOptimizer steps as it is, over each parameter."""
    params = [torch.nn.Parameter(torch.randn(*dims, device=device) * 0.01)
              for d_in, d_out in projection_shapes(shape) for dims in ((rank, d_in), (d_out, rank))]
    hp = Hyperparameters(weight_decay=0.01)
    groups = [{"params": params}]
    per_parameter = None if flat else torch.optim.AdamW(groups, lr=hp.learning_rate, weight_decay=hp.weight_decay,
                                                        fused=True)
    optimizer = JobOptimizer(groups, hp, total_steps=10**6, optimizer=per_parameter, fused=True)
    buffer = torch.randn(sum(p.numel() for p in params), device=device) * 1e-3
    for param, view in zip(params, buffer.split([p.numel() for p in params])):
        param.grad = view.view_as(param)
    optimizer.grad_buffer = buffer
    return optimizer


def one_steps_updates(optimizers: list[JobOptimizer], loss: torch.Tensor) -> None:
    """Every job's norm, update and window's end, as `Cohort._step_optimizers_and_sync` launches them."""
    norms = [optimizer.grad_norm() for optimizer in optimizers]
    for optimizer, norm in zip(optimizers, norms):
        optimizer.launch_step(norm, loss)
    for optimizer, norm in zip(optimizers, norms):
        optimizer.step(norm, 1.0)


def timed_updates(optimizers: list[JobOptimizer], steps: int, device: torch.device) -> float:
    """Median seconds of one step's updates of every job."""
    loss = torch.ones((), device=device)
    seconds = []
    for _ in range(steps + 2):  # the first two warm up
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        one_steps_updates(optimizers, loss)
        if device.type == "cuda":
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            seconds.append(time.perf_counter() - began)
    return statistics.median(seconds[2:])


def kernels_per_step(optimizers: list[JobOptimizer], device: torch.device) -> int | None:
    """Kernels one step's updates launch, profiled once."""
    if device.type != "cuda":
        return None
    loss = torch.ones((), device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        one_steps_updates(optimizers, loss)
        torch.cuda.synchronize()
    return sum(1 for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def table(result: dict) -> str:
    lines = ["| update | ms a step | kernels | AdamW bytes at | of the copy rate |", "|---|---|---|---|---|"]
    for name, row in result["variants"].items():
        rate = result["adam_bytes"] / row["seconds"] / 1e9
        share = f"{rate / result['copy_gbps']:.0%}" if result["copy_gbps"] else "-"
        lines.append(f"| {name} | {row['seconds'] * 1e3:.3f} | {row['kernels'] or '-'} | {rate:,.0f} GB/s | {share} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=["1b", "8b"])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape if device.type == "cuda" else "tiny"
    params = sum(args.rank * (d_in + d_out) for d_in, d_out in projection_shapes(shape))
    result = {"shape": shape, "jobs": args.jobs, "rank": args.rank, "params_per_job": params,
              "adam_bytes": ADAM_BYTES * params * args.jobs, "copy_gbps": copy_gbps(device),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "variants": {}}
    for name in VARIANTS:
        optimizers = [job_optimizer(shape, args.rank, device, flat=name == "flat") for _ in range(args.jobs)]
        assert (optimizers[0].flat is not None) == (name == "flat")
        result["variants"][name] = {"seconds": timed_updates(optimizers, args.steps, device),
                                    "kernels": kernels_per_step(optimizers, device)}
        del optimizers
    variants = result["variants"]
    result["speedup"] = variants["per parameter"]["seconds"] / variants["flat"]["seconds"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer.json").write_text(json.dumps(result, indent=2))
    print(f"{shape}, {args.jobs} jobs x {params / 1e6:.2f}M parameters (r={args.rank}), {result['device']}")
    print(table(result))
    print(f"flat / per parameter: {result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
