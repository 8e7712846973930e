"""The artifact store publishes whole directories under names no other writer uses, and fetches them back, locally
or through fsspec."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.scheduler.artifacts import ArtifactStore


def make_dir(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("remote", [False, True])
def test_a_publish_never_touches_an_earlier_one_and_fetch_returns_its_files(tmp_path, remote):
    root = "memory://lorafleet-test-" + tmp_path.name if remote else str(tmp_path / "artifacts")
    store = ArtifactStore(root)
    first = make_dir(tmp_path / "v1", {"adapter_config.json": "{}", "nested/state.pt": "one", "stale.txt": "x"})
    second = make_dir(tmp_path / "v2", {"adapter_config.json": '{"r": 4}', "nested/state.pt": "two"})

    one = store.publish(first, "tenant-a", "job-1", 1, "checkpoint-5")
    two = store.publish(second, "tenant-a", "job-1", 1, "checkpoint-5")  # the same step again: a name of its own
    assert one != two and one.startswith(f"{root}/tenant-a/job-1/attempt-1/checkpoint-5-")

    scratch = tmp_path / "scratch" if remote else None
    assert tree(store.fetch(one, scratch)) == {"adapter_config.json": "{}", "nested/state.pt": "one", "stale.txt": "x"}
    assert tree(store.fetch(two, scratch)) == {"adapter_config.json": '{"r": 4}', "nested/state.pt": "two"}
    assert not [p for p in store.fs.ls(f"{store.base}/tenant-a/job-1/attempt-1") if ".staging" in str(p)]

    store.delete(one)
    assert not store.fs.exists(store._path(one)) and store.fs.exists(store._path(two))
    store.delete_job("tenant-a", "job-1")
    assert not store.fs.exists(f"{store.base}/tenant-a/job-1")


def test_delete_refuses_a_uri_outside_its_root(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    with pytest.raises(ValueError, match="not under the artifact root"):
        store.delete(str(tmp_path / "elsewhere"))
