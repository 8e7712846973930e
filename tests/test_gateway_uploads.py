"""`gateway.uploads`: a multipart body is handed on chunk by chunk as it arrives, never whole. A real uvicorn server
(in a thread) with one route that streams the file part into a SHA-256, and the real `httpx` client."""

from __future__ import annotations

import hashlib
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from lorafleet.gateway import errors
from lorafleet.gateway.uploads import stream_upload
from lorafleet.scheduler.redis_server import free_port


@pytest.fixture(scope="module")
def server():
    app = FastAPI()
    errors.install(app)

    @app.post("/upload")
    async def upload(request: Request) -> dict:
        def consume(filename, purpose, chunks):
            digest, sizes = hashlib.sha256(), []
            for chunk in chunks:
                digest.update(chunk)
                sizes.append(len(chunk))
            return {"filename": filename, "purpose": purpose, "sha256": digest.hexdigest(), "chunks": len(sizes),
                    "largest": max(sizes, default=0)}

        return await stream_upload(request, consume)

    port = free_port()
    running = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    while not running.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    running.should_exit = True
    thread.join(10)


def test_a_large_file_part_arrives_in_chunks_with_its_bytes_intact(server):
    body = bytes(range(256)) * (32 * 1024)  # 8 MiB
    answer = httpx.post(server + "/upload", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", body)},
                        timeout=60).json()
    assert answer["sha256"] == hashlib.sha256(body).hexdigest() and answer["filename"] == "train.jsonl"
    assert answer["purpose"] == "fine-tune"
    assert answer["chunks"] > 8 and answer["largest"] <= 1 << 20, "handed on as it arrived, never whole"


@pytest.mark.parametrize("send, param", [
    ({"files": {"file": ("a.jsonl", b"{}")}}, "purpose"),
    ({"data": {"purpose": "fine-tune"}}, "file"),
    ({"content": b"not a form", "headers": {"content-type": "text/plain"}}, "file"),
    ({"content": b"xx--b\r\n\r\n", "headers": {"content-type": "multipart/form-data; boundary=b"}}, "file"),
    ({"data": {"purpose": "x" * 5000}, "files": {"file": ("a.jsonl", b"{}")}}, "purpose"),
])
def test_a_malformed_form_is_refused_naming_the_field(server, send, param):
    answer = httpx.post(server + "/upload", timeout=30, **send)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
