"""The Celery submission API. Task names are the public contract; each task takes the tenant's token first.

Serve them with a Celery worker (`lorafleet up` starts one):
    python -P -m celery -A lorafleet.scheduler.tasks worker --pool=solo
with REDIS_URL (broker, result backend and job store) and LORAFLEET_DATA_ROOT set (see `config`).

Only built-in exception types leave a task, because a tenant without lorafleet installed must be able to catch
them after Celery's JSON transport: ValueError (invalid spec naming the field, bad argument, quota exceeded),
PermissionError (missing, invalid or disabled token), LookupError (unknown job or another tenant's job: the same
answer for both, so job ids of other tenants cannot be probed).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from lorafleet.scheduler import config
from lorafleet.scheduler.client import make_celery
from lorafleet.scheduler.store import JobStore
from lorafleet.scheduler.submission import validate_submission

app = make_celery(config.redis_url())

# Answers to a tenant's mistake: logged by the worker as one line, not as a crash with a traceback.
TENANT_ERRORS = (ValueError, PermissionError, LookupError)

_store: Optional[JobStore] = None


def store() -> JobStore:
    global _store
    if _store is None:
        _store = JobStore.from_url(config.redis_url())
        _store.ensure_schema()
    return _store


def _public_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Re-raise our ValueError/PermissionError/LookupError subclasses as the built-in type, message kept."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PermissionError as exc:
            raise PermissionError(str(exc)) from None
        except LookupError as exc:
            raise LookupError(exc.args[0] if exc.args else str(exc)) from None
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    return wrapper


@app.task(name="lorafleet.submit_job", throws=TENANT_ERRORS)
@_public_errors
def submit_job(token: str, spec: Any) -> dict:
    tenant = store().authenticate(token)
    job_spec = validate_submission(spec, tenant, config.data_root(), config.hf_hub_cache(), config.model_roots())
    return store().submit(tenant, job_spec)


@app.task(name="lorafleet.get_job", throws=TENANT_ERRORS)
@_public_errors
def get_job(token: str, job_id: str) -> dict:
    tenant = store().authenticate(token)
    return store().get_job_for(tenant, job_id)


@app.task(name="lorafleet.list_jobs", throws=TENANT_ERRORS)
@_public_errors
def list_jobs(token: str, state: Optional[str] = None, limit: int = 100) -> list:
    tenant = store().authenticate(token)
    return store().list_jobs(tenant, state, limit)


@app.task(name="lorafleet.cancel_job", throws=TENANT_ERRORS)
@_public_errors
def cancel_job(token: str, job_id: str) -> dict:
    tenant = store().authenticate(token)
    return store().cancel(tenant, job_id)


@app.task(name="lorafleet.job_events", throws=TENANT_ERRORS)
@_public_errors
def job_events(token: str, job_id: str, after: Optional[str] = None, limit: int = 100) -> list:
    tenant = store().authenticate(token)
    return store().events_for(tenant, job_id, after, limit)
