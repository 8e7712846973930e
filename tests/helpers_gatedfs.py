"""An artifact store as slow as a test wants: a local directory whose copies of a job's result (the files of an
`adapter-*` / `model-*` snapshot) wait at a gate the test opens, or fail for the jobs named in `failing`.

Registered with fsspec as `gatedfile://`, so `ArtifactStore("gatedfile:///some/dir")` publishes through it exactly as
through any remote filesystem. Importing this module registers it (a subprocess imports it too, to be slow there).
"""

from __future__ import annotations

import threading
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "gatedfile"
GATE_TIMEOUT = 30.0  # an unopened gate lets the copy go on after this long (code that publishes on the loop)


class GatedFileSystem(LocalFileSystem):
    protocol = (PROTOCOL,)
    gate = threading.Event()  # set: results are copied at once
    entered = threading.Event()  # set once a result's copy reached the gate
    entered_marker: Path | None = None  # also touched then (seen from another process)
    failing: set[str] = set()  # job ids whose results cannot be stored

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def put_file(self, lpath, rpath, *args, **kwargs):
        if Path(lpath).parent.name.startswith(("adapter-", "model-")):
            if any(job_id in str(rpath) for job_id in self.failing):
                raise OSError(28, "No space left on device")
            GatedFileSystem.entered.set()
            if self.entered_marker is not None:
                self.entered_marker.touch()
            GatedFileSystem.gate.wait(GATE_TIMEOUT)
        return super().put_file(lpath, rpath, *args, **kwargs)


def reset() -> None:
    GatedFileSystem.gate.clear()
    GatedFileSystem.entered.clear()
    GatedFileSystem.entered_marker = None
    GatedFileSystem.failing = set()


fsspec.register_implementation(PROTOCOL, GatedFileSystem, clobber=True)
