"""On a CUDA GPU, bf16, at one 8B decoder layer's shapes (d_model 4096; q 4096, GQA k/v 1024; gate/up 14336) and the
issue-16 batch (8 jobs x 4 x 512 tokens): nf4 bases on the kernels' one-node layer give the unfused path's outputs
and gradients (bitsandbytes' Linear4bit, then `lora_delta` into its output), and save no dequantized weight.

At 16k rows bitsandbytes' own layer dequantizes and runs F.linear (its fused 4-bit GEMM serves up to 1536 rows), reading
the same weight values as the node. Tolerance 1e-2 relative (norm): the paths round differently in bf16, the node
adding the delta inside the base GEMM (one rounding) where the unfused path rounds the base output and then the sum,
and summing the projections' dX in one tensor instead of autograd's; each is an ulp-level difference (2^-8 relative)
per element, ~3e-3 over a tensor, while a wrong or missing term is O(1).
"""

from __future__ import annotations

import pytest
import torch

from lorafleet import kernels
from lorafleet.executor.adapters import build_adapter
from lorafleet.executor.multilora import Dequantized4bit, MultiLoraLinear, RowRouting, shared_input_projections
from lorafleet.scheduler.spec import AdapterSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEVICE, DTYPE = "cuda", torch.bfloat16
D_MODEL = 4096
GROUPS = {"qkv": {"q_proj": 4096, "k_proj": 1024, "v_proj": 1024}, "gate_up": {"gate_proj": 14336, "up_proj": 14336}}
N_JOBS, ROWS_PER_JOB = 8, 4 * 512
RANKS = [16, 16, 8, 32, 16, 64, 16, 4]
REL_TOL = 1e-2


def nf4_linear(d_in: int, d_out: int, seed: int) -> torch.nn.Module:
    """A Linear4bit as transformers loads an 8B base in QLoRA: nf4, double quantization, bf16 compute."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                              quant_type="nf4")
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed)) * d_in ** -0.5
    layer.weight = bnb.nn.Params4bit(weight.to(DTYPE), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    return layer.to(DEVICE)  # quantizes


def wrap(widths: dict[str, int]) -> list[MultiLoraLinear]:
    routing = RowRouting()
    routing.segments = {f"job{j}": (j * ROWS_PER_JOB, (j + 1) * ROWS_PER_JOB) for j in range(N_JOBS)}
    layers = [MultiLoraLinear(nf4_linear(D_MODEL, width, seed), name, routing)
              for seed, (name, width) in enumerate(widths.items())]
    for j, rank in enumerate(RANKS):
        adapter = build_adapter(AdapterSpec(r=rank, lora_alpha=2 * rank if j % 2 else 16),
                                {layer.name: (D_MODEL, layer.out_features) for layer in layers}, seed=j)
        with torch.no_grad():
            for b in adapter.lora_B:
                b.normal_(generator=torch.Generator().manual_seed(100 + j))
        adapter.to(DEVICE)
        for layer in layers:
            layer.adapters[f"job{j}"] = adapter
    return layers


def unfused(layers: list[MultiLoraLinear], x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    segments = list(layers[0].routing.segments.values())
    for layer in layers:
        adapters = list(layer.adapters.values())
        lora_a, lora_b = layer._factors(adapters)
        y = layer.base(x)
        kernels.lora_delta(x, segments, lora_a, lora_b, layer._scales(adapters), out=y)
        outputs.append(y)
    return outputs


def outputs_and_gradients(run, layers, x):
    x = x.clone().requires_grad_()
    outputs = run(layers, x)
    leaves = [x, *[p for adapter in layers[0].adapters.values() for p in adapter.parameters()]]
    draw = torch.Generator(device=DEVICE).manual_seed(5)
    grads_out = [torch.randn(y.shape, generator=draw, device=DEVICE, dtype=DTYPE) for y in outputs]
    return [*[y.detach() for y in outputs], *torch.autograd.grad(outputs, leaves, grads_out)]


def rel_error(got, want):
    assert torch.isfinite(got).all()
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("group", list(GROUPS))
def test_nf4_groups_on_the_fused_node_give_the_unfused_outputs_and_gradients_at_8b_shapes(group, monkeypatch):
    layers = wrap(GROUPS[group])
    seen = []
    real = kernels.lora_linear_multi_triton
    monkeypatch.setattr(kernels, "lora_linear_multi_triton",
                        lambda x, weights, *args: seen.extend(weights) or real(x, weights, *args))
    x = torch.randn(N_JOBS * ROWS_PER_JOB, D_MODEL, device=DEVICE, generator=torch.Generator(device=DEVICE)
                    .manual_seed(1)).to(DTYPE)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        got = outputs_and_gradients(shared_input_projections, layers, x)
    assert [type(w) for w in seen] == [Dequantized4bit] * len(layers)
    assert (x.shape[0], D_MODEL) in shapes  # x, saved
    assert not {(layer.out_features, D_MODEL) for layer in layers} & set(shapes), "a dequantized weight was saved"
    want = outputs_and_gradients(unfused, layers, x)
    assert len(got) == len(want) == len(layers) * (1 + 2 * N_JOBS) + 1
    for i, (g, w) in enumerate(zip(got, want)):
        assert rel_error(g, w) < REL_TOL, (group, i, rel_error(g, w))
