"""`/v1/files`: OpenAI's files API on `scheduler.files.FileStore`, the store the Celery file tasks use too.

An upload is streamed: the multipart body is parsed as it arrives (`uploads.stream_upload`) and each chunk goes on to
`FileStore.upload`, which validates every line, hashes and writes it; the gateway never holds the body. A download
streams the stored bytes a chunk at a time. A job's results (`result_files`, a checkpoint's `file_id`) are files like
any other, packed on first ask (`scheduler.results`).
"""

from __future__ import annotations

from typing import Any, BinaryIO, Iterator, Literal, Optional
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lorafleet.gateway.app import ERROR_RESPONSES, Limit, State, Tenant, _refusals
from lorafleet.gateway.errors import ApiError
from lorafleet.gateway.models import ErrorResponse, FileDeleted, FileList, FileObject
from lorafleet.gateway.uploads import stream_upload
from lorafleet.scheduler.files import MAX_PART_BYTES, FileRecord

FILE_RESPONSES = {**ERROR_RESPONSES, **{
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (413, "larger than the size cap (LORAFLEET_MAX_DATASET_BYTES)"),
        (429, "over your file quota (bytes or count)"),
    )}}
# The body as the `openai` client and `curl -F` send it (the route reads it itself, streamed: `uploads`).
_UPLOAD_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["purpose", "file"], "properties": {
        "purpose": {"type": "string", "enum": ["fine-tune"], "description": "before the file part"},
        "file": {"type": "string", "format": "binary", "description": "JSONL: alpaca, chat `messages` or `text`"},
    }}}}}}


def file_view(record: FileRecord) -> FileObject:
    return FileObject(**record.to_openai())


def file_routes() -> APIRouter:
    router = APIRouter(prefix="/v1/files", tags=["files"], responses=FILE_RESPONSES)

    @router.post("", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
    async def create_file(request: Request, tenant: Tenant, gateway: State) -> FileObject:
        """Upload a dataset (multipart: `purpose` = fine-tune, then `file`). Every line is checked as it arrives: a
        bad one is refused naming its line (400, param `file`); the same bytes again return the same file."""
        def upload(filename: str, purpose: str, chunks: Iterator[bytes]) -> FileRecord:
            return _refusals(gateway.files.upload, tenant, filename, purpose, chunks)

        return file_view(await stream_upload(request, upload))

    @router.get("", response_model=FileList)
    def list_files(tenant: Tenant, gateway: State, after: Optional[str] = None, limit: Limit = 100,
                   purpose: Optional[str] = None, order: Literal["desc"] = "desc") -> FileList:
        """The tenant's files, newest first (only: `order` asc is refused); `after` = the last id of the previous
        page."""
        try:
            page = _refusals(gateway.files.list, tenant, after, limit, purpose)
        except ApiError as exc:
            if exc.status == 404:  # `after` names no file of the caller's
                raise ApiError(400, str(exc), param="after") from None
            raise
        has_more = len(page) == limit and bool(gateway.files.list(tenant, page[-1].file_id, 1, purpose))
        return FileList(data=[file_view(record) for record in page], has_more=has_more,
                        first_id=page[0].file_id if page else None, last_id=page[-1].file_id if page else None)

    @router.get("/{file_id}", response_model=FileObject)
    def retrieve_file(file_id: str, tenant: Tenant, gateway: State) -> FileObject:
        return file_view(_refusals(gateway.files.get, tenant, file_id))

    @router.get("/{file_id}/content", response_class=StreamingResponse,
                responses={200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"}})
    def file_content(file_id: str, tenant: Tenant, gateway: State) -> StreamingResponse:
        """The file's bytes, streamed, named by its filename (a result file is a tar of a PEFT adapter directory)."""
        record = _refusals(gateway.files.get, tenant, file_id)
        source = _refusals(gateway.files.open, tenant, file_id)
        return StreamingResponse(_chunks(source), media_type="application/octet-stream", headers={
            "content-length": str(record.bytes),
            "content-disposition": f"attachment; filename*=UTF-8''{quote(record.filename, safe='')}"})

    @router.delete("/{file_id}", response_model=FileDeleted)
    def delete_file(file_id: str, tenant: Tenant, gateway: State) -> FileDeleted:
        """Forget the file and free its quota at once; a job already training on it goes on."""
        record = _refusals(gateway.files.delete, tenant, file_id)
        return FileDeleted(id=record.file_id, deleted=True)

    return router


def _chunks(source: BinaryIO) -> Iterator[bytes]:
    with source:
        while chunk := source.read(MAX_PART_BYTES):
            yield chunk

