"""Tile-size sweep for the segmented LoRA kernels at the engine's 8B shapes (8 adapters, one 8192-token pass, bf16).

For each kernel use (forward shrink of x, the backward's dH and dB from dY, the weight gradients; plus the dH shrink
of dY that `grad_h_and_b` replaced, for comparison) it times every launch
configuration in a small grid with `triton.testing.do_bench` and prints the fastest next to the one
`kernels/segmented.py` uses now, with the bytes-at-copy-bandwidth floor. GPU only.

    python -P bench/tune_lora_tiles.py [--tokens 8192] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.testing

from lorafleet.kernels import segmented, triton_lora


def ragged(n_rows: int, n: int) -> tuple[tuple[int, int], ...]:
    bounds = [round(i * n_rows / n) for i in range(n + 1)]
    return tuple(zip(bounds[:-1], bounds[1:]))


def no_dropout() -> tuple:
    """The kernels' dropout arguments with DROPOUT off: placeholders, as segmented._dropout_args passes them."""
    placeholder = torch.zeros(1, device="cuda")
    return (placeholder, placeholder, placeholder, placeholder, 0)


def time_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def shrink_case(tokens, k, rank, block_m, block_k, warps, stages):
    segments = ragged(tokens, 8)
    tiles = torch.tensor([(j, r, min(r + block_m, e))
                          for j, (s, e) in enumerate(segments) for r in range(s, e, block_m)],
                         dtype=torch.int32, device="cuda")
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, rank, k, device="cuda", dtype=torch.bfloat16)
    h = torch.empty(tokens, rank, device="cuda", dtype=torch.bfloat16)
    dropout = no_dropout()

    def run():
        triton_lora._shrink_kernel[(tiles.shape[0],)](
            x, w, h, tiles, *dropout, k, x.stride(0), x.stride(1), w.stride(0), w.stride(2), w.stride(1),
            h.stride(0), h.stride(1), R=rank, BLOCK_M=block_m, BLOCK_K=block_k,
            DROPOUT=False, INPUT_PRECISION="tf32", DOT_FP32=False, num_warps=warps, num_stages=stages)
    return time_ms(run), tokens * k * 2


def row_chunks(tokens, chunk_div, block_m):
    chunk_rows = max(block_m, tokens // 8 // chunk_div)
    return torch.tensor([(j, r, min(r + chunk_rows, e)) for j, (s, e) in enumerate(ragged(tokens, 8))
                         for r in range(s, e, chunk_rows)], dtype=torch.int32, device="cuda")


def weight_grad_case(tokens, n, rank, chunk_div, block_m, block_n, warps, stages):
    chunks = row_chunks(tokens, chunk_div, block_m)
    left = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    right = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    grad = torch.zeros(8, rank, n, device="cuda", dtype=torch.float32)
    dropout = no_dropout()

    def run():
        triton_lora._weight_grad_kernel[(triton.cdiv(n, block_n), chunks.shape[0])](
            left, right, grad, grad, chunks, *dropout, n, left.stride(0), left.stride(1), right.stride(0),
            right.stride(1), grad.stride(0), grad.stride(1), grad.stride(2), R=rank, BLOCK_M=block_m, BLOCK_N=block_n,
            DROPOUT=False, INPUT_PRECISION="tf32", DOT_FP32=False, TABLE=False, num_warps=warps, num_stages=stages)
    return time_ms(run), tokens * n * 2


def grad_h_and_b_case(tokens, n, rank, chunk_div, block_m, block_n, warps, stages):
    """The backward's dH and dB from one read of dY (N = d_out)."""
    chunks = row_chunks(tokens, chunk_div, block_m)
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8, n, rank, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    grad_h = torch.zeros(tokens, rank, device="cuda", dtype=torch.float32)
    grad_b = torch.zeros(8, n, rank, device="cuda", dtype=torch.float32)  # B's layout, as the engine passes it
    scales = torch.ones(8, device="cuda")

    def run():
        triton_lora._grad_h_and_b_kernel[(triton.cdiv(n, block_n), chunks.shape[0])](
            dy, b, h, grad_h, grad_b, grad_b, scales, chunks, n, dy.stride(0), dy.stride(1),
            b.stride(0), b.stride(1), b.stride(2), h.stride(0), h.stride(1), grad_h.stride(0), grad_h.stride(1),
            grad_b.stride(0), grad_b.stride(2), grad_b.stride(1), R=rank, BLOCK_M=block_m, BLOCK_N=block_n,
            INPUT_PRECISION="tf32", DOT_FP32=False, TABLE=False, num_warps=warps, num_stages=stages)
    return time_ms(run), tokens * n * 2


def sweep(name, case, shape, grid, current, bandwidth):
    results = []
    for config in grid:
        try:
            ms, nbytes = case(*shape, *config)
        except Exception as exc:  # an infeasible tile (shared memory) is skipped
            results.append({"config": config, "error": type(exc).__name__})
            continue
        results.append({"config": config, "ms": ms})
    timed = [r for r in results if "ms" in r]
    best = min(timed, key=lambda r: r["ms"])
    now = next((r for r in timed if tuple(r["config"]) == tuple(current)), None)
    floor = nbytes / bandwidth * 1e3
    print(f"{name:28s} {str(shape):22s} now {current} {now and round(now['ms'], 4)} ms | best {best['config']} "
          f"{best['ms']:.4f} ms | floor {floor:.4f} ms", flush=True)
    return {"kernel": name, "shape": shape, "current": current, "current_ms": now and now["ms"], "best": best,
            "floor_ms": floor, "all": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--json")
    args = parser.parse_args()
    t = args.tokens
    a = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    bandwidth = 2 * a.numel() / (time_ms(lambda: a.clone()) / 1e3)  # bytes/s, read + write
    del a
    shrink_grid = list(itertools.product([32, 64, 128], [64, 128, 256], [4, 8], [3, 4]))
    grad_grid = list(itertools.product([2, 8], [64, 128], [64, 128, 256], [4, 8], [3]))
    block_m = segmented._pick_block_m(t, 16)
    report = []
    # forward shrink of x: q/k/v group (R 64), gate/up (R 32), o (R 16, K 4096), down (R 16, K 14336)
    for k, rank in ((4096, 64), (4096, 32), (4096, 16), (14336, 16)):
        cur_m = segmented._pick_block_m(t, rank)
        report.append(sweep("shrink", shrink_case, (t, k, rank), shrink_grid,
                            (cur_m, 128 if rank <= 64 else 64, 4, 3), bandwidth))
    # The backward's dH and dB from one read of dY, N = d_out (k/v 1024, q/o/down 4096, gate/up 14336), R 16; the
    # two kernels it replaced (dH as a shrink of dY, dB as a weight gradient) are timed above and below at the same N.
    for n in (1024, 4096, 14336):
        report.append(sweep("grad_h_and_b", grad_h_and_b_case, (t, n, 16), grad_grid, (2, 64, 128, 4, 3), bandwidth))
        report.append(sweep("shrink dH (before)", shrink_case, (t, n, 16), shrink_grid, (block_m, 128, 4, 3),
                            bandwidth))
    # weight gradients: dA (left dH R, right x d_in) and dB (left h, right dY d_out); chunk_div 2 = 16 chunks in all
    for n, rank in ((4096, 64), (4096, 16), (14336, 16), (1024, 16)):
        report.append(sweep("weight_grad", weight_grad_case, (t, n, rank), grad_grid,
                            (2, 64, 128 if rank <= 32 else 64, 4 if rank <= 64 else 8, 3), bandwidth))
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"bandwidth": bandwidth, "report": report}, handle, indent=1)


if __name__ == "__main__":
    main()
