"""MoE experts as adapter targets (`target_parameters`) on a CUDA device, bf16 (the grouped-matmul path): an experts
job trains in a cohort beside a plain job and one on the experts of one layer, and its export loads in PEFT on the GPU
with the cohort's logits. Skipped on CPU.

Importable without tests/conftest.py (`python3 -m pytest --noconftest`): the device image has no celery or redis.
"""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, build_tiny_model, write_jsonl
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def spec(model_dir, adapter, **hyperparameters):
    return parse_spec({"base_model": str(model_dir), "dataset": "unused", "adapter": adapter,
                       "hyperparameters": {"batch_size": 4, "max_steps": 6, "learning_rate": 2e-2,
                                           "lr_scheduler": "constant", **hyperparameters}})


def test_an_experts_job_trains_in_a_bf16_cohort_and_loads_in_peft_with_its_logits(tmp_path):
    model_dir = build_tiny_model(tmp_path / "base", "qwen2_moe")
    data = write_jsonl(tmp_path / "x.jsonl", alpaca_rows(24, seed=1))
    cohort = Cohort(model_dir, device="cuda")
    assert cohort.model.dtype == torch.bfloat16
    cohort.add_job("x", spec(model_dir, {"r": 4, "lora_alpha": 16, "target_modules": [], "target_parameters": EXPERTS},
                             seed=1), data)
    cohort.add_job("plain", spec(model_dir, {"r": 8, "target_modules": ["q_proj", "down_proj"]}, seed=2), data)
    cohort.add_job("one", spec(model_dir, {"r": 16, "target_modules": ["o_proj"],
                                           "target_parameters": ["model.layers.1.mlp.experts.down_proj"]}, seed=3), data)
    losses = []
    while cohort.active_jobs():
        results = cohort.step()
        assert all(result.error is None for result in results.values())
        losses.append(results["x"].loss)
    assert losses[-1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
    ids = cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    with torch.no_grad():
        plain = base(torch.tensor([ids], device="cuda")).logits[0].float()
        peft_model = PeftModel.from_pretrained(base, cohort.export("x", tmp_path / "x")).eval()
        want = peft_model(torch.tensor([ids], device="cuda")).logits[0].float()
    got = cohort.logits("x", ids).float()
    moved = (want - plain).abs().max()
    assert moved > 0.05, "the adapter moves the logits"
    assert (got - want).abs().max() < 0.1 * moved, "bf16: the cohort's logits are PEFT's, to rounding"
