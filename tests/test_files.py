"""Tenants' files (`scheduler.files`) against a real Valkey/Redis, and the Celery file tasks through the real worker."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import tarfile
import threading
import time
from pathlib import Path

import pytest
from celery import Celery

from lorafleet.scheduler import broker, keys
from lorafleet.scheduler.datasets import accepted_path
from lorafleet.scheduler.files import (
    MAX_PART_BYTES, ORPHAN_GRACE_SECONDS, RESULT_PURPOSE, FileError, FileLimits, FileQuotaExceeded, FileStore,
    FileTooLarge,
)
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.spec import SpecError, parse_spec
from lorafleet.scheduler.store import QuotaExceeded

KIB = 1024


def alpaca_lines(count: int, width: int = 10) -> bytes:
    return b"".join(json.dumps({"instruction": f"task {i}", "output": "x" * width}).encode() + b"\n"
                    for i in range(count))


def pieces(data: bytes, size: int = 7):
    """`data` in small chunks, so lines are split across them."""
    return (data[i:i + size] for i in range(0, len(data), size))


def leftovers(directory: Path) -> list[str]:
    """Temporary files of uploads (none may outlive a refused one)."""
    return sorted(p.name for p in directory.rglob(".receiving-*")) + sorted(
        p.name for p in directory.rglob("*.part"))


@pytest.fixture
def make_files(store, tmp_path):
    def make(max_file_bytes: int = 1 << 20, quota_bytes: int = 1 << 22, quota_count: int = 10) -> FileStore:
        return FileStore(store.r, tmp_path / "datasets", FileLimits(max_file_bytes, quota_bytes, quota_count))
    return make


@pytest.fixture
def files(make_files) -> FileStore:
    return make_files()


def tenant_name() -> str:
    return f"f-{secrets.token_hex(4)}"


def test_an_upload_is_validated_counted_and_stored_under_its_digest(files):
    tenant = tenant_name()
    data = alpaca_lines(3) + b"\n   \n" + alpaca_lines(2)

    record = files.upload(tenant, "train.jsonl", "fine-tune", pieces(data))

    assert (record.tenant, record.filename, record.records, record.format, record.kind, record.bytes) == (
        tenant, "train.jsonl", 5, "alpaca", "dataset", len(data))
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert accepted_path(files.dir, record.sha256).read_bytes() == data
    assert record.to_openai() == {"id": record.file_id, "object": "file", "bytes": len(data),
                                  "created_at": record.created_at, "filename": "train.jsonl",
                                  "purpose": "fine-tune", "status": "processed"}
    assert files.get(tenant, record.file_id) == record
    with files.open(tenant, record.file_id) as source:
        assert source.read() == data
    assert files.usage(tenant) == (len(data), 1)
    assert leftovers(files.dir) == []


@pytest.mark.parametrize("data, message", [
    (alpaca_lines(2) + b'{"instruction": "a", "output": \n', "line 3: invalid JSON"),
    (alpaca_lines(1) + b'{"prompt": "a"}\n', "line 2: unknown format"),
    (alpaca_lines(1) + b'\n{"text": "a"}\n', "line 3: the record is in text format, but the dataset is alpaca"),
    (b'[1, 2]\n', "line 1: expected a JSON object, got array"),
    (alpaca_lines(1) + b'{"text": "\xff"}', "line 2: not valid UTF-8"),
    (b"\n \n", "no records"),
])
def test_a_bad_line_is_refused_naming_its_line_and_leaves_nothing(files, data, message):
    tenant = tenant_name()
    with pytest.raises(FileError) as excinfo:
        files.upload(tenant, "bad.jsonl", "fine-tune", pieces(data))
    assert message in str(excinfo.value) and excinfo.value.param == "file"
    assert files.list(tenant) == [] and files.usage(tenant) == (0, 0)
    assert leftovers(files.dir) == []


def test_a_line_over_the_record_limit_is_refused_while_it_streams(files, monkeypatch):
    monkeypatch.setenv("LORAFLEET_MAX_RECORD_BYTES", "100")
    data = alpaca_lines(2) + b'{"text": "' + b"a" * 200 + b'"}\n'
    with pytest.raises(FileError, match="line 3 is longer than the limit of 100 bytes"):
        files.upload(tenant_name(), "long.jsonl", "fine-tune", pieces(data))


def test_the_size_cap_stops_the_stream_and_leaves_nothing_on_disk(make_files):
    files = make_files(max_file_bytes=10 * KIB)
    pulled = 0

    def endless():
        nonlocal pulled
        line = json.dumps({"text": "y" * 1000}).encode() + b"\n"
        while True:
            pulled += 1
            yield line

    with pytest.raises(FileTooLarge, match="larger than the limit of 10240 bytes"):
        files.upload(tenant_name(), "huge.jsonl", "fine-tune", endless())
    assert pulled <= 11, "the stream is stopped as soon as it passes the cap"
    assert leftovers(files.dir) == [] and not list(files.dir.glob("*.jsonl"))


def test_the_count_and_byte_quotas_refuse_and_deleting_frees_them(make_files):
    files, tenant = make_files(quota_bytes=2000, quota_count=2), tenant_name()
    first = files.upload(tenant, "a.jsonl", "fine-tune", [alpaca_lines(5)])
    files.upload(tenant, "b.jsonl", "fine-tune", [alpaca_lines(6)])
    with pytest.raises(FileQuotaExceeded, match="you have 2 files, the quota is 2") as excinfo:
        files.upload(tenant, "c.jsonl", "fine-tune", [alpaca_lines(7)])
    assert isinstance(excinfo.value, QuotaExceeded), "the gateway answers a store QuotaExceeded with 429"

    files.delete(tenant, first.file_id)
    assert files.usage(tenant) == (len(alpaca_lines(6)), 1)
    with pytest.raises(FileQuotaExceeded, match="quota of 2000 bytes"):
        files.upload(tenant, "big.jsonl", "fine-tune", pieces(alpaca_lines(40)))
    assert files.upload(tenant, "c.jsonl", "fine-tune", [alpaca_lines(7)]).records == 7
    assert leftovers(files.dir) == []


def test_two_uploads_racing_for_the_last_slot_cannot_both_pass(make_files):
    files, tenant = make_files(quota_count=1), tenant_name()
    both_streaming = threading.Barrier(2, timeout=10)
    outcomes: list[object] = []

    def upload(n: int) -> None:
        def chunks():
            yield alpaca_lines(n)
            both_streaming.wait()  # both have passed the early quota check; only the atomic one is left
            yield alpaca_lines(1)
        try:
            outcomes.append(files.upload(tenant, f"{n}.jsonl", "fine-tune", chunks()))
        except FileQuotaExceeded as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=upload, args=(n,)) for n in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    made = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(made) == 1 and len(outcomes) == 2
    assert files.usage(tenant) == (made[0].bytes, 1)
    assert [r.file_id for r in files.list(tenant)] == [made[0].file_id]
    assert leftovers(files.dir) == []


def test_the_same_bytes_uploaded_twice_are_one_file(files):
    tenant = tenant_name()
    first = files.upload(tenant, "a.jsonl", "fine-tune", [alpaca_lines(3)])
    again = files.upload(tenant, "renamed.jsonl", "fine-tune", pieces(alpaca_lines(3)))
    assert again == first and files.usage(tenant) == (first.bytes, 1)


def test_a_file_of_another_tenant_is_not_found_like_an_unknown_id(files):
    owner, other = tenant_name(), tenant_name()
    record = files.upload(owner, "a.jsonl", "fine-tune", [alpaca_lines(2)])
    unknown = "file-" + secrets.token_hex(12)

    def refusal(action, file_id, error=LookupError) -> str:
        with pytest.raises(error) as excinfo:
            action(other, file_id)
        return str(excinfo.value).replace(file_id, "<id>")

    for action in (files.get, files.open, files.delete, lambda t, f: files.read_chunk(t, f, 0, 10)):
        assert refusal(action, record.file_id) == refusal(action, unknown) == "no file '<id>'"
    assert refusal(files.accepted, record.file_id, SpecError) == refusal(files.accepted, unknown, SpecError) == (
        "invalid job spec: dataset: no file '<id>'")
    assert files.get(owner, record.file_id) == record, "the owner's file is untouched"


def test_bytes_go_when_no_file_names_them_after_the_grace_period(files):
    one, two = tenant_name(), tenant_name()
    data = alpaca_lines(4)
    mine, theirs = (files.upload(t, "same.jsonl", "fine-tune", [data]) for t in (one, two))
    path = accepted_path(files.dir, mine.sha256)
    assert mine.file_id != theirs.file_id and mine.sha256 == theirs.sha256

    files.delete(one, mine.file_id)
    assert files.collect_garbage(now=_later()) == [] and path.read_bytes() == data, "the other tenant's file"
    files.delete(two, theirs.file_id)
    assert files.collect_garbage() == [] and path.exists(), "within the grace period"
    assert files.collect_garbage(now=_later()) == [path.name] and not path.exists()


def test_a_deleted_files_bytes_stay_while_an_unfinished_job_trains_on_them(files, store, make_tenant):
    tenant = make_tenant()
    record = files.upload(tenant.name, "train.jsonl", "fine-tune", [alpaca_lines(4)])
    spec = parse_spec({"base_model": "/models/none", "dataset": record.file_id})
    job = store.submit(tenant.name, spec, datasets={"dataset": files.accepted(tenant.name, record.file_id)})
    path = accepted_path(files.dir, record.sha256)

    files.delete(tenant.name, record.file_id)
    assert files.collect_garbage(now=_later()) == [] and path.exists()
    store.cancel(tenant.name, job["job_id"])
    assert files.collect_garbage(now=_later(2)) == [path.name] and not path.exists()


def test_the_schedulers_purge_removes_the_bytes_of_deleted_files(files, store):
    tenant = tenant_name()
    record = files.upload(tenant, "a.jsonl", "fine-tune", [alpaca_lines(3, width=17)])
    path = accepted_path(files.dir, record.sha256)
    files.delete(tenant, record.file_id)
    scheduler = Scheduler(store, "sched-files", files=files)  # no job retention: files are collected all the same

    scheduler._purge_expired(time.time())
    assert path.exists(), "within the grace period"
    scheduler._purge_expired(_later())
    assert not path.exists()


def test_a_purged_jobs_packed_adapter_file_goes_with_it(files, store, make_tenant, tmp_path):
    tenant = make_tenant()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    job_id = store.submit(tenant.name, parse_spec({"base_model": "/models/none", "dataset": tenant.dataset}))["job_id"]
    attempt = store.claim(job_id, "exec-purge")
    store.start(job_id, attempt, "exec-purge")
    store.succeed(job_id, str(adapter), attempt, "exec-purge")
    packed = files.file_for_artifact(tenant.name, "adapter", str(adapter), Path, f"{job_id}-adapter.tar")
    scheduler = Scheduler(store, "sched-purge-files", files=files)
    scheduler._delete_artifacts(store.job(job_id))  # what the leader's purge does with each job it expires
    with pytest.raises(LookupError):
        files.get(tenant.name, packed.file_id)


def _later(periods: int = 1) -> float:
    return time.time() + periods * (ORPHAN_GRACE_SECONDS + 1)


def test_a_result_directory_round_trips_as_a_deterministic_tar_outside_the_quota(files, tmp_path):
    tenant = tenant_name()
    adapter = tmp_path / "adapter"
    (adapter / "nested").mkdir(parents=True)
    contents = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": secrets.token_bytes(5000),
                "nested/notes.txt": b"hello"}
    for name, data in contents.items():
        (adapter / name).write_bytes(data)

    record = files.register_directory(tenant, "adapter", adapter, "adapter.tar")
    (adapter / "adapter_config.json").touch()  # a newer mtime changes nothing in the tar
    again = files.register_directory(tenant, "adapter", adapter, "adapter.tar")

    assert again == record and (record.purpose, record.kind, record.format) == (RESULT_PURPOSE, "adapter", "tar")
    assert files.usage(tenant) == (0, 0), "results do not count against the upload quota"
    with files.open(tenant, record.file_id) as source:
        data = source.read()
    assert hashlib.sha256(data).hexdigest() == record.sha256 and len(data) == record.bytes
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        unpacked = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert unpacked == contents
    with pytest.raises(SpecError, match="is a result file"):
        files.accepted(tenant, record.file_id)


def test_list_is_newest_first_pages_with_after_and_filters_by_purpose(files, tmp_path):
    tenant = tenant_name()
    uploads = [files.upload(tenant, f"{n}.jsonl", "fine-tune", [alpaca_lines(n)]) for n in (1, 2, 3)]
    (tmp_path / "result").mkdir()
    (tmp_path / "result" / "a").write_bytes(b"a")
    result = files.register_directory(tenant, "checkpoint", tmp_path / "result", "checkpoint.tar")

    assert [r.file_id for r in files.list(tenant)] == [result.file_id] + [r.file_id for r in reversed(uploads)]
    assert [r.file_id for r in files.list(tenant, after=uploads[2].file_id, limit=1)] == [uploads[1].file_id]
    assert files.list(tenant, purpose=RESULT_PURPOSE) == [result]
    assert [r.file_id for r in files.list(tenant, purpose="fine-tune", limit=2)] == [
        uploads[2].file_id, uploads[1].file_id]
    with pytest.raises(LookupError, match="after: no such file of yours"):
        files.list(tenant_name(), after=uploads[0].file_id)


def test_a_chunked_upload_takes_parts_in_order_and_refuses_what_does_not_fit(files):
    tenant, data = tenant_name(), alpaca_lines(30)
    upload_id = files.begin_upload(tenant, "parts.jsonl", "fine-tune", len(data))
    half = len(data) // 2

    assert files.add_part(tenant, upload_id, data[:half], offset=0) == half
    with pytest.raises(FileError, match=f"stands at byte {half}"):
        files.add_part(tenant, upload_id, data[:half], offset=0)  # a retried part is not written twice
    with pytest.raises(FileError, match=f"{half} of the {len(data)} bytes declared have arrived"):
        files.complete_upload(tenant, upload_id)
    with pytest.raises(LookupError):
        files.add_part(tenant_name(), upload_id, data[half:])  # another tenant's upload is not found
    with pytest.raises(FileError, match="goes past the"):
        files.add_part(tenant, upload_id, data[half:] + b"\n")
    files.add_part(tenant, upload_id, data[half:])

    record = files.complete_upload(tenant, upload_id)
    assert record.sha256 == hashlib.sha256(data).hexdigest() and record.records == 30
    with pytest.raises(LookupError, match="no upload"):
        files.complete_upload(tenant, upload_id)
    assert leftovers(files.dir) == []


def test_a_bad_chunked_upload_is_refused_naming_its_line_and_leaves_nothing(files):
    tenant, data = tenant_name(), alpaca_lines(3) + b"not json\n"
    upload_id = files.begin_upload(tenant, "bad.jsonl", "fine-tune", len(data))
    files.add_part(tenant, upload_id, data)
    with pytest.raises(FileError, match="line 4: invalid JSON"):
        files.complete_upload(tenant, upload_id)
    assert leftovers(files.dir) == [] and files.list(tenant) == []


def test_an_upload_part_fits_one_broker_message():
    token, upload_id = secrets.token_urlsafe(32), "upload-" + "0" * 24
    body = json.dumps([[token, upload_id, base64.b64encode(bytes(MAX_PART_BYTES)).decode(), 2**40], {}, {}])
    assert len(body) <= broker.MAX_MESSAGE_BYTES


# ---- through the real worker, as a tenant with only its broker URL and token ----

@pytest.fixture
def tenant_client(store, make_tenant, celery_app):
    tenant = make_tenant("files")
    credentials = store.issue_credentials(tenant.name, tenant.token)
    app = Celery(broker=credentials.broker_url, backend=credentials.broker_url)
    app.conf.update(credentials.to_json()["celery_config"])

    def call(task: str, *args):
        return app.send_task(task, args=[tenant.token, *args]).get(timeout=60)

    yield tenant, call
    app.close()


def test_a_chunked_upload_through_the_worker_trains_a_job_and_reads_back(tenant_client, store, call,
                                                                          make_tenant, base_model_dir):
    tenant, tenant_call = tenant_client
    data = alpaca_lines(MAX_PART_BYTES // 50 + 500, width=10)  # over one part: the first part is a full one
    assert len(data) > MAX_PART_BYTES

    begun = tenant_call("lorafleet.upload_begin", "train.jsonl", "fine-tune", len(data))
    step = begun["part_bytes"]
    for offset in range(0, len(data), step):
        part = base64.b64encode(data[offset:offset + step]).decode()
        received = tenant_call("lorafleet.upload_part", begun["upload_id"], part, offset)["received"]
    assert received == len(data)
    record = tenant_call("lorafleet.upload_complete", begun["upload_id"])
    assert record["records"] == data.count(b"\n") and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert [f["file_id"] for f in tenant_call("lorafleet.list_files")] == [record["file_id"]]

    job = tenant_call("lorafleet.submit_job", {"base_model": str(base_model_dir), "dataset": record["file_id"]})
    accepted = store.accepted_datasets(job["job_id"])["dataset"]
    assert (accepted.uri, accepted.sha256, accepted.records) == (record["file_id"], record["sha256"],
                                                                 record["records"])

    chunks = [b"?"]
    while chunks[-1]:
        offset = sum(map(len, chunks[1:]))
        chunks.append(base64.b64decode(tenant_call("lorafleet.read_file", record["file_id"], offset, 400 * KIB)))
    assert hashlib.sha256(b"".join(chunks[1:])).hexdigest() == record["sha256"] and len(chunks) == 2 + 3

    stranger = make_tenant("stranger")
    with pytest.raises(LookupError, match="no file"):
        call("lorafleet.get_file", stranger.token, record["file_id"])
    with pytest.raises(ValueError, match="data: not base64"):
        tenant_call("lorafleet.upload_part", tenant_call("lorafleet.upload_begin", "x", "fine-tune", 10)["upload_id"],
                    "!!!!")
    assert tenant_call("lorafleet.delete_file", record["file_id"])["file_id"] == record["file_id"]
    assert tenant_call("lorafleet.list_files") == []


def test_a_downloaded_chunk_is_kept_only_briefly_in_the_result_backend(tenant_client, store):
    tenant, tenant_call = tenant_client
    begun = tenant_call("lorafleet.upload_begin", "a.jsonl", "fine-tune", len(alpaca_lines(2)))
    tenant_call("lorafleet.upload_part", begun["upload_id"], base64.b64encode(alpaca_lines(2)).decode())
    record = tenant_call("lorafleet.upload_complete", begun["upload_id"])
    prefix = keys.tenant_result_prefix(tenant.name) + "celery-task-meta-"
    before = set(store.r.scan_iter(prefix + "*"))

    tenant_call("lorafleet.read_file", record["file_id"], 0, 100)

    (key,) = set(store.r.scan_iter(prefix + "*")) - before
    assert 0 < store.r.ttl(key) <= broker.SHORT_LIVED_RESULTS["lorafleet.read_file"]


def test_a_succeeded_jobs_adapter_reads_back_through_the_worker_in_chunks(tenant_client, store, make_tenant,
                                                                         call, base_model_dir, tmp_path):
    tenant, tenant_call = tenant_client
    job = tenant_call("lorafleet.submit_job", {"base_model": str(base_model_dir), "dataset": tenant.dataset})
    with pytest.raises(ValueError, match="only a succeeded job has a result file"):
        tenant_call("lorafleet.job_result_file", job["job_id"])
    published = {}
    for name, size in (("checkpoint-3-ab12cd34", 700 * KIB), ("adapter-ef56ab78", 1500 * KIB)):
        (tmp_path / name).mkdir()
        published[name] = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": secrets.token_bytes(size)}
        for filename, data in published[name].items():
            (tmp_path / name / filename).write_bytes(data)
    attempt = store.claim(job["job_id"], "files-exec")
    assert store.start(job["job_id"], attempt, "files-exec")
    assert store.record_checkpoint(job["job_id"], str(tmp_path / "checkpoint-3-ab12cd34"), attempt, "files-exec",
                                   step=3) is not None
    assert store.succeed(job["job_id"], str(tmp_path / "adapter-ef56ab78"), attempt, "files-exec")

    record = tenant_call("lorafleet.job_result_file", job["job_id"])
    assert tenant_call("lorafleet.job_result_file", job["job_id"]) == record, "packed once"
    assert (record["kind"], record["purpose"], record["filename"]) == (
        "adapter", RESULT_PURPOSE, f"{job['job_id']}-adapter.tar")
    data = b""
    while chunk := base64.b64decode(tenant_call("lorafleet.read_file", record["file_id"], len(data))):
        data += chunk
    assert len(data) == record["bytes"] > MAX_PART_BYTES and hashlib.sha256(data).hexdigest() == record["sha256"]
    assert _untar(data) == published["adapter-ef56ab78"]

    (checkpoint,) = tenant_call("lorafleet.checkpoint_files", job["job_id"])
    assert checkpoint["step"] == 3 and checkpoint["file"]["kind"] == "checkpoint"
    first = base64.b64decode(tenant_call("lorafleet.read_file", checkpoint["file"]["file_id"], 0))
    assert _untar(first) == published["checkpoint-3-ab12cd34"]
    for task in ("lorafleet.job_result_file", "lorafleet.checkpoint_files"):
        with pytest.raises(LookupError, match="no job"):
            call(task, make_tenant("stranger").token, job["job_id"])


def _untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}
