"""`lorafleet gateway`: the tenants' HTTP API, shaped like OpenAI's fine-tuning API so that the `openai` client works
with `base_url=` pointing here.

The bearer token is the tenant's token (`JobStore.authenticate`); the gateway holds the store's credentials
(REDIS_URL and the rest of `scheduler.config`), tenants never do. Jobs go through the same `admission.submit_job`
as the Celery API. Routes are grouped per resource (`_job_routes`, `files_api.file_routes`, `page.page_routes`,
`_health_routes`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Optional

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lorafleet.gateway import errors
from lorafleet.gateway.errors import ApiError
from lorafleet.gateway.observe import observe_requests
from lorafleet.gateway.jobs import checkpoint_views, event_view, job_view, spec_from_request
from lorafleet.gateway.models import (
    CheckpointList, CreateJobRequest, ErrorResponse, EventList, FineTuningJob, JobList,
)
from lorafleet.gateway.page import page_routes
from lorafleet.scheduler import config
from lorafleet.scheduler.admission import submit_job
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.files import FileLimits, FileStore
from lorafleet.scheduler.logs import configure_logging
from lorafleet.scheduler.records import JobRecord, JobState
from lorafleet.scheduler.results import JobResults
from lorafleet.scheduler.store import MAX_LIST_LIMIT, JobStore, with_metadata

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (400, "invalid request: `error.param` names the field"), (401, "missing or invalid token"),
        (404, "no such object of yours"), (409, "not in a state that allows this"),
    )
}
Limit = Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)]
_METADATA_PARAM = re.compile(r"metadata\[([^\[\]]{1,64})\]")  # OpenAI's list filter: metadata[key]=value


@dataclass
class Gateway:
    """What the routes share: the stores, opened with the gateway's own credentials."""

    store: JobStore
    files: FileStore
    results: JobResults

    def record_for(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job; 404 for an unknown id and for another tenant's, alike."""
        return self.results.record_for(tenant, job_id)

    def result_files(self, record: JobRecord) -> list[str]:
        """A succeeded job's adapter as one file (packed on the first ask, `scheduler.results`); [] before."""
        if record.state != JobState.SUCCEEDED:
            return []
        try:
            return [self.results.adapter_file(record).file_id]
        except LookupError:  # its adapter is no longer stored
            return []

    def checkpoint_file(self, record: JobRecord, uri: str) -> Optional[str]:
        try:
            return self.results.checkpoint_file(record, uri).file_id
        except LookupError:  # rotated out or removed meanwhile
            return None


_bearer = HTTPBearer(auto_error=False, description="your tenant token")


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _tenant(request: Request,
            credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(_bearer)]) -> str:
    """The caller's tenant: the one whose token is the bearer token (401 otherwise)."""
    if credentials is None:
        raise ApiError(401, "missing token: send 'Authorization: Bearer <your tenant token>'", code="invalid_api_key")
    return _refusals(_gateway(request).store.authenticate, credentials.credentials)


def _refusals(fn, *args, **kwargs):
    """`fn(...)`, with the scheduler's refusals answered in OpenAI's shape (`errors.from_exception`)."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, PermissionError, LookupError) as exc:
        raise errors.from_exception(exc) from None


Tenant = Annotated[str, Depends(_tenant)]
State = Annotated[Gateway, Depends(_gateway)]


def _job_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"], responses=ERROR_RESPONSES)

    @router.post("", response_model=FineTuningJob)
    def create_job(body: CreateJobRequest, tenant: Tenant, gateway: State, request: Request) -> FineTuningJob:
        """Validate and queue a job, exactly as the Celery task `lorafleet.submit_job` does."""
        job = _refusals(submit_job, gateway.store, tenant, spec_from_request(body), gateway.files,
                        refused=request.app.state.metrics.refused)
        record = gateway.store.job(job["job_id"])
        return job_view(record, gateway.result_files(record))

    @router.get("", response_model=JobList)
    def list_jobs(tenant: Tenant, gateway: State, request: Request, after: Optional[str] = None,
                  limit: Limit = 20) -> JobList:
        """The tenant's jobs, newest first; `after` = the last id of the previous page; `metadata[k]=v` (any number)
        lists only the jobs whose metadata has every such pair."""
        wanted = metadata_filter(request.query_params)
        keep = with_metadata(wanted) if wanted else None
        try:
            records, has_more = gateway.store.tenant_jobs_after(tenant, after, limit, keep)
        except LookupError as exc:
            raise ApiError(400, str(exc), param="after") from None
        return JobList(data=[job_view(r, gateway.result_files(r)) for r in records], has_more=has_more)

    @router.get("/{job_id}", response_model=FineTuningJob)
    def retrieve_job(job_id: str, tenant: Tenant, gateway: State) -> FineTuningJob:
        record = _refusals(gateway.record_for, tenant, job_id)
        return job_view(record, gateway.result_files(record))

    @router.post("/{job_id}/cancel", response_model=FineTuningJob)
    def cancel_job(job_id: str, tenant: Tenant, gateway: State) -> FineTuningJob:
        """Cancel a job that has not finished (409 for one that succeeded or failed; cancelling twice is fine)."""
        return _change_state(gateway, tenant, job_id, gateway.store.cancel)

    @router.post("/{job_id}/pause", response_model=FineTuningJob)
    def pause_job(job_id: str, tenant: Tenant, gateway: State) -> FineTuningJob:
        """Pause a job: a queued one at once; a running one leaves its cohort after its current step with a
        checkpoint (status stays `running` until then). 409 for a finished job."""
        return _change_state(gateway, tenant, job_id, gateway.store.pause)

    @router.post("/{job_id}/resume", response_model=FineTuningJob)
    def resume_job(job_id: str, tenant: Tenant, gateway: State) -> FineTuningJob:
        """Queue a paused job again; it goes on from its checkpoint as if never paused. 409 if not paused."""
        return _change_state(gateway, tenant, job_id, gateway.store.resume)

    _add_history_routes(router)
    return router


def _add_history_routes(router: APIRouter) -> None:
    """A job's events and checkpoints."""

    @router.get("/{job_id}/events", response_model=EventList)
    def list_events(job_id: str, tenant: Tenant, gateway: State, after: Optional[str] = None,
                    limit: Limit = 20) -> EventList:
        """The job's events, oldest first; `after` = the last id of the previous page."""
        found = _refusals(gateway.store.events_for, tenant, job_id, after, min(limit + 1, MAX_LIST_LIMIT))
        return EventList(data=[event_view(event) for event in found[:limit]], has_more=len(found) > limit)

    @router.get("/{job_id}/checkpoints", response_model=CheckpointList)
    def list_checkpoints(job_id: str, tenant: Tenant, gateway: State, after: Optional[str] = None,
                         limit: Limit = 10) -> CheckpointList:
        """The checkpoints the job keeps, newest first, each downloadable as one file (`file_id`)."""
        record = _refusals(gateway.record_for, tenant, job_id)
        events = gateway.store.events(job_id, None, MAX_LIST_LIMIT)
        views = checkpoint_views(record, events, lambda uri: gateway.checkpoint_file(record, uri))
        ids = [view.id for view in views]
        start = ids.index(after) + 1 if after in ids else 0
        page = views[start:start + limit]
        return CheckpointList(data=page, has_more=start + limit < len(views),
                              first_id=page[0].id if page else None, last_id=page[-1].id if page else None)


def metadata_filter(query: Mapping[str, str]) -> dict[str, str]:
    """OpenAI's `metadata[k]=v` list filter, as {k: v}; 400 for a `metadata` parameter of any other shape (a filter
    silently ignored would list every job)."""
    wanted = {}
    for name, value in query.items():
        if name == "metadata" or name.startswith("metadata["):
            found = _METADATA_PARAM.fullmatch(name)
            if found is None:
                raise ApiError(400, f"{name}: filter by metadata as metadata[key]=value", param="metadata")
            wanted[found.group(1)] = value
    return wanted


def _change_state(gateway: Gateway, tenant: str, job_id: str, verb) -> FineTuningJob:
    """`verb(tenant, job_id)` (a store verb: cancel, pause, resume), its refusals as 404 or 409."""
    _refusals(gateway.record_for, tenant, job_id)
    try:
        verb(tenant, job_id)
    except LookupError as exc:
        raise errors.from_exception(exc) from None
    except ValueError as exc:
        raise ApiError(409, str(exc), code="invalid_state") from None
    record = gateway.store.job(job_id)
    return job_view(record, gateway.result_files(record))


def create_app(store: Optional[JobStore] = None, root_path: str = "") -> FastAPI:
    """The gateway's ASGI app, on `store` (default: the configured REDIS_URL)."""
    app = FastAPI(title="lorafleet gateway", version="1", root_path=root_path, lifespan=_closing_generation_waits,
                  description="OpenAI-compatible fine-tuning API of a lorafleet deployment (see the README's "
                              "compatibility table).")
    if store is None:
        store = JobStore.from_url(config.redis_url())
        store.ensure_schema()
    files = FileStore(store.r, config.dataset_store(), FileLimits.from_env())
    app.state.gateway = Gateway(store, files, JobResults(store, files, ArtifactStore(config.artifact_root())))
    errors.install(app)
    app.include_router(_job_routes())
    from lorafleet.gateway.files_api import file_routes  # here: it takes this module's dependencies (Tenant, State)

    app.include_router(file_routes())
    from lorafleet.gateway.completions import completion_routes  # the same: Tenant

    app.include_router(completion_routes())
    from lorafleet.gateway.models_api import model_routes  # the same: Tenant

    app.include_router(model_routes())
    app.include_router(page_routes())  # the tenants' web page at /ui/
    app.include_router(_health_routes())
    app.state.metrics = observe_requests(app)
    return app


@contextlib.asynccontextmanager
async def _closing_generation_waits(app: FastAPI) -> AsyncIterator[None]:
    """At shutdown, close the generation routes' asyncio Redis clients (the waits' and the slots', if made), in the
    event loop they ran on: left to the garbage collector after the loop is gone, their connections end in
    "Unclosed connection" errors."""
    yield
    for user in ("generation_waits", "generation_slots"):
        found = getattr(app.state, user, None)
        if found is not None:
            await found.r.aclose(close_connection_pool=True)  # its pool was made for it alone (`_async_redis`)


def _health_routes() -> APIRouter:
    """/healthz: the server answers; /readyz: and it reaches the store (503 with the reason otherwise). For probes,
    not tenants: left out of the API schema."""
    router = APIRouter(include_in_schema=False)

    @router.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> str:
        return "ok\n"

    @router.get("/readyz", response_class=PlainTextResponse)
    def readyz(gateway: State) -> PlainTextResponse:
        try:
            gateway.store.r.ping()
        except redis.RedisError as exc:
            return PlainTextResponse(f"Redis unreachable: {exc}\n", status_code=503)
        return PlainTextResponse("ok\n")

    return router


def serve(host: str, port: int, ssl_keyfile: Optional[str] = None, ssl_certfile: Optional[str] = None,
          root_path: str = "") -> None:
    """Run the gateway under uvicorn until stopped (TLS when given a key and certificate)."""
    import uvicorn

    configure_logging("gateway")
    uvicorn.run(create_app(root_path=root_path), host=host, port=port, ssl_keyfile=ssl_keyfile,
                ssl_certfile=ssl_certfile, proxy_headers=True, log_level="info",
                log_config=None)  # its loggers go through ours (configure_logging: text or JSON)
