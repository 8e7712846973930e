"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's text generation shapes on the service's generation
queue (`scheduler.generation`), answered by the executor that has the model's base loaded (`executor/serving.py`).

`model` is one of the tenant's fine-tuned models (a succeeded job's `fine_tuned_model`), a kept checkpoint
(`<fine_tuned_model>:ckpt-step-N`) or a base a job could name. `n` (1 to `generation.MAX_CHOICES`) choices, each its
own sequence; per-token log-probs (`logprobs` 0-5 on completions, OpenAI's legacy object; `logprobs` and `top_logprobs`
0-20 on chat, `logprobs.content`): the model's own distribution, before temperature and top_p, as OpenAI's.
Streamed too, as OpenAI streams them: a chunk carries the entries of the tokens whose text it completes (chat's
`logprobs.content`, completions' legacy object of that chunk), their `text_offset` in the choice's whole text; joined
over the chunks they are the answer's log-probs, cut with its text at a stop string (executor/streaming.py).
A route waits for its answer on the event loop (`generation.GenerationWaits`, an asyncio Redis client: a waiting
request holds none of the server's worker threads,
which the other routes and the requests' own checks and submission run in), at most `lorafleet.timeout` seconds
(default `generation.DEFAULT_TIMEOUT_SECONDS`): 504 naming the base after that. One tenant has at most
`config.max_generations_per_tenant()` requests in progress in the service, on all gateways together (a slot each in
Redis, `generation_slots.GenerationSlots`, held until the request or its stream ends); more get 429, while the other
tenants' are served as before; a client that disconnects ends its wait and frees its slot at once
(`_unless_disconnected`; its request may still be generated, its answer then expires unread). A model on a base the
engine does not run is refused at once (400).

`stream: true` answers in server-sent events as OpenAI does (`data: <chunk JSON>` lines, then `data: [DONE]`): the
text as the executor generates it (`GenerationWaits.stream_events`), in `text_completion` chunks or `chat.completion.chunk`
deltas (the role first), each choice's by its `index` (interleaved as they come), then a chunk per choice with its
finish reason, and with `stream_options.include_usage` a last chunk of no choices and the usage (every chunk then has
`usage`, null but on that one). The response starts once the first event came, so a request that fails before any
text (no executor in time, a prompt over the base's context) gets its status as when not streamed; a failure after
that is an `error` event, which the `openai` client raises.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Optional, TypeVar, Union

import redis
import redis.asyncio
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_serializer

from lorafleet.gateway.app import ERROR_RESPONSES, Tenant
from lorafleet.gateway.errors import ApiError, from_exception
from lorafleet.gateway.models import ErrorResponse
from lorafleet.scheduler import config
from lorafleet.scheduler.generation import (
    DEFAULT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS, MAX_TOP_LOGPROBS, ChoiceResult, GenerationRequest, GenerationResult,
    Generations, GenerationTimeout, GenerationWaits, StreamEvent, TokenLogprob, parse_sampling,
)
from lorafleet.scheduler.generation_slots import AllSlotsTaken, GenerationSlots, Slot

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's legacy completions' limit (chat's: MAX_TOP_LOGPROBS)
# Prompts one completion request may list: each is a generation request of its own, all under the request's one slot.
MAX_PROMPTS = 8
CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI's chat has no default cap; here a chat answer stops at this unless asked
COMPLETION_RESPONSES = {**ERROR_RESPONSES, 429: {
    "model": ErrorResponse, "description": "too many of your generation requests in progress, or waiting for the base"},
    504: {"model": ErrorResponse, "description": "no executor serving the model's base answered in time"}}
STREAMED = {"text/event-stream": {"schema": {"type": "string", "description": (
    "with stream=true: `data: <chunk JSON>` events, then `data: [DONE]`")}}}
_CONNECTION_SETTINGS = {"host", "port", "path", "db", "username", "password", "decode_responses", "socket_timeout",
                        "socket_connect_timeout", "client_name"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before the answer; no one reads it
_Answer = TypeVar("_Answer")


class LorafleetGenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(DEFAULT_TIMEOUT_SECONDS, gt=0, le=MAX_TIMEOUT_SECONDS,
                           description="seconds to wait for an executor's answer")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: Optional[bool] = Field(False, description="a last chunk with the usage and no choices")


class _GenerationBody(BaseModel):
    """The fields both routes take; any other field OpenAI defines (echo, penalties, tools, ...) is refused naming
    it (`_refuse_unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = Field(1, description="choices, 1 to 8 (generation.MAX_CHOICES)")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = Field(None, description="only with stream=true")
    user: Optional[str] = Field(None, description="accepted and ignored")
    lorafleet: Optional[LorafleetGenerationOptions] = None


class CompletionRequest(_GenerationBody):
    prompt: Any = Field(..., description="a string, or a list of 1 to 8 strings answered unstreamed (choice i·n + j is "
                                         "prompt i's choice j); token ids are not supported")
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = Field(None, description="each token's log-prob and this many likeliest (0 to 5)")

    def top_logprobs_asked(self) -> Optional[int]:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise ApiError(400, f"logprobs: 0 to {MAX_COMPLETION_LOGPROBS}, got {self.logprobs}", param="logprobs",
                           code="invalid_value")
        return self.logprobs


class ChatCompletionRequest(_GenerationBody):
    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = Field(None, description="deprecated by OpenAI: max_completion_tokens")
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = Field(False, description="each token's log-prob (`choices[].logprobs.content`)")
    top_logprobs: Optional[int] = Field(None, description="with logprobs: this many likeliest per token (0 to 20)")

    def top_logprobs_asked(self) -> Optional[int]:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: only allowed with logprobs=true", param="top_logprobs",
                           code="invalid_value")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs: 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs}",
                           param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy log-probs of a completion: per token its text, log-prob, likeliest tokens, where it starts."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: tuple[TokenLogprob, ...]) -> "CompletionLogprobs":
        return cls(tokens=[entry.token for entry in entries], token_logprobs=[entry.logprob for entry in entries],
                   top_logprobs=[{top.token: top.logprob for top in entry.top_logprobs} for entry in entries],
                   text_offset=[entry.text_offset for entry in entries])


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[CompletionLogprobs] = None

    @classmethod
    def of(cls, choice: ChoiceResult, first_index: int = 0) -> "CompletionChoice":
        """`first_index`: the index of the prompt's first choice, for a request listing several prompts."""
        logprobs = None if choice.logprobs is None else CompletionLogprobs.of(choice.logprobs)
        return cls(index=first_index + choice.index, text=choice.text, finish_reason=choice.finish_reason,
                   logprobs=logprobs)


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChatMessageView(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]]
    refusal: None = None

    @classmethod
    def of(cls, entries: tuple[TokenLogprob, ...]) -> "ChatChoiceLogprobs":
        return cls(content=[ChatTokenLogprob(token=entry.token, logprob=entry.logprob, bytes=list(entry.bytes),
                                             top_logprobs=[ChatTopLogprob(token=top.token, logprob=top.logprob,
                                                                          bytes=list(top.bytes))
                                                           for top in entry.top_logprobs])
                            for entry in entries])


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageView
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[ChatChoiceLogprobs] = None

    @classmethod
    def of(cls, choice: ChoiceResult) -> "ChatChoice":
        logprobs = None if choice.logprobs is None else ChatChoiceLogprobs.of(choice.logprobs)
        return cls(index=choice.index, message=ChatMessageView(content=choice.text),
                   finish_reason=choice.finish_reason, logprobs=logprobs)


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str = ""
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: Optional[CompletionLogprobs] = None  # of the tokens this chunk's text completes


class CompletionChunk(BaseModel):
    """A streamed completion's chunk: OpenAI streams completions as `text_completion` objects."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Optional[Usage] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Optional[Literal["stop", "length"]] = None
    logprobs: Optional[ChatChoiceLogprobs] = None  # of the tokens this chunk's content completes

    @field_serializer("delta")
    def _given_fields(self, delta: ChatDelta) -> dict:
        """OpenAI's deltas hold only what they say: the role once, then content, then nothing (`{}`)."""
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


@dataclass(frozen=True)
class CompletionChunks:
    """The chunks of one streamed completion."""

    id: str
    created: int
    model: str

    def opening(self, n: int) -> list[CompletionChunk]:
        return []

    def text(self, index: int, text: str, logprobs: Optional[tuple[TokenLogprob, ...]]) -> CompletionChunk:
        return self._chunk([CompletionChunkChoice(
            index=index, text=text, logprobs=None if logprobs is None else CompletionLogprobs.of(logprobs))])

    def finish(self, index: int, reason: str) -> CompletionChunk:
        return self._chunk([CompletionChunkChoice(index=index, finish_reason=reason)])

    def usage(self, usage: Usage) -> CompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[CompletionChunkChoice], usage: Optional[Usage] = None) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


@dataclass(frozen=True)
class ChatChunks:
    """The chunks of one streamed chat completion: each choice's role delta first, as OpenAI sends it."""

    id: str
    created: int
    model: str

    def opening(self, n: int) -> list[ChatCompletionChunk]:
        return [self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
                for index in range(n)]

    def text(self, index: int, text: str, logprobs: Optional[tuple[TokenLogprob, ...]]) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=text),
                                            logprobs=None if logprobs is None else ChatChoiceLogprobs.of(logprobs))])

    def finish(self, index: int, reason: str) -> ChatCompletionChunk:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=reason)])

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self._chunk([], usage)

    def _chunk(self, choices: list[ChatChunkChoice], usage: Optional[Usage] = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


def _generations(request: Request) -> Generations:
    """One per gateway, on its store (made on first use)."""
    state = request.app.state
    if getattr(state, "generations", None) is None:
        state.generations = Generations(state.gateway.store, config.hf_hub_cache(), config.model_roots())
    return state.generations


def _waits(request: Request) -> GenerationWaits:
    """One per gateway, on an asyncio client of the store's server and user (made on first use, in the event loop
    that uses it)."""
    state = request.app.state
    if getattr(state, "generation_waits", None) is None:
        state.generation_waits = GenerationWaits(_async_redis(state.gateway.store.r))
    return state.generation_waits


def _async_redis(client: redis.Redis) -> redis.asyncio.Redis:
    """An asyncio client with the connection settings of `client` (server, user, password, TLS or socket); only
    those: its pool's other arguments are redis-py's own objects, made for the sync client."""
    pool = client.connection_pool
    connection_class = {redis.SSLConnection: redis.asyncio.SSLConnection,
                        redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
                        }.get(pool.connection_class, redis.asyncio.Connection)
    settings = {name: value for name, value in pool.connection_kwargs.items()
                if name in _CONNECTION_SETTINGS or name.startswith("ssl_")}
    return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(connection_class=connection_class,
                                                                            **settings))


async def _take_slot(request: Request, tenant: str, limit: int) -> Slot:
    """A slot among the tenant's generation requests in progress in the service; 429 when it has `limit` already.
    The slots have an asyncio client of their own (made on first use, as `_waits`'s): its connections only run short
    commands. A wait cut by a disconnect drops its connection, which `_waits`'s pool would hand out next, and the
    slot's give-back would first reconnect (some milliseconds, in which the client's next request was refused)."""
    state = request.app.state
    if getattr(state, "generation_slots", None) is None:
        state.generation_slots = GenerationSlots(_async_redis(state.gateway.store.r), limit)
    try:
        return await state.generation_slots.hold(tenant)
    except AllSlotsTaken as exc:
        raise ApiError(429, str(exc), code="rate_limit_exceeded", type="requests", retry=True) from None


class _HeldStream(StreamingResponse):
    """A streamed answer that gives its slot back however it ends: sent to the end, failed, or cut by the client
    (Starlette listens for the disconnect while it streams, and cancels the stream; before the stream began,
    `_unless_disconnected` does)."""

    def __init__(self, content: AsyncIterator[str], give_back: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._give_back = give_back

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._give_back()


def _refuse_unsupported(body: _GenerationBody) -> None:
    for field, value in (body.model_extra or {}).items():
        if value is not None:
            raise ApiError(400, f"{field}: not supported by this server", param=field, code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only allowed with stream=true", param="stream_options",
                       code="invalid_value")


def _prompts(body: CompletionRequest) -> list[str]:
    """The request's prompts: its string, or its list of strings (several only unstreamed); refusals name `prompt`."""
    prompt = body.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(item, str) for item in prompt):
        raise ApiError(400, "prompt: a string or a list of strings (token ids are not supported)", param="prompt",
                       code="invalid_value")
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}",
                       param="prompt", code="invalid_value")
    if body.stream and len(prompt) > 1:
        raise ApiError(400, "prompt: several prompts are answered unstreamed only (stream=false)", param="prompt",
                       code="invalid_value")
    return prompt


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int):
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    logprobs = body.top_logprobs_asked()
    options = {"max_tokens": max_tokens, "temperature": 1.0 if body.temperature is None else body.temperature,
               "top_p": 1.0 if body.top_p is None else body.top_p, "seed": body.seed, "stop": stop,
               "n": 1 if body.n is None else body.n, "logprobs": logprobs}
    try:
        return parse_sampling(options)
    except ValueError as exc:
        raise from_exception(exc) from None


def _chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI's messages as role and text: `developer` is a system message; content as a string or text parts."""
    found = []
    for index, message in enumerate(messages):
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise ApiError(400, f"messages.{index}.{extra[0]}: not supported by this server",
                           param=f"messages.{index}.{extra[0]}", code="unsupported_parameter")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in _ROLES:
            raise ApiError(400, f"messages.{index}.role: one of {', '.join(_ROLES)}, got {role!r}",
                           param=f"messages.{index}.role", code="invalid_value")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages.{index}.content: a string or a list of text parts",
                           param=f"messages.{index}.content", code="invalid_value")
        found.append({"role": _ROLES[role], "content": content})
    return found


def _submit(request: Request, tenant: str, body: CompletionRequest | ChatCompletionRequest, max_tokens: int,
            **given: Any) -> GenerationRequest:
    """Queue the request; every refusal in OpenAI's shape. Blocking (Redis, the model's files): run in a worker
    thread, briefly."""
    _refuse_unsupported(body)
    sampling = _sampling(body, max_tokens)
    timeout = (body.lorafleet or LorafleetGenerationOptions()).timeout
    try:
        return _generations(request).submit(tenant, body.model, sampling=sampling, timeout=timeout,
                                            stream=bool(body.stream), **given)
    except LookupError as exc:
        raise ApiError(404, str(exc).removeprefix("model: "), param="model", code="model_not_found") from None
    except ValueError as exc:
        raise from_exception(exc) from None


def _timed_out(exc: GenerationTimeout) -> ApiError:
    return ApiError(504, str(exc), code="timeout", type="timeout_error")


def _failed(result: GenerationResult) -> ApiError:
    """A request the executor could not serve (its prompt over the base's context, an adapter that does not load)."""
    return ApiError(400, result.error, code="invalid_request")


async def _unless_disconnected(request: Request, waiting: Awaitable[_Answer]) -> _Answer:
    """`waiting`'s answer, or ApiError(499) as soon as the client closed its connection: the route then ends and
    gives its slot back at once, not at the request's timeout (a tenant's abandoned requests would lock it out)."""
    wait, gone = asyncio.ensure_future(waiting), asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({wait, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not wait.done():
            raise ApiError(CLIENT_CLOSED, "the client closed the connection before the answer", code="client_closed")
        return wait.result()
    finally:  # stop the Redis read now; its request may still be generated (its answer then expires unread)
        for task in (wait, gone):
            task.cancel()
        await asyncio.gather(wait, gone, return_exceptions=True)


async def _client_gone(request: Request) -> None:
    """Return once the client disconnected. The body is read, so the next ASGI message is the disconnect; awaited,
    not polled (`request.is_disconnected()` never sees it through the metrics middleware, which passes messages on
    in a task group its zero-time check cancels)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait(request: Request, pending: list[GenerationRequest]) -> list[GenerationResult]:
    """Every pending request's answer (one watch of the connection for all); the first failure fails the call."""
    waits = _waits(request)
    try:
        results = await _unless_disconnected(request, asyncio.gather(*(waits.result(one) for one in pending)))
    except GenerationTimeout as exc:
        raise _timed_out(exc) from None
    for result in results:
        if result.error is not None:
            raise _failed(result)
    return results


async def _stream(request: Request, pending: GenerationRequest, chunks: CompletionChunks | ChatChunks,
                  body: _GenerationBody, slot: Slot) -> StreamingResponse:
    """The streamed answer, begun once its first event came (a failure before any text keeps its status); it holds
    the request's slot until it ends."""
    events = _waits(request).stream_events(pending)
    try:
        first = await _unless_disconnected(request, anext(events))
    except GenerationTimeout as exc:
        raise _timed_out(exc) from None
    if first.result is not None and first.result.error is not None:
        raise _failed(first.result)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    # no caching, and no buffering by a proxy in front (nginx's header): each chunk goes out as it comes
    return _HeldStream(_events(chunks, _starting_with(first, events), include_usage, pending.sampling.n),
                       slot.hand_over(), media_type="text/event-stream",
                       headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _starting_with(first: StreamEvent, rest: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    yield first
    async for event in rest:
        yield event


async def _events(chunks: CompletionChunks | ChatChunks, events: AsyncIterator[StreamEvent], include_usage: bool,
                  n: int) -> AsyncIterator[str]:
    """Server-sent events: the chunks of the text as it comes, the finish, the usage if asked, `[DONE]`; an error
    (the executor failed or fell silent mid-answer) ends the stream as an `error` event instead."""
    def data(chunk: BaseModel) -> str:
        return f"data: {chunk.model_dump_json(exclude=None if include_usage else {'usage'})}\n\n"

    for chunk in chunks.opening(n):
        yield data(chunk)
    try:
        async for event in events:
            if event.text or event.logprobs:
                yield data(chunks.text(event.index, event.text, event.logprobs))
            result = event.result
            if result is not None and result.error is not None:  # the executor's batch failed after some text
                yield _error_event(ApiError(500, result.error, code="generation_failed", type="server_error"))
                return
            if result is not None:
                for choice in result.choices:
                    yield data(chunks.finish(choice.index, choice.finish_reason))
                if include_usage:
                    yield data(chunks.usage(Usage(**result.usage())))
    except GenerationTimeout as exc:
        yield _error_event(_timed_out(exc))
        return
    yield "data: [DONE]\n\n"


def _error_event(error: ApiError) -> str:
    """An error in the stream, in the shape the `openai` client raises as an APIError."""
    return f"data: {json.dumps(error.body())}\n\n"


def completion_routes() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["completions"], responses=COMPLETION_RESPONSES)
    limit = config.max_generations_per_tenant()  # read as the gateway starts: a bad setting stops it there

    @router.post("/completions", response_model=Completion, responses={200: {"content": STREAMED}})
    async def create_completion(body: CompletionRequest, tenant: Tenant, request: Request
                                ) -> Union[Completion, StreamingResponse]:
        """Complete `prompt` with `model` (a fine-tuned model of yours, one of its checkpoints, or a base); a list of
        prompts is answered as OpenAI does, prompt i's choice j at index i·n + j."""
        prompts = _prompts(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        async with await _take_slot(request, tenant, limit) as slot:
            pending = [await run_in_threadpool(_submit, request, tenant, body, max_tokens, prompt=prompt)
                       for prompt in prompts]
            completion_id, created = "cmpl-" + pending[0].request_id.removeprefix("gen-"), int(pending[0].submitted_at)
            if body.stream:  # one prompt (_prompts)
                return await _stream(request, pending[0], CompletionChunks(completion_id, created, body.model), body,
                                     slot)
            results = await _wait(request, pending)
        n = pending[0].sampling.n
        usage = [result.usage() for result in results]
        return Completion(id=completion_id, created=created, model=body.model,
                          usage=Usage(**{field: sum(counts[field] for counts in usage) for field in usage[0]}),
                          choices=[CompletionChoice.of(choice, i * n) for i, result in enumerate(results)
                                   for choice in result.choices])

    @router.post("/chat/completions", response_model=ChatCompletion, responses={200: {"content": STREAMED}})
    async def create_chat_completion(body: ChatCompletionRequest, tenant: Tenant, request: Request
                                     ) -> Union[ChatCompletion, StreamingResponse]:
        """Answer the conversation in `messages` with `model`, rendered by the base's chat template."""
        max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_DEFAULT_MAX_TOKENS
        async with await _take_slot(request, tenant, limit) as slot:
            pending = await run_in_threadpool(_submit, request, tenant, body, max_tokens,
                                              messages=_chat_messages(body.messages))
            completion_id, created = "chatcmpl-" + pending.request_id.removeprefix("gen-"), int(pending.submitted_at)
            if body.stream:
                return await _stream(request, pending, ChatChunks(completion_id, created, body.model), body, slot)
            result, = await _wait(request, [pending])
        return ChatCompletion(id=completion_id, created=created, model=body.model, usage=Usage(**result.usage()),
                              choices=[ChatChoice.of(choice) for choice in result.choices])

    return router
