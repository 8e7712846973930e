"""PyTorch reference for segmented multi-adapter LoRA: the definition every kernel is checked against."""

from __future__ import annotations

from typing import Sequence

import torch


def lora_delta_reference(
    x: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """Return `delta` of shape [T, d_out] with `delta[s:e] = scale * x[s:e] @ A.T @ B.T` for each segment.

    x: [T, d_in]; segments: disjoint (start, end) row ranges, one per adapter; lora_a[j]: [r_j, d_in];
    lora_b[j]: [d_out, r_j]. Rows outside every segment get zeros.
    """
    d_out = lora_b[0].shape[0] if lora_b else 0
    if not lora_b:
        return x.new_zeros(x.shape[0], d_out)
    # One split of x into the segments and the gaps between them: slicing x per segment would give each slice a
    # full-size zero gradient in the backward, a cost that grows with the square of the number of segments.
    ordered = sorted(zip(segments, lora_a, lora_b, scales), key=lambda item: item[0][0])
    bounds, cursor = [], 0
    for (start, end), *_ in ordered:
        bounds += [start - cursor, end - start]
        cursor = end
    bounds.append(x.shape[0] - cursor)
    parts = x.split(bounds)
    pieces = []
    for i, (_, a, b, scale) in enumerate(ordered):
        gap, rows = parts[2 * i], parts[2 * i + 1]
        pieces += [x.new_zeros(gap.shape[0], d_out), (rows @ a.t()) @ b.t() * scale]
    pieces.append(x.new_zeros(parts[-1].shape[0], d_out))
    return torch.cat(pieces, dim=0)


def check_lora_inputs(x, segments, lora_a, lora_b, scales) -> None:
    """Raise ValueError naming the problem when the arguments break the `lora_delta` contract."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d_in], got shape {tuple(x.shape)}")
    n = len(segments)
    if not (len(lora_a) == len(lora_b) == len(scales) == n):
        raise ValueError(f"need one A, B and scale per segment: {n} segments, {len(lora_a)} A, {len(lora_b)} B, "
                         f"{len(scales)} scales")
    n_rows, d_in = x.shape
    d_out = lora_b[0].shape[0] if n else 0
    cursor_segments = sorted((int(s), int(e)) for s, e in segments)
    for (start, end), (next_start, _) in zip(cursor_segments, cursor_segments[1:]):
        if end > next_start:
            raise ValueError(f"segments overlap: ({start}, {end}) and one starting at {next_start}")
    for j, ((start, end), a, b) in enumerate(zip(segments, lora_a, lora_b)):
        if not 0 <= start <= end <= n_rows:
            raise ValueError(f"segment {j} = ({start}, {end}) is not a row range inside x with {n_rows} rows")
        if a.dim() != 2 or a.shape[1] != d_in:
            raise ValueError(f"lora_a[{j}] must be [r, {d_in}], got {tuple(a.shape)}")
        if b.dim() != 2 or b.shape != (d_out, a.shape[0]):
            raise ValueError(f"lora_b[{j}] must be [{d_out}, {a.shape[0]}] (d_out of lora_b[0], rank of lora_a[{j}]), "
                             f"got {tuple(b.shape)}")
