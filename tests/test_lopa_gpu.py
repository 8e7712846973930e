"""LoPA jobs on a GPU: a cohort that holds one steps eagerly (no CUDA graph), trains it beside a LoRA job in bf16,
and takes the graph again once it has left; beside a LoPA job a LoRA job trains as alone (fp32, within rounding:
other row counts may pick other GEMM kernels on a GPU, so not bitwise as on the CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, llama, write_jsonl  # noqa: F401 (llama: a fixture)

from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler.spec import parse_spec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LOPA = {"type": "lopa", "lopa": {"num_virtual_tokens": 4, "rank": 2, "head_size": 16}}


def spec(model_dir, adapter, dtype="auto", **hyperparameters):
    # batch_size = the whole set: every step draws the same sequences in another order, so the layout repeats
    return parse_spec({"base_model": str(model_dir), "dataset": "unused", "adapter": adapter, "dtype": dtype,
                       "hyperparameters": {"batch_size": 8, "learning_rate": 2e-2, "max_steps": 8,
                                           **hyperparameters}})


def test_a_cohort_with_a_lopa_job_steps_eagerly_and_graphs_again_once_it_left(llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8, seed=5))
    cohort = Cohort(llama, device="cuda", dtype="bfloat16")
    cohort.add_job("a", spec(llama, {"r": 8}, "bfloat16", max_steps=10), data)
    cohort.add_job("p", spec(llama, LOPA, "bfloat16", max_steps=4, learning_rate=5e-2), data)
    losses = {"a": [], "p": []}
    while cohort.jobs["p"].active:
        for job_id, result in cohort.step().items():
            assert result.error is None, result.error
            losses[job_id].append(result.loss)
    assert cohort.graphs.replays == 0, "a step holding a LoPA job runs eagerly"
    assert losses["p"][-1] < losses["p"][0], losses["p"]
    cohort.remove_job("p")
    while cohort.active_jobs():
        cohort.step()
    assert cohort.graphs.replays > 0, "the LoRA job alone replays a graph again"


def test_a_lora_job_beside_a_lopa_job_trains_as_alone_in_fp32(llama, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(8, seed=5))

    def lora_run(with_lopa: bool):
        cohort = Cohort(llama, device="cuda", dtype="float32", cuda_graphs=False)
        if with_lopa:
            cohort.add_job("p", spec(llama, LOPA, "float32"), data)
        cohort.add_job("a", spec(llama, {"r": 8}, "float32", seed=2), data)
        losses = []
        while cohort.active_jobs():
            losses.append(cohort.step()["a"].loss)
        return losses, [p.detach().clone() for p in cohort.jobs["a"].adapter.parameters()]

    alone_losses, alone = lora_run(False)
    losses, beside = lora_run(True)
    assert losses == pytest.approx(alone_losses, rel=1e-4)
    for got, want in zip(beside, alone):
        assert (got - want).norm() <= 1e-3 * want.norm().clamp_min(1e-12)
