"""The generation engine's rounds (executor/generate.py), fp32 on the CPU: one forward a round holds the decode rows
of the running requests and the prompt rows (or the next chunk of a long prompt) of the requests being prefilled.
Tokens against PEFT's generate whatever the admission timing and the prefill budget, logits against HF's forward
across chunks, Mistral's window across chunks, batch invariance, forwards per call, no page held afterwards."""

from __future__ import annotations

import math

import pytest
import torch
from helpers_models import (  # noqa: F401 (fixtures: single_torch_thread is autouse)
    alpaca_rows,
    build_tiny_model,
    build_tokenizer,
    single_torch_thread,
    write_jsonl,
)
from peft import PeftModel
from test_generate import ADAPTERS, EOS, PROMPTS, cohort_with_jobs, page_bytes, peft_greedy
from transformers import AutoModelForCausalLM

import lorafleet.executor.generate as generate_module
from lorafleet.executor.generate import GenerationRequest, Generator, Sampling
from lorafleet.executor.model import load_base
from lorafleet.executor.multilora import RowRouting

JOBS = ("lora", "rslora", "vera")


@pytest.fixture(scope="module")
def prompts():
    """The four short prompts (9-18 tokens) and a long one (every prompt joined: 3 blocks of the cache)."""
    tokenizer = build_tokenizer()
    short = [tuple(tokenizer(text)["input_ids"]) for text in PROMPTS]
    return short + [tuple(tokenizer(" ".join(PROMPTS))["input_ids"])]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A llama base, three jobs' exports (LoRA, rsLoRA, VeRA), and PEFT's greedy tokens for (job, prompt, n)."""
    root = tmp_path_factory.mktemp("mixed")
    model_dir = build_tiny_model(root / "base", "llama")
    dataset = write_jsonl(root / "x.jsonl", alpaca_rows(8, seed=1))
    cohort = cohort_with_jobs(model_dir, dataset, {job: ADAPTERS[job] for job in JOBS})
    exports = {job: cohort.export(job, root / job) for job in JOBS}
    wanted = {}

    def want(job: str | None, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
        key = (job, prompt, max_tokens)
        if key not in wanted:
            wanted[key] = peft_greedy(model_dir, exports.get(job), prompt, max_tokens)
        return wanted[key]

    return model_dir, exports, want


def loaded_generator(model_dir, exports, **options) -> Generator:
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting(), eos_token_ids=(EOS,), **options)
    for job, directory in exports.items():
        generator.load_adapter(job, directory)
    return generator


def assert_no_page_held(generator: Generator) -> None:
    usage = generator.pool_usage()
    assert usage.kv_pages == 0 and usage.free_pages == usage.total_pages - usage.adapter_pages


def counting_forwards(generator: Generator, monkeypatch) -> list[int]:
    """A list that gets one entry (the forward's rows) per forward the generator runs."""
    forwards, real = [], generator._forward
    monkeypatch.setattr(generator, "_forward", lambda rows: forwards.append(len(rows.token_ids)) or real(rows))
    return forwards


@pytest.mark.parametrize(("budget", "pool_pages"), [(16384, None), (16384, 14), (16, None), (5, None), (2, 14)])
def test_tokens_are_pefts_whatever_the_admission_timing_and_the_prefill_budget(served, prompts, budget, pool_pages,
                                                                             monkeypatch):
    """Three adapters and the base, a long prompt among short ones, different lengths to generate: all at once
    (a large budget and pool), requests joining as others finish (a small pool), and prompts prefilled in chunks of
    a few tokens while others decode (budgets of 16, 5 and 2 tokens): each request gets PEFT's greedy tokens."""
    model_dir, exports, want = served
    pool_bytes = None
    if pool_pages is not None:
        pool_bytes = pool_pages * page_bytes(load_base(model_dir)[0])
    generator = loaded_generator(model_dir, exports, max_prefill_tokens=budget, pool_bytes=pool_bytes)
    forwards = counting_forwards(generator, monkeypatch)
    plan = [("lora", 0, 12), ("rslora", 4, 8), (None, 1, 10), ("vera", 2, 6), ("lora", 4, 5), ("rslora", 3, 9)]
    requests = [GenerationRequest(f"r{i}", prompts[p], job, Sampling(max_tokens=n))
                for i, (job, p, n) in enumerate(plan)]
    completions = generator.generate(requests)
    for (job, p, n), completion in zip(plan, completions):
        assert list(completion.token_ids) == want(job, prompts[p], n), (job, p)
    assert_no_page_held(generator)
    assert max(forwards) <= budget + len(plan)  # a round's prompt rows stay within the budget
    if pool_pages is not None:
        assert generator.pool.evictions > 0  # the small pool really made requests wait for others to finish


def test_requests_joining_a_running_batch_ride_its_decode_forwards(served, monkeypatch):
    """A, B and C, prompts of 9 tokens, a prefill budget of 9: A is prefilled alone, B joins in the second round
    and C in the third while A decodes. One forward a round: A's 20 tokens take 20 forwards, and B's 5 and C's 5
    are generated within them (the engine that ran new prompts in a forward of their own took 3 + 19 = 22)."""
    model_dir, exports, _ = served
    generator = loaded_generator(model_dir, exports, max_prefill_tokens=9)
    generator.eos_token_ids = ()  # every request runs to its max_tokens
    forwards = counting_forwards(generator, monkeypatch)
    prompt = tuple(range(20, 29))
    requests = [GenerationRequest("A", prompt, "lora", Sampling(max_tokens=20)),
                GenerationRequest("B", prompt[::-1], "vera", Sampling(max_tokens=5)),
                GenerationRequest("C", prompt[1:] + (40,), None, Sampling(max_tokens=5))]
    advanced = []
    completions = generator.generate(requests, on_step=lambda generated, _: advanced.append(set(generated)) or ())
    assert len(forwards) == 20
    assert advanced[:4] == [{"A"}, {"A", "B"}, {"A", "B", "C"}, {"A", "B", "C"}]
    assert all("A" in step for step in advanced)  # a join never holds up A's next token
    assert [len(c.token_ids) for c in completions] == [20, 5, 5]
    for request, completion in zip(requests, completions):
        assert generator.generate([request])[0].token_ids == completion.token_ids  # the same tokens alone
    assert_no_page_held(generator)


@pytest.mark.parametrize("budget", [3, 4, 7])
def test_a_long_prompt_is_prefilled_in_chunks_while_the_running_requests_keep_decoding(served, prompts, budget,
                                                                                       monkeypatch):
    """A short request first, then the long prompt (46 tokens): the short one decodes every round while the long
    one's chunks (what the budget leaves) go through, and the long one samples its first token only after its last
    chunk, in the round the budget says; its tokens are PEFT's, the same as prefilled in one piece."""
    model_dir, exports, want = served
    short, long = (1, 2, 3), prompts[4]
    generator = loaded_generator(model_dir, exports, max_prefill_tokens=budget)
    forwards = counting_forwards(generator, monkeypatch)
    requests = [GenerationRequest("short", short, "rslora", Sampling(max_tokens=24)),
                GenerationRequest("long", long, "lora", Sampling(max_tokens=8))]
    advanced = []
    completions = generator.generate(requests, on_step=lambda generated, _: advanced.append(set(generated)) or ())
    first_round = 1 + math.ceil((len(long) - (budget - len(short))) / budget)
    assert [i + 1 for i, step in enumerate(advanced) if "long" in step][0] == first_round
    assert first_round > 2  # it really took several chunks
    short_rounds = [i + 1 for i, step in enumerate(advanced) if "short" in step]
    assert short_rounds == list(range(1, len(completions[0].token_ids) + 1))  # never held up by the long prompt
    assert len(forwards) == len(advanced)
    assert list(completions[1].token_ids) == want("lora", long, 8)
    assert completions[1].token_ids == loaded_generator(model_dir, exports).generate(requests[1:])[0].token_ids
    assert_no_page_held(generator)


@pytest.mark.parametrize("piece_rows", [512, 2])
def test_logits_across_chunks_equal_the_full_forward(tmp_path, prompts, monkeypatch, piece_rows):
    """Qwen3 (q/k norms), two live adapters, a prefill budget of 3 tokens (chunks attending at once, or in pieces of
    2 queries): the logits of every sampled token (after the last chunk of a prompt, and every decode step in
    forwards that also carry chunks) equal HF's full forward of the prompt and the tokens so far, through PEFT,
    within 1e-5."""
    monkeypatch.setattr(generate_module, "CHUNK_ATTENTION_ROWS", piece_rows)
    model_dir = build_tiny_model(tmp_path / "base", "qwen3")
    dataset = write_jsonl(tmp_path / "x.jsonl", alpaca_rows(8, seed=1))
    cohort = cohort_with_jobs(model_dir, dataset, {"a": ADAPTERS["rslora"], "b": ADAPTERS["lora"]})
    exports = {job: cohort.export(job, tmp_path / job) for job in ("a", "b")}
    logits_seen, sampled_seen = [], []
    real_next_tokens = generate_module.next_tokens

    def recording(logits, *args):
        logits_seen.append(logits.clone())
        return real_next_tokens(logits, *args)

    def on_step(generated, _logprobs):  # rows of the logits: the requests that sampled, in this order
        sampled_seen.append([(request_id, len(tokens)) for request_id, tokens in generated.items()])
        return ()

    monkeypatch.setattr(generate_module, "next_tokens", recording)
    requests = [GenerationRequest("b", prompts[0], "b", Sampling(max_tokens=6)),
                GenerationRequest("a", prompts[4], "a", Sampling(max_tokens=6))]
    completions = Generator(cohort.model, cohort.routing, max_prefill_tokens=3).generate(requests, on_step=on_step)
    sampled_seen = [sampled for sampled in sampled_seen if sampled]  # a forward of chunks alone samples nothing
    assert len(logits_seen) == len(sampled_seen)
    for request, completion in zip(requests, completions):
        base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(base, exports[request.adapter]).eval()
        with torch.no_grad():
            full = model(torch.tensor([request.prompt_ids + completion.token_ids])).logits[0]
        steps = [(logits[row], count) for logits, sampled in zip(logits_seen, sampled_seen)
                 for row, (request_id, count) in enumerate(sampled) if request_id == request.request_id]
        assert len(steps) == 6
        for logits, count in steps:
            torch.testing.assert_close(logits, full[len(request.prompt_ids) - 2 + count], rtol=0, atol=1e-5)


def test_mistral_sliding_window_holds_across_chunks(tmp_path, prompts):
    """A window of 5 tokens, the long prompt prefilled in chunks of 2, 4 and 7 (the window spans chunks) beside short
    ones: greedy tokens are HF's own generate (and not those of the same weights without a window)."""
    from helpers_models import tiny_config

    config = tiny_config("mistral", len(build_tokenizer()))
    config.sliding_window = 5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "mistral")
    build_tokenizer().save_pretrained(tmp_path / "mistral")
    config.sliding_window = None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path / "windowless")
    model, _ = load_base(tmp_path / "mistral")
    requests = [GenerationRequest(f"r{i}", prompts[i], None, Sampling(max_tokens=12)) for i in (0, 4, 2)]
    want = [peft_greedy(tmp_path / "mistral", None, request.prompt_ids, 12) for request in requests]
    for budget in (2, 4, 7):
        generator = Generator(model, RowRouting(), eos_token_ids=(EOS,), max_prefill_tokens=budget)
        assert [list(c.token_ids) for c in generator.generate(requests)] == want, budget
        assert_no_page_held(generator)
    assert want[1] != peft_greedy(tmp_path / "windowless", None, prompts[4], 12)


def test_a_request_gives_the_same_tokens_alone_and_joining_a_batch_in_chunks(served, prompts):
    """Greedy and seeded sampling, the long prompt with a budget of 4 tokens: its tokens alone are its tokens when
    it joins six requests on other adapters already decoding (its chunks beside their decode rows)."""
    model_dir, exports, _ = served
    generator = loaded_generator(model_dir, exports, max_prefill_tokens=4)
    for sampling in (Sampling(max_tokens=12), Sampling(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)):
        request = GenerationRequest("x", prompts[4], "rslora", sampling)
        alone = generator.generate([request])[0]
        others = [GenerationRequest(f"o{i}", prompts[i % 4], (*JOBS, None)[i % 4],
                                    Sampling(max_tokens=4 + 2 * i, temperature=1.0, seed=i)) for i in range(6)]
        batched = generator.generate([*others[:4], request, *others[4:]])
        assert (batched[4].token_ids, batched[4].finish_reason) == (alone.token_ids, alone.finish_reason)
        assert len({c.token_ids for c in batched}) > 1  # the others really ran
        assert_no_page_held(generator)


def test_a_prefill_budget_below_one_token_is_refused(tmp_path):
    model, _ = load_base(build_tiny_model(tmp_path / "base", "llama"))
    with pytest.raises(ValueError, match="max_prefill_tokens must be at least 1, not 0"):
        Generator(model, RowRouting(), max_prefill_tokens=0)
