"""The install paths as a new machine sees them: the torch-free control plane from `deploy/lock/base.txt` in a venv of
its own, and a tenant's venv with only `celery[redis]` (`deploy/lock/tenant.txt`), talking through a real
redis-server. Nothing of the test's own environment leaks into either venv."""

from __future__ import annotations

import json
from importlib import metadata
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_models import alpaca_rows, build_tiny_model, write_jsonl
from helpers_polling import wait_until
from lorafleet.scheduler import fleet
from lorafleet.scheduler.records import ExecutorHeartbeat
from lorafleet.scheduler.redis_server import start_redis_server
from lorafleet.scheduler.store import JobStore

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "deploy" / "lock"

pytestmark = pytest.mark.slow

TENANT_SCRIPT = """
import json, sys
from celery import Celery
credentials, spec = json.loads(sys.argv[1]), json.loads(sys.argv[2])
url, token = credentials["broker_url"], credentials["token"]
app = Celery(broker=url, backend=url)
app.conf.update(credentials["celery_config"])
job = app.send_task("lorafleet.submit_job", args=[token, spec]).get(timeout=60)
seen = app.send_task("lorafleet.get_job", args=[token, job["job_id"]]).get(timeout=60)
print(json.dumps({"submitted": job, "seen": seen}))
"""


def make_venv(path: Path, *pip_args: str) -> Path:
    """A new venv at `path` with `pip install *pip_args`; returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pip_args],
                   check=True, capture_output=True, text=True)
    return python


def importable(python: Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    return subprocess.run([str(python), "-P", "-c", probe], cwd="/").returncode == 0


@pytest.fixture(scope="module")
def venvs(tmp_path_factory):
    root = tmp_path_factory.mktemp("venvs")
    base = make_venv(root / "base", "-r", str(LOCKS / "base.txt"))
    subprocess.run([str(base), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", str(REPO)],
                   check=True, capture_output=True, text=True, cwd=root)
    tenant = make_venv(root / "tenant", "-r", str(LOCKS / "tenant.txt"))
    return base, tenant


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


def test_the_torch_free_control_plane_serves_a_tenant_that_has_only_celery(venvs, tmp_path):
    base, tenant = venvs  # the tenant's venv has Celery and nothing of ours; it holds only its own credentials
    assert not importable(base, "torch") and importable(base, "lorafleet.scheduler")
    assert importable(tenant, "celery") and not importable(tenant, "lorafleet") and not importable(tenant, "pydantic")

    server = start_redis_server(tmp_path / "redis")  # a Redis of its own: the suite's worker must not answer here
    model = build_tiny_model(tmp_path / "models" / "tiny", "llama")
    name = f"install-{secrets.token_hex(3)}"
    (tmp_path / "data" / name).mkdir(parents=True)
    write_jsonl(tmp_path / "data" / name / "train.jsonl", alpaca_rows(4))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "REDIS_URL": server.url,
           "LORAFLEET_STATE_DIR": str(tmp_path / "state"), "LORAFLEET_DATA_ROOT": str(tmp_path / "data"),
           "LORAFLEET_MODEL_ROOTS": str(tmp_path / "models")}
    bin_dir = base.parent
    logs = [tmp_path / "worker.log", tmp_path / "scheduler.log"]
    processes = [
        start([str(base), "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker", "--pool=solo",
               "--without-gossip", "--without-mingle", "-n", "install@%h"],
              {**env, "REDIS_URL": server.role_url("worker"), "LORAFLEET_METRICS_PORT": "0"}, logs[0]),
        start([str(bin_dir / "lorafleet"), "scheduler", "--metrics-port", "0", "--interval", "0.2"],
              {**env, "REDIS_URL": server.role_url("scheduler")}, logs[1]),
    ]
    try:
        created = subprocess.run([str(bin_dir / "lorafleet"), "tenants", "create", name, "--json"], env=env,
                                 capture_output=True, text=True, check=True)
        assert json.loads(created.stdout)["broker_url"].startswith("redis://tenant.")
        store = JobStore.from_url(server.url)
        fleet.heartbeat(store.r, ExecutorHeartbeat("exec-install", total_bytes=64 * 2**30, auto_dtype="bfloat16"))

        spec = {"base_model": str(model), "dataset": f"{name}/train.jsonl",
                "hyperparameters": {"max_steps": 2, "batch_size": 1, "max_seq_len": 512}}
        answer = subprocess.run([str(tenant), "-P", "-c", TENANT_SCRIPT, created.stdout, json.dumps(spec)],
                                env=env, capture_output=True, text=True, timeout=120)
        assert answer.returncode == 0, answer.stderr + "".join(p.read_text()[-2000:] for p in logs)
        reply = json.loads(answer.stdout)
        job_id = reply["submitted"]["job_id"]
        assert reply["submitted"]["state"] == "queued" and reply["seen"]["tenant"] == name

        # The scheduler from the base venv plans it onto the (heartbeat-only) executor.
        assigned = wait_until(lambda: store.get_job(job_id)["state"] == "scheduled" and store.get_job(job_id),
                              "the scheduler to assign the job", timeout=60,
                              details=lambda: "\n".join(p.read_text()[-2000:] for p in logs))
        assert assigned["executor_id"] == "exec-install"
        version = subprocess.run([str(bin_dir / "lorafleet"), "--version"], capture_output=True, text=True, check=True)
        assert version.stdout.strip() == f"lorafleet {metadata.version('lorafleet')}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        server.stop()
