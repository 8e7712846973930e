"""Fine-tuning jobs between OpenAI's shapes and lorafleet's: a create request becomes the raw spec the Celery API
takes (`spec_from_request`, validated by the same `accept_submission`), and a job record becomes OpenAI's job,
event and checkpoint objects (`job_view`, `event_view`, `checkpoint_views`)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from lorafleet.gateway.errors import ApiError
from lorafleet.gateway.models import (
    Checkpoint, CreateJobRequest, Dpo, DpoHyperparameters, DpoRequest, FineTuningJob, Hyperparameters,
    HyperparametersRequest, JobError, JobEvent, Method, MethodRequest, Supervised, SupervisedRequest,
)
from lorafleet.scheduler import eval_samples
from lorafleet.scheduler.auto import AUTO, base_learning_rate
from lorafleet.scheduler.generation import checkpoint_model_name, fine_tuned_model_name
from lorafleet.scheduler.records import JobRecord, JobState
from lorafleet.scheduler.spec import PREFERENCE_METHODS
from lorafleet.scheduler.results import checkpoint_step, result_kind

# Internal states as OpenAI names them: a scheduled job is still waiting for its executor to start it.
STATUS = {
    JobState.QUEUED: "queued", JobState.SCHEDULED: "queued", JobState.RUNNING: "running",
    JobState.SUCCEEDED: "succeeded", JobState.FAILED: "failed", JobState.CANCELLED: "cancelled",
    JobState.PAUSED: "paused",
}
_LORAFLEET_TO_SPEC = {  # LorafleetOptions field -> (spec section or None for top level, spec field)
    "adapter_type": ("adapter", "type"), "r": ("adapter", "r"), "lora_alpha": ("adapter", "lora_alpha"),
    "lora_dropout": ("adapter", "lora_dropout"), "target_modules": ("adapter", "target_modules"),
    "target_parameters": ("adapter", "target_parameters"), "lopa": ("adapter", "lopa"),
    "use_rslora": ("adapter", "use_rslora"), "loraplus_lr_ratio": ("adapter", "loraplus_lr_ratio"),
    "use_dora": ("adapter", "use_dora"), "galore": ("adapter", "galore"),
    "quantization": (None, "quantization"), "dtype": (None, "dtype"), "priority": (None, "priority"),
    "max_seq_len": ("hyperparameters", "max_seq_len"), "max_steps": ("hyperparameters", "max_steps"),
    "checkpoint_every": ("hyperparameters", "checkpoint_every"), "simpo_gamma": ("hyperparameters", "simpo_gamma"),
    "eval_samples": (None, "eval_samples"), "eval_max_tokens": (None, "eval_max_tokens"),
}
# Preference methods OpenAI's API has no type for: asked for as lorafleet.method beside method.type "dpo", shown so
EXTENSION_METHODS = tuple(method for method in PREFERENCE_METHODS if method != "dpo")


def _hyperparameters_of(request: CreateJobRequest) -> HyperparametersRequest:
    method = request.method
    if method is not None and request.hyperparameters is not None:
        raise ApiError(400, f"hyperparameters: give them in method.{method.type}.hyperparameters only (the top-level "
                       "field is OpenAI's deprecated form)", param="hyperparameters")
    if method is None:
        return request.hyperparameters or HyperparametersRequest()
    other = "dpo" if method.type == "supervised" else "supervised"
    if getattr(method, other) is not None:
        raise ApiError(400, f"method.{other}: settings for {other} in a {method.type} job (method.type is "
                       f"{method.type!r})", param=f"method.{other}")
    if method.type == "dpo":
        return (method.dpo or DpoRequest()).hyperparameters
    return (method.supervised or SupervisedRequest()).hyperparameters


def spec_from_request(request: CreateJobRequest) -> dict[str, Any]:
    """The raw job spec (as a Celery tenant would write it) for an OpenAI create request; "auto" values are kept
    for submission to choose (`scheduler.auto`)."""
    raw: dict[str, Any] = {"base_model": request.model, "dataset": request.training_file, "adapter": {},
                           "hyperparameters": {}}
    for field, value in (("validation_dataset", request.validation_file), ("name", request.suffix),
                         ("metadata", request.metadata)):
        if value is not None:
            raw[field] = value
    options = request.lorafleet.model_dump(exclude_none=True) if request.lorafleet else {}
    method = _method_of(request.method, options.pop("method", None))
    for option, value in options.items():
        section, field = _LORAFLEET_TO_SPEC[option]
        (raw[section] if section else raw)[field] = value
    hp = _hyperparameters_of(request)
    raw["hyperparameters"].update(epochs=hp.n_epochs, batch_size=hp.batch_size)
    if hp.learning_rate_multiplier == AUTO:
        raw["hyperparameters"]["learning_rate"] = AUTO
    else:
        adapter_type = raw["adapter"].get("type", "lora")
        raw["hyperparameters"]["learning_rate"] = hp.learning_rate_multiplier * _learning_rate_base(adapter_type)
    if request.seed is not None:
        raw["hyperparameters"]["seed"] = request.seed
    if method != "sft":
        raw["method"] = method
        if hp.beta != AUTO:
            raw["hyperparameters"]["beta"] = hp.beta
    return raw


def _method_of(method: Optional[MethodRequest], extension: Optional[str]) -> str:
    """The spec's method: OpenAI's type (supervised: sft, dpo), or lorafleet.method, a preference loss trained on
    the pairs that method.type "dpo" names."""
    openai_method = "dpo" if method is not None and method.type == "dpo" else "sft"
    if extension is None:
        return openai_method
    if extension not in EXTENSION_METHODS:
        raise ApiError(400, f"lorafleet.method: {extension!r} is not one of {', '.join(map(repr, EXTENSION_METHODS))} "
                       "(supervised and dpo are OpenAI's method.type)", param="lorafleet.method")
    if openai_method != "dpo":
        raise ApiError(400, f"lorafleet.method: {extension!r} trains on preference pairs: give it with method.type "
                       "'dpo'", param="lorafleet.method")
    return extension


def _learning_rate_base(adapter_type: str) -> float:
    try:
        return base_learning_rate(adapter_type)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="lorafleet.adapter_type") from None


def _estimated_finish(record: JobRecord) -> Optional[int]:
    """When a running job ends at the pace of its steps so far."""
    if record.state != JobState.RUNNING or not record.started_at or not record.updated_at or record.step < 1:
        return None
    elapsed = max(0.0, record.updated_at - record.started_at)
    return int(record.started_at + elapsed * max(record.total_steps, record.step) / record.step)


def chosen_hyperparameters(record: JobRecord) -> Hyperparameters:
    hp = record.spec.hyperparameters
    return Hyperparameters(n_epochs=hp.epochs, batch_size=hp.batch_size,
                           learning_rate_multiplier=round(hp.learning_rate / base_learning_rate(
                               record.spec.adapter.type), 9))


def _trained_tokens(record: JobRecord) -> Optional[int]:
    """Target tokens trained on so far, across resumes (the executor's count, kept in its checkpoints)."""
    tokens = record.metrics.get("trained_tokens")
    return int(tokens) if isinstance(tokens, (int, float)) else None


def job_view(record: JobRecord, result_files: list[str]) -> FineTuningJob:
    spec = record.spec
    hyperparameters = chosen_hyperparameters(record)
    error = None
    if record.state == JobState.FAILED:
        error = JobError(code="job_failed", message=record.error or "the job failed", param=None)
    return FineTuningJob(
        id=record.job_id, created_at=int(record.submitted_at or 0),
        finished_at=int(record.finished_at) if record.finished_at else None, model=spec.base_model,
        fine_tuned_model=fine_tuned_model_name(record) if record.state == JobState.SUCCEEDED else None,
        organization_id=record.tenant, status=STATUS[record.state], training_file=spec.dataset,
        validation_file=spec.validation_dataset, hyperparameters=hyperparameters,
        method=_method_view(record, hyperparameters), result_files=result_files,
        estimated_finish=_estimated_finish(record), error=error, seed=spec.hyperparameters.seed,
        trained_tokens=_trained_tokens(record),
        metadata=dict(spec.metadata) or None, suffix=spec.name,
        lorafleet={"state": record.state.value, "step": record.step, "total_steps": record.total_steps,
                   "metrics": dict(record.metrics), "priority": spec.priority,
                   "adapter": spec.adapter.model_dump(), "result": result_kind(spec.adapter.type),
                   "quantization": spec.quantization,
                   "max_seq_len": spec.hyperparameters.max_seq_len, "max_steps": spec.hyperparameters.max_steps,
                   "eval_samples": list(spec.eval_samples), "eval_max_tokens": spec.eval_max_tokens,
                   **_method_extension_view(record)},
    )


def _method_view(record: JobRecord, hyperparameters: Hyperparameters) -> Method:
    """OpenAI's view: every preference method shows as dpo (its beta included); `lorafleet.method` says which."""
    if record.spec.method in PREFERENCE_METHODS:
        beta = record.spec.hyperparameters.beta
        dpo_hyperparameters = DpoHyperparameters(**hyperparameters.model_dump(), beta=beta)
        return Method(type="dpo", dpo=Dpo(hyperparameters=dpo_hyperparameters))
    return Method(supervised=Supervised(hyperparameters=hyperparameters))


def _method_extension_view(record: JobRecord) -> dict[str, Any]:
    """The spec's method, and SimPO's gamma for a SimPO job, in the job's `lorafleet` object."""
    if record.spec.method == "simpo":
        return {"method": "simpo", "simpo_gamma": record.spec.hyperparameters.simpo_gamma}
    return {"method": record.spec.method}


def _event_message(event: dict[str, Any]) -> str:
    kind = event["type"]
    if kind == "state":
        to = event.get("to")
        if to == JobState.SCHEDULED:
            return "Job assigned to an executor"
        status = STATUS.get(JobState(to), to) if to in JobState._value2member_map_ else to
        return f"Job {status}" + (f": {event['error']}" if event.get("error") else "")
    if kind == "progress":
        loss = event.get("loss")
        return f"Step {event.get('step')}/{event.get('total_steps')}" + (
            f": training loss={loss:.4f}" if isinstance(loss, (int, float)) and math.isfinite(loss) else "")
    if kind == "checkpoint":
        return f"Checkpoint saved at step {event.get('step')}"
    if kind == "requeued":
        return f"Job back in the queue: {event.get('reason')}"
    if kind == "error":
        return str(event.get("message"))
    if kind == "model_deleted":
        return "Fine-tuned model deleted"
    if kind == "pause_requested":
        return "Pause requested: the job pauses after its current step, with a checkpoint"
    if kind == eval_samples.EVENT:
        return eval_samples.describe(event)
    return kind


def event_view(event: dict[str, Any]) -> JobEvent:
    """One stored event as OpenAI's event object; server paths and executor ids are left out of its data."""
    private = {"id", "type", "ts", "executor_id"}
    data = {key: value for key, value in event.items() if key not in private and not key.endswith("_uri")}
    warning = event["type"] == "requeued" or (event["type"] == eval_samples.EVENT and event.get("error"))
    level = "error" if event["type"] == "error" or (event["type"] == "state" and event.get("to") == "failed") else (
        "warn" if warning else "info")
    return JobEvent(id=event["id"], created_at=int(event["ts"]), level=level, message=_event_message(event),
                    type="metrics" if event["type"] == "progress" else "message", data={"kind": event["type"], **data})


def _checkpoint_metrics(progress: dict[str, Any], step: int) -> dict[str, float]:
    """A progress event's numbers under OpenAI's checkpoint metric names (`train_loss`, `valid_loss`) and ours."""
    numbers = {key: float(value) for key, value in progress.items()
               if key not in ("id", "type", "ts") and isinstance(value, (int, float))}
    for ours, theirs in (("loss", "train_loss"), ("eval_loss", "valid_loss")):
        if ours in numbers:
            numbers[theirs] = numbers[ours]
    return {**numbers, "step": float(step)}


def checkpoint_views(record: JobRecord, events: list[dict[str, Any]],
                     file_of: Callable[[str], Optional[str]]) -> list[Checkpoint]:
    """The job's kept checkpoints, newest first (as OpenAI lists them), each with the metrics of the last progress
    event at or before its step and `file_of(uri)`: a downloadable file id."""
    saved_at = {event.get("checkpoint_uri"): event["ts"] for event in events if event["type"] == "checkpoint"}
    progress = [event for event in events if event["type"] == "progress"]
    views = []
    for uri in reversed(record.checkpoints):
        step = checkpoint_step(uri)
        before = [event for event in progress if event.get("step", 0) <= step]
        metrics = _checkpoint_metrics(before[-1] if before else {}, step)
        views.append(Checkpoint(
            id=f"ftckpt-{record.job_id.removeprefix('job-')}-{step}", created_at=int(saved_at.get(uri, 0)),
            fine_tuned_model_checkpoint=checkpoint_model_name(record, step),
            fine_tuning_job_id=record.job_id, step_number=step, metrics=metrics, file_id=file_of(uri)))
    return views
