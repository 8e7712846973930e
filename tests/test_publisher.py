"""Checkpoints and finished adapters are published off the training loop (executor/publisher.py).

A real Redis, a real tiny model, in-process executors, and an artifact store behind a real fsspec filesystem whose
copies of a job's result wait at a gate the test opens (tests/helpers_gatedfs.py): the cohort must go on stepping
while a result is copied, the job must not be reported succeeded before its adapter is stored, a storage failure
fails that job alone, and an executor killed (SIGKILL) while publishing leaves a job that resumes from its last
checkpoint.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers_gatedfs import GatedFileSystem, reset
from helpers_models import alpaca_rows, build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401
from lorafleet.executor.worker import Executor
from lorafleet.scheduler import keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.records import JobState
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.submission import plan_for

TESTS = Path(__file__).parent


@pytest.fixture
def world(store, make_tenant, tmp_path, monkeypatch):
    reset()
    tenant = make_tenant()
    write_jsonl(tenant.area / "rows.jsonl", alpaca_rows(16))
    monkeypatch.setenv("LORAFLEET_DATA_ROOT", str(tenant.area.parent))
    model = build_tiny_model(tmp_path / "models" / "tiny", "llama")
    yield tenant, model, ArtifactStore(f"gatedfile://{tmp_path / 'artifacts'}")
    GatedFileSystem.gate.set()  # no publisher thread is left waiting


def submit(store, tenant, model, max_steps: int, checkpoint_every: int = 100) -> str:
    spec = parse_spec({"base_model": str(model), "dataset": f"{tenant.name}/rows.jsonl",
                       "hyperparameters": {"max_steps": max_steps, "batch_size": 2, "max_seq_len": 256,
                                           "checkpoint_every": checkpoint_every}})
    return store.submit(tenant.name, spec, plan=plan_for(spec, model, 1000))["job_id"]


def executor_with(store, artifacts, *job_ids) -> Executor:
    executor = Executor(store, f"exec-{secrets.token_hex(3)}", "cpu", artifacts)
    for job_id in job_ids:
        store.claim(job_id, executor.executor_id)
    executor.sync_assignments()
    assert set(job_ids) <= set(executor.leases)
    return executor


def test_the_cohort_keeps_stepping_while_a_finished_jobs_adapter_is_copied(store, world, single_torch_thread):
    tenant, model, artifacts = world
    short, long = submit(store, tenant, model, max_steps=1), submit(store, tenant, model, max_steps=50)
    executor = executor_with(store, artifacts, short, long)

    executor.train_step()  # `short` finishes: its adapter's copy waits at the gate
    assert GatedFileSystem.entered.wait(10), "the result's copy started"
    for _ in range(3):
        executor.train_step()

    assert not GatedFileSystem.gate.is_set()
    assert store.job(long).step == 4, "the cohort stepped on while the adapter was being copied"
    assert short not in executor.cohort.jobs, "its slot in the cohort is free at once"
    pending = store.job(short)
    assert pending.state == JobState.RUNNING and pending.adapter_uri is None, "not succeeded before it is stored"
    assert executor.heartbeat().jobs[short] == pending.attempt, "still held: the scheduler does not take it for lost"

    GatedFileSystem.gate.set()
    executor.publisher.wait()
    done = store.job(short)
    assert done.state == JobState.SUCCEEDED
    assert (Path(artifacts.fetch(done.adapter_uri)) / "adapter_model.safetensors").is_file()
    assert short not in executor.heartbeat().jobs


def test_an_adapter_that_cannot_be_stored_fails_its_job_alone(store, world, single_torch_thread):
    tenant, model, artifacts = world
    GatedFileSystem.gate.set()
    bad, good = submit(store, tenant, model, max_steps=1), submit(store, tenant, model, max_steps=1)
    long = submit(store, tenant, model, max_steps=50)
    GatedFileSystem.failing = {bad}
    failures_before = int(store.r.hget(keys.JOB_FAILURES, "publish") or 0)
    executor = executor_with(store, artifacts, bad, good, long)

    executor.train_step()
    executor.train_step()
    executor.publisher.wait()

    failed = store.job(bad)
    assert failed.state == JobState.FAILED and "could not be stored" in failed.error and failed.adapter_uri is None
    assert int(store.r.hget(keys.JOB_FAILURES, "publish")) == failures_before + 1
    assert store.job(good).state == JobState.SUCCEEDED
    assert store.job(long).state == JobState.RUNNING and long in executor.cohort.jobs


def test_the_publishers_backlog_outcomes_and_times_are_exported(store, world, single_torch_thread):
    from lorafleet.scheduler.metrics import executor_metrics

    tenant, model, artifacts = world
    good, long = submit(store, tenant, model, max_steps=1), submit(store, tenant, model, max_steps=50,
                                                                    checkpoint_every=2)
    executor = Executor(store, f"exec-{secrets.token_hex(3)}", "cpu", artifacts)
    executor.metrics = executor.publisher.metrics = metrics = executor_metrics(executor.executor_id)

    def claim(*job_ids):
        for job_id in job_ids:
            store.claim(job_id, executor.executor_id)
        executor.sync_assignments()

    def sample(name: str, **labels) -> float:
        return metrics.registry.get_sample_value(name, {"executor": executor.executor_id, **labels})

    claim(good, long)
    executor.train_step()  # good finishes: its result's copy waits at the gate
    assert GatedFileSystem.entered.wait(10)
    assert sample("lorafleet_publish_backlog") == 1
    executor.train_step()  # long's checkpoint at step 2 queues behind it
    assert sample("lorafleet_publish_backlog") == 2
    GatedFileSystem.gate.set()
    executor.publisher.wait()
    assert sample("lorafleet_publish_backlog") == 0

    bad = submit(store, tenant, model, max_steps=1)
    GatedFileSystem.failing = {bad}
    claim(bad)
    executor.train_step()
    executor.publisher.wait()

    assert sample("lorafleet_publications_total", kind="result", outcome="recorded") == 1
    assert sample("lorafleet_publications_total", kind="result", outcome="failed") == 1
    assert sample("lorafleet_publications_total", kind="checkpoint", outcome="recorded") == 1
    assert sample("lorafleet_publications_total", kind="checkpoint", outcome="refused") == 0
    assert sample("lorafleet_snapshot_seconds_count") == 3 and sample("lorafleet_snapshot_seconds_sum") > 0
    assert sample("lorafleet_publish_duration_seconds_count") == 3


def test_drain_waits_for_a_result_being_copied(store, world, single_torch_thread):
    tenant, model, artifacts = world
    short, long = submit(store, tenant, model, max_steps=1), submit(store, tenant, model, max_steps=50)
    executor = executor_with(store, artifacts, short, long)
    executor.train_step()
    assert GatedFileSystem.entered.wait(10)

    threading.Timer(0.5, GatedFileSystem.gate.set).start()
    executor.drain()

    assert store.job(short).state == JobState.SUCCEEDED, "drain returned only once the result was stored"
    requeued = store.job(long)
    assert requeued.state == JobState.QUEUED and requeued.checkpoint_uri, "handed back from its drain checkpoint"


KILLED_EXECUTOR = """
import logging
import sys
from pathlib import Path

import helpers_gatedfs
from lorafleet.executor.worker import Executor
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.store import JobStore

redis_url, root, marker, executor_id = sys.argv[1:]
logging.basicConfig(level=logging.INFO)
helpers_gatedfs.GatedFileSystem.entered_marker = Path(marker)
Executor(JobStore.from_url(redis_url), executor_id, "cpu", ArtifactStore(root), poll_seconds=0.05).run()
"""


def test_an_executor_killed_while_publishing_leaves_a_job_that_resumes_from_its_last_checkpoint(
        store, world, redis_url, tmp_path):
    tenant, model, artifacts = world
    job_id = submit(store, tenant, model, max_steps=4, checkpoint_every=2)
    executor_id, marker = f"exec-{secrets.token_hex(3)}", tmp_path / "publishing"
    log = open(tmp_path / "executor.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", KILLED_EXECUTOR, redis_url, artifacts.root, str(marker),
                                executor_id], env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not store.r.exists(keys.executor(executor_id)) and time.monotonic() < deadline:
            time.sleep(0.1)  # registered: it handed back what an earlier process of its id held
        first = store.claim(job_id, executor_id)
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (process.poll(), (tmp_path / "executor.log").read_text()[:3000])
    finally:
        process.kill()  # SIGKILL, mid-copy
        process.wait()

    killed = store.job(job_id)
    assert killed.state == JobState.RUNNING and killed.adapter_uri is None
    assert killed.checkpoint_uri and "/checkpoint-2-" in killed.checkpoint_uri
    # What the scheduler does once the killed executor's heartbeat expires.
    assert store.requeue(job_id, JobState.RUNNING, "executor lost", attempt=first, executor_id=executor_id,
                         executor_died=True)
    GatedFileSystem.gate.set()
    survivor = executor_with(store, artifacts, job_id)
    assert survivor.cohort.jobs[job_id].step == 2, "resumed from the last recorded checkpoint"
    while job_id in survivor.leases:
        survivor.train_step()
    survivor.publisher.wait()

    done = store.job(job_id)
    assert done.state == JobState.SUCCEEDED and done.attempt == first + 1
    assert f"/attempt-{first + 1}/adapter-" in done.adapter_uri
    stale = Path(artifacts.base) / tenant.name / job_id / f"attempt-{first}"
    assert not any(p.name.startswith("adapter-") for p in stale.iterdir()), "the killed copy is reachable by no name"


def test_a_training_turn_of_the_executor_costs_three_redis_round_trips(store, world, single_torch_thread,
                                                                         monkeypatch):
    """Between two steps the loop reads its assignments, pauses and drain flag together (`executor_view`), writes the
    step (`record_step`: one pipeline of EVALSHA, not preceded by redis-py's SCRIPT EXISTS) and takes waiting
    generation requests while marking itself the base's server (`take_requests(server=...)`): three round trips a
    turn, whatever the number of jobs (seven before: the drain flag, holding and pauses read apart, the server marked
    apart, SCRIPT EXISTS before the step's writes)."""
    import redis.connection

    tenant, model, artifacts = world
    executor = executor_with(store, artifacts, *(submit(store, tenant, model, max_steps=50) for _ in range(3)))
    assert executor.turn()  # the first turn builds the cohort and reads the memory calibration
    sent = []
    original = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command",
                        lambda self, command, *args, **kwargs: sent.append(command) or original(self, command, *args,
                                                                                               **kwargs))
    steps = {job_id: store.job(job_id).step for job_id in executor.leases}
    sent.clear()
    assert executor.turn()
    turn = list(sent)
    assert {job_id: store.job(job_id).step for job_id in executor.leases} == {j: s + 1 for j, s in steps.items()}
    assert len(turn) == 3, [command[:80] for command in map(packed, turn)]
    assert store.r.get(keys.generation_server(executor.compat_key)) == executor.executor_id


def packed(command) -> bytes:
    """What redis-py sent: bytes, or a list of byte chunks."""
    return command if isinstance(command, bytes) else b"".join(bytes(chunk) for chunk in command)
