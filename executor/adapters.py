"""One job's adapter: its trainable factors for every layer it targets, created from the job's seed.

`factors(layer)` gives the (A [r, d_in], B [d_out, r]) pair the multi-adapter layer multiplies with; `lora_weights()`
gives the same pairs for export. A LoRA adapter trains A and B directly; a NOLA adapter trains only mixing
coefficients over fixed random bases (A = Σ_k α_k Â_k, B = Σ_k β_k B̂_k), so its state is a seed and 2k numbers a
layer. Parameters live in fp32 (the optimizer's master copy); the layer casts them to the compute dtype.
"""

from __future__ import annotations

import hashlib
import math
import weakref

import torch
from torch import nn

from lorafleet.executor.dora import row_norms
from lorafleet.scheduler.spec import AdapterSpec


def _kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's lora_A init (nn.Linear's): kaiming-uniform with a=sqrt(5), i.e. U(±1/sqrt(cols))."""
    weight = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    return weight


class Adapter(nn.Module):
    """What every adapter kind shares: scale, dropout seeds from the job's own RNG, and the layers it targets."""

    def __init__(self, spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int):
        super().__init__()
        self.spec = spec
        self.layer_names = list(layer_shapes)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self.scale = spec.scale
        self.dropout = spec.lora_dropout
        # Its own stream, so a job's dropout masks do not depend on which other jobs share the step.
        self.seed = seed
        self.dropout_rng = torch.Generator().manual_seed(seed + 1)

    def place_dropout_rng(self, device: torch.device) -> None:
        """Draw the seeds on the cohort's device (reading one back to the host would wait for the GPU).
        Call before the first draw: the stream starts from the job's seed on whichever device."""
        self.dropout_rng = torch.Generator(device=device).manual_seed(self.seed + 1)

    def draw_dropout_seed(self) -> torch.Tensor:
        """The next seed of this job's dropout masks (int64 [1] on the generator's device): one per forward, from
        which every layer's mask is hashed (`kernels.LoraDropout`)."""
        return torch.randint(0, 2**62, (1,), generator=self.dropout_rng, device=self.dropout_rng.device)

    use_dora = False

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def magnitudes(self) -> dict[str, torch.Tensor]:
        """DoRA's magnitude vector of each layer (none for other kinds)."""
        return {}

    def param_groups(self, learning_rate: float) -> list[dict]:
        """The optimizer's parameter groups: one at the job's learning rate, unless a variant says otherwise."""
        return [{"params": list(self.parameters()), "lr": learning_rate}]

    @torch.no_grad()
    def lora_weights(self, copies: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer name -> its (A, B); `copies=False` for a caller that copies them anyway (a snapshot's host copy):
        the live factors, detached."""
        return {name: tuple(t.detach().clone() if copies else t.detach() for t in self.factors(name))
                for name in self.layer_names}

    def rng_state(self) -> dict:
        return {"dropout_rng": self.dropout_rng.get_state(), "dropout_rng_device": self.dropout_rng.device.type}

    def load_rng_state(self, state: dict) -> None:
        if state.get("dropout_rng_device", "cpu") == self.dropout_rng.device.type:
            self.dropout_rng.set_state(state["dropout_rng"])
        else:  # resumed on another kind of device: generator states do not carry over, so continue from a new
            # stream derived from the saved one (deterministic, but not the masks the old device would have drawn)
            digest = hashlib.sha256(state["dropout_rng"].numpy().tobytes()).digest()
            self.dropout_rng.manual_seed(int.from_bytes(digest[:8], "little"))


class LoraAdapter(Adapter):
    """Plain LoRA, initialised as PEFT does: A kaiming-uniform(a=sqrt(5)), B zeros (layers in model order).

    With `use_dora` also DoRA's magnitude per output feature of each layer, initialised as PEFT does to the row norms
    of the base weight (B = 0, so ||W + s·BA|| = ||W||): `base_weights` gives each layer's [d_out, d_in] weight.
    """

    def __init__(self, spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int,
                 base_weights: dict[str, torch.Tensor] | None = None):
        super().__init__(spec, layer_shapes, seed)
        init = torch.Generator().manual_seed(seed)
        self.lora_A = nn.ParameterList(
            [_kaiming_uniform(spec.r, d_in, init) for d_in, _ in layer_shapes.values()]
        )
        self.lora_B = nn.ParameterList([torch.zeros(d_out, spec.r) for _, d_out in layer_shapes.values()])
        self.use_dora = spec.use_dora
        if self.use_dora:
            if base_weights is None:
                raise ValueError("a DoRA adapter needs the base weights of its layers for its magnitudes")
            self.magnitude = nn.ParameterList(
                [row_norms(base_weights[name].detach().float()).cpu() for name in self.layer_names]
            )

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[layer]
        return self.lora_A[i], self.lora_B[i]

    def magnitudes(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.layer_names, self.magnitude)) if self.use_dora else {}

    def param_groups(self, learning_rate: float) -> list[dict]:
        """LoRA+ (Hayou et al. 2024; PEFT's create_loraplus_optimizer): B at `loraplus_lr_ratio` x A's rate."""
        ratio = self.spec.loraplus_lr_ratio
        if ratio is None:
            return super().param_groups(learning_rate)
        # PEFT's grouping: B and every vector (DoRA's magnitudes) at the ratio; expert factors (executor/experts.py)
        # are named lora_A / lora_B too
        a_side = [p for name, p in self.named_parameters() if "lora_A" in name.split(".")]
        return [{"params": a_side, "lr": learning_rate},
                {"params": [p for name, p in self.named_parameters() if "lora_A" not in name.split(".")],
                 "lr": learning_rate * ratio}]


class _Bases(list):
    """Per layer (Â [k, r, d_in], B̂ [k, d_out, r]); a list subclass so the cache can hold it weakly."""


_SHARED_BASES: "weakref.WeakValueDictionary[tuple, _Bases]" = weakref.WeakValueDictionary()


def shared_bases(spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], device: torch.device) -> _Bases:
    """The fixed NOLA bases for this seed, k, r and layer list on `device`, one copy however many jobs use them.

    They are a pure function of those inputs, so NOLA jobs that agree on them (the default basis_seed is shared)
    hold one copy per device instead of one per job; the copy goes away with the last job holding it.
    """
    k, r = spec.nola.num_basis, spec.r
    key = (spec.nola.basis_seed, k, r, tuple(layer_shapes.items()), str(device))
    bases = _SHARED_BASES.get(key)
    if bases is None:
        generator = torch.Generator().manual_seed(spec.nola.basis_seed)
        bases = _Bases()
        for d_in, d_out in layer_shapes.values():
            basis_a = torch.stack([_kaiming_uniform(r, d_in, generator) for _ in range(k)])
            basis_b = torch.stack([_kaiming_uniform(d_out, r, generator) for _ in range(k)])
            bases.append((basis_a.to(device), basis_b.to(device)))
        _SHARED_BASES[key] = bases
    return bases


class NolaAdapter(Adapter):
    """NOLA: A and B are trained mixtures of k fixed random bases generated from `nola.basis_seed`.

    The bases are drawn like LoRA's A (U(±1/sqrt(fan_in))) so A starts at LoRA's scale with α ~ N(0, 1/k); β starts
    at zero so B = 0 and the adapter starts as the identity, as LoRA does. Bases are not state: they are regenerated
    from the seed, and shared between the jobs that use the same ones (`shared_bases`).
    """

    def __init__(self, spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int):
        super().__init__(spec, layer_shapes, seed)
        self.layer_shapes = dict(layer_shapes)
        self.bases = shared_bases(spec, self.layer_shapes, torch.device("cpu"))
        k = spec.nola.num_basis
        coefficients = torch.Generator().manual_seed(seed)
        self.alpha = nn.ParameterList(
            [torch.randn(k, generator=coefficients) / math.sqrt(k) for _ in layer_shapes]
        )
        self.beta = nn.ParameterList([torch.zeros(k) for _ in layer_shapes])

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[layer]
        alpha, beta = self.alpha[i], self.beta[i]
        if self.bases[i][0].device != alpha.device:  # the adapter moved (cohort.to(device)): follow it
            self.bases = shared_bases(self.spec, self.layer_shapes, alpha.device)
        basis_a, basis_b = self.bases[i]
        return torch.einsum("k,kri->ri", alpha, basis_a), torch.einsum("k,kor->or", beta, basis_b)


def _peft_vera_init(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA projection init: U(±sqrt(6 / cols)) (kaiming-uniform, gain sqrt(2), fan-in = cols)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


_SHARED_PROJECTIONS: "weakref.WeakValueDictionary[tuple, _Bases]" = weakref.WeakValueDictionary()


def shared_projections(spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], device: torch.device) -> _Bases:
    """VeRA's frozen (A [r, max d_in], B [max d_out, r]) from `vera.projection_prng_key`, drawn as PEFT draws them,
    one copy per device for every job that agrees on the key, r and the largest shapes (like `shared_bases`)."""
    d_in = max(d for d, _ in layer_shapes.values())
    d_out = max(d for _, d in layer_shapes.values())
    key = (spec.vera.projection_prng_key, spec.r, d_in, d_out, str(device))
    projections = _SHARED_PROJECTIONS.get(key)
    if projections is None:
        generator = torch.Generator().manual_seed(spec.vera.projection_prng_key)
        vera_a = _peft_vera_init(spec.r, d_in, generator)
        vera_b = _peft_vera_init(d_out, spec.r, generator)
        projections = _Bases([vera_a.to(device), vera_b.to(device)])
        _SHARED_PROJECTIONS[key] = projections
    return projections


class VeraAdapter(Adapter):
    """VeRA (Kopiczko et al. 2024): frozen random A and B shared by every layer (sliced to each layer's shape) and by
    every job with the same key, scaled by trained vectors: A_eff = diag(d) A, B_eff = diag(b) B. d starts at
    `vera.d_initial`, b at zero (the adapter starts as the identity), as PEFT's VeraConfig does."""

    def __init__(self, spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int):
        super().__init__(spec, layer_shapes, seed)
        self.layer_shapes = dict(layer_shapes)
        self.projections = shared_projections(spec, self.layer_shapes, torch.device("cpu"))
        self.lambda_d = nn.ParameterList([torch.full((spec.r,), spec.vera.d_initial) for _ in layer_shapes])
        self.lambda_b = nn.ParameterList([torch.zeros(d_out) for _, d_out in layer_shapes.values()])

    def factors(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index[layer]
        lambda_d, lambda_b = self.lambda_d[i], self.lambda_b[i]
        if self.projections[0].device != lambda_d.device:  # the adapter moved (cohort.to(device)): follow it
            self.projections = shared_projections(self.spec, self.layer_shapes, lambda_d.device)
        d_in, d_out = self.layer_shapes[layer]
        vera_a, vera_b = self.projections
        return lambda_d[:, None] * vera_a[:, :d_in], lambda_b[:, None] * vera_b[:d_out]


def build_adapter(spec: AdapterSpec, layer_shapes: dict[str, tuple[int, int]], seed: int,
                  base_weights: dict[str, torch.Tensor] | None = None) -> Adapter:
    """`base_weights` (layer -> its [d_out, d_in] weight): needed by DoRA only (`AdapterSpec.use_dora`)."""
    if spec.use_dora:
        return LoraAdapter(spec, layer_shapes, seed, base_weights)
    kinds = {"lora": LoraAdapter, "nola": NolaAdapter, "vera": VeraAdapter}
    return kinds[spec.type](spec, layer_shapes, seed)
