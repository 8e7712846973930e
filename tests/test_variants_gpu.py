"""LoRA variants on a CUDA device: bf16 compute, the kernels for the LoRA rows and DoRA's rows in PyTorch in one step,
fused AdamW over LoRA+'s groups, VeRA's projections following the adapter to the GPU. Skipped on CPU."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_models import alpaca_rows, llama, write_jsonl  # noqa: F401 (llama: a fixture)
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ADAPTERS = {  # job -> (adapter, learning rate)
    "lora": ({"r": 8}, 5e-2),
    "rslora+loraplus": ({"r": 8, "use_rslora": True, "loraplus_lr_ratio": 4.0}, 2e-2),
    "dora": ({"r": 8, "use_dora": True, "lora_dropout": 0.1}, 1e-2),
    "vera": ({"type": "vera", "r": 16}, 5e-2),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", alpaca_rows(12, seed=3))


def test_a_bf16_cohort_of_every_variant_trains_and_loads_in_peft(tmp_path, llama, dataset):
    cohort = Cohort(llama, device="cuda")
    for seed, (job_id, (adapter, learning_rate)) in enumerate(ADAPTERS.items()):
        spec = parse_spec({"base_model": str(llama), "dataset": "unused", "adapter": adapter, "hyperparameters": {
            "batch_size": 12, "learning_rate": learning_rate, "max_steps": 4, "seed": seed}})
        cohort.add_job(job_id, spec, dataset)
    assert all(p.is_cuda and p.dtype == torch.float32 for job in cohort.jobs.values() for p in job.adapter.parameters())
    history = {job_id: [] for job_id in cohort.jobs}
    while cohort.active_jobs():
        for job_id, result in cohort.step().items():
            assert result.error is None, result.error
            history[job_id].append(result.loss)
    for job_id, losses in history.items():
        assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), job_id
        assert losses[-1] < losses[0], (job_id, losses)  # each batch is the whole dataset

    sequence = cohort.tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    ids = torch.tensor([sequence], device="cuda")
    for job_id in ADAPTERS:
        directory = cohort.export(job_id, tmp_path / job_id)
        base = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        peft_model = PeftModel.from_pretrained(base, directory).eval()
        with torch.no_grad():
            want = peft_model(ids).logits[0].float()
            with peft_model.disable_adapter():
                base_logits = peft_model(ids).logits[0].float()
        got = cohort.logits(job_id, sequence).float()
        # bf16: PEFT runs the adapters in their fp32, we in the compute dtype (as tests/test_engine_gpu.py)
        shift = (want - base_logits).abs().max()
        assert shift > 0 and (got - want).abs().max() < 0.1 * shift, job_id
