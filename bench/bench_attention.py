"""Causal attention over a packed row, forward + backward, by backend: which one the cohort should call (GPU).

    python -P bench/bench_attention.py --shape 8b --sequences 32x512 [--out DIR]
    python -P bench/bench_attention.py --shape tiny --sequences 4x16 --device cpu     # smoke run

The cohort's attention (executor/attention.py) is flash-attention 2's varlen kernel as PyTorch bundles it. Issue 16's
parts table put it at 15% of its FLOP floor on the H200. This bench times the same work, q [T, H, D] and k/v
[T, H_kv, D] with the sequence boundaries, through each entry point this torch offers:

- `varlen`: what the cohort calls today (`executor.attention.varlen_attention`);
- `sdpa-<backend>`: `scaled_dot_product_attention(is_causal=True)` on [B, H, L, D] when every sequence has the same
  length (the batch reshaped, no copy of K/V per head where the backend takes grouped heads), for the flash, cuDNN and
  memory-efficient backends;
- `flex`: FlexAttention compiled with a causal document mask (any lengths).

(Jagged nested tensors are not offered: torch 2.11's SDPA refuses them with is_causal=True.)

Every backend's output and gradients are checked against `varlen`'s (max abs difference reported), so a fast but
wrong entry point shows up as such. FLOPs: causal forward 2·(2·L²/2)·H·D per sequence, backward 2.5x the forward.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"8b": (32, 8, 128), "1b": (32, 8, 64), "70b": (64, 8, 128), "tiny": (4, 2, 16)}  # heads, kv heads, head dim
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def parse_sequences(text: str) -> list[int]:
    """'32x512' or '128,1024,512': the packed row's sequence lengths."""
    if "x" in text:
        count, length = text.split("x")
        return [int(length)] * int(count)
    return [int(part) for part in text.split(",")]


def inputs(lengths: list[int], heads: int, kv_heads: int, dim: int, device, dtype):
    tokens = sum(lengths)
    generator = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(tokens, h, dim, generator=generator).to(device, dtype).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    boundaries = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
    return q, k, v, boundaries


def run_varlen(q, k, v, boundaries, lengths):
    from lorafleet.executor.attention import varlen_attention
    return varlen_attention(q, k, v, boundaries, max(lengths), q.shape[-1] ** -0.5, None)


def dense_runner(backend: SDPBackend):
    def run(q, k, v, boundaries, lengths):
        if len(set(lengths)) != 1:
            raise ValueError("dense SDPA needs sequences of one length")
        batch, length = len(lengths), lengths[0]
        q4, k4, v4 = (t.view(batch, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2).reshape(q.shape)
    return run


def flex_runner():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    compiled = torch.compile(flex_attention, dynamic=False)
    masks = {}

    def run(q, k, v, boundaries, lengths):
        tokens = q.shape[0]
        key = tuple(lengths)
        if key not in masks:
            document = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                               torch.tensor(lengths, device=q.device))

            def causal_document(b, h, q_idx, kv_idx):
                return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)
            masks[key] = create_block_mask(causal_document, 1, 1, tokens, tokens, device=q.device)
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = compiled(q4, k4, v4, block_mask=masks[key], enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)
    return run


def runners() -> dict:
    table = {"varlen": run_varlen}
    for name in ("flash", "cudnn", "efficient"):
        table[f"sdpa-{name}"] = dense_runner(BACKENDS[name])
    table["flex"] = flex_runner()
    return table


def forward_backward(run, q, k, v, boundaries, lengths, grad):
    for t in (q, k, v):
        t.grad = None
    out = run(q, k, v, boundaries, lengths)
    out.backward(grad)
    return out.detach(), [t.grad.detach().clone() for t in (q, k, v)]


def timed(fn, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def causal_flops(lengths: list[int], heads: int, dim: int) -> float:
    forward = sum(2 * 2 * length * length / 2 * heads * dim for length in lengths)
    return forward * 3.5  # forward + backward at 2.5x


def measure(name, run, args, lengths, device, grad, reference) -> dict:
    q, k, v, boundaries = args
    try:
        out, grads = forward_backward(run, q, k, v, boundaries, lengths, grad)
        seconds = timed(lambda: forward_backward(run, q, k, v, boundaries, lengths, grad), device, 3, 10)
        forward = timed(lambda: run(q, k, v, boundaries, lengths), device, 3, 10) if device.type == "cuda" else None
    except Exception as exc:  # an entry point this torch or device lacks: reported, not fatal
        return {"backend": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    row = {"backend": name, "fwd_bwd_ms": seconds * 1e3, "fwd_ms": forward * 1e3 if forward else None,
           "out": out, "grads": grads}
    if reference is not None:
        row["max_abs_diff_out"] = (out.float() - reference["out"].float()).abs().max().item()
        row["max_abs_diff_grad"] = max((g.float() - r.float()).abs().max().item()
                                       for g, r in zip(grads, reference["grads"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--sequences", default="32x512", help="NxL, or a comma list of lengths")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="", help="comma list (default: all)")
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    device = torch.device(options.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, dim = SHAPES[options.shape]
    lengths = parse_sequences(options.sequences)
    args = inputs(lengths, heads, kv_heads, dim, device, dtype)
    table = runners()
    chosen = [name for name in table if not options.backends or name in options.backends.split(",")]
    flops = causal_flops(lengths, heads, dim)
    grad = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    rows, reference = [], None
    for name in chosen:
        row = measure(name, table[name], args, lengths, device, grad, reference)
        if reference is None and "error" not in row:
            reference = row
        rows.append({key: value for key, value in row.items() if key not in ("out", "grads")})
        if "fwd_bwd_ms" in rows[-1]:
            rows[-1]["tflops"] = flops / (rows[-1]["fwd_bwd_ms"] / 1e3) / 1e12
        print(json.dumps(rows[-1]), flush=True)
    report = {"shape": options.shape, "sequences": options.sequences, "device": str(device),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__,
              "causal_flops_fwd_bwd": flops, "rows": rows}
    if options.out:
        out = Path(options.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"attention_{options.shape}_{options.sequences.replace(',', '-')}.json").write_text(
            json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
