"""A small typed Python client for the Celery submission API.

The API is the task names; this is only a convenience. Without lorafleet installed, a tenant does the same with
plain Celery, its own broker URL and the two settings `lorafleet tenants create --json` printed (`celery_config`):

    from celery import Celery

    app = Celery(broker=BROKER_URL, backend=BROKER_URL)
    app.conf.update(CELERY_CONFIG)   # the tenant's queue and result prefix
    job = app.send_task("lorafleet.submit_job", args=[TOKEN, spec, REQUEST_ID], expires=30).get(timeout=30)

`expires`: a call still queued when its caller has stopped waiting is dropped by the worker, not run hours later.
`REQUEST_ID` (optional, any string of up to 128 letters, digits, '.', '_', ':' and '-'): retrying a submit with the
same one returns the job the first made, so a timed-out submit can be retried safely.

Errors arrive as the built-in exceptions the tasks raise: ValueError (bad spec, bad argument, quota),
PermissionError (bad token), LookupError (no such job, or not yours).
"""

from __future__ import annotations

from typing import Any, Optional, TypedDict

from celery import Celery

from lorafleet.scheduler import acl

TASK_NAMES = (
    "lorafleet.submit_job",
    "lorafleet.submit_jobs",
    "lorafleet.get_job",
    "lorafleet.list_jobs",
    "lorafleet.cancel_job",
    "lorafleet.pause_job",
    "lorafleet.resume_job",
    "lorafleet.job_events",
    "lorafleet.upload_begin",
    "lorafleet.upload_part",
    "lorafleet.upload_complete",
    "lorafleet.upload_cancel",
    "lorafleet.list_files",
    "lorafleet.get_file",
    "lorafleet.delete_file",
    "lorafleet.read_file",
    "lorafleet.job_result_file",
    "lorafleet.checkpoint_files",
    "lorafleet.generate",
    "lorafleet.list_models",
    "lorafleet.delete_model",
)


class Progress(TypedDict):
    step: int
    total_steps: int


class JobInfo(TypedDict, total=False):
    job_id: str
    tenant: str
    name: str
    state: str
    priority: int
    submitted_at: float
    updated_at: float
    scheduled_at: Optional[float]
    started_at: Optional[float]
    finished_at: Optional[float]
    progress: Progress
    metrics: dict[str, float]
    error: Optional[str]
    adapter_uri: Optional[str]
    checkpoint_uri: Optional[str]
    checkpoints: list[str]  # the checkpoints kept, oldest first
    executor_id: Optional[str]
    attempt: int
    cancel_requested: bool
    executor_losses: int  # executors that died holding it; at 3 the job is failed
    request_id: Optional[str]  # the idempotency key it was submitted with
    spec: dict[str, Any]  # in get_job / submit_job / cancel_job answers, not in list_jobs


class JobEvent(TypedDict, total=False):
    id: str  # stream id; pass the last one seen as `after`
    type: str  # "state" (with "from", "to"), "requeued", "checkpoint", "error", "progress" (step, total_steps, loss, ...)
    ts: float


def make_celery(broker_url: str, backend_url: Optional[str] = None, name: str = "lorafleet",
                tenant: Optional[str] = None) -> Celery:
    """A Celery app that speaks JSON only: pickle would let whoever can reach the broker run code. With `tenant`,
    it sends to that tenant's queue and reads results under its prefix (`acl.tenant_celery_config`)."""
    app = Celery(name, broker=broker_url, backend=backend_url or broker_url)
    if tenant is not None:
        app.conf.update(acl.tenant_celery_config(tenant))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


class LorafleetClient:
    """The tenant is the broker URL's user (`tenant.<name>`); pass `tenant` when the URL is a service's."""

    def __init__(self, broker_url: str, token: str, backend_url: Optional[str] = None, timeout: float = 30.0,
                 tenant: Optional[str] = None):
        tenant = tenant or acl.tenant_of_url(broker_url)
        if tenant is None:
            raise ValueError("which tenant? use the tenant's own broker URL (user 'tenant.<name>') or pass tenant=")
        self.app = make_celery(broker_url, backend_url, name="lorafleet-client", tenant=tenant)
        self.token = token
        self.timeout = timeout

    def _call(self, task: str, *args: Any) -> Any:
        return self.app.send_task(task, args=[self.token, *args], expires=self.timeout).get(timeout=self.timeout)

    def submit(self, spec: dict[str, Any] | str, request_id: Optional[str] = None) -> JobInfo:
        """`request_id`: retrying with the same one returns the first job instead of making a second."""
        return self._call("lorafleet.submit_job", spec, request_id)

    def get(self, job_id: str) -> JobInfo:
        return self._call("lorafleet.get_job", job_id)

    def list(self, state: Optional[str] = None, limit: int = 100,
             metadata: Optional[dict[str, str]] = None) -> list[JobInfo]:
        """Newest first; `metadata`: only the jobs whose metadata has every pair of it."""
        return self._call("lorafleet.list_jobs", state, limit, metadata)

    def cancel(self, job_id: str) -> JobInfo:
        return self._call("lorafleet.cancel_job", job_id)

    def events(self, job_id: str, after: Optional[str] = None, limit: int = 100) -> list[JobEvent]:
        return self._call("lorafleet.job_events", job_id, after, limit)

    def close(self) -> None:
        self.app.close()
