"""The engine's mixed rounds on a CUDA device: bf16, the Triton LoRA kernels, flash varlen for prompts' first
chunks and the paged path for later chunks beside decode rows. Skipped on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers_models import build_tokenizer
from test_generate import ADAPTERS, PROMPTS
from test_generate_gpu import cohort  # noqa: F401  (the fixture: a bf16 cohort of test_generate's adapter kinds)

import lorafleet.executor.generate as generate_module
from lorafleet.executor.generate import GenerationRequest, Generator, Sampling

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def recorded_sampling(monkeypatch):
    """(the logits of every sampled token, per round each request's tokens so far, the `on_step` hook that records
    the rounds): the engine's `next_tokens` wrapped to record its logits."""
    logits_seen, sampled_seen = [], []
    real_next_tokens = generate_module.next_tokens

    def recording(logits, *args):
        logits_seen.append(logits.float().clone())
        return real_next_tokens(logits, *args)

    def on_step(generated, _logprobs):
        sampled_seen.append([(request_id, len(tokens)) for request_id, tokens in generated.items()])
        return ()

    monkeypatch.setattr(generate_module, "next_tokens", recording)
    return logits_seen, sampled_seen, on_step


@pytest.mark.parametrize("budget", [5, 16])
def test_logits_of_mixed_rounds_with_chunks_follow_the_cohorts_own_forward_in_bf16(cohort, monkeypatch, budget):
    """Four adapter kinds, a long prompt among short ones, `budget` prompt tokens a round (chunks beside decode
    rows): every sampled token's logits against the cohort's packed forward of the prompt and the tokens so far
    (bf16 both: equal to bf16 rounding)."""
    logits_seen, sampled_seen, on_step = recorded_sampling(monkeypatch)
    tokenizer = build_tokenizer()
    prompts = [tuple(tokenizer(text)["input_ids"]) for text in [*PROMPTS, " ".join(PROMPTS)]]  # the last: 46 tokens
    jobs = list(ADAPTERS)
    requests = [GenerationRequest(job_id, prompts[(i + 3) % len(prompts)], job_id, Sampling(max_tokens=6))
                for i, job_id in enumerate(jobs)]
    completions = Generator(cohort.model, cohort.routing, max_prefill_tokens=budget).generate(requests,
                                                                                              on_step=on_step)
    sampled_seen = [sampled for sampled in sampled_seen if sampled]
    assert len(logits_seen) == len(sampled_seen)
    for request, completion in zip(requests, completions):
        full = cohort.logits(request.adapter, list(request.prompt_ids) + list(completion.token_ids)).float()
        steps = [(logits[row], count) for logits, sampled in zip(logits_seen, sampled_seen)
                 for row, (request_id, count) in enumerate(sampled) if request_id == request.request_id]
        assert len(steps) == 6
        for logits, count in steps:
            want = full[len(request.prompt_ids) - 2 + count]
            torch.testing.assert_close(logits, want, rtol=0, atol=0.03 * want.abs().max().item() + 1e-3)
