"""The cohort engine on a CUDA device: bf16 compute, fp32 adapter weights, PEFT export, nf4 base. Skipped on CPU."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from helpers_models import alpaca_rows, llama, write_jsonl  # noqa: F401 (llama: a fixture)
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", alpaca_rows(12, seed=3))


def make_spec(model_dir, adapter=None, quantization="none", **hyperparameters):
    raw = {"base_model": str(model_dir), "dataset": "unused", "adapter": adapter or {}, "quantization": quantization}
    raw["hyperparameters"] = {"batch_size": 12, "learning_rate": 5e-2, "max_steps": 4, **hyperparameters}
    return parse_spec(raw)


def test_bf16_cohort_trains_and_exports(tmp_path, llama, dataset):
    cohort = Cohort(llama, device="cuda")
    assert next(cohort.model.parameters()).dtype == torch.bfloat16
    cohort.add_job("lora", make_spec(llama, adapter={"r": 8, "lora_dropout": 0.1}), dataset)
    cohort.add_job("nola", make_spec(llama, adapter={"type": "nola", "r": 4, "nola": {"num_basis": 8}}, seed=1), dataset)
    adapter_params = list(cohort.jobs["lora"].adapter.parameters())
    assert all(p.is_cuda and p.dtype == torch.float32 for p in adapter_params)
    history = {job_id: [] for job_id in cohort.jobs}
    while cohort.active_jobs():
        for job_id, result in cohort.step().items():
            assert result.error is None, result.error
            history[job_id].append(result.loss)
    for losses in history.values():
        assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
        assert losses[-1] < losses[0]  # each batch is the whole dataset

    directory = cohort.checkpoint("lora", tmp_path / "lora")
    sequence = cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    peft_model = PeftModel.from_pretrained(base, directory).eval()
    with torch.no_grad():
        want = peft_model(torch.tensor([sequence], device="cuda")).logits[0].float()
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = peft_model(torch.tensor([sequence], device="cuda")).logits[0].float()
    got = cohort.logits("lora", sequence).float()
    # bf16: PEFT runs the LoRA path in the adapter's fp32, we in the compute dtype; measured on CPU: 5% of the shift
    assert (got - want).abs().max() < 0.1 * (want - base_logits).abs().max()


def test_bf16_cohort_invariance_within_bf16_noise(llama, dataset):
    def losses(with_other: bool) -> list[float]:
        cohort = Cohort(llama, device="cuda")
        cohort.add_job("x", make_spec(llama, adapter={"r": 4}, batch_size=3, max_steps=6), dataset)
        if with_other:
            cohort.add_job("y", make_spec(llama, adapter={"r": 16, "target_modules": ["v_proj"]}, batch_size=5), dataset)
        out = []
        while "x" in cohort.active_jobs():
            out.append(cohort.step()["x"].loss)
        return out

    alone, together = losses(False), losses(True)
    assert together == pytest.approx(alone, rel=1e-2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_nf4_base_on_gpu(llama, dataset):
    cohort = Cohort(llama, quantization="nf4", device="cuda")
    assert type(cohort.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    cohort.add_job("job", make_spec(llama, adapter={"r": 4}, quantization="nf4"), dataset)
    losses = []
    while cohort.active_jobs():
        result = cohort.step()["job"]
        assert result.error is None, result.error
        losses.append(result.loss)
    assert len(losses) == 4 and losses[-1] < losses[0]
