"""A whole lorafleet stack scraped by a real Prometheus (Debian's `prometheus` package), for tests of what the
dashboards and alerts show: a Valkey of its own, the Celery submission worker, two schedulers, two CPU executors and
the gateway, each on a known metrics port, and Prometheus scraping them every second with the shipped alert rules.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers_models import alpaca_rows, build_tiny_model, write_jsonl
from helpers_polling import wait_until
from lorafleet.scheduler import keys
from lorafleet.scheduler.client import make_celery
from lorafleet.scheduler.redis_server import RedisServer, free_port, start_redis_server
from lorafleet.scheduler.store import JobStore, hash_token

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
HEARTBEAT_TTL, LOCK_TTL = 3.0, 2.0
JOBS = {"scheduler": "lorafleet-scheduler", "worker": "lorafleet-worker", "executor": "lorafleet-executor",
        "gateway": "lorafleet-gateway"}  # the scrape job names the dashboards and alerts use (deploy/prometheus.yml)


def prometheus_binaries() -> tuple[str, str]:
    """prometheus and promtool; a skip outside CI where they are missing, a failure in CI (.ci/run installs them)."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if not all(found):
        if os.environ.get("CI"):
            pytest.fail("prometheus/promtool missing in CI: .ci/run installs Debian's prometheus package")
        pytest.skip("needs Debian's prometheus package (prometheus and promtool)")
    return found


@dataclass
class Stack:
    root: Path
    env: dict[str, str]
    redis: RedisServer
    store: JobStore
    model: Path
    ports: dict[str, int] = field(default_factory=dict)  # process name -> metrics port
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    tenant_apps: dict[str, object] = field(default_factory=dict)
    prometheus_port: int = 0

    # ---- processes ----

    def start(self, name: str, command: list[str], role: str, env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            command, env={**self.env, "REDIS_URL": self.redis.role_url(role), **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT, cwd=self.root)

    def lorafleet(self, name: str, *args: str) -> None:
        """Start `lorafleet <args>` as `name`; a restart keeps the name's port, as a service manager would."""
        port = self.ports.setdefault(name, free_port())
        flag = ["--port", str(port)] if args[0] == "gateway" else ["--metrics-port", str(port)]
        self.start(name, [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", *args, *flag], args[0])

    def start_executor(self, name: str) -> None:
        self.lorafleet(name, "executor", "--device", "cpu", "--id", name, "--heartbeat-ttl", str(HEARTBEAT_TTL))

    def kill(self, name: str) -> None:
        """SIGKILL: no goodbye, as a crash or a lost host."""
        self.processes[name].send_signal(signal.SIGKILL)
        self.processes[name].wait(30)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def scrape(self, name: str) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/metrics", timeout=10).read().decode()

    # ---- tenants and jobs, through the public Celery tasks ----

    def call(self, task: str, token: str, *args) -> object:
        tenant = self.store.r.hget(keys.TOKENS, hash_token(token))
        if tenant not in self.tenant_apps:
            self.tenant_apps[tenant] = make_celery(self.redis.url, name=f"prom-{tenant}", tenant=tenant)
        return self.tenant_apps[tenant].send_task(task, args=[token, *args]).get(timeout=30)

    def make_tenant(self, name: str, rows: list[dict] | None = None) -> str:
        _, token = self.store.create_tenant(name, weight=1.0, max_queued=50, max_running=4)
        (self.root / "data" / name).mkdir(parents=True, exist_ok=True)
        write_jsonl(self.root / "data" / name / "train.jsonl", rows or alpaca_rows(48, seed=7))
        wait_until(lambda: self._answers(token), f"the worker to consume {name}'s queue", 30)
        return token

    def _answers(self, token: str) -> bool:
        try:
            self.call("lorafleet.list_jobs", token)
            return True
        except Exception:
            return False

    def submit(self, token: str, tenant: str, **hyperparameters) -> str:
        hp = {"max_steps": 8, "batch_size": 2, "max_seq_len": 256, "learning_rate": 1e-3, "checkpoint_every": 50,
              "seed": 3, **hyperparameters}
        spec = {"name": "prom-job", "base_model": str(self.model), "dataset": f"{tenant}/train.jsonl",
                "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "hyperparameters": hp}
        return self.call("lorafleet.submit_job", token, spec)["job_id"]

    # ---- Prometheus ----

    def scrape_config(self) -> dict:
        targets: dict[str, list[str]] = {}
        for name, port in self.ports.items():
            kind = next(kind for kind in JOBS if name.startswith(kind))
            targets.setdefault(JOBS[kind], []).append(f"127.0.0.1:{port}")
        return {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": sorted(hosts)}]}
                               for job, hosts in sorted(targets.items())],
        }

    def start_prometheus(self, prometheus: str) -> Path:
        config = self.root / "prometheus.yml"
        config.write_text(json.dumps(self.scrape_config(), indent=2))  # JSON is YAML
        self.prometheus_port = free_port()
        self.start("prometheus", [prometheus, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'tsdb'}",
                                  f"--web.listen-address=127.0.0.1:{self.prometheus_port}"], "operator")
        return config

    def query(self, expr: str) -> dict[tuple, float]:
        """An instant query: labels (sorted pairs) -> value, for a vector or a scalar result."""
        url = (f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        answer = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert answer["status"] == "success", (expr, answer)
        data = answer["data"]
        if data["resultType"] == "scalar":
            return {(): float(data["result"][1])}
        return {tuple(sorted(item["metric"].items())): float(item["value"][1]) for item in data["result"]}

    def value(self, expr: str, default: float | None = None) -> float | None:
        """The one value of a query whose result has at most one series (None/default when empty)."""
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return next(iter(result.values()), default)

    def targets_up(self) -> dict[str, float]:
        return {dict(labels)["instance"]: value for labels, value in self.query("up").items()}


def start_stack(root: Path) -> Stack:
    prometheus, _ = prometheus_binaries()
    redis = start_redis_server(root / "redis")
    model = build_tiny_model(root / "models" / "llama", "llama")
    env = dict(os.environ)
    env.update(LORAFLEET_STATE_DIR=str(root / "state"), LORAFLEET_DATA_ROOT=str(root / "data"),
               LORAFLEET_ARTIFACT_DIR=str(root / "artifacts"), HF_HUB_CACHE=str(root / "hub"),
               LORAFLEET_MODEL_ROOTS=str(root / "models"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               LORAFLEET_METRICS_ADDR="127.0.0.1")
    store = JobStore.from_url(redis.url)
    store.ensure_schema()
    stack = Stack(root, env, redis, store, model)
    stack.ports["worker"] = free_port()
    stack.start("worker", [sys.executable, "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker",
                           "--pool=solo", "--without-gossip", "--without-mingle", "-n",
                           f"prom-{secrets.token_hex(3)}@%h"],
                "worker", {"LORAFLEET_METRICS_PORT": str(stack.ports["worker"])})
    for i in range(2):
        stack.lorafleet(f"scheduler-{i}", "scheduler", "--metrics-addr", "127.0.0.1", "--interval", "0.2",
                        "--lock-ttl", str(LOCK_TTL))
    for name in ("executor-a", "executor-b"):
        stack.start_executor(name)
    stack.lorafleet("gateway", "gateway")
    for name, port in stack.ports.items():
        wait_until(lambda: _healthy(port), f"{name}'s /healthz", 60, stack.logs)
    stack.start_prometheus(prometheus)
    wait_until(lambda: _ready(stack.prometheus_port), "Prometheus to start", 60, stack.logs)
    wait_until(lambda: len(stack.targets_up()) == len(stack.ports) and all(stack.targets_up().values()),
               "Prometheus to scrape every process", 60, lambda: f"{stack.targets_up()}\n{stack.logs()}")
    return stack


def stop_stack(stack: Stack) -> None:
    for process in stack.processes.values():
        process.terminate()
    for process in stack.processes.values():
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
    for app in stack.tenant_apps.values():
        app.close()
    stack.redis.stop()


def _healthy(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
    except OSError:
        return False


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200
    except OSError:
        return False


def wait_for(stack: Stack, what: str, predicate, timeout: float = 60.0):
    """`wait_until`, showing the stack's logs when it times out."""
    return wait_until(predicate, what, timeout, stack.logs, interval=0.5)
