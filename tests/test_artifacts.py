"""The artifact store publishes whole directories atomically and fetches them back, locally or through fsspec."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.executor.artifacts import ArtifactStore


def make_dir(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("remote", [False, True])
def test_publish_replaces_and_fetch_returns_the_same_files(tmp_path, remote):
    root = "memory://lorafleet-test-" + tmp_path.name if remote else str(tmp_path / "artifacts")
    store = ArtifactStore(root)
    first = make_dir(tmp_path / "v1", {"adapter_config.json": "{}", "nested/state.pt": "one", "stale.txt": "x"})
    second = make_dir(tmp_path / "v2", {"adapter_config.json": '{"r": 4}', "nested/state.pt": "two"})

    uri = store.publish(first, "tenant-a", "job-1", "checkpoint")
    assert uri == f"{root}/tenant-a/job-1/checkpoint"
    assert store.publish(second, "tenant-a", "job-1", "checkpoint") == uri

    fetched = store.fetch(uri, tmp_path / "scratch" if remote else None)
    files = {p.relative_to(fetched).as_posix(): p.read_text() for p in fetched.rglob("*") if p.is_file()}
    assert files == {"adapter_config.json": '{"r": 4}', "nested/state.pt": "two"}
    assert not store.fs.exists(f"{store.base}/tenant-a/job-1/checkpoint.partial")
