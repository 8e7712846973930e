"""Triton multi-LoRA kernels on a CUDA GPU at real shapes (d=4096, thousands of tokens) against a float64 reference."""

from __future__ import annotations

import random

import pytest
import torch

from lorafleet.kernels import (
    LoraDropout,
    dropout_reference,
    lora_delta,
    lora_delta_multi,
    lora_delta_reference,
    lora_linear,
    lora_linear_multi,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REL_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
D = 4096


def rel_error(got, want):
    assert torch.isfinite(got).all()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def ragged_segments(n_rows, n, seed):
    cuts = sorted(random.Random(seed).sample(range(1, n_rows), n - 1))
    bounds = [0, *cuts, n_rows]
    return list(zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_and_gradients_match_float64_at_real_shapes(dtype):
    torch.manual_seed(0)
    n_rows = 8192
    segments = ragged_segments(n_rows - 100, 8, seed=1)  # the last 100 rows belong to no adapter
    segments[2] = (segments[2][0], segments[2][0])  # an empty segment
    segments[5] = (segments[5][0], segments[5][0] + 1)  # a one-row segment, then a gap
    ranks = [8, 16, 64, 1, 128, 32, 16, 8]
    x = torch.randn(n_rows, D, device="cuda", dtype=dtype, requires_grad=True)
    lora_a = [(torch.randn(r, D, device="cuda", dtype=dtype) / D**0.5).requires_grad_() for r in ranks]
    lora_b = [torch.randn(D, r, device="cuda", dtype=dtype).requires_grad_() for r in ranks]
    scales = [0.5 + j / 4 for j in range(8)]
    y = lora_delta(x, segments, lora_a, lora_b, scales)
    grad = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, [x, *lora_a, *lora_b], grad)]
    leaves = [t.detach().double().requires_grad_() for t in [x, *lora_a, *lora_b]]
    y64 = lora_delta_reference(leaves[0], segments, leaves[1:9], leaves[9:], scales)
    want = [y64, *torch.autograd.grad(y64, leaves, grad.double())]
    for index, (g, w) in enumerate(zip(got, want)):
        if w.norm() == 0:
            assert torch.count_nonzero(g) == 0, index
        else:
            assert rel_error(g, w) < REL_TOL[dtype], (index, rel_error(g, w))


def test_grouped_mm_shapes_match_float64():
    # 16 adapters at r=64 tiling every row: the shapes lora_delta sends to torch._grouped_mm.
    from lorafleet.kernels.baselines import grouped_mm_wins

    torch.manual_seed(3)
    n_rows, dtype = 4096, torch.bfloat16
    segments = ragged_segments(n_rows, 16, seed=4)
    x = torch.randn(n_rows, D, device="cuda", dtype=dtype, requires_grad=True)
    lora_a = [(torch.randn(64, D, device="cuda", dtype=dtype) / D**0.5).requires_grad_() for _ in range(16)]
    lora_b = [torch.randn(D, 64, device="cuda", dtype=dtype).requires_grad_() for _ in range(16)]
    scales = [0.5 + j / 8 for j in range(16)]
    assert grouped_mm_wins(x, segments, lora_a)
    y = lora_delta(x, segments, lora_a, lora_b, scales)
    grad = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, [x, *lora_a, *lora_b], grad)]
    leaves = [t.detach().double().requires_grad_() for t in [x, *lora_a, *lora_b]]
    y64 = lora_delta_reference(leaves[0], segments, leaves[1:17], leaves[17:], scales)
    want = [y64, *torch.autograd.grad(y64, leaves, grad.double())]
    for index, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g, w) < REL_TOL[dtype], (index, rel_error(g, w))


def test_fused_qkv_and_in_place_accumulation_match_reference():
    torch.manual_seed(1)
    n_rows, dtype = 4096, torch.bfloat16
    segments = ragged_segments(n_rows, 4, seed=2)
    widths = [4096, 1024, 1024]
    x = torch.randn(n_rows, D, device="cuda", dtype=dtype, requires_grad=True)
    lora_as = [[(torch.randn(16, D, device="cuda", dtype=dtype) / D**0.5).requires_grad_() for _ in range(4)]
               for _ in widths]
    lora_bs = [[torch.randn(w, 16, device="cuda", dtype=dtype).requires_grad_() for _ in range(4)] for w in widths]
    scales = [2.0, 1.0, 0.5, 0.25]
    bases = [torch.randn(n_rows, w, device="cuda", dtype=dtype) for w in widths]
    outs = lora_delta_multi(x, segments, lora_as, lora_bs, scales, outs=[b.clone() for b in bases])
    grads = [torch.randn_like(o) for o in outs]
    leaves = [x, *[t for group in lora_as + lora_bs for t in group]]
    got = torch.autograd.grad(outs, leaves, grads)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    as64 = [leaves64[1 + 4 * p: 5 + 4 * p] for p in range(3)]
    bs64 = [leaves64[13 + 4 * p: 17 + 4 * p] for p in range(3)]
    want_outs = [b.double() + lora_delta_reference(leaves64[0], segments, a, bb, scales)
                 for b, a, bb in zip(bases, as64, bs64)]
    want = torch.autograd.grad(want_outs, leaves64, [g.double() for g in grads])
    for o, w in zip(outs, want_outs):
        assert rel_error(o, w) < REL_TOL[dtype]
    for g, w in zip(got, want):
        assert rel_error(g, w) < REL_TOL[dtype]


def test_lora_linear_matches_base_plus_reference():
    torch.manual_seed(5)
    n_rows, dtype = 8192, torch.bfloat16
    segments = ragged_segments(n_rows, 8, seed=6)
    x = torch.randn(n_rows, D, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(D, D, device="cuda", dtype=dtype) / D**0.5
    lora_a = [(torch.randn(16, D, device="cuda", dtype=dtype) / D**0.5).requires_grad_() for _ in range(8)]
    lora_b = [torch.randn(D, 16, device="cuda", dtype=dtype).requires_grad_() for _ in range(8)]
    scales = [2.0] * 8
    y = lora_linear(x, weight, None, segments, lora_a, lora_b, scales)
    grad = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, [x, *lora_a, *lora_b], grad)]
    leaves = [t.detach().double().requires_grad_() for t in [x, *lora_a, *lora_b]]
    y64 = leaves[0] @ weight.double().t() + lora_delta_reference(leaves[0], segments, leaves[1:9], leaves[9:], scales)
    want = [y64, *torch.autograd.grad(y64, leaves, grad.double())]
    for index, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g, w) < REL_TOL[dtype], (index, rel_error(g, w))


def test_lora_linear_with_dropout_matches_the_masks_of_the_reference():
    """The hashed dropout masks on the GPU are those of `dropout_reference`, at 8192 tokens, 8 adapters, p 0-0.3."""
    torch.manual_seed(9)
    n_rows, dtype = 8192, torch.bfloat16
    segments = ragged_segments(n_rows, 8, seed=10)
    x = torch.randn(n_rows, D, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(D, D, device="cuda", dtype=dtype) / D**0.5
    lora_a = [(torch.randn(16, D, device="cuda", dtype=dtype) / D**0.5).requires_grad_() for _ in range(8)]
    lora_b = [torch.randn(D, 16, device="cuda", dtype=dtype).requires_grad_() for _ in range(8)]
    scales = [2.0] * 8
    dropout = LoraDropout(probs=(0.1, 0.0, 0.05, 0.3, 0.1, 0.1, 0.2, 0.1),
                          seeds=torch.randint(0, 2**62, (8,), device="cuda"), stream=2024)
    y = lora_linear(x, weight, None, segments, lora_a, lora_b, scales, dropout=dropout)
    grad = torch.randn_like(y)
    got = [y, *torch.autograd.grad(y, [x, *lora_a, *lora_b], grad)]
    leaves = [t.detach().double().requires_grad_() for t in [x, *lora_a, *lora_b]]
    dropped = dropout_reference(leaves[0], segments, dropout)
    y64 = leaves[0] @ weight.double().t() + lora_delta_reference(dropped, segments, leaves[1:9], leaves[9:], scales)
    want = [y64, *torch.autograd.grad(y64, leaves, grad.double())]
    for index, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g, w) < REL_TOL[dtype], (index, rel_error(g, w))


def test_lora_linear_multi_qkv_matches_bases_plus_reference():
    """q/k/v of the 8B shape (4096 -> 4096/1024/1024) over one x, 8 adapters r=16, 8192 tokens."""
    torch.manual_seed(7)
    n_rows, dtype, widths = 8192, torch.bfloat16, (D, 1024, 1024)
    segments = ragged_segments(n_rows, 8, seed=8)
    x = torch.randn(n_rows, D, device="cuda", dtype=dtype, requires_grad=True)
    weights = [torch.randn(w, D, device="cuda", dtype=dtype) / D**0.5 for w in widths]
    lora_as = [[(torch.randn(16, D, device="cuda") / D**0.5).requires_grad_() for _ in range(8)] for _ in widths]
    lora_bs = [[torch.randn(w, 16, device="cuda").requires_grad_() for _ in range(8)] for w in widths]
    scales = [2.0] * 8
    outputs = lora_linear_multi(x, weights, [None] * 3, segments, lora_as, lora_bs, scales)
    grads = [torch.randn_like(y) for y in outputs]
    leaves = [x, *[t for ts in lora_as + lora_bs for t in ts]]
    got = [*outputs, *torch.autograd.grad(outputs, leaves, grads)]
    doubles = [t.detach().double().requires_grad_() for t in leaves]
    x64, rest = doubles[0], doubles[1:]
    a64 = [rest[p * 8:(p + 1) * 8] for p in range(3)]
    b64 = [rest[24 + p * 8:24 + (p + 1) * 8] for p in range(3)]
    want_outputs = [x64 @ w.double().t() + lora_delta_reference(x64, segments, a, b, scales)
                    for w, a, b in zip(weights, a64, b64)]
    want = [*want_outputs, *torch.autograd.grad(want_outputs, doubles, [g.double() for g in grads])]
    for index, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g, w) < REL_TOL[dtype], (index, rel_error(g, w))


def test_cross_entropy_kernel_matches_float64_at_the_llama3_vocabulary():
    from lorafleet.kernels import cross_entropy_rows

    generator = torch.Generator().manual_seed(4)
    logits = (torch.randn(64, 128256, generator=generator) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 128256, (64,), generator=generator)
    targets[::3] = -100
    upcast = logits.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(upcast, targets, ignore_index=-100, reduction="none")
    want.sum().backward()
    grad = logits.cuda()
    losses = cross_entropy_rows(grad, targets.cuda(), -100, True)
    torch.testing.assert_close(losses.double().cpu(), want.detach(), rtol=1e-5, atol=1e-4)
    assert rel_error(grad.double().cpu(), upcast.grad) < 1e-2
