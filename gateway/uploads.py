"""`POST /v1/files` bodies, streamed: a multipart/form-data request is parsed as it arrives (python-multipart's
push parser on the raw request stream), and the file part's bytes go to the file store one network chunk at a time.

Neither FastAPI's `UploadFile` (which spools the whole part to a temporary file first) nor `request.form()` is used:
at no point does the gateway hold more than one chunk of the body, in memory or on its own disk. The file store's
`upload` is synchronous and takes an iterator of chunks; it runs in a worker thread whose iterator pulls each next
chunk from the event loop (`anyio.from_thread.run`).

The small form fields (`purpose`) must come before the file part, as the `openai` client and curl's `-F` send them.
"""

from __future__ import annotations

from collections import deque
from typing import AsyncIterator, Callable, Iterator, Optional, TypeVar

import anyio.from_thread
import anyio.to_thread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from lorafleet.gateway.errors import ApiError

MAX_FIELD_BYTES = 1024  # a form field other than the file (`purpose`)
DRAIN_BYTES = 64 << 20  # after a refusal, body bytes read and dropped so the client gets the answer, not a reset
T = TypeVar("T")


class MultipartStream:
    """One multipart/form-data request body, read part by part as it arrives."""

    def __init__(self, request: Request):
        content_type, params = parse_options_header(request.headers.get("content-type", ""))
        if content_type != b"multipart/form-data" or not params.get(b"boundary"):
            raise ApiError(400, "file: send multipart/form-data with a 'file' part and a 'purpose' field",
                           param="file")
        self._body: AsyncIterator[bytes] = request.stream().__aiter__()
        self._parser = MultipartParser(params[b"boundary"], {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        })
        self.fields: dict[str, str] = {}
        self.filename: Optional[str] = None  # of the file part, once its headers are read
        self._headers: dict[bytes, bytes] = {}
        self._header: list[bytes] = [b"", b""]
        self._part_name: Optional[str] = None
        self._field_value = bytearray()
        self._in_file = self._file_done = self._ended = False
        self._file_data: deque[bytes] = deque()

    # ---- parser callbacks ----

    def _part_begin(self) -> None:
        self._headers, self._field_value = {}, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header[0].lower()] = self._header[1]
        self._header = [b"", b""]

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._part_name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            if self.filename is not None:
                raise ApiError(400, "file: send one file per request", param="file")
            self.filename = options[b"filename"].decode("utf-8", "replace")
            self._in_file = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._file_data.append(bytes(data[start:end]))
            return
        self._field_value += data[start:end]
        if len(self._field_value) > MAX_FIELD_BYTES:
            raise ApiError(400, f"{self._part_name}: a form field holds at most {MAX_FIELD_BYTES} bytes",
                           param=self._part_name or None)

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file, self._file_done = False, True
        elif self._part_name:
            self.fields[self._part_name] = self._field_value.decode("utf-8", "replace")

    # ---- reading ----

    async def _feed(self) -> None:
        """Parse the next chunk of the body (or finish at its end)."""
        try:
            chunk = await self._body.__anext__()
        except StopAsyncIteration:
            chunk = b""
        except ClientDisconnect:
            raise ApiError(400, "file: the client went away before the body ended", param="file") from None
        try:
            if chunk:
                self._parser.write(chunk)
            else:
                self._parser.finalize()
                self._ended = True
        except MultipartParseError as exc:
            raise ApiError(400, f"file: not a multipart/form-data body: {exc}", param="file") from None

    async def until_file(self) -> str:
        """Read up to the file part's first bytes; its filename."""
        while self.filename is None and not self._ended:
            await self._feed()
        if self.filename is None:
            raise ApiError(400, "file: no file part in the form", param="file")
        return self.filename

    async def next_file_chunk(self) -> Optional[bytes]:
        """The file's next bytes, None after its last."""
        while not self._file_data and not self._file_done and not self._ended:
            await self._feed()
        if self._file_data:
            return self._file_data.popleft()
        if not self._file_done:
            raise ApiError(400, "file: the body ended inside the file part", param="file")
        return None

    async def drain(self, limit: int = DRAIN_BYTES) -> None:
        """Read (and drop) what is left of the body, up to `limit` bytes."""
        read = 0
        async for chunk in self._body:
            read += len(chunk)
            if read > limit:
                break

    def file_chunks(self) -> Iterator[bytes]:
        """The file's bytes as a blocking iterator, for a worker thread (each chunk is read on the event loop)."""
        while (chunk := anyio.from_thread.run(self.next_file_chunk)) is not None:
            yield chunk


async def stream_upload(request: Request, upload: Callable[[str, str, Iterator[bytes]], T]) -> T:
    """Read the form's fields up to the file part, then run `upload(filename, purpose, chunks)` in a worker thread
    while the file's bytes arrive."""
    form = MultipartStream(request)
    try:
        filename = await form.until_file()
        purpose = form.fields.get("purpose")
        if purpose is None:
            raise ApiError(400, "purpose: missing (send it before the file part)", param="purpose")
        result = await anyio.to_thread.run_sync(upload, filename, purpose, form.file_chunks())
        await form.drain(MAX_FIELD_BYTES * 16)
        return result
    except BaseException:
        await form.drain()
        raise
