"""The control plane's record keeping: reconciliation both ways, rounds that read only what changed, schema
migration, retention, idempotent submission. Against real Redis servers and a real Celery worker."""

from __future__ import annotations

import secrets
import shutil
import time
from datetime import datetime, timedelta, timezone

import pytest

import lorafleet.scheduler.service as service
from helpers_models import alpaca_rows, build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401
from helpers_polling import wait_until
from lorafleet.executor.worker import Executor
from lorafleet.scheduler import fleet, keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.memory import ModelShape, plan_job
from lorafleet.scheduler.records import ExecutorHeartbeat, JobState
from lorafleet.scheduler.redis_server import start_redis_server
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.spec import JobSpec, parse_spec
from lorafleet.scheduler.store import JobStore, submit_keys
from lorafleet.scheduler.submission import plan_for

SMALL = ModelShape(64, 128, 2, 4, 2, 360)


def plan_of(spec):
    hp = spec.hyperparameters
    return plan_job("|".join((spec.base_model, spec.quantization, spec.dtype)), spec.base_model, SMALL,
                    spec.adapter.r, spec.adapter.target_modules, hp.batch_size, hp.max_seq_len, spec.quantization,
                    spec.dtype, 1000)


# ---- reconciliation ----


def test_the_scheduler_requeues_a_job_the_executor_looked_past_without_holding(store, make_tenant):
    tenant = make_tenant()
    spec = parse_spec({"base_model": "/models/none", "dataset": tenant.dataset})
    lost, fresh = (store.submit(tenant.name, spec, plan=plan_of(spec))["job_id"] for _ in range(2))
    lost_attempt = store.claim(lost, "exec-r")
    assert store.start(lost, lost_attempt, "exec-r")
    seen, _ = store.holding("exec-r")
    store.claim(fresh, "exec-r")  # assigned after the executor's last look: not judged yet
    fleet.heartbeat(store.r, ExecutorHeartbeat("exec-r", total_bytes=2**20, jobs={}, synced_seq=seen))
    scheduler = Scheduler(store, "sched-reconcile")
    scheduler.lock.try_acquire()
    scheduler._reconcile({b.executor_id: b for b in fleet.executors(store.r)[0]}, scheduler.lock.token)
    job = store.job(lost)
    assert job.state == JobState.QUEUED and job.executor_losses == 0, "requeued, and not counted as a loss"
    assert any(e["type"] == "requeued" and "does not hold it" in e["reason"] for e in store.events(lost))
    assert store.job(fresh).state == JobState.SCHEDULED
    assert store.counts(tenant.name)["running"] == 0
    store.r.delete(keys.executor("exec-r"))  # a 1 MiB executor: submissions of later tests must not see it


def test_after_redis_loses_its_last_writes_the_job_runs_again_and_counts_are_right(tmp_path, monkeypatch,
                                                                                    single_torch_thread):
    """Redis acknowledged a job's success and lost it (a crash inside AOF's everysec window, here: the data
    directory of a moment before). The executor no longer holds the job; the store says it runs there."""
    data = tmp_path / "data"
    model = build_tiny_model(tmp_path / "models" / "tiny", "llama")
    (data / "acme").mkdir(parents=True)
    write_jsonl(data / "acme" / "rows.jsonl", alpaca_rows(16))
    monkeypatch.setenv("LORAFLEET_DATA_ROOT", str(data))
    server = start_redis_server(tmp_path / "redis")
    port = server.port
    store = JobStore(server.client())
    store.ensure_schema()
    store.create_tenant("acme")
    spec = parse_spec({"base_model": str(model), "dataset": "acme/rows.jsonl",
                       "hyperparameters": {"max_steps": 3, "batch_size": 2, "max_seq_len": 256}})
    job_id = store.submit("acme", spec, plan=plan_for(spec, model, 1000))["job_id"]
    executor = Executor(store, "exec-1", "cpu", ArtifactStore(str(tmp_path / "artifacts")))
    executor.send_heartbeat()
    scheduler = Scheduler(store, "sched-1")
    scheduler.lock.try_acquire()
    try:
        scheduler.round()
        executor.sync_assignments()
        executor.train_step()
        assert store.job(job_id).state == JobState.RUNNING
        server.stop()  # a clean copy of what Redis holds now ...
        shutil.copytree(tmp_path / "redis", tmp_path / "before")
        server = start_redis_server(tmp_path / "redis", port=port)
        store.r.connection_pool.disconnect()
        while job_id in executor.leases:
            executor.train_step()
        executor.publisher.wait()  # the result is stored and recorded off the training loop
        assert store.job(job_id).state == JobState.SUCCEEDED
        server.kill()  # ... and the writes since are lost
        shutil.rmtree(tmp_path / "redis")
        shutil.copytree(tmp_path / "before", tmp_path / "redis")
        server = start_redis_server(tmp_path / "redis", port=port)
        store.r.connection_pool.disconnect()
        assert store.job(job_id).state == JobState.RUNNING and not executor.leases, "the store lost the success"

        for _ in range(30):  # the service's loop, one beat and round at a time
            executor.send_heartbeat()
            scheduler.round()
            executor.sync_assignments()
            if executor.leases:
                executor.train_step()
                executor.publisher.wait()
            if store.job(job_id).state == JobState.SUCCEEDED:
                break
        job = store.job(job_id)
        assert job.state == JobState.SUCCEEDED and job.attempt == 2
        assert any(e["type"] == "requeued" and "does not hold it" in e["reason"] for e in store.events(job_id))
        counts = store.counts("acme")
        assert (counts["running"], counts["scheduled"], counts["queued"], counts["succeeded"]) == (0, 0, 0, 1)
    finally:
        server.stop()


# ---- rounds read what changed ----


def test_a_round_with_10k_queued_reads_no_spec_no_file_and_no_record_twice(store, make_tenant, monkeypatch):
    for beat in fleet.executors(store.r)[0]:  # heartbeats earlier tests left (within their TTL) would take jobs
        store.r.delete(keys.executor(beat.executor_id))
    # The warm-up round requeues what those held and sizes (or fails) what earlier tests left queued without a plan.
    warm_up = Scheduler(store, "sched-warm-up")
    warm_up.lock.try_acquire()
    warm_up.round()
    warm_up.lock.release()
    tenant = make_tenant(max_queued=20_000)
    spec = parse_spec({"base_model": "/models/none", "dataset": tenant.dataset})
    plan = plan_of(spec)
    pipe = store.r.pipeline(transaction=False)
    for _ in range(10_000):  # submit's own script, pipelined: the test needs the queue, not 10k round trips
        job_id = "job-" + secrets.token_hex(8)
        store._submit(keys=submit_keys(tenant.name, job_id),
                      args=[job_id, tenant.name, spec.name, 5, spec.model_dump_json(), repr(time.time()), "{}",
                            plan.to_json(), ""], client=pipe)
    pipe.execute()
    fleet.heartbeat(store.r, ExecutorHeartbeat("exec-full", total_bytes=2**20, auto_dtype="bfloat16"))  # no room
    reads = {"spec": 0, "files": 0}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            reads[name] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(JobSpec, "model_validate", counting("spec", JobSpec.model_validate))
    monkeypatch.setattr(JobSpec, "model_validate_json", counting("spec", JobSpec.model_validate_json))
    monkeypatch.setattr(service, "plan_from_files", counting("files", service.plan_from_files))
    monkeypatch.setattr("builtins.open", counting("files", open))

    def calls(*commands: str) -> int:
        stats = store.r.info("commandstats")
        return sum(int(stats.get(f"cmdstat_{command}", {}).get("calls", 0)) for command in commands)

    def record_reads() -> int:
        return calls("hgetall", "hmget")

    # Other tests' jobs and tenants share this Redis: their queued and held jobs are read too, the tenants twice.
    others = len(store.queued_ids()) - 10_000 + len(store.held_ids()) + 2 * len(store.r.smembers(keys.TENANTS)) + 10
    scheduler = Scheduler(store, "sched-10k")
    scheduler.lock.try_acquire()
    before = record_reads()
    assert scheduler.round() == []
    first = record_reads() - before
    queue_reads = calls("zrange")
    assert scheduler.round() == []
    second = record_reads() - first - before
    assert calls("zrange") == queue_reads, "the next round reads the queue's changes, not the queue"
    assert 10_000 <= first <= 10_000 + others, "the first round reads each queued job's summary once"
    assert second <= others, "the next reads none of them again"
    assert reads == {"spec": 0, "files": 0}
    store.r.delete(keys.executor("exec-full"))  # a 1 MiB executor: submissions of later tests must not see it


def test_no_round_rereads_every_held_job_but_each_is_reread_within_ten_rounds(store, make_tenant):
    """Held jobs' summaries are re-read for their progress a tenth at a time, so no round pays for all of them."""
    tenant = make_tenant(max_queued=500)
    spec = parse_spec({"base_model": "/models/none", "dataset": tenant.dataset})
    held = [store.submit(tenant.name, spec, plan=plan_of(spec))["job_id"] for _ in range(300)]
    attempts = {job_id: store.claim(job_id, "exec-held") for job_id in held}
    fleet.heartbeat(store.r, ExecutorHeartbeat("exec-held", total_bytes=2**20, jobs=attempts,
                                               synced_seq=store.holding("exec-held")[0]), ttl=60)
    scheduler = Scheduler(store, "sched-held")
    scheduler.lock.try_acquire()
    scheduler._held_jobs()
    first_read = {job_id: scheduler.held[job_id] for job_id in held}
    reads = []
    for _ in range(service.REREAD_HELD_EVERY):
        before = {job_id: scheduler.held[job_id] for job_id in held}
        scheduler._held_jobs()
        reads.append(sum(scheduler.held[job_id] is not before[job_id] for job_id in held))
    assert max(reads) < len(held) / 4, f"a round re-read {max(reads)} of {len(held)} held jobs"
    assert all(scheduler.held[job_id] is not first_read[job_id] for job_id in held), "each re-read in ten rounds"
    for job_id in held:  # so that later tests' rounds do not see them
        store.cancel(tenant.name, job_id)
    store.r.delete(keys.executor("exec-held"))


# ---- schema migration ----


def test_data_written_by_schema_1_is_migrated_and_its_jobs_sized_once(store, make_tenant, base_model_dir,
                                                                     monkeypatch):
    tenant = make_tenant()
    monkeypatch.setenv("LORAFLEET_DATA_ROOT", str(tenant.area.parent))
    monkeypatch.setenv("LORAFLEET_MODEL_ROOTS", str(base_model_dir.parent))
    spec = parse_spec({"base_model": str(base_model_dir), "dataset": tenant.dataset,
                       "hyperparameters": {"max_steps": 2}})
    queued, held, done = (store.submit(tenant.name, spec)["job_id"] for _ in range(3))
    attempt = store.claim(held, "exec-v1")
    store.transition(done, "queued", "cancelled")
    # what version 1 wrote: no plan, no indexes
    for job_id in (queued, held, done):
        store.r.hdel(keys.job(job_id), "plan", "checkpoints", "assigned_seq", "request_id")
    store.r.delete(keys.holding("exec-v1"))
    store.r.zrem(keys.FINISHED, done)
    store.r.set(keys.SCHEMA_VERSION_KEY, 1)

    store.ensure_schema()

    assert store.r.get(keys.SCHEMA_VERSION_KEY) == str(keys.SCHEMA_VERSION)
    assert store.holding("exec-v1")[1] == {held: attempt}
    assert store.r.zscore(keys.FINISHED, done) is not None
    assert store.job(queued).plan is None
    scheduler = Scheduler(store, "sched-migrate")
    scheduler.lock.try_acquire()
    scheduler._sync_backlog(scheduler.lock.token)
    plan = store.job(queued).plan
    assert plan is not None and plan.base_snapshot == str(base_model_dir.resolve()), "sized once, and stored"
    store.r.set(keys.SCHEMA_VERSION_KEY, 99)
    with pytest.raises(RuntimeError, match="schema version 99"):
        store.ensure_schema()
    store.r.set(keys.SCHEMA_VERSION_KEY, keys.SCHEMA_VERSION)


# ---- retention ----


def test_purge_removes_old_finished_jobs_with_their_artifacts_and_nothing_else(store, make_tenant, tmp_path):
    tenant = make_tenant()
    spec = parse_spec({"base_model": "/models/none", "dataset": tenant.dataset})
    old, recent, waiting = (store.submit(tenant.name, spec, plan=plan_of(spec), request_id=f"r-{i}")["job_id"]
                            for i in range(3))
    for job_id in (old, recent):
        attempt = store.claim(job_id, "exec-p")
        store.start(job_id, attempt, "exec-p")
        store.succeed(job_id, "file:///a", attempt, "exec-p")
    store.r.zadd(keys.FINISHED, {old: 1000.0})
    store.r.hset(keys.job(old), "finished_at", "1000.0")
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    for job_id in (old, recent):
        (tmp_path / "artifacts" / tenant.name / job_id / "attempt-1").mkdir(parents=True)
    counts = store.counts(tenant.name)

    removed = store.purge(time.time() - 3600, lambda job: artifacts.delete_job(job.tenant, job.job_id))

    assert [job.job_id for job in removed] == [old]
    assert store.job(old) is None and not store.r.exists(keys.job_events(old))
    assert not (tmp_path / "artifacts" / tenant.name / old).exists()
    assert (tmp_path / "artifacts" / tenant.name / recent).exists()
    assert store.job(recent).state == JobState.SUCCEEDED and store.job(waiting).state == JobState.QUEUED
    assert store.counts(tenant.name)["succeeded"] == counts["succeeded"] - 1
    assert store.r.hget(keys.tenant_requests(tenant.name), "r-0") is None, "its request id may be used again"
    assert old not in [j["job_id"] for j in store.list_jobs(tenant.name)]


# ---- idempotent submission, expiring calls ----


def spec_for(tenant, base_model_dir) -> dict:
    return {"base_model": str(base_model_dir), "dataset": tenant.dataset,
            "hyperparameters": {"max_steps": 2, "batch_size": 1, "max_seq_len": 512}}


def test_a_retried_submit_with_the_same_request_id_returns_the_first_job(call, store, make_tenant, base_model_dir):
    alice, bob = make_tenant("alice"), make_tenant("bob")
    first = call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir), "order-42")
    again = call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir), "order-42")
    assert again["job_id"] == first["job_id"] and again["request_id"] == "order-42"
    assert store.counts(alice.name)["queued"] == 1
    other = call("lorafleet.submit_job", bob.token, spec_for(bob, base_model_dir), "order-42")
    assert other["job_id"] != first["job_id"], "request ids are per tenant"
    with pytest.raises(ValueError, match="request_id"):
        call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir), "no spaces allowed")
    assert call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir))["job_id"] != first["job_id"]


def test_a_batch_submit_accepts_or_refuses_each_spec_on_its_own_and_retries_return_the_same_jobs(
        call, store, make_tenant, base_model_dir):
    tenant = make_tenant("sweep")
    good = spec_for(tenant, base_model_dir)
    bad = {**good, "dataset": f"{tenant.name}/missing.jsonl"}
    batch = [good, bad, {**good, "priority": 9}]
    first = call("lorafleet.submit_jobs", tenant.token, batch, ["s-0", "s-1", "s-2"])
    assert [r.get("state") for r in first] == ["queued", None, "queued"]
    assert first[1]["error"]["type"] == "ValueError" and "dataset" in first[1]["error"]["message"]
    assert first[2]["priority"] == 9
    again = call("lorafleet.submit_jobs", tenant.token, batch, ["s-0", "s-1", "s-2"])
    assert [r.get("job_id") for r in again] == [r.get("job_id") for r in first], "no job made twice"
    assert store.counts(tenant.name)["queued"] == 2
    with pytest.raises(ValueError, match="specs: a list of 1 to 100"):
        call("lorafleet.submit_jobs", tenant.token, [good] * 101)


def test_a_submit_nobody_waits_for_any_more_is_not_run(tenant_app, store, make_tenant, base_model_dir):
    alice = make_tenant("alice")
    app = tenant_app(alice.name)
    past = datetime.now(timezone.utc) - timedelta(seconds=5)
    result = app.send_task("lorafleet.submit_job", args=[alice.token, spec_for(alice, base_model_dir), "late-1"],
                           expires=past)
    wait_until(lambda: result.state == "REVOKED", "the worker to drop the expired call", timeout=30)
    assert store.r.hget(keys.tenant_requests(alice.name), "late-1") is None
    assert store.counts(alice.name)["queued"] == 0


def test_the_leader_expires_finished_jobs_past_the_retention_time(store, make_tenant, tmp_path):
    tenant = make_tenant()
    spec = parse_spec({"base_model": "/models/none", "dataset": tenant.dataset})
    old = store.submit(tenant.name, spec, plan=plan_of(spec))["job_id"]
    store.cancel(tenant.name, old)
    store.r.zadd(keys.FINISHED, {old: time.time() - 7200})
    store.r.hset(keys.job(old), "finished_at", repr(time.time() - 7200))
    (tmp_path / "artifacts" / tenant.name / old).mkdir(parents=True)
    scheduler = Scheduler(store, "sched-retention", artifacts=ArtifactStore(str(tmp_path / "artifacts")),
                          retention_seconds=3600)
    scheduler.lock.try_acquire()
    scheduler.round()
    assert store.job(old) is None and not (tmp_path / "artifacts" / tenant.name / old).exists()
