"""Triton kernels for multi-adapter LoRA read straight from a page pool (S-LoRA's MBGMV), forward only.

`pooled_lora_delta_triton` computes `pooled_lora_delta_reference` (reference.py) added into `out`, in two launches
over the row tiles of a `PooledLoraTable` (kernels/pooled.py), each tile rows of one adapter:

    h = shrink(x, A)              h[t] = x[t] A_jᵀ                      [T, R]
    out = expand(h, B, scale)     out[t] += scale_j h[t] B_jᵀ

A program finds its adapter's A and B in the flat pool through the layer's offset table (element offsets and rank r_j)
and reads them in place: ranks are padded to R only inside the kernel, by masking ranks >= r_j, so nothing is
stacked, padded or copied on the host. A tile whose adapter does not target the layer (r_j = 0) reads and writes
nothing.

As in triton_lora.py: DOT_FP32 upcasts `tl.dot`'s operands under the interpreter (which multiplies bf16 as raw
integers), and the kernels call only Triton builtins so that the tests can re-import this module interpreted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafleet.kernels.pooled import TILE_ROWS, PooledLoraTable
from lorafleet.kernels.segmented import _input_precision


@triton.jit
def _pooled_shrink_kernel(
    x_ptr, pool_ptr, h_ptr,
    tiles_ptr, offsets_ptr,
    K,
    stride_xm, stride_xk, stride_hm,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    segment = tl.load(tiles_ptr + 3 * tile)
    rows = tl.load(tiles_ptr + 3 * tile + 1) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(tiles_ptr + 3 * tile + 2)
    a_start = tl.load(offsets_ptr + 3 * segment)
    rank = tl.load(offsets_ptr + 3 * segment + 2)
    ranks = tl.arange(0, R)
    # A_j [rank, K] row-major, read as its transpose [K, R]; ranks past r_j read as zeros
    a_base = pool_ptr + a_start + ranks[None, :] * K
    rank_mask = ranks[None, :] < rank
    acc = tl.full((BLOCK_M, R), 0.0, dtype=tl.float32)
    k_end = tl.where(rank > 0, K, 0)  # an adapter that does not target this layer: no reads
    for k0 in range(0, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                         mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_tile = tl.load(a_base + k[:, None], mask=k_mask[:, None] & rank_mask, other=0.0).to(x_tile.dtype)
        if DOT_FP32:
            x_tile = x_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        acc = tl.dot(x_tile, a_tile, acc, input_precision=INPUT_PRECISION)
    tl.store(h_ptr + rows[:, None] * stride_hm + ranks[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None])


@triton.jit
def _pooled_expand_kernel(
    h_ptr, pool_ptr, y_ptr,
    tiles_ptr, offsets_ptr, scales_ptr,
    N,
    stride_hm, stride_ym, stride_yn,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Axis 0 walks the output columns so that the programs sharing one h tile run together (h stays in L2).
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    segment = tl.load(tiles_ptr + 3 * tile)
    rows = tl.load(tiles_ptr + 3 * tile + 1) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(tiles_ptr + 3 * tile + 2)
    b_start = tl.load(offsets_ptr + 3 * segment + 1)
    rank = tl.load(offsets_ptr + 3 * segment + 2)
    scale = tl.load(scales_ptr + segment).to(tl.float32)
    ranks = tl.arange(0, R)
    rank_mask = ranks < rank
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    h_tile = tl.load(h_ptr + rows[:, None] * stride_hm + ranks[None, :], mask=row_mask[:, None] & rank_mask[None, :],
                     other=0.0)
    # B_j [N, rank] row-major, read as its transpose [R, BLOCK_N]
    b_tile = tl.load(pool_ptr + b_start + cols[None, :] * rank + ranks[:, None],
                     mask=rank_mask[:, None] & col_mask[None, :], other=0.0).to(h_tile.dtype)
    if DOT_FP32:
        h_tile = h_tile.to(tl.float32)
        b_tile = b_tile.to(tl.float32)
    delta = tl.dot(h_tile, b_tile, input_precision=INPUT_PRECISION) * scale
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    y_mask = row_mask[:, None] & col_mask[None, :] & (rank > 0)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def pooled_lora_delta_triton(x: torch.Tensor, pool: torch.Tensor, table: PooledLoraTable, layer: int,
                             out: torch.Tensor) -> torch.Tensor:
    """Adds layer `layer`'s deltas of the table's adapters into out [T, d_out] in place and returns it; inputs
    checked by the caller (`check_pooled_inputs`)."""
    n_tiles = table.tiles.shape[0]
    if n_tiles == 0:
        return out
    d_in, d_out = table.layer_dims[layer]
    offsets = table.offsets[layer]
    rank = table.rank
    # h rows outside every tile, and those of adapters that do not target the layer, are never read
    h = torch.empty(x.shape[0], rank, dtype=x.dtype, device=x.device)
    precision = _input_precision(x.dtype)
    _pooled_shrink_kernel[(n_tiles,)](
        x, pool, h, table.tiles, offsets, d_in,
        x.stride(0), x.stride(1), h.stride(0),
        R=rank, BLOCK_M=TILE_ROWS, BLOCK_K=128 if rank <= 64 else 64,
        INPUT_PRECISION=precision, DOT_FP32=INTERPRETED, num_warps=4, num_stages=3,
    )
    block_n = 128 if rank <= 64 else 64
    _pooled_expand_kernel[(triton.cdiv(d_out, block_n), n_tiles)](
        h, pool, out, table.tiles, offsets, table.scale_values, d_out,
        h.stride(0), out.stride(0), out.stride(1),
        R=rank, BLOCK_M=TILE_ROWS, BLOCK_N=block_n,
        INPUT_PRECISION=precision, DOT_FP32=INTERPRETED, num_warps=4, num_stages=2,
    )
    return out


INTERPRETED = type(_pooled_shrink_kernel).__name__ == "InterpretedFunction"
