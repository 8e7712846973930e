"""Many-adapter generation (executor/generate.py, executor/kv_pool.py), fp32 on the CPU: tokens against PEFT's
generate, logits against HF's forward, batch invariance, the unified page pool, training untouched, refusals."""

from __future__ import annotations

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
from transformers import AutoModelForCausalLM

import lorafleet.executor.generate as generate_module
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.generate import GenerationRequest, Generator, Sampling
from lorafleet.executor.kv_pool import PoolUsage
from lorafleet.executor.model import load_base
from lorafleet.executor.multilora import RowRouting
from lorafleet.scheduler.spec import parse_spec

EOS = 2
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ADAPTERS = {  # job id -> adapter spec: every kind whose export generation serves
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 8, "lora_alpha": 8, "use_rslora": True, "target_modules": "all-linear"},
    "nola": {"type": "nola", "r": 4, "target_modules": ["q_proj", "k_proj", "o_proj", "down_proj"]},
    "vera": {"type": "vera", "r": 8, "target_modules": ["q_proj", "v_proj", "gate_proj"]},
}
PROMPTS = ["the quick brown fox", "write a short poem about", "question: what is two plus two? answer:",
           "a cohort of adapters"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "x.jsonl", alpaca_rows(8, seed=1))


@pytest.fixture(scope="module")
def prompts():
    tokenizer = build_tokenizer()
    return [tuple(tokenizer(text)["input_ids"]) for text in PROMPTS]


def make_spec(model_dir, adapter: dict, **hyperparameters):
    raw = {"base_model": str(model_dir), "dataset": "unused", "adapter": adapter}
    raw["hyperparameters"] = {"batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant", "max_steps": 50,
                              **hyperparameters}
    return parse_spec(raw)


def randomize_adapter(adapter, seed: int) -> None:
    """Move every trained tensor off its init (B = 0 would make every adapter the base) by a fixed draw."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def cohort_with_jobs(model_dir, dataset, adapters: dict[str, dict], **hyperparameters) -> Cohort:
    cohort = Cohort(model_dir)
    for seed, (job_id, adapter) in enumerate(adapters.items()):
        cohort.add_job(job_id, make_spec(model_dir, adapter, seed=seed, **hyperparameters), dataset)
        randomize_adapter(cohort.jobs[job_id].adapter, seed)
    return cohort


def peft_greedy(model_dir, adapter_dir, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """PEFT's own greedy generation on the exported adapter, cut at (and without) the eos token."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir is not None else base
    model.eval()
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_tokens, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def requests_for(prompts, adapters: list[str | None], sampling: Sampling = Sampling(max_tokens=10)):
    return [GenerationRequest(f"r{i}", prompt, adapter, sampling)
            for i, (prompt, adapter) in enumerate(zip(prompts, adapters))]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_of_every_adapter_are_pefts(tmp_path, dataset, prompts, family):
    """Exports loaded into a Generator on a plain base, and the same jobs live in their cohort, all in one batch,
    give PEFT's greedy tokens for each adapter (and the base's for no adapter)."""
    model_dir = build_tiny_model(tmp_path / "base", family)
    cohort = cohort_with_jobs(model_dir, dataset, ADAPTERS)
    exports = {job_id: cohort.export(job_id, tmp_path / job_id) for job_id in ADAPTERS}
    model, _ = load_base(model_dir)
    loaded = Generator(model, RowRouting(), eos_token_ids=(EOS,))
    for job_id, directory in exports.items():
        loaded.load_adapter(f"tenant/{job_id}", directory)
    live = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,))
    adapters = [*ADAPTERS, None]
    batch = [prompts[i % len(prompts)] for i in range(len(adapters))]
    from_loaded = loaded.generate(requests_for(batch, [a and f"tenant/{a}" for a in adapters]))
    from_live = live.generate(requests_for(batch, adapters))
    for prompt, adapter, got_loaded, got_live in zip(batch, adapters, from_loaded, from_live):
        want = peft_greedy(model_dir, exports.get(adapter), prompt, 10)
        assert list(got_loaded.token_ids) == want, adapter
        assert list(got_live.token_ids) == want, adapter
        assert got_loaded.prompt_tokens == len(prompt)
        assert got_loaded.finish_reason == ("length" if len(want) == 10 else "stop")


def test_a_live_dora_job_generates_what_peft_does_with_its_export(tmp_path, dataset, prompts):
    """DoRA exports are not loaded, but a DoRA job training in the cohort serves its eval samples (its layers run
    DoRA's part as in training)."""
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"dora": {"r": 4, "use_dora": True,
                                                            "target_modules": ["q_proj", "v_proj"]},
                                                   "lora": ADAPTERS["lora"]})
    directory = cohort.export("dora", tmp_path / "dora")
    completions = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,)).generate(
        requests_for(prompts[:2], ["dora", "lora"]))
    assert list(completions[0].token_ids) == peft_greedy(model_dir, directory, prompts[0], 10)


def test_on_the_triton_kernels_the_tokens_are_the_reference_paths(tmp_path, dataset, prompts, monkeypatch):
    """The kernel path (Triton's interpreter on the CPU): loaded adapters read from the pool's pages by the pooled
    kernels, live ones through the segmented LoRA kernels, norms and rotary, give the reference path's tokens."""
    triton_lora = pytest.importorskip("lorafleet.kernels.triton_lora")
    from helpers_triton import interpreted

    from lorafleet.kernels import elementwise, triton_pooled

    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"a": ADAPTERS["rslora"], "b": ADAPTERS["nola"]})
    generator = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,))
    generator.load_adapter("exported", cohort.export("a", tmp_path / "a"))
    requests = requests_for(prompts[:3], ["exported", "b", None], Sampling(max_tokens=4))
    want = generator.generate(requests)
    import lorafleet.kernels as kernels

    calls = []
    def spy(name):
        real = getattr(kernels, name)
        return lambda *args, **kw: calls.append(name) or real(*args, **kw)

    for name in ("lora_linear_triton", "pooled_lora_delta_triton"):
        monkeypatch.setattr(kernels, name, spy(name))
    with interpreted(triton_lora, elementwise, triton_pooled, LORAFLEET_TRITON="1"):
        got = generator.generate(requests)
    assert got == want
    assert set(calls) == {"lora_linear_triton", "pooled_lora_delta_triton"}  # both kinds of kernels ran


def test_decode_logits_equal_the_full_forward(tmp_path, dataset, prompts, monkeypatch):
    """Every step's logits (prefill and decode, paged cache, several adapters in the batch) equal HF's full forward
    of the prompt and the tokens so far, through PEFT, within 1e-5."""
    model_dir = build_tiny_model(tmp_path / "base", "qwen3")
    cohort = cohort_with_jobs(model_dir, dataset, {"a": ADAPTERS["rslora"], "b": ADAPTERS["lora"]})
    exports = {job_id: cohort.export(job_id, tmp_path / job_id) for job_id in ("a", "b")}
    seen = []  # (routes in row order, logits) of each forward
    real_next_tokens = generate_module.next_tokens

    def recording(logits, *args):
        seen.append(logits.clone())
        return real_next_tokens(logits, *args)

    monkeypatch.setattr(generate_module, "next_tokens", recording)
    generator = Generator(cohort.model, cohort.routing)  # no eos: every request runs max_tokens steps
    # one request per adapter: rows are sorted by route, so row i is adapter ("a", "b")[i]
    completions = generator.generate(requests_for(prompts[:2], ["b", "a"], Sampling(max_tokens=6)))
    by_adapter = {"b": completions[0], "a": completions[1]}
    prompt_of = {"b": prompts[0], "a": prompts[1]}
    for row, job_id in enumerate(("a", "b")):
        base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
        model = PeftModel.from_pretrained(base, exports[job_id]).eval()
        sequence = list(prompt_of[job_id]) + list(by_adapter[job_id].token_ids)
        with torch.no_grad():
            full = model(torch.tensor([sequence])).logits[0]
        start = len(prompt_of[job_id]) - 1
        for step, logits in enumerate(seen):
            torch.testing.assert_close(logits[row], full[start + step], rtol=0, atol=1e-5)


def test_mistral_sliding_window_is_kept_in_prefill_and_decode(tmp_path, prompts):
    """A window of 5 over prompts of 5-11 tokens and 12 generated: greedy tokens are HF's own generate."""
    from helpers_models import tiny_config

    directory = tmp_path / "mistral"
    config = tiny_config("mistral", len(build_tokenizer()))
    config.sliding_window = 5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    model, _ = load_base(directory)
    completions = Generator(model, RowRouting(), eos_token_ids=(EOS,)).generate(
        requests_for(prompts, [None] * 4, Sampling(max_tokens=12)))
    windowless = tmp_path / "windowless"
    config.sliding_window = None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(windowless)
    for prompt, completion in zip(prompts, completions):
        assert list(completion.token_ids) == peft_greedy(directory, None, prompt, 12)
    assert [list(c.token_ids) for c in completions] != [peft_greedy(windowless, None, p, 12) for p in prompts]


def test_a_request_gives_the_same_tokens_alone_and_among_seven_other_adapters(tmp_path, dataset, prompts):
    """Greedy and seeded sampling: the tokens of one request do not depend on what it is batched with."""
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    jobs = {f"job{i}": ADAPTERS[("lora", "rslora", "nola")[i % 3]] for i in range(8)}
    cohort = cohort_with_jobs(model_dir, dataset, jobs)
    generator = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,))
    for sampling in (Sampling(max_tokens=12), Sampling(max_tokens=12, temperature=0.9, top_p=0.9, seed=7)):
        alone = generator.generate([GenerationRequest("x", prompts[0], "job3", sampling)])[0]
        others = [GenerationRequest(f"o{i}", prompts[i % 4], job_id, Sampling(max_tokens=5 + i, temperature=1.0,
                                                                               seed=i))
                  for i, job_id in enumerate(jobs) if job_id != "job3"]
        batched = generator.generate([*others[:3], GenerationRequest("x", prompts[0], "job3", sampling), *others[3:]])
        assert batched[3] == alone
        assert len({c.token_ids for c in batched}) > 1  # the others really ran on other adapters


def test_an_adapter_placed_before_a_later_load_wrapped_more_layers_keeps_its_tokens(tmp_path, dataset, prompts):
    """The pool's offset table has a row per wrapped layer: an adapter made resident before another load wrapped more
    layers (all-linear after q/v) is read at the same layers as one loaded after it, and gives PEFT's tokens."""
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"lora": ADAPTERS["lora"], "rslora": ADAPTERS["rslora"]})
    exports = {job_id: cohort.export(job_id, tmp_path / job_id) for job_id in ("lora", "rslora")}
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting(), eos_token_ids=(EOS,))
    generator.load_adapter("lora", exports["lora"])
    first = generator.generate(requests_for(prompts[:1], ["lora"]))
    generator.load_adapter("rslora", exports["rslora"])
    both = generator.generate(requests_for(prompts[:2], ["lora", "rslora"]))
    assert both[0] == first[0]
    for completion, prompt, job_id in zip(both, prompts, ("lora", "rslora")):
        assert list(completion.token_ids) == peft_greedy(model_dir, exports[job_id], prompt, 10), job_id


def test_sampling_follows_the_seed_and_stop_ids(tmp_path, prompts):
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting())
    hot = Sampling(max_tokens=16, temperature=1.5, seed=3)
    first, again, other = generator.generate(requests_for([prompts[0]] * 3, [None] * 3, hot)[:2]
                                             + [GenerationRequest("z", prompts[0], None, Sampling(16, 1.5, seed=4))])
    assert first.token_ids == again.token_ids != other.token_ids
    stop = first.token_ids[5]
    stopped = generator.generate([GenerationRequest("s", prompts[0], None, Sampling(16, 1.5, seed=3,
                                                                                    stop_token_ids=(stop,)))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[:first.token_ids.index(stop)]
    narrow = generator.generate([GenerationRequest("n", prompts[0], None, Sampling(16, 5.0, top_p=1e-6, seed=1))])
    greedy = generator.generate([GenerationRequest("g", prompts[0], None, Sampling(16))])
    assert narrow[0].token_ids == greedy[0].token_ids  # a nucleus of one token is greedy


def test_nucleus_sampling_inverts_the_kept_distribution():
    """probabilities 0.5, 0.3, 0.15, 0.05 with top_p 0.8 keep the first two (renormalised to 0.625, 0.375)."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[[2, 0, 3, 1]].repeat(4, 1)  # shuffled: tokens 1, 3, 0, 2
    uniforms = torch.tensor([[0.0], [0.6], [0.63], [0.99]])
    picked = generate_module.sample_nucleus(logits, torch.full((4, 1), 0.8), uniforms)
    assert picked.tolist() == [1, 1, 3, 3]
    everything = generate_module.sample_nucleus(logits, torch.ones(4, 1), uniforms)
    assert everything.tolist() == [1, 3, 3, 2]


def test_generating_with_a_live_job_between_steps_leaves_training_bitwise_unchanged(tmp_path, dataset, prompts):
    """Dropout on (its RNG must not advance), LoRA and NOLA jobs: losses and weights after steps with generation in
    between are bitwise those without."""
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    jobs = {"a": {**ADAPTERS["lora"], "lora_dropout": 0.1}, "b": {**ADAPTERS["nola"], "lora_dropout": 0.1}}
    runs = []
    for with_generation in (False, True):
        cohort = cohort_with_jobs(model_dir, dataset, jobs)
        generator = Generator(cohort.model, cohort.routing, eos_token_ids=(EOS,))
        losses = []
        for step in range(3):
            losses.append({job_id: result.loss for job_id, result in cohort.step().items()})
            if with_generation:
                generator.generate(requests_for(prompts[:3], ["a", "b", None],
                                                Sampling(max_tokens=4, temperature=1.0)))
        weights = {job_id: cohort.jobs[job_id].adapter.state_dict() for job_id in jobs}
        runs.append((losses, weights, [cohort.jobs[j].adapter.training for j in jobs], dict(cohort.routing.segments)))
    (losses, weights, modes, segments), (losses_g, weights_g, modes_g, segments_g) = runs
    assert losses == losses_g
    for job_id in jobs:
        for name, tensor in weights[job_id].items():
            assert torch.equal(tensor, weights_g[job_id][name]), (job_id, name)
    assert modes == modes_g == [True, True] and segments == segments_g == {}


# The unified pool


def test_kv_and_adapters_share_one_pool_and_every_kv_page_comes_back(tmp_path, dataset, prompts):
    """A pool too small for every adapter and every request at once: requests join as others finish, adapters are
    evicted least recently used, the tokens are those of a large pool, and no KV page is left held."""
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    jobs = {f"job{i}": ADAPTERS["rslora"] for i in range(6)}
    cohort = cohort_with_jobs(model_dir, dataset, jobs)
    directories = {job_id: cohort.export(job_id, tmp_path / job_id) for job_id in jobs}
    requests = [GenerationRequest(f"r{i}", prompts[i % 4], f"job{i % 6}", Sampling(max_tokens=20)) for i in range(12)]
    results = {}
    for pool_pages in (1000, 12):
        model, _ = load_base(model_dir)
        # the small pool's prefills also at most 8 tokens (one prompt) a forward
        generator = Generator(model, RowRouting(), eos_token_ids=(EOS,), pool_bytes=pool_pages * page_bytes(model),
                              max_prefill_tokens=1 << 20 if pool_pages == 1000 else 8)
        for job_id, directory in directories.items():
            generator.load_adapter(job_id, directory)
        results[pool_pages] = generator.generate(requests)
        usage = generator.pool_usage()
        assert usage.kv_pages == 0 and usage.free_pages == usage.total_pages - usage.adapter_pages
        assert usage.adapter_pages > 0
    small = generator
    assert results[12] == results[1000]
    assert small.pool.evictions > 0  # six adapters and their requests' KV never fit twelve pages at once


def test_between_calls_the_model_holds_no_loaded_adapter_and_a_dropped_generator_frees_its_pool(tmp_path, dataset,
                                                                                                 prompts):
    import weakref

    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"job": ADAPTERS["lora"]})
    directory = cohort.export("job", tmp_path / "job")
    generator = Generator(cohort.model, cohort.routing)
    generator.load_adapter("exported", directory)
    first = generator.generate(requests_for(prompts[:2], ["exported", "job"]))
    layers = [m for m in cohort.model.modules() if hasattr(m, "adapters")]
    assert {key for layer in layers for key in layer.adapters} == {"job"}
    assert generator.pool_usage().resident_adapters == 1
    assert generator.generate(requests_for(prompts[:2], ["exported", "job"])) == first  # resident, reinstalled
    pool = weakref.ref(generator.pool.buffer)
    del generator  # no reference cycle: freed at once, not at the next garbage collection
    assert pool() is None
    closed = Generator(cohort.model, cohort.routing)
    closed.load_adapter("exported", directory)
    closed.generate(requests_for(prompts[:1], ["exported"]))
    closed.close()
    assert closed.pool.buffer.numel() == 0 and closed.pool_usage().resident_adapters == 0
    with pytest.raises(RuntimeError, match="closed"):
        closed.generate(requests_for(prompts[:1], ["exported"]))


def page_bytes(model) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * generate_module.BLOCK_TOKENS * config.num_key_value_heads * head_dim * 4


def test_the_pool_evicts_the_least_recently_used_unpinned_adapter_and_keeps_kv_off_adapter_runs():
    from lorafleet.executor.kv_pool import KvLayout, PoolFull, UnifiedPool

    pool = UnifiedPool(8, KvLayout(layers=1, block_tokens=4, kv_heads=1, head_dim=16), torch.float32,
                       torch.device("cpu"))  # pages of 128 elements
    two_pages = [torch.ones(8, 16), torch.full((16, 8), 2.0)]  # 128 + 128 elements
    views = pool.place_adapter("a", two_pages)
    assert pool.adapters["a"].start == 0 and all(torch.equal(v, f) for v, f in zip(views, two_pages))
    pool.place_adapter("b", two_pages)
    pool.pin("a")  # a: in use (and most recently used); b: least recently used
    kv = pool.allocate_blocks(4)
    assert sorted(kv) == [4, 5, 6, 7]  # from the top, away from the adapters' runs
    assert pool.usage() == PoolUsage(512, 8, 4, 4, 2)
    more = pool.allocate_blocks(2)  # only by evicting b
    assert list(pool.adapters) == ["a"] and pool.evictions == 1 and pool.usage().free_pages == 0
    with pytest.raises(PoolFull):
        pool.allocate_blocks(1)  # a is pinned
    pool.free_blocks(kv + more)
    pool.unpin("a")
    assert pool.usage() == PoolUsage(512, 8, 0, 2, 1)
    pool.place_adapter("wide", [torch.zeros(6, 128)])  # a run of 6 pages: fits beside a
    assert pool.adapters["wide"].start == 2 and pool.evictions == 1
    for _ in range(100):  # adapters coming and going leave the pool's free-page heap bounded
        pool.evict("wide")
        pool.place_adapter("wide", [torch.zeros(6, 128)])
    assert len(pool._top) <= 2 * pool.num_pages
    pool.evict("wide")
    assert sorted(pool.allocate_blocks(6)) == list(range(2, 8))


def test_a_call_that_fails_midway_holds_no_page_and_leaves_the_routing_as_it_was(tmp_path, dataset, prompts,
                                                                                monkeypatch):
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"job": ADAPTERS["lora"]})
    generator = Generator(cohort.model, cohort.routing)
    generator.load_adapter("exported", cohort.export("job", tmp_path / "job"))
    requests = requests_for(prompts[:3], ["exported", "job", None])
    want = generator.generate(requests)

    def failing(*args):
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(generate_module, "decode_attention", failing)
        with pytest.raises(RuntimeError, match="device lost"):
            generator.generate(requests)
    assert generator.pool_usage().kv_pages == 0
    assert all(not adapter.pins for adapter in generator.pool.adapters.values())
    assert cohort.routing.segments == {} and cohort.jobs["job"].adapter.training
    assert generator.generate(requests) == want


def test_a_request_that_can_never_fit_the_pool_is_refused(tmp_path, prompts):
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting(), pool_bytes=4 * page_bytes(model))
    fits = GenerationRequest("fits", prompts[0], None, Sampling(max_tokens=64 - len(prompts[0]) + 1))
    too_long = GenerationRequest("too-long", prompts[0], None, Sampling(max_tokens=64 - len(prompts[0]) + 2))
    assert len(generator.generate([fits])[0].token_ids) > 0
    with pytest.raises(ValueError, match="request 'too-long' can never fit: it needs 5 pages"):
        generator.generate([fits, too_long])
    assert generator.pool_usage().kv_pages == 0
    huge = tmp_path / "huge"
    write_lora(huge, model, rank=64)
    with pytest.raises(ValueError, match="the adapter takes 8 pages, the pool has 4"):
        generator.load_adapter("huge", huge)


def write_lora(directory, model, rank: int) -> None:
    """A PEFT LoRA directory on every q_proj of `model`, random factors."""
    import json

    from safetensors.torch import save_file

    directory.mkdir()
    tensors = {}
    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["q_proj"]}))


# Refusals


def test_a_dora_export_is_refused_by_name(tmp_path, dataset):
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"d": {"r": 4, "use_dora": True, "target_modules": ["q_proj"]}})
    directory = cohort.export("d", tmp_path / "d")
    generator = Generator(cohort.model, cohort.routing)
    with pytest.raises(ValueError, match="adapter type DoRA is not served"):
        generator.load_adapter("d", directory)
    assert not generator.has_adapter("d-export")


def test_a_full_model_directory_is_refused_as_no_adapter(tmp_path):
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    model, _ = load_base(model_dir)
    with pytest.raises(ValueError, match="no adapter_config.json, a full model"):
        Generator(model, RowRouting()).load_adapter("galore", model_dir)


def test_an_unknown_adapter_key_is_refused_before_anything_runs(tmp_path, prompts):
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting())
    with pytest.raises(ValueError, match="unknown adapter 'nobody'"):
        generator.generate(requests_for(prompts[:2], [None, "nobody"]))
    assert generator.pool_usage().kv_pages == 0


def test_malformed_requests_are_refused_by_name_and_no_requests_give_no_completions(tmp_path, prompts):
    model, _ = load_base(build_tiny_model(tmp_path / "base", "llama"))
    generator = Generator(model, RowRouting())
    vocabulary = model.config.vocab_size
    with pytest.raises(ValueError, match=f"request 'r1': prompt token {vocabulary} is outside the vocabulary"):
        generator.generate(requests_for([prompts[0], (1, vocabulary)], [None, None]))
    with pytest.raises(ValueError, match="request 'r0': empty prompt"):
        generator.generate(requests_for([()], [None]))
    with pytest.raises(ValueError, match="request 'r0': sampling .*need max_tokens >= 1"):
        generator.generate(requests_for([prompts[0]], [None], Sampling(max_tokens=0)))
    assert generator.generate([]) == []


def test_a_family_outside_the_llama_like_decoders_is_refused_by_name(tmp_path):
    model, _ = load_base(build_tiny_model(tmp_path / "base", "gemma"))
    with pytest.raises(ValueError, match="this model is 'gemma'"):
        Generator(model, RowRouting())


def test_a_model_wrapped_for_another_routing_is_refused(tmp_path, dataset):
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"a": ADAPTERS["lora"]})
    with pytest.raises(ValueError, match="follow another RowRouting: pass the one they were wrapped with"):
        Generator(cohort.model, RowRouting())
