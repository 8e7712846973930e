"""A job's results as files of its tenant: the finished adapter and each kept checkpoint, packed once per artifact URI
as a deterministic tar (`FileStore.file_for_artifact`) and then downloaded like any file (`GET /v1/files/{id}/content`,
`lorafleet.read_file`). One implementation for the gateway (a job's `result_files`, a checkpoint's `file_id`) and the
Celery tasks (`lorafleet.job_result_file`, `lorafleet.checkpoint_files`).

    results = JobResults(job_store, file_store, ArtifactStore(config.artifact_root()))
    record = results.record_for(tenant, job_id)   # LookupError for an unknown job and another tenant's, alike
    results.adapter_file(record)        # FileRecord; ValueError when the job has not succeeded
    results.checkpoint_files(record)    # [CheckpointFile(step, file)], newest first
    results.delete_model(tenant, job_id)   # the fine-tuned model's adapter and its file gone; the job stays

A result is packed on first ask, not when the executor publishes it: most are never downloaded, and the executor
holds no file store. Packing reads the whole adapter once (megabytes for a LoRA adapter); every later ask is two
Redis reads. An artifact whose directory is gone (expired, or removed by hand) is a LookupError, never an empty tar.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.files import FileRecord, FileStore
from lorafleet.scheduler.records import JobRecord, JobState
from lorafleet.scheduler.store import JobStore

_CHECKPOINT_STEP_RE = re.compile(r"checkpoint-(\d+)-")  # the executor publishes `checkpoint-<step>` (+ a nonce)


def result_kind(adapter_type: str) -> str:
    """What a finished job publishes: a GaLore job a whole model (a full fine-tune), any other an adapter. Its
    artifact's and result file's name say so."""
    return "model" if adapter_type == "galore" else "adapter"


def checkpoint_step(uri: str) -> int:
    """The step in a checkpoint's name (`artifacts`: `checkpoint-<step>-<nonce>`)."""
    found = _CHECKPOINT_STEP_RE.search(PurePosixPath(uri).name)
    return int(found.group(1)) if found else 0


@dataclass(frozen=True)
class CheckpointFile:
    step: int
    file: FileRecord

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "file": self.file.to_json()}


class JobResults:
    def __init__(self, store: JobStore, files: FileStore, artifacts: ArtifactStore):
        self.store, self.files, self.artifacts = store, files, artifacts

    def record_for(self, tenant: str, job_id: Any) -> JobRecord:
        """The tenant's job; LookupError, with one message, for an unknown id and for another tenant's."""
        self.store.get_job_for(tenant, job_id)
        record = self.store.job(job_id)
        if record is None:  # purged between the two reads
            raise LookupError(f"no job {job_id!r}")
        return record

    def adapter_file(self, record: JobRecord) -> FileRecord:
        """The job's finished PEFT adapter as one file. ValueError when the job has not succeeded."""
        if record.state != JobState.SUCCEEDED or not record.adapter_uri:
            raise ValueError(f"job_id: job {record.job_id!r} is {record.state.value}: only a succeeded job has a "
                             "result file")
        if record.model_deleted_at is not None:
            raise LookupError(f"the fine-tuned model of job {record.job_id!r} was deleted")
        return self._pack(record, "adapter", record.adapter_uri,
                          f"{record.job_id}-{result_kind(record.spec.adapter.type)}.tar")

    def delete_model(self, tenant: str, job_id: str) -> JobRecord:
        """Delete the tenant's fine-tuned model of a succeeded job: marked deleted in the store first (no request
        resolves it from then on: `Generations.adapter_of`), then its adapter's artifact and the file packed from it.
        The job, its events and its kept checkpoints stay. LookupError / ValueError as `JobStore.delete_model`; a
        call for a model deleted already removes what an earlier call left (it failed between the two steps) before
        its LookupError, so a retried delete always ends with the files gone."""
        try:
            record = self.store.delete_model(tenant, job_id)
        except LookupError:
            earlier = self.store.job(job_id)
            if earlier is not None and earlier.tenant == tenant and earlier.model_deleted_at is not None:
                self._remove_adapter(earlier)
            raise
        self._remove_adapter(record)
        return record

    def _remove_adapter(self, record: JobRecord) -> None:
        self.files.forget_artifacts(record.tenant, [record.adapter_uri])
        self.artifacts.delete(record.adapter_uri)

    def checkpoint_file(self, record: JobRecord, uri: str) -> FileRecord:
        """One of the job's kept checkpoints (an URI of `record.checkpoints`) as one file."""
        if uri not in record.checkpoints:
            raise LookupError(f"job {record.job_id!r} keeps no such checkpoint")
        return self._pack(record, "checkpoint", uri, f"{record.job_id}-checkpoint-{checkpoint_step(uri)}.tar")

    def checkpoint_files(self, record: JobRecord) -> list[CheckpointFile]:
        """The job's kept checkpoints, newest first, each as one file (one whose directory is gone is left out)."""
        found = []
        for uri in reversed(record.checkpoints):
            try:
                found.append(CheckpointFile(checkpoint_step(uri), self.checkpoint_file(record, uri)))
            except LookupError:
                continue
        return found

    def _pack(self, record: JobRecord, kind: str, uri: str, filename: str) -> FileRecord:
        scratch: list[Path] = []  # where a remote artifact is copied to be packed; removed once packed

        def fetch(artifact_uri: str) -> Path:
            scratch.append(Path(tempfile.mkdtemp(prefix="lorafleet-result-")))
            try:
                directory = self.artifacts.fetch(artifact_uri, scratch[-1])  # a local one: its own path
            except FileNotFoundError:
                directory = None
            if directory is None or not directory.is_dir():
                raise LookupError(f"the {kind} of job {record.job_id!r} is no longer stored")
            return directory

        try:
            return self.files.file_for_artifact(record.tenant, kind, uri, fetch, filename)
        except FileNotFoundError:  # removed while packed (a checkpoint rotated out)
            raise LookupError(f"the {kind} of job {record.job_id!r} is no longer stored") from None
        finally:
            for directory in scratch:
                shutil.rmtree(directory, ignore_errors=True)
