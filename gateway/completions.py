"""`POST /v1/completions` and `POST /v1/chat/completions`: OpenAI's text generation shapes on the service's generation
queue (`scheduler.generation`), answered by the executor that has the model's base loaded (`executor/serving.py`).

`model` is one of the tenant's fine-tuned models (a succeeded job's `fine_tuned_model`), a kept checkpoint
(`<fine_tuned_model>:ckpt-step-N`) or a base a job could name. One choice (`n` 1), no streaming, no log-probs: each
is refused naming the field. A route waits for its answer in one of the server's worker threads (on Redis, no CPU),
at most `lorafleet.timeout` seconds (default `generation.DEFAULT_TIMEOUT_SECONDS`): 504 naming the base after that.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.gateway.app import ERROR_RESPONSES, Tenant
from lorafleet.gateway.errors import ApiError, from_exception
from lorafleet.gateway.models import ErrorResponse
from lorafleet.scheduler import config
from lorafleet.scheduler.generation import (
    DEFAULT_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS, GenerationRequest, GenerationResult, Generations,
    GenerationTimeout, parse_sampling,
)

CHAT_DEFAULT_MAX_TOKENS = 256  # OpenAI's chat has no default cap; here a chat answer stops at this unless asked
COMPLETION_RESPONSES = {**ERROR_RESPONSES, 504: {
    "model": ErrorResponse, "description": "no executor serving the model's base answered in time"}}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class LorafleetGenerationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(DEFAULT_TIMEOUT_SECONDS, gt=0, le=MAX_TIMEOUT_SECONDS,
                           description="seconds to wait for an executor's answer")


class _GenerationBody(BaseModel):
    """The fields both routes take; any other field OpenAI defines (logprobs, echo, penalties, tools, ...) is
    refused naming it (`_refuse_unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = 1
    stream: Optional[bool] = False
    user: Optional[str] = Field(None, description="accepted and ignored")
    lorafleet: Optional[LorafleetGenerationOptions] = None


class CompletionRequest(_GenerationBody):
    prompt: Any = Field(..., description="a string (lists of prompts or of token ids are not supported)")
    max_tokens: Optional[int] = 16


class ChatCompletionRequest(_GenerationBody):
    messages: list[dict[str, Any]]
    max_tokens: Optional[int] = Field(None, description="deprecated by OpenAI: max_completion_tokens")
    max_completion_tokens: Optional[int] = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


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


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageView
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def _generations(request: Request) -> Generations:
    """One per gateway, on its store (made on first use)."""
    state = request.app.state
    if getattr(state, "generations", None) is None:
        state.generations = Generations(state.gateway.store, config.hf_hub_cache(), config.model_roots())
    return state.generations


def _refuse_unsupported(body: _GenerationBody) -> None:
    for field, value in (body.model_extra or {}).items():
        if value is not None:
            raise ApiError(400, f"{field}: not supported by this server", param=field, code="unsupported_parameter")
    if body.n not in (None, 1):
        raise ApiError(400, "n: only one choice per request (n=1) is supported", param="n",
                       code="unsupported_parameter")
    if body.stream:
        raise ApiError(400, "stream: streaming is not supported; send stream=false (the default)", param="stream",
                       code="unsupported_parameter")


def _sampling(body: _GenerationBody, max_tokens: int):
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    options = {"max_tokens": max_tokens, "temperature": 1.0 if body.temperature is None else body.temperature,
               "top_p": 1.0 if body.top_p is None else body.top_p, "seed": body.seed, "stop": stop}
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


def _complete(request: Request, tenant: str, body: _GenerationBody, max_tokens: int,
              **given: Any) -> tuple[GenerationRequest, GenerationResult]:
    """Queue the request and wait for its answer; every refusal in OpenAI's shape."""
    _refuse_unsupported(body)
    sampling = _sampling(body, max_tokens)
    generations = _generations(request)
    timeout = (body.lorafleet or LorafleetGenerationOptions()).timeout
    try:
        pending = generations.submit(tenant, body.model, sampling=sampling, timeout=timeout, **given)
    except LookupError as exc:
        raise ApiError(404, str(exc).removeprefix("model: "), param="model", code="model_not_found") from None
    except ValueError as exc:
        raise from_exception(exc) from None
    try:
        result = generations.wait_result(pending)
    except GenerationTimeout as exc:
        raise ApiError(504, str(exc), code="timeout", type="timeout_error") from None
    if result.error is not None:
        raise ApiError(400, result.error, code="invalid_request")
    return pending, result


def completion_routes() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["completions"], responses=COMPLETION_RESPONSES)

    @router.post("/completions", response_model=Completion)
    def create_completion(body: CompletionRequest, tenant: Tenant, request: Request) -> Completion:
        """Complete `prompt` with `model` (a fine-tuned model of yours, one of its checkpoints, or a base)."""
        if not isinstance(body.prompt, str):
            raise ApiError(400, "prompt: only a single string prompt is supported", param="prompt",
                           code="invalid_value")
        pending, result = _complete(request, tenant, body, 16 if body.max_tokens is None else body.max_tokens,
                                    prompt=body.prompt)
        return Completion(id="cmpl-" + pending.request_id.removeprefix("gen-"), created=int(pending.submitted_at),
                          model=body.model, usage=Usage(**result.usage()),
                          choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)])

    @router.post("/chat/completions", response_model=ChatCompletion)
    def create_chat_completion(body: ChatCompletionRequest, tenant: Tenant, request: Request) -> ChatCompletion:
        """Answer the conversation in `messages` with `model`, rendered by the base's chat template."""
        max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_DEFAULT_MAX_TOKENS
        pending, result = _complete(request, tenant, body, max_tokens, messages=_chat_messages(body.messages))
        return ChatCompletion(id="chatcmpl-" + pending.request_id.removeprefix("gen-"),
                              created=int(pending.submitted_at), model=body.model, usage=Usage(**result.usage()),
                              choices=[ChatChoice(message=ChatMessageView(content=result.text),
                                                  finish_reason=result.finish_reason)])

    return router
