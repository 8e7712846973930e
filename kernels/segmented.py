"""Segmented multi-adapter LoRA on Triton: launch plans, autograd Functions and the public entry points.

`lora_delta_triton` computes exactly `lora_delta_reference` (see reference.py) in two stages, one autograd node:

    h = shrink(x, A)           h[t] = x[t] A_jᵀ              for t in segment j      [T, R]
    y = expand(h, B, scale)    y[t] (+)= scale_j h[t] B_jᵀ                          [T, d_out]

The backward forms dH and dB_j from one read of dY (`grad_h_and_b`), then dX = dH A_j (expand) and dA_j = dHᵀ x
(`weight_grad`). With a `LoraDropout` the shrink and dA read x through each adapter's mask and the expand writes dX
through it; the masks are hashed from (seed, row, column) in the kernels, never stored.

`lora_delta_multi` runs one shrink for several projections that read the same x (q/k/v, gate/up): their A's are
concatenated along the rank, so x is read once, and each projection gets its own expand over its slice of h.
`lora_linear(_multi)` make the frozen layers part of the node: without biases the expand writes each output (and the
LoRA dX) and the base GEMMs add into it. A base weight may be a `DenseOnDemand` (kernels/frozen.py, a 4-bit weight
say): it is materialised for the forward GEMM and again for dX, and never saved for the backward.
Ranks are zero-padded per projection to R = max(16, next power of two of the largest rank); padded rows of A and
columns of B are zero, so they add nothing and their gradients are dropped when the stacks are sliced back.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
import triton

from lorafleet.kernels import grad_sink, triton_lora
from lorafleet.kernels.frozen import dense
from lorafleet.kernels.reference import LoraDropout, check_lora_inputs, dropout_threshold


@dataclass(frozen=True)
class _Plan:
    """Row tiles (one adapter each) for shrink/expand and row chunks for the weight gradients, on the device."""

    tiles: torch.Tensor  # int32 [n_tiles, 3]: adapter, row start, row end
    chunks: torch.Tensor  # int32 [n_chunks, 3]: adapter, row start, row end
    scales: torch.Tensor  # float32 [n_adapters]
    block_m: int
    covers_all_rows: bool
    # Dropout (None without): per adapter the hash threshold (int64), 1 / (1 - p) (float32) and its first row (int32)
    dropout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def _pick_block_m(covered_rows: int, rank: int) -> int:
    # Smaller row tiles for small token counts so that the grid still fills the GPU's 132 SMs a few times over, but
    # no fewer rows than the rank: every tile reads its adapter's whole A (or B), and below BLOCK_M = R those
    # re-reads outweigh the x rows themselves (seen at r=64, 4k tokens: 2x slower than BLOCK_M = 64).
    if covered_rows >= 16384:
        block_m = 64
    elif covered_rows >= 4096:
        block_m = 32
    else:
        block_m = 16
    return max(block_m, min(rank, 64))


@functools.lru_cache(maxsize=512)
def _plan(segments: tuple[tuple[int, int], ...], scales: tuple[float, ...], n_rows: int, device: torch.device,
          rank: int, dropout_probs: tuple[float, ...] = ()) -> _Plan:
    covered = sum(end - start for start, end in segments)
    block_m = _pick_block_m(covered, rank)
    # Weight-gradient chunks: about 16 over all rows, so that the reduction over rows runs in parallel.
    chunk_rows = max(4 * block_m, -(-max(covered, 1) // 16 // block_m) * block_m)
    tiles, chunks = [], []
    for adapter, (start, end) in enumerate(segments):
        tiles += [(adapter, row, min(row + block_m, end)) for row in range(start, end, block_m)]
        chunks += [(adapter, row, min(row + chunk_rows, end)) for row in range(start, end, chunk_rows)]

    def as_tensor(items):
        return torch.tensor(items, dtype=torch.int32).reshape(-1, 3).to(device)

    dropout = None
    if any(p > 0 for p in dropout_probs):
        dropout = (
            torch.tensor([dropout_threshold(p) for p in dropout_probs], dtype=torch.int64).to(device),
            torch.tensor([1.0 / (1.0 - p) for p in dropout_probs], dtype=torch.float32).to(device),
            torch.tensor([start for start, _ in segments], dtype=torch.int32).to(device),
        )
    return _Plan(
        tiles=as_tensor(tiles),
        chunks=as_tensor(chunks),
        scales=torch.tensor(scales, dtype=torch.float32).to(device),
        block_m=block_m,
        covers_all_rows=covered == n_rows,
        dropout=dropout,
    )


def _dropout_args(plan: _Plan, dropout: tuple[torch.Tensor, int] | None) -> tuple:
    """The kernels' dropout arguments: seeds, thresholds, 1 / (1 - p), first rows, stream (placeholders without)."""
    if dropout is None:
        return (plan.scales, plan.scales, plan.scales, plan.scales, 0)
    return (dropout[0], *plan.dropout, dropout[1])


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _shrink(x: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], rank: int, plan: _Plan,
            dropout: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """h[t] = (dropped) x[t] @ W_j with W_j of shape [K, R] given by strides (adapter, k, r) over `w`; dropout:
    (seeds, stream) with the plan's probabilities."""
    n_rows, k = x.shape
    h = (torch.empty if plan.covers_all_rows else torch.zeros)(n_rows, rank, dtype=x.dtype, device=x.device)
    n_tiles = plan.tiles.shape[0]
    if n_tiles == 0:
        return h
    triton_lora._shrink_kernel[(n_tiles,)](
        x, w, h,
        plan.tiles,
        *_dropout_args(plan, dropout),
        k,
        x.stride(0), x.stride(1),
        *w_strides,
        h.stride(0), h.stride(1),
        R=rank, BLOCK_M=plan.block_m, BLOCK_K=128 if rank <= 64 else 64,
        DROPOUT=dropout is not None, INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=triton_lora.INTERPRETED,
        num_warps=4, num_stages=3,
    )
    return h


def _expand(h: torch.Tensor, w: torch.Tensor, w_strides: tuple[int, int, int], n_cols: int, plan: _Plan,
            scales: torch.Tensor | None, out: torch.Tensor | None,
            dropout: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """y[t] (+)= (scale_j) * h[t] @ V_j with V_j of shape [R, N] given by strides (adapter, r, n) over `w`, through the
    dropout mask of the input (for dX) when given."""
    n_rows, rank = h.shape
    if out is None:
        out = (torch.empty if plan.covers_all_rows else torch.zeros)(n_rows, n_cols, dtype=h.dtype, device=h.device)
        accumulate = False
    else:
        accumulate = True
    n_tiles = plan.tiles.shape[0]
    if n_tiles == 0:
        return out
    block_n = 128 if rank <= 64 else 64
    triton_lora._expand_kernel[(triton.cdiv(n_cols, block_n), n_tiles)](
        h, w, out, scales if scales is not None else plan.scales,
        plan.tiles,
        *_dropout_args(plan, dropout),
        n_cols,
        h.stride(0), h.stride(1),
        *w_strides,
        out.stride(0), out.stride(1),
        R=rank, BLOCK_M=plan.block_m, BLOCK_N=block_n,
        HAS_SCALE=scales is not None, ACCUMULATE=accumulate, DROPOUT=dropout is not None,
        INPUT_PRECISION=_input_precision(h.dtype),
        DOT_FP32=triton_lora.INTERPRETED,
        num_warps=4, num_stages=2,
    )
    return out


def _weight_grad(left: torch.Tensor, right: torch.Tensor, n_adapters: int, plan: _Plan,
                 dropout: tuple[torch.Tensor, int] | None = None, table: torch.Tensor | None = None):
    """Per adapter j: leftᵀ[rows_j] @ (dropped) right[rows_j], fp32 [n_adapters, R, N]; with a `table`
    (kernels/grad_sink.py) added into the adapters' own gradients instead, returning None."""
    rank = left.shape[1]
    n_cols = right.shape[1]
    n_chunks = plan.chunks.shape[0]
    grad = None if table is not None else torch.zeros(n_adapters, rank, n_cols, dtype=torch.float32,
                                                         device=left.device)
    if n_chunks == 0:
        return grad
    block_n = 128 if rank <= 32 else 64
    stack = grad if table is None else table  # the kernel reads one of them, TABLE says which
    triton_lora._weight_grad_kernel[(triton.cdiv(n_cols, block_n), n_chunks)](
        left, right, stack, stack,
        plan.chunks,
        *_dropout_args(plan, dropout),
        n_cols,
        left.stride(0), left.stride(1),
        right.stride(0), right.stride(1),
        *(grad.stride() if grad is not None else (0, 0, 1)),  # a table's dA rows: contiguous
        R=rank, BLOCK_M=64, BLOCK_N=block_n,
        DROPOUT=dropout is not None, INPUT_PRECISION=_input_precision(left.dtype), DOT_FP32=triton_lora.INTERPRETED,
        TABLE=table is not None, num_warps=4 if rank <= 64 else 8, num_stages=3,
    )
    return grad


def _grad_h_and_b(grad_y: torch.Tensor, b_stack: torch.Tensor, h: torch.Tensor, grad_h: torch.Tensor,
                  n_adapters: int, plan: _Plan, table: torch.Tensor | None = None):
    """Adds scale_j dY[t] @ B_j into the fp32 `grad_h` [T, R] (a column slice, say) and returns the fp32
    [n_adapters, d_out, R] stack of dB_j = scale_j dY[rows_j]ᵀ @ h[rows_j], reading dY once. In B's own layout, so
    that each adapter's slice can become its gradient without a copy (autograd copies a transposed view). With a
    `table` (kernels/grad_sink.py) dB_j is added into the adapters' own gradients instead, and None returned."""
    rank = h.shape[1]
    n_cols = grad_y.shape[1]
    grad_b = None if table is not None else torch.zeros(n_adapters, n_cols, rank, dtype=torch.float32,
                                                           device=h.device)
    n_chunks = plan.chunks.shape[0]
    if n_chunks == 0:
        return grad_b
    block_n = 128 if rank <= 32 else 64
    stack = grad_b if table is None else table  # the kernel reads one of them, TABLE says which
    triton_lora._grad_h_and_b_kernel[(triton.cdiv(n_cols, block_n), n_chunks)](
        grad_y, b_stack, h, grad_h, stack, stack, plan.scales,
        plan.chunks,
        n_cols,
        grad_y.stride(0), grad_y.stride(1),
        b_stack.stride(0), b_stack.stride(1), b_stack.stride(2),
        h.stride(0), h.stride(1),
        grad_h.stride(0), grad_h.stride(1),
        *((grad_b.stride(0), grad_b.stride(2), grad_b.stride(1)) if grad_b is not None else (0, 0, 0)),  # dB_jᵀ
        R=rank, BLOCK_M=64, BLOCK_N=block_n,
        INPUT_PRECISION=_input_precision(h.dtype), DOT_FP32=triton_lora.INTERPRETED,
        TABLE=table is not None, num_warps=4 if rank <= 64 else 8, num_stages=3,
    )
    return grad_b


class _SegmentedLora(torch.autograd.Function):
    """Deltas of P projections sharing x: one shrink into h [T, R_cat] (projection p owns columns
    offsets[p]:offsets[p]+ranks[p]), one expand per projection. A single autograd node with the adapters' own tensors
    as inputs, so stacking them costs no autograd nodes of its own (host time matters: hundreds of calls a step).

    With the base layers' weights (n_bases = P) the node is the whole set of layers y_p = x W_pᵀ + bias_p + delta_p:
    the expand writes the LoRA dX and the GEMMs accumulate the base dX = sum_p dY_p W_p into it (addmm_), instead of
    autograd adding 2P [T, d_in] tensors; without biases the outputs are formed the same way, delta first. A weight
    that is a `DenseOnDemand` is materialised in the forward and again in the backward, never saved."""

    @staticmethod
    def forward(ctx, plan, n_adapters, ranks, has_outs, n_bases, dropout, x, *tensors):
        """tensors: every projection's A's (projection-major), then its B's, then either the `outs` to add into
        (has_outs) or the base layers' weights and then their biases (n_bases = P; a bias may be None).
        dropout: (seeds, stream) for one projection (P = 1), with the plan's probabilities, or None."""
        n_proj = len(ranks)
        n_leaves = n_proj * n_adapters
        flat_a, flat_b, rest = tensors[:n_leaves], tensors[n_leaves:2 * n_leaves], tensors[2 * n_leaves:]
        weights, biases = rest[:n_bases], rest[n_bases:]
        # Without biases the expand writes each output and the base GEMM adds into it (addmm_): the GEMM reads the
        # delta in its epilogue, hidden under its math, where an expand adding into the GEMM's output would read and
        # write every output element once more (~25 ms a step on 8B at 16k tokens).
        delta_first = n_bases and all(bias is None for bias in biases)
        if n_bases and not delta_first:
            outs = [F.linear(x, dense(weight), bias) for weight, bias in zip(weights, biases)]
        else:
            outs = rest if has_outs else [None] * n_proj
        lora_as = [flat_a[p * n_adapters:(p + 1) * n_adapters] for p in range(n_proj)]
        lora_bs = [flat_b[p * n_adapters:(p + 1) * n_adapters] for p in range(n_proj)]
        rank_cat = padded_rank([sum(ranks)])  # tl.arange needs a power of two: q/k/v at r=16 use 64 columns
        a_stacks = [_stack_a(lora_a, rank, x.dtype) for lora_a, rank in zip(lora_as, ranks)]
        a_stack = a_stacks[0] if n_proj == 1 else torch.cat(a_stacks, dim=1)
        if rank_cat != sum(ranks):
            a_stack = F.pad(a_stack, (0, 0, 0, rank_cat - sum(ranks)))
        b_stacks = [_stack_b(lora_b, rank, x.dtype) for lora_b, rank in zip(lora_bs, ranks)]
        # a_stack [n, R, d_in] read as W_j = A_jᵀ [d_in, R].
        h = _shrink(x, a_stack, (a_stack.stride(0), a_stack.stride(2), a_stack.stride(1)), rank_cat, plan, dropout)
        deltas, offset = [], 0
        for b_stack, rank, out in zip(b_stacks, ranks, outs):
            # b_stack [n, d_out, R] read as V_j = B_jᵀ [R, d_out].
            deltas.append(_expand(h[:, offset:offset + rank], b_stack,
                                  (b_stack.stride(0), b_stack.stride(2), b_stack.stride(1)), b_stack.shape[1],
                                  plan, plan.scales, out))
            offset += rank
        if delta_first:
            deltas = [delta.addmm_(x, dense(weight).t()) for delta, weight in zip(deltas, weights)]
        if has_outs:
            ctx.mark_dirty(*outs)
        # A weight materialised on demand is no tensor to save: it is kept as it is and materialised again for dX.
        ctx.save_for_backward(x, a_stack, h, *b_stacks, *[w for w in weights if isinstance(w, torch.Tensor)])
        ctx.on_demand = [None if isinstance(w, torch.Tensor) else w for w in weights]
        ctx.plan, ctx.ranks, ctx.has_outs, ctx.n_bases, ctx.dropout = plan, ranks, has_outs, n_bases, dropout
        ctx.leaf_shapes = [(t.shape[0] if i < n_leaves else t.shape[1], t.dtype) for i, t in enumerate(flat_a + flat_b)]
        # A `GradSinks` active in this thread (kernels/grad_sink.py): the backward, which on a GPU autograd runs in a
        # thread of its own, adds into the leaves' .grad
        ctx.sinks, ctx.leaves = grad_sink.current(), flat_a + flat_b
        return tuple(deltas)

    @staticmethod
    def backward(ctx, *grad_deltas):
        plan, ranks, n_bases = ctx.plan, ctx.ranks, ctx.n_bases
        n_proj = len(ranks)
        x, a_stack, h, *rest = ctx.saved_tensors
        b_stacks, saved_weights = rest[:n_proj], iter(rest[n_proj:])
        weights = [next(saved_weights) if on_demand is None else on_demand for on_demand in ctx.on_demand]
        n_adapters = a_stack.shape[0]
        rank_cat = a_stack.shape[1]
        # dH[t] = scale_j * dY[t] @ B_j and dB_jᵀ = scale_j * h[rows_j]ᵀ @ dY[rows_j] from one read of each dY; dH is
        # summed in fp32 over column blocks, so it starts at zero (padding columns and rows of no segment stay zero).
        grad_h32 = torch.zeros(x.shape[0], rank_cat, dtype=torch.float32, device=x.device)
        sink_tables = _sink_tables(ctx, n_adapters, rank_cat)
        b_tables = sink_tables[1] if sink_tables else [None] * n_proj
        grads_b_cat, offset = [], 0
        for grad_delta, b_stack, rank, b_table in zip(grad_deltas, b_stacks, ranks, b_tables):
            grads_b_cat.append(None if grad_delta is None else _grad_h_and_b(
                grad_delta, b_stack, h[:, offset:offset + rank], grad_h32[:, offset:offset + rank], n_adapters, plan,
                b_table))
            offset += rank
        grad_h = grad_h32.to(x.dtype)
        n_leaves = n_proj * n_adapters
        first_base = 7 + 2 * n_leaves  # index of the first base weight among forward's inputs
        grad_x = None
        if ctx.needs_input_grad[6]:
            # dX[t] = dH[t] @ A_j written by the expand, then the bases' sum_p dY_p W_p added by the GEMMs themselves.
            grad_x = _expand(grad_h, a_stack, (a_stack.stride(0), a_stack.stride(1), a_stack.stride(2)), x.shape[1],
                             plan, None, None, ctx.dropout)
            for grad_delta, weight in zip(grad_deltas, weights):
                if grad_delta is not None:
                    grad_x.addmm_(grad_delta, dense(weight))
        grad_weights = [grad_delta.t() @ x if ctx.needs_input_grad[first_base + p] and grad_delta is not None else None
                        for p, grad_delta in enumerate(grad_deltas[:n_bases])]
        grad_biases = [grad_delta.sum(0) if ctx.needs_input_grad[first_base + n_bases + p] and grad_delta is not None
                       else None for p, grad_delta in enumerate(grad_deltas[:n_bases])]
        leaf_grads = _leaf_grads(ctx, grad_h, x, grads_b_cat, sink_tables, n_adapters)
        grads_out = list(grad_deltas) if ctx.has_outs else []
        return (None, None, None, None, None, None, grad_x, *leaf_grads, *grads_out, *grad_weights, *grad_biases)


def _leaf_grads(ctx, grad_h: torch.Tensor, x: torch.Tensor, grads_b_cat: list, sink_tables, n_adapters: int) -> list:
    """What the backward returns for the adapters' leaves (every A, then every B): with `sink_tables` dA is added
    into the leaves' own .grad too (dB was, by `_grad_h_and_b`), and autograd gets none to add; else each leaf's
    slice of the stacked dA and dB."""
    ranks, plan = ctx.ranks, ctx.plan
    n_proj = len(ranks)
    n_leaves = n_proj * n_adapters
    needs_a = any(ctx.needs_input_grad[7:7 + n_leaves])
    if sink_tables:
        if needs_a:
            _weight_grad(grad_h, x, n_adapters, plan, ctx.dropout, sink_tables[0])
        return [None] * (2 * n_leaves)
    # Cast each stacked gradient once: one cast per adapter costs ~20 us of host time each.
    leaf_dtypes = {dtype for _, dtype in ctx.leaf_shapes}
    grad_dtype = leaf_dtypes.pop() if len(leaf_dtypes) == 1 else torch.float32
    grad_a_cat = _weight_grad(grad_h, x, n_adapters, plan, ctx.dropout).to(grad_dtype) if needs_a else None
    grads_a, grads_b, offset = [], [], 0
    for p, (grad_b, rank) in enumerate(zip(grads_b_cat, ranks)):
        a_shapes = ctx.leaf_shapes[p * n_adapters:(p + 1) * n_adapters]
        b_shapes = ctx.leaf_shapes[(n_proj + p) * n_adapters:(n_proj + p + 1) * n_adapters]
        if needs_a:
            grads_a += _per_adapter(grad_a_cat[:, offset:offset + rank], a_shapes, rank_dim=0)
        else:
            grads_a += [None] * n_adapters
        if grad_b is None:
            grads_b += [None] * n_adapters
        else:
            grads_b += _per_adapter(grad_b.to(grad_dtype), b_shapes, rank_dim=1)
        offset += rank
    return grads_a + grads_b


def _sink_tables(ctx, n_adapters: int, rank_cat: int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """With a `GradSinks` active at the forward: the table for the dA stack and each projection's for its dB stack,
    when every leaf that needs a gradient can take the kernels' adds into its .grad (kernels/grad_sink.py); else
    None."""
    sinks = ctx.sinks
    if sinks is None:
        return None
    ranks = ctx.ranks
    n_proj, n_leaves = len(ranks), len(ranks) * n_adapters
    leaves = [leaf if ctx.needs_input_grad[7 + i] else None for i, leaf in enumerate(ctx.leaves)]
    if all(leaf is None for leaf in leaves):
        return None
    a_leaves = [leaves[p * n_adapters:(p + 1) * n_adapters] for p in range(n_proj)]
    b_leaves = [leaves[n_leaves + p * n_adapters:n_leaves + (p + 1) * n_adapters] for p in range(n_proj)]
    offsets = tuple(itertools.accumulate(ranks, initial=0))[:-1]
    a_table = sinks.table(a_leaves, grad_sink.GradRows(offsets, rank_cat, transposed=False))
    b_tables = [sinks.table([b], grad_sink.GradRows((0,), rank, transposed=True)) for b, rank in zip(b_leaves, ranks)]
    if a_table is None or any(table is None for table in b_tables):
        return None
    return a_table, b_tables


def _per_adapter(stacked: torch.Tensor, shapes: list[tuple[int, torch.dtype]], rank_dim: int) -> list[torch.Tensor]:
    """Each adapter's gradient from the stacked [n, ...] one (the padded rank along `rank_dim` of each slice): the
    padding cut off and cast to the adapter's dtype. With every adapter at the padded rank and in the stack's dtype
    (the usual case) that is one `unbind`: a slice and a cast per adapter cost ~5 us of host time each, hundreds of
    times a step."""
    padded = stacked.shape[1 + rank_dim]
    if all(r == padded and dtype == stacked.dtype for r, dtype in shapes):
        return list(stacked.unbind(0))
    return [stacked[j].narrow(rank_dim, 0, r).to(dtype) for j, (r, dtype) in enumerate(shapes)]


def padded_rank(ranks: Sequence[int]) -> int:
    return max(16, 1 << max(1, max(ranks, default=1) - 1).bit_length())


# Stacking runs on every call, so adapters of one rank (the usual case) take one stack and at most one pad: padding
# each adapter separately cost ~1 ms of host time per call at 8 adapters.
def _stack_a(lora_a: Sequence[torch.Tensor], rank: int, dtype: torch.dtype) -> torch.Tensor:
    if len({a.shape[0] for a in lora_a}) == 1:
        stacked = torch.stack(lora_a).to(dtype)
        return stacked if stacked.shape[1] == rank else F.pad(stacked, (0, 0, 0, rank - stacked.shape[1]))
    return torch.stack([F.pad(a.to(dtype), (0, 0, 0, rank - a.shape[0])) for a in lora_a])


def _stack_b(lora_b: Sequence[torch.Tensor], rank: int, dtype: torch.dtype) -> torch.Tensor:
    if len({b.shape[1] for b in lora_b}) == 1:
        stacked = torch.stack(lora_b).to(dtype)
        return stacked if stacked.shape[2] == rank else F.pad(stacked, (0, rank - stacked.shape[2]))
    return torch.stack([F.pad(b.to(dtype), (0, rank - b.shape[1])) for b in lora_b])


def _check_dropout(dropout: LoraDropout | None, n_proj: int, segments, x: torch.Tensor):
    """(probabilities for the plan, (seeds, stream) for the kernels); raises ValueError for unusable dropout."""
    if dropout is None or not any(p > 0 for p in dropout.probs):
        return (), None
    if n_proj != 1:
        raise ValueError(f"dropout draws one mask per projection: pass one projection, not {n_proj}")
    if len(dropout.probs) != len(segments) or dropout.seeds.shape != (len(segments),):
        raise ValueError(f"dropout needs one probability and one seed per segment: {len(segments)} segments, "
                         f"{len(dropout.probs)} probabilities, seeds of shape {tuple(dropout.seeds.shape)}")
    if not all(0.0 <= p < 1.0 for p in dropout.probs):
        raise ValueError(f"dropout probabilities must be in [0, 1), got {list(dropout.probs)}")
    if dropout.seeds.dtype != torch.int64 or dropout.seeds.device != x.device:
        raise ValueError(f"dropout seeds must be int64 on {x.device}, "
                         f"got {dropout.seeds.dtype} on {dropout.seeds.device}")
    return tuple(float(p) for p in dropout.probs), (dropout.seeds, int(dropout.stream))


def lora_delta_triton(x, segments, lora_a, lora_b, scales, out=None, dropout=None):
    """`lora_delta_reference` on the Triton kernels; with `out`, the delta is added into `out` in place and `out` is
    returned (the base layer's output, say). dropout: a `LoraDropout` applied to x on the adapters' side."""
    outs = None if out is None else [out]
    return lora_delta_multi_triton(x, segments, [lora_a], [lora_b], scales, outs=outs, dropout=dropout)[0]


def lora_delta_multi_triton(x, segments, lora_as, lora_bs, scales, outs=None, dropout=None):
    """Deltas of several projections that share the input x, reading x once.

    lora_as[p][j] / lora_bs[p][j]: adapter j's A [r_pj, d_in] and B [d_out_p, r_pj] of projection p (e.g. p = q, k, v);
    scales[j]: adapter j's scale, the same for every projection. outs: optional list, one tensor per projection, into
    which each delta is added in place. Returns one [T, d_out_p] tensor per projection.
    """
    for lora_a, lora_b in zip(lora_as, lora_bs, strict=True):
        check_lora_inputs(x, segments, lora_a, lora_b, scales)
    segments = tuple((int(s), int(e)) for s, e in segments)
    if not segments:
        deltas = [x.new_zeros(x.shape[0], 0) for _ in lora_as]
        return deltas if outs is None else list(outs)
    probs, dropout = _check_dropout(dropout, len(lora_as), segments, x)
    ranks = [padded_rank([a.shape[0] for a in lora_a]) for lora_a in lora_as]
    plan = _plan(segments, tuple(float(s) for s in scales), x.shape[0], x.device, padded_rank([sum(ranks)]), probs)
    flat = [a for lora_a in lora_as for a in lora_a] + [b for lora_b in lora_bs for b in lora_b]
    return list(_SegmentedLora.apply(plan, len(segments), ranks, outs is not None, 0, dropout, x, *flat,
                                     *(outs or [])))


def lora_linear_triton(x, weight, bias, segments, lora_a, lora_b, scales, dropout=None):
    """A whole multi-LoRA layer, y = x Wᵀ + bias + lora_delta(dropout(x), ...), as one autograd node: the delta and the
    base output share one tensor, and so do the LoRA dX and the base dX (W may be frozen; its gradient is computed only
    when it requires one)."""
    return lora_linear_multi_triton(x, [weight], [bias], segments, [lora_a], [lora_b], scales, dropout=dropout)[0]


def lora_linear_multi_triton(x, weights, biases, segments, lora_as, lora_bs, scales, dropout=None):
    """Several such layers that read the same x (q/k/v, gate/up) as one autograd node: one shrink reads x for every
    projection's adapters, and the input gradient is one tensor that the base GEMMs accumulate into (addmm) and the
    LoRA dX is added into in place. weights[p] [d_out_p, d_in] (a tensor or a `DenseOnDemand`), biases[p] [d_out_p] or
    None; returns the P outputs."""
    for weight, lora_a, lora_b in zip(weights, lora_as, lora_bs, strict=True):
        check_lora_inputs(x, segments, lora_a, lora_b, scales)
        if tuple(weight.shape) != (lora_b[0].shape[0] if lora_b else weight.shape[0], x.shape[1]):
            raise ValueError(f"weight must be [d_out, {x.shape[1]}] matching lora_b, got {tuple(weight.shape)}")
    if len(biases) != len(weights):
        raise ValueError(f"{len(weights)} weights but {len(biases)} biases (use None for a layer without one)")
    segments = tuple((int(s), int(e)) for s, e in segments)
    if not segments:
        return [F.linear(x, dense(weight), bias) for weight, bias in zip(weights, biases)]
    probs, dropout = _check_dropout(dropout, len(weights), segments, x)
    ranks = [padded_rank([a.shape[0] for a in lora_a]) for lora_a in lora_as]
    plan = _plan(segments, tuple(float(s) for s in scales), x.shape[0], x.device, padded_rank([sum(ranks)]), probs)
    flat = [a for lora_a in lora_as for a in lora_a] + [b for lora_b in lora_bs for b in lora_b]
    return list(_SegmentedLora.apply(plan, len(segments), ranks, False, len(weights), dropout, x, *flat, *weights,
                                     *biases))
