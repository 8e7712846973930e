"""PyTorch reference for segmented multi-adapter LoRA: the definition every kernel is checked against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class LoraDropout:
    """Inverted dropout on the adapters' input, one mask per adapter (rows of its segment) and projection.

    probs[j]: adapter j's dropout probability; seeds[j]: its seed, an int64 tensor on x's device (a fresh seed per step
    is then drawn on the device without a host sync); stream: the projection, so the same seeds give each projection
    its own mask. Row t of segment j = (start_j, end_j), column c is kept when
    hash32(seeds[j] + stream, (t - start_j) * d_in + c) >= threshold(p_j) (see `dropout_keep_reference`), and kept
    values are scaled by 1 / (1 - p_j), as `torch.nn.Dropout` does: the mask depends on the job's own seed and rows
    only, not on where the cohort packed them.
    """

    probs: tuple[float, ...]
    seeds: torch.Tensor
    stream: int


def dropout_threshold(p: float) -> int:
    """A 32-bit hash value at or above this is kept: probability 1 - p."""
    return min(round(p * 2**32), _M32)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # MurmurHash3's finalizer on uint32 values held in int64 (products wrap; only the low 32 bits are kept).
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def dropout_keep_reference(seed: int, n_rows: int, n_cols: int, p: float) -> torch.Tensor:
    """The kernels' keep mask [n_rows, n_cols] (bool) for one adapter's rows, seed = seeds[j] + stream."""
    seed %= 2**64
    key_lo = _fmix32(torch.tensor(seed & _M32))
    key_hi = _fmix32(torch.tensor((seed >> 32) ^ 0x9E3779B9))
    index = torch.arange(n_rows * n_cols, dtype=torch.int64).reshape(n_rows, n_cols)
    hashed = _fmix32(_fmix32((index & _M32) ^ key_lo) ^ (index >> 32) ^ key_hi)
    return hashed >= dropout_threshold(p)


def dropout_reference(x: torch.Tensor, segments: Sequence[tuple[int, int]], dropout: LoraDropout) -> torch.Tensor:
    """x with each segment's rows dropped as the kernels drop them (rows outside every segment unchanged)."""
    out = x.clone()
    for (start, end), p, seed in zip(segments, dropout.probs, dropout.seeds.tolist()):
        if p > 0 and end > start:
            keep = dropout_keep_reference(seed + dropout.stream, end - start, x.shape[1], p).to(x.device)
            out[start:end] = x[start:end] * keep / (1.0 - p)
    return out


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


def pooled_lora_delta_reference(
    x: torch.Tensor,
    pool: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    offsets: Sequence[tuple[int, int, int]],
    scales: Sequence[float],
    d_out: int,
) -> torch.Tensor:
    """`lora_delta_reference` with each adapter's factors read from one flat buffer instead of passed one by one.

    pool: 1-D; offsets[j] = (a_j, b_j, r_j): A_j = pool[a_j : a_j + r_j d_in] viewed [r_j, d_in] and
    B_j = pool[b_j : b_j + d_out r_j] viewed [d_out, r_j] (row-major, as `UnifiedPool.place_adapter` lays factors
    out). r_j = 0: adapter j does not target this layer, its rows get no delta. Returns `delta` [T, d_out] with
    `delta[s:e] = scale_j * x[s:e] @ A_jᵀ @ B_jᵀ` for segment j = (s, e); rows outside every segment get zeros.
    """
    d_in = x.shape[1]
    delta = x.new_zeros(x.shape[0], d_out)
    for (start, end), (a_at, b_at, rank), scale in zip(segments, offsets, scales):
        if rank and end > start:
            a = pool[a_at:a_at + rank * d_in].view(rank, d_in).to(x.dtype)
            b = pool[b_at:b_at + d_out * rank].view(d_out, rank).to(x.dtype)
            # the same expression as lora_delta_reference's, so that a loaded adapter's tokens do not depend on
            # which of the two read its factors
            delta[start:end] = (x[start:end] @ a.t()) @ b.t() * scale
    return delta


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


# Elementwise parts of the frozen Llama layer, with Hugging Face's formulas (LlamaRMSNorm, LlamaMLP's
# act_fn(gate) * up, apply_rotary_pos_emb); the fused kernels in elementwise.py are checked against these.

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROTARY_MAX_HEAD_DIM = 256


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in fp32, round to x's dtype, then multiply by the weight in x's dtype."""
    x_fp32 = x.float()
    normalised = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normalised.to(x.dtype)


def add_rms_norm_reference(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder's residual add and the RMSNorm after it: (residual + delta, LlamaRMSNorm of that sum), the sum in
    the inputs' dtype as Hugging Face's `residual + hidden_states` forms it."""
    total = residual + delta
    return total, rms_norm_reference(total, weight, eps)


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, D] broadcast over the heads (Hugging Face hands them over already in x's dtype)."""
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def check_rms_norm_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rms_norm: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight must be [d] for x [..., d], got weight {tuple(weight.shape)} "
                         f"and x {tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if weight.requires_grad:
        raise ValueError("rms_norm: weight must be frozen (requires_grad=False): only the gradient w.r.t. x is "
                         "computed, the base model's norm weights are not trained")
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be positive, got {eps}")


def check_add_rms_norm_inputs(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if residual.shape != delta.shape or residual.dtype != delta.dtype:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} and delta "
                         f"{tuple(delta.shape)} {delta.dtype} differ in shape or dtype")
    check_rms_norm_inputs(residual, weight, eps)


def check_silu_mul_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    if gate.dtype != up.dtype or gate.dtype not in FLOAT_DTYPES:
        raise ValueError(f"silu_mul: gate and up must share one of float32/bfloat16/float16, got {gate.dtype} "
                         f"and {up.dtype}")


def check_rotary_inputs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"rotary: x must be [T, H, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rotary: x must be float32, bfloat16 or float16, got {x.dtype}")
    n_tokens, _, head_dim = x.shape
    if head_dim < 2 or head_dim > ROTARY_MAX_HEAD_DIM or head_dim & (head_dim - 1):
        raise ValueError(f"rotary: head dim D = {head_dim} must be a power of two from 2 to {ROTARY_MAX_HEAD_DIM}")
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (n_tokens, head_dim):
            raise ValueError(f"rotary: {name} must be [T, D] = [{n_tokens}, {head_dim}] for x {tuple(x.shape)}, "
                             f"got {tuple(table.shape)}")
        if not table.is_floating_point():
            raise ValueError(f"rotary: {name} must be a float tensor, got {table.dtype}")
        if table.requires_grad:
            raise ValueError(f"rotary: {name} must not require grad (only the gradient w.r.t. x is computed)")


def cross_entropy_rows_reference(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                                 write_grad: bool) -> torch.Tensor:
    """Per-row cross-entropy of logits [R, V] against targets [R] in fp32 (`F.cross_entropy(logits.float())`), 0 where
    the target is `ignore_index`. With `write_grad`, logits is overwritten in place with the loss's gradient w.r.t.
    it, softmax - onehot (0 on ignored rows), rounded to logits' dtype once."""
    check_cross_entropy_inputs(logits, targets)
    upcast = logits.float()
    lse = upcast.logsumexp(-1)
    valid = targets != ignore_index
    index = targets.clamp(min=0)[:, None]
    losses = torch.where(valid, lse - upcast.gather(1, index).squeeze(1), 0.0)
    if write_grad:
        probs = upcast.sub_(lse[:, None]).exp_()  # in place: on the upcast copy, or on fp32 logits overwritten anyway
        # minus the one-hot of each valid row's target, without a host sync (no boolean indexing)
        probs.scatter_add_(1, index, -valid.to(probs.dtype)[:, None])
        probs *= valid[:, None]
        logits.copy_(probs)
    return losses


def check_cross_entropy_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [rows, vocab] with contiguous rows, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 [{logits.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
