"""The fused decoder forwards (executor/fused_decoder.py) against Hugging Face's modules on a packed row, fp32 CPU:
with the PyTorch references (what the CPU engine runs) and with the Triton kernels under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from helpers_triton import interpreted
from helpers_models import build_tiny_model, single_torch_thread  # noqa: F401 (autouse fixture)

from lorafleet.executor.fused_decoder import fuse_decoder
from lorafleet.executor.model import load_base, packing_kwargs

LENGTHS = [5, 17, 1, 9]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {family: build_tiny_model(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def forward_backward(model, seed=0):
    """Logits of a packed row of four sequences and the gradient of a random projection of them w.r.t. the input
    embeddings (the base is frozen: this gradient runs back through every module)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, sum(LENGTHS)), generator=generator)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, use_cache=False, **packing_kwargs(LENGTHS, "cpu")).logits
    (logits * torch.randn(logits.shape, generator=generator)).sum().backward()
    return logits.detach(), embeds.grad


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "qwen3", "phi3", "qwen2_moe", "gpt2")


# llama: 5 norms, 2 MLPs, 2 attentions, 2 layers (mistral and qwen2 keep HF's attention); qwen3: 4 q/k norms more;
# phi3: 5 norms (fused gate_up MLP, its layer not swapped); qwen2_moe: 5 norms, 2 shared-expert MLPs, no layer
@pytest.mark.parametrize("family, swapped", [("llama", 11), ("mistral", 9), ("qwen2", 9), ("gemma", 0), ("qwen3", 13),
                                             ("phi3", 5), ("qwen2_moe", 7), ("gpt2", 0)])
def test_fused_forwards_compute_what_hf_modules_compute(models, family, swapped):
    hf, _ = load_base(models[family])
    fused, _ = load_base(models[family])
    assert fuse_decoder(fused) == swapped
    want_logits, want_grad = forward_backward(hf)
    got_logits, got_grad = forward_backward(fused)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


@pytest.fixture
def interpreted_kernels():
    with interpreted(pytest.importorskip("lorafleet.kernels.elementwise"), LORAFLEET_TRITON="1"):
        yield


def test_fused_forwards_on_the_triton_kernels(models, interpreted_kernels):
    hf, _ = load_base(models["llama"])
    fused, _ = load_base(models["llama"])
    fuse_decoder(fused)
    want_logits, want_grad = forward_backward(hf)
    got_logits, got_grad = forward_backward(fused)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
