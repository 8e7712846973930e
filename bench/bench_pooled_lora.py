"""One decode step's adapter math at many adapters: the stacked multi-adapter path against reading the pool in place.

    python -P bench/bench_pooled_lora.py --shape 1b [--adapters 1,8,64,512] [--rows 512] [--out DIR]     # GPU
    python -P bench/bench_pooled_lora.py --shape 1b --device cpu --layers 2 --adapters 1,8,64,512 --repeats 3  # CPU

A generation decode step as executor/generate.py runs it: --rows requests, one row each, request i on adapter i mod A
(rows grouped by adapter), and every targeted projection of the shape (bench_generate's: q/k/v/o of each layer,
rank-r LoRA) adding its adapters' deltas into its output. The adapters are placed in a `UnifiedPool` as the
Generator places them. For each A of --adapters, the time of a whole step's adapter math, two ways:

- stacked: per layer `lora_delta(x, segments, As, Bs, scales, out=y)` on the adapters' views into the pool (the path
  loaded adapters took before the pooled kernels: the Triton path stacks and pads the factors on every call; on the
  CPU the reference multiplies each adapter's views);
- pooled: one `pooled_lora_table` for the step (the Generator's stack of placed offsets, one copy to the device), then
  per layer `pooled_lora_delta(x, pool, table, layer, y)`, which reads the factors in place.

Host ms: until the Python calls return (the GPU may still run); wall ms: after synchronising. Medians of --repeats
after one warm-up. On the CPU both are the same number, and a third pair of columns times the preparation alone:
the Triton path's per-layer stacking of the factors (`segmented._stack_a/_stack_b`, on CPU tensors, so including the
copies) against building the table, the part of the step that the pooled path removes. Results go to
OUT/pooled_lora_<shape>_<device>.json and a markdown table to stdout.
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
from bench_e2e import SHAPES, sync  # noqa: E402
from bench_generate import ATTENTION_PROJECTIONS, layer_shapes  # noqa: E402

from lorafleet.executor.kv_pool import KvLayout, UnifiedPool  # noqa: E402
from lorafleet.kernels import lora_delta, pooled_lora_delta, pooled_lora_table  # noqa: E402


class PlacedAdapters:
    """`count` random rank-r adapters on every layer of `dims`, placed in one pool as the Generator places them: their
    views per layer, and per adapter its int64 [layers, 3] offsets (A, B, rank)."""

    def __init__(self, count: int, dims: list[tuple[int, int]], rank: int, dtype: torch.dtype, device: torch.device):
        elements = sum(rank * (d_in + d_out) for d_in, d_out in dims)
        # a page per adapter, with room for aligning each factor (the KV layout only sizes the pages here)
        layout = KvLayout(layers=1, block_tokens=1, kv_heads=1, head_dim=elements // 2 + 64 * len(dims))
        self.pool = UnifiedPool(count, layout, dtype, device)
        generator = torch.Generator().manual_seed(0)
        self.views: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # [adapter][layer] -> (A, B)
        self.offsets: list[torch.Tensor] = []
        origin = self.pool.buffer.storage_offset()
        for adapter in range(count):
            factors = [t for d_in, d_out in dims for t in (torch.randn(rank, d_in, generator=generator) / d_in**0.5,
                                                           torch.randn(d_out, rank, generator=generator) / rank**0.5)]
            views = self.pool.place_adapter(f"a{adapter}", factors)
            pairs = list(zip(views[0::2], views[1::2]))
            self.views.append(pairs)
            self.offsets.append(torch.tensor([[a.storage_offset() - origin, b.storage_offset() - origin, rank]
                                              for a, b in pairs], dtype=torch.int64))
        self.scales = [2.0] * count


def decode_segments(rows: int, adapters: int) -> list[tuple[int, int]]:
    """Row range of each adapter for rows requests, request i on adapter i mod `adapters`, grouped by adapter."""
    counts = [rows // adapters + (j < rows % adapters) for j in range(adapters)]
    bounds = [0]
    for count in counts:
        bounds.append(bounds[-1] + count)
    return list(zip(bounds, bounds[1:]))


def stacked_step(placed: PlacedAdapters, used: int, segments, inputs, outputs) -> None:
    for layer, (x, y) in enumerate(zip(inputs, outputs)):
        pairs = [placed.views[j][layer] for j in range(used)]
        lora_delta(x, segments, [a for a, _ in pairs], [b for _, b in pairs], placed.scales[:used], out=y)


def pooled_step(placed: PlacedAdapters, used: int, segments, inputs, outputs, dims, device) -> None:
    offsets = torch.stack(placed.offsets[:used], dim=1)
    table = pooled_lora_table(segments, placed.scales[:used], offsets, dims, placed.pool.buffer.numel(), device)
    pool = placed.pool.buffer.view(-1)
    for layer, (x, y) in enumerate(zip(inputs, outputs)):
        pooled_lora_delta(x, pool, table, layer, y)


def stacking_only(placed: PlacedAdapters, used: int, dims) -> None:
    """The per-layer stacking the Triton path does before its launches (its host work that grows with adapters)."""
    from lorafleet.kernels.segmented import _stack_a, _stack_b, padded_rank

    for layer in range(len(dims)):
        pairs = [placed.views[j][layer] for j in range(used)]
        rank = padded_rank([a.shape[0] for a, _ in pairs])
        _stack_a([a for a, _ in pairs], rank, pairs[0][0].dtype)
        _stack_b([b for _, b in pairs], rank, pairs[0][0].dtype)


def table_only(placed: PlacedAdapters, used: int, segments, dims, device) -> None:
    offsets = torch.stack(placed.offsets[:used], dim=1)
    pooled_lora_table(segments, placed.scales[:used], offsets, dims, placed.pool.buffer.numel(), device)


def timed_ms(work, device, repeats: int) -> tuple[float, float]:
    """Median host ms (until `work` returns) and wall ms (after synchronising) of `repeats` runs after a warm-up."""
    work()
    sync(device)
    host, wall = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        host.append((time.perf_counter() - start) * 1e3)
        sync(device)
        wall.append((time.perf_counter() - start) * 1e3)
    return statistics.median(host), statistics.median(wall)


def step_dims(args) -> list[tuple[int, int]]:
    """(d_in, d_out) of each targeted projection of the first --layers decoder layers."""
    per_layer = len(args.targets)
    return list(layer_shapes(args.shape, args.targets).values())[:args.layers * per_layer if args.layers else None]


def measure(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    dims = step_dims(args)
    placed = PlacedAdapters(max(args.adapters), dims, args.rank, dtype, device)
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(args.rows, d_in, generator=generator).to(device, dtype) for d_in, _ in dims]
    outputs = [torch.zeros(args.rows, d_out, dtype=dtype, device=device) for _, d_out in dims]
    rows = []
    for used in args.adapters:
        segments = decode_segments(args.rows, used)
        row = {"adapters": used, "rows": args.rows, "layers": len(dims)}
        row["stacked_host_ms"], row["stacked_wall_ms"] = timed_ms(
            lambda: stacked_step(placed, used, segments, inputs, outputs), device, args.repeats)
        row["pooled_host_ms"], row["pooled_wall_ms"] = timed_ms(
            lambda: pooled_step(placed, used, segments, inputs, outputs, dims, device), device, args.repeats)
        if device.type == "cpu":
            row["stacking_ms"], _ = timed_ms(lambda: stacking_only(placed, used, dims), device, args.repeats)
            row["table_ms"], _ = timed_ms(lambda: table_only(placed, used, segments, dims, device), device,
                                          args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    cpu = report["device"] == "cpu"
    head = "| adapters | stacked host ms | stacked wall ms | pooled host ms | pooled wall ms | wall speedup |"
    if cpu:
        head += " stacking alone ms | table alone ms |"
    lines = [f"# One decode step's adapter math, {report['shape']} ({report['layers']} projections, "
             f"{report['rows']} rows, r={report['rank']}) on {report['device']}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for row in report["rows_by_adapters"]:
        line = (f"| {row['adapters']} | {row['stacked_host_ms']:.2f} | {row['stacked_wall_ms']:.2f} | "
                f"{row['pooled_host_ms']:.2f} | {row['pooled_wall_ms']:.2f} | "
                f"{row['stacked_wall_ms'] / row['pooled_wall_ms']:.1f}x |")
        if cpu:
            line += f" {row['stacking_ms']:.2f} | {row['table_ms']:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(set(SHAPES) - {"70b"}), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--adapters", default="1,8,64,512", help="distinct adapters in the step, a list")
    parser.add_argument("--rows", type=int, default=512, help="rows of the decode step (one per request)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=",".join(ATTENTION_PROJECTIONS), help="projections the adapters target")
    parser.add_argument("--layers", type=int, default=0,
                        help="only the first N decoder layers (0: all): 512 adapters of the whole 1b shape take 7 GB "
                             "of fp32 on the CPU; the step's costs are per projection, so they scale with N")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on the CPU: one keeps small matmuls from timing other processes' load")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    args.adapters = [int(n) for n in args.adapters.split(",")]
    args.targets = tuple(args.targets.split(","))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    report = {"shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": args.rows, "rank": args.rank, "targets": list(args.targets),
              "layers": len(step_dims(args)), "dtype": str(dtype).removeprefix("torch."),
              "threads": torch.get_num_threads()}
    with torch.no_grad():  # as generation runs
        report["rows_by_adapters"] = measure(args, device, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pooled_lora_{args.shape}_{device.type}.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
