"""The choices of one request share their prompt's cached blocks, prefilled once (executor/generate.py's prompt
groups, executor/kv_pool.py's page holders), fp32 on the CPU: each choice's greedy tokens are PEFT's; the pages held
and the prompt rows computed drop to the formula; prompts within one block, on a block boundary and over several;
chunked prefill; groups among other requests and adapters; choices joining as pages free up; a failed call holds no
page; the pool's holder counts."""

from __future__ import annotations

import pytest
import torch
from helpers_models import single_torch_thread  # noqa: F401 (fixture: autouse)
from test_generate import page_bytes
from test_generate_mixed import loaded_generator, prompts, served  # noqa: F401 (fixtures)

from lorafleet.executor.generate import BLOCK_TOKENS, GenerationRequest, Generator, Sampling
from lorafleet.executor.kv_pool import KvLayout, PoolFull, UnifiedPool
from lorafleet.executor.model import load_base


def blocks(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


def choices(prompt: tuple[int, ...], adapter: str | None, n: int, max_tokens: int, group: str | None = "q",
            name: str = "q") -> list[GenerationRequest]:
    """The n engine requests of one request, as serving makes them (a group of None: n unrelated requests)."""
    return [GenerationRequest(f"{name}/{i}", prompt, adapter, Sampling(max_tokens=max_tokens), prompt_group=group)
            for i in range(n)]


def assert_every_kv_page_free(generator: Generator) -> None:
    pool = generator.pool
    usage = pool.usage()
    assert usage.kv_pages == 0 and usage.free_pages == usage.total_pages - usage.adapter_pages
    assert not any(pool.kv_holders(page) for page in range(pool.num_pages))


def watching_the_pool(generator: Generator, monkeypatch) -> list[int]:
    """A list of the KV pages held after each allocation or share the call makes: its max is the call's peak."""
    held, pool = [], generator.pool
    for name in ("allocate_blocks", "share_blocks"):
        real = getattr(pool, name)
        monkeypatch.setattr(pool, name, lambda *args, real=real: [real(*args), held.append(pool.kv_pages)][0])
    return held


def counting_prompt_rows(generator: Generator, monkeypatch, prompt_length: int) -> list[int]:
    """A list that gets, per forward, its rows at prompt positions (every request of the call has this prompt
    length: the other rows are decode steps)."""
    counts, real = [], generator._forward
    monkeypatch.setattr(generator, "_forward",
                        lambda rows: counts.append(int((rows.positions < prompt_length).sum())) or real(rows))
    return counts


def long_prompt(prompts, length: int) -> tuple[int, ...]:  # noqa: F811 (prompts: the fixture's value)
    """A prompt of exactly `length` tokens: the long prompt (46 tokens) cut or repeated."""
    long = prompts[4]
    return (long * (length // len(long) + 1))[:length]


@pytest.mark.parametrize("length", [9, BLOCK_TOKENS, 2 * BLOCK_TOKENS, 46, 3 * BLOCK_TOKENS + 1])
@pytest.mark.parametrize("adapter", ["lora", None])
def test_greedy_choices_sharing_a_prompt_each_get_pefts_tokens(served, prompts, length, adapter):  # noqa: F811
    """Within one block (nothing to share), exactly one and two blocks (a choice recomputes the whole last block),
    a partial last block (46), a last block of one token (its one row takes the decode path): every choice's tokens
    are PEFT's greedy ones, and no page is held afterwards."""
    model_dir, exports, want = served
    prompt = long_prompt(prompts, length)
    generator = loaded_generator(model_dir, exports)
    completions = generator.generate(choices(prompt, adapter, 4, 8))
    for completion in completions:
        assert list(completion.token_ids) == want(adapter, prompt, 8)
        assert completion.prompt_tokens == length
    assert_every_kv_page_free(generator)


@pytest.mark.parametrize(("n", "unshared_pages", "shared_pages"), [(4, 20, 14), (8, 40, 26)])
def test_choices_hold_the_prompts_full_blocks_once(served, prompts, monkeypatch, n, unshared_pages,  # noqa: F811
                                                   shared_pages):
    """A 46-token prompt (2 full blocks and 14 tokens), 20 tokens each: the call's peak is one choice's whole cache
    (5 pages) and each other's 3 past the 2 shared, 5 + (n - 1) x 3 pages, where n unrelated requests hold n x 5.
    The tokens are the same either way."""
    model_dir, exports, _ = served
    prompt, max_tokens = long_prompt(prompts, 46), 20
    peaks, tokens = {}, {}
    for group in ("q", None):
        generator = loaded_generator(model_dir, exports)
        generator.eos_token_ids = ()  # every choice runs to max_tokens: its whole reservation is used
        with monkeypatch.context() as patch:
            held = watching_the_pool(generator, patch)
            tokens[group] = [c.token_ids for c in generator.generate(choices(prompt, "vera", n, max_tokens, group))]
        peaks[group] = max(held)
        assert_every_kv_page_free(generator)
    whole, shared = blocks(len(prompt) + max_tokens - 1), (len(prompt) - 1) // BLOCK_TOKENS
    assert peaks[None] == n * whole == unshared_pages
    assert peaks["q"] == whole + (n - 1) * (whole - shared) == shared_pages
    assert tokens["q"] == tokens[None]


def test_four_choices_prefill_the_prompt_once_and_at_most_a_block_each_besides(served, prompts,  # noqa: F811
                                                                                monkeypatch):
    """The prompt rows computed: 46 for the first choice and the 14 past the shared blocks for each other one, 88,
    where 4 unrelated requests compute 4 x 46 = 184; the others' first tokens come one forward after the first's."""
    model_dir, exports, _ = served
    prompt, n = long_prompt(prompts, 46), 4
    rows, steps = {}, {}
    for group in ("q", None):
        generator = loaded_generator(model_dir, exports)
        generator.eos_token_ids = ()
        with monkeypatch.context() as patch:
            counts = counting_prompt_rows(generator, patch, len(prompt))
            advanced = []
            generator.generate(choices(prompt, "lora", n, 6, group),
                               on_step=lambda generated, _: advanced.append(sorted(generated)) or ())
        rows[group], steps[group] = sum(counts), advanced
    assert rows[None] == n * len(prompt) == 184
    assert rows["q"] == len(prompt) + (n - 1) * (len(prompt) - 2 * BLOCK_TOKENS) == 88
    assert steps["q"][:2] == [["q/0"], ["q/0", "q/1", "q/2", "q/3"]]
    assert steps[None][0] == ["q/0", "q/1", "q/2", "q/3"]


@pytest.mark.parametrize("budget", [5, 16, 40])
def test_choices_share_a_prompt_prefilled_in_chunks(served, prompts, budget, monkeypatch):  # noqa: F811
    """A prefill budget below the prompt: the first choice's prompt goes in chunks, the others wait until its
    shared blocks are cached, then compute their last block (in chunks too where the budget is smaller); tokens are
    PEFT's, the prompt rows are still 46 + 2 x 14, and no page is held afterwards."""
    model_dir, exports, want = served
    prompt = long_prompt(prompts, 46)
    generator = loaded_generator(model_dir, exports, max_prefill_tokens=budget)
    counts = counting_prompt_rows(generator, monkeypatch, len(prompt))
    completions = generator.generate(choices(prompt, "rslora", 3, 7))
    for completion in completions:
        assert list(completion.token_ids) == want("rslora", prompt, 7)
    assert sum(counts) == 46 + 2 * 14
    assert max(counts) <= budget
    assert_every_kv_page_free(generator)


@pytest.mark.parametrize("pool_pages", [None, 20])
def test_groups_among_other_requests_and_adapters_get_pefts_tokens(served, prompts, pool_pages):  # noqa: F811
    """Two groups (different adapters, one prompt each) interleaved with single requests of other adapters and the
    base, in a large pool and in one where requests join as others finish: every request's tokens are PEFT's."""
    model_dir, exports, want = served
    long, boundary = long_prompt(prompts, 46), long_prompt(prompts, 32)
    pool_bytes = None if pool_pages is None else pool_pages * page_bytes(load_base(model_dir)[0])
    generator = loaded_generator(model_dir, exports, pool_bytes=pool_bytes, max_prefill_tokens=64)
    requests = [GenerationRequest("single-a", prompts[0], "lora", Sampling(max_tokens=9)),
                *choices(long, "vera", 3, 8, group="g1", name="g1"),
                GenerationRequest("single-b", prompts[2], None, Sampling(max_tokens=6)),
                *choices(boundary, "lora", 2, 10, group="g2", name="g2"),
                GenerationRequest("single-c", long, "rslora", Sampling(max_tokens=5))]
    completions = generator.generate(requests)
    for request, completion in zip(requests, completions):
        assert completion.request_id == request.request_id
        assert list(completion.token_ids) == want(request.adapter, request.prompt_ids, request.sampling.max_tokens)
    assert_every_kv_page_free(generator)
    if pool_pages is not None:
        assert generator.pool.evictions > 0  # the small pool really made requests wait


def test_a_choice_joining_later_shares_from_a_running_choice_after_the_first_finished(served, prompts,  # noqa: F811
                                                                                       monkeypatch):
    """A pool of 8 pages, a 46-token prompt: choice 0 (1 token: 3 pages) and choice 1 (20 tokens: 2 shared + 3)
    fill 6; choice 2 (3 more) waits until choice 0 finishes, then shares the blocks choice 1 still holds (their
    first holder gone): prompt rows 46 + 14 + 14, its tokens those of an unshared run."""
    model_dir, exports, _ = served
    prompt = long_prompt(prompts, 46)
    generator = loaded_generator(model_dir, {}, pool_bytes=8 * page_bytes(load_base(model_dir)[0]))
    generator.eos_token_ids = ()
    requests = [GenerationRequest(f"q/{i}", prompt, None, Sampling(max_tokens=m), prompt_group="q")
                for i, m in enumerate((1, 20, 20))]
    counts = counting_prompt_rows(generator, monkeypatch, len(prompt))
    advanced = []
    shared = generator.generate(requests, on_step=lambda generated, _: advanced.append(sorted(generated)) or ())
    assert advanced[:2] == [["q/0"], ["q/1", "q/2"]]  # q/2 joined in round 2, its shared blocks already cached
    assert sum(counts) == 46 + 14 + 14
    alone = loaded_generator(model_dir, {})
    alone.eos_token_ids = ()
    assert shared[2].token_ids == alone.generate([GenerationRequest("solo", prompt, None, Sampling(max_tokens=20))]
                                                 )[0].token_ids
    assert_every_kv_page_free(generator)


def test_a_choice_that_finds_none_of_its_group_running_prefills_the_whole_prompt(served, prompts,  # noqa: F811
                                                                                  monkeypatch):
    """A pool of one request's 5 pages: the second choice can join only after the first finished and gave its
    pages back, so it has nothing to share and prefills the whole prompt itself; its tokens are the first's."""
    model_dir, exports, _ = served
    prompt = long_prompt(prompts, 46)
    generator = loaded_generator(model_dir, {}, pool_bytes=5 * page_bytes(load_base(model_dir)[0]))
    generator.eos_token_ids = ()
    counts = counting_prompt_rows(generator, monkeypatch, len(prompt))
    completions = generator.generate(choices(prompt, None, 2, 20))
    assert sum(counts) == 2 * 46
    assert completions[0].token_ids == completions[1].token_ids
    assert_every_kv_page_free(generator)


@pytest.mark.parametrize("failing_round", [1, 2, 4])
def test_a_call_that_fails_midway_holds_no_page(served, prompts, failing_round):  # noqa: F811
    """on_step raising in round 1 (the others waiting on the shared blocks), 2 (all holding them) or 4 (some
    finished): the call fails and every KV page is free; the next call gets the same tokens as a fresh generator."""
    model_dir, exports, want = served
    prompt = long_prompt(prompts, 46)
    generator = loaded_generator(model_dir, exports, max_prefill_tokens=64)
    requests = [*choices(prompt, "lora", 3, 8), GenerationRequest("short", prompts[0], "vera", Sampling(max_tokens=3))]
    rounds = []

    def failing(generated, _):
        rounds.append(generated)
        if len(rounds) == failing_round:
            raise RuntimeError("client went away")
        return ()

    with pytest.raises(RuntimeError, match="client went away"):
        generator.generate(requests, on_step=failing)
    assert_every_kv_page_free(generator)
    assert all(not adapter.pins for adapter in generator.pool.adapters.values())
    assert [list(c.token_ids) for c in generator.generate(requests[:3])] == [want("lora", prompt, 8)] * 3
    assert_every_kv_page_free(generator)


def test_a_group_whose_prompts_or_adapters_differ_is_refused_by_name_before_anything_runs(served,  # noqa: F811
                                                                                          prompts):
    model_dir, exports, _ = served
    generator = loaded_generator(model_dir, exports)
    other_prompt = [GenerationRequest("a", prompts[0], "lora", prompt_group="g"),
                    GenerationRequest("b", prompts[1], "lora", prompt_group="g")]
    with pytest.raises(ValueError, match="request 'b' is in prompt group 'g' with 'a' but its prompt differs"):
        generator.generate(other_prompt)
    other_adapter = [GenerationRequest("a", prompts[0], "lora", prompt_group="g"),
                     GenerationRequest("c", prompts[0], None, prompt_group="g")]
    with pytest.raises(ValueError, match="request 'c' is in prompt group 'g' with 'a' but its adapter differs"):
        generator.generate(other_adapter)
    assert_every_kv_page_free(generator)


# The pool's holder counts


def small_pool(pages: int = 6) -> UnifiedPool:
    return UnifiedPool(pages, KvLayout(layers=1, block_tokens=4, kv_heads=1, head_dim=16), torch.float32,
                       torch.device("cpu"))


def test_a_shared_page_is_free_only_when_its_last_holder_frees_it():
    pool = small_pool()
    first = pool.allocate_blocks(3)
    pool.share_blocks(first[:2])
    second = first[:2] + pool.allocate_blocks(1)
    assert [pool.kv_holders(page) for page in first] == [2, 2, 1]
    assert pool.usage().kv_pages == 4 and pool.free_pages() == 2  # a shared page counts once
    pool.free_blocks(first)
    assert [pool.kv_holders(page) for page in first] == [1, 1, 0]
    assert pool.usage().kv_pages == 3
    with pytest.raises(PoolFull):
        pool.allocate_blocks(4)  # the shared pages are still held: only 3 are free
    pool.free_blocks(second)
    assert pool.usage().kv_pages == 0 and pool.free_pages() == 6
    assert sorted(pool.allocate_blocks(6)) == list(range(6))


def test_freeing_a_page_more_times_than_it_is_held_is_refused_naming_it_and_changes_nothing():
    pool = small_pool()
    pages = pool.allocate_blocks(2)
    pool.free_blocks(pages[:1])
    with pytest.raises(ValueError, match=f"KV page {pages[0]} freed 1 times but held by 0"):
        pool.free_blocks(pages)  # a double free of the first, beside a page still held
    assert pool.kv_holders(pages[1]) == 1 and pool.usage().kv_pages == 1
    with pytest.raises(ValueError, match=f"KV page {pages[1]} freed 2 times but held by 1"):
        pool.free_blocks([pages[1], pages[1]])
    with pytest.raises(ValueError, match="KV page 99 freed 1 times but held by 0"):
        pool.free_blocks([99])
    pool.free_blocks(pages[1:])
    assert pool.usage().kv_pages == 0 and pool.free_pages() == 6


def test_only_held_kv_pages_can_be_shared_and_adapter_pages_are_not_kv():
    pool = small_pool()
    pool.place_adapter("a", [torch.ones(8, 16)])  # one page, from the bottom
    kv = pool.allocate_blocks(1)
    with pytest.raises(ValueError, match="page 0 is not a held KV page"):
        pool.share_blocks([0])  # the adapter's
    with pytest.raises(ValueError, match="page 3 is not a held KV page"):
        pool.share_blocks([kv[0], 3])  # a free page beside a held one: nothing shared
    assert pool.kv_holders(kv[0]) == 1
    with pytest.raises(ValueError, match="KV page 0 freed 1 times but held by 0"):
        pool.free_blocks([0])
    assert pool.resident("a") and pool.usage().adapter_pages == 1
    pool.free_blocks(kv)
    assert pool.usage().kv_pages == 0
