"""End to end on the CPU: a real redis-server, a real Celery worker, two scheduler processes (leader + standby) and
executor processes, all started as they are in production. Tenants submit through the Celery task names only.

The fleet gets its own Redis so no other test's jobs reach its scheduler. Each test waits on observable state with a
deadline (never a bare sleep).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_models import alpaca_rows, build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401
from helpers_polling import wait_until
from lorafleet.executor.cohort import Cohort
from lorafleet.scheduler import fleet, keys
from lorafleet.scheduler.client import make_celery
from lorafleet.scheduler.redis_server import RedisServer, free_port, start_redis_server
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.store import JobStore, hash_token

pytestmark = pytest.mark.slow

HEARTBEAT_TTL = 3.0
LOCK_TTL = 2.0


@dataclass
class Fleet:
    root: Path
    env: dict[str, str]
    store: JobStore
    app: object
    models: dict[str, Path]
    redis: RedisServer
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    tenant_apps: dict[str, object] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """`lorafleet <args>` (scheduler or executor) with that role's own Redis user."""
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", *args],
            env={**self.env, "REDIS_URL": self.redis.role_url(args[0])}, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        self.processes[name] = process
        return process

    def start_executor(self, name: str) -> subprocess.Popen:
        # exec-b recomputes every layer in the backward and runs each step as passes of at most 48 tokens: results
        # must not depend on which executor trains a job.
        extra = ("--activation-checkpointing", "1", "--max-pass-tokens", "48") if name == "exec-b" else ()
        process = self.start(name, "executor", "--device", "cpu", "--id", name, "--metrics-port", "0",
                             "--heartbeat-ttl", str(HEARTBEAT_TTL), *extra)
        wait_until(lambda: self.store.r.exists(keys.executor(name)), f"executor {name} to register")
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.root.glob("*.log")))

    def call(self, task: str, token: str, *args) -> object:
        """A call through the queue of the token's tenant, as that tenant's own client makes it."""
        tenant = self.store.r.hget(keys.TOKENS, hash_token(token))
        if tenant not in self.tenant_apps:
            self.tenant_apps[tenant] = make_celery(self.redis.url, name=f"fleet-{tenant}", tenant=tenant)
        return self.tenant_apps[tenant].send_task(task, args=[token, *args]).get(timeout=30)

    def submit(self, token: str, spec: dict) -> str:
        return self.call("lorafleet.submit_job", token, spec)["job_id"]

    def get(self, token: str, job_id: str) -> dict:
        return self.call("lorafleet.get_job", token, job_id)

    def kill_holder_after_a_checkpoint(self, token: str, job_id: str) -> str:
        """SIGKILL (no goodbye, as a crash) the executor running `job_id` once the job has a checkpoint; its id."""
        victim = self.wait_state(token, job_id, ("running",))["executor_id"]
        wait_until(lambda: self.get(token, job_id)["checkpoint_uri"], "a first checkpoint")
        self.processes[victim].send_signal(signal.SIGKILL)
        self.processes[victim].wait(10)
        return victim

    def wait_state(self, token: str, job_id: str, states: tuple[str, ...], timeout: float = 120.0) -> dict:
        try:
            return wait_until(lambda: (job := self.get(token, job_id))["state"] in states and job,
                              f"{job_id} to reach {states}", timeout)
        except AssertionError:
            raise AssertionError(f"{job_id} never reached {states}: {self.get(token, job_id)}\n{self.logs()}")


@pytest.fixture(scope="module")
def fleet_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    redis = start_redis_server(root / "redis")
    models = {family: build_tiny_model(root / "models" / family, family) for family in ("llama", "qwen2")}
    env = dict(os.environ)
    env.update(REDIS_URL=redis.url, LORAFLEET_STATE_DIR=str(root / "state"), LORAFLEET_DATA_ROOT=str(root / "data"),
               LORAFLEET_ARTIFACT_DIR=str(root / "artifacts"), HF_HUB_CACHE=str(root / "hub"),
               LORAFLEET_MODEL_ROOTS=str(root / "models"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    store = JobStore.from_url(redis.url)
    store.ensure_schema()
    app = make_celery(redis.url, name="fleet-test")
    running = Fleet(root, env, store, app, models, redis)
    try:
        celery_log = open(root / "celery.log", "ab")
        running.processes["celery"] = subprocess.Popen(
            [sys.executable, "-P", "-m", "celery", "-A", "lorafleet.scheduler.tasks", "worker", "--pool=solo",
             "--without-gossip", "--without-mingle", "-n", f"fleet-{secrets.token_hex(3)}@%h"],
            env={**env, "REDIS_URL": redis.role_url("worker"), "LORAFLEET_METRICS_PORT": "0"}, stdout=celery_log, stderr=subprocess.STDOUT, cwd=root,
        )
        running.scheduler_ports = [free_port(), free_port()]
        for i, port in enumerate(running.scheduler_ports):
            running.start(f"scheduler-{i}", "scheduler", "--metrics-port", str(port), "--interval", "0.2",
                          "--lock-ttl", str(LOCK_TTL))
        running.start_executor("exec-a")
        running.start_executor("exec-b")
        wait_until(lambda: app.control.ping(timeout=0.5), "the Celery worker")
        yield running
    finally:
        for process in running.processes.values():
            process.terminate()
        for process in running.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        for tenant_app in [app, *running.tenant_apps.values()]:
            tenant_app.close()
        redis.stop()


def make_tenant(fleet_env: Fleet, rows: int = 48) -> tuple[str, str]:
    name = f"t-{secrets.token_hex(3)}"
    _, token = fleet_env.store.create_tenant(name, weight=1.0, max_queued=50, max_running=8)
    area = fleet_env.root / "data" / name
    area.mkdir(parents=True)
    write_jsonl(area / "train.jsonl", alpaca_rows(rows, seed=7))
    fleet_env.call("lorafleet.list_jobs", token)  # answered once the worker consumes the new tenant's queue (<= 1 s)
    return name, token


def spec_for(fleet_env: Fleet, tenant: str, family: str = "llama", **hyperparameters) -> dict:
    hp = {"max_steps": 8, "batch_size": 2, "max_seq_len": 256, "learning_rate": 1e-3, "checkpoint_every": 4,
          "seed": 3}
    hp.update(hyperparameters)
    return {"name": f"{family}-job", "base_model": str(fleet_env.models[family]), "dataset": f"{tenant}/train.jsonl",
            "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "hyperparameters": hp}


def adapter_weights(uri: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(uri) / "adapter_model.safetensors"))


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def metric_value(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + "{", name + " ")))


def test_two_tenants_two_bases_form_cohorts_and_adapters_load_in_peft(fleet_env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    submitted = []
    for tenant, token in [make_tenant(fleet_env) for _ in range(2)]:  # both ready before the first job is sent
        for family in ("llama", "qwen2"):
            spec = spec_for(fleet_env, tenant, family, max_steps=30, checkpoint_every=100)
            spec["validation_dataset"] = f"{tenant}/train.jsonl"
            submitted.append((token, family, fleet_env.submit(token, spec)))
    finished = [(family, fleet_env.wait_state(token, job_id, ("succeeded", "failed"))) for token, family, job_id in
                submitted]
    assert all(job["state"] == "succeeded" for _, job in finished), \
        ([(job["state"], job["error"]) for _, job in finished], fleet_env.logs())
    for family in ("llama", "qwen2"):
        same_base = [job for f, job in finished if f == family]
        assert len({job["executor_id"] for job in same_base}) == 1, "jobs of one base train on one executor"
        first, second = same_base
        assert max(first["started_at"], second["started_at"]) < min(first["finished_at"], second["finished_at"]), \
            "the two jobs of a base trained at the same time, as one cohort"
    for _, job in finished:
        assert job["progress"] == {"step": 30, "total_steps": 30}
        assert job["attempt"] == 1
        assert 0 < job["metrics"]["eval_loss"] < 20, "the final step reports the validation loss"
    for family, job in finished:
        base = AutoModelForCausalLM.from_pretrained(fleet_env.models[family])
        peft_model = PeftModel.from_pretrained(base, job["adapter_uri"])
        lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "a trained adapter has non-zero B"
        exported = Path(job["adapter_uri"])
        assert sorted(f.name for f in exported.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"], \
            "the published adapter holds what PEFT and vLLM load, not the training state"
        config = json.loads((exported / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == job["spec"]["base_model"], "the base as the tenant named it"

    alive = fleet.executors(fleet_env.store.r)[0]
    passes = {e.executor_id: e.max_pass_tokens for e in alive}
    assert passes.get("exec-a") == 8192 and passes.get("exec-b") == 48, "passes of 8192 unless told otherwise"
    executor_metrics = [e.metrics_port for e in alive]
    assert sum(metric_value(scrape(port), "lorafleet_tokens_trained_total") for port in executor_metrics) > 0
    scheduler_text = "".join(scrape(port) for port in fleet_env.scheduler_ports)
    assert "lorafleet_jobs{" in scheduler_text and metric_value(scheduler_text, "lorafleet_scheduler_leader") == 1


def test_a_job_submitted_while_a_cohort_runs_joins_it_and_cancel_stops_it(fleet_env):
    tenant, token = make_tenant(fleet_env)
    long_job = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=3000, checkpoint_every=1000))
    running = fleet_env.wait_state(token, long_job, ("running",))
    wait_until(lambda: fleet_env.get(token, long_job)["progress"]["step"] >= 2, "the long job to train")
    joiner = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=6, seed=5))
    joined = fleet_env.wait_state(token, joiner, ("running", "succeeded"))
    long_now = fleet_env.get(token, long_job)
    assert joined["executor_id"] == running["executor_id"], "the new job joined the running cohort"
    assert long_now["state"] == "running" and long_now["attempt"] == 1
    assert long_now["started_at"] == running["started_at"], "the running cohort was not restarted"
    assert fleet_env.wait_state(token, joiner, ("succeeded",))["state"] == "succeeded"

    executor_id = running["executor_id"]
    cancelled = fleet_env.call("lorafleet.cancel_job", token, long_job)
    assert cancelled["state"] == "cancelled"
    wait_until(lambda: fleet.executors(fleet_env.store.r)[0] and next(
        e for e in fleet.executors(fleet_env.store.r)[0] if e.executor_id == executor_id).jobs == {},
        "the executor to drop the cancelled job", timeout=30)
    final = fleet_env.get(token, long_job)
    assert final["state"] == "cancelled" and final["progress"]["step"] < 3000


def reference_adapter(fleet_env: Fleet, spec: dict, tenant: str) -> dict[str, torch.Tensor]:
    """The same job trained alone, in this process, without interruption."""
    cohort = Cohort(fleet_env.models["llama"])
    cohort.add_job("reference", parse_spec(spec), fleet_env.root / "data" / tenant / "train.jsonl")
    while cohort.active_jobs():
        cohort.step()
    out = cohort.checkpoint("reference", fleet_env.root / f"reference-{tenant}")
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("restart", ["later", "at once"])
def test_killed_executor_jobs_resume_from_checkpoint_with_the_same_final_weights(fleet_env, restart):
    """kill -9 mid-run. 'later': the heartbeat expires and the job moves to the other executor. 'at once': the
    executor comes back under the same id before its heartbeat expires and hands back what it held."""
    tenant, token = make_tenant(fleet_env)
    spec = spec_for(fleet_env, tenant, max_steps=400, checkpoint_every=10)
    job_id = fleet_env.submit(token, spec)
    victim = fleet_env.kill_holder_after_a_checkpoint(token, job_id)
    if restart == "at once":
        fleet_env.start_executor(victim)

    done = fleet_env.wait_state(token, job_id, ("succeeded", "failed"), timeout=180)
    assert done["state"] == "succeeded", done
    assert done["attempt"] == 2
    if restart == "later":
        assert done["executor_id"] != victim
    events = fleet_env.call("lorafleet.job_events", token, job_id, None, 1000)
    assert any(e["type"] == "requeued" for e in events)

    got, want = adapter_weights(done["adapter_uri"]), reference_adapter(fleet_env, spec, tenant)
    assert got.keys() == want.keys()
    for name in want:
        rel = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
    if restart == "later":
        fleet_env.start_executor(victim)  # back to two executors for the tests after this one


def test_a_job_whose_executors_keep_dying_is_failed_and_its_cohort_finishes(fleet_env):
    """Real executors, killed with SIGKILL whenever they hold the 'poison' job (as a job whose data crashes them
    would): after the first loss it runs alone, at the third it is failed; the job that shared its first cohort
    resumes from its checkpoint and succeeds."""
    tenant, token = make_tenant(fleet_env)
    poison = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=100_000, checkpoint_every=10))
    innocent = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=60, checkpoint_every=10))
    together = wait_until(lambda: (a := fleet_env.get(token, poison), b := fleet_env.get(token, innocent))
                          and a["state"] == b["state"] == "running" and (a, b), "both jobs to run")
    assert together[0]["executor_id"] == together[1]["executor_id"], "one cohort"
    for loss in (1, 2, 3):
        holder = fleet_env.wait_state(token, poison, ("running",))["executor_id"]
        fleet_env.processes[holder].send_signal(signal.SIGKILL)
        fleet_env.processes[holder].wait(10)
        fleet_env.start_executor(holder)  # back at once: it hands back what its killed process held
        wait_until(lambda: fleet_env.get(token, poison)["executor_losses"] == loss, f"loss {loss} to be counted")
        if loss == 1:
            placed = wait_until(lambda: (a := fleet_env.get(token, poison), b := fleet_env.get(token, innocent))
                                and a["executor_id"] and b["executor_id"] and (a, b), "both to be placed again")
            assert placed[0]["executor_id"] != placed[1]["executor_id"], "each runs alone after the loss"
    failed = fleet_env.wait_state(token, poison, ("failed",))
    assert "stopped 3 times" in failed["error"]
    done = fleet_env.wait_state(token, innocent, ("succeeded", "failed"), timeout=180)
    assert done["state"] == "succeeded" and done["executor_losses"] == 1, done


def test_standby_scheduler_takes_over_when_the_leader_dies(fleet_env):
    leader_holder = fleet_env.store.r.get(keys.SCHEDULER_LEADER)
    leader = next(name for name, p in fleet_env.processes.items()
                  if name.startswith("scheduler-") and leader_holder.endswith(f"-{p.pid}"))
    fence_before = int(fleet_env.store.r.get(keys.SCHEDULER_FENCE))
    fleet_env.processes[leader].send_signal(signal.SIGKILL)
    fleet_env.processes[leader].wait(10)

    new_holder = wait_until(lambda: (h := fleet_env.store.r.get(keys.SCHEDULER_LEADER)) and h != leader_holder and h,
                            "the standby to take the leader lock", timeout=LOCK_TTL * 5)
    assert int(fleet_env.store.r.get(keys.SCHEDULER_FENCE)) == fence_before + 1
    tenant, token = make_tenant(fleet_env)
    job_id = fleet_env.submit(token, spec_for(fleet_env, tenant))
    done = fleet_env.wait_state(token, job_id, ("succeeded", "failed"))
    assert done["state"] == "succeeded" and done["attempt"] == 1, done
    assert new_holder != leader_holder


@pytest.mark.parametrize("how", ["drain command", "SIGTERM"])
def test_draining_executor_hands_its_jobs_back_and_exits_cleanly(fleet_env, how):
    tenant, token = make_tenant(fleet_env)
    spec = spec_for(fleet_env, tenant, max_steps=300, checkpoint_every=1000)
    job_id = fleet_env.submit(token, spec)
    running = fleet_env.wait_state(token, job_id, ("running",))
    wait_until(lambda: fleet_env.get(token, job_id)["progress"]["step"] >= 3, "the job to train a few steps")
    name = running["executor_id"]
    if how == "SIGTERM":
        fleet_env.processes[name].send_signal(signal.SIGTERM)
    else:
        assert fleet.request_drain(fleet_env.store.r, name)
    assert fleet_env.processes[name].wait(60) == 0

    handed_back = fleet_env.get(token, job_id)
    assert handed_back["state"] in ("queued", "scheduled", "running") and handed_back["checkpoint_uri"], handed_back
    done = fleet_env.wait_state(token, job_id, ("succeeded", "failed"), timeout=180)
    assert done["state"] == "succeeded" and done["attempt"] == 2 and done["executor_id"] != name
    events = fleet_env.call("lorafleet.job_events", token, job_id, None, 1000)
    resumed_from = [e for e in events if e["type"] == "state" and e.get("to") == "queued" and e.get("from") == "running"]
    assert resumed_from, "the drain handed the job back through the queue"
    fleet_env.start_executor(name)


def test_an_executor_paused_past_its_lease_writes_nothing_after_it_wakes(fleet_env):
    """SIGSTOP mid-run until the job has moved to the other executor and succeeded there, then SIGCONT: the woken
    executor's step, progress, checkpoint and result are all refused, and the published adapter stays the other's."""
    tenant, token = make_tenant(fleet_env)
    job_id = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=300, checkpoint_every=5))
    first = fleet_env.wait_state(token, job_id, ("running",))
    paused = first["executor_id"]
    wait_until(lambda: fleet_env.get(token, job_id)["checkpoint_uri"], "a first checkpoint")
    fleet_env.processes[paused].send_signal(signal.SIGSTOP)
    try:
        done = fleet_env.wait_state(token, job_id, ("succeeded", "failed"), timeout=180)
        assert done["state"] == "succeeded" and done["executor_id"] != paused and done["attempt"] == 2, done
        published = {p.name: p.read_bytes() for p in Path(done["adapter_uri"]).iterdir()}
    finally:
        fleet_env.processes[paused].send_signal(signal.SIGCONT)
    wait_until(lambda: paused in [e.executor_id for e in fleet.executors(fleet_env.store.r)[0]],
               "the woken executor to heartbeat again")
    wait_until(lambda: not next(e for e in fleet.executors(fleet_env.store.r)[0] if e.executor_id == paused).jobs,
               "the woken executor to drop the job", timeout=30)
    after = fleet_env.get(token, job_id)
    assert {k: after[k] for k in ("state", "attempt", "adapter_uri", "checkpoint_uri", "checkpoints", "progress",
                                  "metrics")} == {k: done[k] for k in ("state", "attempt", "adapter_uri",
                                                                       "checkpoint_uri", "checkpoints", "progress",
                                                                       "metrics")}
    assert {p.name: p.read_bytes() for p in Path(after["adapter_uri"]).iterdir()} == published
    stale = Path(done["adapter_uri"]).parent.parent / f"attempt-{first['attempt']}"
    assert not list(stale.glob("adapter-*")), "the paused lease published no adapter"
