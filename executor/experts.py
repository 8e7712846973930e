"""LoRA on a MoE block's routed experts: many jobs' per-expert deltas over one fused experts module.

In transformers 5 a MoE block's routed experts are one module holding two fused 3-D parameters, `gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I] (Qwen2-MoE, Mixtral, ...), not linear layers; PEFT adapts them with
`target_parameters` (its `ParamWrapper`). A job that targets one of them owns, per expert e, a pair A_e [r, d_in],
B_e [d_out, r], and the tokens its rows route to expert e use W_e + s·B_e A_e, as PEFT computes them. The factors
are held as PEFT holds them, so export is a rename: A [E·r, d_in] (expert e's rows e·r..e·r+r-1) and B [d_out, r·E]
(expert e's columns e, e+E, e+2E, ...: PEFT's `B.view(d_out, r, E)[..., e]`).

`MultiLoraExperts` replaces the experts module. The rows of each job with an adapter here go through our own forward,
one job at a time: its (token, expert) pairs sorted by expert, then per fused parameter one grouped matmul over the
experts with the frozen weight (as transformers' grouped_mm path) and, when the job targets it, two thin grouped
matmuls with its factors, x A_eᵀ then (·) B_eᵀ·s, before the activation for gate_up_proj and after it for down_proj.
The other rows go through the base module's own forward (whichever experts implementation transformers picked), so a
job without an adapter here computes what it computes alone. Each job's numbers come from its own rows only, so a job
computes the same alone or in any cohort, and gradients reach only its own factors. Cost: per adapted job and layer
about six grouped matmuls instead of the base's two over its tokens (the thin ones carry r / d of the FLOPs), no host
sync on the GPU; no Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.executor.multilora import MultiLoraLinear, RowRouting
from lorafleet.scheduler.base_modules import FUSED_EXPERT_PARAMETERS, name_matches

# A job's expert factors are drawn from their own stream, not the one its linear layers' A's come from (job seeds
# are below 2**31, so this never meets another job's stream).
_EXPERT_INIT_SEED_OFFSET = 1 << 32


def check_experts_module(module: nn.Module, key: str) -> None:
    """Raise ValueError unless `module` (owning the targeted parameter `key`) is a fused experts module laid out as
    this layer computes it: gate_up_proj [E, 2I, H] (gate and up concatenated), down_proj [E, H, I], no biases."""
    params = dict(module.named_parameters(recurse=False))
    fits = (
        set(params) == set(FUSED_EXPERT_PARAMETERS)
        and all(p.dim() == 3 for p in params.values())
        and hasattr(module, "act_fn")
        and not getattr(module, "is_transposed", False)
        and getattr(module, "is_concatenated", True)
        and getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False)
    )
    if not fits:
        raise ValueError(
            f"target parameter {key}: {type(module).__name__} is not a fused experts module lorafleet can adapt "
            f"(it needs {' and '.join(FUSED_EXPERT_PARAMETERS)} as 3-D [experts, out, in] parameters, gate and up "
            f"concatenated, no biases: Qwen2-MoE's or Mixtral's)"
        )


class ExpertFactors(nn.Module):
    """One job's LoRA factors of every expert parameter it targets, in PEFT's layout (module docstring), initialised
    as PEFT initialises them: A kaiming-uniform(a=sqrt(5)) over [E·r, d_in], i.e. U(±1/sqrt(d_in)); B zeros."""

    def __init__(self, shapes: dict[str, tuple[int, int, int]], r: int, seed: int):
        """`shapes`: parameter key (its module's name + '.' + its name) -> (experts, d_in, d_out), in model order."""
        super().__init__()
        self.names = list(shapes)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.shapes = dict(shapes)
        self.r = r
        init = torch.Generator().manual_seed(seed + _EXPERT_INIT_SEED_OFFSET)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for experts, d_in, d_out in shapes.values():
            weight = torch.empty(experts * r, d_in)
            nn.init.kaiming_uniform_(weight, a=5**0.5, generator=init)
            self.lora_A.append(weight)
            self.lora_B.append(torch.zeros(d_out, r * experts))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert: A [E, r, d_in], B [E, d_out, r] (views of the stored PEFT-layout factors)."""
        i = self._index[name]
        experts, d_in, d_out = self.shapes[name]
        lora_a = self.lora_A[i].view(experts, self.r, d_in)
        lora_b = self.lora_B[i].view(d_out, self.r, experts).permute(2, 0, 1)
        return lora_a, lora_b

    @torch.no_grad()
    def peft_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Parameter key -> (lora_A [E·r, d_in], lora_B [d_out, r·E]) as PEFT's ParamWrapper holds them."""
        return {name: (a.detach().clone(), b.detach().clone())
                for name, a, b in zip(self.names, self.lora_A, self.lora_B)}


def attach_expert_factors(adapter: nn.Module, layers: dict[str, "MultiLoraExperts"], seed: int) -> None:
    """Give a job's adapter its factors for the expert parameters in `layers` (parameter key -> its layer); the
    adapter then trains, checkpoints and exports them with its other parameters."""
    if layers:
        shapes = {key: layer.parameter_shape(key) for key, layer in layers.items()}
        adapter.expert_factors = ExpertFactors(shapes, adapter.spec.r, seed)


def expert_factors_of(adapter: nn.Module) -> ExpertFactors | None:
    """The adapter's expert factors, None when its job targets no expert parameter."""
    return adapter._modules.get("expert_factors")


def _inside_a_wrapper(model: nn.Module) -> set[int]:
    """The modules that a multi-adapter layer wraps: their parameters are the base's, named under `.base`."""
    return {id(module.base) for module in model.modules() if isinstance(module, (MultiLoraExperts, MultiLoraLinear))}


def wrap_expert_targets(model: nn.Module, targets: tuple[str, ...], routing: RowRouting
                        ) -> dict[str, "MultiLoraExperts"]:
    """Wrap (once) every experts module owning a parameter that one of `targets` names by PEFT's rule for
    `target_parameters` (the key `<module>.<parameter>` is the target or ends with '.' + target); return
    parameter key -> its layer, in model order.

    Raises ValueError when a target names no parameter, or a parameter that is not a fused experts parameter.
    """
    layers: dict[str, MultiLoraExperts] = {}
    found = set()
    wrapped = _inside_a_wrapper(model)
    for module_name, module in list(model.named_modules()):
        if id(module) in wrapped:
            continue
        owner = module.base if isinstance(module, MultiLoraExperts) else module
        for param_name, _ in list(owner.named_parameters(recurse=False)):
            key = f"{module_name}.{param_name}"
            target = next((t for t in targets if name_matches(key, t)), None)
            if target is None:
                continue
            found.add(target)
            if not isinstance(module, MultiLoraExperts):
                check_experts_module(module, key)
                parent_name, _, child = module_name.rpartition(".")
                module = MultiLoraExperts(module, module_name, routing)
                setattr(model.get_submodule(parent_name), child, module)
            layers[key] = module
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"target parameters {missing} match no parameter of the base model")
    return layers


def _row_index(ranges: list[tuple[int, int]], device) -> torch.Tensor:
    return torch.cat([torch.arange(start, end, device=device) for start, end in ranges]) if ranges else (
        torch.empty(0, dtype=torch.long, device=device))


def _uncovered(ranges: list[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """The ranges of [0, total) that `ranges` (disjoint) leave out."""
    gaps, position = [], 0
    for start, end in sorted(ranges):
        if start > position:
            gaps.append((position, start))
        position = max(position, end)
    if position < total:
        gaps.append((position, total))
    return gaps


class MultiLoraExperts(nn.Module):
    """A fused experts module plus the per-expert LoRA deltas of every job that targets one of its parameters
    (module docstring). Called as the experts module is: (hidden_states [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H], the T rows being the packed batch's, routed to jobs by `routing`."""

    def __init__(self, base: nn.Module, name: str, routing: RowRouting):
        super().__init__()
        self.base = base
        self.name = name
        self.routing = routing
        self.num_experts = base.gate_up_proj.shape[0]
        self.adapters: dict[str, nn.Module] = {}

    def parameter_shape(self, key: str) -> tuple[int, int, int]:
        """(experts, d_in, d_out) of the parameter `key` (stored [experts, d_out, d_in])."""
        experts, d_out, d_in = getattr(self.base, key.rpartition(".")[2]).shape
        return experts, d_in, d_out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        jobs = [job for job in self.routing.segments if job in self.adapters]
        if not jobs:
            return self.base(hidden_states, top_k_index, top_k_weights)
        segments = [self.routing.segments[job] for job in jobs]
        adapted = _row_index(segments, hidden_states.device)
        out = hidden_states.new_zeros(hidden_states.shape)
        out = out.index_copy(0, adapted, self._forward_adapted(
            hidden_states[adapted], top_k_index[adapted], top_k_weights[adapted], jobs,
            [end - start for start, end in segments]))
        others = _uncovered(segments, hidden_states.shape[0])
        if others:  # the rows of jobs without an adapter here: the base module's own forward, as alone
            rows = _row_index(others, hidden_states.device)
            out = out.index_copy(0, rows, self.base(hidden_states[rows], top_k_index[rows], top_k_weights[rows]))
        return out

    def _forward_adapted(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                         jobs: list[str], lengths: list[int]) -> torch.Tensor:
        """The experts over the rows of `jobs` (x: their rows back to back, `lengths` each), with their deltas."""
        outputs, start = [], 0
        for job, length in zip(jobs, lengths):
            rows = slice(start, start + length)
            outputs.append(self._forward_job(self.adapters[job], x[rows], top_k_index[rows], top_k_weights[rows]))
            start += length
        return torch.cat(outputs)

    def _forward_job(self, adapter: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
        """One job's rows through the experts with its deltas: its (row, k) pairs sorted by expert, one grouped
        matmul over the experts for each frozen weight and each factor. A job's numbers are computed from its own
        rows alone, so they do not depend on which other jobs share the step."""
        rows, top_k = top_k_index.shape
        experts = top_k_index.reshape(-1)  # one entry per (row, k) pair, row-major
        order = torch.argsort(experts, stable=True)
        offsets = torch.bincount(experts, minlength=self.num_experts).cumsum(0).to(torch.int32)
        pairs = x[order // top_k]
        factors = expert_factors_of(adapter)
        gate_up = self._projection(pairs, "gate_up_proj", offsets, factors, adapter.scale)
        gate, up = gate_up.chunk(2, dim=-1)
        down = self._projection(self.base.act_fn(gate) * up, "down_proj", offsets, factors, adapter.scale)
        per_pair = down.new_empty(down.shape).index_copy(0, order, down)
        weighted = per_pair.view(rows, top_k, -1) * top_k_weights.unsqueeze(-1)
        return weighted.sum(dim=1).to(x.dtype)

    def _projection(self, pairs: torch.Tensor, parameter: str, offsets: torch.Tensor, factors: ExpertFactors | None,
                    scale: float) -> torch.Tensor:
        """`pairs` (sorted by expert, `offsets` the experts' ends) times the frozen expert weight, plus the job's
        delta s·(x A_eᵀ) B_eᵀ when it targets this parameter."""
        y = _grouped_linear(pairs, getattr(self.base, parameter), offsets)
        key = f"{self.name}.{parameter}"
        if factors is None or key not in factors.shapes:
            return y
        lora_a, lora_b = factors.factors(key)
        # r padded to a multiple of 8 with zeros (exact), for the grouped matmul's 16-byte alignment in bf16; B's
        # per-expert view is strided (PEFT's layout), the grouped matmul needs its rows or columns dense
        pad = -factors.r % 8
        lora_a = F.pad(lora_a.to(pairs.dtype), (0, 0, 0, pad)).contiguous()
        lora_b = F.pad(lora_b.to(pairs.dtype), (0, pad)).contiguous()
        return y + _grouped_linear(_grouped_linear(pairs, lora_a, offsets), lora_b, offsets) * scale


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, d_in] sorted by expert, weight [E, d_out, d_in], offsets [E] (int32) each expert's end in x -> [S, d_out]:
    rows of expert e times weight[e]ᵀ. torch's grouped matmul where it runs (bf16 on a GPU, any float on the CPU),
    else a loop over the experts."""
    if weight.device.type == "cpu" or weight.dtype == torch.bfloat16:
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    parts, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        parts.append(F.linear(x[start:end], weight[expert]))
        start = end
    return torch.cat(parts)
