"""Kernel micro-benchmark: multi-adapter LoRA fwd+bwd at d=4096 on one GPU, against the frozen base GEMM.

Variants: Triton (lorafleet.kernels.lora_delta_triton), per-adapter loop (the reference), padded bmm and
torch._grouped_mm. Each row: n adapters with ragged segments of T tokens in total, all of rank r, bf16.
"base" is the frozen projection x @ Wᵀ (W 4096x4096, no weight gradient): forward plus dX in backward.
"+%" is the LoRA fwd+bwd time over the base fwd+bwd time.

With --elementwise, instead: the fused RMSNorm (alone and with the residual add before it), SiLU·mul and rotary
kernels against the eager Hugging Face formulas at Llama-3-8B shapes (see bench_elementwise); the residual add and
RMSNorm also as the engine ran them before `add_rms_norm` (an add, then the fused norm).

Run: python -P bench/bench_kernels.py [--quick] [--elementwise] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
import triton
import triton.testing

from lorafleet.kernels import (
    add_rms_norm_reference,
    lora_delta_multi_triton,
    lora_delta_reference,
    lora_delta_triton,
    lora_linear,
    rms_norm_reference,
    rotary_reference,
    silu_mul_reference,
)
from lorafleet.kernels.elementwise import add_rms_norm_triton, rms_norm_triton, rotary_triton, silu_mul_triton
from lorafleet.kernels.baselines import grouped_mm_available, lora_delta_grouped_mm, lora_delta_padded_bmm

D = 4096


def median_ms(fn, warmup=10, rep=40) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graphed(step):
    """The step captured in a CUDA graph (after warm-up on a side stream): replays show the GPU time alone, as the
    engine would see it with CUDA graphs, free of Python and launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def measure_ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_ms = median_ms(lambda: a @ b, warmup=50, rep=200)
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), warmup=20, rep=100)
    return {
        "bf16_matmul_tflops": 2 * 8192**3 / matmul_ms / 1e9,
        "copy_tb_per_s": 2 * src.numel() * 4 / copy_ms / 1e9,
    }


def ragged_segments(n_rows: int, n_adapters: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n_rows), n_adapters - 1))
    bounds = [0, *cuts, n_rows]
    return list(zip(bounds[:-1], bounds[1:]))


def make_adapters(n, rank, d_in, d_out, dtype, scale=1.0):
    a = [(torch.randn(rank, d_in, device="cuda", dtype=dtype) / d_in**0.5).requires_grad_() for _ in range(n)]
    b = [(torch.randn(d_out, rank, device="cuda", dtype=dtype) / rank**0.5).requires_grad_() for _ in range(n)]
    return a, b, [scale] * n


def fwd_bwd(fn, x, grad, params):
    def run():
        y = fn()
        torch.autograd.grad(y, [x, *params], grad)
    return run


def check_correctness(rng: random.Random) -> list[dict]:
    """Triton vs float64 reference at real shapes: forward and every gradient, three dtypes, ragged ranks."""
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        n_rows, n = 8192, 8
        segments = ragged_segments(n_rows - 100, n, rng)
        segments[2] = (segments[2][0], segments[2][0])  # one empty adapter; rows after n_rows-100 are in no segment
        ranks = [8, 16, 64, 1, 128, 32, 16, 8]
        x = torch.randn(n_rows, D, device="cuda", dtype=dtype, requires_grad=True)
        lora_a = [(torch.randn(r, D, device="cuda", dtype=dtype) / D**0.5).requires_grad_() for r in ranks]
        lora_b = [torch.randn(D, r, device="cuda", dtype=dtype).requires_grad_() for r in ranks]
        scales = [rng.uniform(0.25, 4.0) for _ in ranks]
        y = lora_delta_triton(x, segments, lora_a, lora_b, scales)
        grad = torch.randn_like(y)
        got = [y, *torch.autograd.grad(y, [x, *lora_a, *lora_b], grad)]
        leaves = [t.detach().double().requires_grad_() for t in [x, *lora_a, *lora_b]]
        y64 = lora_delta_reference(leaves[0], segments, leaves[1:n + 1], leaves[n + 1:], scales)
        want = [y64, *torch.autograd.grad(y64, leaves, grad.double())]
        errors = [((g.double() - w).norm() / w.norm().clamp_min(1e-30)).item() for g, w in zip(got, want)]
        rows.append({"dtype": str(dtype), "max_rel_error": max(errors), "forward_rel_error": errors[0]})
    return rows


def bench_grid(args, rng: random.Random) -> list[dict]:
    results = []
    w = torch.randn(D, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    for n_rows in args.tokens:
        x = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16)
        base_fwd = median_ms(lambda: x @ w.t())
        base = median_ms(fwd_bwd(lambda: x @ w.t(), x, grad, []))
        base_graph = median_ms(graphed(fwd_bwd(lambda: x @ w.t(), x, grad, [])))
        for n in args.adapters:
            segments = ragged_segments(n_rows, n, rng)
            for rank in args.ranks:
                lora_a, lora_b, scales = make_adapters(n, rank, D, D, torch.bfloat16)
                params = [*lora_a, *lora_b]
                variants = {
                    "triton": lambda: lora_delta_triton(x, segments, lora_a, lora_b, scales),
                    "loop": lambda: lora_delta_reference(x, segments, lora_a, lora_b, scales),
                    "bmm": lambda: lora_delta_padded_bmm(x, segments, lora_a, lora_b, scales),
                }
                if grouped_mm_available():
                    variants["grouped_mm"] = lambda: lora_delta_grouped_mm(x, segments, lora_a, lora_b, scales)
                row = {"tokens": n_rows, "adapters": n, "rank": rank, "base_fwd_ms": base_fwd, "base_ms": base,
                       "base_graph_ms": base_graph}
                for name, fn in variants.items():
                    for suffix, timer in (("", lambda step: step), ("_graph", graphed)):
                        try:
                            row[f"{name}{suffix}_ms"] = median_ms(timer(fwd_bwd(fn, x, grad, params)))
                        except Exception as error:  # a variant that cannot run this shape is reported, not fatal
                            row[f"{name}{suffix}_ms"] = None
                            row[f"{name}{suffix}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
                row["triton_fwd_ms"] = median_ms(lambda: lora_delta_triton(x, segments, lora_a, lora_b, scales))

                def base_plus_lora():
                    y = x @ w.t()
                    return lora_delta_triton(x, segments, lora_a, lora_b, scales, out=y)
                row["base_plus_triton_ms"] = median_ms(fwd_bwd(base_plus_lora, x, grad, params))
                row["base_plus_triton_graph_ms"] = median_ms(graphed(fwd_bwd(base_plus_lora, x, grad, params)))
                results.append(row)
                print(json.dumps(row), flush=True)
    return results


def bench_layer(rng: random.Random) -> list[dict]:
    """A whole frozen 4096x4096 layer with 8 adapters r=16, three ways: `F.linear(x) + lora_delta(x)` (a new tensor
    and autograd's dX sum), `lora_delta(x, out=F.linear(x))`, and `lora_linear` (delta and LoRA dX accumulated in
    place into the base output and the base dX). Graph replays, fwd+bwd."""
    rows = []
    for n_rows in (4096, 16384, 32768):
        segments = ragged_segments(n_rows, 8, rng)
        x = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(D, D, device="cuda", dtype=torch.bfloat16) / D**0.5
        lora_a, lora_b, scales = make_adapters(8, 16, D, D, torch.bfloat16)
        params = [*lora_a, *lora_b]
        ways = {
            "base": lambda: x @ w.t(),
            "base + delta": lambda: x @ w.t() + lora_delta_triton(x, segments, lora_a, lora_b, scales),
            "delta out=base": lambda: lora_delta_triton(x, segments, lora_a, lora_b, scales, out=x @ w.t()),
            "lora_linear": lambda: lora_linear(x, w, None, segments, lora_a, lora_b, scales),
        }
        row = {"tokens": n_rows}
        for name, fn in ways.items():
            row[f"{name} graph ms"] = median_ms(graphed(fwd_bwd(fn, x, grad, [] if name == "base" else params)))
            row[f"{name} eager ms"] = median_ms(fwd_bwd(fn, x, grad, [] if name == "base" else params))
        rows.append(row)
        print("layer", json.dumps(row), flush=True)
    return rows


def bench_fused_qkv(rng: random.Random) -> dict:
    """q/k/v of a Llama-3-8B layer (4096 -> 4096, 1024, 1024), 8 adapters r=16: one shared shrink vs three."""
    n_rows, n, rank = 16384, 8, 16
    segments = ragged_segments(n_rows, n, rng)
    x = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = (4096, 1024, 1024)
    adapters = [make_adapters(n, rank, D, d_out, torch.bfloat16) for d_out in outs]
    params = [p for a, b, _ in adapters for p in (*a, *b)]
    scales = adapters[0][2]
    w_qkv = torch.randn(sum(outs), D, device="cuda", dtype=torch.bfloat16) / D**0.5

    def separate():
        return torch.cat([lora_delta_triton(x, segments, a, b, scales) for a, b, _ in adapters], dim=1)

    def fused():
        return torch.cat(lora_delta_multi_triton(x, segments, [a for a, _, _ in adapters],
                                                 [b for _, b, _ in adapters], scales), dim=1)
    grad = torch.randn(n_rows, sum(outs), device="cuda", dtype=torch.bfloat16)
    return {
        "tokens": n_rows, "adapters": n, "rank": rank,
        "base_qkv_ms": median_ms(fwd_bwd(lambda: x @ w_qkv.t(), x, grad, [])),
        "separate_ms": median_ms(fwd_bwd(separate, x, grad, params)),
        "fused_ms": median_ms(fwd_bwd(fused, x, grad, params)),
        "base_qkv_graph_ms": median_ms(graphed(fwd_bwd(lambda: x @ w_qkv.t(), x, grad, []))),
        "separate_graph_ms": median_ms(graphed(fwd_bwd(separate, x, grad, params))),
        "fused_graph_ms": median_ms(graphed(fwd_bwd(fused, x, grad, params))),
    }


def profile_one(n_rows=32768, n=8, rank=16):
    """Where the time of one Triton fwd+bwd goes: host time per call and each GPU kernel's time."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(1)
    segments = ragged_segments(n_rows, n, rng)
    x = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16)
    lora_a, lora_b, scales = make_adapters(n, rank, D, D, torch.bfloat16)
    step = fwd_bwd(lambda: lora_delta_triton(x, segments, lora_a, lora_b, scales), x, grad, [*lora_a, *lora_b])
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        step()
    host_ms = (time.perf_counter() - started) / 20 * 1e3
    torch.cuda.synchronize()
    synced_ms = (time.perf_counter() - started) / 20 * 1e3
    print(f"profile tokens={n_rows} adapters={n} r={rank}: host {host_ms:.3f} ms/call, "
          f"with sync {synced_ms:.3f} ms/call")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def host_overheads(n_rows=4096, n=8, rank=16) -> dict:
    """Host (CPU) microseconds per call of each piece, at a size where the GPU keeps up with the host."""
    from lorafleet.kernels import segmented, triton_lora

    segments = ragged_segments(n_rows, n, random.Random(2))
    x = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16)
    lora_a, lora_b, scales = make_adapters(n, rank, D, D, torch.bfloat16)
    plan = segmented._plan(tuple(segments), tuple(scales), n_rows, x.device, 16)
    a_stack = segmented._stack_a(lora_a, 16, x.dtype).detach()
    b_stack = segmented._stack_b(lora_b, 16, x.dtype).detach()
    h = torch.randn(n_rows, 16, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n_rows, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(D, D, device="cuda", dtype=torch.bfloat16)

    def raw_launch():
        triton_lora._expand_kernel[(32, plan.tiles.shape[0])](
            h, b_stack, out, plan.scales, plan.tiles, D, h.stride(0), h.stride(1),
            b_stack.stride(0), b_stack.stride(2), b_stack.stride(1), out.stride(0), out.stride(1),
            R=16, BLOCK_M=plan.block_m, BLOCK_N=128, HAS_SCALE=True, ACCUMULATE=False, INPUT_PRECISION="tf32",
            DOT_FP32=False, num_warps=4, num_stages=2)

    class LaunchesInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            for _ in range(10):
                raw_launch()
            return g

    probe = torch.randn(16, device="cuda", requires_grad=True)

    def manual_backward():
        # What the two backward Functions launch, called from this (the main) thread.
        dh32 = torch.zeros(n_rows, 16, device="cuda", dtype=torch.float32)
        segmented._grad_h_and_b(grad, b_stack, h, dh32, n, plan).to(x.dtype)
        dh = dh32.to(x.dtype)
        segmented._expand(dh, a_stack, (a_stack.stride(0), a_stack.stride(1), a_stack.stride(2)), D, plan, None, None)
        segmented._weight_grad(dh, x.detach(), n, plan).to(x.dtype)

    pieces = {
        "10 raw launches, main thread": lambda: [raw_launch() for _ in range(10)],
        "10 raw launches, in backward": lambda: torch.autograd.grad(LaunchesInBackward.apply(probe).sum(), probe),
        "manual backward, main thread": manual_backward,
        "plan (cache hit)": lambda: segmented._plan(tuple(segments), tuple(scales), n_rows, x.device, 16),
        "input_precision": lambda: segmented._input_precision(torch.bfloat16),
        "stack A (8 adapters)": lambda: segmented._stack_a(lora_a, 16, x.dtype),
        "check_lora_inputs": lambda: segmented.check_lora_inputs(x, segments, lora_a, lora_b, scales),
        "raw triton launch (expand)": raw_launch,
        "_expand": lambda: segmented._expand(h, b_stack, (b_stack.stride(0), b_stack.stride(2), b_stack.stride(1)),
                                             D, plan, plan.scales, None),
        "_shrink": lambda: segmented._shrink(x.detach(), a_stack, (a_stack.stride(0), a_stack.stride(2),
                                             a_stack.stride(1)), 16, plan),
        "_weight_grad": lambda: segmented._weight_grad(h, x.detach(), n, plan),
        "torch.empty": lambda: torch.empty(n_rows, D, device="cuda", dtype=torch.bfloat16),
        "x @ w (torch matmul)": lambda: x.detach() @ w,
        "base fwd+bwd (torch)": fwd_bwd(lambda: x @ w.t(), x, grad, []),
        "triton fwd": lambda: lora_delta_triton(x, segments, lora_a, lora_b, scales),
        "triton fwd+bwd": fwd_bwd(lambda: lora_delta_triton(x, segments, lora_a, lora_b, scales), x, grad,
                                  [*lora_a, *lora_b]),
    }
    return host_microseconds_per_call(pieces)


def host_microseconds_per_call(pieces: dict, calls: int = 50) -> dict:
    """Each piece's host time per call: `calls` calls after 3 warm-up ones, the GPU drained before and after."""
    result = {}
    for name, fn in pieces.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        result[name] = (time.perf_counter() - started) / calls * 1e6
        torch.cuda.synchronize()
        print(f"host us/call  {name:32s} {result[name]:8.1f}", flush=True)
    return result


def add_then_rms_norm(residual, delta, weight, eps):
    """The residual add and the norm as two kernels: what the engine ran before `add_rms_norm`."""
    total = residual + delta
    return total, rms_norm_triton(total, weight, eps)


def elementwise_cases(n_tokens: int = 16384) -> list[dict]:
    """One Llama-3-8B layer's elementwise ops in bf16: inputs, the frozen or no-grad extras, and the fewest bytes one
    fwd+bwd must move (each differentiable input read in both passes, outputs and gradients written once, dY read)."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    d_model, d_ff, head_dim = 4096, 14336, 128
    inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device="cuda", dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(n_tokens, device="cuda", dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)  # HF hands them over in x's dtype
    tables_bytes = 2 * 2 * n_tokens * head_dim * 2  # cos and sin, read in the forward and again in the backward
    cases = [
        {"op": "rms_norm", "shape": [n_tokens, d_model], "fused": rms_norm_triton, "reference": rms_norm_reference,
         "inputs": [torch.randn(n_tokens, d_model, **bf16)], "extras": [1 + 0.1 * torch.randn(d_model, **bf16), 1e-5],
         # fwd: read x, write y; bwd: read dy and x, write dx
         "floor_bytes": 5 * n_tokens * d_model * 2},
    ]
    residual_stream = [torch.randn(n_tokens, d_model, **bf16), torch.randn(n_tokens, d_model, **bf16)]
    for name, fused in (("add_rms_norm", add_rms_norm_triton), ("add, then rms_norm", add_then_rms_norm)):
        cases.append({
            "op": name, "shape": [n_tokens, d_model], "fused": fused, "reference": add_rms_norm_reference,
            "inputs": residual_stream, "extras": [1 + 0.1 * torch.randn(d_model, **bf16), 1e-5],
            # fwd: read residual and delta, write the sum and y; bwd: read dsum, dy and the sum, write dx
            "floor_bytes": 8 * n_tokens * d_model * 2})
    cases += [
        {"op": "silu_mul", "shape": [n_tokens, d_ff], "fused": silu_mul_triton, "reference": silu_mul_reference,
         "inputs": [torch.randn(n_tokens, d_ff, **bf16), torch.randn(n_tokens, d_ff, **bf16)], "extras": [],
         # fwd: read gate and up, write y; bwd: read dy, gate and up, write dgate and dup
         "floor_bytes": 8 * n_tokens * d_ff * 2},
    ]
    for name, n_heads in (("rotary q", 32), ("rotary k", 8)):
        cases.append({
            "op": name, "shape": [n_tokens, n_heads, head_dim], "fused": rotary_triton, "reference": rotary_reference,
            "inputs": [torch.randn(n_tokens, n_heads, head_dim, **bf16)], "extras": [cos, sin],
            # fwd: read x, write y; bwd: read dy, write dx; plus the tables
            "floor_bytes": 4 * n_tokens * n_heads * head_dim * 2 + tables_bytes,
        })
    return cases


def outputs_of(y) -> tuple:
    """An op's outputs as a tuple: add_rms_norm has two (the sum and the norm), the others one."""
    return y if isinstance(y, tuple) else (y,)


def check_elementwise(case: dict) -> tuple[dict, list[torch.Tensor]]:
    """The fused kernel and the eager bf16 formula, each against the formula in float64: forward and gradients; and
    how much of the fused forward is bit-identical to the eager one. Also the upstream gradients it used, one per
    output, for the timing."""
    inputs = [t.detach().requires_grad_() for t in case["inputs"]]
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    extras64 = [e.double() if torch.is_tensor(e) else e for e in case["extras"]]
    y64 = outputs_of(case["reference"](*leaves, *extras64))
    grads = [torch.randn(case["shape"], device="cuda", dtype=torch.bfloat16) for _ in y64]
    want = [*y64, *torch.autograd.grad(y64, leaves, [g.double() for g in grads])]
    row, outputs = {"op": case["op"]}, {}
    for name, fn in (("fused", case["fused"]), ("eager", case["reference"])):
        y = outputs_of(fn(*inputs, *case["extras"]))
        got = [*y, *torch.autograd.grad(y, inputs, grads)]
        errors = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
        row[f"{name}_forward_rel_error"] = max(errors[:len(y)])
        row[f"{name}_max_grad_rel_error"] = max(errors[len(y):])
        outputs[name] = torch.cat([t.detach() for t in y])
    row["forward_bitwise_equal_to_eager"] = (outputs["fused"] == outputs["eager"]).float().mean().item()
    return row, grads


def bench_elementwise(ceilings: dict) -> list[dict]:
    """Fused kernel vs eager HF formula, fwd+bwd median ms, eager launches and CUDA-graph replays, at 16k tokens."""
    rows = []
    for case in elementwise_cases():
        row, grads = check_elementwise(case)
        inputs = [t.requires_grad_() for t in case["inputs"]]
        for name, fn in (("fused", case["fused"]), ("eager", case["reference"])):
            step = fwd_bwd(lambda fn=fn: outputs_of(fn(*inputs, *case["extras"])), inputs[0], grads, inputs[1:])
            row[f"{name}_ms"] = median_ms(step)
            row[f"{name}_graph_ms"] = median_ms(graphed(step))
        row["floor_ms"] = case["floor_bytes"] / (ceilings["copy_tb_per_s"] * 1e12) * 1e3
        row["shape"] = case["shape"]
        rows.append(row)
        print("elementwise", json.dumps(row), flush=True)
    return rows


def print_elementwise_table(ceilings: dict, rows: list[dict]) -> None:
    print(f"\ncopy {ceilings['copy_tb_per_s']:.2f} TB/s; bf16 fwd+bwd ms (graph = CUDA-graph replay); "
          "floor = fewest bytes at copy bandwidth; speedup = eager graph / fused graph")
    header = ("| op | shape | fused eager | fused graph | eager eager | eager graph | speedup | floor | fused/floor "
              "| fused fwd err | fused grad err | eager fwd err | eager grad err | fwd bits = eager |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(f"| {row['op']} | {'x'.join(map(str, row['shape']))} | {row['fused_ms']:.3f} | "
              f"{row['fused_graph_ms']:.3f} | {row['eager_ms']:.3f} | {row['eager_graph_ms']:.3f} | "
              f"{row['eager_graph_ms'] / row['fused_graph_ms']:.2f}x | {row['floor_ms']:.3f} | "
              f"{row['fused_graph_ms'] / row['floor_ms']:.2f} | {row['fused_forward_rel_error']:.1e} | "
              f"{row['fused_max_grad_rel_error']:.1e} | {row['eager_forward_rel_error']:.1e} | "
              f"{row['eager_max_grad_rel_error']:.1e} | {100 * row['forward_bitwise_equal_to_eager']:.1f}% |")


def print_table(ceilings, results):
    print(f"\nbf16 matmul peak {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_tb_per_s']:.2f} TB/s")
    print("fwd+bwd ms; eager = Python launches every op, graph = CUDA-graph replay (GPU time alone); "
          "+% = triton graph / base graph")
    header = ("| tokens | adapters | r | base eager | base graph | triton eager | triton graph | +% | floor "
              "| loop eager | loop graph | grouped_mm eager | grouped_mm graph | bmm graph | base+triton graph |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    for row in results:
        # Fewest bytes for LoRA fwd+bwd: read x twice (shrink, dA), write y, read dY, write dX (bf16).
        floor_ms = 5 * row["tokens"] * D * 2 / (ceilings["copy_tb_per_s"] * 1e12) * 1e3
        triton_ms = row["triton_graph_ms"]
        added = "n/a" if triton_ms is None else f"{100 * triton_ms / row['base_graph_ms']:.0f}"
        print(f"| {row['tokens']} | {row['adapters']} | {row['rank']} | {row['base_ms']:.3f} | "
              f"{row['base_graph_ms']:.3f} | {fmt(row['triton_ms'])} | {fmt(row['triton_graph_ms'])} | {added} | "
              f"{floor_ms:.3f} | {fmt(row.get('loop_ms'))} | {fmt(row.get('loop_graph_ms'))} | "
              f"{fmt(row.get('grouped_mm_ms'))} | {fmt(row.get('grouped_mm_graph_ms'))} | "
              f"{fmt(row.get('bmm_graph_ms'))} | "
              f"{fmt(row.get('base_plus_triton_graph_ms'))} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--profile", action="store_true", help="first profile one shape (32k tokens, 8 adapters, r=16)")
    parser.add_argument("--profile-only", action="store_true", help="with --profile: stop after it")
    parser.add_argument("--layer-only", action="store_true", help="stop after the whole-layer and q/k/v comparisons")
    parser.add_argument("--elementwise", action="store_true",
                        help="only the fused RMSNorm / SiLU·mul / rotary kernels against the eager HF formulas")
    args = parser.parse_args()
    rng = random.Random(0)
    torch.manual_seed(0)
    started = time.time()
    if args.elementwise:
        ceilings = measure_ceilings()
        print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
        elementwise = bench_elementwise(ceilings)
        print_elementwise_table(ceilings, elementwise)
        print(f"\nelapsed {time.time() - started:.0f} s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ceilings": ceilings, "elementwise": elementwise}, f, indent=1)
        return
    if args.profile:
        host_overheads()
        profile_one()
        if args.profile_only:
            return
    ceilings = measure_ceilings()
    print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    print("ceilings", json.dumps(ceilings), flush=True)
    correctness = check_correctness(rng)
    for row in correctness:
        print("correctness", json.dumps(row), flush=True)
    fused = bench_fused_qkv(rng)
    print("fused_qkv", json.dumps(fused), flush=True)
    layer = bench_layer(rng)
    if args.layer_only:
        return
    results = bench_grid(args, rng)
    print_table(ceilings, results)
    print(f"\nelapsed {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceilings, "correctness": correctness, "fused_qkv": fused, "layer": layer,
                       "grid": results}, f, indent=1)


if __name__ == "__main__":
    main()
