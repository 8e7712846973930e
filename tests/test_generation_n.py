"""`n` choices for one prompt on /v1/completions, /v1/chat/completions (streamed too) and `lorafleet.generate`: each
choice its own sequence, reproducible with a seed, usage counting the prompt once. The real `openai` client on a real
gateway answered by a real CPU executor (test_gateway's `fleet`); the Celery task through a real worker, answered by
this test in the executor's place with the executor's own serving code on a real cohort."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from helpers_polling import wait_until
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.serving import GenerationServer, choice_seed
from lorafleet.scheduler import keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.generation import MAX_CHOICES, Generations
from test_gateway import client, fleet, gateway  # noqa: F401  (fixtures: fleet, gateway)

PROMPT = "the quick brown fox"
CHAT = [{"role": "user", "content": "write a short poem"}]


def test_a_choices_seed_is_the_requests_for_the_first_and_distinct_for_the_others():
    seeds = [choice_seed(7, index) for index in range(MAX_CHOICES)]
    assert seeds[0] == 7 and len(set(seeds)) == MAX_CHOICES and all(0 <= seed < 2**63 for seed in seeds)
    assert seeds == [choice_seed(7, index) for index in range(MAX_CHOICES)], "derived, not drawn"
    assert choice_seed(8, 0) not in seeds and choice_seed(None, 3) is None


@pytest.fixture(scope="module")
def api(fleet) -> openai.OpenAI:  # noqa: F811  (fleet: the fixture)
    _, token = fleet.store.create_tenant(f"choices-{time.time_ns() % 10**9}")
    return client(fleet.url, token)


def test_greedy_choices_are_equal_and_usage_counts_the_prompt_once(fleet, api):  # noqa: F811
    model = str(fleet.model)
    one = api.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                 extra_body={"lorafleet": {"timeout": 120}})
    three = api.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert {choice.text for choice in three.choices} == {one.choices[0].text}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens


def test_sampled_choices_differ_and_a_seed_reproduces_them(fleet, api):  # noqa: F811
    model = str(fleet.model)

    def sampled(n: int, seed: int) -> list[str]:
        answer = api.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed, n=n)
        assert [choice.index for choice in answer.choices] == list(range(n))
        return [choice.text for choice in answer.choices]

    first = sampled(4, seed=11)
    assert len(set(first)) > 1, "each choice is its own draw"
    assert sampled(4, seed=11) == first, "the same seed gives the same choices"
    assert sampled(1, seed=11) == first[:1], "choice 0 draws with the request's own seed"
    assert sampled(4, seed=12) != first


def test_a_chats_choices_carry_their_index_and_usage(fleet, api):  # noqa: F811
    model = str(fleet.model)
    answer = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=6, temperature=1.0,
                                         seed=3, n=2, logprobs=True, top_logprobs=1)
    assert [choice.index for choice in answer.choices] == [0, 1]
    assert all(choice.message.role == "assistant" for choice in answer.choices)
    counted = sum(len(choice.logprobs.content) for choice in answer.choices)  # one entry per generated token
    assert answer.usage.completion_tokens == counted and answer.usage.prompt_tokens > 0


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_streamed_choices_come_by_index_and_add_up_to_the_choices_not_streamed(fleet, api, route):  # noqa: F811
    model, fields = str(fleet.model), {"temperature": 1.0, "seed": 5, "n": 3}
    if route == "completions":
        whole = api.completions.create(model=model, prompt=PROMPT, max_tokens=10, **fields)
        stream = api.completions.create(model=model, prompt=PROMPT, max_tokens=10, stream=True,
                                        stream_options={"include_usage": True}, **fields)
    else:
        whole = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=10, **fields)
        stream = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=10, stream=True,
                                             stream_options={"include_usage": True}, **fields)
    texts, finishes, roles = {}, {}, []
    chunks = list(stream)
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices  # one choice a chunk, as OpenAI streams n > 1
        text = choice.text if route == "completions" else (choice.delta.content or "")
        texts[choice.index] = texts.get(choice.index, "") + text
        if choice.finish_reason is not None:
            finishes[choice.index] = choice.finish_reason
        if route == "chat" and choice.delta.role:
            roles.append(choice.index)
    expected = {c.index: (c.text if route == "completions" else c.message.content) for c in whole.choices}
    assert texts == expected and len(set(expected.values())) > 1
    assert finishes == {choice.index: choice.finish_reason for choice in whole.choices}
    assert roles == ([0, 1, 2] if route == "chat" else [])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


@pytest.mark.parametrize("route, n", [("completions", 0), ("completions", MAX_CHOICES + 1), ("chat", 0),
                                      ("chat", MAX_CHOICES + 1)])
def test_a_bad_n_is_refused_naming_the_field(gateway, make_tenant, route, n):  # noqa: F811
    api = client(gateway, make_tenant().token)
    with pytest.raises(openai.BadRequestError) as refused:
        if route == "completions":
            api.completions.create(model="test-org/tiny-model", prompt="hi", n=n)
        else:
            api.chat.completions.create(model="test-org/tiny-model", messages=CHAT, n=n)
    assert refused.value.param == "n" and "'message': 'n: " in refused.value.message


def test_the_celery_task_answers_n_choices_with_logprobs(call, store, make_tenant, tmp_path, hf_cache,
                                                         base_model_dir):
    """`lorafleet.generate` through the worker, answered by the executor's serving code: the choices, each with
    its log-probs; the first choice also as the task's `text` (as before `n`)."""
    tenant = make_tenant()
    with pytest.raises(ValueError, match="^n: "):
        call("lorafleet.generate", tenant.token, {"model": "test-org/tiny-model", "prompt": "hi", "n": 0})
    with pytest.raises(ValueError, match="^logprobs: "):
        call("lorafleet.generate", tenant.token, {"model": "test-org/tiny-model", "prompt": "hi", "logprobs": 21})
    generations = Generations(store, hf_cache, [base_model_dir.parent.parent])
    key = generations.resolve_model(tenant.name, "test-org/tiny-model").base.compat_key
    store.r.delete(keys.generation_queue(key))  # what other tests left waiting for this base
    got = {}
    caller = threading.Thread(target=lambda: got.update(answer=call(
        "lorafleet.generate", tenant.token, {"model": "test-org/tiny-model", "prompt": PROMPT, "max_tokens": 5,
                                             "temperature": 0, "n": 2, "logprobs": 2, "timeout": 25})))
    caller.start()
    wait_until(lambda: generations.waiting(key), "the worker to queue the request", timeout=20)
    server = GenerationServer(generations, "exec-celery-n", ArtifactStore(str(tmp_path)), tmp_path / "scratch")
    assert server.serve(Cohort(base_model_dir), key, training=False) == 1
    caller.join(30)
    answer = got["answer"]
    assert [choice["index"] for choice in answer["choices"]] == [0, 1]
    assert answer["choices"][0]["text"] == answer["choices"][1]["text"] == answer["text"]
    per_choice = answer["usage"]["completion_tokens"] // 2
    assert all(len(choice["logprobs"]) == choice["completion_tokens"] == per_choice for choice in answer["choices"])
    assert all(len(entry["top_logprobs"]) == 2 for entry in answer["choices"][0]["logprobs"])
