"""The gateway's own /metrics: every request counted and timed by its route template (`GET /v1/files/{file_id}`, not
the id) and outcome (`metrics.ApiMetrics`), plus the process's build and process metrics. Served on the gateway's
port, next to /healthz and /readyz; left out of the API schema."""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lorafleet.scheduler.metrics import ApiMetrics, api_metrics

UNMATCHED = "unmatched"  # a request no route matched (404s of unknown paths): one series, not one per path
PROBES = ("/metrics", "/healthz", "/readyz")  # Prometheus and the orchestrator, not the tenants' API: not counted


def route_name(method: str, route) -> str:
    return f"{method} {route.path}"


def outcome(status: int) -> str:
    return "ok" if status < 400 else "refused" if status < 500 else "error"


def observe_requests(app: FastAPI) -> ApiMetrics:
    """Count and time every request of `app`; call after its routes are included (they are exported from 0)."""
    metrics = api_metrics("gateway", "http")
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path not in PROBES:
            for method in sorted(route.methods):
                metrics.declare(route_name(method, route))

    @app.middleware("http")
    async def measure(request: Request, call_next) -> Response:
        if request.url.path in PROBES:
            return await call_next(request)
        started, status = time.perf_counter(), 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")  # set by the router once a route matched
            task = route_name(request.method, route) if route is not None else UNMATCHED
            metrics.observe(task, outcome(status), time.perf_counter() - started)

    router = APIRouter(include_in_schema=False)

    @router.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return metrics
