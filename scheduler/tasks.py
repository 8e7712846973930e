"""The Celery submission API. Task names are the public contract; each task takes the tenant's token first.

Serve them with a Celery worker (`lorafleet up` starts one):
    python -P -m celery -A lorafleet.scheduler.tasks worker --pool=solo
with REDIS_URL (broker, result backend and job store) and LORAFLEET_DATA_ROOT set (see `config`).

The worker consumes only the enabled tenants' own queues (`broker.TenantQueues`), checks every message before Celery
parses it (`broker.GuardedTransport`), writes each result under that tenant's prefix (`broker.TenantResultBackend`),
and refuses a token that is not the queue's tenant's: a stolen token is useless without that tenant's broker user.

The worker serves /metrics (`lorafleet_api_requests_total`, `lorafleet_api_request_duration_seconds` by task and
outcome), /healthz and /readyz on LORAFLEET_METRICS_ADDR:LORAFLEET_METRICS_PORT (default 0.0.0.0:9463; 0: any free
port); run it with `--pool=solo` or `--pool=threads` (a prefork pool's children would each count alone).

Only built-in exception types leave a task, because a tenant without lorafleet installed must be able to catch
them after Celery's JSON transport: ValueError (invalid spec naming the field, bad argument, quota exceeded),
PermissionError (missing, invalid or disabled token), LookupError (unknown job or another tenant's job: the same
answer for both, so job ids of other tenants cannot be probed).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

import redis
from celery import signals

from lorafleet.scheduler import admission, config, keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.broker import TenantQueues
from lorafleet.scheduler.catalogue import ModelCatalogue
from lorafleet.scheduler.client import make_celery
from lorafleet.scheduler.files import MAX_PART_BYTES, FileError, FileLimits, FileStore
from lorafleet.scheduler.generation import Generations, GenerationTimeout, parse_call
from lorafleet.scheduler.logs import formatter
from lorafleet.scheduler.metrics import WORKER_PORT, Health, ServeError, api_metrics, serve
from lorafleet.scheduler.results import JobResults
from lorafleet.scheduler.store import JobStore

app = make_celery(config.redis_url())
app.conf.update(
    broker_transport="lorafleet.scheduler.broker:GuardedTransport",
    result_backend="lorafleet.scheduler.broker:TenantResultBackend+" + config.redis_url(),
    task_default_queue=keys.WORKER_QUEUE,  # never written: tenants' queues are added as tenants appear
    worker_prefetch_multiplier=1,
    # The worker's "succeeded" log line shows this much of the answer: Celery renders it for every task, logged or
    # not, and rendering a whole job (its default, 1,024 characters) cost 0.3-0.45 ms a call (docs/BENCHMARKS-history.md S1).
    task_annotations={"*": {"resultrepr_maxsize": 80}},
)
app.steps["consumer"].add(TenantQueues)

# Answers to a tenant's mistake: logged by the worker as one line, not as a crash with a traceback.
TENANT_ERRORS = (ValueError, PermissionError, LookupError)
MAX_BATCH = 100  # specs in one `lorafleet.submit_jobs` call, which must also fit the broker's message cap (2 MiB)

_store: Optional[JobStore] = None
_file_store: Optional[FileStore] = None
_job_results: Optional[JobResults] = None
_generations: Optional[Generations] = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_url(config.redis_url())
        _store.ensure_schema()
    return _store


def file_store() -> FileStore:
    global _file_store
    if _file_store is None:
        _file_store = FileStore(store().r, config.dataset_store(), FileLimits.from_env())
    return _file_store


def job_results() -> JobResults:
    global _job_results
    if _job_results is None:
        _job_results = JobResults(store(), file_store(), ArtifactStore(config.artifact_root()))
    return _job_results


def generations() -> Generations:
    global _generations
    if _generations is None:
        _generations = Generations(store(), config.hf_hub_cache(), config.model_roots())
    return _generations


def _caller(task: Any, token: Any) -> str:
    """The tenant making this call: the token's, which must be the tenant whose queue the message came from."""
    queue = (task.request.delivery_info or {}).get("routing_key") or ""
    tenant = store().authenticate(token)
    if keys.tenant_of_queue(queue) != tenant:
        raise PermissionError("invalid token for this broker user")
    return tenant


API = api_metrics("worker", "celery")


def _public_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise our ValueError/PermissionError/LookupError subclasses as the built-in type, message kept; count and
    time the call by task and outcome (`API`)."""

    @functools.wraps(fn)
    def wrapper(task: Any, *args: Any, **kwargs: Any) -> Any:
        started, outcome = time.perf_counter(), "error"
        try:
            answer = fn(task, *args, **kwargs)
            outcome = "ok"
            return answer
        except TENANT_ERRORS as exc:
            outcome = "refused"
            raise _public(exc) from None
        finally:
            API.observe(task.name, outcome, time.perf_counter() - started)

    return wrapper


def _public(exc: Exception) -> Exception:
    """The built-in type of a tenant error (a tenant has no lorafleet classes to unpickle), message kept."""
    if isinstance(exc, PermissionError):
        return PermissionError(str(exc))
    if isinstance(exc, LookupError):
        return LookupError(exc.args[0] if exc.args else str(exc))
    return ValueError(str(exc))


@app.task(name="lorafleet.submit_job", throws=TENANT_ERRORS, bind=True)
@_public_errors
def submit_job(self, token: str, spec: Any, request_id: Optional[str] = None) -> dict:
    return _submit(_caller(self, token), spec, request_id)


@app.task(name="lorafleet.submit_jobs", throws=TENANT_ERRORS, bind=True)
@_public_errors
def submit_jobs(self, token: str, specs: Any, request_ids: Any = None) -> list:
    """Up to MAX_BATCH submissions in one call (a sweep), each accepted or refused on its own: in order, the job as
    `submit_job` returns it, or `{"error": {"type": "ValueError" | "PermissionError" | "LookupError", "message"}}`."""
    tenant = _caller(self, token)
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_BATCH:
        raise ValueError(f"specs: a list of 1 to {MAX_BATCH} job specs")
    if request_ids is not None and not (isinstance(request_ids, list) and len(request_ids) == len(specs)):
        raise ValueError("request_ids: a list as long as specs (null for a spec without one), or null")
    results = []
    for spec, request_id in zip(specs, request_ids or [None] * len(specs)):
        try:
            results.append(_submit(tenant, spec, request_id))
        except TENANT_ERRORS as exc:
            kind = next(t for t in TENANT_ERRORS if isinstance(exc, t))
            results.append({"error": {"type": kind.__name__, "message": str(exc)}})
    return results


def _submit(tenant: str, spec: Any, request_id: Optional[str]) -> dict:
    return admission.submit_job(store(), tenant, spec, file_store(), request_id, refused=API.refused)


@app.task(name="lorafleet.get_job", throws=TENANT_ERRORS, bind=True)
@_public_errors
def get_job(self, token: str, job_id: str) -> dict:
    tenant = _caller(self, token)
    return store().get_job_for(tenant, job_id)


@app.task(name="lorafleet.list_jobs", throws=TENANT_ERRORS, bind=True)
@_public_errors
def list_jobs(self, token: str, state: Optional[str] = None, limit: int = 100, metadata: Any = None) -> list:
    """The tenant's jobs, newest first; `metadata` {key: value}: only those whose metadata has every pair."""
    tenant = _caller(self, token)
    return store().list_jobs(tenant, state, limit, metadata)


@app.task(name="lorafleet.cancel_job", throws=TENANT_ERRORS, bind=True)
@_public_errors
def cancel_job(self, token: str, job_id: str) -> dict:
    tenant = _caller(self, token)
    return store().cancel(tenant, job_id)


@app.task(name="lorafleet.pause_job", throws=TENANT_ERRORS, bind=True)
@_public_errors
def pause_job(self, token: str, job_id: str) -> dict:
    tenant = _caller(self, token)
    return store().pause(tenant, job_id)


@app.task(name="lorafleet.resume_job", throws=TENANT_ERRORS, bind=True)
@_public_errors
def resume_job(self, token: str, job_id: str) -> dict:
    tenant = _caller(self, token)
    return store().resume(tenant, job_id)


@app.task(name="lorafleet.job_events", throws=TENANT_ERRORS, bind=True)
@_public_errors
def job_events(self, token: str, job_id: str, after: Optional[str] = None, limit: int = 100) -> list:
    tenant = _caller(self, token)
    return store().events_for(tenant, job_id, after, limit)


# ---- files (`files.FileStore`): a dataset uploaded in parts, then named as `dataset: "file-..."` in a spec ----

@app.task(name="lorafleet.upload_begin", throws=TENANT_ERRORS, bind=True)
@_public_errors
def upload_begin(self, token: str, filename: str, purpose: str, size: int) -> dict:
    """Open an upload of `size` bytes; send them with upload_part, at most `part_bytes` a part."""
    tenant = _caller(self, token)
    return {"upload_id": file_store().begin_upload(tenant, filename, purpose, size), "part_bytes": MAX_PART_BYTES}


@app.task(name="lorafleet.upload_part", throws=TENANT_ERRORS, bind=True)
@_public_errors
def upload_part(self, token: str, upload_id: str, data: str, offset: Optional[int] = None) -> dict:
    """`data`: base64 of the next part. With `offset`, a part that does not start there is refused (safe retries)."""
    tenant = _caller(self, token)
    return {"received": file_store().add_part(tenant, upload_id, _base64_part(data), offset)}


@app.task(name="lorafleet.upload_complete", throws=TENANT_ERRORS, bind=True)
@_public_errors
def upload_complete(self, token: str, upload_id: str) -> dict:
    tenant = _caller(self, token)
    return file_store().complete_upload(tenant, upload_id).to_json()


@app.task(name="lorafleet.upload_cancel", throws=TENANT_ERRORS, bind=True)
@_public_errors
def upload_cancel(self, token: str, upload_id: str) -> None:
    tenant = _caller(self, token)
    file_store().cancel_upload(tenant, upload_id)


@app.task(name="lorafleet.list_files", throws=TENANT_ERRORS, bind=True)
@_public_errors
def list_files(self, token: str, after: Optional[str] = None, limit: int = 100, purpose: Optional[str] = None
               ) -> list:
    tenant = _caller(self, token)
    return [record.to_json() for record in file_store().list(tenant, after, limit, purpose)]


@app.task(name="lorafleet.get_file", throws=TENANT_ERRORS, bind=True)
@_public_errors
def get_file(self, token: str, file_id: str) -> dict:
    tenant = _caller(self, token)
    return file_store().get(tenant, file_id).to_json()


@app.task(name="lorafleet.delete_file", throws=TENANT_ERRORS, bind=True)
@_public_errors
def delete_file(self, token: str, file_id: str) -> dict:
    tenant = _caller(self, token)
    return file_store().delete(tenant, file_id).to_json()


@app.task(name="lorafleet.read_file", throws=TENANT_ERRORS, bind=True)
@_public_errors
def read_file(self, token: str, file_id: str, offset: int = 0, length: int = MAX_PART_BYTES) -> str:
    """base64 of at most `length` bytes of the file from `offset`; "" past its end."""
    tenant = _caller(self, token)
    return base64.b64encode(file_store().read_chunk(tenant, file_id, offset, length)).decode("ascii")


# ---- results (`results.JobResults`): a job's adapter and checkpoints as files, read with read_file ----

@app.task(name="lorafleet.job_result_file", throws=TENANT_ERRORS, bind=True)
@_public_errors
def job_result_file(self, token: str, job_id: str) -> dict:
    """The succeeded job's PEFT adapter, packed as one tar file (on the first ask); ValueError before it succeeded."""
    tenant = _caller(self, token)
    results = job_results()
    return results.adapter_file(results.record_for(tenant, job_id)).to_json()


@app.task(name="lorafleet.checkpoint_files", throws=TENANT_ERRORS, bind=True)
@_public_errors
def checkpoint_files(self, token: str, job_id: str) -> list:
    """The job's kept checkpoints, newest first: `[{"step", "file"}]`, each packed as one tar file."""
    tenant = _caller(self, token)
    results = job_results()
    return [checkpoint.to_json() for checkpoint in results.checkpoint_files(results.record_for(tenant, job_id))]


# ---- models (`catalogue.ModelCatalogue`): the tenant's fine-tuned models and the bases, as `GET /v1/models` ----

@app.task(name="lorafleet.list_models", throws=TENANT_ERRORS, bind=True)
@_public_errors
def list_models(self, token: str) -> list:
    """`[{"id", "created", "owned_by"}]`: the tenant's fine-tuned models, newest first, then the bases."""
    tenant = _caller(self, token)
    return [dataclasses.asdict(entry) for entry in ModelCatalogue(generations()).models(tenant)]


@app.task(name="lorafleet.delete_model", throws=TENANT_ERRORS, bind=True)
@_public_errors
def delete_model(self, token: str, model: str) -> dict:
    """Delete one of the tenant's fine-tuned models (`results.JobResults.delete_model`): `{"id", "deleted": true}`;
    LookupError as `generate` for a name that is not the tenant's, ValueError for a checkpoint or a base."""
    tenant = _caller(self, token)
    job_results().delete_model(tenant, ModelCatalogue(generations()).job_to_delete(tenant, model))
    return {"id": model, "deleted": True}


# ---- generation (`generation.Generations`): a completion by one of the tenant's models, answered by an executor ----

@app.task(name="lorafleet.generate", throws=TENANT_ERRORS + (TimeoutError,), bind=True)
@_public_errors
def generate(self, token: str, request: Any) -> dict:
    """`request`: {"model", "prompt" or "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
    "logprobs" (0-20 likeliest per token), "timeout"}; returns {"id", "model", "text", "finish_reason", "choices",
    "usage"} (`GenerationResult.view`). Waits (on Redis, no CPU) for the executor serving the model's base:
    TimeoutError when none answered in `timeout` seconds."""
    tenant = _caller(self, token)
    call = parse_call(request)
    pending = generations().submit(tenant, call.model, prompt=call.prompt, messages=call.messages,
                                   sampling=call.sampling(), timeout=call.timeout)
    try:
        result = generations().wait_result(pending)
    except GenerationTimeout as exc:
        raise TimeoutError(str(exc)) from None  # the built-in type: a tenant has no lorafleet classes
    if result.error is not None:
        raise ValueError(f"model {call.model!r}: {result.error}")
    return result.view(call.model)


def _base64_part(data: Any) -> bytes:
    if not isinstance(data, str) or len(data) > (MAX_PART_BYTES + 2) // 3 * 4:
        raise FileError(f"base64 of 1 to {MAX_PART_BYTES} bytes", param="data")
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise FileError("not base64", param="data") from None


# ---- the worker process: its metrics and health listener, its log format ----

HEALTH = Health(float("inf"))  # live while the process runs; ready while Redis answers (`_watch_redis`)


@signals.worker_init.connect
def _serve_metrics(**_: Any) -> None:
    """Before the worker consumes: every task exported from 0, then the listener; a taken port ends the worker
    with one line naming it."""
    for name in sorted(name for name in app.tasks if name.startswith("lorafleet.")):
        API.declare(name)
    addr = os.environ.get("LORAFLEET_METRICS_ADDR", "0.0.0.0")
    try:
        port = serve(API.registry, int(os.environ.get("LORAFLEET_METRICS_PORT", WORKER_PORT)), addr, HEALTH)
    except ServeError as exc:
        raise SystemExit(f"lorafleet worker: {exc} (LORAFLEET_METRICS_PORT)") from None
    logging.getLogger("lorafleet.worker").info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", addr, port)
    threading.Thread(target=_watch_redis, name="redis-health", daemon=True).start()


def _watch_redis(every_seconds: float = 5.0) -> None:
    while True:
        try:
            store().r.ping()
            HEALTH.tick()
        except redis.RedisError as exc:
            HEALTH.tick(f"Redis unreachable: {exc}")
        time.sleep(every_seconds)


@signals.after_setup_logger.connect
def _log_format(logger: logging.Logger, **_: Any) -> None:
    """LORAFLEET_LOG_FORMAT=json: the worker's lines as JSON too (Celery sets up its own handlers)."""
    for handler in logger.handlers:
        handler.setFormatter(formatter("worker"))
