"""Per-token log-probs (`logprobs` on /v1/completions, `logprobs` + `top_logprobs` on /v1/chat/completions, and
`lorafleet.generate`): the engine's against PEFT's forward with the same adapter (fp32, CPU), and their shapes as the
real `openai` client parses them from a real gateway answered by a real CPU executor (test_gateway's `fleet`)."""

from __future__ import annotations

import math
import time

import openai
import pytest
import torch
from helpers_models import build_tiny_model, build_tokenizer, single_torch_thread  # noqa: F401 (autouse fixture)
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lorafleet.executor.generate import GenerationRequest, Generator, Sampling
from lorafleet.executor.model import load_base
from lorafleet.executor.multilora import RowRouting
from lorafleet.executor.logprobs import token_bytes
from test_gateway import client, fleet, gateway  # noqa: F401  (fixtures: fleet, gateway)
from test_generate import ADAPTERS, EOS, cohort_with_jobs, dataset  # noqa: F401  (dataset: the fixture)

PROMPTS = ["the quick brown fox", "write a short poem about"]
CHAT = [{"role": "user", "content": "write a short poem"}]


# ---- the engine: log_softmax of the model's logits at each generated position, as PEFT's forward gives them ----


def peft_logprobs(model_dir, adapter_dir, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), vocab]: log_softmax of PEFT's logits at each position that generated a token."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt) - 1:len(prompt) - 1 + len(generated)]


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_the_engines_logprobs_are_the_models_own_whatever_the_batch_and_temperature(tmp_path, dataset, temperature):
    """Two adapters and one request without log-probs in one batch: each asking request's chosen tokens' log-probs
    and its top-k (ids and values, the likeliest first) equal log_softmax of PEFT's logits within 1e-5; sampled
    at a temperature they are still the model's own distribution (OpenAI's), not the tempered one."""
    model_dir = build_tiny_model(tmp_path / "base", "llama")
    cohort = cohort_with_jobs(model_dir, dataset, {"a": ADAPTERS["lora"], "b": ADAPTERS["rslora"]})
    exports = {job_id: cohort.export(job_id, tmp_path / job_id) for job_id in ("a", "b")}
    model, _ = load_base(model_dir)
    generator = Generator(model, RowRouting(), eos_token_ids=(EOS,))
    for job_id, directory in exports.items():
        generator.load_adapter(job_id, directory)
    tokenizer = build_tokenizer()
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    asked = [Sampling(max_tokens=8, temperature=temperature, seed=5, logprobs=k) for k in (5, 0)]
    completions = generator.generate([
        GenerationRequest("a", tuple(prompts[0]), "a", asked[0]),
        GenerationRequest("plain", tuple(prompts[1]), "a", Sampling(max_tokens=8)),
        GenerationRequest("b", tuple(prompts[1]), "b", asked[1])])
    assert completions[1].logprobs is None, "a request that did not ask gets none"
    for completion, prompt, job_id, k in ((completions[0], prompts[0], "a", 5), (completions[2], prompts[1], "b", 0)):
        generated = list(completion.token_ids)
        assert len(completion.logprobs) == len(generated) >= 1
        want = peft_logprobs(model_dir, exports[job_id], prompt, generated)
        for position, (token, got) in enumerate(zip(generated, completion.logprobs)):
            assert abs(got.logprob - want[position, token].item()) < 1e-5
            top_values, top_ids = want[position].topk(5)
            assert len(got.top_ids) == len(got.top_logprobs) == k
            assert list(got.top_ids) == top_ids[:k].tolist()
            torch.testing.assert_close(torch.tensor(got.top_logprobs), top_values[:k], rtol=0, atol=1e-5)
    if temperature == 0:  # greedy: the chosen token is the likeliest
        assert all(lp.top_ids[0] == token for token, lp in zip(completions[0].token_ids, completions[0].logprobs))


def test_a_tokens_bytes_are_its_utf8_bytes_even_when_it_is_part_of_a_character():
    tokenizer = build_tokenizer()
    text = "héllo 日本語 🎉"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [token_bytes(tokenizer, token) for token in ids]
    assert any(not piece.decode("utf-8", "ignore") for piece in pieces), "some token is part of a character"
    assert b"".join(pieces) == text.encode("utf-8")


# ---- through the service: the gateway and a real executor, the `openai` client ----


@pytest.fixture(scope="module")
def api(fleet) -> openai.OpenAI:  # noqa: F811  (fleet: the fixture)
    _, token = fleet.store.create_tenant(f"logprobs-{time.time_ns() % 10**9}")
    return client(fleet.url, token)


def test_a_completions_logprobs_are_openais_legacy_object_over_its_text(fleet, api):  # noqa: F811
    model = str(fleet.model)
    answer = api.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=3,
                                    extra_body={"lorafleet": {"timeout": 120}})
    choice = answer.choices[0]
    logprobs = choice.logprobs
    count = answer.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == count >= 4
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):  # a part of a character is written bytes:\x..
        assert token.startswith("bytes:") or choice.text[offset:offset + len(token)] == token
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3  # two ids may decode to one string: a dict keeps one
        assert math.isclose(max(top.values()), value, abs_tol=1e-5), "greedy: the chosen token is the likeliest"
        assert top[token] == max(top.values())
    plain = api.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].text == choice.text


def test_a_chats_logprobs_are_content_tokens_with_bytes_and_top_logprobs(fleet, api):  # noqa: F811
    model = str(fleet.model)
    answer = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=4)
    choice = answer.choices[0]
    content = choice.logprobs.content
    assert len(content) == answer.usage.completion_tokens >= 4
    # the tiny model's tokens may be parts of characters: the text shows those as the decoder does (U+FFFD)
    assert bytes(b for entry in content for b in entry.bytes).decode("utf-8", "replace") == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 4
        ranked = [alternative.logprob for alternative in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True) and math.isclose(ranked[0], entry.logprob, abs_tol=1e-5)
        assert entry.top_logprobs[0].bytes == entry.bytes and entry.top_logprobs[0].token == entry.token
    without_top = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=8, temperature=0,
                                              logprobs=True)
    assert [entry.top_logprobs for entry in without_top.choices[0].logprobs.content] == [[]] * len(content)
    assert api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=8,
                                       temperature=0).choices[0].logprobs is None


def test_a_stop_string_cuts_the_logprobs_with_the_text(fleet, api):  # noqa: F811
    """Cut before a stop string, the log-probs are those of the tokens whose text starts before the cut."""
    model = str(fleet.model)
    whole = api.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0, logprobs=0)
    full = whole.choices[0].logprobs
    stop = next(token for token in full.tokens[3:] if token.strip() and not token.startswith("bytes:"))
    cut = api.completions.create(model=model, prompt=PROMPTS[0], max_tokens=16, temperature=0, logprobs=0, stop=stop)
    text = cut.choices[0].text
    assert cut.choices[0].finish_reason == "stop" and whole.choices[0].text.startswith(text)
    assert len(text) < len(whole.choices[0].text)
    kept = cut.choices[0].logprobs
    assert kept.tokens == [token for token, offset in zip(full.tokens, full.text_offset) if offset < len(text)]
    assert kept.text_offset == full.text_offset[:len(kept.tokens)] and len(kept.tokens) < len(full.tokens)


@pytest.mark.parametrize("route, fields, param", [
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"logprobs": -1}, "logprobs"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
])
def test_a_bad_logprobs_request_is_refused_naming_the_field(gateway, make_tenant, route, fields, param):  # noqa: F811
    api = client(gateway, make_tenant().token)
    with pytest.raises(openai.BadRequestError) as refused:
        if route == "completions":
            api.completions.create(model="test-org/tiny-model", prompt="hi", **fields)
        else:
            api.chat.completions.create(model="test-org/tiny-model", messages=CHAT, **fields)
    assert refused.value.param == param and param in refused.value.message

