"""Prompt sharing among a request's choices on a CUDA device: bf16, flash varlen for the first choice's prompt and the
paged path for each other choice's last prompt block over the shared cache. Skipped on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers_models import build_tokenizer
from test_generate import PROMPTS
from test_generate_gpu import cohort  # noqa: F401  (the fixture: a bf16 cohort of test_generate's adapter kinds)
from test_generate_mixed_gpu import recorded_sampling

from lorafleet.executor.generate import GenerationRequest, Generator, Sampling

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("length", [32, 46])
@pytest.mark.parametrize("budget", [16384, 5])
def test_each_choices_logits_follow_the_cohorts_own_forward_in_bf16(cohort, monkeypatch, length,  # noqa: F811
                                                                    budget):
    """Four choices of one prompt (on a block boundary at 32, a partial last block at 46), prefilled whole or in
    chunks of 5: every sampled token's logits of every choice against the cohort's packed forward of the prompt and
    its tokens so far (bf16 both: equal to bf16 rounding); no page is held afterwards."""
    logits_seen, sampled_seen, on_step = recorded_sampling(monkeypatch)
    long = tuple(build_tokenizer()(" ".join(PROMPTS))["input_ids"])  # 46 tokens
    prompt = (long * 2)[:length]
    requests = [GenerationRequest(f"q/{i}", prompt, "lora", Sampling(max_tokens=6), prompt_group="q")
                for i in range(4)]
    generator = Generator(cohort.model, cohort.routing, max_prefill_tokens=budget)
    completions = generator.generate(requests, on_step=on_step)
    sampled_seen = [sampled for sampled in sampled_seen if sampled]
    assert len(logits_seen) == len(sampled_seen)
    for request, completion in zip(requests, completions):
        full = cohort.logits("lora", list(prompt) + list(completion.token_ids)).float()
        steps = [(logits[row], count) for logits, sampled in zip(logits_seen, sampled_seen)
                 for row, (request_id, count) in enumerate(sampled) if request_id == request.request_id]
        assert len(steps) == 6
        for logits, count in steps:
            want = full[len(prompt) - 2 + count]
            torch.testing.assert_close(logits, want, rtol=0, atol=0.03 * want.abs().max().item() + 1e-3)
    usage = generator.pool_usage()
    assert usage.kv_pages == 0 and usage.free_pages == usage.total_pages - usage.adapter_pages
