"""`/v1/files` as a tenant meets it: the real `openai` client against a real `lorafleet gateway` process on a real
Valkey (test_gateway's `gateway` fixture, with small file limits: `FILE_LIMITS`). A job's results are files too: the
job here is moved by the store's executor verbs (`claim`, `start`, `record_checkpoint`, `succeed`) onto real adapter
directories; test_gateway's slow end-to-end test trains one for real."""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from pathlib import Path

import openai
import pytest

from test_gateway import FILE_LIMITS, client, create, gateway  # noqa: F401  (gateway: the fixture)

EXECUTOR = "files-exec"


def alpaca_jsonl(count: int, width: int = 10, tag: str = "") -> bytes:
    """Records unlike test_files' (blobs are shared by content across the session's Valkey, not by directory)."""
    return b"".join(json.dumps({"instruction": f"gateway task {tag}{i}", "output": "x" * width}).encode() + b"\n"
                    for i in range(count))


def upload(api: openai.OpenAI, directory: Path, data: bytes, name: str = "train.jsonl"):
    path = directory / f"{secrets.token_hex(4)}-{name}"
    path.write_bytes(data)
    with open(path, "rb") as source:
        return api.files.create(file=(name, source), purpose="fine-tune")


def untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


def adapter_dir(directory: Path, seed: int) -> tuple[Path, dict[str, bytes]]:
    """A directory shaped like a published PEFT adapter, with random weights."""
    contents = {"adapter_config.json": json.dumps({"r": 4, "seed": seed}).encode(),
                "adapter_model.safetensors": secrets.token_bytes(3000)}
    directory.mkdir(parents=True)
    for name, data in contents.items():
        (directory / name).write_bytes(data)
    return directory, contents


def test_an_uploaded_file_is_retrieved_read_back_and_deleted(gateway, make_tenant, tmp_path):
    api = client(gateway, make_tenant().token)
    data = alpaca_jsonl(40)

    made = upload(api, tmp_path, data)

    assert (made.object, made.bytes, made.filename, made.purpose, made.status) == (
        "file", len(data), "train.jsonl", "fine-tune", "processed")
    assert made.id.startswith("file-") and made.created_at > 0
    assert api.files.retrieve(made.id).model_dump() == made.model_dump()
    content = api.files.content(made.id)
    assert content.content == data
    assert content.response.headers["content-disposition"] == "attachment; filename*=UTF-8''train.jsonl"
    deleted = api.files.delete(made.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (made.id, "file", True)
    with pytest.raises(openai.NotFoundError):
        api.files.retrieve(made.id)
    assert api.files.list().data == []


def test_the_same_bytes_uploaded_again_are_the_same_file(gateway, make_tenant, tmp_path):
    api = client(gateway, make_tenant().token)
    first = upload(api, tmp_path, alpaca_jsonl(5))
    assert upload(api, tmp_path, alpaca_jsonl(5), name="again.jsonl").id == first.id
    assert [f.id for f in api.files.list()] == [first.id]


def test_files_are_listed_newest_first_a_page_at_a_time(gateway, make_tenant, tmp_path):
    api = client(gateway, make_tenant().token)
    made = [upload(api, tmp_path, alpaca_jsonl(3, tag=str(n))).id for n in range(3)]

    first = api.files.list(limit=2)
    assert [f.id for f in first.data] == made[::-1][:2] and first.has_more
    second = api.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in second.data] == made[:1] and not second.has_more
    assert [f.id for f in api.files.list(limit=2)] == made[::-1], "the client pages on its own"
    assert [f.id for f in api.files.list(purpose="fine-tune-results")] == []
    with pytest.raises(openai.BadRequestError) as refused:
        api.files.list(after="file-" + "0" * 24)
    assert refused.value.param == "after"


def test_a_bad_line_is_refused_naming_its_line_and_leaves_no_file(gateway, make_tenant, tmp_path):
    api = client(gateway, make_tenant().token)
    with pytest.raises(openai.BadRequestError) as refused:
        upload(api, tmp_path, alpaca_jsonl(2) + b'{"instruction": "a", "output": \n' + alpaca_jsonl(2))
    assert "line 3: invalid JSON" in refused.value.message and refused.value.param == "file"
    with pytest.raises(openai.BadRequestError) as refused:
        api.files.create(file=("a.jsonl", alpaca_jsonl(1)), purpose="batch")
    assert refused.value.param == "purpose"
    assert api.files.list().data == []


def test_a_file_over_the_size_cap_is_refused_with_413(gateway, make_tenant, tmp_path):
    api = client(gateway, make_tenant().token)
    cap = int(FILE_LIMITS["LORAFLEET_MAX_DATASET_BYTES"])
    data = alpaca_jsonl(cap // 40 + 100, width=20)
    assert len(data) > cap
    with pytest.raises(openai.APIStatusError) as refused:
        upload(api, tmp_path, data)
    assert refused.value.status_code == 413 and f"larger than the limit of {cap} bytes" in refused.value.message
    assert api.files.list().data == []


def test_a_tenant_over_its_file_quota_gets_429_until_it_deletes_one(gateway, make_tenant, tmp_path):
    api = client(gateway, make_tenant().token)
    quota = int(FILE_LIMITS["LORAFLEET_FILE_QUOTA_COUNT"])
    made = [upload(api, tmp_path, alpaca_jsonl(2, tag=str(n))) for n in range(quota)]
    with pytest.raises(openai.RateLimitError) as refused:
        upload(api, tmp_path, alpaca_jsonl(2, tag="over"))
    assert f"the quota is {quota}" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false"
    api.files.delete(made[0].id)
    assert upload(api, tmp_path, alpaca_jsonl(2, tag="over")).bytes > 0


def test_a_file_of_another_tenant_is_not_found_like_an_unknown_one(gateway, make_tenant, tmp_path):
    owner, other = make_tenant(), make_tenant()
    made = upload(client(gateway, owner.token), tmp_path, alpaca_jsonl(4))
    stranger = client(gateway, other.token)
    unknown = "file-" + secrets.token_hex(12)

    def refusal(call, file_id: str, error=openai.NotFoundError) -> dict:
        with pytest.raises(error) as refused:
            call(file_id)
        return {**refused.value.body, "message": refused.value.message.replace(file_id, "<id>")}

    for call in (stranger.files.retrieve, stranger.files.content, stranger.files.delete):
        assert refusal(call, made.id) == refusal(call, unknown)
    as_training_file = [refusal(lambda file_id: create(stranger, file_id), file_id, openai.BadRequestError)
                        for file_id in (made.id, unknown)]
    assert as_training_file[0] == as_training_file[1] and as_training_file[0]["param"] == "training_file"
    assert "no file '<id>'" in as_training_file[0]["message"]
    assert client(gateway, owner.token).files.content(made.id).content == alpaca_jsonl(4), "untouched"


def test_a_job_trains_on_uploaded_files_named_by_their_ids(gateway, make_tenant, tmp_path, store):
    api = client(gateway, make_tenant().token)
    train, valid = upload(api, tmp_path, alpaca_jsonl(6)), upload(api, tmp_path, alpaca_jsonl(2, tag="v"))
    job = create(api, train.id, validation_file=valid.id)
    assert (job.status, job.training_file, job.validation_file) == ("queued", train.id, valid.id)
    accepted = store.accepted_datasets(job.id)
    assert (accepted["dataset"].uri, accepted["validation_dataset"].uri) == (train.id, valid.id)


def test_a_succeeded_jobs_adapter_and_checkpoints_download_as_files(gateway, make_tenant, store, tmp_path):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset)
    checkpoint, checkpoint_contents = adapter_dir(tmp_path / f"{job.id}/checkpoint-2-{secrets.token_hex(4)}", 1)
    adapter, adapter_contents = adapter_dir(tmp_path / f"{job.id}/adapter-{secrets.token_hex(4)}", 2)
    attempt = store.claim(job.id, EXECUTOR)
    assert store.start(job.id, attempt, EXECUTOR)
    assert store.record_checkpoint(job.id, str(checkpoint), attempt, EXECUTOR, step=2) is not None
    assert api.fine_tuning.jobs.retrieve(job.id).result_files == [], "no result before it succeeds"
    assert store.succeed(job.id, str(adapter), attempt, EXECUTOR)

    done = api.fine_tuning.jobs.retrieve(job.id)
    (result_id,) = done.result_files
    assert api.fine_tuning.jobs.retrieve(job.id).result_files == [result_id], "packed once, the same file after"
    result = api.files.retrieve(result_id)
    assert (result.filename, result.purpose) == (f"{job.id}-adapter.tar", "fine-tune-results")
    data = api.files.content(result_id).content
    assert untar(data) == adapter_contents and len(data) == result.bytes
    (listed,) = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert listed.step_number == 2 and untar(api.files.content(listed.file_id).content) == checkpoint_contents
    assert {f.id for f in api.files.list(purpose="fine-tune-results")} == {result_id, listed.file_id}
    with pytest.raises(openai.NotFoundError):
        client(gateway, make_tenant().token).files.content(result_id)
