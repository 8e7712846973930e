"""`/v1/models` as a tenant meets it: a real gateway process on a real Valkey, the real `openai` client. The jobs
are moved through the store's own verbs (tests/test_generation_store.py's `trained_job`)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from test_gateway import client, gateway  # noqa: F401  (gateway: the fixture)
from test_generation_store import trained_job
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.catalogue import BASE_OWNER
from lorafleet.scheduler.files import FileLimits, FileStore
from lorafleet.scheduler.generation import checkpoint_model_name, fine_tuned_model_name
from lorafleet.scheduler.results import JobResults

CACHED_BASE = "test-org/tiny-model"  # tests/conftest.py's hf_cache


def test_a_tenant_lists_its_succeeded_models_newest_first_and_the_bases_never_another_tenants(
        gateway, store, make_tenant, base_model_dir):
    owner, other = make_tenant(), make_tenant()
    older = trained_job(store, owner.name, base_model_dir)
    newer = trained_job(store, owner.name, base_model_dir)
    running = trained_job(store, owner.name, base_model_dir, state="running")
    foreign = trained_job(store, other.name, base_model_dir)
    listed = client(gateway, owner.token).models.list().data
    owned = [model.id for model in listed if model.owned_by == owner.name]
    assert owned == [fine_tuned_model_name(newer), fine_tuned_model_name(older)]
    assert fine_tuned_model_name(running) not in owned
    assert all(model.owned_by in (owner.name, BASE_OWNER) for model in listed)
    assert fine_tuned_model_name(foreign) not in [model.id for model in listed]
    bases = {model.id: model for model in listed if model.owned_by == BASE_OWNER}
    assert CACHED_BASE in bases and str(base_model_dir) in bases
    assert [model.object for model in listed] == ["model"] * len(listed)
    assert next(m for m in listed if m.id == fine_tuned_model_name(newer)).created == int(newer.finished_at)


def test_a_model_is_retrieved_by_any_name_a_completion_takes(gateway, store, make_tenant, base_model_dir):
    tenant = make_tenant()
    record = trained_job(store, tenant.name, base_model_dir, checkpoints=(10,))
    api = client(gateway, tenant.token)
    fine_tuned = api.models.retrieve(fine_tuned_model_name(record))
    assert (fine_tuned.id, fine_tuned.owned_by, fine_tuned.created) == (
        fine_tuned_model_name(record), tenant.name, int(record.finished_at))
    checkpoint = api.models.retrieve(checkpoint_model_name(record, 10))
    assert checkpoint.id == checkpoint_model_name(record, 10) and checkpoint.owned_by == tenant.name
    assert int(record.submitted_at) <= checkpoint.created <= int(record.finished_at)
    for base in (CACHED_BASE, str(base_model_dir)):  # slashes: the client sends them as %2F
        retrieved = api.models.retrieve(base)
        assert (retrieved.id, retrieved.owned_by) == (base, BASE_OWNER)


def test_another_tenants_model_is_not_found_as_a_model_that_does_not_exist(gateway, store, make_tenant,
                                                                          base_model_dir):
    owner, other = make_tenant(), make_tenant()
    name = fine_tuned_model_name(trained_job(store, owner.name, base_model_dir, checkpoints=(10,)))
    api = client(gateway, other.token)
    for model in (name, name + ":ckpt-step-10", "ft:tiny:nobody:bot:job-0123456789abcdef", "test-org/no-such"):
        with pytest.raises(openai.NotFoundError) as refused:
            api.models.retrieve(model)
        assert refused.value.code == "model_not_found" and refused.value.param == "model"
        assert f"the model {model!r} does not exist or you do not have access to it" in refused.value.message


def test_a_path_outside_the_model_roots_is_not_found_without_saying_whether_it_exists(gateway, make_tenant):
    api = client(gateway, make_tenant().token)
    for path in ("/etc", "/no/such/dir", "../../etc"):
        with pytest.raises(openai.NotFoundError) as refused:
            api.models.retrieve(path)
        assert "does not exist or you do not have access to it" in refused.value.message
        assert "model roots" not in refused.value.message


def test_a_model_not_ready_yet_is_not_found_saying_why(gateway, store, make_tenant, base_model_dir):
    tenant = make_tenant()
    running = trained_job(store, tenant.name, base_model_dir, state="running", checkpoints=(10,))
    api = client(gateway, tenant.token)
    with pytest.raises(openai.NotFoundError) as refused:
        api.models.retrieve(fine_tuned_model_name(running))
    assert f"is not ready: job {running.job_id} is running" in refused.value.message
    with pytest.raises(openai.NotFoundError) as refused:
        api.models.retrieve(checkpoint_model_name(running, 20))
    assert "keeps no checkpoint at step 20 (kept: 10)" in refused.value.message
    assert api.models.retrieve(checkpoint_model_name(running, 10)).owned_by == tenant.name


def test_a_name_no_path_can_hold_is_not_found(gateway, make_tenant):
    api = client(gateway, make_tenant().token)
    for name in ("/a\x00b", "org/\x00", "ft:\x00"):
        with pytest.raises(openai.NotFoundError):
            api.models.retrieve(name)


def published_job(store, tenant, base_model_dir, artifact_root: Path):
    """A succeeded job whose adapter is a real directory in the gateway's artifact store, with a kept checkpoint."""
    running = trained_job(store, tenant.name, base_model_dir, state="running", checkpoints=(10,))
    local = artifact_root.parent / f"adapter-{running.job_id}"
    local.mkdir()
    (local / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    uri = ArtifactStore(str(artifact_root)).publish(local, tenant.name, running.job_id, running.attempt, "adapter")
    assert store.succeed(running.job_id, uri, running.attempt, "exec-test")
    return store.job(running.job_id)


def test_a_deleted_fine_tuned_model_is_gone_everywhere_and_its_job_and_checkpoints_stay(
        gateway, store, make_tenant, base_model_dir, worker_env):
    tenant = make_tenant()
    record = published_job(store, tenant, base_model_dir, Path(worker_env["LORAFLEET_STATE_DIR"]) / "artifacts")
    name = fine_tuned_model_name(record)
    api = client(gateway, tenant.token)
    result_file = api.fine_tuning.jobs.retrieve(record.job_id).result_files[0]
    assert api.files.content(result_file).content  # packed and downloadable before

    deleted = api.models.delete(name)
    assert (deleted.id, deleted.deleted, deleted.object) == (name, True, "model")
    assert not Path(record.adapter_uri).exists()
    with pytest.raises(openai.NotFoundError) as gone:
        api.models.retrieve(name)
    assert "was deleted" in gone.value.message
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model=name, prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(result_file)
    with pytest.raises(openai.NotFoundError):
        api.models.delete(name)  # once
    assert name not in [model.id for model in api.models.list().data]
    job = api.fine_tuning.jobs.retrieve(record.job_id)
    assert job.status == "succeeded" and job.fine_tuned_model == name and job.result_files == []
    assert "Fine-tuned model deleted" in [event.message for event in api.fine_tuning.jobs.list_events(record.job_id)]
    assert api.models.retrieve(checkpoint_model_name(record, 10)).owned_by == tenant.name


def test_only_the_owner_deletes_and_only_a_fine_tuned_model(gateway, store, make_tenant, base_model_dir, worker_env):
    owner, other = make_tenant(), make_tenant()
    record = published_job(store, owner, base_model_dir, Path(worker_env["LORAFLEET_STATE_DIR"]) / "artifacts")
    name = fine_tuned_model_name(record)
    with pytest.raises(openai.NotFoundError) as foreign:
        client(gateway, other.token).models.delete(name)
    assert "does not exist or you do not have access to it" in foreign.value.message
    api = client(gateway, owner.token)
    assert api.models.retrieve(name).id == name and Path(record.adapter_uri).is_dir()
    for model, words in ((CACHED_BASE, "is a base model"), (checkpoint_model_name(record, 10), "is a checkpoint")):
        with pytest.raises(openai.BadRequestError) as refused:
            api.models.delete(model)
        assert words in refused.value.message and refused.value.param == "model"
    running = trained_job(store, owner.name, base_model_dir, state="running")
    with pytest.raises(openai.NotFoundError) as not_ready:
        api.models.delete(fine_tuned_model_name(running))
    assert "is not ready" in not_ready.value.message
    assert api.models.retrieve(name).id == name  # none of the refusals touched it


def test_celery_tenants_list_and_delete_their_models_as_the_gateway_does(call, store, make_tenant, base_model_dir,
                                                                         worker_env):
    owner, other = make_tenant(), make_tenant()
    record = published_job(store, owner, base_model_dir, Path(worker_env["LORAFLEET_STATE_DIR"]) / "artifacts")
    name = fine_tuned_model_name(record)
    listed = call("lorafleet.list_models", owner.token)
    assert {"id": name, "created": int(record.finished_at), "owned_by": owner.name} in listed
    assert next(m for m in listed if m["id"] == CACHED_BASE)["owned_by"] == BASE_OWNER
    assert name not in [model["id"] for model in call("lorafleet.list_models", other.token)]
    with pytest.raises(LookupError):
        call("lorafleet.delete_model", other.token, name)
    with pytest.raises(ValueError, match="is a base model"):
        call("lorafleet.delete_model", owner.token, CACHED_BASE)
    assert call("lorafleet.delete_model", owner.token, name) == {"id": name, "deleted": True}
    assert not Path(record.adapter_uri).exists()
    assert name not in [model["id"] for model in call("lorafleet.list_models", owner.token)]


def test_a_delete_that_failed_after_marking_the_model_removes_its_files_when_retried(store, make_tenant,
                                                                                     base_model_dir, tmp_path):
    tenant = make_tenant()
    root = tmp_path / "artifacts"
    record = published_job(store, tenant, base_model_dir, root)
    files = FileStore(store.r, tmp_path / "datasets", FileLimits.from_env())
    results = JobResults(store, files, ArtifactStore(str(root)))
    packed = results.adapter_file(record)
    store.delete_model(tenant.name, record.job_id)  # a delete whose process died before it removed the files
    assert Path(record.adapter_uri).is_dir()
    with pytest.raises(LookupError, match="was deleted"):
        results.delete_model(tenant.name, record.job_id)
    assert not Path(record.adapter_uri).exists()
    with pytest.raises(LookupError):
        files.get(tenant.name, packed.file_id)
