"""Where checkpoints and finished adapters go: a local directory by default, any fsspec URI when configured.

Layout under the artifact root, one directory per lease, so an attempt never writes where another attempt's files are:

    <tenant>/<job_id>/attempt-<n>/checkpoint-<step>-<nonce>/   resumable: PEFT adapter + training_state.pt
    <tenant>/<job_id>/attempt-<n>/adapter-<nonce>/             the export: adapter_model.safetensors, adapter_config.json
    <tenant>/<job_id>/attempt-<n>/.staging-<nonce>/            a copy in progress

A directory is copied to a staging name of its own and moved to a final name nobody else uses, so neither a reader
nor a second writer ever sees half of one. Nothing finds an artifact by its path: the job record's
`checkpoint_uri` / `adapter_uri` (set only by the lease holder, `JobStore.record_checkpoint` / `succeed`) is the one
pointer, so what a stale holder writes after losing its lease is never reached, and it deletes it when refused.
Executors on other hosts resume a job from its checkpoint URI, so with several hosts the root must be shared
storage (NFS path, s3://…).
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)

    def _attempt_dir(self, tenant: str, job_id: str, attempt: int) -> str:
        return f"{tenant}/{job_id}/attempt-{int(attempt)}"

    def publish(self, local_dir: Path, tenant: str, job_id: str, attempt: int, name: str) -> str:
        """Copy a finished local directory into the attempt's directory under a new name starting with `name`;
        return its URI."""
        nonce = secrets.token_hex(4)
        relative = f"{self._attempt_dir(tenant, job_id, attempt)}/{name}-{nonce}"
        staging = f"{self.base}/{self._attempt_dir(tenant, job_id, attempt)}/.staging-{nonce}"
        self.fs.makedirs(staging, exist_ok=True)
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                remote = f"{staging}/{path.relative_to(local_dir).as_posix()}"
                self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(path), remote)
        self.fs.mv(staging, f"{self.base}/{relative}", recursive=True)
        return f"{self.root}/{relative}"

    def _path(self, uri: str) -> str:
        if not uri.startswith(self.root + "/"):
            raise ValueError(f"{uri!r} is not under the artifact root {self.root!r}")
        return f"{self.base}/{uri[len(self.root) + 1:]}"

    def delete(self, uri: str) -> None:
        """Remove one published artifact (gone already: nothing to do)."""
        path = self._path(uri)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def delete_job(self, tenant: str, job_id: str) -> None:
        """Remove every artifact of a job, of every attempt."""
        path = f"{self.base}/{tenant}/{job_id}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def fetch(self, uri: str, scratch: Path | None = None) -> Path:
        """Return a local directory holding the artifact at `uri` (the path itself when it is local)."""
        fs, path = fsspec.core.url_to_fs(uri)
        if isinstance(fs, LocalFileSystem):
            return Path(path)
        if scratch is not None:
            scratch.mkdir(parents=True, exist_ok=True)
        local = Path(tempfile.mkdtemp(prefix="lorafleet-fetch-", dir=scratch))
        fs.get(path, str(local), recursive=True)
        return local / Path(path).name
