"""The Celery submission API end to end: a real redis-server and a real Celery worker subprocess."""

from __future__ import annotations

import time

import pytest

from lorafleet.scheduler import keys
from lorafleet.scheduler.client import LorafleetClient


def spec_for(tenant, base_model_dir, **overrides) -> dict:
    spec = {"base_model": str(base_model_dir), "dataset": tenant.dataset, "hyperparameters": {"max_steps": 5}}
    spec.update(overrides)
    return spec


def test_every_task_round_trips_through_the_worker(call, make_tenant, base_model_dir):
    alice = make_tenant("alice")
    submitted = call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir, name="first", priority=7))
    job_id = submitted["job_id"]
    assert submitted["state"] == "queued" and submitted["tenant"] == alice.name
    assert submitted["spec"]["priority"] == 7 and submitted["spec"]["hyperparameters"]["max_steps"] == 5

    job = call("lorafleet.get_job", alice.token, job_id)
    assert job["job_id"] == job_id and job["name"] == "first"
    assert job["progress"] == {"step": 0, "total_steps": 0} and job["metrics"] == {}
    assert job["adapter_uri"] is None and job["error"] is None and job["submitted_at"] > 0

    listed = call("lorafleet.list_jobs", alice.token)
    assert [j["job_id"] for j in listed] == [job_id]
    assert call("lorafleet.list_jobs", alice.token, "running", 10) == []

    events = call("lorafleet.job_events", alice.token, job_id)
    assert [(e["type"], e["from"], e["to"]) for e in events] == [("state", None, "queued")]

    cancelled = call("lorafleet.cancel_job", alice.token, job_id)
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"] is not None
    assert cancelled["cancel_requested"] is False  # it never reached an executor
    later = call("lorafleet.job_events", alice.token, job_id, events[0]["id"])
    assert [(e["from"], e["to"]) for e in later] == [("queued", "cancelled")]


def test_executor_progress_and_result_are_visible_to_the_tenant(call, store, make_tenant, base_model_dir):
    alice = make_tenant("alice")
    job_id = call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir))["job_id"]
    attempt = store.claim(job_id, "executor-0")
    assert store.transition(job_id, "scheduled", "running", attempt=attempt)
    assert store.record_progress(job_id, 3, 5, {"loss": 2.5, "tokens_per_s": 1234.0}, attempt=attempt)
    job = call("lorafleet.get_job", alice.token, job_id)
    assert job["state"] == "running" and job["progress"] == {"step": 3, "total_steps": 5}
    assert job["metrics"] == {"loss": 2.5, "tokens_per_s": 1234.0} and job["executor_id"] == "executor-0"
    assert store.succeed(job_id, "file:///artifacts/adapter", attempt)
    job = call("lorafleet.get_job", alice.token, job_id)
    assert job["state"] == "succeeded" and job["adapter_uri"] == "file:///artifacts/adapter"
    types = [(e["type"], e.get("to"), e.get("loss")) for e in call("lorafleet.job_events", alice.token, job_id)]
    assert types == [
        ("state", "queued", None), ("state", "scheduled", None), ("state", "running", None),
        ("progress", None, 2.5), ("state", "succeeded", None),
    ]


@pytest.mark.parametrize("token", [None, "", "lft_not-a-real-token", 12345])
def test_bad_or_missing_token_is_permission_error(call, store, token, make_tenant, base_model_dir):
    alice = make_tenant("alice")
    for task, args in [
        ("lorafleet.submit_job", [spec_for(alice, base_model_dir)]),
        ("lorafleet.get_job", ["job-0000000000000000"]),
        ("lorafleet.list_jobs", []),
        ("lorafleet.cancel_job", ["job-0000000000000000"]),
        ("lorafleet.job_events", ["job-0000000000000000"]),
    ]:
        with pytest.raises(PermissionError, match="token"):
            call(task, token, *args)
    assert store.counts(alice.name) == dict.fromkeys(keys.JOB_STATES, 0)


def test_disabled_tenant_and_rotated_token_are_refused(call, store, make_tenant, base_model_dir):
    alice = make_tenant("alice")
    new_token = store.rotate_token(alice.name)
    with pytest.raises(PermissionError, match="invalid token"):
        call("lorafleet.list_jobs", alice.token)
    assert call("lorafleet.list_jobs", new_token) == []
    store.set_disabled(alice.name)
    with pytest.raises(PermissionError, match="disabled"):
        call("lorafleet.submit_job", new_token, spec_for(alice, base_model_dir))


def test_invalid_spec_is_value_error_naming_the_field(call, store, make_tenant, base_model_dir):
    alice = make_tenant("alice")
    with pytest.raises(ValueError, match=r"adapter\.r"):
        call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir, adapter={"r": 0}))
    with pytest.raises(ValueError, match="limit"):
        call("lorafleet.list_jobs", alice.token, None, 0)
    with pytest.raises(ValueError, match="state"):
        call("lorafleet.list_jobs", alice.token, "sleeping")
    assert store.counts(alice.name) == dict.fromkeys(keys.JOB_STATES, 0)


def test_unknown_and_foreign_jobs_look_the_same(call, make_tenant, base_model_dir):
    alice, bob = make_tenant("alice"), make_tenant("bob")
    alice_job = call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir))["job_id"]
    unknown_job = "job-" + "f" * 16
    for task in ("lorafleet.get_job", "lorafleet.cancel_job", "lorafleet.job_events"):
        with pytest.raises(LookupError) as foreign:
            call(task, bob.token, alice_job)
        with pytest.raises(LookupError) as unknown:
            call(task, bob.token, unknown_job)
        assert type(foreign.value) is type(unknown.value)
        assert str(foreign.value).replace(alice_job, "ID") == str(unknown.value).replace(unknown_job, "ID")
    for other_key in (alice_job + ":events", "tenant:" + alice.name):  # ids that would name other keys
        with pytest.raises(LookupError):
            call("lorafleet.get_job", bob.token, other_key)
    assert call("lorafleet.list_jobs", bob.token) == []
    assert call("lorafleet.get_job", alice.token, alice_job)["state"] == "queued"  # bob's cancel did nothing


def test_max_queued_quota(call, store, make_tenant, base_model_dir):
    alice = make_tenant("alice", max_queued=2, max_running=1)
    first = call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir))
    call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir))
    with pytest.raises(ValueError, match="quota exceeded.*max_queued is 2"):
        call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir))
    assert store.counts(alice.name)["queued"] == 2 and len(call("lorafleet.list_jobs", alice.token)) == 2
    call("lorafleet.cancel_job", alice.token, first["job_id"])
    call("lorafleet.submit_job", alice.token, spec_for(alice, base_model_dir))
    assert store.get_tenant(alice.name)["max_running"] == 1


def test_typed_client(redis_url, celery_app, make_tenant, base_model_dir):
    alice = make_tenant("alice")
    client = LorafleetClient(redis_url, alice.token, tenant=alice.name)
    try:
        job = client.submit(spec_for(alice, base_model_dir))
        assert client.get(job["job_id"])["state"] == "queued"
        assert [j["job_id"] for j in client.list(state="queued")] == [job["job_id"]]
        assert client.cancel(job["job_id"])["state"] == "cancelled"
        assert [e["to"] for e in client.events(job["job_id"])] == ["queued", "cancelled"]
        with pytest.raises(LookupError):
            client.get("job-0000000000000000")
    finally:
        client.close()


def test_worker_refuses_pickle(celery_app, tenant_app, make_tenant):
    alice = make_tenant("alice")
    tenant_app(alice.name).send_task("lorafleet.list_jobs", args=[alice.token], serializer="pickle")
    deadline = time.monotonic() + 20
    while "content type 'application/x-python-serialize' is not application/json" not in celery_app.worker_log.read_text():
        assert time.monotonic() < deadline, "the worker did not refuse a pickle message"
        time.sleep(0.1)
    assert tenant_app(alice.name).send_task("lorafleet.list_jobs", args=[alice.token]).get(timeout=30) == []


def test_celery_tenants_list_jobs_by_metadata_as_the_gateway_filters_them(call, make_tenant, base_model_dir):
    tenant = make_tenant()
    tags = [{"team": "search", "run": "a"}, {"team": "ads"}, {}, {"team": "search", "run": "b"}]
    ids = [call("lorafleet.submit_job", tenant.token, spec_for(tenant, base_model_dir, metadata=tag))["job_id"]
           for tag in tags]
    search = call("lorafleet.list_jobs", tenant.token, None, 100, {"team": "search"})
    assert [job["job_id"] for job in search] == [ids[3], ids[0]]
    assert [j["job_id"] for j in call("lorafleet.list_jobs", tenant.token, None, 1, {"team": "search"})] == [ids[3]]
    assert call("lorafleet.list_jobs", tenant.token, "running", 100, {"team": "search"}) == []
    call("lorafleet.cancel_job", tenant.token, ids[0])
    cancelled = call("lorafleet.list_jobs", tenant.token, "cancelled", 100, {"run": "a"})
    assert [job["job_id"] for job in cancelled] == [ids[0]]
    with pytest.raises(ValueError, match="metadata: an object of strings to strings"):
        call("lorafleet.list_jobs", tenant.token, None, 100, {"team": 3})
