"""Hostile datasets: a job trains on exactly the bytes accepted at submission, and no record is too large to handle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.executor.worker import Executor
from lorafleet.scheduler.datasets import DatasetChanged, accept, accepted_path, verified_path
from lorafleet.scheduler.spec import SpecError, resolve_dataset

ROWS = [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Count to two.", "output": "1 2"}]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def areas(tmp_path):
    root = tmp_path / "data"
    for name in ("alice", "bob", "shared"):
        (root / name).mkdir(parents=True)
    return root


def accept_file(root: Path, tenant: str, uri: str, store_dir: Path):
    path = resolve_dataset(uri, root, tenant)
    return accept(uri, path, [root.resolve() / tenant, root.resolve() / "shared"], store_dir)


def test_accepted_bytes_survive_a_symlink_swap_and_a_same_size_rewrite(areas, tmp_path):
    original = jsonl(ROWS)
    (areas / "alice" / "train.jsonl").write_bytes(original)
    (areas / "bob" / "secret.jsonl").write_bytes(jsonl([{"text": "bob's private data " * 3}]))
    accepted = accept_file(areas, "alice", "alice/train.jsonl", tmp_path / "store")
    assert accepted.records == 2 and accepted.size == len(original) and accepted.uri == "alice/train.jsonl"

    (areas / "alice" / "train.jsonl").write_bytes(original.replace(b"Hi!", b"Yo!"))  # same size, other bytes
    assert verified_path(tmp_path / "store", accepted).read_bytes() == original
    (areas / "alice" / "train.jsonl").unlink()
    (areas / "alice" / "train.jsonl").symlink_to(areas / "bob" / "secret.jsonl")
    assert verified_path(tmp_path / "store", accepted).read_bytes() == original


def test_a_file_that_is_a_symlink_when_opened_is_refused_even_inside_the_area(areas, tmp_path):
    (areas / "alice" / "real.jsonl").write_bytes(jsonl(ROWS))
    (areas / "alice" / "link.jsonl").symlink_to(areas / "alice" / "real.jsonl")
    store_areas = [areas.resolve() / "alice"]
    # the path was resolved earlier, and the tenant turned it into a link since: the open must not follow it
    with pytest.raises(SpecError, match="cannot open 'alice/link.jsonl'"):
        accept("alice/link.jsonl", areas / "alice" / "link.jsonl", store_areas, tmp_path / "store")


def test_a_directory_swapped_for_a_link_to_another_area_is_caught_at_open(areas, tmp_path):
    (areas / "bob" / "data").mkdir()
    (areas / "bob" / "data" / "train.jsonl").write_bytes(jsonl(ROWS))
    (areas / "alice" / "data").symlink_to(areas / "bob" / "data")
    with pytest.raises(SpecError, match="outside your data areas"):
        accept("alice/data/train.jsonl", areas / "alice" / "data" / "train.jsonl", [areas.resolve() / "alice"],
               tmp_path / "store")
    assert not list((tmp_path / "store").glob("*.jsonl"))


def test_a_fifo_is_refused_without_blocking(areas, tmp_path):
    os.mkfifo(areas / "alice" / "pipe.jsonl")
    with pytest.raises(SpecError, match="not a regular file"):
        accept("alice/pipe.jsonl", areas / "alice" / "pipe.jsonl", [areas.resolve() / "alice"], tmp_path / "store")


def test_a_record_over_the_limit_is_refused_naming_the_tenants_uri_and_line(areas, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_MAX_RECORD_BYTES", "1000")
    rows = jsonl(ROWS) + jsonl([{"text": "x" * 5000}])
    (areas / "alice" / "big.jsonl").write_bytes(rows)
    with pytest.raises(SpecError) as excinfo:
        accept_file(areas, "alice", "alice/big.jsonl", tmp_path / "store")
    assert "'alice/big.jsonl' line 3 is longer than the limit of 1000 bytes" in str(excinfo.value)
    assert str(areas) not in str(excinfo.value) and not list((tmp_path / "store").iterdir())


def test_a_file_over_the_size_or_record_limit_and_an_empty_one_are_refused(areas, tmp_path, monkeypatch):
    (areas / "alice" / "blank.jsonl").write_bytes(b"\n  \n\n")
    with pytest.raises(SpecError, match="has no records"):
        accept_file(areas, "alice", "alice/blank.jsonl", tmp_path / "store")
    monkeypatch.setenv("LORAFLEET_MAX_RECORDS", "1")
    (areas / "alice" / "two.jsonl").write_bytes(jsonl(ROWS))
    with pytest.raises(SpecError, match="more than the limit of 1 records"):
        accept_file(areas, "alice", "alice/two.jsonl", tmp_path / "store")
    monkeypatch.setenv("LORAFLEET_MAX_DATASET_BYTES", "50")
    (areas / "alice" / "train.jsonl").write_bytes(jsonl(ROWS))
    with pytest.raises(SpecError, match="larger than the limit of 50 bytes"):
        accept_file(areas, "alice", "alice/train.jsonl", tmp_path / "store")


def test_a_tampered_accepted_copy_is_refused(areas, tmp_path):
    (areas / "alice" / "train.jsonl").write_bytes(jsonl(ROWS))
    accepted = accept_file(areas, "alice", "alice/train.jsonl", tmp_path / "store")
    path = accepted_path(tmp_path / "store", accepted.sha256)
    path.chmod(0o640)
    path.write_bytes(path.read_bytes().replace(b"Hi!", b"Yo!"))
    with pytest.raises(DatasetChanged, match="alice/train.jsonl"):
        verified_path(tmp_path / "store", accepted)


def test_errors_name_the_tenants_uri_and_a_long_path_component_is_a_spec_error(areas):
    with pytest.raises(SpecError) as excinfo:
        resolve_dataset("bob/secret.jsonl", areas, "alice")
    assert str(areas) not in str(excinfo.value) and "(alice/... or shared/...)" in str(excinfo.value)
    with pytest.raises(SpecError, match="cannot be read"):
        resolve_dataset("alice/" + "a" * 300 + ".jsonl", areas, "alice")


def test_through_the_api_the_executor_reads_only_the_accepted_copy(call, store, make_tenant, data_root,
                                                                   base_model_dir, worker_env, tmp_path, monkeypatch):
    alice, bob = make_tenant("alice"), make_tenant("bob")
    original = (data_root / alice.dataset).read_bytes()
    job = call("lorafleet.submit_job", alice.token, {"base_model": str(base_model_dir), "dataset": alice.dataset})
    accepted = store.accepted_datasets(job["job_id"])["dataset"]
    assert accepted.uri == alice.dataset and accepted.records == 2

    target = data_root / alice.dataset  # the tenant swaps its file for a link to another tenant's after acceptance
    target.unlink()
    target.symlink_to(data_root / bob.dataset)

    class Cohort:  # records what the executor hands the training loop
        tokenizer = None
        joined: dict = {}

        def add_job(self, job_id, spec, dataset, resume_from=None, dataset_name=None):
            self.joined[job_id] = (Path(dataset).read_bytes(), dataset_name)

        def remove_job(self, job_id):
            del self.joined[job_id]

    monkeypatch.setenv("LORAFLEET_DATASET_DIR", worker_env["LORAFLEET_STATE_DIR"] + "/datasets")
    executor = Executor(store, "exec-data", "cpu", ArtifactStore(str(tmp_path)))
    executor.cohort = Cohort()
    executor.compat_key = store.job(job["job_id"]).plan.compat_key  # its base is "loaded"
    store.claim(job["job_id"], "exec-data")
    executor.admit(store.job(job["job_id"]))
    assert executor.cohort.joined[job["job_id"]] == (original, alice.dataset)


def test_a_dataset_with_a_huge_line_is_refused_at_submission_and_another_tenant_is_unaffected(
        call, store, make_tenant, data_root, base_model_dir):
    hostile, other = make_tenant("hostile"), make_tenant("other")
    with open(data_root / hostile.name / "poison.jsonl", "w") as f:
        f.write(json.dumps({"text": "x" * (3 << 20)}) + "\n")  # 3 MB on one line: over the default 1 MiB
    with pytest.raises(ValueError, match=f"'{hostile.name}/poison.jsonl' line 1 is longer than the limit"):
        call("lorafleet.submit_job", hostile.token,
             {"base_model": str(base_model_dir), "dataset": f"{hostile.name}/poison.jsonl"})
    assert store.counts(hostile.name)["queued"] == 0  # nothing left behind
    job = call("lorafleet.submit_job", other.token, {"base_model": str(base_model_dir), "dataset": other.dataset})
    assert job["state"] == "queued"


def test_submission_reads_the_dataset_as_the_executor_will(call, store, make_tenant, data_root, base_model_dir):
    tenant = make_tenant("reader")
    area = data_root / tenant.name
    (area / "long.jsonl").write_text(json.dumps({"instruction": "please " * 40, "output": "ok"}) + "\n")
    (area / "broken.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + '{"instruction": "x", "output": \n')
    (area / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")

    def submit(dataset: str, **hp):
        return call("lorafleet.submit_job", tenant.token, {"base_model": str(base_model_dir), "dataset": dataset,
                                                             "hyperparameters": {"max_seq_len": 16, **hp}})

    with pytest.raises(ValueError, match=f"'{tenant.name}/long.jsonl' has no target token within max_seq_len=16 in "
                                         "any record"):
        submit(f"{tenant.name}/long.jsonl")
    with pytest.raises(ValueError, match=f"'{tenant.name}/broken.jsonl' line 2: invalid JSON"):
        submit(f"{tenant.name}/broken.jsonl")
    with pytest.raises(ValueError, match="line 1: no assistant message"):
        submit(f"{tenant.name}/chat.jsonl")
    with pytest.raises(ValueError, match=f"dataset_format: 'chat', but dataset '{tenant.name}/long.jsonl' holds "
                                         "alpaca records"):
        call("lorafleet.submit_job", tenant.token, {"base_model": str(base_model_dir), "dataset_format": "chat",
                                                    "dataset": f"{tenant.name}/long.jsonl"})
    assert store.counts(tenant.name)["queued"] == 0
    assert submit(f"{tenant.name}/long.jsonl", max_seq_len=512)["state"] == "queued"  # room for the target now


def test_a_bad_record_deep_in_a_dataset_is_refused_at_submission_naming_its_line(areas, tmp_path):
    """Submission reads only the first records with the tokenizer, but checks every record's fields as it copies."""
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5000)]
    deep = jsonl(rows) + jsonl([{"instruction": "no output here"}]) + jsonl(rows[:3])
    (areas / "alice" / "deep.jsonl").write_bytes(deep)
    with pytest.raises(SpecError, match="'alice/deep.jsonl' line 5001: missing 'output'"):
        accept_file(areas, "alice", "alice/deep.jsonl", tmp_path / "store")
    mixed = jsonl(rows[:2]) + jsonl([{"text": "plain"}])
    (areas / "alice" / "mixed.jsonl").write_bytes(mixed)
    with pytest.raises(SpecError, match="line 3: the record is in text format, but the dataset is alpaca"):
        accept_file(areas, "alice", "alice/mixed.jsonl", tmp_path / "store")
    assert not [p for p in (tmp_path / "store").iterdir() if p.suffix == ".jsonl"], "nothing refused is kept"
    (areas / "alice" / "ok.jsonl").write_bytes(jsonl(rows[:2]))
    accepted = accept_file(areas, "alice", "alice/ok.jsonl", tmp_path / "store")
    assert accepted.format == "alpaca" and accepted.records == 2
