"""The fused decoder forwards on a CUDA device (Triton kernels, varlen flash attention) against HF's modules in bf16,
and the elementwise kernels at Llama-3-8B shapes against their references in float64. Skipped on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers_models import build_tiny_model

from lorafleet.executor.fused_decoder import fuse_decoder
from lorafleet.executor.model import load_base, packing_kwargs
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

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LENGTHS = [300, 17, 1, 190]


def rel_error(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_fused_llama_matches_hf_modules_in_bf16(tmp_path):
    model_dir = build_tiny_model(tmp_path, "llama", hidden=256, layers=2)
    runs = []
    for fused in (False, True):
        model, _ = load_base(model_dir, device="cuda")
        if fused:
            assert fuse_decoder(model) == 11
        generator = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (1, sum(LENGTHS)), device="cuda", generator=generator)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False, **packing_kwargs(LENGTHS, "cuda")).logits.float()
        (logits * torch.randn(logits.shape, device="cuda", generator=generator)).sum().backward()
        runs.append((logits.detach(), embeds.grad.float()))
    (want_logits, want_grad), (got_logits, got_grad) = runs
    assert rel_error(got_logits, want_logits) < 2e-2
    assert rel_error(got_grad, want_grad) < 3e-2


@pytest.mark.parametrize("kernel", ["rms_norm", "add_rms_norm", "silu_mul", "rotary"])
def test_elementwise_kernels_at_8b_shapes(kernel):
    generator = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=generator).to(torch.bfloat16)

    tokens = 4096
    if kernel == "rms_norm":
        weight = randn(4096)
        inputs, fn, ref = [randn(tokens, 4096)], lambda x: rms_norm(x, weight, 1e-5), lambda x: rms_norm_reference(
            x, weight.double(), 1e-5)
    elif kernel == "add_rms_norm":  # both outputs side by side: the sum's gradient and the norm's reach the inputs
        weight = randn(4096)
        inputs = [randn(tokens, 4096), randn(tokens, 4096)]
        fn = lambda r, d: torch.cat(add_rms_norm(r, d, weight, 1e-5), -1)  # noqa: E731
        ref = lambda r, d: torch.cat(add_rms_norm_reference(r, d, weight.double(), 1e-5), -1)  # noqa: E731
    elif kernel == "silu_mul":
        inputs, fn, ref = [randn(tokens, 14336), randn(tokens, 14336)], silu_mul, silu_mul_reference
    else:
        angles = torch.rand(tokens, 64, device="cuda", generator=generator) * 100
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        q = randn(tokens, 32 * 128).view(tokens, 32, 128)  # a view of a projection's output, as the engine passes
        inputs = [q]
        fn = lambda x: rotary(x, cos.bfloat16(), sin.bfloat16())  # noqa: E731
        ref = lambda x: rotary_reference(x, cos.bfloat16().double(), sin.bfloat16().double())  # noqa: E731
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grad = torch.randn(out.shape, device="cuda", generator=generator).to(out.dtype)
    out.backward(grad)
    doubles = [t.detach().double().requires_grad_(True) for t in inputs]
    want = ref(*doubles)
    want.backward(grad.double())
    assert rel_error(out, want) < 1e-2
    for leaf, double in zip(leaves, doubles):
        assert rel_error(leaf.grad, double.grad) < 1e-2
