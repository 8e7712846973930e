"""One job's adapter: its trainable factors for every layer it targets, created from the job's seed.

`factors(layer)` gives the (A [r, d_in], B [d_out, r]) pair the multi-adapter layer multiplies with; `lora_weights()`
gives the same pairs for export. A LoRA adapter trains A and B directly; a NOLA adapter trains only mixing
coefficients over fixed random bases (A = Σ_k α_k Â_k, B = Σ_k β_k B̂_k), so its state is a seed and 2k numbers a
layer. Parameters live in fp32 (the optimizer's master copy); the layer casts them to the compute dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafleet.scheduler.spec import AdapterSpec


def _kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's lora_A init (nn.Linear's): kaiming-uniform with a=sqrt(5), i.e. U(±1/sqrt(cols))."""
    weight = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


class Adapter(nn.Module):
    """What every adapter kind shares: scale, dropout with the job's own RNG, and the layers it targets."""

    def __init__(self, spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int):
        super().__init__()
        self.spec = spec
        self.layer_names = list(layer_shapes)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self.scale = spec.lora_alpha / spec.r
        self.dropout = spec.lora_dropout
        # Its own stream, so a job's dropout masks do not depend on which other jobs share the step; a CPU
        # generator, so the masks (and a resumed run) are the same whatever device the cohort runs on.
        self.dropout_rng = torch.Generator().manual_seed(seed + 1)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Inverted dropout on this job's rows, with a mask drawn from the job's own generator."""
        if self.dropout == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape, generator=self.dropout_rng) >= self.dropout
        return x * keep.to(x.device, x.dtype) / (1.0 - self.dropout)

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def lora_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: tuple(t.detach().clone() for t in self.factors(name)) for name in self.layer_names}

    def rng_state(self) -> dict:
        return {"dropout_rng": self.dropout_rng.get_state()}

    def load_rng_state(self, state: dict) -> None:
        self.dropout_rng.set_state(state["dropout_rng"])


class LoraAdapter(Adapter):
    """Plain LoRA, initialised as PEFT does: A kaiming-uniform(a=sqrt(5)), B zeros (layers in model order)."""

    def __init__(self, spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int):
        super().__init__(spec, layer_shapes, seed)
        init = torch.Generator().manual_seed(seed)
        self.lora_A = nn.ParameterList(
            [_kaiming_uniform(spec.r, d_in, init) for d_in, _ in layer_shapes.values()]
        )
        self.lora_B = nn.ParameterList([torch.zeros(d_out, spec.r) for _, d_out in layer_shapes.values()])

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[layer]
        return self.lora_A[i], self.lora_B[i]


class NolaAdapter(Adapter):
    """NOLA: A and B are trained mixtures of k fixed random bases generated from `nola.basis_seed`.

    The bases are drawn like LoRA's A (U(±1/sqrt(fan_in))) so A starts at LoRA's scale with α ~ N(0, 1/k); β starts
    at zero so B = 0 and the adapter starts as the identity, as LoRA does. Bases are buffers, not state: they are
    regenerated from the seed.
    """

    def __init__(self, spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int):
        super().__init__(spec, layer_shapes, seed)
        k, r = spec.nola.num_basis, spec.r
        bases = torch.Generator().manual_seed(spec.nola.basis_seed)
        coefficients = torch.Generator().manual_seed(seed)
        for i, (d_in, d_out) in enumerate(layer_shapes.values()):
            basis_a = torch.stack([_kaiming_uniform(r, d_in, bases) for _ in range(k)])
            basis_b = torch.stack([_kaiming_uniform(d_out, r, bases) for _ in range(k)])
            self.register_buffer(f"basis_A_{i}", basis_a, persistent=False)
            self.register_buffer(f"basis_B_{i}", basis_b, persistent=False)
        self.alpha = nn.ParameterList(
            [torch.randn(k, generator=coefficients) / math.sqrt(k) for _ in layer_shapes]
        )
        self.beta = nn.ParameterList([torch.zeros(k) for _ in layer_shapes])

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[layer]
        a = torch.einsum("k,kri->ri", self.alpha[i], getattr(self, f"basis_A_{i}"))
        b = torch.einsum("k,kor->or", self.beta[i], getattr(self, f"basis_B_{i}"))
        return a, b


def build_adapter(spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int) -> Adapter:
    kinds = {"lora": LoraAdapter, "nola": NolaAdapter}
    return kinds[spec.type](spec, layer_shapes, seed)
