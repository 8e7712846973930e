"""An executor that stalls past its lease (a SIGSTOP, a long GC pause, a partition) writes nothing anyone reads.

Two in-process executors share a real Redis and a real tiny model. At each phase of executor A's work the job is
taken from it and finished or checkpointed by executor B — what the scheduler does when A's heartbeat expires —
and then A goes on as a woken-up process would: mid-run, after its last step while publishing the adapter, and
while publishing a checkpoint. Whatever A does afterwards must not be visible at the job's adapter, checkpoint,
progress or state, and what it copied is deleted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from helpers_models import alpaca_rows, build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401
from lorafleet.executor.worker import Executor
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.records import JobState
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.submission import plan_for


@pytest.fixture
def world(store, make_tenant, tmp_path, monkeypatch):
    tenant = make_tenant()
    write_jsonl(tenant.area / "rows.jsonl", alpaca_rows(16))
    monkeypatch.setenv("LORAFLEET_DATA_ROOT", str(tenant.area.parent))
    model = build_tiny_model(tmp_path / "models" / "tiny", "llama")
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))  # each executor has its own store object: one root
    a = Executor(store, "exec-a", "cpu", ArtifactStore(artifacts.root))
    b = Executor(store, "exec-b", "cpu", ArtifactStore(artifacts.root))
    return tenant, model, artifacts, a, b


def submit(store, tenant, model, max_steps=4, checkpoint_every=100) -> str:
    spec = parse_spec({"base_model": str(model), "dataset": f"{tenant.name}/rows.jsonl",
                       "hyperparameters": {"max_steps": max_steps, "batch_size": 2, "max_seq_len": 256,
                                           "checkpoint_every": checkpoint_every}})
    return store.submit(tenant.name, spec, plan=plan_for(spec, model, 1000))["job_id"]


def start_on(store, executor, job_id) -> int:
    attempt = store.claim(job_id, executor.executor_id)
    executor.sync_assignments()
    assert job_id in executor.leases and store.job(job_id).state == JobState.RUNNING
    return attempt


def take_over(store, stalled, job_id, then_run, steps=100) -> None:
    """The scheduler requeues the stalled executor's job (its heartbeat expired) and `then_run` trains it."""
    job = store.job(job_id)
    assert store.requeue(job_id, job.state, "executor lost", attempt=job.attempt, executor_id=stalled.executor_id,
                         executor_died=True)
    start_on(store, then_run, job_id)
    for _ in range(steps):
        if job_id not in then_run.leases:
            break
        then_run.train_step()
    then_run.publisher.wait()


def run_until_gone(executor, job_id, steps=20) -> None:
    for _ in range(steps):
        if job_id not in executor.leases:
            executor.publisher.wait()  # its result is recorded (or refused) off the loop
            return
        executor.train_step()
    raise AssertionError(f"{job_id} still held by {executor.executor_id} after {steps} steps")


def files_of(uri: str) -> dict[str, str]:
    root = Path(uri)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def attempt_dir(artifacts, tenant, job_id, attempt) -> Path:
    return Path(artifacts.base) / tenant.name / job_id / f"attempt-{attempt}"


def stall_when_publishing(executor, prefix: str, stalled_while):
    """Run `stalled_while` the first time `executor` starts copying an artifact named `prefix`...: the moment after
    it checked its lease, where a pause is the most harmful."""
    publish, fired = executor.artifacts.publish, []

    def publish_after_a_pause(local, tenant, job_id, attempt, name):
        if name.startswith(prefix) and not fired:
            fired.append(name)
            stalled_while()
        return publish(local, tenant, job_id, attempt, name)

    executor.artifacts.publish = publish_after_a_pause
    return fired


def test_a_stalled_executor_woken_mid_run_records_nothing(store, world, single_torch_thread, caplog):
    tenant, model, artifacts, a, b = world
    job_id = submit(store, tenant, model)
    first = start_on(store, a, job_id)
    a.train_step()
    take_over(store, a, job_id, then_run=b)
    done = store.job(job_id)
    assert done.state == JobState.SUCCEEDED and done.attempt == first + 1, done.error
    published = files_of(done.adapter_uri)

    a.train_step()  # woken up: its step is trained, its writes refused, the job dropped
    a.sync_assignments()
    assert job_id not in a.leases
    after = store.job(job_id)
    assert (after.state, after.adapter_uri, after.step, after.metrics) == (done.state, done.adapter_uri, done.step,
                                                                           done.metrics)
    assert files_of(after.adapter_uri) == published
    assert not attempt_dir(artifacts, tenant, job_id, first).exists(), "the stale lease published nothing"


def test_a_stalled_executor_woken_while_publishing_its_adapter_changes_nothing(store, world, single_torch_thread,
                                                                                caplog):
    tenant, model, artifacts, a, b = world
    job_id = submit(store, tenant, model, max_steps=2)
    first = start_on(store, a, job_id)
    won = {}

    def b_finishes_first():
        take_over(store, a, job_id, then_run=b)
        won["job"] = store.job(job_id)
        won["files"] = files_of(won["job"].adapter_uri)

    fired = stall_when_publishing(a, "adapter", b_finishes_first)
    run_until_gone(a, job_id)
    assert fired == ["adapter"], "A paused after its last step, at the copy of its adapter"
    final = store.job(job_id)
    assert final == won["job"] and final.state == JobState.SUCCEEDED, "A's result changed nothing"
    assert f"/attempt-{first + 1}/" in final.adapter_uri and files_of(final.adapter_uri) == won["files"]
    stale = attempt_dir(artifacts, tenant, job_id, first)
    assert not any(p.name.startswith("adapter") for p in stale.glob("*")), "A's refused copy was deleted"
    assert "result refused" in caplog.text, "logged as refused, never as a success"


def test_a_stalled_executor_woken_while_publishing_a_checkpoint_changes_nothing(store, world, single_torch_thread,
                                                                                 caplog):
    tenant, model, artifacts, a, b = world
    job_id = submit(store, tenant, model, max_steps=6, checkpoint_every=2)
    first = start_on(store, a, job_id)

    def b_checkpoints():
        take_over(store, a, job_id, then_run=b, steps=2)  # B trains to its own first checkpoint, and stops there

    fired = stall_when_publishing(a, "checkpoint", b_checkpoints)
    a.train_step()
    a.train_step()  # step 2: checkpoint due; A stalls in the copy while B takes the job over
    a.publisher.wait()
    assert fired and fired[0].startswith("checkpoint")
    job = store.job(job_id)
    assert job.state == JobState.RUNNING and job.executor_id == "exec-b" and job.attempt == first + 1
    assert job.checkpoint_uri and f"/attempt-{first + 1}/" in job.checkpoint_uri
    assert list(job.checkpoints) == [job.checkpoint_uri], "only B's checkpoint is recorded"
    stale = attempt_dir(artifacts, tenant, job_id, first)
    assert not any(p.name.startswith("checkpoint") for p in stale.glob("*")), "A's refused checkpoint was deleted"
    assert "refused" in caplog.text

    a.train_step()
    assert job_id not in a.leases
    run_until_gone(b, job_id)
    assert store.job(job_id).state == JobState.SUCCEEDED


def test_old_checkpoints_are_deleted_and_the_last_n_kept(store, world, single_torch_thread, monkeypatch):
    tenant, model, artifacts, a, _ = world
    monkeypatch.setenv("LORAFLEET_KEEP_CHECKPOINTS", "2")
    job_id = submit(store, tenant, model, max_steps=9, checkpoint_every=2)
    attempt = start_on(store, a, job_id)
    for _ in range(8):
        a.train_step()
    a.publisher.wait()
    job = store.job(job_id)
    assert len(job.checkpoints) == 2 and job.checkpoints[-1] == job.checkpoint_uri
    on_disk = sorted(p.name for p in attempt_dir(artifacts, tenant, job_id, attempt).glob("checkpoint-*"))
    assert [name.split("-")[1] for name in on_disk] == ["6", "8"], "steps 2 and 4 deleted, the last two kept"
    assert all(Path(uri).is_dir() for uri in job.checkpoints)
    checkpoint_files = {p.name for p in Path(job.checkpoint_uri).iterdir()}
    assert {"training_state.pt", "adapter_model.safetensors", "adapter_config.json"} <= checkpoint_files
