"""Where checkpoints and finished adapters go: a local directory by default, any fsspec URI when configured.

Layout under the artifact root: `<tenant>/<job_id>/checkpoint-<attempt>` (the latest resumable checkpoint of that
attempt, replaced each time; an attempt never writes over another's) and `<tenant>/<job_id>/adapter` (the final PEFT
adapter). Executors on other hosts resume a job from its checkpoint URI,
so with several hosts the root must be shared storage (NFS path, s3://…).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class ArtifactStore:
    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)

    def uri(self, tenant: str, job_id: str, kind: str) -> str:
        return f"{self.root}/{tenant}/{job_id}/{kind}"

    def publish(self, local_dir: Path, tenant: str, job_id: str, kind: str) -> str:
        """Copy a finished local directory to the store, replacing what was there; return its URI."""
        target = f"{self.base}/{tenant}/{job_id}/{kind}"
        staging = f"{target}.partial"
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        self.fs.makedirs(staging, exist_ok=True)
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                remote = f"{staging}/{path.relative_to(local_dir).as_posix()}"
                self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                self.fs.put_file(str(path), remote)
        # Replace only once the copy is complete, so a reader never sees half a checkpoint.
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        self.fs.mv(staging, target, recursive=True)
        return self.uri(tenant, job_id, kind)

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

