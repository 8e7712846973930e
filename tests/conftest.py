"""Shared fixtures: a real redis-server on a free port, a real Celery worker subprocess, tenant data areas.

Tests never flush Redis (the worker's Celery keys live there too); each test makes tenants with fresh names.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# MKL's CPU GEMMs may round differently with the alignment of their buffers, so a process's results depended on what it
# had allocated before (seen on an AVX2 host: a GaLore job resumed by an executor that had trained a LoRA job was 3e-6
# off the uninterrupted run after 5 steps, 2e-4 after 60 through the SVD). Strict reproducibility mode holds the
# tests' comparisons across processes; set before torch's first GEMM, inherited by every process the tests start.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402

from helpers_models import build_tiny_model  # noqa: E402
from lorafleet.scheduler.client import make_celery  # noqa: E402
from lorafleet.scheduler.redis_server import start_redis_server  # noqa: E402
from lorafleet.scheduler import keys  # noqa: E402
from lorafleet.scheduler.store import JobStore, hash_token  # noqa: E402

SAMPLE_ROWS = [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Count to two.", "output": "1 2"}]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def store(redis_url) -> JobStore:
    job_store = JobStore.from_url(redis_url)
    job_store.ensure_schema()
    return job_store


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data-root")
    (root / "shared").mkdir()
    return root


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random model with its tokenizer (submission reads datasets with it)."""
    return build_tiny_model(tmp_path_factory.mktemp("base-model") / "tiny", "llama")


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory, base_model_dir) -> Path:
    """A local HF cache holding one model id, `test-org/tiny-model`, at one snapshot (the tiny model)."""
    cache = tmp_path_factory.mktemp("hf-hub")
    shutil.copytree(base_model_dir, cache / "models--test-org--tiny-model" / "snapshots" / "0123abcd")
    (cache / "models--test-org--tiny-model" / "refs").mkdir()
    (cache / "models--test-org--tiny-model" / "refs" / "main").write_text("0123abcd")
    return cache


@pytest.fixture(scope="session")
def worker_env(redis_url, data_root, hf_cache, base_model_dir, tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=redis_url,
        LORAFLEET_DATA_ROOT=str(data_root),
        LORAFLEET_STATE_DIR=str(tmp_path_factory.mktemp("state")),
        HF_HUB_CACHE=str(hf_cache),
        LORAFLEET_MODEL_ROOTS=str(base_model_dir.parent.parent),  # the session temp dir: the demo model is there too
    )
    return env


@pytest.fixture(scope="session")
def celery_app(redis_server, redis_url, worker_env, tmp_path_factory):
    """A real `celery worker --pool=solo` subprocess serving lorafleet's tasks, with the worker role's own Redis user;
    yields an operator's client Celery app (for remote control; tenants' calls go through `call`)."""
    log_path = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker", "--pool=solo",
             "--loglevel=INFO", "--without-gossip", "--without-mingle", "-n", f"test-{secrets.token_hex(3)}@%h"],
            env={**worker_env, "REDIS_URL": redis_server.role_url("worker"), "LORAFLEET_METRICS_PORT": "0"}, stdout=log, stderr=subprocess.STDOUT,
            cwd=tmp_path_factory.mktemp("worker-cwd"),
        )
    app = make_celery(redis_url, name="test-client")
    app.worker_log = log_path
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"celery worker did not start:\n{log_path.read_text()[-3000:]}")
        yield app
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        app.close()


@pytest.fixture(scope="session")
def tenant_app(redis_url, celery_app):
    """tenant_app(name) -> an operator's Celery app that sends to that tenant's queue and reads its results."""
    apps = {}

    def app_for(tenant: str):
        if tenant not in apps:
            apps[tenant] = make_celery(redis_url, name=f"test-{tenant}", tenant=tenant)
        return apps[tenant]

    yield app_for
    for app in apps.values():
        app.close()


@pytest.fixture(scope="session")
def probe_tenant(redis_url) -> str:
    """A tenant whose queue carries the calls made with a token that names no tenant."""
    name = f"probe-{secrets.token_hex(4)}"
    JobStore.from_url(redis_url).create_tenant(name)
    return name


@pytest.fixture
def call(celery_app, store, tenant_app, probe_tenant):
    """call("lorafleet.get_job", token, job_id) -> the task's result, raising the task's exception. It goes through
    the queue of the token's tenant (the probe tenant's for a bad token), as that tenant's own client would."""

    def run(task: str, *args):
        token = args[0] if args else None
        tenant = store.r.hget(keys.TOKENS, hash_token(token)) if isinstance(token, str) else None
        return tenant_app(tenant or probe_tenant).send_task(task, args=list(args)).get(timeout=30)

    return run


@dataclass
class Tenant:
    name: str
    token: str
    area: Path  # data_root/<name>
    dataset: str  # a small alpaca JSONL inside the area, as a path relative to the data root


@pytest.fixture
def make_tenant(store, data_root):
    def make(prefix: str = "t", **quotas) -> Tenant:
        name = f"{prefix}-{secrets.token_hex(4)}"
        _, token = store.create_tenant(name, **quotas)
        area = data_root / name
        area.mkdir()
        (area / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in SAMPLE_ROWS))
        return Tenant(name, token, area, f"{name}/train.jsonl")

    return make
