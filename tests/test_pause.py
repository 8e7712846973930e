"""Pause and resume: a paused job leaves its cohort at a step boundary with its checkpoint (optimizer state and data
position), is never scheduled while paused, and once resumed ends exactly as an uninterrupted run of it would,
wherever it resumes. In-process executors on a real Redis and a real tiny model (the fencing tests' world)."""

from __future__ import annotations

import pytest

from helpers_models import single_torch_thread  # noqa: F401
from lorafleet.scheduler.records import JobState
from lorafleet.scheduler.store import IllegalTransition
from test_fencing import files_of, run_until_gone, start_on, submit, world  # noqa: F401


def test_a_paused_job_resumed_on_another_executor_ends_as_if_never_paused(store, world, single_torch_thread):
    tenant, model, _, a, b = world
    straight, paused = (submit(store, tenant, model, max_steps=6) for _ in range(2))
    start_on(store, a, straight)
    run_until_gone(a, straight)

    start_on(store, a, paused)
    for _ in range(3):
        a.train_step()
    asked = store.pause(tenant.name, paused)
    assert asked["state"] == "running" and asked["pause_requested"], "a running job pauses at its next step boundary"
    a.sync_assignments()
    job = store.job(paused)
    assert job.state == JobState.PAUSED and job.step == 3 and job.checkpoint_uri is not None
    assert paused not in a.leases and paused not in store.queued_ids(), "it left the cohort and is not queued"
    assert paused not in store.holding(a.executor_id)[1] and paused not in store.executor_view(a.executor_id).pauses
    with pytest.raises(IllegalTransition, match="not paused"):
        store.resume(tenant.name, straight)

    assert store.resume(tenant.name, paused)["state"] == "queued"
    start_on(store, b, paused)
    run_until_gone(b, paused)
    done, reference = store.job(paused), store.job(straight)
    assert done.state == JobState.SUCCEEDED and done.step == reference.step == 6
    assert files_of(done.adapter_uri) == files_of(reference.adapter_uri), "bit for bit the uninterrupted result"
    assert done.metrics["trained_tokens"] == reference.metrics["trained_tokens"] > 0, "counted across the pause"
    types = [e["type"] for e in store.events(paused, limit=1000)]
    assert "pause_requested" in types and types.count("checkpoint") >= 1


def test_a_queued_job_pauses_at_once_and_a_paused_job_can_be_cancelled(store, world):
    tenant, model, _, _, _ = world
    job_id = submit(store, tenant, model)
    assert store.pause(tenant.name, job_id)["state"] == "paused"
    assert job_id not in store.queued_ids()
    assert store.pause(tenant.name, job_id)["state"] == "paused", "pausing twice is a no-op"
    assert store.counts(tenant.name)["paused"] == 1 and store.counts(tenant.name)["queued"] == 0
    assert store.cancel(tenant.name, job_id)["state"] == "cancelled"
    with pytest.raises(IllegalTransition, match="cannot be paused"):
        store.pause(tenant.name, job_id)


def test_a_job_handed_back_while_a_pause_is_asked_ends_paused_not_queued(store, world):
    """If its executor dies (or drains) before it paused the job, the hand-back honours the pause."""
    tenant, model, _, a, _ = world
    job_id = submit(store, tenant, model)
    start_on(store, a, job_id)
    store.pause(tenant.name, job_id)
    job = store.job(job_id)
    assert store.requeue(job_id, JobState.RUNNING, "executor lost", attempt=job.attempt, executor_id=a.executor_id,
                         executor_died=True)
    assert store.job(job_id).state == JobState.PAUSED and job_id not in store.queued_ids()
    assert job_id not in store.executor_view(a.executor_id).pauses


def test_another_tenants_job_cannot_be_paused_or_resumed(store, world, make_tenant):
    tenant, model, _, _, _ = world
    job_id = submit(store, tenant, model)
    other = make_tenant()
    for verb in (store.pause, store.resume):
        with pytest.raises(LookupError, match="no job"):
            verb(other.name, job_id)
    assert store.job(job_id).state == JobState.QUEUED
