"""Pure-PyTorch alternatives to the Triton kernels, compared in bench/bench_kernels.py; `lora_delta` also sends the
shapes where torch._grouped_mm measured faster to it (`grouped_mm_wins`, see docs/KERNELS.md).

All compute `lora_delta_reference` and are differentiable through torch's own autograd.
- per-adapter loop: `lora_delta_reference` itself (two small matmuls per adapter).
- padded bmm: every segment padded to the longest one, two batched matmuls.
- grouped mm: `torch._grouped_mm` (torch >= 2.8 with CUDA, Hopper); needs segments that tile the rows in order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lorafleet.kernels.segmented import _stack_a, _stack_b, padded_rank


def lora_delta_padded_bmm(x, segments, lora_a, lora_b, scales):
    longest = max(end - start for start, end in segments)
    rank = max(a.shape[0] for a in lora_a)
    x_padded = torch.stack([F.pad(x[start:end], (0, 0, 0, longest - (end - start))) for start, end in segments])
    a_stack = _stack_a(lora_a, rank, x.dtype)
    b_stack = _stack_b(lora_b, rank, x.dtype)
    scale = _scale_column(tuple(scales), x.dtype, x.device)
    y_padded = torch.bmm(torch.bmm(x_padded, a_stack.transpose(1, 2)), b_stack.transpose(1, 2)) * scale
    pieces, cursor = [], 0
    for j, (start, end) in sorted(enumerate(segments), key=lambda item: item[1][0]):
        if start > cursor:
            pieces.append(x.new_zeros(start - cursor, y_padded.shape[2]))
        pieces.append(y_padded[j, : end - start])
        cursor = end
    if cursor < x.shape[0]:
        pieces.append(x.new_zeros(x.shape[0] - cursor, y_padded.shape[2]))
    return torch.cat(pieces)


# Cached on the device so that a CUDA graph can capture the call (no host-to-device copy inside it).
@functools.lru_cache(maxsize=256)
def _group_offsets(segments, scales, dtype, device):
    offsets = torch.tensor([end for _, end in segments], dtype=torch.int32).to(device)
    lengths = torch.tensor([end - start for start, end in segments])
    row_scale = torch.repeat_interleave(torch.tensor(scales, dtype=dtype), lengths).to(device)
    return offsets, row_scale


@functools.lru_cache(maxsize=256)
def _scale_column(scales, dtype, device):
    return torch.tensor(scales, dtype=dtype).to(device)[:, None, None]


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.is_available()


def _tiles_rows_in_order(segments, n_rows: int) -> bool:
    cursor = 0
    for start, end in segments:
        if start != cursor:
            return False
        cursor = end
    return cursor == n_rows


def grouped_mm_wins(x, segments, lora_a) -> bool:
    """True where torch._grouped_mm beat the Triton kernels (fwd+bwd, H100, docs/BENCHMARKS-history.md run I): bf16 at padded
    rank >= 64 with 16 or more adapters, by 2-12%. Elsewhere Triton won or tied within 2% (4k rows at r=64 with up
    to 8 adapters: Triton 1-7% faster), by up to 2x. _grouped_mm also needs rows tiled in order without gaps."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(x.device) >= (9, 0)  # measured, and supported, on Hopper only
        and len(segments) >= 16
        and padded_rank([a.shape[0] for a in lora_a]) >= 64
        and _tiles_rows_in_order(segments, x.shape[0])
    )


def lora_delta_grouped_mm(x, segments, lora_a, lora_b, scales):
    if not _tiles_rows_in_order(segments, x.shape[0]):
        raise ValueError("torch._grouped_mm needs segments that tile every row in order, without gaps")
    rank = padded_rank([a.shape[0] for a in lora_a])  # its alignment rule: dimensions in multiples of 16 bytes
    offsets, row_scale = _group_offsets(tuple(segments), tuple(scales), x.dtype, x.device)
    a_stack = _stack_a(lora_a, rank, x.dtype)
    b_stack = _stack_b(lora_b, rank, x.dtype)
    h = torch._grouped_mm(x, a_stack.transpose(1, 2), offs=offsets) * row_scale[:, None]
    return torch._grouped_mm(h, b_stack.transpose(1, 2), offs=offsets)
