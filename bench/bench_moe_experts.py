"""What LoRA on a MoE block's routed experts costs (executor/experts.py): one experts layer's forward + backward.

    python -P bench/bench_moe_experts.py [--tokens 8192] [--device cuda]

One Qwen1.5-MoE-A2.7B experts module (60 experts, 4 a token, hidden 2048, expert width 1408; random bf16 weights,
random hidden states routed by its own router), timed three ways over the same tokens, each job an equal share of
them: the base module alone (transformers' experts implementation, grouped_mm where it runs), and `MultiLoraExperts`
with 4 jobs of which 1 or all 4 adapt both expert parameters (r=16), and with 16 jobs all adapting them. The input
requires grad, as inside a model whose earlier layers train. Also checks one job's rows against the experts with
its merged weights W + s·BA in fp32. Prints JSON: milliseconds per forward + backward (mean of 10 after 3 warm-up)
and peak GiB.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import transformers
from torch import nn
from transformers import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from lorafleet.executor.experts import ExpertFactors, MultiLoraExperts
from lorafleet.executor.multilora import RowRouting

RANK, SCALE = 16, 2.0


class JobAdapter(nn.Module):
    """What the layer reads of a job's adapter: its expert factors and its scale."""

    def __init__(self, factors: ExpertFactors):
        super().__init__()
        self.expert_factors = factors
        self.scale = SCALE


def mean_ms(step, device, repeats: int = 10) -> float:
    for _ in range(3):
        step()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return (time.perf_counter() - start) / repeats * 1e3


def job_factors(config, seed: int, device) -> ExpertFactors:
    experts, hidden, width = config.num_experts, config.hidden_size, config.moe_intermediate_size
    factors = ExpertFactors({"experts.gate_up_proj": (experts, hidden, 2 * width),
                             "experts.down_proj": (experts, width, hidden)}, RANK, seed).to(device)
    for lora_b in factors.lora_B:  # B starts at zero: give it values, so the deltas are computed and checked
        lora_b.data.normal_(0, 0.01)
    return factors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = Qwen2MoeConfig(hidden_size=2048, moe_intermediate_size=1408, num_experts=60, num_experts_per_tok=4,
                            shared_expert_intermediate_size=5632, intermediate_size=5632)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    block = Qwen2MoeSparseMoeBlock(config).to(device, torch.bfloat16)
    for param in block.parameters():
        param.data.normal_(0, 0.02)
        param.requires_grad_(False)
    x = torch.randn(args.tokens, config.hidden_size, device=device, dtype=torch.bfloat16)
    _, weights, experts = block.gate(x)
    routing = RowRouting()
    layer = MultiLoraExperts(block.experts, "experts", routing)

    def step(module):
        def run():
            hidden = x.detach().requires_grad_()
            module(hidden, experts, weights).float().square().mean().backward()
        return run

    results = {"transformers": transformers.__version__, "tokens": args.tokens,
               "base_fwd_bwd_ms": mean_ms(step(block.experts), device)}
    for jobs, adapted in ((4, 1), (4, 4), (16, 16)):
        share = args.tokens // jobs
        routing.segments = {f"job{i}": (i * share, (i + 1) * share) for i in range(jobs)}
        layer.adapters = {f"job{i}": JobAdapter(job_factors(config, i, device)) for i in range(adapted)}
        results[f"{adapted}_of_{jobs}_jobs_fwd_bwd_ms"] = mean_ms(step(layer), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            step(layer)()
            results[f"{adapted}_of_{jobs}_jobs_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    results["job0_relative_error_vs_merged_fp32"] = merged_error(block, layer, x, experts, weights, share)
    print(json.dumps(results, indent=1))


def merged_error(block, layer, x, experts, weights, rows: int) -> float:
    """Job 0's rows through `layer` against the experts with W + s·BA merged, in fp32."""
    merged = copy.deepcopy(block.experts).float()
    factors = layer.adapters["job0"].expert_factors
    for name in ("gate_up_proj", "down_proj"):
        lora_a, lora_b = factors.factors(f"experts.{name}")
        getattr(merged, name).data += SCALE * torch.bmm(lora_b.float(), lora_a.float())
    merged.config._experts_implementation = "eager"
    with torch.no_grad():
        want = merged(x[:rows].float(), experts[:rows], weights[:rows].float())
        got = layer(x, experts, weights)[:rows].float()
    return ((got - want).norm() / want.norm()).item()


if __name__ == "__main__":
    main()
