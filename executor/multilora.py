"""The multi-adapter layer: a frozen base linear plus the LoRA deltas of every job that targets it.

In a packed cohort batch job j owns a contiguous run of rows; the layer computes

    y = base(x) + lora_delta(dropped_x, segments, As, Bs, scales)

over the jobs that target it (a job that does not target this layer simply has no segment here). Which rows
belong to which job is one `RowRouting` object shared by every layer, set by the cohort before each forward. The
layer holds references to the jobs' adapters, never their parameters, so jobs join and leave without touching the
model's own state.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafleet.executor.adapters import Adapter
from lorafleet.executor.dora import dora_extra
from lorafleet.kernels import (
    FrozenWeight,
    LoraDropout,
    lora_delta,
    lora_linear,
    lora_linear_multi,
    triton_enabled,
)
from lorafleet.scheduler.spec import ALL_LINEAR


class RowRouting:
    """Job id -> (start, end) rows of the flattened packed batch, for the forward under way; on the kernel path also
    every job's dropout seed for it (int64, in the order of `segments`), drawn from the job's own generator.

    `pooled`, set by generation for its forwards (executor/generate.py): pooled(layer name, x [T, d_in], y [T, d_out])
    adds into y the deltas of the adapters it reads from its page pool (loaded adapters, which are in no layer's
    `adapters`), for every layer after its jobs' deltas."""

    def __init__(self):
        self.segments: dict[str, tuple[int, int]] = {}
        self.dropout_seeds: torch.Tensor | None = None
        self.pooled: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None

    def seeds_of(self, jobs: list[str]) -> torch.Tensor:
        if self.dropout_seeds is None:
            raise RuntimeError("jobs with dropout need this forward's seeds in RowRouting.dropout_seeds "
                               "(Cohort.dropout_seeds(batch) draws them)")
        if len(jobs) == len(self.segments):  # every job of the forward (jobs keep the order of `segments`)
            return self.dropout_seeds
        order = list(self.segments)
        index = torch.tensor([order.index(job) for job in jobs], device=self.dropout_seeds.device)
        return self.dropout_seeds[index]


class MultiLoraLinear(nn.Module):
    def __init__(self, base: nn.Module, name: str, routing: RowRouting):
        super().__init__()
        self.base = base
        self.name = name
        self.routing = routing
        # transformers' Conv1D (GPT-2) holds its weight transposed, [in, out]; the LoRA factors are the same
        self.in_features, self.out_features = (base.weight.shape if is_conv1d(base)
                                               else (base.in_features, base.out_features))
        self.adapters: dict[str, Adapter] = {}
        # Which projection, for the dropout masks drawn in the kernels: the same seeds give each layer its own mask.
        self.dropout_stream = zlib.crc32(name.encode())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_pooled(x, self._forward_jobs(x))

    def _forward_jobs(self, x: torch.Tensor) -> torch.Tensor:
        jobs = [job for job in self.routing.segments if job in self.adapters]
        if not jobs:
            return self.base(x)
        dora_jobs = [job for job in jobs if self.adapters[job].use_dora]
        if dora_jobs:
            return self._forward_dora(x, [job for job in jobs if job not in dora_jobs], dora_jobs)
        return self._forward_lora(x, jobs)

    def add_pooled(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y with the routing's pooled adapters' deltas added in place (none outside generation)."""
        if self.routing.pooled is not None:
            self.routing.pooled(self.name, x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]))
        return y

    def _forward_dora(self, x: torch.Tensor, lora_jobs: list[str], dora_jobs: list[str]) -> torch.Tensor:
        """The LoRA jobs as always (kernels or reference), then DoRA's part on its jobs' rows (executor/dora.py)."""
        y = self._forward_lora(x, lora_jobs) if lora_jobs else self.base(x)
        adapters = [self.adapters[job] for job in dora_jobs]
        factors = [(*adapter.factors(self.name), adapter.magnitudes()[self.name]) for adapter in adapters]
        extra = dora_extra(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), self.base_weight().to(x.dtype),
                           self.base.bias, [self.routing.segments[job] for job in dora_jobs], factors,
                           self._scales(adapters), self._dropout(dora_jobs, adapters))
        return y + extra.view(y.shape)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [d_out, d_in] (a view; Conv1D holds it transposed)."""
        return self.base.weight.t() if isinstance(self.base, Conv1D) else self.base.weight

    def _forward_lora(self, x: torch.Tensor, jobs: list[str]) -> torch.Tensor:
        if triton_enabled(x):
            return self._forward_kernels(x, jobs)
        # The base first, then the adapters, as PEFT builds its graph: autograd then sums x's gradients in the same
        # order, and a job matches plain PEFT training to rounding.
        y = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        segments = [self.routing.segments[job] for job in jobs]
        adapters = [self.adapters[job] for job in jobs]
        lora_a, lora_b = self._factors(adapters)
        lora_a, lora_b = [a.to(flat.dtype) for a in lora_a], [b.to(flat.dtype) for b in lora_b]
        delta = lora_delta(flat, segments, lora_a, lora_b, self._scales(adapters), dropout=self._dropout(jobs, adapters))
        return y + delta.view(y.shape)

    def _forward_kernels(self, x: torch.Tensor, jobs: list[str]) -> torch.Tensor:
        """The Triton path: the kernels read the fp32 master weights and cast them themselves, draw the dropout masks
        themselves, and share one tensor between the base output and the delta (with a plain linear or, training, an
        nf4 base: `fused_base_weight`, between the base dX and the LoRA dX too); other bases (int8, Conv1D) give
        their own output and the delta is added into it."""
        flat = x.reshape(-1, x.shape[-1])
        segments = [self.routing.segments[job] for job in jobs]
        adapters = [self.adapters[job] for job in jobs]
        lora_a, lora_b = self._factors(adapters)
        scales = self._scales(adapters)
        dropout = self._dropout(jobs, adapters)
        weight = fused_base_weight(self.base, flat.dtype)
        if weight is not None:
            y = lora_linear(flat, weight, fused_base_bias(self.base, flat.dtype), segments, lora_a, lora_b, scales,
                            dropout=dropout)
        else:
            y = self.base(flat)
            lora_delta(flat, segments, lora_a, lora_b, scales, out=y, dropout=dropout)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _factors(self, adapters) -> tuple[list, list]:
        factors = [adapter.factors(self.name) for adapter in adapters]
        return [a for a, _ in factors], [b for _, b in factors]

    @staticmethod
    def _scales(adapters) -> list[float]:
        return [adapter.scale for adapter in adapters]

    def _dropout(self, jobs: list[str], adapters) -> LoraDropout | None:
        """This layer's dropout for the forward under way: each job's probability (0 in eval mode), the jobs' seeds
        for it and this layer's stream; None when no job drops."""
        probs = tuple(adapter.dropout if adapter.training else 0.0 for adapter in adapters)
        if not any(probs):
            return None
        return LoraDropout(probs, self.routing.seeds_of(jobs), self.dropout_stream)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, jobs={sorted(self.adapters)}"


def shared_input_projections(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of layers that all read `x` (q/k/v; gate/up), the same as `[layer(x) for layer in layers]`.

    On the kernel path, when they are multi-adapter layers over bases the node takes (`fused_base_weight`: plain
    linear, or nf4 while training) serving the same jobs without dropout (every job targets all of them: the usual
    all-projections LoRA), one `lora_linear_multi` node reads x once for all their adapters and forms one input
    gradient; otherwise each layer runs on its own.
    """
    if not triton_enabled(x) or not all(type(layer) is MultiLoraLinear for layer in layers):
        return [layer(x) for layer in layers]
    routing = layers[0].routing
    jobs = [job for job in routing.segments if job in layers[0].adapters]
    adapters = [[layer.adapters.get(job) for job in jobs] for layer in layers]
    weights = [fused_base_weight(layer.base, x.dtype) for layer in layers]
    if (
        not jobs
        or any(weight is None for weight in weights)
        or any(layer.routing is not routing for layer in layers)
        or any(len(layer.adapters.keys() & routing.segments.keys()) != len(jobs) for layer in layers)
        or any(adapter is None or adapter.dropout > 0 or adapter.use_dora for per_layer in adapters
               for adapter in per_layer)
    ):
        return [layer(x) for layer in layers]
    flat = x.reshape(-1, x.shape[-1])
    factors = [layer._factors(per_layer) for layer, per_layer in zip(layers, adapters)]
    outputs = lora_linear_multi(
        flat, weights, [fused_base_bias(layer.base, x.dtype) for layer in layers],
        [routing.segments[job] for job in jobs], [a for a, _ in factors], [b for _, b in factors],
        MultiLoraLinear._scales(adapters[0]),
    )
    return [layer.add_pooled(x, y.view(*x.shape[:-1], y.shape[-1])) for layer, y in zip(layers, outputs)]


@dataclass(frozen=True)
class Dequantized4bit:
    """A bitsandbytes Linear4bit's frozen weight as the kernels' `DenseOnDemand`: each `dense()` dequantizes it into
    the compute dtype as bitsandbytes' own layer does for a training-sized batch (`dequantize_4bit(weight, quant_state)`
    then a cast: MatMul4Bit's backward verbatim; its forward's dequantize + F.linear, which on CUDA serves past 1536
    rows, reads the same values), so the node's numbers are the layer's; nothing dequantized outlives the GEMM that
    reads it."""

    weight: nn.Parameter  # bitsandbytes' Params4bit: packed 4-bit data with its quant_state
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.quant_state.shape)

    def dense(self) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.weight.data, self.weight.quant_state).to(self.dtype)


def fused_base_weight(base: nn.Module, dtype: torch.dtype) -> FrozenWeight | None:
    """`base`'s frozen weight as the kernels' one-node layer (`lora_linear(_multi)`) takes it for an input of `dtype`,
    or None where the base runs as its own module and the deltas are added into its output.

    A plain nn.Linear gives its weight. A bitsandbytes Linear4bit (nf4) gives a `Dequantized4bit` while autograd
    records (training: the node saves the separate output and input-gradient passes, and never keeps the dequantized
    weight); under no_grad (generation) bitsandbytes' own inference kernels, which read the 4-bit weight without
    materialising it, serve, as they do where the layer computes in another dtype or bitsandbytes repacked the weight
    for its CPU kernel. Linear8bitLt (int8) keeps its own layer: its matmul splits outlier columns off and is no GEMM
    of one dense weight. Conv1D (GPT-2) holds its weight transposed and keeps its own layer too."""
    if type(base) is nn.Linear:
        return base.weight
    if not torch.is_grad_enabled() or not _is_linear4bit(base) or base.compute_dtype != dtype:
        return None
    quant_state = getattr(base.weight, "quant_state", None)
    if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
        return None
    return Dequantized4bit(base.weight, dtype)


def fused_base_bias(base: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """The bias the node adds (in the compute dtype, as Linear4bit casts its own; a no-op for a plain linear)."""
    return None if base.bias is None else base.bias.to(dtype)


def _is_linear4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def _is_linear(module: nn.Module) -> bool:
    """What PEFT calls a linear layer: nn.Linear, transformers' Conv1D, bitsandbytes' quantized linears."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a plain-name target: the module's name is the target or ends with '.' + target."""
    return module_name == target or module_name.endswith("." + target)


def all_linear_names(model: nn.Module) -> tuple[str, ...]:
    """PEFT's `all-linear`: the names of every linear layer but the LM head (the output embedding)."""
    head = model.get_output_embeddings()
    wrapped = {id(module.base) for module in model.modules() if isinstance(module, MultiLoraLinear)}
    return tuple(sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                         if module is not head and id(module) not in wrapped
                         and (_is_linear(module) or isinstance(module, MultiLoraLinear))}))


def wrap_targets(model: nn.Module, targets: tuple[str, ...], routing: RowRouting) -> dict[str, MultiLoraLinear]:
    """Wrap (once) every linear layer that one of `targets` names (or every one but the LM head, for
    `("all-linear",)`); return name -> layer for all of them.

    Raises ValueError when a target names no module or a module that is not a linear layer.
    """
    if targets == (ALL_LINEAR,):
        targets = all_linear_names(model)
    layers: dict[str, MultiLoraLinear] = {}
    found = set()
    for name, module in list(model.named_modules()):
        target = next((t for t in targets if matches(name, t)), None)
        if target is None:
            continue
        found.add(target)
        if not isinstance(module, MultiLoraLinear):
            if not _is_linear(module):
                raise ValueError(f"target module {target!r}: {name} is a {type(module).__name__}, not a linear layer")
            parent_name, _, child = name.rpartition(".")
            module = MultiLoraLinear(module, name, routing)
            setattr(model.get_submodule(parent_name), child, module)
        layers[name] = module
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"target modules {missing} match no module of the base model")
    return layers
