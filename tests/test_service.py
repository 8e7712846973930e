"""Scheduler rounds against a real Redis of their own (a round fails any queued job it cannot size, so it must not
see other tests' jobs)."""

from __future__ import annotations

import json
import math
import time

import pytest

from helpers_models import alpaca_rows, build_tiny_model, write_jsonl
from lorafleet.scheduler import fleet, keys
from lorafleet.scheduler.leader import LeaderLock
from lorafleet.scheduler.memory import (
    ModelShape, estimate_activation_bytes, estimate_base_bytes, estimate_job_bytes, generation_pool_bytes,
)
from lorafleet.scheduler.policy import PlanConfig
from lorafleet.scheduler.redis_server import start_redis_server
from lorafleet.scheduler.records import ExecutorHeartbeat
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.store import JobStore, StaleFence


def beat(executor_id: str, total_bytes: int = 64 * 2**30, free_bytes: int | None = None, dtypes: str = "",
         compat_key: str = "", **fields) -> ExecutorHeartbeat:
    """A heartbeat as an executor with these old-style fields would send it."""
    listed = tuple(d for d in dtypes.split(",") if d)
    return ExecutorHeartbeat(executor_id, total_bytes=total_bytes,
                             peak_bytes=0 if free_bytes is None else total_bytes - free_bytes, dtypes=listed,
                             auto_dtype="bfloat16" if not listed or "bfloat16" in listed else "float32",
                             compat_key=compat_key or None, **fields)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    server = start_redis_server(root / "redis")
    models = {family: build_tiny_model(root / "models" / family, family) for family in ("llama", "qwen2")}
    (root / "data" / "acme").mkdir(parents=True)
    write_jsonl(root / "data" / "acme" / "train.jsonl", alpaca_rows(8))
    yield root, server, models
    server.stop()


@pytest.fixture
def store(env, monkeypatch):
    root, server, _ = env
    monkeypatch.setenv("LORAFLEET_DATA_ROOT", str(root / "data"))
    monkeypatch.setenv("LORAFLEET_MODEL_ROOTS", str(root / "models"))
    job_store = JobStore.from_url(server.url)
    job_store.r.flushdb()
    job_store.ensure_schema()
    job_store.create_tenant("acme", weight=1.0, max_queued=10, max_running=10)
    return job_store


def submit(store, model_dir) -> str:
    spec = parse_spec({"base_model": str(model_dir), "dataset": "acme/train.jsonl",
                       "hyperparameters": {"max_steps": 5, "batch_size": 1, "max_seq_len": 64}})
    return store.submit("acme", spec)["job_id"]


def test_a_job_of_another_base_never_goes_to_an_executor_whose_cohort_is_still_loading(env, store):
    _, _, models = env
    fleet.heartbeat(store.r, beat("exec-1", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30, "compat_key": ""}))
    scheduler = Scheduler(store, "sched-test")
    scheduler.lock.try_acquire()
    first = submit(store, models["llama"])
    assert [a.job_id for a in scheduler.round()] == [first]
    # exec-1 has not loaded llama yet (its heartbeat still says no base) when a qwen2 job arrives
    second = submit(store, models["qwen2"])
    scheduler.round()
    assert store.get_job(second)["state"] == "queued", "it must wait for an executor free of the llama cohort"
    third = submit(store, models["llama"])
    assert [a.job_id for a in scheduler.round()] == [third], "a job of the same base joins the cohort"


def test_jobs_of_a_dead_executor_go_back_to_the_queue_with_their_checkpoint(env, store):
    _, _, models = env
    fleet.heartbeat(store.r, beat("exec-doomed", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30}))
    scheduler = Scheduler(store, "sched-test")
    scheduler.lock.try_acquire()
    job_id = submit(store, models["llama"])
    scheduler.round()
    attempt = store.get_job(job_id)["attempt"]
    assert store.transition(job_id, "scheduled", "running", attempt=attempt)
    assert store.record_checkpoint(job_id, "file:///ckpt/1", attempt) is not None
    store.r.delete(keys.executor("exec-doomed"))  # its heartbeat expired

    scheduler.round()
    job = store.get_job(job_id)
    assert job["state"] == "queued" and job["checkpoint_uri"] == "file:///ckpt/1" and job["executor_id"] is None
    assert "exec-doomed" not in fleet.executors(store.r)[1], "the dead executor is forgotten"


def test_a_deposed_leader_cannot_assign(env, store):
    _, _, models = env
    fleet.heartbeat(store.r, beat("exec-1", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30}))
    old = Scheduler(store, "old-leader")
    old.lock.try_acquire()
    store.r.delete(keys.SCHEDULER_LEADER)  # its lock expired while it was paused
    assert LeaderLock(store.r, "new-leader").try_acquire() is not None
    job_id = submit(store, models["llama"])
    with pytest.raises(StaleFence):
        old.round()
    assert store.get_job(job_id)["state"] == "queued"


@pytest.mark.parametrize("max_pass_tokens, placed", [(None, 1), (64, 2)])
def test_an_executor_in_passes_is_planned_with_one_pass_of_activations(env, store, max_pass_tokens, placed):
    _, _, models = env
    spec = parse_spec({"base_model": str(models["llama"]), "dataset": "acme/train.jsonl",
                       "hyperparameters": {"max_steps": 5, "batch_size": 1, "max_seq_len": 64}})
    hp, shape = spec.hyperparameters, ModelShape.from_config(json.loads((models["llama"] / "config.json").read_text()))
    dtype = "bfloat16"  # what dtype auto computes in on the executor below
    job = estimate_job_bytes(shape, spec.adapter.r, spec.adapter.target_modules, hp.batch_size, hp.max_seq_len, dtype)
    activations = estimate_activation_bytes(shape, hp.batch_size, hp.max_seq_len, dtype)
    base = estimate_base_bytes(shape.num_params(), spec.quantization, dtype) + generation_pool_bytes(shape, dtype)
    # room for the base and its generation pool, two jobs' adapter state and one pass of 64 tokens (one job's), not
    # two jobs' activations
    total = math.ceil((base + 2 * job - activations / 2) / PlanConfig().memory_fraction)
    fleet.heartbeat(store.r, beat("exec-1", **{"total_bytes": total, "free_bytes": total, "compat_key": "",
                                        "max_pass_tokens": max_pass_tokens}))
    scheduler = Scheduler(store, "sched-test")
    scheduler.lock.try_acquire()
    jobs = [store.submit("acme", spec)["job_id"] for _ in range(2)]
    assert len(scheduler.round()) == placed
    assert sum(store.get_job(job_id)["state"] == "scheduled" for job_id in jobs) == placed


def test_a_bf16_job_waits_for_an_executor_that_computes_bf16(env, store):
    _, _, models = env
    fleet.heartbeat(store.r, beat("exec-old", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30, "dtypes": "float32"}))
    scheduler = Scheduler(store, "sched-test")
    scheduler.lock.try_acquire()
    spec = {"base_model": str(models["llama"]), "dataset": "acme/train.jsonl",
            "hyperparameters": {"max_steps": 5, "batch_size": 1, "max_seq_len": 64}}
    bf16 = store.submit("acme", parse_spec({**spec, "dtype": "bfloat16"}))["job_id"]
    assert scheduler.round() == [] and store.get_job(bf16)["state"] == "queued"
    auto = store.submit("acme", parse_spec({**spec, "base_model": str(models["qwen2"])}))["job_id"]
    assert [a.job_id for a in scheduler.round()] == [auto], "auto runs in whatever the executor computes"
    fleet.heartbeat(store.r, beat("exec-new", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30,
                                          "dtypes": "bfloat16,float32"}))
    assert [(a.job_id, a.executor_id) for a in scheduler.round()] == [(bf16, "exec-new")]


def test_a_round_does_not_assign_to_an_executor_that_deregistered_after_it_was_read(env, store, monkeypatch):
    """A drain deregisters and then hands its jobs back; a round that read the executors before and the queue after
    must not give them to the drained executor again."""
    _, _, models = env
    fleet.heartbeat(store.r, beat("exec-draining", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30}))
    job_id = submit(store, models["llama"])
    read_executors = fleet.executors

    def read_then_drained(client, known=None):
        seen = read_executors(client, known)
        fleet.forget(client, "exec-draining")  # the drain, between the round's two reads
        return seen

    monkeypatch.setattr(fleet, "executors", read_then_drained)
    scheduler = Scheduler(store, "sched-test")
    scheduler.lock.try_acquire()
    scheduler.round()
    assert store.get_job(job_id)["state"] == "queued", "not claimed for an executor that is gone"
    monkeypatch.setattr(fleet, "executors", read_executors)
    fleet.heartbeat(store.r, beat("exec-live", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30}))
    scheduler.round()
    job = store.get_job(job_id)
    assert job["state"] == "scheduled" and job["executor_id"] == "exec-live" and job["attempt"] == 1


def test_a_disabled_tenants_queued_jobs_never_start(env, store):
    _, _, models = env
    job_id = submit(store, models["llama"])
    store.set_disabled("acme")
    fleet.heartbeat(store.r, beat("exec-1", **{"total_bytes": 64 * 2**30, "free_bytes": 64 * 2**30, "compat_key": ""}))
    scheduler = Scheduler(store, "sched-test")
    scheduler.lock.try_acquire()
    for _ in range(3):
        assert scheduler.round() == []
    assert store.get_job(job_id)["state"] == "queued"  # kept, not failed: enabling the tenant lets it run
    store.set_disabled("acme", False)
    assert [a.job_id for a in scheduler.round()] == [job_id]
    assert store.get_job(job_id)["state"] == "scheduled"


def test_a_job_that_keeps_killing_its_executor_runs_alone_then_fails_and_its_cohort_finishes(env, store):
    _, _, models = env
    poison, innocent = submit(store, models["llama"]), submit(store, models["llama"])
    scheduler = Scheduler(store, "sched-test")
    scheduler.lock.try_acquire()

    def kill(executor_id):  # what the heartbeat's TTL does after a kill -9
        store.r.delete(keys.executor(executor_id))

    fleet.heartbeat(store.r, beat("exec-1"))
    assert sorted(a.job_id for a in scheduler.round()) == sorted([poison, innocent])  # one cohort
    kill("exec-1")
    for name in ("exec-2", "exec-3"):
        fleet.heartbeat(store.r, beat(name))
    placed = {a.job_id: a.executor_id for a in scheduler.round()}
    assert set(placed) == {poison, innocent} and placed[poison] != placed[innocent], "each runs alone now"
    assert store.get_job(poison)["executor_losses"] == 1
    assert store.transition(innocent, "scheduled", "running")
    assert store.transition(innocent, "running", "succeeded", adapter_uri="file:///a")  # it was innocent

    for loss in (2, 3):
        kill(placed[poison])
        fleet.heartbeat(store.r, beat(f"exec-{loss + 2}"))
        placed = {a.job_id: a.executor_id for a in scheduler.round()}
        if loss == 2:
            assert list(placed) == [poison]
    job = store.get_job(poison)
    assert job["state"] == "failed" and job["executor_losses"] == 3 and "stopped 3 times" in job["error"]
    assert store.get_job(innocent)["state"] == "succeeded"


def test_a_round_longer_than_the_lock_ttl_does_not_lose_leadership(env, store, monkeypatch):
    scheduler = Scheduler(store, "sched-slow", lock_ttl=0.3, interval=0.05)
    tokens = []

    def slow_round():  # a round of a huge queue: over three lock TTLs
        tokens.append(scheduler.lock.token)
        time.sleep(1.0)
        if len(tokens) == 2:
            scheduler.stopping.set()
        return []

    monkeypatch.setattr(scheduler, "round", slow_round)
    scheduler.run()
    assert len(tokens) == 2 and tokens[0] is not None
    assert tokens[1] == tokens[0], "the lock was lost and taken again between the rounds"
    assert int(store.r.get(keys.SCHEDULER_FENCE)) == tokens[0]
    assert store.r.get(keys.SCHEDULER_LEADER) is None  # released on the way out
