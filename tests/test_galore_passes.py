"""A GaLore job's micro-batch in passes (`--max-pass-tokens`, or the executor's memory-sized passes): the same
training as one pass, with each pass at most the tokens asked for, as the scheduler's memory model assumes of every
executor that runs in passes."""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, llama, single_torch_thread, write_jsonl  # noqa: F401 (fixtures)

from lorafleet.executor.galore_job import GaloreJob, GaloreSettings
from lorafleet.scheduler.spec import Hyperparameters

HP = Hyperparameters(batch_size=4, gradient_accumulation_steps=1, max_steps=3, learning_rate=2e-3, max_seq_len=256,
                     seed=5)


def trained(llama, dataset, max_pass_tokens):
    job = GaloreJob(llama, GaloreSettings(rank=8, update_proj_gap=2), HP, dataset, "auto", "float32", "cpu")
    losses, largest = [], 0
    while job.active:
        losses.append(job.step(max_pass_tokens).loss)
        largest = max(largest, job.largest_pass_tokens)
        assert job.error is None
    return job, losses, largest


def test_a_galore_micro_batch_in_passes_trains_as_one_pass(llama, tmp_path):
    dataset = write_jsonl(tmp_path / "train.jsonl", alpaca_rows(12))
    whole, whole_losses, whole_largest = trained(llama, dataset, None)
    split, split_losses, split_largest = trained(llama, dataset, 64)

    assert split_largest < whole_largest, "the micro-batch ran in smaller passes"
    assert split.last_input_tokens == whole.last_input_tokens == whole.largest_pass_tokens, "every token trained"
    assert split_losses == pytest.approx(whole_losses, abs=1e-5)
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        assert (a - b).abs().max().item() < 1e-5, (name, (a - b).abs().max().item(), a.abs().max().item())
