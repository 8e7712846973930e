"""Every model family on a CUDA device, bf16, through the Triton path: a mixed cohort (a plain LoRA job, a variant
job and a DPO job) trains, its variant job trains in the cohort as it trains alone, and every job's export loads in
PEFT on the GPU with the cohort's logits. Skipped on CPU.

Importable without tests/conftest.py (`python3 -m pytest --noconftest`): the device image has no celery or redis.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_models import FAMILIES, MORE_FAMILIES, alpaca_rows, build_tiny_model, write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.executor.cohort import Cohort
from lorafleet.executor.model import packing_kwargs
from lorafleet.scheduler.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
DTYPE = torch.bfloat16  # what `dtype: auto` computes in on a GPU
STEPS = 4

# family -> the variant its second job trains (each variant on three families, the families' own layouts under it:
# fused qkv_proj, Conv1D, capped attention scores, a shared expert)
VARIANTS = {
    "llama": "dora", "mistral": "vera", "qwen2": "rslora+loraplus", "gemma": "dora", "qwen3": "vera",
    "gemma2": "dora", "gemma3": "rslora+loraplus", "phi3": "dora", "gpt2": "vera", "qwen2_moe": "rslora+loraplus",
}
ADAPTERS = {  # variant -> (adapter, learning rate)
    "lora": ({"r": 8}, 3e-3),
    "rslora+loraplus": ({"r": 8, "use_rslora": True, "loraplus_lr_ratio": 4.0}, 1e-3),
    "dora": ({"r": 8, "use_dora": True}, 3e-3),
    "vera": ({"type": "vera", "r": 16}, 5e-2),
}
PAIRS = [  # the DPO job's preference pairs: the whole set is one micro-batch
    {"prompt": "question: what is two plus two? answer:", "chosen": " four", "rejected": " the lazy dog"},
    {"prompt": "write a short poem about the sea:", "chosen": " the sky and the sea", "rejected": " no"},
    {"prompt": "the quick brown fox jumps over the", "chosen": " lazy dog", "rejected": " quick fox fox"},
    {"prompt": "a cohort of adapters trains on one", "chosen": " frozen base model", "rejected": " output input"},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {"sft": write_jsonl(root / "sft.jsonl", alpaca_rows(12, seed=3)),
            "dpo": write_jsonl(root / "pairs.jsonl", PAIRS)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """family -> (its base directory, the trained mixed cohort, job id -> its losses), built on first use."""
    runs = {}

    def run(family):
        if family not in runs:
            base = build_tiny_model(tmp_path_factory.mktemp(family), family, hidden=256, layers=2)
            cohort = Cohort(base, device=DEVICE)
            for job_id in ("lora", "variant", "dpo"):
                add_job(cohort, base, data, family, job_id)
            runs[family] = base, cohort, train(cohort)
        return runs[family]

    return run


def add_job(cohort: Cohort, base, data, family: str, job_id: str) -> None:
    """Job `lora` (plain LoRA), `variant` (the family's variant) or `dpo` (plain LoRA, method dpo), all-linear."""
    adapter, learning_rate = ADAPTERS[VARIANTS[family] if job_id == "variant" else "lora"]
    method = "dpo" if job_id == "dpo" else "sft"
    batch_size = len(PAIRS) if method == "dpo" else 12  # each batch is the whole dataset: the loss must fall
    seed = ("lora", "variant", "dpo").index(job_id)
    spec = parse_spec({"base_model": str(base), "dataset": "unused", "method": method,
                       "adapter": {**adapter, "target_modules": "all-linear"},
                       "hyperparameters": {"batch_size": batch_size, "learning_rate": learning_rate,
                                           "max_steps": STEPS, "seed": seed}})
    cohort.add_job(job_id, spec, data[method])


def train(cohort: Cohort) -> dict[str, list[float]]:
    history = {job_id: [] for job_id in cohort.jobs}
    while cohort.active_jobs():
        for job_id, result in cohort.step().items():
            assert result.error is None, result.error
            history[job_id].append(result.loss)
    return history


def peft_logits(base, adapter_dir, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of PEFT's model of the base plus the adapter, and of the bare base, on the GPU in bf16."""
    family = json.loads((base / "config.json").read_text())["model_type"]
    attention = "eager" if family == "gemma2" else "sdpa"  # Gemma 2's capped attention scores need eager
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPE, attn_implementation=attention).to(DEVICE)
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        want = peft_model(ids).logits[0].float()
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits[0].float()
    return want, plain


@torch.no_grad()
def base_logits(cohort: Cohort, input_ids: list[int]) -> torch.Tensor:
    """The bare base's logits in the cohort: between steps no row is routed to an adapter."""
    assert not cohort.routing.segments
    kwargs = packing_kwargs([len(input_ids)], cohort.device)
    return cohort.model(torch.tensor([input_ids], device=cohort.device), use_cache=False, **kwargs).logits[0].float()


def bf16_step(logits: torch.Tensor) -> torch.Tensor:
    """One rounding step of bf16 at the largest logit: two logits computed in bf16 may differ by that much alone
    (measured on the CPU in bf16: the exports' logits differ from PEFT's by 0.5-1 such step, the adapters moving them
    by 0.2-2.9)."""
    return torch.finfo(torch.bfloat16).eps * logits.abs().max()


def sentence_ids(cohort: Cohort) -> list[int]:
    return cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]


ALL_FAMILIES = FAMILIES + MORE_FAMILIES


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_mixed_bf16_cohort_of_each_family_trains_on_the_gpu(trained, family):
    _base, cohort, history = trained(family)
    assert next(cohort.model.parameters()).dtype == DTYPE and cohort.device.type == "cuda"
    assert all(p.is_cuda and p.dtype == torch.float32 for job in cohort.jobs.values() for p in job.adapter.parameters())
    for job_id, losses in history.items():
        assert len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), (job_id, losses)
        assert losses[-1] < losses[0], (job_id, losses)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_variant_job_trains_in_the_cohort_as_it_trains_alone(trained, data, family):
    base, cohort, history = trained(family)
    alone = Cohort(base, device=DEVICE)
    add_job(alone, base, data, family, "variant")
    alone_losses = train(alone)["variant"]
    # bf16: the cohort's kernels tile a longer packed row, so sums run in another order (tests/test_engine_gpu.py)
    assert history["variant"] == pytest.approx(alone_losses, rel=2e-2)
    ids = sentence_ids(cohort)
    together, by_itself = cohort.logits("variant", ids).float(), alone.logits("variant", ids).float()
    shift = (together - base_logits(cohort, ids)).abs().max()  # how far the adapter moves the logits
    assert shift > 0 and (together - by_itself).abs().max() < bf16_step(together) + 0.1 * shift, family


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_each_jobs_export_loads_in_peft_on_the_gpu_with_the_cohorts_logits(trained, family, tmp_path):
    base, cohort, _history = trained(family)
    sequence = sentence_ids(cohort)
    ids = torch.tensor([sequence], device=DEVICE)
    for job_id in cohort.jobs:
        want, plain = peft_logits(base, cohort.export(job_id, tmp_path / job_id), ids)
        got = cohort.logits(job_id, sequence).float()
        # bf16 noise: the bare bases already differ (other kernels: fused decoder, varlen attention), and PEFT runs
        # the adapters in their fp32, the cohort in the compute dtype (tests/test_variants_gpu.py)
        base_noise = (base_logits(cohort, sequence) - plain).abs().max()
        assert base_noise < 5e-2 * plain.abs().max(), (family, job_id)  # the same base, to bf16 noise
        shift = (want - plain).abs().max()
        assert shift > 0 and (got - want).abs().max() < base_noise + bf16_step(want) + 0.1 * shift, (family, job_id)
