"""Packed variable-length attention on the GPU: flash attention over the sequence boundaries.

The cohort's packed row holds many sequences back to back. `torch.nn.attention.varlen.varlen_attn` (PyTorch's flash
varlen entry point) takes the row as [T, H, D] with the cumulative boundaries and attends causally within each
sequence: no [T, T] mask, no padding, no Python loop over sequences, and grouped-query heads without repeating K/V.
`lorafleet.executor.model.packed_attention` calls it when it can and keeps its per-sequence loop as the CPU path and
the reference.

When every sequence of the row has one length (fixed-length data, the benchmarks' shapes), the row is a dense batch
[B, L]: then cuDNN's causal attention runs instead, 1.3-1.7x faster than the flash varlen kernel forward + backward on
the H200 (bench/bench_attention.py, run P6: 8B heads 32 x 512 tokens 1.16 against 1.86 ms; 4 x 512 0.67 against
0.88 ms), grouped K/V heads as they are. The choice reads only the row's length, its number of sequences and the
longest length the caller states, so a CUDA graph captured with it stays right for every replay of its layout
(`dense_length`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch without the varlen entry point: the per-sequence loop serves
    varlen_attn = None

_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else set()
FLASH_DTYPES = (torch.float16, torch.bfloat16)
# cuDNN's dense causal attention for rows of equal-length sequences; False keeps every row on the varlen kernel (the
# benchmarks compare the two)
DENSE_WHEN_UNIFORM = True


def varlen_supported(query: torch.Tensor, key: torch.Tensor, scaling, sliding_window) -> bool:
    """Whether this torch's varlen flash attention computes exactly what the call asks for."""
    if varlen_attn is None or not query.is_cuda or query.dtype not in FLASH_DTYPES:
        return False
    if "window_size" not in _VARLEN_PARAMS and sliding_window is not None:
        return False
    if "scale" not in _VARLEN_PARAMS and scaling is not None and scaling != query.shape[-1] ** -0.5:
        return False
    return query.shape[1] % key.shape[1] == 0


def varlen_packed_attention(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, scaling, sliding_window):
    """Causal attention within each packed sequence. query [1, H, T, D], key/value [1, H_kv, T, D] -> [1, T, H, D]."""
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    return varlen_attention(q, k, v, cu_seq_lens, max_length, scaling, sliding_window).unsqueeze(0)


def dense_length(tokens: int, sequences: int, max_length: int) -> int | None:
    """The one length of every sequence when a row of `tokens` holds `sequences` none longer than `max_length` and
    they fill it (then each is exactly max_length); else None. `max_length` may be any upper bound (a CUDA graph's
    power-of-two bucket): the answer is still exact."""
    return max_length if sequences * max_length == tokens else None


def dense_causal_attention(q, k, v, length: int, scaling) -> torch.Tensor | None:
    """cuDNN's causal attention on the row as a [B, length] batch: q [T, H, D], k/v [T, H_kv, D] -> [T, H, D];
    None when cuDNN takes no such call here (the caller uses the varlen kernel)."""
    batch = q.shape[0] // length
    q4, k4, v4 = (t.view(batch, length, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scaling,
                                                 enable_gqa=k.shape[1] != q.shape[1])
    except RuntimeError:  # no cuDNN attention for this device, dtype or head size
        return None
    return out.transpose(1, 2).reshape(q.shape)


def varlen_attention(q, k, v, cu_seq_lens: torch.Tensor, max_length: int, scaling, sliding_window):
    """The same on the row-major layout: q [T, H, D], k/v [T, H_kv, D] -> [T, H, D]."""
    length = dense_length(q.shape[0], cu_seq_lens.numel() - 1, max_length)
    if DENSE_WHEN_UNIFORM and length is not None and sliding_window is None:
        out = dense_causal_attention(q, k, v, length, scaling)
        if out is not None:
            return out
    boundaries = cu_seq_lens.to(torch.int32)
    options = {}
    if "window_size" in _VARLEN_PARAMS:
        options["window_size"] = (-1, 0) if sliding_window is None else (sliding_window - 1, 0)
    else:
        options["is_causal"] = True
    if "scale" in _VARLEN_PARAMS:
        options["scale"] = scaling
    grouped = k.shape[1] != q.shape[1]
    if grouped and "enable_gqa" in _VARLEN_PARAMS:
        options["enable_gqa"] = True
    try:
        return varlen_attn(q, k, v, boundaries, boundaries, max_length, max_length, **options)
    except torch.OutOfMemoryError:
        raise  # repeating K/V below would need more memory still
    except (RuntimeError, ValueError):
        # torch 2.11's entry point has no enable_gqa flag; its flash kernel takes fewer K/V heads as they are, and
        # should a build refuse them, K/V are repeated per query head.
        if not grouped:
            raise
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return varlen_attn(q, k, v, boundaries, boundaries, max_length, max_length, **options)
