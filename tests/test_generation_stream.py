"""Streamed completions (`stream: true`), as a tenant meets them: the real `openai` client with `stream=True` on a real
gateway process, answered by a real executor process (test_gateway's `fleet`: its own Valkey, scheduler, CPU
executor, gateway); failures mid-stream with this test in the executor's place on the shared Valkey (`gateway`).
The incremental detokenization and stop-string hold-back (executor/streaming.py) on the tiny byte-level tokenizer."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from helpers_models import build_tokenizer
from helpers_polling import wait_until
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.generate import Generator
from lorafleet.executor.serving import GenerationServer, cut_at_stop
from lorafleet.executor.streaming import INCOMPLETE, IncrementalText
from lorafleet.scheduler import keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.generation import (
    GenerationResult, Generations, GenerationTimeout, Sampling, ServingBudget,
)
from test_gateway import client, fleet, gateway  # noqa: F401  (fixtures: fleet, gateway)

PROMPT = "the quick brown fox"
CHAT = [{"role": "user", "content": "write a short poem"}]


# ---- the executor's text as tokens come (pure logic, the tiny tokenizer) ----


def shown_step_by_step(tokenizer, ids: list[int], stops: tuple[str, ...]) -> list[str]:
    """The text an executor publishes after each of `ids` is generated, until it ends the request (a stop string)."""
    text, shown = IncrementalText(tokenizer, stops), []
    for count in range(1, len(ids) + 1):
        shown.append(text.add(ids[:count]))
        if text.stopped:
            assert cut_at_stop(tokenizer.decode(ids[:count]), stops) == cut_at_stop(tokenizer.decode(ids), stops), \
                "a request ends only once its cut text is final"
            break
    return shown


def test_streamed_text_never_splits_a_character_and_adds_up_to_the_decoded_text():
    tokenizer = build_tokenizer()
    ids = tokenizer("héllo wörld, 日本語 and ünïcode 🎉 end", add_special_tokens=False)["input_ids"]
    assert any(INCOMPLETE in tokenizer.decode([token]) for token in ids), "some token is part of a character"
    shown = shown_step_by_step(tokenizer, ids, ())
    assert not any(INCOMPLETE in piece for piece in shown)
    assert "".join(shown) == tokenizer.decode(ids)
    assert sum(1 for piece in shown if piece) > 5


@pytest.mark.parametrize("stops, cut", [
    (("END",), "the fox jumps "),  # cut before the stop string
    (("ENDX",), "the fox jumps END over ENDING"),  # begins twice, never completes: everything, in the end
    (("fox jumps X", "jumps"), "the fox "),  # the first stop completes while a longer one might still begin earlier
    (("fox jumps END", "jumps"), "the "),  # ... and does, after it
])
def test_a_stop_string_is_never_shown_even_in_part_and_ends_the_request_once_the_cut_is_final(stops, cut):
    tokenizer = build_tokenizer()
    text = "the fox jumps END over ENDING"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    final, _ = cut_at_stop(tokenizer.decode(ids), stops)
    assert final == cut
    shown, pieces = "", shown_step_by_step(tokenizer, ids, stops)
    for piece in pieces:
        shown += piece
        assert final.startswith(shown), f"{shown!r} was shown; the text is {final!r}"
    if stops == ("ENDX",):
        assert shown == final, "held-back text is shown once the text shows it is no stop string"
    assert (len(pieces) < len(ids)) == (stops != ("ENDX",)), "a request whose text reached a stop string ends there"


# ---- the executor's serving loop on a real cohort and Valkey, a batch failing part-way ----


@pytest.mark.parametrize("text_sent", [True, False])
def test_a_failed_batch_fails_a_stream_it_sent_text_of_and_runs_the_others_again(
        store, make_tenant, tmp_path, hf_cache, base_model_dir, monkeypatch, text_sent):
    """A batch of a streamed and a plain request fails after its first forward (the streamed one's first text
    published, or not yet): a stream with text sent ends in an error event (a second run could draw other text);
    the others run again alone and are answered in full."""
    tenant = make_tenant()
    generations = Generations(store, hf_cache, [base_model_dir.parent.parent])
    key = generations.resolve_model(tenant.name, "test-org/tiny-model").base.compat_key
    store.r.delete(keys.generation_queue(key))  # what other tests left waiting for this base
    streamed, plain = (generations.submit(tenant.name, "test-org/tiny-model", prompt=PROMPT, stream=stream,
                                          sampling=Sampling(max_tokens=6, temperature=0)) for stream in (True, False))
    real_generate = Generator.generate

    def failing_with_two(generator, requests, on_step=None):
        def first_step(generated, logprobs):
            if text_sent:
                on_step(generated, logprobs)
            raise RuntimeError("device lost")
        return real_generate(generator, requests, first_step if len(requests) == 2 else on_step)

    monkeypatch.setattr(Generator, "generate", failing_with_two)
    server = GenerationServer(generations, "exec-stream", ArtifactStore(str(tmp_path)), tmp_path / "scratch")
    assert server.serve(Cohort(base_model_dir), key, training=False) == 2
    answer = generations.wait_result(plain, timeout=5)
    assert answer.error is None and answer.completion_tokens == 6
    events = list(generations.stream_events(streamed))
    texts, last = [event.text for event in events], events[-1].result
    if text_sent:
        assert texts[0] and last.error == "generation failed: device lost" and "".join(texts) != (
            answer.choices[0].text)
    else:
        assert last.error is None and "".join(texts) == last.choices[0].text == answer.choices[0].text
        assert len(events) > 2


# ---- through the service: the gateway and a real executor ----


@pytest.fixture(scope="module")
def api(fleet) -> openai.OpenAI:  # noqa: F811  (fleet: the fixture)
    _, token = fleet.store.create_tenant(f"stream-{time.time_ns() % 10**9}")
    return client(fleet.url, token)


def streamed(stream) -> list[tuple[float, object]]:
    """The chunks of a stream, each with when it came (time.monotonic())."""
    return [(time.monotonic(), chunk) for chunk in stream]


def test_a_streamed_completion_adds_up_to_the_completion_not_streamed(fleet, api):  # noqa: F811
    model = str(fleet.model)
    whole = api.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                   extra_body={"lorafleet": {"timeout": 120}})
    assert whole.usage.completion_tokens >= 8, "a multi-token completion (else this test could not tell)"
    chunks = [chunk for _, chunk in streamed(api.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True))]
    assert all(chunk.object == "text_completion" and chunk.id == chunks[0].id for chunk in chunks)
    assert chunks[0].id.startswith("cmpl-") and chunks[0].model == model and chunks[0].created > 0
    texts = [chunk.choices[0].text for chunk in chunks]
    assert "".join(texts) == whole.choices[0].text
    assert sum(1 for text in texts if text) > 1, "the text comes in more than one chunk"
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None] * (len(chunks) - 1) + [
        whole.choices[0].finish_reason]
    assert all(chunk.usage is None for chunk in chunks)


def test_a_streamed_chat_completion_sends_the_role_then_the_content_then_the_finish(fleet, api):  # noqa: F811
    model = str(fleet.model)
    whole = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=24, temperature=0)
    assert whole.usage.completion_tokens >= 8
    chunks = [chunk for _, chunk in streamed(api.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=24, temperature=0, stream=True))]
    assert all(chunk.object == "chat.completion.chunk" and chunk.id.startswith("chatcmpl-") for chunk in chunks)
    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert deltas[0].role == "assistant" and deltas[0].content == ""
    assert all(delta.role is None for delta in deltas[1:])
    assert "".join(delta.content or "" for delta in deltas) == whole.choices[0].message.content
    assert sum(1 for delta in deltas if delta.content) > 1
    last = chunks[-1].choices[0]
    assert last.finish_reason == whole.choices[0].finish_reason and last.delta.content is None
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_include_usage_adds_a_last_chunk_with_the_usage_and_no_choices(fleet, api, route):  # noqa: F811
    model, options = str(fleet.model), {"include_usage": True}
    if route == "completions":
        whole = api.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0)
        stream = api.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                        stream_options=options)
    else:
        whole = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=10, temperature=0)
        stream = api.chat.completions.create(model=model, messages=CHAT, max_completion_tokens=10, temperature=0,
                                             stream=True, stream_options=options)
    chunks = [chunk for _, chunk in streamed(stream)]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None and chunk.choices for chunk in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_text_arrives_while_the_completion_is_still_being_generated(fleet, api):  # noqa: F811
    model = str(fleet.model)
    api.completions.create(model=model, prompt=PROMPT, max_tokens=1, extra_body={"lorafleet": {"timeout": 120}})
    started = time.monotonic()  # the base is loaded: what follows is the executor's pick-up and the generation
    chunks = streamed(api.completions.create(model=model, prompt=PROMPT, max_tokens=600, temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert chunks[-1][1].usage.completion_tokens >= 300, "a long completion (else there is no 'while')"
    first_text, last = next(at for at, chunk in chunks if chunk.choices and chunk.choices[0].text), chunks[-1][0]
    assert last - first_text > (last - started) / 3, "text came from early in the generation, not all at its end"


def test_a_stop_string_never_shows_in_the_stream_even_in_part(fleet, api):  # noqa: F811
    model = str(fleet.model)
    text = api.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    middle = len(text) // 2
    stop, never = text[middle:middle + 3], text[middle:middle + 2] + "\u2603"  # the second one never completes
    assert len(stop) == 3 and stop in text and never not in text
    for stops, expected in (([stop], text[:text.find(stop)]), ([never], text)):
        shown = ""
        chunks = [chunk for _, chunk in streamed(api.completions.create(
            model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True, stop=stops,
            stream_options={"include_usage": True}))]
        for chunk in chunks[:-1]:
            shown += chunk.choices[0].text
            assert expected.startswith(shown), f"{shown!r} was shown; the text is {expected!r} (stop {stops})"
        assert shown == expected
        ended_early = chunks[-1].usage.completion_tokens < 24
        assert ended_early == (stops == [stop]), "generation ends where the text reaches a stop string"
    plain = api.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert plain.choices[0].text == text[:text.find(stop)] and plain.usage.completion_tokens < 24


def test_a_bad_streamed_request_fails_with_an_error_naming_the_problem(fleet, api):  # noqa: F811
    model = str(fleet.model)
    with pytest.raises(openai.BadRequestError) as too_long:  # found by the executor, before any text
        api.completions.create(model=model, prompt="fox " * 1100, max_tokens=4, stream=True)
    assert "than the base's context of 1024 tokens" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as options_alone:
        api.completions.create(model=model, prompt=PROMPT, max_tokens=4, stream_options={"include_usage": True})
    assert options_alone.value.param == "stream_options" and "only allowed with stream=true" in (
        options_alone.value.message)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="ft:tiny:nobody:bot:job-0123456789abcdef", messages=CHAT, stream=True)


def test_another_tenants_request_stream_is_not_readable(fleet):  # noqa: F811
    """The stream's key holds the tenant: the owner reads the text, another tenant with the same request id nothing."""
    owner, other = (f"{who}-{time.time_ns() % 10**9}" for who in ("own", "other"))
    for name in (owner, other):
        fleet.store.create_tenant(name)
    generations = Generations(fleet.store, fleet.root / "hub", [fleet.model.parent])
    request = generations.submit(owner, str(fleet.model), prompt=PROMPT, timeout=30, stream=True,
                                 sampling=Sampling(max_tokens=6, temperature=0))
    stranger = request.model_copy(update={"tenant": other, "deadline": time.time() + 1.0})
    with pytest.raises(GenerationTimeout):
        list(generations.stream_events(stranger))
    events = list(generations.stream_events(request))
    assert events[-1].result is not None and events[-1].result.completion_tokens == 6
    assert "".join(event.text for event in events) == events[-1].result.choices[0].text
    assert not fleet.store.r.exists(keys.generation_stream(owner, request.request_id)), "read to its end: gone"


# ---- failures mid-stream: this test in the executor's place ----


def take_one(generations: Generations, compat_key: str):
    return wait_until(lambda: generations.take_requests(compat_key, ServingBudget(max_requests=1, max_tokens=4096)),
                      "the gateway to queue the request", timeout=30)[0]


@pytest.fixture
def executor_stand_in(store, hf_cache, base_model_dir, make_tenant, gateway):  # noqa: F811
    """A tenant's client on the gateway, and the generations store and base queue an executor would serve."""
    tenant = make_tenant()
    generations = Generations(store, hf_cache, [base_model_dir.parent.parent])
    compat_key = generations.resolve_model(tenant.name, "test-org/tiny-model").base.compat_key
    return client(gateway, tenant.token), generations, compat_key


def stream_in_background(api: openai.OpenAI, timeout: float) -> tuple[threading.Thread, dict]:
    """Stream a completion in a thread; what it got: its texts, and the exception that ended it."""
    got: dict = {"texts": []}

    def read() -> None:
        try:
            for chunk in api.completions.create(model="test-org/tiny-model", prompt=PROMPT, max_tokens=8, stream=True,
                                                extra_body={"lorafleet": {"timeout": timeout}}):
                got["texts"].append(chunk.choices[0].text)
        except openai.APIError as exc:
            got["error"] = exc

    reader = threading.Thread(target=read)
    reader.start()
    return reader, got


def test_an_executor_failure_mid_stream_is_raised_by_the_openai_client(executor_stand_in):
    api, generations, compat_key = executor_stand_in
    reader, got = stream_in_background(api, timeout=30)
    request = take_one(generations, compat_key)
    generations.publish_text([(request, 0, "Hello")])
    generations.deliver(request, GenerationResult(request_id=request.request_id, error="generation failed: boom"))
    reader.join(30)
    assert got["texts"] == ["Hello"]
    assert isinstance(got["error"], openai.APIError) and got["error"].message == "generation failed: boom"
    assert got["error"].type == "server_error" and got["error"].code == "generation_failed"


def test_an_executor_silent_mid_stream_ends_it_with_a_timeout_error(executor_stand_in):
    api, generations, compat_key = executor_stand_in
    reader, got = stream_in_background(api, timeout=1.0)
    generations.publish_text([(take_one(generations, compat_key), 0, "Hel")])
    reader.join(30)
    assert got["texts"] == ["Hel"]
    assert "fell silent for 1 s mid-answer" in got["error"].message and got["error"].code == "timeout"
