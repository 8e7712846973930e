"""Text generation through the service: a tenant's request for a completion by one of its trained adapters (or a bare
base), queued in Redis for an executor that has the base loaded, answered through a result key.

    generations = Generations(store, config.hf_hub_cache(), config.model_roots())
    request = generations.submit(tenant, "ft:tiny:acme:bot:job-0123456789abcdef", prompt="Hi", sampling=Sampling())
    result = generations.wait_result(request)        # GenerationTimeout when no executor answered in time
    result = await GenerationWaits(async_redis).result(request)  # the same, waiting on the event loop (the gateway)

Model names (`resolve_model`): a SUCCEEDED job's `fine_tuned_model` (`ft:<base>:<tenant>:<name>:<job id>`, the
adapter it published), that name with `:ckpt-step-N` (one of the checkpoints the job still keeps, whatever its
state), or a base model as a job spec names it (a model id in the local cache or a directory under the model roots:
the same bases a tenant may train on). Another tenant's job answers exactly as a name that does not exist. A GaLore
job's model owns all its weights: it is served as a base of its own (`ServedBase.model_uri`), which an executor without
jobs loads. A LoPA job's export is served like an adapter (the executor computes each prompt's soft prompt from it
and places it before the prompt). A model on a base whose family the engine does not run (`spec.GENERATION_FAMILIES`)
is refused at submission, rather than having an idle executor load the base only to fail the request.

The executor side (`executor/serving.py`) takes the requests of the base it has loaded between training steps
(`take_requests`, bounded by a `ServingBudget`) and answers each (`deliver`). An executor without jobs may load the base
of requests that no executor serves (`bases_unserved`, `claim_base`). Keys: `keys.generation_*`.

Streaming (`submit(..., stream=True)`): the executor publishes the request's text as it is generated, with its
tokens' log-probs when asked (`publish_text`, `StreamEvent`s on `keys.generation_stream`), and ends the stream with
the result (`deliver`) instead of answering on the result key; the caller reads the events as they come
(`stream_events`). The stream's key holds the tenant's name: a request id read with another tenant's name finds
nothing.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import AsyncIterator, Iterator, Literal, NamedTuple, Optional, Sequence

import redis
import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lorafleet.scheduler import keys
from lorafleet.scheduler.records import JobRecord, JobState
from lorafleet.scheduler.results import checkpoint_step
from lorafleet.scheduler.spec import GENERATION_FAMILIES, SpecError
from lorafleet.scheduler.store import JobStore, QuotaExceeded
from lorafleet.scheduler.submission import compat_key, resolve_base_model

MAX_PROMPT_CHARS = 100_000  # a prompt, or all of a conversation's contents together
MAX_MESSAGES = 256
MAX_COMPLETION_TOKENS = 2048  # one request's max_tokens: an executor answers between training steps
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_CHOICES = 8  # `n`: each choice is its own sequence, generated like a request of its own (its prompt prefilled once)
MAX_TOP_LOGPROBS = 20  # OpenAI's chat limit (its legacy completions allow 5: the gateway's route checks that)
MAX_TIMEOUT_SECONDS = 600.0
MAX_WAITING_PER_BASE = 1024  # requests a base's queue holds; more are refused (429) until executors catch up
DEFAULT_TIMEOUT_SECONDS = 60.0
RESULT_TTL_SECONDS = 120  # an answer nobody collected is dropped after this
STREAM_TTL_SECONDS = 120  # a stream nobody reads is dropped this long after its last event
WAIT_SLICE_SECONDS = 2.0  # one blocking read of a waiter
SERVER_TTL_SECONDS = 10  # an executor serving a base says so again at least this often (`take_requests(server=...)`)
_FINE_TUNED_RE = re.compile(r"^ft:.+:(?P<job_id>job-[0-9a-f]{16})(?::ckpt-step-(?P<step>\d{1,9}))?$")


class GenerationTimeout(TimeoutError):
    """No executor answered within the request's time."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChatMessage(_Record):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(_Record):
    """How to draw the completion: greedy when temperature is 0."""

    max_tokens: int = Field(16, ge=1, le=MAX_COMPLETION_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: tuple[str, ...] = Field((), max_length=MAX_STOP_STRINGS,
                                  description="the text is cut before the first of these it contains")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices, each its own sequence (with a seed, choice i draws "
                                                        "from `choice_seed(seed, i)`)")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                    description="each token's log-prob and this many likeliest; None: none")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: tuple[str, ...]) -> tuple[str, ...]:
        if not all(1 <= len(text) <= MAX_STOP_CHARS for text in stop):
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
        return stop


class ServedBase(_Record):
    """A frozen base as an executor loads it: what a request needs of the cohort that answers it."""

    compat_key: str  # `plan.compat_key` of the jobs trained on it: snapshot | quantization | dtype
    base_snapshot: str  # the resolved directory
    quantization: str = "none"
    dtype: str = "auto"
    base_name: str  # as the tenant named it (a job spec's base_model, or the model asked for): what errors show
    # The weights to load instead of base_snapshot's, an artifact URI: a GaLore job's whole model (its published model
    # or a kept checkpoint), served as a base of its own; base_snapshot is then the base it was trained from.
    model_uri: Optional[str] = None


class ModelTarget(_Record):
    """What a model name resolves to: a base, and an adapter on it (None: the bare base)."""

    model: str
    base: ServedBase
    job_id: Optional[str] = None
    adapter_uri: Optional[str] = None  # a PEFT adapter directory: the published adapter or a kept checkpoint


class GenerationRequest(_Record):
    """One request as queued (`keys.generation_queue`): exactly one of `prompt` and `messages`."""

    request_id: str
    tenant: str
    target: ModelTarget
    prompt: Optional[str] = None
    messages: Optional[tuple[ChatMessage, ...]] = None
    sampling: Sampling = Sampling()
    submitted_at: float
    deadline: float  # unix s: an executor that takes it later drops it (its caller stopped waiting)
    stream: bool = False  # the text is published as it is generated (`keys.generation_stream`), ending with the result

    @model_validator(mode="after")
    def _one_input(self) -> "GenerationRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self

    def choice_ids(self) -> list[str]:
        """The engine's request id of each choice, by index."""
        return [f"{self.request_id}/{index}" for index in range(self.sampling.n)]


class TopLogprob(_Record):
    """A likely token at a position: its text, log-prob and UTF-8 bytes (a token may be part of a character)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


class TokenLogprob(TopLogprob):
    """A generated token's log-prob, where its text starts in the choice's text, and the likeliest tokens there."""

    text_offset: int
    top_logprobs: tuple[TopLogprob, ...] = ()


class ChoiceResult(_Record):
    """One choice of an answer: its text, why it ended, its tokens' log-probs when asked (`Sampling.logprobs`)."""

    index: int = 0
    text: str = ""
    completion_tokens: int = 0  # tokens generated (a stop string may cut the text shorter)
    finish_reason: Literal["stop", "length"]
    logprobs: Optional[tuple[TokenLogprob, ...]] = None  # the tokens of `text` (cut with it at a stop string)


class GenerationResult(_Record):
    """An answer (`keys.generation_result`): its `Sampling.n` choices, or the error that failed this request alone."""

    request_id: str
    prompt_tokens: int = 0  # once, however many choices (OpenAI's usage)
    choices: tuple[ChoiceResult, ...] = ()  # by index; none with an error
    error: Optional[str] = None
    executor_id: str = ""

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def view(self, model: str) -> dict:
        """The plain JSON the Celery task `lorafleet.generate` returns: the choices (`text` and `finish_reason` are
        also given at the top, the first choice's, as before `n` was taken)."""
        first = self.choices[0]
        return {"id": self.request_id, "model": model, "text": first.text, "finish_reason": first.finish_reason,
                "choices": [choice.model_dump(exclude_none=True) for choice in self.choices], "usage": self.usage()}


class StreamEvent(_Record):
    """One event of a streamed request (`keys.generation_stream`): text of choice `index` generated since its last
    event, and when the request asks (`Sampling.logprobs`) the log-probs of the tokens this text makes whole (their
    offsets in the choice's whole text; joined over the events they are the result's, cut with it at a stop string);
    the last event holds the result alone, whose choices' texts are the whole texts (what was not sent of them came
    in text events just before)."""

    index: int = 0
    text: str = ""
    logprobs: Optional[tuple[TokenLogprob, ...]] = None
    result: Optional[GenerationResult] = None


class StreamedText(NamedTuple):
    """New text of a streamed request's choice (`Generations.publish_text`), with its tokens' log-probs if asked."""

    request: GenerationRequest
    index: int
    text: str
    logprobs: Optional[tuple[TokenLogprob, ...]] = None


class ServingBudget(_Record):
    """At most this much work taken at once: `max_requests` requests whose max_tokens add up to at most
    `max_tokens` (always at least one request, whatever its max_tokens)."""

    max_requests: int = Field(ge=1)
    max_tokens: int = Field(ge=1)


class GenerationCall(_Record):
    """What a Celery tenant sends to `lorafleet.generate`: the model, a prompt or chat messages, sampling options."""

    model: str
    prompt: Optional[str] = None
    messages: Optional[list[dict]] = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: Optional[str | list[str]] = None
    n: int = 1
    logprobs: Optional[int] = Field(None, description="0 to MAX_TOP_LOGPROBS alternatives per token")
    timeout: float = Field(DEFAULT_TIMEOUT_SECONDS, description="seconds to wait for an executor's answer")

    def sampling(self) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return parse_sampling({"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                               "seed": self.seed, "stop": stop, "n": self.n, "logprobs": self.logprobs})


def parse_call(raw: object) -> GenerationCall:
    """A `lorafleet.generate` request; ValueError naming the field."""
    if not isinstance(raw, dict):
        raise ValueError("request: an object with model, and prompt or messages (and max_tokens, temperature, "
                         "top_p, seed, stop, n, logprobs, timeout)")
    try:
        return GenerationCall.model_validate(raw)
    except ValueError as exc:
        raise ValueError(_first_error(exc)) from None


def fine_tuned_model_name(record: JobRecord) -> str:
    """`ft:<base name>:<tenant>:<adapter name>:<job id>`, OpenAI's pattern with the tenant as the organisation."""
    base_name = PurePosixPath(record.spec.base_model.rstrip("/")).name or record.spec.base_model
    return f"ft:{base_name}:{record.tenant}:{record.spec.name}:{record.job_id}"


def checkpoint_model_name(record: JobRecord, step: int) -> str:
    """The name of the job's checkpoint at `step` (OpenAI's `fine_tuned_model_checkpoint`)."""
    return f"{fine_tuned_model_name(record)}:ckpt-step-{step}"


def parse_sampling(raw: object) -> Sampling:
    """Sampling options from a caller's JSON object; ValueError naming the field (`max_tokens: ...`)."""
    if not isinstance(raw, dict):
        raise ValueError("sampling: an object of max_tokens, temperature, top_p, seed, stop, n, logprobs")
    try:
        return Sampling.model_validate(raw)
    except ValueError as exc:
        raise ValueError(_first_error(exc)) from None


def not_found(model: str) -> LookupError:
    """The one answer for a name that does not exist and for another tenant's."""
    return LookupError(f"model: the model {model!r} does not exist or you do not have access to it")


def new_request_id() -> str:
    return "gen-" + secrets.token_hex(12)


# KEYS: the base's queue, the bases hash. ARGV: the request's JSON, the queue's time to live (its caller's timeout and
# a minute: a queue nobody serves goes away after its last caller gave up; never shortened), the base's compat key and
# JSON, the most requests a base's queue holds. 0 when it is full.
_SUBMIT = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[5]) then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# KEYS: the base's queue, its server key. ARGV: max requests, max tokens, now, the executor taking them ('' for none:
# else it is marked as the base's server for ARGV[5] seconds first). Pops from the head while the budget allows (always
# at least one; a request costs max_tokens for each of its n choices), dropping requests whose deadline passed; returns
# the taken requests' JSON, oldest first.
_TAKE = """
local limit, budget, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] ~= '' then redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5]) end
local taken, tokens, popped = {}, 0, 0
while #taken < limit and popped < 10 * limit do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local request = cjson.decode(head)
  local cost = tonumber(request['sampling']['max_tokens']) * tonumber(request['sampling']['n'])
  if #taken > 0 and tokens + cost > budget then break end
  redis.call('LPOP', KEYS[1])
  popped = popped + 1
  if tonumber(request['deadline']) > now then
    taken[#taken + 1] = head
    tokens = tokens + cost
  end
end
return taken
"""


# KEYS: the bases hash, the base's queue. ARGV: its compat key. Forgets the base only while its queue is empty.
_FORGET_BASE = """
if redis.call('LLEN', KEYS[2]) == 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""


class Generations:
    """Generation requests and answers in Redis (any role's store: gateway, worker, executor)."""

    def __init__(self, store: JobStore, hub_cache: Path, model_roots: Sequence[Path] = ()):
        self.store, self.r = store, store.r
        self.hub_cache, self.model_roots = Path(hub_cache), list(model_roots)
        self._submit = self.r.register_script(_SUBMIT)
        self._take = self.r.register_script(_TAKE)
        self._forget_base = self.r.register_script(_FORGET_BASE)

    # ---- the caller's side ----

    def resolve_model(self, tenant: str, model: str) -> ModelTarget:
        """What `model` names for `tenant`; LookupError (the same for another tenant's job) or ValueError."""
        if not isinstance(model, str) or not model:
            raise ValueError("model: give a model name: a fine-tuned model, a checkpoint or a base")
        if model.startswith("ft:"):
            return self._adapter_target(model, *self.adapter_of(tenant, model))
        try:
            snapshot = str(resolve_base_model(model, self.hub_cache, None, self.model_roots).resolve())
        except SpecError:
            raise not_found(model) from None
        return ModelTarget(model=model, base=ServedBase(compat_key=compat_key(snapshot, "none", "auto"),
                                                        base_snapshot=snapshot, base_name=model))

    def adapter_of(self, tenant: str, model: str) -> tuple[JobRecord, str]:
        """The tenant's job a fine-tuned model or checkpoint name (`ft:...`) names, and that adapter's URI (its
        published adapter, or the kept checkpoint); LookupError (the same for another tenant's job), or saying why
        it is not ready."""
        found = _FINE_TUNED_RE.fullmatch(model)
        if found is None:
            raise not_found(model)
        job_id, step = found.group("job_id"), found.group("step")
        record = self.store.job(job_id)
        if record is None or record.tenant != tenant:
            raise not_found(model)
        expected = fine_tuned_model_name(record) if step is None else checkpoint_model_name(record, int(step))
        if model != expected:
            raise not_found(model)
        if step is None:
            if record.state != JobState.SUCCEEDED or not record.adapter_uri:
                raise LookupError(f"model: {model!r} is not ready: job {job_id} is {record.state.value}; its "
                                  "fine-tuned model can be used once the job succeeded (or name one of its "
                                  "checkpoints, '<model>:ckpt-step-N')")
            if record.model_deleted_at is not None:
                raise LookupError(f"model: {model!r} was deleted (its job's kept checkpoints remain: "
                                  "'<model>:ckpt-step-N')")
            return record, record.adapter_uri
        kept = {checkpoint_step(uri): uri for uri in record.checkpoints}
        if int(step) not in kept:
            steps = ", ".join(str(s) for s in sorted(kept)) or "none"
            raise LookupError(f"model: job {job_id} keeps no checkpoint at step {int(step)} (kept: {steps})")
        return record, kept[int(step)]

    @staticmethod
    def _adapter_target(model: str, record: JobRecord, adapter_uri: str) -> ModelTarget:
        if record.spec.adapter.type == "galore":
            return _whole_model_target(model, record, adapter_uri)
        plan = record.plan
        if plan is None:  # only a job not sized yet has none, and such a job has neither adapter nor checkpoint
            raise LookupError(f"model: {model!r} is not ready: job {record.job_id} has not been sized yet")
        spec = record.spec
        base = ServedBase(compat_key=plan.compat_key, base_snapshot=plan.base_snapshot,
                          quantization=spec.quantization, dtype=spec.dtype, base_name=spec.base_model)
        return ModelTarget(model=model, base=base, job_id=record.job_id, adapter_uri=adapter_uri)

    def submit(self, tenant: str, model: str, *, prompt: Optional[str] = None,
               messages: Optional[Sequence[dict | ChatMessage]] = None, sampling: Sampling = Sampling(),
               timeout: float = DEFAULT_TIMEOUT_SECONDS, stream: bool = False) -> GenerationRequest:
        """Resolve `model`, check the request and queue it for the base's executors; the caller then waits with
        `wait_result` (`stream_events` when `stream`). ValueError names the field at fault; LookupError: no such
        model of the tenant's."""
        if not 0 < timeout <= MAX_TIMEOUT_SECONDS:
            raise ValueError(f"timeout: must be more than 0 and at most {MAX_TIMEOUT_SECONDS:g} seconds")
        _check_input(prompt, messages)
        target = self.resolve_model(tenant, model)
        _check_engine_runs(target)
        now = time.time()
        request = GenerationRequest(
            request_id=new_request_id(), tenant=tenant, target=target, prompt=prompt,
            messages=None if messages is None else tuple(ChatMessage.model_validate(m) for m in messages),
            sampling=sampling, submitted_at=now, deadline=now + timeout, stream=stream)
        queued = self._submit(keys=[keys.generation_queue(target.base.compat_key), keys.GENERATION_BASES],
                              args=[request.model_dump_json(), int(timeout) + 60, target.base.compat_key,
                                    target.base.model_dump_json(), MAX_WAITING_PER_BASE])
        if not queued:
            raise QuotaExceeded(f"too many generation requests are waiting for base {target.base.base_name!r} "
                                f"({MAX_WAITING_PER_BASE}); retry later")
        return request

    def wait_result(self, request: GenerationRequest, timeout: Optional[float] = None) -> GenerationResult:
        """Block until the request is answered, at most until its deadline (or `timeout` seconds)."""
        until = request.deadline if timeout is None else time.time() + timeout
        key = keys.generation_result(request.request_id)
        while (left := until - time.time()) > 0:
            reply = self.r.blpop([key], timeout=_wait_slice(left))
            if reply is not None:
                return GenerationResult.model_validate_json(reply[1])
        raise _no_answer(request, request.deadline - request.submitted_at if timeout is None else timeout)

    def stream_events(self, request: GenerationRequest) -> Iterator[StreamEvent]:
        """The events of a streamed request as they come, until the one with the result. GenerationTimeout when no
        executor took it by its deadline, or when one that did fell silent for as long as the request's timeout (it
        died mid-answer)."""
        cursor = _StreamCursor.of(request)
        while (block_ms := cursor.block_ms()) is not None:
            for event in cursor.events(self.r.xread({cursor.key: cursor.last_id}, block=block_ms)):
                yield event
                if event.result is not None:
                    self.r.delete(cursor.key)
                    return
        raise cursor.timeout()

    # ---- the executor's side ----

    def take_requests(self, compat_key_: str, budget: ServingBudget,
                      server: Optional[str] = None) -> list[GenerationRequest]:
        """The oldest waiting requests for a base, within `budget`; requests past their deadline are dropped.
        `server`: the executor taking them, marked as the base's server (`bases_unserved` leaves the base to it) by the
        same script: an executor does both between every two training steps, in one round trip."""
        taken = self._take(keys=[keys.generation_queue(compat_key_), keys.generation_server(compat_key_)],
                           args=[budget.max_requests, budget.max_tokens, repr(time.time()), server or "",
                                 SERVER_TTL_SECONDS])
        return [GenerationRequest.model_validate_json(raw) for raw in taken]

    def answer(self, result: GenerationResult) -> None:
        key = keys.generation_result(result.request_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.rpush(key, result.model_dump_json())
        pipe.expire(key, RESULT_TTL_SECONDS)
        pipe.execute()

    def publish_text(self, texts: Sequence[StreamedText]) -> None:
        """Append each streamed request's new text of a choice (request, choice index, text, and its tokens'
        log-probs when asked) to its stream (one round trip for a decode step's requests)."""
        pipe = self.r.pipeline(transaction=False)
        for new in (StreamedText(*text) for text in texts):  # a plain (request, index, text) asks no log-probs
            self._append(pipe, new.request, StreamEvent(index=new.index, text=new.text, logprobs=new.logprobs))
        pipe.execute()

    def deliver(self, request: GenerationRequest, result: GenerationResult, unsent: Sequence[str] = (),
                unsent_logprobs: Sequence[Optional[tuple[TokenLogprob, ...]]] = ()) -> None:
        """The request's answer: on its result key (`answer`), or for a streamed request as its stream's last event,
        after the text of each choice not published before (`unsent`, by choice index) and its tokens' log-probs
        not published before (`unsent_logprobs`, by choice index, when asked)."""
        if not request.stream:
            self.answer(result)
            return
        pipe = self.r.pipeline(transaction=False)
        for index, text in enumerate(unsent):
            logprobs = unsent_logprobs[index] if index < len(unsent_logprobs) else None
            if text or logprobs:
                self._append(pipe, request, StreamEvent(index=index, text=text, logprobs=logprobs))
        self._append(pipe, request, StreamEvent(result=result))
        pipe.execute()

    @staticmethod
    def _append(pipe, request: GenerationRequest, event: StreamEvent) -> None:
        key = keys.generation_stream(request.tenant, request.request_id)
        pipe.xadd(key, {"event": event.model_dump_json()})
        pipe.expire(key, STREAM_TTL_SECONDS)

    def claim_base(self, compat_key_: str, executor_id: str) -> bool:
        """Become the server of a base nobody serves (False: another executor was first)."""
        return bool(self.r.set(keys.generation_server(compat_key_), executor_id, ex=SERVER_TTL_SECONDS * 6, nx=True))

    def waiting(self, compat_key_: str) -> int:
        """Requests waiting for the base (some may be past their deadline: they are dropped as they are taken)."""
        return self.r.llen(keys.generation_queue(compat_key_))

    def bases_unserved(self) -> list[tuple[float, ServedBase]]:
        """(since when its oldest request waits, the base) of each base with requests waiting and no executor
        serving it, the longest waiting first."""
        bases = [ServedBase.model_validate_json(raw) for raw in self.r.hgetall(keys.GENERATION_BASES).values()]
        pipe = self.r.pipeline(transaction=False)
        for base in bases:
            pipe.lindex(keys.generation_queue(base.compat_key), 0)
            pipe.exists(keys.generation_server(base.compat_key))
        replies = pipe.execute()
        waiting = []
        for base, head, served in zip(bases, replies[::2], replies[1::2]):
            if head is not None and not served:
                waiting.append((GenerationRequest.model_validate_json(head).submitted_at, base))
            elif head is None:  # nothing waits (a submit adds it again; the script checks, so none is lost)
                self._forget_base(keys=[keys.GENERATION_BASES, keys.generation_queue(base.compat_key)],
                                  args=[base.compat_key])
        return sorted(waiting, key=lambda item: item[0])


class GenerationWaits:
    """The caller's waits of `Generations` (`wait_result`, `stream_events`) on an asyncio Redis client, the same
    server and user as the store's: a gateway request waiting for its answer is a coroutine on the event loop, not
    one of the server's worker threads (a tenant with many requests waiting would hold them all)."""

    def __init__(self, r: redis.asyncio.Redis):
        self.r = r

    async def result(self, request: GenerationRequest) -> GenerationResult:
        """The request's answer, once it came; GenerationTimeout at its deadline."""
        key = keys.generation_result(request.request_id)
        while (left := request.deadline - time.time()) > 0:
            reply = await self.r.blpop([key], timeout=_wait_slice(left))
            if reply is not None:
                return GenerationResult.model_validate_json(reply[1])
        raise _no_answer(request, request.deadline - request.submitted_at)

    async def stream_events(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """As `Generations.stream_events`."""
        cursor = _StreamCursor.of(request)
        while (block_ms := cursor.block_ms()) is not None:
            for event in cursor.events(await self.r.xread({cursor.key: cursor.last_id}, block=block_ms)):
                yield event
                if event.result is not None:
                    await self.r.delete(cursor.key)
                    return
        raise cursor.timeout()


def _wait_slice(left: float) -> float:
    """One blocking read's seconds: reads in slices, as one longer than the client's socket timeout fails."""
    return max(0.01, min(left, WAIT_SLICE_SECONDS))


def _no_answer(request: GenerationRequest, waited: float) -> GenerationTimeout:
    return GenerationTimeout(f"no executor serving base {request.target.base.base_name!r} answered within "
                             f"{waited:g} s")


@dataclass
class _StreamCursor:
    """A reader's place in a request's stream: the last event id read, and until when it waits for the next (the
    request's deadline before the first event; after one, as long again as the request's timeout)."""

    request: GenerationRequest
    key: str
    until: float
    last_id: str = "0-0"

    @classmethod
    def of(cls, request: GenerationRequest) -> "_StreamCursor":
        return cls(request, keys.generation_stream(request.tenant, request.request_id), request.deadline)

    def block_ms(self) -> Optional[int]:
        """The next read's XREAD BLOCK; None once the wait is over."""
        left = self.until - time.time()
        return max(10, int(1000 * _wait_slice(left))) if left > 0 else None

    def events(self, reply) -> list[StreamEvent]:
        """The events of an XREAD's reply (nothing when it timed out), moving past them."""
        entries = reply[0][1] if reply else []
        if entries:
            self.last_id, self.until = entries[-1][0], time.time() + self.silence
        return [StreamEvent.model_validate_json(fields["event"]) for _, fields in entries]

    @property
    def silence(self) -> float:
        return self.request.deadline - self.request.submitted_at

    def timeout(self) -> GenerationTimeout:
        if self.last_id == "0-0":
            return _no_answer(self.request, self.silence)
        return GenerationTimeout(f"the executor answering on base {self.request.target.base.base_name!r} fell "
                                 f"silent for {self.silence:g} s mid-answer")


def queued_by_base(r: redis.Redis) -> dict[str, int]:
    """Requests waiting for an executor, by base as requests named it (`ServedBase.base_name`; the quantizations of
    one base summed): what the leader exports (`lorafleet_generation_queued`) and `lorafleet top` shows. Requests past
    their deadline count until an executor drops them."""
    bases = [ServedBase.model_validate_json(raw) for raw in r.hgetall(keys.GENERATION_BASES).values()]
    pipe = r.pipeline(transaction=False)
    for base in bases:
        pipe.llen(keys.generation_queue(base.compat_key))
    waiting: dict[str, int] = {}
    for base, count in zip(bases, pipe.execute()):
        waiting[base.base_name] = waiting.get(base.base_name, 0) + count
    return waiting


def _whole_model_target(model: str, record: JobRecord, model_uri: str) -> ModelTarget:
    """A GaLore job's model (or checkpoint), which owns all its weights: a base of its own (its own compat key, loaded
    by an executor without jobs like any base nobody serves), of its job's base's family."""
    plan, spec = record.plan, record.spec
    if plan is None:
        raise LookupError(f"model: {model!r} is not ready: job {record.job_id} has not been sized yet")
    base = ServedBase(compat_key=compat_key(model_uri, "none", spec.dtype), base_snapshot=plan.base_snapshot,
                      dtype=spec.dtype, base_name=model, model_uri=model_uri)
    return ModelTarget(model=model, base=base, job_id=record.job_id)


def _check_engine_runs(target: ModelTarget) -> None:
    """Refuse a model on a base the generation engine does not run (ValueError naming the model and the family)."""
    family = _base_family(target.base.base_snapshot)
    if family not in GENERATION_FAMILIES:
        raise ValueError(f"model: {target.model!r} runs on base {target.base.base_name!r}, of family "
                         f"{family or 'unknown'!r}, which the generation engine does not run (it runs "
                         f"{', '.join(GENERATION_FAMILIES)})")


def _base_family(snapshot: str) -> str:
    """The base's config `model_type` ('' when it has no readable one)."""
    try:
        return json.loads((Path(snapshot) / "config.json").read_text()).get("model_type") or ""
    except (OSError, ValueError, AttributeError):
        return ""


def _check_input(prompt: Optional[str], messages: Optional[Sequence]) -> None:
    if (prompt is None) == (messages is None):
        raise ValueError("prompt: give either a prompt or chat messages")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError("prompt: must be a string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
        return
    if not isinstance(messages, (list, tuple)) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise ValueError(f"messages: a list of 1 to {MAX_MESSAGES} messages")
    total = 0
    for index, message in enumerate(messages):
        try:
            parsed = ChatMessage.model_validate(message)
        except Exception as exc:
            raise ValueError(f"messages.{index}: a message is {{'role': 'system' | 'user' | 'assistant', "
                             f"'content': str}} ({_first_error(exc)})") from None
        total += len(parsed.content)
    if total > MAX_PROMPT_CHARS:
        raise ValueError(f"messages: their contents are longer than {MAX_PROMPT_CHARS} characters")


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        first = errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        message = first["msg"].removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)
