"""A LoPA job's export served by the generation engine, fp32 on the CPU: its soft prompt (computed from the prompt by
`lopa.soft_prompt`) placed before the prompt as input embeddings (`GenerationRequest.soft_prompt`); the greedy tokens
are those of the documented loader's logits (`lopa_logits` on the plain HF base, no cache), beside LoRA requests,
with chunked prefill and with the choices of one request sharing the prompt's blocks."""

from __future__ import annotations

import pytest
import torch
from helpers_models import build_tiny_model, build_tokenizer, single_torch_thread  # noqa: F401 (autouse fixture)
from transformers import AutoModelForCausalLM

from lorafleet.executor.generate import GenerationRequest, Generator, Sampling
from lorafleet.executor.lopa import load_lopa, lopa_logits, soft_prompt
from lorafleet.executor.model import load_base
from lorafleet.executor.multilora import RowRouting
from test_generate import ADAPTERS, EOS, PROMPTS, cohort_with_jobs, dataset, peft_greedy  # noqa: F401 (fixture)

LOPA = {"type": "lopa", "lopa": {"num_virtual_tokens": 3, "rank": 2, "head_size": 8}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, dataset):  # noqa: F811
    """A tiny Llama, and the exports of a LoPA job and a LoRA job trained off their init (randomized) on it."""
    root = tmp_path_factory.mktemp("lopa-generation")
    model_dir = build_tiny_model(root / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"lopa": LOPA, "lora": ADAPTERS["lora"]})
    return model_dir, {job_id: cohort.export(job_id, root / job_id) for job_id in ("lopa", "lora")}


def reference_greedy(model_dir, export, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """Greedy tokens from the documented loader's logits: the whole sequence again at every token, its soft prompt
    from the prompt alone."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    lopa, tokens = load_lopa(export), []
    for _ in range(max_tokens):
        token = int(lopa_logits(base, lopa, [*prompt, *tokens], len(prompt))[-1].argmax())
        if token == EOS:
            break
        tokens.append(token)
    return tokens


def lopa_request(request_id: str, model, export, prompt: tuple[int, ...], max_tokens: int = 8, **fields):
    embeds = model.get_input_embeddings()(torch.tensor(prompt))
    soft = soft_prompt(load_lopa(export), embeds)
    return GenerationRequest(request_id, (0,) * soft.shape[0] + prompt, None, Sampling(max_tokens=max_tokens),
                             soft_prompt=soft, **fields)


@pytest.mark.parametrize("max_prefill_tokens", [16384, 4])
def test_a_lopa_models_greedy_tokens_are_its_loaders_beside_lora_requests(exports, max_prefill_tokens):
    model_dir, directories = exports
    prompts = [tuple(build_tokenizer()(text)["input_ids"]) for text in PROMPTS]
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting(), eos_token_ids=(EOS,), max_prefill_tokens=max_prefill_tokens)
    generator.load_adapter("lora", directories["lora"])
    requests = [lopa_request("lopa-0", model, directories["lopa"], prompts[0]),
                GenerationRequest("lora-1", prompts[1], "lora", Sampling(max_tokens=8)),
                lopa_request("lopa-2", model, directories["lopa"], prompts[2]),
                GenerationRequest("base-3", prompts[3], None, Sampling(max_tokens=8))]
    done = {completion.request_id: completion for completion in generator.generate(requests)}
    for name, prompt in (("lopa-0", prompts[0]), ("lopa-2", prompts[2])):
        assert list(done[name].token_ids) == reference_greedy(model_dir, directories["lopa"], prompt, 8), name
    assert list(done["lora-1"].token_ids) == peft_greedy(model_dir, directories["lora"], prompts[1], 8)
    assert list(done["base-3"].token_ids) == peft_greedy(model_dir, None, prompts[3], 8)
    bare = generator.generate([GenerationRequest("bare", prompts[0], None, Sampling(max_tokens=8))])[0]
    assert list(bare.token_ids) != list(done["lopa-0"].token_ids), "the soft prompt changes the answer"


def test_the_choices_of_a_lopa_request_share_its_prompt_and_each_gets_the_loaders_tokens(exports):
    model_dir, directories = exports
    prompt = tuple(build_tokenizer()(" ".join(PROMPTS))["input_ids"])  # several blocks with the soft prompt
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting(), eos_token_ids=(EOS,))
    choices = [lopa_request(f"q/{i}", model, directories["lopa"], prompt, 6, prompt_group="q") for i in range(3)]
    want = reference_greedy(model_dir, directories["lopa"], prompt, 6)
    assert [list(c.token_ids) for c in generator.generate(choices)] == [want] * 3


def test_a_soft_prompt_that_does_not_fit_is_refused_naming_the_request(exports):
    model_dir, _ = exports
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting(), eos_token_ids=(EOS,))
    hidden = model.get_input_embeddings().embedding_dim
    for soft in (torch.zeros(3, hidden + 1), torch.zeros(5, hidden), torch.zeros(hidden)):
        with pytest.raises(ValueError, match="request 'bad': soft prompt"):
            generator.generate([GenerationRequest("bad", (0, 0, 0, 5, 6), None, Sampling(max_tokens=2),
                                                  soft_prompt=soft)])
