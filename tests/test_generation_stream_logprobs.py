"""Log-probs in streamed answers (`stream` with `logprobs`), as OpenAI streams them: each chunk carries the entries of
the tokens whose text it completes, and joined over the chunks they are what the same request gets unstreamed (same
seed), cut with the text at a stop string. The executor's side on the tiny byte-level tokenizer (a character split
over tokens comes whole, with all its tokens) and a real Valkey; then the real `openai` client on a real gateway
answered by a real CPU executor (test_gateway's `fleet`)."""

from __future__ import annotations

import time

import openai
import pytest

from helpers_models import SPECIAL_TOKENS, build_tokenizer
from lorafleet.executor.generate import Completion, TokenLogprobs
from lorafleet.executor.serving import GenerationServer
from lorafleet.executor.streaming import INCOMPLETE, StreamPublisher
from lorafleet.scheduler.generation import (
    GenerationRequest, GenerationResult, Generations, ModelTarget, Sampling, ServedBase, new_request_id,
)
from test_gateway import client, fleet  # noqa: F401  (fixtures: fleet)
from test_generation_stream import CHAT, PROMPT

SPLIT_CHARACTERS = "héllo wörld, 日本語 and ünïcode 🎉 end"


def legacy_token_bytes(token: str) -> bytes:
    """A legacy log-probs token's bytes: `bytes:\\xe6\\x97` as written for part of a character, none for a special
    token (the text leaves it out), else its UTF-8."""
    if token in SPECIAL_TOKENS:
        return b""
    if token.startswith("bytes:"):
        return bytes(int(pair, 16) for pair in token.removeprefix("bytes:").split("\\x")[1:])
    return token.encode("utf-8")


# ---- the executor's side: a streamed choice fed one generated token at a time, published on a real Valkey ----


def streamed_choice(store, tmp_path, text: str, stops: tuple[str, ...]):
    """Stream the tokens of `text` as if generated one a step (made-up log-probs), then deliver the answer as the
    executor would: the stream's text events, and the answer's choice (its whole text and log-probs)."""
    tokenizer = build_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    logprobs = [TokenLogprobs(-0.25 * (i + 1), (token, 5), (-0.25 * (i + 1), -4.0)) for i, token in enumerate(ids)]
    target = ModelTarget(model="tiny", base=ServedBase(compat_key="k", base_snapshot=str(tmp_path), base_name="tiny"))
    request = GenerationRequest(request_id=new_request_id(), tenant="streamer", target=target, prompt="p",
                                sampling=Sampling(max_tokens=len(ids), stop=stops, logprobs=2),
                                submitted_at=time.time(), deadline=time.time() + 30, stream=True)
    generations = Generations(store, tmp_path, [])
    publisher, (choice_id,) = StreamPublisher(generations, tokenizer, [request]), request.choice_ids()
    for count in range(1, len(ids) + 1):
        if choice_id in publisher({choice_id: ids[:count]}, {choice_id: logprobs[:count]}):
            break  # a stop string reached: the engine ends the choice here
    completion = Completion(choice_id, tuple(ids[:count]), "length", 3, tuple(logprobs[:count]))
    choice = GenerationServer._choice(tokenizer, request, 0, completion)
    publisher.deliver(request, GenerationResult(request_id=request.request_id, choices=(choice,)))
    events = list(generations.stream_events(request))
    assert events[-1].result.choices[0] == choice
    return events[:-1], choice


def test_the_tokens_of_a_split_character_come_with_the_event_that_completes_it(store, tmp_path):
    tokenizer = build_tokenizer()
    assert any(INCOMPLETE in tokenizer.decode([token])
               for token in tokenizer(SPLIT_CHARACTERS, add_special_tokens=False)["input_ids"])
    events, choice = streamed_choice(store, tmp_path, SPLIT_CHARACTERS, ())
    assert "".join(event.text for event in events) == choice.text == SPLIT_CHARACTERS
    assert tuple(entry for event in events for entry in event.logprobs) == choice.logprobs
    for event in events:  # every event's text is whole tokens here (no stop string): exactly its tokens' bytes
        assert INCOMPLETE not in event.text
        assert b"".join(bytes(entry.bytes) for entry in event.logprobs) == event.text.encode("utf-8")
    split = [event for event in events if any(entry.token.startswith("bytes:") for entry in event.logprobs)]
    assert split and all(len(event.logprobs) >= 2 for event in split), "a character's pieces come together"
    sent = 0
    for event in events:  # offsets in the choice's whole text: the event's first token starts where its text does
        assert event.logprobs[0].text_offset == sent
        sent += len(event.text)


@pytest.mark.parametrize("stops", [("本語",), ("wör", "ünï"), ("ENDX",), ("d, 日X",)])
def test_streamed_logprobs_held_back_with_a_possible_stop_string_add_up_to_the_cut_answers(store, tmp_path, stops):
    """Text held back as the start of a stop string keeps its tokens back too; the last events carry the rest of
    the answer's log-probs, cut where its text is cut (or not, when the stop string never completes)."""
    events, choice = streamed_choice(store, tmp_path, SPLIT_CHARACTERS, stops)
    assert "".join(event.text for event in events) == choice.text
    assert tuple(entry for event in events for entry in event.logprobs) == choice.logprobs
    assert (choice.finish_reason == "stop") == (choice.text != SPLIT_CHARACTERS)
    sent = ""
    for event in events:  # no token comes before its text begins to be sent
        sent += event.text
        assert all(entry.text_offset < len(sent) for entry in event.logprobs)


# ---- through the service: the gateway and a real executor, the `openai` client ----


@pytest.fixture(scope="module")
def api(fleet) -> openai.OpenAI:  # noqa: F811  (fleet: the fixture)
    _, token = fleet.store.create_tenant(f"streamlp-{time.time_ns() % 10**9}")
    return client(fleet.url, token)


def chat_chunks_by_choice(stream) -> dict[int, list[tuple[str, list]]]:
    """Each choice's (content, log-prob entries) of its chunks that carry either, in order."""
    by_choice: dict[int, list[tuple[str, list]]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            entries = choice.logprobs.content if choice.logprobs is not None else []
            if choice.delta.content or entries:
                by_choice.setdefault(choice.index, []).append((choice.delta.content or "", entries))
    return by_choice


def completion_chunks_by_choice(stream) -> dict[int, list[tuple[str, object]]]:
    """Each choice's (text, legacy log-probs) of its chunks that carry either, in order."""
    by_choice: dict[int, list[tuple[str, object]]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.text or choice.logprobs is not None:
                by_choice.setdefault(choice.index, []).append((choice.text, choice.logprobs))
    return by_choice


def joined_legacy(logprobs: list) -> dict[str, list]:
    fields = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {field: [value for part in logprobs for value in getattr(part, field)] for field in fields}


@pytest.mark.parametrize("sampled", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}])
def test_a_streamed_chats_logprobs_joined_are_the_unstreamed_ones(fleet, api, sampled):  # noqa: F811
    model, asked = str(fleet.model), dict(max_completion_tokens=24, logprobs=True, top_logprobs=3, **sampled)
    whole = api.chat.completions.create(model=model, messages=CHAT, extra_body={"lorafleet": {"timeout": 120}},
                                        **asked)
    assert whole.usage.completion_tokens >= 8, "a multi-token answer (else this test could not tell)"
    chunks = chat_chunks_by_choice(api.chat.completions.create(model=model, messages=CHAT, stream=True, **asked))[0]
    assert "".join(text for text, _ in chunks) == whole.choices[0].message.content
    streamed = [entry for _, entries in chunks for entry in entries]
    assert streamed == whole.choices[0].logprobs.content
    assert sum(1 for _, entries in chunks if entries) > 1, "the log-probs come in more than one chunk"
    for text, entries in chunks:  # no stop string: each chunk's content is its tokens' bytes (U+FFFD: bytes of none)
        assert bytes(b for entry in entries for b in entry.bytes).decode("utf-8", "replace") == text


@pytest.mark.parametrize("sampled", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}])
def test_a_streamed_completions_legacy_logprobs_joined_are_the_unstreamed_ones(fleet, api, sampled):  # noqa: F811
    model, asked = str(fleet.model), dict(max_tokens=24, logprobs=2, **sampled)
    whole = api.completions.create(model=model, prompt=PROMPT, **asked)
    chunks = completion_chunks_by_choice(api.completions.create(model=model, prompt=PROMPT, stream=True, **asked))[0]
    assert "".join(text for text, _ in chunks) == whole.choices[0].text
    assert joined_legacy([logprobs for _, logprobs in chunks]) == joined_legacy([whole.choices[0].logprobs])
    assert sum(1 for _, logprobs in chunks if logprobs.tokens) > 1
    sent = 0
    for text, logprobs in chunks:  # each chunk's text is its tokens'; offsets count in the choice's whole text
        assert b"".join(map(legacy_token_bytes, logprobs.tokens)).decode("utf-8", "replace") == text
        assert logprobs.text_offset[:1] == ([sent] if text else [])
        sent += len(text)


def test_streamed_logprobs_end_where_a_stop_string_cuts_the_unstreamed_ones(fleet, api):  # noqa: F811
    model = str(fleet.model)
    full = api.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=0).choices[0]
    stop = next(token for token in full.logprobs.tokens[4:] if token.strip() and not token.startswith("bytes:"))
    asked = dict(max_tokens=24, temperature=0, logprobs=0, stop=[stop])
    cut = api.completions.create(model=model, prompt=PROMPT, **asked).choices[0]
    assert cut.finish_reason == "stop" and len(cut.logprobs.tokens) < len(full.logprobs.tokens)
    chunks = completion_chunks_by_choice(api.completions.create(model=model, prompt=PROMPT, stream=True, **asked))[0]
    assert "".join(text for text, _ in chunks) == cut.text
    assert joined_legacy([logprobs for _, logprobs in chunks]) == joined_legacy([cut.logprobs])


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_each_streamed_choices_logprobs_are_that_choices(fleet, api, route):  # noqa: F811
    model = str(fleet.model)
    if route == "chat":
        asked = dict(model=model, messages=CHAT, max_completion_tokens=12, temperature=1.0, seed=3, n=2,
                     logprobs=True, top_logprobs=1)
        whole = api.chat.completions.create(**asked)
        wanted = [choice.logprobs.content for choice in whole.choices]
        chunks = chat_chunks_by_choice(api.chat.completions.create(stream=True, **asked))
        got = [[entry for _, entries in chunks[index] for entry in entries] for index in range(2)]
    else:
        asked = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, n=2, logprobs=1)
        whole = api.completions.create(**asked)
        wanted = [joined_legacy([choice.logprobs]) for choice in whole.choices]
        chunks = completion_chunks_by_choice(api.completions.create(stream=True, **asked))
        got = [joined_legacy([logprobs for _, logprobs in chunks[index]]) for index in range(2)]
    assert wanted[0] != wanted[1], "two different choices (else this test could not tell them apart)"
    assert got == wanted
