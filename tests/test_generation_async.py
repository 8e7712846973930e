"""The tenant boundary of generation, as tenants meet it: a real gateway process on a real Valkey, the real `openai`
client (sync and async), and `lorafleet.generate` through a real Celery worker. A tenant's waiting completions and
streams hold no worker thread of the gateway (another tenant is answered at once), a tenant has at most
LORAFLEET_MAX_GENERATIONS_PER_TENANT in progress (429 past it, the others unaffected), a base's full queue is refused
with 429, and a model on a base the engine does not run is refused at submission naming the model and the reason."""

from __future__ import annotations

import asyncio
import threading
import time

import openai
import pytest

from helpers_models import build_tiny_model
from helpers_polling import wait_until
from test_gateway import client, running_gateway
from test_generation_store import trained_job
from lorafleet.scheduler import keys
from lorafleet.scheduler.generation import MAX_WAITING_PER_BASE, Generations, fine_tuned_model_name

# More than the server's worker threads (anyio's default pool: 40): with waits on those threads, 50 waiting requests
# of one tenant would leave none for anyone else.
CAP = 50
WAIT_SECONDS = 6.0  # how long tenant A's requests wait (no executor serves the base here)
PROMPT = "the quick brown fox"
CHAT = [{"role": "user", "content": "hi"}]
UNSUPPORTED = "which the generation engine does not run (it runs llama, mistral, qwen2, qwen3)"


@pytest.fixture(scope="module")
def capped_gateway(redis_server, worker_env, tmp_path_factory):
    """A gateway that lets a tenant have CAP generation requests in progress."""
    with running_gateway(redis_server, worker_env, tmp_path_factory.mktemp("gateway-capped"),
                         LORAFLEET_MAX_GENERATIONS_PER_TENANT=str(CAP)) as url:
        yield url


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny Gemma (a family the engine does not run), under the operator's model roots (the session's temp dir)."""
    return build_tiny_model(tmp_path_factory.mktemp("gemma") / "gemma", "gemma")


@pytest.fixture
def generations(store, hf_cache, base_model_dir) -> Generations:
    return Generations(store, hf_cache, [base_model_dir.parent.parent])


def queued_of(generations: Generations, tenant: str, model: str) -> int:
    """The tenant's requests waiting in the queue of `model`'s base."""
    queue = keys.generation_queue(generations.resolve_model(tenant, model).base.compat_key)
    return sum(f'"tenant":"{tenant}"' in raw for raw in generations.store.r.lrange(queue, 0, -1))


async def wait_all(gateway: str, token: str, count: int) -> list[BaseException]:
    """`count` requests of one tenant at once, half completions, half chat streams; how each ended."""
    api = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=token, max_retries=0, timeout=60)
    wait = {"lorafleet": {"timeout": WAIT_SECONDS}}

    async def one(number: int) -> None:
        if number % 2:
            await api.completions.create(model="test-org/tiny-model", prompt=PROMPT, max_tokens=4, extra_body=wait)
            return
        stream = await api.chat.completions.create(model="test-org/tiny-model", messages=CHAT, stream=True,
                                                   extra_body=wait)
        async for _ in stream:
            pass

    try:
        return await asyncio.gather(*(one(number) for number in range(count)), return_exceptions=True)
    finally:
        await api.close()


def in_background(gateway: str, token: str, count: int) -> tuple[threading.Thread, list]:
    ended: list = []
    waiting = threading.Thread(target=lambda: ended.extend(asyncio.run(wait_all(gateway, token, count))))
    waiting.start()
    return waiting, ended


def seconds_of(call) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def test_a_tenants_waiting_generations_leave_the_gateway_to_other_tenants(capped_gateway, generations,
                                                                          make_tenant):
    heavy, other = make_tenant(), make_tenant()
    waiting, ended = in_background(capped_gateway, heavy.token, CAP)
    wait_until(lambda: queued_of(generations, heavy.name, "test-org/tiny-model") == CAP,
               f"the gateway to queue tenant A's {CAP} requests", timeout=20)
    api = client(capped_gateway, other.token)
    for answered in (api.fine_tuning.jobs.list, api.files.list):
        assert seconds_of(answered) < 2.0, "another tenant's requests are answered while A's wait"
    with pytest.raises(openai.APIStatusError) as timed_out:
        api.completions.create(model="test-org/tiny-model", prompt=PROMPT, extra_body={"lorafleet": {"timeout": 0.5}})
    assert timed_out.value.status_code == 504, "another tenant's generation is not counted against A's cap"
    with pytest.raises(openai.RateLimitError) as capped:
        client(capped_gateway, heavy.token).completions.create(model="test-org/tiny-model", prompt=PROMPT)
    assert f"at most {CAP} per tenant at once" in capped.value.message and capped.value.code == "rate_limit_exceeded"
    waiting.join(30)
    assert len(ended) == CAP and all(isinstance(end, openai.APIStatusError) and end.status_code == 504
                                     for end in ended), ended
    with pytest.raises(openai.APIStatusError) as again:  # every request, streamed or not, gave its slot back
        client(capped_gateway, heavy.token).completions.create(model="test-org/tiny-model", prompt=PROMPT,
                                                               extra_body={"lorafleet": {"timeout": 0.5}})
    assert again.value.status_code == 504


def test_a_base_whose_queue_is_full_refuses_more_requests_with_429_naming_the_base(capped_gateway, generations,
                                                                                    make_tenant, base_model_dir):
    tenant = make_tenant()
    model = str(base_model_dir)
    filler = generations.submit(tenant.name, model, prompt=PROMPT, timeout=30)
    queue = keys.generation_queue(filler.target.base.compat_key)
    generations.store.r.rpush(queue, *[filler.model_dump_json()] * (MAX_WAITING_PER_BASE - 1))
    try:
        with pytest.raises(openai.RateLimitError) as full:
            client(capped_gateway, tenant.token).completions.create(model=model, prompt=PROMPT)
        assert f"too many generation requests are waiting for base {model!r} ({MAX_WAITING_PER_BASE})" \
            in full.value.message
    finally:
        generations.store.r.delete(queue)


def test_a_model_on_a_base_the_engine_does_not_run_is_refused_by_the_gateway_naming_it(
        capped_gateway, generations, make_tenant, gemma_dir, store):
    tenant = make_tenant()
    api = client(capped_gateway, tenant.token)
    base, fine_tuned = str(gemma_dir), fine_tuned_model_name(trained_job(store, tenant.name, gemma_dir))
    refusals = [(base, lambda: api.completions.create(model=base, prompt=PROMPT)),
                (base, lambda: api.completions.create(model=base, prompt=PROMPT, stream=True)),
                (fine_tuned, lambda: api.chat.completions.create(model=fine_tuned, messages=CHAT)),
                (fine_tuned, lambda: api.chat.completions.create(model=fine_tuned, messages=CHAT, stream=True))]
    for model, refused_call in refusals:
        with pytest.raises(openai.BadRequestError) as refused:
            refused_call()
        assert refused.value.param == "model"
        assert f"{model!r} runs on base {base!r}, of family 'gemma', {UNSUPPORTED}" in refused.value.message
    queue = keys.generation_queue(generations.resolve_model(tenant.name, base).base.compat_key)
    assert not generations.store.r.exists(queue), "nothing was queued for an executor to load the base for"


def test_a_model_on_a_base_the_engine_does_not_run_is_refused_through_celery(call, make_tenant, gemma_dir):
    with pytest.raises(ValueError, match=f"^model: '{gemma_dir}' runs on base '{gemma_dir}', of family 'gemma', "
                                         f"{UNSUPPORTED.replace('(', '[(]').replace(')', '[)]')}"):
        call("lorafleet.generate", make_tenant().token, {"model": str(gemma_dir), "prompt": PROMPT})
