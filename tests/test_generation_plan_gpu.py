"""The generation pool on a CUDA device (issue 18): the device memory the executor's pool takes is the bytes the
scheduler's plan reserved for it (`JobSize.pool_bytes`), and a batch generated between two training steps holds no
more than the pool besides what the step itself freed. Skipped on CPU (tests/test_generation_plan.py checks the
pool's size there)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, build_tiny_model, build_tokenizer, write_jsonl

from lorafleet.executor.cohort import Cohort
from lorafleet.executor.generate import GenerationRequest, Sampling
from lorafleet.executor.serving import GenerationServer
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.submission import plan_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_BLOCK = 512  # the caching allocator rounds each allocation up to this


def test_on_a_gpu_the_pool_takes_the_bytes_the_plan_reserved_and_generation_stays_within_the_step(tmp_path):
    model = build_tiny_model(tmp_path / "llama", "llama", hidden=128)
    dataset = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8, seed=1))
    spec = parse_spec({"base_model": str(model), "dataset": "d", "dtype": "bfloat16",
                       "hyperparameters": {"batch_size": 4, "max_seq_len": 256, "max_steps": 10}})
    reserved = plan_for(spec, model, 1000).size("bfloat16").pool_bytes
    cohort = Cohort(model, dtype="bfloat16", device="cuda")
    cohort.add_job("job", spec, dataset)
    torch.cuda.reset_peak_memory_stats()
    cohort.step()
    step_peak = torch.cuda.max_memory_allocated()
    before = torch.cuda.memory_allocated()
    generator = GenerationServer(None, "e1", None, tmp_path).generator_for(cohort)
    pool = torch.cuda.memory_allocated() - before
    assert reserved - generator.pool.page_bytes < pool <= reserved + CUDA_BLOCK
    prompt = tuple(build_tokenizer()("the quick brown fox")["input_ids"])
    torch.cuda.reset_peak_memory_stats()
    generator.generate([GenerationRequest(f"r{i}", prompt, "job", Sampling(max_tokens=32)) for i in range(8)])
    print(f"pool reserved {reserved} B, allocated {pool} B; step peak {step_peak} B, "
          f"generation peak {torch.cuda.max_memory_allocated()} B")
    assert torch.cuda.max_memory_allocated() <= step_peak + pool, "a batch between steps fits in what the step freed"
