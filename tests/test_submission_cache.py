"""A worker accepts an unchanged dataset file once: later submissions on it are not read, copied or tokenized again,
and any change to the file (or to the limits, or to the accepted copy's presence) makes it be accepted anew."""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import pytest

from lorafleet.scheduler import datasets, submission
from lorafleet.scheduler.datasets import accept, accepted_path
from lorafleet.scheduler.spec import SpecError

ROWS = [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Count to two.", "output": "1 2"}]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def area(tmp_path):
    path = tmp_path / "data" / "alice"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def copies(monkeypatch):
    """How many times a dataset file was read and copied into the store."""
    counted = []
    real = datasets._copy_checked

    def counting(*args):
        counted.append(args[2])
        return real(*args)

    monkeypatch.setattr(datasets, "_copy_checked", counting)
    monkeypatch.setattr(datasets, "_accepted_files", OrderedDict(), raising=False)  # none remembered yet
    return counted


def accept_train(area: Path, store: Path):
    return accept("alice/train.jsonl", area / "train.jsonl", [area.resolve()], store)


def test_an_unchanged_dataset_is_not_read_or_copied_again(area, tmp_path, copies, monkeypatch):
    monkeypatch.setattr(datasets, "SETTLED_SECONDS", 0.0)
    (area / "train.jsonl").write_bytes(jsonl(ROWS))
    time.sleep(0.02)  # past the file system clock's tick
    first = accept_train(area, tmp_path / "store")
    copy = accepted_path(tmp_path / "store", first.sha256).stat()
    second = accept("alice/other-name.jsonl", area / "train.jsonl", [area.resolve()], tmp_path / "store")
    assert copies == ["alice/train.jsonl"]
    assert (second.sha256, second.size, second.records) == (first.sha256, first.size, first.records)
    assert second.uri == "alice/other-name.jsonl"  # the answer names this submission's file
    assert accepted_path(tmp_path / "store", first.sha256).stat().st_ino == copy.st_ino


def test_a_dataset_rewritten_in_place_is_accepted_again_even_with_its_mtime_set_back(area, tmp_path, copies,
                                                                                     monkeypatch):
    monkeypatch.setattr(datasets, "SETTLED_SECONDS", 0.0)
    original = jsonl(ROWS)
    (area / "train.jsonl").write_bytes(original)
    before = (area / "train.jsonl").stat()
    time.sleep(0.02)
    first = accept_train(area, tmp_path / "store")
    time.sleep(0.02)
    (area / "train.jsonl").write_bytes(original.replace(b"Hi!", b"Yo!"))  # same size, same inode, other bytes
    os.utime(area / "train.jsonl", ns=(before.st_atime_ns, before.st_mtime_ns))  # and its mtime set back
    time.sleep(0.02)
    second = accept_train(area, tmp_path / "store")
    assert len(copies) == 2 and second.sha256 != first.sha256
    assert accepted_path(tmp_path / "store", second.sha256).read_bytes() == original.replace(b"Hi!", b"Yo!")


def test_a_file_written_just_before_acceptance_is_read_every_time(area, tmp_path, copies):
    (area / "train.jsonl").write_bytes(jsonl(ROWS))  # within SETTLED_SECONDS: its timestamps may not show a rewrite
    accept_train(area, tmp_path / "store")
    accept_train(area, tmp_path / "store")
    assert len(copies) == 2


def test_a_removed_accepted_copy_or_a_lower_limit_makes_the_file_be_accepted_again(area, tmp_path, copies,
                                                                                   monkeypatch):
    monkeypatch.setattr(datasets, "SETTLED_SECONDS", 0.0)
    (area / "train.jsonl").write_bytes(jsonl(ROWS))
    time.sleep(0.02)
    first = accept_train(area, tmp_path / "store")
    accepted_path(tmp_path / "store", first.sha256).unlink()  # the operator cleaned the store
    accept_train(area, tmp_path / "store")
    assert len(copies) == 2 and accepted_path(tmp_path / "store", first.sha256).is_file()
    monkeypatch.setenv("LORAFLEET_MAX_RECORDS", "1")
    with pytest.raises(SpecError, match="more than the limit of 1 records"):
        accept_train(area, tmp_path / "store")


def test_a_datasets_records_are_tokenized_once_per_base_and_max_seq_len(area, tmp_path, base_model_dir, monkeypatch):
    counted = []
    real = submission.count_targets
    monkeypatch.setattr(submission, "count_targets", lambda *args: counted.append(args[-1]) or real(*args))
    monkeypatch.setattr(submission, "_sample_counts", OrderedDict(), raising=False)
    (area / "train.jsonl").write_bytes(jsonl(ROWS))
    (area / "long.jsonl").write_bytes(jsonl([{"instruction": "please " * 40, "output": "ok"}]))

    def submit(dataset: str, max_seq_len: int):
        spec = {"base_model": str(base_model_dir), "dataset": f"alice/{dataset}",
                "hyperparameters": {"max_seq_len": max_seq_len}}
        return submission.accept_submission(spec, "alice", area.parent, tmp_path / "hub", [base_model_dir.parent],
                                            tmp_path / "store")

    first, second = submit("train.jsonl", 512), submit("train.jsonl", 512)
    assert counted == [512] and first.target_tokens == second.target_tokens and first.plan == second.plan
    submit("train.jsonl", 384)
    assert counted == [512, 384]
    for _ in range(2):  # a refusal is not remembered: each submission names the cause again
        with pytest.raises(SpecError, match="no target token within max_seq_len=16"):
            submit("long.jsonl", 16)
    assert counted == [512, 384, 16, 16]
