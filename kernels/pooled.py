"""Multi-adapter LoRA read straight from a page pool (S-LoRA's MBGMV): the table of where each adapter lies.

Generation keeps the loaded adapters' factors in one preallocated buffer (executor/kv_pool.py's `UnifiedPool`), each
factor a row-major run of elements. `lora_delta` takes one tensor per adapter and stacks them on every call, which
at hundreds of adapters costs far more host time than the math. Here a forward's adapters are described instead by
one table for every layer at once: per layer and segment (row range of one adapter) where its A and its B start in
the buffer and its rank. `pooled_lora_table` builds it on the host once per forward, checks it, and copies it to the
device in one transfer; each layer's `pooled_lora_delta` (kernels/__init__.py) then reads its own slice of it.
Forward only: generation needs no gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lorafleet.kernels.reference import lora_delta_reference

# Rows of one kernel program: tl.dot needs at least 16. A decode step has one row per request, so most tiles hold
# one row of 16; longer segments (prefill) are cut into tiles of this many rows.
TILE_ROWS = 16


@dataclass(frozen=True)
class PooledLoraTable:
    """Where one forward's adapters lie in the pool, for every layer (contract: `pooled_lora_delta_reference`)."""

    segments: tuple[tuple[int, int], ...]  # row range of each adapter
    rows_needed: int  # the end of the last segment: x has at least this many rows
    scales: tuple[float, ...]
    layer_dims: tuple[tuple[int, int], ...]  # (d_in, d_out) of each layer
    offsets: torch.Tensor  # int64 [layers, segments, 3] on the device: A's first element, B's first element, rank
    tiles: torch.Tensor  # int64 [tiles, 3] on the device: segment, first row, end row (at most TILE_ROWS rows)
    scale_values: torch.Tensor  # float64 [segments] on the device
    # the kernels' padded rank R: a power of two (tl.arange), at least 16 (tl.dot) and at least every rank of the
    # table, as segmented.padded_rank pads (not imported: this module works without Triton)
    rank: int


def pooled_lora_table(segments: Sequence[tuple[int, int]], scales: Sequence[float], offsets: torch.Tensor,
                      layer_dims: Sequence[tuple[int, int]], pool_elements: int,
                      device: torch.device) -> PooledLoraTable:
    """The table of one forward from host data: offsets int64 [layers, segments, 3] as in `PooledLoraTable` (rank 0
    where an adapter does not target a layer). Raises ValueError naming the first entry outside the pool or a bad
    segment; the kernels themselves check nothing on the device (a check there would wait for the GPU)."""
    segments = tuple((int(start), int(end)) for start, end in segments)
    layer_dims = tuple((int(d_in), int(d_out)) for d_in, d_out in layer_dims)
    _check_table(segments, scales, offsets, layer_dims, pool_elements)
    tiles = [(j, row, min(row + TILE_ROWS, end)) for j, (start, end) in enumerate(segments)
             for row in range(start, end, TILE_ROWS)]
    # One host tensor holds the tiles, the offsets and the scales (float64 bits), so one copy moves all of them.
    n_tiles, n_offsets = len(tiles), offsets.numel()
    packed = torch.empty(n_tiles * 3 + n_offsets + len(segments), dtype=torch.int64)
    packed[:n_tiles * 3] = torch.tensor(tiles, dtype=torch.int64).view(-1)
    packed[n_tiles * 3:n_tiles * 3 + n_offsets] = offsets.reshape(-1)
    packed[n_tiles * 3 + n_offsets:].view(torch.float64)[:] = torch.tensor(scales, dtype=torch.float64)
    on_device = packed.to(device)
    largest_rank = int(offsets[..., 2].max()) if n_offsets else 0
    return PooledLoraTable(
        segments=segments,
        rows_needed=max((end for _, end in segments), default=0),
        scales=tuple(float(scale) for scale in scales),
        layer_dims=layer_dims,
        offsets=on_device[n_tiles * 3:n_tiles * 3 + n_offsets].view(offsets.shape),
        tiles=on_device[:n_tiles * 3].view(n_tiles, 3),
        scale_values=on_device[n_tiles * 3 + n_offsets:].view(torch.float64),
        rank=max(16, 1 << max(0, largest_rank - 1).bit_length()),
    )


def _check_table(segments, scales, offsets: torch.Tensor, layer_dims, pool_elements: int) -> None:
    n = len(segments)
    if len(scales) != n:
        raise ValueError(f"need one scale per segment: {n} segments, {len(scales)} scales")
    if offsets.dtype != torch.int64 or offsets.device.type != "cpu" or offsets.shape != (len(layer_dims), n, 3):
        raise ValueError(f"offsets must be int64 [layers, segments, 3] = [{len(layer_dims)}, {n}, 3] on the host, "
                         f"got {offsets.dtype} {tuple(offsets.shape)} on {offsets.device}")
    ordered = sorted(segments)
    for (start, end), (next_start, _) in zip(ordered, ordered[1:]):
        if end > next_start:
            raise ValueError(f"segments overlap: ({start}, {end}) and one starting at {next_start}")
    for j, (start, end) in enumerate(segments):
        if not 0 <= start <= end:
            raise ValueError(f"segment {j} = ({start}, {end}) is not a row range")
    # Vectorised: a decode step at 512 adapters has ~10^5 entries, too many for a Python loop each step.
    a_at, b_at, rank = offsets.unbind(-1)
    d_in, d_out = (torch.tensor([dims[i] for dims in layer_dims], dtype=torch.int64)[:, None] for i in (0, 1))
    outside = (rank < 0) | ((rank > 0) & ((a_at < 0) | (b_at < 0) | (a_at + rank * d_in > pool_elements)
                                          | (b_at + d_out * rank > pool_elements)))
    if outside.any():
        layer, j = outside.nonzero()[0].tolist()
        a, b, r = offsets[layer, j].tolist()
        raise ValueError(f"layer {layer}, segment {j}: A at {a} and B at {b} of rank {r} ([{r}, {layer_dims[layer][0]}]"
                         f" and [{layer_dims[layer][1]}, {r}]) do not lie inside the pool's {pool_elements} elements")


def check_pooled_inputs(x: torch.Tensor, pool: torch.Tensor, table: PooledLoraTable, layer: int,
                        out: torch.Tensor) -> None:
    """Raise ValueError naming the problem when one layer's call does not fit its table."""
    if not 0 <= layer < len(table.layer_dims):
        raise ValueError(f"layer {layer} is not in the table's {len(table.layer_dims)} layers")
    d_in, d_out = table.layer_dims[layer]
    n_rows = x.shape[0] if x.dim() == 2 else -1
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"x must be [T, {d_in}] for layer {layer}, got shape {tuple(x.shape)}")
    if out.shape != (n_rows, d_out) or out.dtype != x.dtype:
        raise ValueError(f"out must be {x.dtype} [{n_rows}, {d_out}], got {out.dtype} {tuple(out.shape)}")
    if pool.dim() != 1 or not pool.is_contiguous() or pool.device != x.device:
        raise ValueError(f"pool must be a flat contiguous tensor on {x.device}, got {tuple(pool.shape)} on "
                         f"{pool.device}")
    if table.rows_needed > n_rows:
        outside = next((start, end) for start, end in table.segments if end > n_rows)
        raise ValueError(f"segment {outside} is not a row range inside x with {n_rows} rows")


def pooled_lora_delta_torch(x: torch.Tensor, pool: torch.Tensor, table: PooledLoraTable, layer: int,
                            out: torch.Tensor) -> torch.Tensor:
    """The path without Triton (CPU): `lora_delta_reference` on views of the factors made from the offsets, added
    into `out`: the same products as `pooled_lora_delta_reference`'s loop, bitwise, with one split of x for all the
    segments (on the CPU each op per segment costs microseconds, thousands of times a step)."""
    d_in, d_out = table.layer_dims[layer]
    segments, lora_a, lora_b, scales = [], [], [], []
    for segment, (a_at, b_at, rank), scale in zip(table.segments, table.offsets[layer].tolist(), table.scales):
        if rank:  # one strided view per factor: the fewest ops, hundreds of segments per layer on the host
            segments.append(segment)
            lora_a.append(pool.as_strided((rank, d_in), (d_in, 1), a_at))
            lora_b.append(pool.as_strided((d_out, rank), (rank, 1), b_at))
            scales.append(scale)
    if not segments:
        return out
    if pool.dtype != x.dtype:
        lora_a, lora_b = [a.to(x.dtype) for a in lora_a], [b.to(x.dtype) for b in lora_b]
    return out.add_(lora_delta_reference(x, segments, lora_a, lora_b, scales))
