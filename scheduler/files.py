"""Tenants' files: datasets uploaded to train on, and results (adapters, checkpoints) packed to download.

One implementation for the HTTP gateway (`POST /v1/files` ...) and the Celery tasks (`lorafleet.upload_*`,
`lorafleet.read_file`, ...). A file is a `FileRecord` in Redis and its bytes in the dataset store
(`config.dataset_store()`), named by their SHA-256: a dataset at `datasets.accepted_path` (so a job submitted with
`dataset: "file-..."` trains on exactly the uploaded bytes, with no second copy), a result at `<sha256>.tar`.

    store = FileStore(redis_client, config.dataset_store(), FileLimits.from_env())
    record = store.upload(tenant, "train.jsonl", "fine-tune", chunks)   # chunks: any iterable of bytes
    store.get(tenant, record.file_id); store.list(tenant, after=None, limit=100, purpose=None)
    store.open(tenant, file_id) / store.read_chunk(tenant, file_id, offset, length)   # download
    store.delete(tenant, file_id)
    store.accepted(tenant, file_id, field)            # -> datasets.AcceptedDataset, for submission
    store.register_directory(tenant, "adapter", directory, "adapter.tar")   # a result, packed as one tar
    store.file_for_artifact(tenant, "adapter", uri, fetch, "adapter.tar")   # the same, once per artifact URI
    upload_id = store.begin_upload(tenant, filename, purpose, size)           # for clients that send parts
    store.add_part(tenant, upload_id, data, offset=None); store.complete_upload(tenant, upload_id)

Errors: `FileError` (a ValueError; bad content or argument, the message starts with the parameter, `file: line 3:
...`, and `.param` names it: 400), `FileTooLarge` (over `FileLimits.max_file_bytes`: 413), `FileQuotaExceeded`
(over the tenant's bytes or count quota: 429; also a `store.QuotaExceeded`), LookupError (no such file: an unknown
id and another tenant's id get the same message, so ids cannot be probed).

Decisions:
- An upload is streamed to a temporary file in the dataset store, hashed and validated line by line as it arrives
  (`formats.parse_record`, `check_record`: every record complete in its format, one format for the whole file,
  `LORAFLEET_MAX_RECORD_BYTES` per line, `LORAFLEET_MAX_RECORDS` lines), never held whole in memory. The stream stops as soon as it passes the size cap or
  what is left of the tenant's byte quota, and the temporary file is removed.
- The quota is checked again, atomically with making the record (one Lua script), so two parallel uploads cannot
  both take the last slot. Only uploads count against it; results (`register_directory`) do not.
- The same bytes uploaded again by the same tenant return the existing file (its id, filename and created_at):
  files are immutable and content-addressed, so a retried upload neither uses quota twice nor makes a twin.
- Deleting a file frees its quota at once. Its bytes are removed when no file of any tenant names them any longer,
  no unfinished job (queued, scheduled, running, paused) trains on them, and `ORPHAN_GRACE_SECONDS` have passed (a
  submission reading the file at that moment finishes first): a job keeps training on a deleted file.
- A chunked upload session lasts `UPLOAD_TTL_SECONDS` after its last part; a tenant has at most `MAX_OPEN_UPLOADS`
  open, each no larger than the size cap. Parts are at most `MAX_PART_BYTES` (what one Celery message carries).
  `add_part` with `offset` refuses a part that is not the next one, so a client may retry a part safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Optional

import redis

from lorafleet.scheduler import config, keys
from lorafleet.scheduler.datasets import (
    AcceptedDataset, accepted_path, max_dataset_bytes, max_record_bytes, max_records,
)
from lorafleet.scheduler.formats import DataError, RecordLines
from lorafleet.scheduler.records import JobState
from lorafleet.scheduler.spec import SpecError
from lorafleet.scheduler.store import MAX_LIST_LIMIT, QuotaExceeded, page_start

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")
UPLOAD_ID_RE = re.compile(r"^upload-[0-9a-f]{24}$")
UPLOAD_PURPOSES = ("fine-tune",)
RESULT_PURPOSE = "fine-tune-results"  # OpenAI's purpose for a job's result files
KINDS = ("dataset", "adapter", "checkpoint")
MAX_FILENAME_CHARS = 255
MAX_PART_BYTES = 1 << 20  # one part of a chunked upload, or one chunk read: base64 of it must fit a Celery message
UPLOAD_TTL_SECONDS = 3600
MAX_OPEN_UPLOADS = 4
ORPHAN_GRACE_SECONDS = 600
_UNFINISHED = tuple(state.value for state in JobState if not state.terminal)
_UPLOADS_DIR = ".uploads"


class FileError(ValueError):
    """A file or an argument refused; the message starts with `param` (`file: line 3: ...`)."""

    def __init__(self, message: str, param: str = "file"):
        super().__init__(f"{param}: {message}")
        self.param = param


class FileTooLarge(FileError):
    """Over the size cap of one file."""


class FileQuotaExceeded(FileError, QuotaExceeded):
    """Over the tenant's quota of bytes or files."""


@dataclass(frozen=True)
class FileLimits:
    max_file_bytes: int  # one file: the dataset cap (LORAFLEET_MAX_DATASET_BYTES), so every upload can be trained on
    quota_bytes: int  # the bytes of one tenant's uploaded files, together
    quota_count: int  # the number of one tenant's uploaded files

    @classmethod
    def from_env(cls) -> "FileLimits":
        return cls(max_dataset_bytes(), config.file_quota_bytes(), config.file_quota_count())


@dataclass(frozen=True)
class FileRecord:
    file_id: str
    tenant: str
    filename: str
    purpose: str  # "fine-tune" (uploads) or "fine-tune-results"
    bytes: int
    sha256: str
    created_at: int  # unix seconds
    records: int  # non-blank lines of a dataset; 0 for a result
    format: str  # a dataset's (`formats.FORMATS`): "alpaca", "chat", "text", "preference", ...; a result's: "tar"
    kind: str  # "dataset", "adapter" or "checkpoint"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.file_id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed"}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def blob(self) -> str:
        """The name of its bytes in the dataset store."""
        return _blob_name(self.sha256, self.kind)

    @classmethod
    def from_hash(cls, raw: dict[str, str]) -> "FileRecord":
        return cls(raw["file_id"], raw["tenant"], raw["filename"], raw["purpose"], int(raw["bytes"]), raw["sha256"],
                   int(raw["created_at"]), int(raw["records"]), raw["format"], raw["kind"])


def _blob_name(sha256: str, kind: str) -> str:
    return accepted_path(Path("."), sha256).name if kind == "dataset" else f"{sha256}.tar"


# KEYS: file, tenant files, tenant usage, tenant digests, blob refs, orphans, file sequence.
# ARGV: file id, blob, counted ('1': an upload, checked against the quota), quota bytes, quota count, bytes,
#       then the record's field/value pairs. Returns {1, id} when made, {0, existing id} for bytes the tenant has.
_REGISTER = """
local existing = redis.call('HGET', KEYS[4], ARGV[2])
if existing then return {0, existing} end
if ARGV[3] == '1' then
  local used = redis.call('HMGET', KEYS[3], 'bytes', 'count')
  local bytes, count, size = tonumber(used[1] or '0'), tonumber(used[2] or '0'), tonumber(ARGV[6])
  if count + 1 > tonumber(ARGV[5]) then return redis.error_reply('QUOTA_COUNT ' .. count .. ' ' .. ARGV[5]) end
  if bytes + size > tonumber(ARGV[4]) then return redis.error_reply('QUOTA_BYTES ' .. bytes .. ' ' .. ARGV[4]) end
  redis.call('HINCRBY', KEYS[3], 'bytes', size)
  redis.call('HINCRBY', KEYS[3], 'count', 1)
end
local seq = redis.call('INCR', KEYS[7])
redis.call('HSET', KEYS[1], 'seq', seq, 'blob', ARGV[2], unpack(ARGV, 7))
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[4], ARGV[2], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[2], 1)
redis.call('ZREM', KEYS[6], ARGV[2])
return {1, ARGV[1]}
"""

# KEYS: file, tenant files, tenant usage, tenant digests, blob refs, orphans. ARGV: file id, tenant, now.
_DELETE = """
local f = redis.call('HMGET', KEYS[1], 'tenant', 'blob', 'bytes', 'kind')
if f[1] ~= ARGV[2] then return redis.error_reply('NO_FILE') end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[4], f[2]) == ARGV[1] then redis.call('HDEL', KEYS[4], f[2]) end
if f[4] == 'dataset' then
  redis.call('HINCRBY', KEYS[3], 'bytes', -tonumber(f[3]))
  redis.call('HINCRBY', KEYS[3], 'count', -1)
end
if redis.call('HINCRBY', KEYS[5], f[2], -1) <= 0 then
  redis.call('HDEL', KEYS[5], f[2])
  redis.call('ZADD', KEYS[6], ARGV[3], f[2])
end
return 1
"""

# KEYS: blob refs, orphans. ARGV: blob, cutoff. 1 when the blob was orphaned before the cutoff and still is (it is
# taken out of the orphans: the caller removes it or puts it back).
_CLAIM_ORPHAN = """
local since = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not since or tonumber(since) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') > 0 then return 0 end
return 1
"""

# KEYS: upload session, tenant uploads. ARGV: upload id, now, ttl, most open, then the session's field/value pairs.
_BEGIN_UPLOAD = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return redis.error_reply('TOO_MANY ' .. ARGV[4]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: upload session, tenant uploads. ARGV: tenant, part bytes, offset or '', now, ttl, upload id.
# Returns the offset the part goes to; the bytes up to it are reserved for it.
_RESERVE_PART = """
local s = redis.call('HMGET', KEYS[1], 'tenant', 'bytes', 'reserved')
if s[1] ~= ARGV[1] then return redis.error_reply('NO_UPLOAD') end
local reserved = tonumber(s[3])
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= reserved then return redis.error_reply('OFFSET ' .. reserved) end
if reserved + tonumber(ARGV[2]) > tonumber(s[2]) then return redis.error_reply('OVER ' .. reserved .. ' ' .. s[2]) end
redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[6])
return reserved
"""

# KEYS: upload session. ARGV: part bytes. The bytes written so far, or -1 when the session is gone.
_WROTE_PART = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'written', ARGV[1])
"""

# KEYS: upload session, tenant uploads. ARGV: tenant, upload id, '1' to require every byte written.
# Ends the session; returns {filename, purpose, bytes}.
_END_UPLOAD = """
local s = redis.call('HMGET', KEYS[1], 'tenant', 'bytes', 'written', 'filename', 'purpose')
if s[1] ~= ARGV[1] then return redis.error_reply('NO_UPLOAD') end
if ARGV[3] == '1' and tonumber(s[3]) ~= tonumber(s[2]) then
  return redis.error_reply('INCOMPLETE ' .. s[3] .. ' ' .. s[2])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
return {s[4], s[5], s[2]}
"""


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to `out`."""

    def __init__(self, out: BinaryIO):
        self.out, self.digest, self.size = out, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


@dataclass(frozen=True)
class _Received:
    path: Path  # the bytes, at a temporary name in the dataset store
    sha256: str
    size: int
    records: int
    format: str


class FileStore:
    def __init__(self, client: redis.Redis, dataset_store: Path, limits: FileLimits):
        self.r = client
        self.dir = Path(dataset_store)
        self.limits = limits
        self._register = client.register_script(_REGISTER)
        self._delete = client.register_script(_DELETE)
        self._claim_orphan = client.register_script(_CLAIM_ORPHAN)
        self._begin_upload = client.register_script(_BEGIN_UPLOAD)
        self._reserve_part = client.register_script(_RESERVE_PART)
        self._wrote_part = client.register_script(_WROTE_PART)
        self._end_upload = client.register_script(_END_UPLOAD)

    # ---- uploads ----

    def upload(self, tenant: str, filename: str, purpose: str, chunks: Iterable[bytes]) -> FileRecord:
        """Stream `chunks` into a new dataset file of the tenant's (or its existing file with the same bytes)."""
        filename, purpose = _check_filename(filename), _check_purpose(purpose)
        stream_cap = self._stream_cap(tenant)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f".receiving-{secrets.token_hex(8)}"
        try:
            with open(path, "xb") as out:
                received = self._receive(chunks, out, path, stream_cap)
            return self._keep(tenant, filename, purpose, "dataset", received)
        finally:
            path.unlink(missing_ok=True)

    def _stream_cap(self, tenant: str) -> tuple[int, type[FileError], str]:
        """The most bytes an upload may stream now, the error past it and its message (the atomic check is
        `_REGISTER`'s: this one stops an over-quota stream early)."""
        used_bytes, used_count = self.usage(tenant)
        if used_count >= self.limits.quota_count:
            raise FileQuotaExceeded(f"quota exceeded: you have {used_count} files, the quota is "
                                    f"{self.limits.quota_count}; delete some first")
        left = self.limits.quota_bytes - used_bytes
        if left < self.limits.max_file_bytes:
            return left, FileQuotaExceeded, (f"quota exceeded: your files would take more than the quota of "
                                             f"{self.limits.quota_bytes} bytes ({used_bytes} used)")
        return self.limits.max_file_bytes, FileTooLarge, f"larger than the limit of {self.limits.max_file_bytes} bytes"

    @staticmethod
    def _receive(chunks: Iterable[bytes], out: BinaryIO, path: Path, cap: tuple[int, type[FileError], str]
                 ) -> _Received:
        limit, error, message = cap
        lines, digest, size = RecordLines(max_record_bytes(), max_records()), hashlib.sha256(), 0
        try:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise error(message)
                digest.update(chunk)
                lines.feed(chunk)
                out.write(chunk)
            records, fmt = lines.finish()
        except DataError as exc:
            raise FileError(str(exc)) from None
        return _Received(path, digest.hexdigest(), size, records, fmt)

    def _keep(self, tenant: str, filename: str, purpose: str, kind: str, received: _Received) -> FileRecord:
        """Record the received bytes as a file of the tenant's, then move them to their content-addressed name
        (the record first: a blob is only ever removed while no record names it, `collect_garbage`)."""
        record = FileRecord("file-" + secrets.token_hex(12), tenant, filename, purpose, received.size,
                            received.sha256, int(time.time()), received.records, received.format, kind)
        fields = [item for name, value in record.to_json().items() for item in (name, value)]
        try:
            made, file_id = self._register(
                keys=self._file_keys(tenant, record.file_id) + [keys.FILE_SEQ],
                args=[record.file_id, record.blob, "1" if kind == "dataset" else "0", self.limits.quota_bytes,
                      self.limits.quota_count, record.bytes, *fields])
        except redis.ResponseError as exc:
            raise _quota_error(str(exc), self.limits) from None
        if not made:
            return self.get(tenant, file_id)
        os.chmod(received.path, 0o440)
        os.replace(received.path, self.dir / record.blob)  # the same bytes under the same name: nothing changes
        return record

    def usage(self, tenant: str) -> tuple[int, int]:
        """(bytes, files) of the tenant's uploads, as counted against its quota."""
        used = self.r.hmget(keys.tenant_file_usage(tenant), "bytes", "count")
        return int(used[0] or 0), int(used[1] or 0)

    # ---- chunked uploads ----

    def begin_upload(self, tenant: str, filename: str, purpose: str, size: Any) -> str:
        """Open an upload of `size` bytes sent in parts; its id."""
        filename, purpose = _check_filename(filename), _check_purpose(purpose)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise FileError(f"must be a whole number of bytes >= 1, got {str(size)[:40]!r}", param="bytes")
        if size > self.limits.max_file_bytes:
            raise FileTooLarge(f"larger than the limit of {self.limits.max_file_bytes} bytes", param="bytes")
        used_bytes, used_count = self.usage(tenant)
        if used_count >= self.limits.quota_count or used_bytes + size > self.limits.quota_bytes:
            raise FileQuotaExceeded(f"quota exceeded: {used_count} files of {used_bytes} bytes used; the quota is "
                                    f"{self.limits.quota_count} files, {self.limits.quota_bytes} bytes",
                                    param="bytes")
        upload_id = "upload-" + secrets.token_hex(12)
        self._part_path(upload_id).parent.mkdir(parents=True, exist_ok=True)
        self._part_path(upload_id).touch(mode=0o600, exist_ok=False)
        try:
            self._begin_upload(
                keys=[keys.upload(upload_id), keys.tenant_uploads(tenant)],
                args=[upload_id, int(time.time()), UPLOAD_TTL_SECONDS, MAX_OPEN_UPLOADS, "tenant", tenant,
                      "filename", filename, "purpose", purpose, "bytes", size, "reserved", 0, "written", 0])
        except redis.ResponseError as exc:
            self._part_path(upload_id).unlink(missing_ok=True)
            if str(exc).startswith("TOO_MANY"):
                raise FileQuotaExceeded(f"you have {MAX_OPEN_UPLOADS} uploads open already; complete or cancel "
                                        "one first", param="upload_id") from None
            raise
        return upload_id

    def add_part(self, tenant: str, upload_id: str, data: bytes, offset: Optional[int] = None) -> int:
        """Append `data` (at most MAX_PART_BYTES); with `offset`, only if that is where the upload stands (a retried
        part is refused, not written twice). The bytes received so far."""
        _check_upload_id(upload_id)
        if not isinstance(data, bytes) or not 1 <= len(data) <= MAX_PART_BYTES:
            raise FileError(f"a part holds 1 to {MAX_PART_BYTES} bytes", param="data")
        if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool) or offset < 0):
            raise FileError("must be a whole number >= 0", param="offset")
        session = [keys.upload(upload_id), keys.tenant_uploads(tenant)]
        try:
            at = self._reserve_part(keys=session, args=[tenant, len(data), "" if offset is None else offset,
                                                        int(time.time()), UPLOAD_TTL_SECONDS, upload_id])
        except redis.ResponseError as exc:
            raise _part_error(str(exc), upload_id) from None
        try:
            fd = os.open(self._part_path(upload_id), os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LookupError(_no_upload(upload_id)) from None
        try:
            os.pwrite(fd, data, at)
        except OSError:
            self.cancel_upload(tenant, upload_id)
            raise
        finally:
            os.close(fd)
        written = self._wrote_part(keys=session[:1], args=[len(data)])
        if written < 0:
            raise LookupError(_no_upload(upload_id))
        return written

    def complete_upload(self, tenant: str, upload_id: str) -> FileRecord:
        """The uploaded bytes, checked like `upload`'s, as a file (the session ends, whether they pass or not)."""
        filename, purpose, _ = self._end(tenant, upload_id, require_complete=True)
        path = self._part_path(upload_id)
        try:
            stream_cap = self._stream_cap(tenant)
            with open(path, "rb") as source:
                received = self._receive(iter(lambda: source.read(MAX_PART_BYTES), b""), _Discard(), path,
                                         stream_cap)
            return self._keep(tenant, filename, purpose, "dataset", received)
        finally:
            path.unlink(missing_ok=True)

    def cancel_upload(self, tenant: str, upload_id: str) -> None:
        self._end(tenant, upload_id, require_complete=False)
        self._part_path(upload_id).unlink(missing_ok=True)

    def _end(self, tenant: str, upload_id: str, require_complete: bool) -> tuple[str, str, int]:
        _check_upload_id(upload_id)
        try:
            filename, purpose, size = self._end_upload(
                keys=[keys.upload(upload_id), keys.tenant_uploads(tenant)],
                args=[tenant, upload_id, "1" if require_complete else "0"])
        except redis.ResponseError as exc:
            raise _part_error(str(exc), upload_id) from None
        return filename, purpose, int(size)

    def _part_path(self, upload_id: str) -> Path:
        return self.dir / _UPLOADS_DIR / f"{upload_id}.part"

    # ---- reading ----

    def get(self, tenant: str, file_id: Any) -> FileRecord:
        """The tenant's file; LookupError, with one message, for an unknown id and another tenant's."""
        if not isinstance(file_id, str) or not FILE_ID_RE.fullmatch(file_id):  # never echo what is not an id
            raise LookupError("no such file: a file id is 'file-' and 24 hex digits")
        raw = self.r.hgetall(keys.file(file_id))
        if not raw or raw.get("tenant") != tenant:
            raise LookupError(f"no file {file_id!r}")
        return FileRecord.from_hash(raw)

    def list(self, tenant: str, after: Optional[str] = None, limit: int = 100, purpose: Optional[str] = None
             ) -> list[FileRecord]:
        """The tenant's files, newest first, starting after the file `after` (ask for one more than you show to
        know whether more follow). LookupError when `after` is not one of the tenant's files."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise FileError(f"must be 1 to {MAX_LIST_LIMIT}", param="limit")
        if purpose is not None and purpose not in (*UPLOAD_PURPOSES, RESULT_PURPOSE):
            raise FileError(f"one of {', '.join((*UPLOAD_PURPOSES, RESULT_PURPOSE))}", param="purpose")
        start = page_start(self.r, keys.tenant_files(tenant), after, "file")
        found: list[FileRecord] = []
        while len(found) < limit:
            ids = self.r.zrevrange(keys.tenant_files(tenant), start, start + limit - 1)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for file_id in ids:
                pipe.hgetall(keys.file(file_id))
            records = [FileRecord.from_hash(raw) for raw in pipe.execute() if raw]
            found += [record for record in records if purpose is None or record.purpose == purpose]
            start += len(ids)
        return found[:limit]

    def open(self, tenant: str, file_id: str) -> BinaryIO:
        """The file's bytes, to stream (the caller closes it)."""
        return open(self._blob_path(self.get(tenant, file_id)), "rb")

    def read_chunk(self, tenant: str, file_id: str, offset: Any, length: Any = MAX_PART_BYTES) -> bytes:
        """At most `length` (<= MAX_PART_BYTES) bytes of the file from `offset`; b"" at its end."""
        record = self.get(tenant, file_id)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise FileError("must be a whole number >= 0", param="offset")
        if not isinstance(length, int) or isinstance(length, bool) or not 1 <= length <= MAX_PART_BYTES:
            raise FileError(f"must be 1 to {MAX_PART_BYTES}", param="length")
        fd = os.open(self._blob_path(record), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _blob_path(self, record: FileRecord) -> Path:
        path = self.dir / record.blob
        if not path.is_file():
            raise LookupError(f"{record.file_id}: its bytes are missing from the store (tell the operator)")
        return path

    def accepted(self, tenant: str, file_id: str, field: str = "dataset") -> AcceptedDataset:
        """The dataset a job submitted with `<field>: file_id` trains on: the file's own bytes, not a copy.
        SpecError naming the field when it is no dataset file of the tenant's."""
        try:
            record = self.get(tenant, file_id)
            self._blob_path(record)
        except LookupError as exc:
            raise SpecError(f"invalid job spec: {field}: {exc.args[0]}") from None
        if record.kind != "dataset":
            raise SpecError(f"invalid job spec: {field}: {file_id!r} is a result file ({record.kind}), not a dataset")
        return AcceptedDataset(file_id, record.sha256, record.bytes, record.records, record.format)

    # ---- results ----

    def register_directory(self, tenant: str, kind: str, directory: Path, filename: str) -> FileRecord:
        """A result directory (a PEFT adapter, a checkpoint) packed as one tar file of the tenant's (not counted
        against its quota). The tar is deterministic: the same files give the same bytes, so the same file id."""
        if kind not in KINDS[1:]:
            raise ValueError(f"kind: one of {', '.join(KINDS[1:])}, got {kind!r}")
        filename = _check_filename(filename)
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f".receiving-{secrets.token_hex(8)}"
        try:
            with open(path, "xb") as out:
                writer = _HashingWriter(out)
                pack_directory(Path(directory), writer)
            received = _Received(path, writer.digest.hexdigest(), writer.size, 0, "tar")
            return self._keep(tenant, filename, RESULT_PURPOSE, kind, received)
        finally:
            path.unlink(missing_ok=True)

    def file_for_artifact(self, tenant: str, kind: str, uri: str, fetch: Callable[[str], Path], filename: str
                          ) -> FileRecord:
        """The file of a job's artifact (`adapter_uri`, a checkpoint URI): packed on first ask, from the local
        directory `fetch(uri)` gives (`ArtifactStore.fetch`), and the same file after (until the tenant deletes it)."""
        known = self.r.hget(keys.tenant_artifact_files(tenant), uri)
        if known is not None:
            try:
                return self.get(tenant, known)
            except LookupError:
                pass  # the tenant deleted it: pack it again
        record = self.register_directory(tenant, kind, fetch(uri), filename)
        self.r.hset(keys.tenant_artifact_files(tenant), uri, record.file_id)
        return record

    def forget_artifacts(self, tenant: str, uris: Iterable[str]) -> int:
        """Delete the files packed from these artifact URIs (a purged job's adapter and checkpoints); how many."""
        removed = 0
        for uri in uris:
            file_id = self.r.hget(keys.tenant_artifact_files(tenant), uri)
            if file_id is None:
                continue
            try:
                self.delete(tenant, file_id)
                removed += 1
            except LookupError:
                pass  # the tenant deleted it already
            self.r.hdel(keys.tenant_artifact_files(tenant), uri)
        return removed

    # ---- deleting ----

    def delete(self, tenant: str, file_id: str) -> FileRecord:
        """Forget the tenant's file and free its quota; its bytes go later (`collect_garbage`)."""
        record = self.get(tenant, file_id)
        try:
            self._delete(keys=self._file_keys(tenant, file_id), args=[file_id, tenant, time.time()])
        except redis.ResponseError as exc:
            if str(exc) == "NO_FILE":  # deleted by a parallel call
                raise LookupError(f"no file {file_id!r}") from None
            raise
        self.collect_garbage()
        return record

    def collect_garbage(self, now: Optional[float] = None) -> list[str]:
        """Remove the bytes no file names any more (orphaned more than ORPHAN_GRACE_SECONDS ago and used by no
        unfinished job), and uploads abandoned for UPLOAD_TTL_SECONDS. The blobs removed."""
        now = time.time() if now is None else now
        removed: list[str] = []
        due = self.r.zrangebyscore(keys.FILE_ORPHANS, "-inf", now - ORPHAN_GRACE_SECONDS)
        in_use = self._blobs_of_unfinished_jobs() if due else set()
        for blob in due:
            if not self._claim_orphan(keys=[keys.FILE_BLOB_REFS, keys.FILE_ORPHANS],
                                      args=[blob, now - ORPHAN_GRACE_SECONDS]):
                continue
            if blob in in_use:
                self.r.zadd(keys.FILE_ORPHANS, {blob: now})  # look again once the job is done
            elif self._remove_blob(blob):
                removed.append(blob)
        self._sweep_abandoned(now)
        return removed

    def _remove_blob(self, blob: str) -> bool:
        """Move the blob aside, and remove it unless a record named it meanwhile (an upload of the same bytes, whose
        own copy under that name is then the same bytes): then put it back."""
        path, tombstone = self.dir / blob, self.dir / f".deleting-{secrets.token_hex(8)}"
        try:
            os.rename(path, tombstone)
        except FileNotFoundError:
            return False
        if int(self.r.hget(keys.FILE_BLOB_REFS, blob) or 0) > 0:
            os.replace(tombstone, path)
            return False
        tombstone.unlink()
        return True

    def _blobs_of_unfinished_jobs(self) -> set[str]:
        pipe = self.r.pipeline(transaction=False)
        for state in _UNFINISHED:
            pipe.smembers(keys.state_set(state))
        job_ids = [job_id for members in pipe.execute() for job_id in members]
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job(job_id), "datasets")
        return {_blob_name(accepted["sha256"], "dataset")
                for raw in pipe.execute() if raw for accepted in json.loads(raw).values()}

    def _sweep_abandoned(self, now: float) -> None:
        """Parts of expired upload sessions, and temporary files of uploads whose process died."""
        stale = now - UPLOAD_TTL_SECONDS
        for path in [*self.dir.glob(".receiving-*"), *(self.dir / _UPLOADS_DIR).glob("*.part")]:
            try:
                if path.stat().st_mtime < stale and not (path.suffix == ".part" and self.r.exists(
                        keys.upload(path.stem))):
                    path.unlink()
            except FileNotFoundError:
                pass

    def _file_keys(self, tenant: str, file_id: str) -> list[str]:
        return [keys.file(file_id), keys.tenant_files(tenant), keys.tenant_file_usage(tenant),
                keys.tenant_file_digests(tenant), keys.FILE_BLOB_REFS, keys.FILE_ORPHANS]


class _Discard:
    """An output that keeps nothing: a completed chunked upload is checked where its parts already lie."""

    def write(self, data: bytes) -> int:
        return len(data)


def pack_directory(directory: Path, out: BinaryIO) -> None:
    """`directory`'s files as a tar stream, deterministic: sorted names, no owners, times or modes of the host's.
    Only regular files and directories; anything else (a link, a device) is refused."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            name = path.relative_to(directory).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ValueError(f"{name}: only regular files and directories can be packed")
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_dir():
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                continue
            info.mode, info.size = 0o644, path.stat().st_size
            with open(path, "rb") as source:
                tar.addfile(info, source)


def is_file_id(value: Any) -> bool:
    return isinstance(value, str) and bool(FILE_ID_RE.fullmatch(value))


def accepted_file(files: Optional[FileStore], tenant: str, file_id: str, field: str) -> AcceptedDataset:
    """`FileStore.accepted`, for a submission path that may have no file store (operator tools)."""
    if files is None:
        raise SpecError(f"invalid job spec: {field}: file ids are not served here; name a file under the data root")
    return files.accepted(tenant, file_id, field)


def _check_filename(filename: Any) -> str:
    if not isinstance(filename, str) or not 1 <= len(filename) <= MAX_FILENAME_CHARS or not filename.isprintable():
        raise FileError(f"the file name must be 1 to {MAX_FILENAME_CHARS} printable characters", param="filename")
    return filename


def _check_purpose(purpose: Any) -> str:
    if purpose not in UPLOAD_PURPOSES:
        raise FileError(f"must be {' or '.join(UPLOAD_PURPOSES)}, got {str(purpose)[:40]!r}", param="purpose")
    return purpose


def _check_upload_id(upload_id: Any) -> None:
    if not isinstance(upload_id, str) or not UPLOAD_ID_RE.fullmatch(upload_id):
        raise LookupError("no such upload: an upload id is 'upload-' and 24 hex digits")


def _no_upload(upload_id: str) -> str:
    return (f"no upload {upload_id!r} (it was completed, cancelled, or expired {UPLOAD_TTL_SECONDS} s after its "
            "last part)")


def _quota_error(reason: str, limits: FileLimits) -> Exception:
    if reason.startswith("QUOTA_COUNT"):
        _, used, _ = reason.split()
        return FileQuotaExceeded(f"quota exceeded: you have {used} files, the quota is {limits.quota_count}; "
                                 "delete some first")
    if reason.startswith("QUOTA_BYTES"):
        _, used, _ = reason.split()
        return FileQuotaExceeded(f"quota exceeded: your files would take more than the quota of "
                                 f"{limits.quota_bytes} bytes ({used} used)")
    return redis.ResponseError(reason)


def _part_error(reason: str, upload_id: str) -> Exception:
    if reason == "NO_UPLOAD":
        return LookupError(_no_upload(upload_id))
    if reason.startswith("OFFSET"):
        return FileError(f"the upload stands at byte {reason.split()[1]}: send the part that starts there",
                         param="offset")
    if reason.startswith("OVER"):
        _, at, size = reason.split()
        return FileError(f"the part goes past the {size} bytes declared (the upload stands at byte {at})",
                         param="data")
    if reason.startswith("INCOMPLETE"):
        _, written, size = reason.split()
        return FileError(f"{written} of the {size} bytes declared have arrived; send the rest first",
                         param="upload_id")
    return redis.ResponseError(reason)
