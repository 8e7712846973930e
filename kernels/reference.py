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
    pieces = []
    cursor = 0
    for (start, end), a, b, scale in sorted(zip(segments, lora_a, lora_b, scales), key=lambda item: item[0][0]):
        if start > cursor:
            pieces.append(x.new_zeros(start - cursor, d_out))
        pieces.append((x[start:end] @ a.t()) @ b.t() * scale)
        cursor = end
    if cursor < x.shape[0]:
        pieces.append(x.new_zeros(x.shape[0] - cursor, d_out))
    return torch.cat(pieces, dim=0) if pieces else x.new_zeros(x.shape[0], d_out)
