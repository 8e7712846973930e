"""Fused Triton kernels for the elementwise work of a frozen Llama layer: RMSNorm, SiLU(gate)·up and rotary.

Each op is one kernel forward and one backward (an autograd Function), fp32 math inside and one rounding to the input
dtype at the end (RMSNorm: two, where Hugging Face rounds), where eager PyTorch runs several kernels with a [T, d]
intermediate each. Semantics: the references in
reference.py (Hugging Face's formulas); gradients only w.r.t. the activations, the base's weights being frozen.

- `rms_norm`: one program per row, the whole row in registers (d ≤ 65536). Saves x and rstd (fp32 [rows]).
- `add_rms_norm`: the same kernels with the decoder's residual add folded in: forward reads residual and delta and
  writes their sum beside the normalised row; backward adds the sum's own gradient (the skip path's) to the norm's.
  Saves the sum and rstd. Against an add and then a norm: one [T, d] pass fewer forward (the norm re-reading the
  sum) and two fewer backward (autograd's gradient add, less its one read of the sum's gradient), and two kernels.
- `silu_mul`: programs over (row, column block); saves gate and up, the backward recomputes sigmoid(gate).
- `rotary`: one program per (token, block of heads) reads the token's cos/sin row once for all its heads. x may be a
  strided view (e.g. a q projection [T, H*D] viewed as [T, H, D]); the output is contiguous.

Like triton_lora.py, the kernels call only Triton builtins (tl.exp, tl.rsqrt, tl.reduce with a combine function of
this module), never jitted library helpers such as tl.sum or tl.sigmoid: the tests re-import this module under the
interpreter after triton was imported in compiled mode, and those helpers would stay compiled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorafleet.kernels.reference import (
    check_add_rms_norm_inputs,
    check_rms_norm_inputs,
    check_rotary_inputs,
    check_silu_mul_inputs,
)

RMS_NORM_MAX_DIM = 65536
SILU_MUL_BLOCK = 1024


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, delta_ptr, w_ptr, sum_ptr, y_ptr, rstd_ptr, d, eps, stride_x, stride_delta, stride_y,
                         BLOCK_D: tl.constexpr, ADD: tl.constexpr):
    # ADD: the row normalised is x + delta, rounded to the dtype and stored to sum_ptr (the residual stream's next
    # value) as Hugging Face's `residual + hidden_states` rounds it; sum_ptr shares y's strides.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(delta_ptr + row * stride_delta + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_y + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / d + eps)
    # Hugging Face rounds the normalised value to x's dtype before the weight multiplies it.
    normalised = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (weight * normalised).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dsum_ptr, dx_ptr, d, stride_dy, stride_x, stride_dsum,
                         stride_dx, BLOCK_D: tl.constexpr, ADD: tl.constexpr):
    # dx = rstd * (g - xhat * mean(g * xhat)), g = dy * weight, xhat = x * rstd; ADD: plus dsum, the gradient the
    # residual stream's sum x receives past the norm, summed in fp32 and rounded once.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    weight = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + row)
    g = dy * weight
    xhat = x * rstd
    mean_g_xhat = tl.reduce(g * xhat, 0, _add) / d
    dx = rstd * (g - xhat * mean_g_xhat)
    if ADD:
        dx = dx + tl.load(dsum_ptr + row * stride_dsum + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_fwd_kernel(gate_ptr, up_ptr, y_ptr, d, stride_gate, stride_up, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(y_ptr + row * stride_y + cols, (silu * up).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, d,
                         stride_dy, stride_gate, stride_up, stride_dgate, stride_dup, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sigmoid
    # d silu / d gate = sigmoid * (1 + gate * (1 - sigmoid))
    dgate = dy * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(dgate_ptr + row * stride_dgate + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + row * stride_dup + cols, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads,
                   stride_xt, stride_xh, stride_xd, stride_ct, stride_st, stride_yt, stride_yh,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr):
    # Forward: y = x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]:
    #   y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2.
    # Backward (its transpose): dx = dy * cos + [v2, -v1] with v = dy * sin:
    #   dx1 = dy1 c1 + dy2 s2,  dx2 = dy2 c2 - dy1 s1.
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads[:, None] < n_heads
    heads = heads.to(tl.int64)
    first = tl.arange(0, HALF)
    second = HALF + first
    c1 = tl.load(cos_ptr + token * stride_ct + first).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + token * stride_ct + second).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + token * stride_st + first).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + token * stride_st + second).to(tl.float32)[None, :]
    x_row = x_ptr + token * stride_xt + heads[:, None] * stride_xh
    x1 = tl.load(x_row + first[None, :] * stride_xd, mask=head_mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + second[None, :] * stride_xd, mask=head_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_row = y_ptr + token * stride_yt + heads[:, None] * stride_yh
    tl.store(y_row + first[None, :], y1.to(y_ptr.dtype.element_ty), mask=head_mask)
    tl.store(y_row + second[None, :], y2.to(y_ptr.dtype.element_ty), mask=head_mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, d] with a unit last stride (a view where possible) so kernels index it by one row stride."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _row_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _normalise(x_rows, delta_rows, weight, eps):
    """(sum or None, y, rstd) of rows x (+ delta_rows when given)."""
    n_rows, d = x_rows.shape
    y = torch.empty(n_rows, d, device=x_rows.device, dtype=x_rows.dtype)
    total = torch.empty_like(y) if delta_rows is not None else None
    rstd = torch.empty(n_rows, device=x_rows.device, dtype=torch.float32)
    block = triton.next_power_of_2(d)
    add = delta_rows is not None
    _rms_norm_fwd_kernel[(n_rows,)](
        x_rows, delta_rows if add else x_rows, weight, total if add else y, y, rstd, d, eps,
        x_rows.stride(0), delta_rows.stride(0) if add else 0, y.stride(0),
        BLOCK_D=block, ADD=add, num_warps=_row_warps(block))
    return total, y, rstd


def _normalise_backward(dy, x_rows, weight, rstd, dsum):
    """dx of rows x_rows (+ dsum, the gradient x receives besides the norm's, when given) for the norm's dy."""
    n_rows, d = x_rows.shape
    dy_rows = _rows(dy)
    dsum_rows = _rows(dsum) if dsum is not None else None
    dx = torch.empty(n_rows, d, device=dy.device, dtype=x_rows.dtype)
    block = triton.next_power_of_2(d)
    add = dsum_rows is not None
    _rms_norm_bwd_kernel[(n_rows,)](
        dy_rows, x_rows, weight, rstd, dsum_rows if add else dy_rows, dx, d,
        dy_rows.stride(0), x_rows.stride(0), dsum_rows.stride(0) if add else 0, dx.stride(0),
        BLOCK_D=block, ADD=add, num_warps=_row_warps(block))
    return dx


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x_rows = _rows(x)
        _, y, rstd = _normalise(x_rows, None, weight, eps)
        ctx.save_for_backward(x_rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_rows, weight, rstd = ctx.saved_tensors
        return _normalise_backward(dy, x_rows, weight, rstd, None).view(dy.shape), None, None


class _AddRmsNorm(torch.autograd.Function):
    """(residual + delta, its RMSNorm) in one pass; the backward adds the sum's own gradient into the norm's."""

    @staticmethod
    def forward(ctx, residual, delta, weight, eps):
        total, y, rstd = _normalise(_rows(residual), _rows(delta), weight, eps)
        ctx.save_for_backward(total, weight, rstd)
        ctx.set_materialize_grads(False)  # the last norm's sum has no gradient: None, not a tensor of zeros
        return total.view(residual.shape), y.view(residual.shape)

    @staticmethod
    def backward(ctx, dsum, dy):
        total, weight, rstd = ctx.saved_tensors
        if dy is None:
            return dsum, dsum, None, None
        dx = _normalise_backward(dy, total, weight, rstd, dsum).view(dy.shape)
        return dx, dx, None, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate_rows, up_rows = _rows(gate), _rows(up)
        n_rows, d = gate_rows.shape
        y = torch.empty(n_rows, d, device=gate.device, dtype=gate.dtype)
        _silu_mul_fwd_kernel[(n_rows, triton.cdiv(d, SILU_MUL_BLOCK))](
            gate_rows, up_rows, y, d, gate_rows.stride(0), up_rows.stride(0), y.stride(0),
            BLOCK=SILU_MUL_BLOCK, num_warps=4)
        ctx.save_for_backward(gate_rows, up_rows)
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        gate_rows, up_rows = ctx.saved_tensors
        n_rows, d = gate_rows.shape
        dy_rows = _rows(dy)
        dgate = torch.empty(n_rows, d, device=dy.device, dtype=gate_rows.dtype)
        dup = torch.empty_like(dgate)
        _silu_mul_bwd_kernel[(n_rows, triton.cdiv(d, SILU_MUL_BLOCK))](
            dy_rows, gate_rows, up_rows, dgate, dup, d,
            dy_rows.stride(0), gate_rows.stride(0), up_rows.stride(0), dgate.stride(0), dup.stride(0),
            BLOCK=SILU_MUL_BLOCK, num_warps=4)
        return dgate.view(dy.shape), dup.view(dy.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    n_tokens, n_heads, head_dim = x.shape
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    y = torch.empty(n_tokens, n_heads, head_dim, device=x.device, dtype=x.dtype)
    # About 4096 elements per program: all heads of a token for D = 128 and up to 32 heads.
    block_h = min(triton.next_power_of_2(n_heads), max(1, 4096 // head_dim))
    _rotary_kernel[(n_tokens, triton.cdiv(n_heads, block_h))](
        x, cos, sin, y, n_heads, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), sin.stride(0),
        y.stride(0), y.stride(1), HALF=head_dim // 2, BLOCK_H=block_h, BACKWARD=backward, num_warps=4)
    return y


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def _check_row_fits(op: str, d: int) -> None:
    if d > RMS_NORM_MAX_DIM:
        raise ValueError(f"{op}: the Triton kernel holds a row in registers, d = {d} is over {RMS_NORM_MAX_DIM}")


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    check_rms_norm_inputs(x, weight, eps)
    _check_row_fits("rms_norm", x.shape[-1])
    return _RmsNorm.apply(x, weight, float(eps))


def add_rms_norm_triton(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_add_rms_norm_inputs(residual, delta, weight, eps)
    _check_row_fits("add_rms_norm", residual.shape[-1])
    return _AddRmsNorm.apply(residual, delta, weight, float(eps))


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_silu_mul_inputs(gate, up)
    return _SiluMul.apply(gate, up)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    check_rotary_inputs(x, cos, sin)
    return _Rotary.apply(x, cos, sin)


INTERPRETED = type(_rms_norm_fwd_kernel).__name__ == "InterpretedFunction"
