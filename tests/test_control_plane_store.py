"""The job store on a real redis-server: state machine, leases, fencing, quotas under concurrency, AOF restarts."""

from __future__ import annotations

import re
import secrets
import threading
import time

import pytest

from lorafleet.scheduler import keys
from lorafleet.scheduler.redis_server import start_redis_server
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.store import (
    IllegalTransition, JobStore, ProgressUpdate, QuotaExceeded, StaleFence, progress_event_due,
)


def new_job(store, tenant, priority=5, **spec) -> str:
    raw = {"base_model": "/models/x", "dataset": f"{tenant.name}/train.jsonl", "priority": priority, **spec}
    return store.submit(tenant.name, parse_spec(raw))["job_id"]


def test_illegal_transitions_are_refused(store, make_tenant):
    alice = make_tenant("alice")
    job_id = new_job(store, alice)
    with pytest.raises(IllegalTransition, match="queued -> running"):
        store.transition(job_id, "queued", "running")
    with pytest.raises(IllegalTransition, match="queued -> succeeded"):
        store.transition(job_id, ["queued", "running"], "succeeded")
    assert store.get_job(job_id)["state"] == "queued"
    attempt = store.claim(job_id, "ex-1")
    store.transition(job_id, "scheduled", "running", attempt=attempt)
    store.transition(job_id, "running", "failed", attempt=attempt, error="CUDA out of memory")
    for to_state in ("queued", "scheduled", "running", "succeeded", "cancelled"):
        with pytest.raises(IllegalTransition):
            store.transition(job_id, "failed", to_state)
    job = store.get_job(job_id)
    assert job["state"] == "failed" and job["error"] == "CUDA out of memory"
    with pytest.raises(LookupError):
        store.transition("job-does-not-exist", "queued", "cancelled")
    with pytest.raises(ValueError, match="cannot set"):
        store.transition(job_id, "queued", "scheduled", tenant="mallory")


def test_the_queue_change_index_names_each_job_that_entered_or_left_the_queue(store, make_tenant):
    alice = make_tenant("alice")
    version, ids = store.queue_snapshot()
    stays, claimed, cancelled = (new_job(store, alice) for _ in range(3))
    version, changed = store.queue_changes(version)
    assert changed == {stays: True, claimed: True, cancelled: True}
    attempt = store.claim(claimed, "ex-1")
    store.cancel(alice.name, cancelled)
    version, changed = store.queue_changes(version)
    assert changed == {claimed: False, cancelled: False}, "the jobs that left, and only those"
    store.requeue(claimed, "scheduled", "executor lost", attempt=attempt, executor_id="ex-1")
    assert store.queue_changes(version) == (version + 1, {claimed: True}), "a requeued job enters again"
    assert store.queue_changes(version - 1) is None, "a reader behind what was trimmed must read the whole queue"
    version, ids = store.queue_snapshot()
    assert {stays, claimed} <= set(ids) and cancelled not in ids
    assert store.queue_changes(version) == (version, {})


def test_lost_race_changes_nothing(store, make_tenant):
    alice = make_tenant("alice")
    job_id = new_job(store, alice)
    assert store.claim(job_id, "ex-1") == 1
    assert store.claim(job_id, "ex-2") is None  # already scheduled
    assert store.get_job(job_id)["executor_id"] == "ex-1"
    assert store.counts(alice.name) == {**dict.fromkeys(keys.JOB_STATES, 0), "scheduled": 1}


def test_a_steps_writes_in_one_round_trip_are_refused_job_by_job(store, make_tenant):
    """`record_step`: each job's progress kept or refused on its own lease; the step's GPU time charged with them."""
    alice = make_tenant("alice")
    held, moved = new_job(store, alice), new_job(store, alice)
    attempts = {}
    for job_id in (held, moved):
        attempts[job_id] = store.claim(job_id, "ex-step")
        store.transition(job_id, "scheduled", "running", attempt=attempts[job_id])
    assert store.transition(moved, "running", "queued")  # its lease went away before the step's writes
    before = store.gpu_seconds_total().get(alice.name, 0.0)
    kept = store.record_step([ProgressUpdate(held, 3, 10, {"loss": 2.0}, attempts[held]),
                              ProgressUpdate(moved, 3, 10, {"loss": 2.0}, attempts[moved])], "ex-step",
                             {alice.name: 1.5})
    assert kept == [True, False]
    assert store.get_job(held)["progress"]["step"] == 3 and store.get_job(moved)["progress"]["step"] == 0
    assert store.gpu_seconds_total()[alice.name] == pytest.approx(before + 1.5)


def test_a_step_is_recorded_once_after_the_server_forgot_its_scripts(store, make_tenant):
    """`record_step` and `claim_many` send EVALSHA without asking SCRIPT EXISTS first; after a restart or SCRIPT FLUSH
    the server answers NOSCRIPT, which ran nothing: the scripts are loaded and each call runs once."""
    alice = make_tenant("alice")
    job_id = new_job(store, alice)
    store.r.script_flush()
    [attempt] = store.claim_many([(job_id, "ex-step")])
    assert attempt is None, "no heartbeat of ex-step: the claim's script ran, and refused"
    store.r.hset(keys.executor("ex-step"), "executor_id", "ex-step")
    store.r.script_flush()
    [attempt] = store.claim_many([(job_id, "ex-step")])
    assert attempt == 1
    store.transition(job_id, "scheduled", "running", attempt=attempt)
    before = store.gpu_seconds_total().get(alice.name, 0.0)
    store.r.script_flush()
    assert store.record_step([ProgressUpdate(job_id, 1, 10, {"loss": 2.0}, attempt)], "ex-step", {alice.name: 1.5}) \
        == [True]
    assert store.get_job(job_id)["progress"]["step"] == 1
    assert store.gpu_seconds_total()[alice.name] == pytest.approx(before + 1.5), "charged once"
    assert [event["step"] for event in store.events(job_id) if "step" in event] == [1], "one progress event"


def test_requeue_keeps_checkpoint_and_stale_lease_is_refused(store, make_tenant):
    alice = make_tenant("alice")
    job_id = new_job(store, alice)
    first = store.claim(job_id, "ex-1")
    store.transition(job_id, "scheduled", "running", attempt=first)
    assert store.record_progress(job_id, 10, 100, {"loss": 1.0}, attempt=first)
    assert store.transition(job_id, "running", "queued", checkpoint_uri="file:///ckpt/10")  # ex-1 went silent
    assert job_id in store.queued_ids()
    second = store.claim(job_id, "ex-2")
    assert second == first + 1
    store.transition(job_id, "scheduled", "running", attempt=second)
    # ex-1 wakes up: its progress and its result are both refused
    assert not store.record_progress(job_id, 11, 100, {"loss": 0.9}, attempt=first)
    assert not store.succeed(job_id, "file:///stale", first)
    job = store.get_job(job_id)
    assert job["checkpoint_uri"] == "file:///ckpt/10" and job["executor_id"] == "ex-2"
    assert job["state"] == "running" and job["progress"]["step"] == 10
    assert store.succeed(job_id, "file:///adapter", second)
    assert store.counts(alice.name)["succeeded"] == 1 and store.counts(alice.name)["running"] == 0


def test_stale_fence_is_refused(store, make_tenant):
    alice = make_tenant("alice")
    job_id = new_job(store, alice)
    old_fence = store.r.incr(keys.SCHEDULER_FENCE)
    new_fence = store.r.incr(keys.SCHEDULER_FENCE)
    with pytest.raises(StaleFence):
        store.claim(job_id, "ex-1", fence=old_fence)
    assert store.get_job(job_id)["state"] == "queued"
    assert store.claim(job_id, "ex-1", fence=new_fence) == 1


def test_cancel_queued_and_running(store, make_tenant):
    alice = make_tenant("alice")
    queued, running = new_job(store, alice), new_job(store, alice)
    attempt = store.claim(running, "ex-1")
    store.transition(running, "scheduled", "running", attempt=attempt)
    assert store.cancel(alice.name, queued)["state"] == "cancelled"
    assert not store.is_cancel_requested(queued)
    job = store.cancel(alice.name, running)
    assert job["state"] == "cancelled" and job["cancel_requested"] and store.is_cancel_requested(running)
    assert not store.record_progress(running, 1, 10, {"loss": 1.0}, attempt=attempt)  # the executor's cue to drop it
    assert store.cancel(alice.name, running)["state"] == "cancelled"  # idempotent
    assert queued not in store.queued_ids()
    done = new_job(store, alice)
    store.transition(done, "queued", "cancelled")
    with pytest.raises(LookupError):
        store.cancel(make_tenant("bob").name, done)


def test_queue_order_is_priority_then_age(store, make_tenant):
    alice = make_tenant("alice")
    low, high_old, high_new = new_job(store, alice, 1), new_job(store, alice, 9), new_job(store, alice, 9)
    order = [j.job_id for j in store.summaries(store.queued_ids()) if j.tenant == alice.name]
    assert order == [high_old, high_new, low]


def test_max_queued_holds_under_concurrent_submits(store, make_tenant):
    alice = make_tenant("alice", max_queued=5)
    spec = parse_spec({"base_model": "/models/x", "dataset": alice.dataset})
    accepted, refused = [], []

    def submit():
        try:
            accepted.append(store.submit(alice.name, spec)["job_id"])
        except QuotaExceeded:
            refused.append(1)

    threads = [threading.Thread(target=submit) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 5 and len(refused) == 15
    assert store.counts(alice.name)["queued"] == 5
    assert store.r.zcard(keys.tenant_jobs(alice.name)) == 5


def test_events_page_and_a_long_job_keeps_its_state_events(store, make_tenant):
    alice = make_tenant("alice")
    job_id = new_job(store, alice)
    attempt = store.claim(job_id, "ex-1")
    assert store.start(job_id, attempt, "ex-1")
    total = 20 * keys.PROGRESS_EVENTS
    for step in range(1, total + 1):
        assert store.record_progress(job_id, step, total, {"loss": 1.0 / step}, attempt=attempt, executor_id="ex-1")
    assert store.r.hget(keys.job(job_id), "step") == str(total), "every step is recorded on the job"
    events = store.events(job_id, limit=1000) + store.events(job_id, after=store.events(job_id, limit=1000)[-1]["id"],
                                                             limit=1000)
    progress = [e for e in events if e["type"] == "progress"]
    assert keys.PROGRESS_EVENTS // 2 <= len(progress) <= keys.PROGRESS_EVENTS + 1, "thinned, not trimmed"
    assert progress[-1]["step"] == total
    assert [(e["from"], e["to"]) for e in events if e["type"] == "state"] == [
        (None, "queued"), ("queued", "scheduled"), ("scheduled", "running")], "the first events are still there"
    page = store.events(job_id, limit=10)
    following = store.events(job_id, after=page[-1]["id"], limit=5)
    assert [e["id"] for e in store.events(job_id, limit=15)] == [e["id"] for e in page + following]
    with pytest.raises(ValueError, match="after"):
        store.events(job_id, after="not-an-id")


def test_progress_events_are_due_about_progress_events_times_a_job():
    assert all(progress_event_due(step, 10) for step in range(1, 11))
    due = [step for step in range(1, 100_001) if progress_event_due(step, 100_000, events=1000)]
    assert len(due) == 1000 and due[0] == 100 and due[-1] == 100_000
    assert progress_event_due(7, 0), "unknown length: every step"


def test_a_long_jobs_validation_losses_are_all_kept_as_events(store, make_tenant):
    """Progress events of a long job are thinned, but a step with a validation loss (a checkpoint) always has one."""
    job_id = new_job(store, make_tenant())
    attempt = store.claim(job_id, "ex-eval")
    store.start(job_id, attempt, "ex-eval")
    for step in range(1, 301):
        metrics = {"loss": 1.0, **({"eval_loss": 2.0} if step % 7 == 0 else {})}
        store.record_progress(job_id, step, 100_000, metrics, attempt=attempt, executor_id="ex-eval")
    evaluated = [e["step"] for e in store.events(job_id, limit=1000) if "eval_loss" in e]
    assert evaluated == list(range(7, 301, 7))
    store.cancel(None, job_id)


def test_tenant_admin(store):
    tenant, token = store.create_tenant("carol-" + secrets.token_hex(4), weight=2.5)
    assert store.authenticate(token) == tenant["name"] and tenant["weight"] == 2.5
    assert store.r.hget(keys.tenant(tenant["name"]), "token_sha256") != token  # only the hash is kept
    assert token not in str(store.r.hgetall(keys.TOKENS))
    with pytest.raises(ValueError, match="already exists"):
        store.create_tenant(tenant["name"])
    for bad in ("Bad Name", "shared", "../x", ""):
        with pytest.raises(ValueError, match="tenant name"):
            store.create_tenant(bad)
    with pytest.raises(ValueError, match="max_queued"):
        store.set_quota(tenant["name"], max_queued=-1)
    with pytest.raises(LookupError):
        store.set_quota("nobody-here", max_queued=3)
    assert not store.r.exists(keys.tenant("nobody-here"))
    assert store.set_quota(tenant["name"], max_running=7)["max_running"] == 7


@pytest.mark.parametrize("stop", ["stop", "kill"])
def test_redis_restart_loses_no_accepted_job(tmp_path, stop):
    server = start_redis_server(tmp_path / "redis")
    store = JobStore(server.client())
    store.ensure_schema()
    _, token = store.create_tenant("alice")
    spec = parse_spec({"base_model": "/models/x", "dataset": "alice/train.jsonl"})
    job_ids = [store.submit("alice", spec)["job_id"] for _ in range(3)]
    store.claim(job_ids[0], "ex-1")
    if stop == "kill":
        time.sleep(3)  # everysec: Redis may hold back the AOF write for up to 2 s while an fsync is slow
    getattr(server, stop)()  # SIGTERM (AOF flushed on the way out) or SIGKILL

    server = start_redis_server(tmp_path / "redis")
    try:
        store = JobStore(server.client())
        store.ensure_schema()
        assert store.authenticate(token) == "alice"
        assert [store.get_job(j)["state"] for j in job_ids] == ["scheduled", "queued", "queued"]
        assert store.queued_ids() == job_ids[1:]
        assert store.counts("alice")["queued"] == 2
        assert [e["to"] for e in store.events(job_ids[0])] == ["queued", "scheduled"]
    finally:
        server.stop()


def test_list_jobs_by_state_newest_first(store, make_tenant):
    alice = make_tenant("alice")
    jobs = [new_job(store, alice) for _ in range(6)]
    for job_id in jobs[1::2]:
        store.cancel(alice.name, job_id)
    assert [j["job_id"] for j in store.list_jobs(alice.name, "queued", limit=2)] == [jobs[4], jobs[2]]
    assert [job_id for job_id, _ in store._newest(alice.name, "cancelled", 5, chunk=2)] == jobs[1::2][::-1]
    assert [j["job_id"] for j in store.list_jobs(alice.name)] == jobs[::-1]


def test_every_key_in_redis_is_documented(store, make_tenant):
    alice = make_tenant("alice")
    job_id = new_job(store, alice)
    attempt = store.claim(job_id, "ex-1")
    store.transition(job_id, "scheduled", "running", attempt=attempt)
    store.record_progress(job_id, 1, 2, {"loss": 1.0}, attempt=attempt)
    store.add_gpu_seconds({alice.name: 1.5})
    documented = re.findall(r"^\| `(lorafleet:[^`]+)` \|", keys.__doc__, flags=re.MULTILINE)
    patterns = [re.compile("[^:]+".join(re.escape(part) for part in re.split(r"<[a-z_ ]+>", key))) for key in documented]
    undocumented = [key for key in store.r.scan_iter(match=keys.PREFIX + "*", count=1000)
                    if not any(p.fullmatch(key) for p in patterns)]
    assert documented and undocumented == []
