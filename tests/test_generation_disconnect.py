"""A generation client that goes away, as the gateway meets it: a real gateway process on a real Valkey, raw HTTP
clients that send a request and close their socket before the answer. Its place among its tenant's requests in
progress (LORAFLEET_MAX_GENERATIONS_PER_TENANT) is free again at once, streamed or not; and a gateway stopped with
SIGTERM after generation requests exits cleanly (its asyncio Redis client closed, no "Unclosed connection")."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import urllib.parse
import urllib.request

import openai
import pytest

from helpers_polling import wait_until
from test_gateway import FILE_LIMITS, client, running_gateway
from test_generation_async import generations, queued_of  # noqa: F401 (generations: a fixture)
from lorafleet.scheduler import keys
from lorafleet.scheduler.generation import GenerationRequest
from lorafleet.scheduler.redis_server import free_port

CAP = 2
MODEL = "test-org/tiny-model"  # a base no executor serves here: its requests wait until their timeout
HELD_TIMEOUT = 60.0  # long past the test: a slot freed within it was freed by the disconnect
FREED_WITHIN = 10.0  # well inside HELD_TIMEOUT, and outside a loaded 2-core CI machine's delays (2 s was not)


@pytest.fixture(scope="module")
def gateway_of_cap_2(redis_server, worker_env, tmp_path_factory):
    with running_gateway(redis_server, worker_env, tmp_path_factory.mktemp("gateway-disconnect"),
                         LORAFLEET_MAX_GENERATIONS_PER_TENANT=str(CAP)) as url:
        yield url


def open_request(gateway: str, token: str, stream: bool) -> http.client.HTTPConnection:
    """A completion request sent on its own connection, its answer not read."""
    address = urllib.parse.urlsplit(gateway)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    body = {"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 4, "stream": stream,
            "lorafleet": {"timeout": HELD_TIMEOUT}}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"authorization": f"Bearer {token}", "content-type": "application/json"})
    return connection


def hold_cap(gateway: str, tenant, generations, stream: bool, queued_before: int,  # noqa: F811
             within: float = 30.0) -> list[http.client.HTTPConnection]:
    """CAP requests of the tenant, each waiting (queued for the base) within `within` seconds."""
    held = [open_request(gateway, tenant.token, stream) for _ in range(CAP)]
    wait_until(lambda: queued_of(generations, tenant.name, MODEL) == queued_before + CAP,
               f"{CAP} more requests of the tenant queued (none refused with 429)", timeout=within)
    return held


def read_first_chunk(held: list[http.client.HTTPConnection], generations, tenant) -> None:  # noqa: F811
    """Stand in for the executor: a first text of each of the tenant's queued requests; each client reads it."""
    queue = keys.generation_queue(generations.resolve_model(tenant.name, MODEL).base.compat_key)
    queued = [GenerationRequest.model_validate_json(raw) for raw in generations.store.r.lrange(queue, 0, -1)]
    generations.publish_text([(request, 0, "the") for request in queued if request.tenant == tenant.name])
    for connection in held:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")


@pytest.mark.parametrize("stream, after_first_chunk", [(True, False), (True, True), (False, False)],
                         ids=["streamed", "streamed-after-first-chunk", "not-streamed"])
def test_a_client_that_disconnects_frees_its_place_among_its_tenants_requests_at_once(
        gateway_of_cap_2, generations, make_tenant, stream, after_first_chunk):  # noqa: F811
    tenant = make_tenant()
    held = hold_cap(gateway_of_cap_2, tenant, generations, stream, queued_before=0)
    if after_first_chunk:
        read_first_chunk(held, generations, tenant)
    for connection in held:
        connection.close()
    held_again = hold_cap(gateway_of_cap_2, tenant, generations, stream, queued_before=CAP, within=FREED_WITHIN)
    try:
        with pytest.raises(openai.RateLimitError):  # the cap still holds: the places were given back, not lost
            client(gateway_of_cap_2, tenant.token).completions.create(model=MODEL, prompt="hi")
    finally:
        for connection in held_again:
            connection.close()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_gateway_stopped_after_generation_requests_exits_cleanly(redis_server, worker_env, make_tenant, tmp_path,
                                                                    stop):
    """Python's dev mode shows the ResourceWarning of a connection left unclosed (only where the interpreter
    finalizes: after SIGINT; uvicorn ends a SIGTERM by raising it again, which kills the process first)."""
    port = free_port()
    log_path = tmp_path / "gateway.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", "gateway", "--port", str(port)],
            env={**worker_env, **FILE_LIMITS, "REDIS_URL": redis_server.role_url("gateway"), "PYTHONDEVMODE": "1"},
            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(url + "/healthz", timeout=1).status == 200
        except OSError:
            return process.poll() is not None  # exited: the asserts below show its log

    try:
        wait_until(up, "the gateway to answer", timeout=60)
        api = client(url, make_tenant().token)
        for stream in (False, True):  # each waits on the asyncio Redis client, then answers 504
            with pytest.raises(openai.APIStatusError) as timed_out:
                api.completions.create(model=MODEL, prompt="hi", stream=stream,
                                       extra_body={"lorafleet": {"timeout": 0.3}})
            assert timed_out.value.status_code == 504
    finally:
        process.send_signal(stop)
        exit_code = process.wait(20)
    log_text = log_path.read_text()
    # uvicorn shuts down on the signal, then raises it again as it returns: a clean stop may end with -signal
    assert exit_code in (0, -stop) and "Application shutdown complete" in log_text, log_text[-4000:]
    assert "unclosed" not in log_text.lower() and "Traceback" not in log_text, log_text[-4000:]
