"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") on the rows of its jobs, as PEFT computes it.

A DoRA job's layer is W' = m * (W + s·BA) / ||W + s·BA||_row: a trained magnitude m per output feature times the
direction of the LoRA-updated weight. PEFT (and the paper, section 4.3) treats the norm as a constant in the backward,
and adds to the base output y = W x + bias

    (g - 1) * W x' + g * s * B A x'          g = m / ||W + s·BA||_row (detached), x' the job's dropped input

which is W' x' + bias when there is no dropout. The norm needs the whole d_out x d_in weight of the layer once per
forward, so this runs in PyTorch (the reference path) on the DoRA jobs' rows only; the other jobs of the cohort keep
the kernels. Without dropout W x' is y - bias, read from the base output already computed; with dropout it costs one
more matmul over the job's rows.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from lorafleet.kernels import LoraDropout
from lorafleet.kernels.reference import dropout_reference


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W||_row: the L2 norm of each output feature's weights (PEFT's `get_weight_norm`), W as [d_out, d_in]."""
    return torch.linalg.norm(weight, dim=1)


def dora_extra(
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    segments: Sequence[tuple[int, int]],
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    scales: Sequence[float],
    dropout: LoraDropout | None,
) -> torch.Tensor:
    """What DoRA jobs add to y [T, d_out] (the base output, bias included) on their rows; zeros elsewhere.

    x: [T, d_in]; weight: the base's [d_out, d_in]; factors[j]: job j's (A [r, d_in], B [d_out, r], m [d_out]);
    dropout: the jobs' `LoraDropout` (in the order of `segments`), None when none drops.
    """
    ordered = sorted(range(len(segments)), key=lambda j: segments[j][0])
    bounds, cursor = [], 0
    for j in ordered:
        start, end = segments[j]
        bounds += [start - cursor, end - start]
        cursor = end
    bounds.append(x.shape[0] - cursor)
    # One split of x and y, as in `lora_delta_reference`: a slice per job would give each a full-size zero gradient.
    x_parts, y_parts = x.split(bounds), y.split(bounds)
    pieces = []
    for i, j in enumerate(ordered):
        pieces.append(y.new_zeros(x_parts[2 * i].shape[0], y.shape[1]))
        p = dropout.probs[j] if dropout is not None else 0.0
        rows = x_parts[2 * i + 1]
        if p > 0:
            rows = dropout_reference(rows, [(0, rows.shape[0])], LoraDropout((p,), dropout.seeds[j:j + 1], dropout.stream))
            base = F.linear(rows, weight)
        else:
            # its own rows, not a view: saved for the backward, a view would keep the whole cohort's y alive
            base = y_parts[2 * i + 1].clone() if bias is None else y_parts[2 * i + 1] - bias
        pieces.append(_job_extra(rows, base, weight, *factors[j], scales[j]).to(y.dtype))
    pieces.append(y.new_zeros(x_parts[-1].shape[0], y.shape[1]))
    return torch.cat(pieces)


def _job_extra(x, base, weight, lora_a, lora_b, magnitude, scale) -> torch.Tensor:
    """(g - 1) * base + g * s * B A x for one job's rows, in PEFT's order of operations."""
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    with torch.no_grad():  # detached, as PEFT does: the norm is a constant of the backward
        norm = row_norms(weight + scale * (lora_b @ lora_a))
    g = magnitude / norm
    return (g - 1) * base + g * ((x @ lora_a.t()) @ lora_b.t()) * scale
