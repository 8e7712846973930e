"""The generation engine on a CUDA device: bf16, the Triton LoRA kernels and flash prefill. Skipped on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers_models import alpaca_rows, build_tiny_model, build_tokenizer, write_jsonl
from test_generate import ADAPTERS, PROMPTS, make_spec, randomize_adapter

import lorafleet.executor.generate as generate_module
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.generate import GenerationRequest, Generator, Sampling

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-gpu")
    model_dir = build_tiny_model(root / "base", "llama", hidden=128)
    dataset = write_jsonl(root / "x.jsonl", alpaca_rows(8, seed=1))
    cohort = Cohort(model_dir, device="cuda")
    for seed, (job_id, adapter) in enumerate(ADAPTERS.items()):
        cohort.add_job(job_id, make_spec(model_dir, adapter, seed=seed), dataset)
        randomize_adapter(cohort.jobs[job_id].adapter, seed)
    return cohort


def test_decode_logits_follow_the_cohorts_own_forward_in_bf16(cohort, monkeypatch):
    """Every step's logits of a batch over four adapter kinds and the base, against the cohort's packed forward of
    the prompt and the tokens so far (bf16 both: equal to bf16 rounding)."""
    seen = []
    real_next_tokens = generate_module.next_tokens

    def recording(logits, *args):
        seen.append(logits.float().clone())
        return real_next_tokens(logits, *args)

    monkeypatch.setattr(generate_module, "next_tokens", recording)
    tokenizer = build_tokenizer()
    prompts = [tuple(tokenizer(text)["input_ids"]) for text in PROMPTS]
    jobs = list(ADAPTERS)
    requests = [GenerationRequest(job_id, prompts[i], job_id, Sampling(max_tokens=6)) for i, job_id in enumerate(jobs)]
    completions = Generator(cohort.model, cohort.routing).generate(requests)
    for request, completion in zip(requests, completions):
        row = sorted(jobs).index(request.adapter)  # the rows of a forward are sorted by route
        sequence = list(request.prompt_ids) + list(completion.token_ids)
        full = cohort.logits(request.adapter, sequence).float()
        start = len(request.prompt_ids) - 1
        for step, logits in enumerate(seen):
            want = full[start + step]
            torch.testing.assert_close(logits[row], want, rtol=0, atol=0.03 * want.abs().max().item() + 1e-3)


def test_hundreds_of_adapters_decode_in_one_batch_and_return_every_page(cohort, tmp_path):
    tokenizer = build_tokenizer()
    prompt = tuple(tokenizer(PROMPTS[0])["input_ids"])
    directory = cohort.export("rslora", tmp_path / "rslora")
    generator = Generator(cohort.model, cohort.routing, pool_bytes=256 << 20)
    for i in range(200):
        generator.load_adapter(f"copy{i}", directory)
    requests = [GenerationRequest(f"r{i}", prompt, f"copy{i}", Sampling(max_tokens=8)) for i in range(200)]
    completions = generator.generate(requests)
    assert len({c.token_ids for c in completions}) == 1  # copies of one adapter, rows of one forward: the same tokens
    assert all(len(c.token_ids) == 8 or c.finish_reason == "stop" for c in completions)
    assert generator.pool_usage().kv_pages == 0 and generator.pool_usage().resident_adapters == 200


def test_training_with_generation_between_graphed_steps_is_the_training_without(tmp_path):
    """Plain LoRA jobs (their steps replayed as CUDA graphs) with a generate batch over their live adapters between
    steps: the weights are those of the run without generation, bitwise where two runs without it agree bitwise."""
    model_dir = build_tiny_model(tmp_path / "base", "llama", hidden=128)
    dataset = write_jsonl(tmp_path / "x.jsonl", alpaca_rows(8, seed=1))
    tokenizer = build_tokenizer()
    prompts = [tuple(tokenizer(text)["input_ids"]) for text in PROMPTS]
    jobs = {"a": ADAPTERS["lora"], "b": ADAPTERS["rslora"]}

    def run(with_generation: bool) -> dict[str, torch.Tensor]:
        cohort = Cohort(model_dir, device="cuda")
        for seed, (job_id, adapter) in enumerate(jobs.items()):
            cohort.add_job(job_id, make_spec(model_dir, adapter, seed=seed), dataset)
        generator = Generator(cohort.model, cohort.routing, pool_bytes=64 << 20)
        for _ in range(5):
            cohort.step()
            if with_generation:
                generator.generate([GenerationRequest(f"r{i}", prompts[i], job_id, Sampling(max_tokens=4))
                                    for i, job_id in enumerate(["a", "b", None])])
        return {f"{job_id}.{name}": tensor.clone() for job_id in jobs
                for name, tensor in cohort.jobs[job_id].adapter.state_dict().items()}

    first, second, generated = run(False), run(False), run(True)
    deterministic = all(torch.equal(first[name], second[name]) for name in first)
    for name in first:
        if deterministic:
            assert torch.equal(generated[name], first[name]), name
        else:
            torch.testing.assert_close(generated[name], first[name], rtol=1e-3, atol=1e-5)
