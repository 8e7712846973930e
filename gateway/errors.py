"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises its own
exception classes (BadRequestError with `.param`, AuthenticationError, NotFoundError, ...).

Every refusal the scheduler package raises is mapped here, once: SpecError and other ValueErrors are 400s naming the
field in `param` (the spec's messages start with the field; a FileError names it in `.param`), PermissionError 401,
LookupError 404 (an unknown id and another tenant's id get the same answer), the store's QuotaExceeded 429, a file
over the size cap (FileTooLarge) 413. A 4xx that is not worth retrying says so in `x-should-retry: false`, which the
`openai` client honours.
"""

from __future__ import annotations

import re
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.scheduler.files import FileError, FileTooLarge
from lorafleet.scheduler.store import QuotaExceeded

# The internal spec's field paths and the names a tenant used in its request (`jobs.spec_from_request`).
SPEC_FIELD_TO_PARAM = {
    "base_model": "model",
    "base_model_revision": "model",
    "dataset": "training_file",
    "validation_dataset": "validation_file",
    "name": "suffix",
    "metadata": "metadata",
    "hyperparameters.epochs": "hyperparameters.n_epochs",
    "hyperparameters.batch_size": "hyperparameters.batch_size",
    "hyperparameters.learning_rate": "hyperparameters.learning_rate_multiplier",
    "hyperparameters.seed": "seed",
    "hyperparameters.max_seq_len": "lorafleet.max_seq_len",
    "hyperparameters.max_steps": "lorafleet.max_steps",
    "hyperparameters.checkpoint_every": "lorafleet.checkpoint_every",
    "hyperparameters.beta": "method.dpo.hyperparameters.beta",
    "hyperparameters.simpo_gamma": "lorafleet.simpo_gamma",
    "method": "method.type",
    "adapter.type": "lorafleet.adapter_type",
    "adapter.r": "lorafleet.r",
    "adapter.lora_alpha": "lorafleet.lora_alpha",
    "adapter.lora_dropout": "lorafleet.lora_dropout",
    "adapter.target_modules": "lorafleet.target_modules",
    "adapter.target_parameters": "lorafleet.target_parameters",
    "adapter.use_rslora": "lorafleet.use_rslora",
    "adapter.loraplus_lr_ratio": "lorafleet.loraplus_lr_ratio",
    "adapter.use_dora": "lorafleet.use_dora",
    "adapter.lopa": "lorafleet.lopa",
    "adapter.galore": "lorafleet.galore",
    "adapter": "lorafleet.adapter_type",  # the adapter as a whole: its type and the options given do not fit together
    "quantization": "lorafleet.quantization",
    "priority": "lorafleet.priority",
    "dtype": "lorafleet.dtype",
    "eval_samples": "lorafleet.eval_samples",
    "eval_max_tokens": "lorafleet.eval_max_tokens",
}
_SPEC_PREFIX = "invalid job spec: "
_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*):")


class ApiError(Exception):
    """An answer other than 2xx, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", retry: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.retry = (
            status, message, param, code, type, retry)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {} if self.retry else {"x-should-retry": "false"}
        if self.status == 401:
            headers["www-authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def param_of(message: str) -> Optional[str]:
    """The request field a scheduler refusal names ("invalid job spec: hyperparameters.batch_size: ..."), in the
    tenant's own terms; None when it names none."""
    text = message.removeprefix(_SPEC_PREFIX)
    found = _FIELD_RE.match(text)
    if not found:
        return None
    field = found.group(1)
    for internal, param in SPEC_FIELD_TO_PARAM.items():
        if field == internal or field.startswith(internal + "."):
            return param
    return field


def from_exception(exc: Exception) -> ApiError:
    """The answer to a refusal raised by the scheduler package (a bug is not one of these: it stays a 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PermissionError):
        return ApiError(401, str(exc), code="invalid_api_key")
    if isinstance(exc, LookupError):
        return ApiError(404, exc.args[0] if exc.args else "not found", code="not_found")
    if isinstance(exc, QuotaExceeded):
        return ApiError(429, str(exc), code="quota_exceeded", type="insufficient_quota")
    if isinstance(exc, FileTooLarge):
        return ApiError(413, str(exc), param=exc.param, code="file_too_large")
    if isinstance(exc, FileError):
        return ApiError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, ValueError):
        return ApiError(400, str(exc), param=param_of(str(exc)), code="invalid_value")
    raise TypeError(f"not a refusal: {exc!r}")


def _validation_param(loc: tuple) -> Optional[str]:
    parts = [str(part) for part in loc[1:] if not isinstance(part, int)] if loc else []  # drop "body"/"query"
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    """Answer every refusal, malformed request, unknown route and wrong method in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return ApiError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()
