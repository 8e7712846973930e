"""Triton kernels for segmented multi-adapter LoRA.

Every kernel walks a list of row tiles (or row chunks) that never cross a segment boundary, so each program works for
exactly one adapter and reads that adapter's weights from a stacked, rank-padded tensor `[n_adapters, R, d]`.
R is the padded rank (a power of two, at least 16, because `tl.dot` needs 16 along every dimension).

- `shrink`:      h[t, :] = x[t] @ W_j (W_j viewed as [K, R])           forward x A_jᵀ
- `expand`:      y[t, :] (+)= scale_j * h[t] @ V_j (V_j viewed as [R, N])   forward h B_jᵀ, backward dH A_j
- `weight_grad`: grad[j] += left[rows_c]ᵀ @ right[rows_c]            dA_j = dHᵀ x, per row chunk c
- `grad_h_and_b`: dH[t] += scale_j dY[t] @ B_j and dB_jᵀ += scale_j h[rows_c]ᵀ @ dY[rows_c] from one read of dY

With TABLE the two gradient kernels add into each adapter's own gradient tensors, wherever a table of row addresses
points (kernels/grad_sink.py), instead of into a stack.

With DROPOUT the x read by the shrink and by dA, and dX written by the expand, go through each adapter's dropout mask,
regenerated from a counter-based hash of (seed, row within the segment, column) instead of being stored.

Strides are passed explicitly so one kernel serves both the forward and the transposed backward use of a weight.

DOT_FP32 upcasts the operands of every `tl.dot` to fp32. Only the interpreter needs it: Triton 3.9's interpreter
multiplies bf16 operands as raw integers in `tl.dot`. On the GPU the operands stay 16-bit (tensor cores, fp32
accumulate).
The kernels call only Triton builtins and this module's own @jit helpers (tl.full, not the library helper tl.zeros;
a hash of our own, not tl.rand): the tests re-import this module under the interpreter after triton was imported in
compiled mode, and jitted library helpers would stay compiled.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _dropout_scale(seed_ptr, threshold_ptr, inv_keep_ptr, starts_ptr, stream, adapter, rows, cols, n_cols):
    """[rows, cols] fp32: 1 / (1 - p_j) where adapter j keeps x[row, col], else 0 (`dropout_keep_reference`)."""
    seed = tl.load(seed_ptr + adapter) + stream
    key_lo = _fmix32((seed & 0xFFFFFFFF).to(tl.uint32))
    key_hi = _fmix32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) ^ 0x9E3779B9)
    index = (rows - tl.load(starts_ptr + adapter).to(tl.int64))[:, None] * n_cols + cols[None, :]
    hashed = _fmix32(_fmix32((index & 0xFFFFFFFF).to(tl.uint32) ^ key_lo) ^ (index >> 32).to(tl.uint32) ^ key_hi)
    keep = hashed.to(tl.int64) >= tl.load(threshold_ptr + adapter)
    return tl.where(keep, tl.load(inv_keep_ptr + adapter), 0.0)


@triton.jit
def _grad_tile_ptrs(grad_ptr, table_ptr, adapter, ranks, cols, stride_ga, stride_gr, stride_gn,
                    R: tl.constexpr, TABLE: tl.constexpr, TABLE_STRIDES: tl.constexpr):
    """Addresses of rows `ranks` x columns `cols` of adapter `adapter`'s gradient, and which rows exist: in the stack
    at grad_ptr, or with TABLE wherever the table (kernels/grad_sink.py) points: an adapter's own `.grad`, its
    columns `stride_gn` apart or, with TABLE_STRIDES, as far apart as the table says. (dA's rows are contiguous: a
    stride of 1 passed as an argument lets the compiler vectorise the adds, one read from the table does not.)"""
    if TABLE:  # one return after both branches: the compiler types every return of a function alike
        row_addresses = tl.load(table_ptr + adapter * (R + 1) + ranks)
        if TABLE_STRIDES:
            column_stride = tl.load(table_ptr + adapter * (R + 1) + R)
        else:
            column_stride = stride_gn
        ptrs = row_addresses.to(tl.pointer_type(tl.float32))[:, None] + cols[None, :] * column_stride
        rows = row_addresses != 0
    else:
        ptrs = grad_ptr + adapter * stride_ga + ranks[:, None] * stride_gr + cols[None, :] * stride_gn
        rows = ranks >= 0
    return ptrs, rows


@triton.jit
def _shrink_kernel(
    x_ptr, w_ptr, h_ptr,
    tiles_ptr,
    seed_ptr, threshold_ptr, inv_keep_ptr, starts_ptr, stream,
    K,
    stride_xm, stride_xk,
    stride_wa, stride_wk, stride_wr,
    stride_hm, stride_hr,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    adapter = tl.load(tiles_ptr + 3 * tile).to(tl.int64)
    row_start = tl.load(tiles_ptr + 3 * tile + 1)
    row_end = tl.load(tiles_ptr + 3 * tile + 2)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)
    ranks = tl.arange(0, R)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm
    w_base = w_ptr + adapter * stride_wa + ranks[None, :] * stride_wr
    acc = tl.full((BLOCK_M, R), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        x_tile = tl.load(x_rows + k[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DROPOUT:
            drop = _dropout_scale(seed_ptr, threshold_ptr, inv_keep_ptr, starts_ptr, stream, adapter, rows, k, K)
            x_tile = (x_tile.to(tl.float32) * drop).to(x_ptr.dtype.element_ty)
        w_tile = tl.load(w_base + k[:, None] * stride_wk, mask=k_mask[:, None], other=0.0)
        if DOT_FP32:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _expand_kernel(
    h_ptr, w_ptr, y_ptr, scale_ptr,
    tiles_ptr,
    seed_ptr, threshold_ptr, inv_keep_ptr, starts_ptr, stream,
    N,
    stride_hm, stride_hr,
    stride_wa, stride_wr, stride_wn,
    stride_ym, stride_yn,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr, DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # Axis 0 walks the output columns so that the programs sharing one h tile run together (h stays in L2).
    pid_n = tl.program_id(0)
    tile = tl.program_id(1)
    adapter = tl.load(tiles_ptr + 3 * tile).to(tl.int64)
    row_start = tl.load(tiles_ptr + 3 * tile + 1)
    row_end = tl.load(tiles_ptr + 3 * tile + 2)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    rows = rows.to(tl.int64)
    ranks = tl.arange(0, R)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    h_tile = tl.load(h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr, mask=row_mask[:, None], other=0.0)
    w_tile = tl.load(
        w_ptr + adapter * stride_wa + ranks[:, None] * stride_wr + cols[None, :] * stride_wn,
        mask=col_mask[None, :], other=0.0,
    )
    if DOT_FP32:
        h_tile = h_tile.to(tl.float32)
        w_tile = w_tile.to(tl.float32)
    acc = tl.dot(h_tile, w_tile, input_precision=INPUT_PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + adapter)
    if DROPOUT:  # the input gradient through the dropped input
        acc = acc * _dropout_scale(seed_ptr, threshold_ptr, inv_keep_ptr, starts_ptr, stream, adapter, rows, cols, N)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    mask = row_mask[:, None] & col_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(
    left_ptr, right_ptr, grad_ptr, table_ptr,
    chunks_ptr,
    seed_ptr, threshold_ptr, inv_keep_ptr, starts_ptr, stream,
    N,
    stride_lm, stride_lr,
    stride_rm, stride_rn,
    stride_ga, stride_gr, stride_gn,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, TABLE: tl.constexpr,
):
    # One program: one row chunk of one adapter times one column block; chunks of the same adapter meet in an fp32
    # atomic add into grad[adapter], which the caller zeroed (or, with TABLE, into the adapter's own .grad). Relaxed:
    # the adds need no order among themselves, and an acquire-release add waits on memory each time (with TABLE, on
    # gradients out of L2: 4.9 against 3.6 ms a 1B 8-job step on the H100).
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    adapter = tl.load(chunks_ptr + 3 * chunk).to(tl.int64)
    row_start = tl.load(chunks_ptr + 3 * chunk + 1)
    row_end = tl.load(chunks_ptr + 3 * chunk + 2)
    ranks = tl.arange(0, R)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.full((R, BLOCK_N), 0.0, dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + offs_m
        row_mask = rows < row_end
        rows = rows.to(tl.int64)
        left = tl.load(
            left_ptr + rows[:, None] * stride_lm + ranks[None, :] * stride_lr, mask=row_mask[:, None], other=0.0,
        )
        right = tl.load(
            right_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )
        if DROPOUT:  # right is the input x: dA_j = dHᵀ dropped(x)
            drop = _dropout_scale(seed_ptr, threshold_ptr, inv_keep_ptr, starts_ptr, stream, adapter, rows, cols, N)
            right = (right.to(tl.float32) * drop).to(right_ptr.dtype.element_ty)
        if DOT_FP32:
            left = left.to(tl.float32)
            right = right.to(tl.float32)
        acc = tl.dot(tl.trans(left), right, acc, input_precision=INPUT_PRECISION)
    g_ptrs, g_rows = _grad_tile_ptrs(grad_ptr, table_ptr, adapter, ranks, cols, stride_ga, stride_gr, stride_gn,
                                     R, TABLE, False)
    tl.atomic_add(g_ptrs, acc, mask=g_rows[:, None] & col_mask[None, :], sem="relaxed")


@triton.jit
def _grad_h_and_b_kernel(
    dy_ptr, b_ptr, h_ptr, grad_h_ptr, grad_bt_ptr, table_ptr, scale_ptr,
    chunks_ptr,
    N,
    stride_dym, stride_dyn,
    stride_ba, stride_bn, stride_br,
    stride_hm, stride_hr,
    stride_ghm, stride_ghr,
    stride_ga, stride_gr, stride_gn,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, TABLE: tl.constexpr,
):
    # Both gradients that read dY, from one read of it: per row tile, dH[rows] += scale_j dY[rows, cols] @ B_j[cols]
    # (an fp32 atomic add: the column blocks of a row meet there) and, summed over the chunk's rows,
    # dB_jᵀ[:, cols] += scale_j h[rows]ᵀ @ dY[rows, cols] (one atomic add per chunk, as in `_weight_grad_kernel`).
    pid_n = tl.program_id(0)
    chunk = tl.program_id(1)
    adapter = tl.load(chunks_ptr + 3 * chunk).to(tl.int64)
    row_start = tl.load(chunks_ptr + 3 * chunk + 1)
    row_end = tl.load(chunks_ptr + 3 * chunk + 2)
    scale = tl.load(scale_ptr + adapter)
    ranks = tl.arange(0, R)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    offs_m = tl.arange(0, BLOCK_M)
    b_tile = tl.load(
        b_ptr + adapter * stride_ba + cols[:, None] * stride_bn + ranks[None, :] * stride_br,
        mask=col_mask[:, None], other=0.0,
    )
    if DOT_FP32:
        b_tile = b_tile.to(tl.float32)
    acc_b = tl.full((R, BLOCK_N), 0.0, dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + offs_m
        row_mask = rows < row_end
        rows = rows.to(tl.int64)
        dy = tl.load(
            dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn,
            mask=row_mask[:, None] & col_mask[None, :], other=0.0,
        )
        h = tl.load(h_ptr + rows[:, None] * stride_hm + ranks[None, :] * stride_hr, mask=row_mask[:, None], other=0.0)
        if DOT_FP32:
            dy = dy.to(tl.float32)
            h = h.to(tl.float32)
        acc_b = tl.dot(tl.trans(h), dy, acc_b, input_precision=INPUT_PRECISION)
        part_h = tl.dot(dy, b_tile, input_precision=INPUT_PRECISION) * scale
        tl.atomic_add(grad_h_ptr + rows[:, None] * stride_ghm + ranks[None, :] * stride_ghr, part_h,
                      mask=row_mask[:, None], sem="relaxed")
    g_ptrs, g_rows = _grad_tile_ptrs(grad_bt_ptr, table_ptr, adapter, ranks, cols, stride_ga, stride_gr, stride_gn,
                                     R, TABLE, True)
    tl.atomic_add(g_ptrs, acc_b * scale, mask=g_rows[:, None] & col_mask[None, :], sem="relaxed")


INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"
