"""Fused elementwise Triton kernels (RMSNorm, SiLU·mul, rotary) under TRITON_INTERPRET=1 against a float64 evaluation
of the Hugging Face formulas, plus dispatch and input checks."""

from __future__ import annotations

import pytest
import torch

from helpers_triton import interpreted
from lorafleet.kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    rms_norm,
    rms_norm_reference,
    rotary,
    rotary_reference,
    silu_mul,
    silu_mul_reference,
)

elementwise = pytest.importorskip("lorafleet.kernels.elementwise")

# Relative error (Frobenius) of one rounding to the dtype is ~2^-9 for bf16 and ~2^-12 for fp16; the bounds leave
# room for the one or two roundings the HF formulas themselves make.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernels():
    with interpreted(elementwise):
        yield


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def randn(*shape, dtype, seed, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def check_against_float64(fn, reference, inputs, grad_inputs, dtype, **kwargs):
    """Forward and the gradient of every input in `grad_inputs` (indices into `inputs`) against the reference
    evaluated in float64 on the same (rounded) inputs."""
    inputs = [t.detach().requires_grad_(i in grad_inputs) for i, t in enumerate(inputs)]
    y = fn(*inputs, **kwargs)
    assert y.dtype == dtype and y.shape == reference(*inputs, **kwargs).shape
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(99)).to(dtype)
    got = [y, *torch.autograd.grad(y, [inputs[i] for i in grad_inputs], grad)]
    leaves = [t.detach().double().requires_grad_(i in grad_inputs) for i, t in enumerate(inputs)]
    y64 = reference(*leaves, **kwargs)
    want = [y64, *torch.autograd.grad(y64, [leaves[i] for i in grad_inputs], grad.double())]
    for name, g, w in zip(["y", *[f"d{i}" for i in grad_inputs]], got, want):
        assert g.dtype == dtype, name
        assert rel_error(g, w) < REL_TOL[dtype], (name, rel_error(g, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96])
def test_rms_norm_matches_float64(dtype, d):
    x = randn(37, d, dtype=dtype, seed=1, scale=3.0)
    weight = 1 + randn(d, dtype=dtype, seed=2, scale=0.2)
    check_against_float64(elementwise.rms_norm_triton, rms_norm_reference, [x, weight], [0], dtype, eps=1e-6)


def test_rms_norm_keeps_leading_dims_and_reads_strided_rows():
    # [B, S, d] input, and a row-strided view (every other row of a wider buffer).
    x = randn(2, 5, 64, dtype=torch.float32, seed=3)
    weight = randn(64, dtype=torch.float32, seed=4)
    y = elementwise.rms_norm_triton(x, weight, 1e-5)
    assert y.shape == (2, 5, 64)
    torch.testing.assert_close(y, rms_norm_reference(x, weight, 1e-5), rtol=1e-5, atol=1e-6)
    wide = randn(11, 128, dtype=torch.float32, seed=5)
    view = wide[:, 32:96]
    assert view.stride() == (128, 1)
    torch.testing.assert_close(elementwise.rms_norm_triton(view, weight, 1e-5),
                               rms_norm_reference(view, weight, 1e-5), rtol=1e-5, atol=1e-6)


def test_rms_norm_rounds_the_normalised_value_before_the_weight_like_hugging_face():
    # fp16 (the interpreter rounds fp32 -> fp16 to nearest like the GPU; fp32 -> bf16 it truncates): the kernel
    # agrees with HF bit for bit, while multiplying the unrounded fp32 value by the weight disagrees on ~1/4.
    x = randn(64, 64, dtype=torch.float16, seed=6, scale=2.0)
    weight = 1 + randn(64, dtype=torch.float16, seed=7, scale=0.5)
    want = rms_norm_reference(x, weight, 1e-6)
    assert (elementwise.rms_norm_triton(x, weight, 1e-6) == want).float().mean() > 0.99
    x_fp32 = x.float()
    unrounded = (weight.float() * x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    assert (unrounded == want).float().mean() < 0.9


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("used", [(0, 1), (1,), (0,)], ids=["both", "last-norm", "sum-alone"])
def test_add_rms_norm_matches_float64(dtype, used):
    # Both outputs and both inputs' gradients; the sum's gradient (the skip path's) is added into the norm's, or, as
    # after the model's last norm, there is none (or, the norm unused, only the sum's).
    residual = randn(37, 96, dtype=dtype, seed=22, scale=3.0)
    delta = randn(37, 96, dtype=dtype, seed=23)
    weight = 1 + randn(96, dtype=dtype, seed=24, scale=0.2)
    grad_sum, grad_y = (randn(37, 96, dtype=dtype, seed=seed) for seed in (25, 26))

    def run(fn, inputs, grads):
        leaves = [t.detach().requires_grad_() for t in inputs]
        total, y = fn(*leaves, weight.to(inputs[0].dtype), 1e-6)
        outputs = [total, y]
        return [total, y, *torch.autograd.grad([outputs[i] for i in used], leaves, [grads[i] for i in used])]

    got = run(elementwise.add_rms_norm_triton, [residual, delta], [grad_sum, grad_y])
    want = run(add_rms_norm_reference, [residual.double(), delta.double()], [grad_sum.double(), grad_y.double()])
    for name, g, w in zip(["sum", "y", "d residual", "d delta"], got, want):
        assert g.dtype == dtype, name
        assert rel_error(g, w.detach()) < REL_TOL[dtype], (name, rel_error(g, w.detach()))


def test_add_rms_norm_writes_the_sum_hugging_face_rounds_and_normalises_it():
    # The sum stored is `residual + delta` in the inputs' dtype bit for bit, and the norm is of that rounded sum.
    residual = randn(16, 64, dtype=torch.float16, seed=27, scale=4.0)
    delta = randn(16, 64, dtype=torch.float16, seed=28)
    weight = 1 + randn(64, dtype=torch.float16, seed=29, scale=0.5)
    total, y = elementwise.add_rms_norm_triton(residual, delta, weight, 1e-6)
    assert torch.equal(total, residual + delta)
    assert (y == rms_norm_reference(residual + delta, weight, 1e-6)).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_float64(dtype):
    gate = randn(37, 1100, dtype=dtype, seed=8, scale=3.0)  # two column blocks, the second partial
    up = randn(37, 1100, dtype=dtype, seed=9)
    check_against_float64(elementwise.silu_mul_triton, silu_mul_reference, [gate, up], [0, 1], dtype)


def test_silu_mul_reads_halves_of_a_fused_gate_up_projection():
    gate_up = randn(4, 7, 2 * 48, dtype=torch.float32, seed=10)
    gate, up = gate_up.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    y = elementwise.silu_mul_triton(gate, up)
    assert y.shape == (4, 7, 48)
    torch.testing.assert_close(y, silu_mul_reference(gate, up), rtol=1e-5, atol=1e-6)


def rotary_tables(n_tokens, head_dim, dtype=torch.float32):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(n_tokens, dtype=torch.float32) + 5, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [16, 32])
def test_rotary_matches_float64(dtype, head_dim):
    x = randn(19, 3, head_dim, dtype=dtype, seed=11)
    cos, sin = rotary_tables(19, head_dim)
    check_against_float64(elementwise.rotary_triton, rotary_reference, [x, cos, sin], [0], dtype)


def test_rotary_uses_each_half_of_the_tables_where_the_formula_does():
    # HF's tables repeat their first half; random ones catch a kernel reading cos/sin from the wrong half.
    x = randn(19, 3, 16, dtype=torch.float32, seed=19)
    cos, sin = randn(19, 16, dtype=torch.float32, seed=20), randn(19, 16, dtype=torch.float32, seed=21)
    check_against_float64(elementwise.rotary_triton, rotary_reference, [x, cos, sin], [0], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_on_a_strided_view_of_a_projection_output(dtype):
    # q = (x W_qᵀ)[T, H*D] viewed as [T, H, D], and a k slice of a fused qkv output: row stride wider than H*D.
    n_tokens, n_heads, head_dim = 19, 3, 16
    qkv = randn(n_tokens, 5 * n_heads * head_dim, dtype=dtype, seed=12)
    k = qkv[:, n_heads * head_dim:2 * n_heads * head_dim].view(n_tokens, n_heads, head_dim)
    assert k.stride() == (5 * n_heads * head_dim, head_dim, 1) and not k.is_contiguous()
    cos, sin = rotary_tables(n_tokens, head_dim, dtype)
    check_against_float64(elementwise.rotary_triton, rotary_reference, [k, cos, sin], [0], dtype)
    assert elementwise.rotary_triton(k, cos, sin).is_contiguous()


def test_rotary_backward_takes_a_non_contiguous_gradient():
    x = randn(7, 2, 8, dtype=torch.float32, seed=13).requires_grad_()
    cos, sin = rotary_tables(7, 8)
    grad = randn(7, 8, 2, dtype=torch.float32, seed=14).transpose(1, 2)  # strides (16, 1, 2)
    (dx,) = torch.autograd.grad(elementwise.rotary_triton(x, cos, sin), x, grad)
    (want,) = torch.autograd.grad(rotary_reference(x, cos, sin), x, grad)
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-6)


def test_rotary_with_bf16_tables_and_many_heads():
    # 40 heads of D = 128 take two head blocks per token (32 + a partial 8).
    x = randn(3, 40, 128, dtype=torch.bfloat16, seed=15)
    cos, sin = rotary_tables(3, 128, torch.bfloat16)
    check_against_float64(elementwise.rotary_triton, rotary_reference, [x, cos, sin], [0], torch.bfloat16)


@pytest.mark.parametrize("entry", ["entry_point", "triton"])
@pytest.mark.parametrize("call, match", [
    (lambda f: f.rms_norm(torch.ones(3, 8), torch.ones(8, requires_grad=True), 1e-6), "weight must be frozen"),
    (lambda f: f.rms_norm(torch.ones(3, 8), torch.ones(6), 1e-6), r"weight \(6,\) and x \(3, 8\)"),
    (lambda f: f.rms_norm(torch.ones(3, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6), "dtype"),
    (lambda f: f.add_rms_norm(torch.ones(3, 8), torch.ones(3, 9), torch.ones(8), 1e-6), r"residual \(3, 8\)"),
    (lambda f: f.add_rms_norm(torch.ones(3, 8), torch.ones(3, 8), torch.ones(8), 0.0), "eps must be positive"),
    (lambda f: f.silu_mul(torch.ones(3, 8), torch.ones(3, 9)), r"gate \(3, 8\) and up \(3, 9\)"),
    (lambda f: f.silu_mul(torch.ones(3, 8), torch.ones(3, 8, dtype=torch.float16)), "float16"),
    (lambda f: f.rotary(torch.ones(4, 2, 12), torch.ones(4, 12), torch.ones(4, 12)), "D = 12"),
    (lambda f: f.rotary(torch.ones(4, 2, 16), torch.ones(5, 16), torch.ones(4, 16)), r"cos must be \[T, D\]"),
    (lambda f: f.rotary(torch.ones(4, 32), torch.ones(4, 32), torch.ones(4, 32)), r"\[T, H, D\]"),
])
def test_bad_input_raises_clear_error(entry, call, match):
    import lorafleet.kernels as entry_points

    class Triton:
        rms_norm = staticmethod(elementwise.rms_norm_triton)
        add_rms_norm = staticmethod(elementwise.add_rms_norm_triton)
        silu_mul = staticmethod(elementwise.silu_mul_triton)
        rotary = staticmethod(elementwise.rotary_triton)

    with pytest.raises(ValueError, match=match):
        call(entry_points if entry == "entry_point" else Triton)


def test_dispatch_equals_the_references_bitwise_on_cpu_unless_asked(monkeypatch):
    x = randn(5, 3, 16, dtype=torch.bfloat16, seed=16)
    weight = randn(16, dtype=torch.bfloat16, seed=17)
    up = randn(5, 3, 16, dtype=torch.bfloat16, seed=18)
    cos, sin = rotary_tables(5, 16)
    rms_norm_ref = rms_norm_reference(x, weight, 1e-6)
    add_rms_norm_ref = add_rms_norm_reference(x, up, weight, 1e-6)
    silu_ref = silu_mul_reference(x, up)
    rotary_ref = rotary_reference(x, cos, sin)

    monkeypatch.delenv("LORAFLEET_TRITON", raising=False)
    assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_ref)
    assert all(map(torch.equal, add_rms_norm(x, up, weight, 1e-6), add_rms_norm_ref))
    assert torch.equal(silu_mul(x, up), silu_ref)
    assert torch.equal(rotary(x, cos, sin), rotary_ref)

    # Asked for (with TRITON_INTERPRET=1, set by the fixture), every entry point runs its Triton version.
    monkeypatch.setenv("LORAFLEET_TRITON", "1")
    called = []
    for name in ("rms_norm_triton", "add_rms_norm_triton", "silu_mul_triton", "rotary_triton"):
        triton_fn = getattr(elementwise, name)
        monkeypatch.setattr(elementwise, name,
                            lambda *args, _fn=triton_fn, _name=name: called.append(_name) or _fn(*args))
    torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(add_rms_norm(x, up, weight, 1e-6), add_rms_norm_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(silu_mul(x, up), silu_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(rotary(x, cos, sin), rotary_ref, rtol=2e-2, atol=2e-2)
    assert called == ["rms_norm_triton", "add_rms_norm_triton", "silu_mul_triton", "rotary_triton"]
