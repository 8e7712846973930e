"""Datasets are accepted once, at submission, and executors train on exactly the bytes accepted.

`accept` opens the tenant's file without following a symlink at its last step, checks that the file it opened (not
the path, which the tenant may change afterwards) lies inside the tenant's areas and is a regular file, and streams
it into the dataset store under the SHA-256 of its bytes, checking every record's size on the way. The job records
that digest; an executor opens only `<dataset store>/<sha256>.jsonl` and checks the digest again before training,
so a dataset swapped for a symlink, or rewritten in place at the same size, after acceptance changes nothing.

The dataset store (`LORAFLEET_DATASET_DIR`) belongs to the operator: tenants must not be able to write it, and every
executor host must see it under the same path (a shared file system, like the data root).

Limits (environment, read at call time): `LORAFLEET_MAX_RECORD_BYTES` (one JSONL line, default 1 MiB),
`LORAFLEET_MAX_DATASET_BYTES` (one file, default 1 GiB) and `LORAFLEET_MAX_RECORDS` (non-blank lines of one file,
default 5,000,000), which bound what one job's data costs an executor: its line index, 24 bytes a record.

A tenant submitting many jobs on one file pays for its copy once: a worker remembers each file it accepted by the
identity of the file it opened (device, inode, size, mtime and ctime, in nanoseconds) and, while that identity is
unchanged and the accepted copy is still in the store, answers the same digest without reading the file again. Any
write to the file changes its ctime (which, unlike the mtime, the tenant cannot set back), so a changed file is read
and copied again. A file changed within `SETTLED_SECONDS` before acceptance is never remembered: its timestamps may
not yet tell one write from the next (the coarse file-system clock), the "racy clean" case git's index also skips.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lorafleet.scheduler.formats import DataError, RecordLines
from lorafleet.scheduler.spec import SpecError, is_inside

DEFAULT_MAX_RECORD_BYTES = 1 << 20
DEFAULT_MAX_DATASET_BYTES = 1 << 30
DEFAULT_MAX_RECORDS = 5_000_000  # an executor indexes each record in 24 bytes: at most 120 MB per job
_CHUNK = 1 << 20
SETTLED_SECONDS = 2.0  # a file changed more recently than this before acceptance is not remembered
_REMEMBERED_FILES = 4096


def max_record_bytes() -> int:
    return int(os.environ.get("LORAFLEET_MAX_RECORD_BYTES", DEFAULT_MAX_RECORD_BYTES))


def max_dataset_bytes() -> int:
    return int(os.environ.get("LORAFLEET_MAX_DATASET_BYTES", DEFAULT_MAX_DATASET_BYTES))


def max_records() -> int:
    return int(os.environ.get("LORAFLEET_MAX_RECORDS", DEFAULT_MAX_RECORDS))


@dataclass(frozen=True)
class AcceptedDataset:
    """One accepted dataset file, as the job records it."""

    uri: str  # the tenant's own name for it: every message about the file uses this, never a server path
    sha256: str
    size: int  # bytes
    records: int  # non-blank lines
    format: str = ""  # of every record: alpaca, chat or text ('' in jobs accepted before it was recorded)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "AcceptedDataset":
        return cls(str(raw["uri"]), str(raw["sha256"]), int(raw["size"]), int(raw["records"]),
                   str(raw.get("format", "")))


class DatasetChanged(ValueError):
    """The accepted copy no longer holds the accepted bytes (the dataset store was tampered with)."""


def _open_checked(path: Path, areas: list[Path], uri: str, field: str) -> int:
    """An fd of the regular file at `path`, which must really be inside `areas` once opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)  # no FIFO can block us
    except OSError as exc:
        raise SpecError(f"invalid job spec: {field}: cannot open {uri!r} ({exc.strerror})") from None
    try:
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not is_inside(opened, areas):
            raise SpecError(f"invalid job spec: {field}: {uri!r} is outside your data areas")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SpecError(f"invalid job spec: {field}: {uri!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_checked(fd: int, out, uri: str, field: str) -> tuple[str, int, int, str]:
    """Stream fd to `out`, hashing it and checking every record (`formats.RecordLines`: complete in its format, one
    format, within the limits), so a bad line anywhere is refused now, not when an executor reaches it;
    (sha256, bytes, non-blank records, format)."""
    digest, size, file_limit = hashlib.sha256(), 0, max_dataset_bytes()
    lines = RecordLines(max_record_bytes(), max_records())
    try:
        with os.fdopen(fd, "rb", closefd=True) as source:
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > file_limit:
                    raise SpecError(f"invalid job spec: {field}: {uri!r} is larger than the limit of {file_limit} "
                                    "bytes")
                digest.update(chunk)
                out.write(chunk)
                lines.feed(chunk)
        records, fmt = lines.finish()
    except DataError as exc:
        raise SpecError(f"invalid job spec: {field}: {uri!r} {exc}") from None
    return digest.hexdigest(), size, records, fmt


def accept(uri: str, path: Path, areas: list[Path], store_dir: Path, field: str = "dataset") -> AcceptedDataset:
    """Copy the tenant's file at `path` (resolved inside `areas`) into `store_dir`, content-addressed; a file this
    worker accepted before, unchanged since, is not read again (see the module's docstring)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    fd = _open_checked(path, areas, uri, field)
    identity = _FileIdentity.of(fd, store_dir)
    known = _accepted_files.get(identity)
    if known is not None and accepted_path(store_dir, known[0]).exists():
        os.close(fd)
        _accepted_files.move_to_end(identity)
        return AcceptedDataset(uri, *known)
    with tempfile.NamedTemporaryFile(dir=store_dir, prefix=".accepting-", delete=False) as out:
        try:
            sha256, size, records, fmt = _copy_checked(fd, out, uri, field)
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.chmod(out.name, 0o440)
    os.replace(out.name, accepted_path(store_dir, sha256))  # same bytes, same name: a second copy changes nothing
    if identity.settled():
        _remember(identity, (sha256, size, records, fmt))
    return AcceptedDataset(uri, sha256, size, records, fmt)


@dataclass(frozen=True)
class _FileIdentity:
    """What tells one version of an opened file from another, with the limits and store it was accepted under."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int  # changed by every write and by setting the mtime back: what makes this key safe
    limits: tuple[int, int, int]
    store_dir: str

    @classmethod
    def of(cls, fd: int, store_dir: Path) -> "_FileIdentity":
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                   (max_record_bytes(), max_dataset_bytes(), max_records()), str(store_dir))

    def settled(self) -> bool:
        return time.time_ns() - max(self.mtime_ns, self.ctime_ns) > SETTLED_SECONDS * 1e9


_accepted_files: OrderedDict[_FileIdentity, tuple[str, int, int, str]] = OrderedDict()  # -> (sha256, size,
# records, format)


def _remember(identity: _FileIdentity, accepted: tuple[str, int, int, str]) -> None:
    _accepted_files[identity] = accepted
    while len(_accepted_files) > _REMEMBERED_FILES:
        _accepted_files.popitem(last=False)


def accepted_path(store_dir: Path, sha256: str) -> Path:
    return Path(store_dir) / f"{sha256}.jsonl"


def verified_path(store_dir: Path, accepted: AcceptedDataset) -> Path:
    """The accepted copy, after checking it still holds the accepted bytes."""
    path = accepted_path(store_dir, accepted.sha256)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DatasetChanged(f"{accepted.uri}: the accepted copy cannot be read ({exc.strerror})") from None
    if digest.hexdigest() != accepted.sha256:
        raise DatasetChanged(f"{accepted.uri}: the accepted copy no longer matches what was accepted")
    return path
