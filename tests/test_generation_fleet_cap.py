"""A tenant's cap on generation requests in progress (LORAFLEET_MAX_GENERATIONS_PER_TENANT) holds for the service,
not per gateway: two real gateway processes on one real Valkey, the real `openai` client and raw HTTP clients, this
test standing in for the executor (answering on the store's executor-side verbs). The cap is counted across both
gateways, a slot comes back however its request ends, the slots of a gateway that died are free after their lease,
and concurrent takers on two clients never pass the limit."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import openai
import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers_polling import wait_until
from test_gateway import client, running_gateway
from test_generation_async import generations, queued_of  # noqa: F401 (generations: a fixture)
from test_generation_disconnect import open_request
from lorafleet.scheduler import keys
from lorafleet.scheduler.generation import ChoiceResult, GenerationRequest, GenerationResult
from lorafleet.scheduler.generation_slots import GenerationSlots

CAP = 3
MODEL = "test-org/tiny-model"  # a base no executor serves here: a request waits unless this test answers it
PROBE_TIMEOUT = 0.3  # a request that passes the cap ends in 504 after this; one refused gets 429 at once
LEASE_SECONDS = 2.0  # the lease of the slots this test takes itself (the gateways' own: LEASE_SECONDS, 30 s)


@pytest.fixture(scope="module")
def two_gateways(redis_server, worker_env, tmp_path_factory) -> tuple[str, str]:
    """Two gateway processes of cap CAP on the session's Valkey, as two replicas behind a load balancer."""
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(running_gateway(redis_server, worker_env, tmp_path_factory.mktemp(name),
                                                        LORAFLEET_MAX_GENERATIONS_PER_TENANT=str(CAP)))
                    for name in ("gateway-a", "gateway-b"))


def probe(gateway: str, token: str) -> int:
    """The status of one short completion request: 504 when it passed the cap (no executor answers), else 429."""
    with pytest.raises(openai.APIStatusError) as ended:
        client(gateway, token).completions.create(model=MODEL, prompt="probe",
                                                  extra_body={"lorafleet": {"timeout": PROBE_TIMEOUT}})
    return ended.value.status_code


def slots_of(store, tenant: str) -> int:
    """The tenant's slots in the store (their leases are 30 s: none ends during a test)."""
    return store.r.zcard(keys.generation_slots(tenant))


def hold(gateways: tuple[str, ...], tenant, generations, count: int, stream: bool = False  # noqa: F811
         ) -> list:
    """`count` waiting requests of the tenant, sent to the gateways in turn, each queued (none refused)."""
    before = queued_of(generations, tenant.name, MODEL)
    held = [open_request(gateways[number % len(gateways)], tenant.token, stream) for number in range(count)]
    wait_until(lambda: queued_of(generations, tenant.name, MODEL) == before + count,
               f"{count} more requests of the tenant queued (none refused with 429)", timeout=10)
    return held


def test_a_tenants_requests_past_the_cap_are_refused_by_either_gateway_while_another_tenants_pass(
        two_gateways, generations, make_tenant, store):  # noqa: F811
    heavy, other = make_tenant(), make_tenant()
    held = hold(two_gateways, heavy, generations, CAP)  # spread over both: neither has CAP of them on its own
    try:
        for gateway in two_gateways:
            with pytest.raises(openai.RateLimitError) as capped:
                client(gateway, heavy.token).completions.create(model=MODEL, prompt="one too many")
            assert f"at most {CAP} per tenant at once in the service" in capped.value.message
            assert capped.value.code == "rate_limit_exceeded"
            assert probe(gateway, other.token) == 504, "another tenant's request is not counted against the cap"
        assert slots_of(store, heavy.name) == CAP and slots_of(store, other.name) == 0
    finally:
        for connection in held:
            connection.close()
    wait_until(lambda: slots_of(store, heavy.name) == 0, "the closed requests' slots given back", timeout=5)
    assert probe(two_gateways[1], heavy.token) == 504


def queued_request(generations, tenant: str, prompt: str) -> Optional[GenerationRequest]:  # noqa: F811
    queue = keys.generation_queue(generations.resolve_model(tenant, MODEL).base.compat_key)
    found = [GenerationRequest.model_validate_json(raw) for raw in generations.store.r.lrange(queue, 0, -1)]
    return next((request for request in found if request.tenant == tenant and request.prompt == prompt), None)


def answered_by_the_executor(api: openai.OpenAI, generations, tenant: str, stream: bool,  # noqa: F811
                             error: Optional[str] = None):
    """A request of the tenant's, answered (or failed with `error`) by this test as the executor would; how it
    ended: the response, the streamed chunks, or the exception the client raised."""
    prompt = "ending " + secrets.token_hex(4)

    def call():
        answer = api.completions.create(model=MODEL, prompt=prompt, stream=stream,
                                        extra_body={"lorafleet": {"timeout": 30}})
        return list(answer) if stream else answer

    with ThreadPoolExecutor(1) as pool:
        ending = pool.submit(call)
        request = wait_until(lambda: queued_request(generations, tenant, prompt), "the request queued", timeout=10)
        result = GenerationResult(request_id=request.request_id, error=error) if error else GenerationResult(
            request_id=request.request_id, prompt_tokens=1,
            choices=(ChoiceResult(text=" world", completion_tokens=1, finish_reason="length"),))
        # streamed, some text comes first (a failure then comes mid-answer, as an error event)
        generations.deliver(request, result, unsent=[" the" if error else " world"])
        try:
            return ending.result(30)
        except openai.APIError as exc:
            return exc


def ended_answered(api, generations, tenant, stream):  # noqa: F811
    ended = answered_by_the_executor(api, generations, tenant, stream)
    text = "".join(chunk.choices[0].text for chunk in ended if chunk.choices) if stream else ended.choices[0].text
    assert text == " world", ended


def ended_failed(api, generations, tenant, stream):  # noqa: F811
    ended = answered_by_the_executor(api, generations, tenant, stream, error="the prompt is too long")
    assert isinstance(ended, openai.APIError) and "the prompt is too long" in ended.message, ended


def ended_timed_out(api, generations, tenant, stream):  # noqa: F811
    with pytest.raises(openai.APIStatusError) as timed_out:  # streamed: before its first event, so a status too
        api.completions.create(model=MODEL, prompt="late", stream=stream,
                               extra_body={"lorafleet": {"timeout": PROBE_TIMEOUT}})
    assert timed_out.value.status_code == 504


def ended_refused(api, generations, tenant, stream):  # noqa: F811
    with pytest.raises(openai.NotFoundError):  # refused at submission, after its slot was taken
        api.completions.create(model="ft:tiny:nobody:bot:job-0123456789abcdef", prompt="hi", stream=stream)


ENDINGS: dict[str, Callable] = {"answered": ended_answered, "failed": ended_failed, "timed-out": ended_timed_out,
                                "refused": ended_refused}


@pytest.mark.parametrize("stream", [False, True], ids=["not-streamed", "streamed"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_slot_is_given_back_however_its_request_ends(two_gateways, generations, make_tenant, store, ending,
                                                       stream):  # noqa: F811
    """With all but one slot held on gateway A, a request on gateway B ends; then the next one passes."""
    tenant = make_tenant()
    held = hold(two_gateways[:1], tenant, generations, CAP - 1)
    try:
        ENDINGS[ending](client(two_gateways[1], tenant.token), generations, tenant.name, stream)
        wait_until(lambda: slots_of(store, tenant.name) == CAP - 1, "the ended request's slot given back", timeout=5,
                   details=lambda: f"{slots_of(store, tenant.name)} slots held")
        assert probe(two_gateways[0], tenant.token) == 504, "the next request takes the slot given back"
        last = hold(two_gateways[1:], tenant, generations, 1, stream)  # the cap is whole again: one more, not two
        assert probe(two_gateways[0], tenant.token) == 429
        held += last
    finally:
        for connection in held:
            connection.close()


def test_a_slot_given_back_by_a_disconnect_on_one_gateway_is_free_on_the_other(two_gateways, generations,
                                                                                make_tenant, store):  # noqa: F811
    tenant = make_tenant()
    held = hold(two_gateways[:1], tenant, generations, CAP, stream=True)
    try:
        assert probe(two_gateways[1], tenant.token) == 429
        held.pop().close()
        wait_until(lambda: slots_of(store, tenant.name) == CAP - 1, "the closed stream's slot given back", timeout=5)
        assert probe(two_gateways[1], tenant.token) == 504
    finally:
        for connection in held:
            connection.close()


async def taken_and_left(url: str, tenant: str, count: int) -> list[Optional[str]]:
    """Slots taken the way a gateway takes them, on a client that is then closed without giving them back: a
    gateway that died."""
    r = redis.asyncio.Redis.from_url(url)
    try:
        dead = GenerationSlots(r, CAP, lease_seconds=LEASE_SECONDS)
        return [await dead.take(tenant) for _ in range(count)]
    finally:
        await r.aclose()


def test_the_slots_of_a_gateway_that_died_are_free_again_after_their_lease(two_gateways, redis_server, make_tenant,
                                                                           store):
    tenant = make_tenant()
    started = time.monotonic()
    taken = asyncio.run(taken_and_left(redis_server.role_url("gateway"), tenant.name, CAP + 1))
    taken_at = time.monotonic()
    assert None not in taken[:CAP] and taken[CAP] is None, "the dead gateway had the tenant's CAP slots"
    assert probe(two_gateways[0], tenant.token) == 429, "the live gateways count the dead one's slots"
    assert time.monotonic() - started < LEASE_SECONDS, "too slow to see the slots before their lease ended"
    wait_until(lambda: time.monotonic() - taken_at > LEASE_SECONDS + 0.05, "the leases to end", timeout=5)
    assert probe(two_gateways[1], tenant.token) == 504
    assert slots_of(store, tenant.name) == 0, "the expired slots dropped, the probe's given back"


async def held_past_leases(url: str, tenant: str) -> tuple[int, Optional[str], int]:
    r = redis.asyncio.Redis.from_url(url)
    try:
        slots = GenerationSlots(r, 1, lease_seconds=0.3)
        async with await slots.hold(tenant):
            await asyncio.sleep(1.0)  # more than three leases
            while_held = (await slots.in_progress(tenant), await slots.take(tenant))
        return (*while_held, await slots.in_progress(tenant))
    finally:
        await r.aclose()


def test_a_slot_held_longer_than_its_lease_keeps_its_place_until_given_back(redis_server, make_tenant):
    held, other_take, after = asyncio.run(held_past_leases(redis_server.role_url("gateway"), make_tenant().name))
    assert (held, other_take, after) == (1, None, 0)


async def churn(url: str, tenant: str, limit: int, takers: int, rounds: int, seed: int) -> tuple[int, int, int]:
    """`takers` coroutines on two clients (two gateways) each, `rounds` times, take a slot, hold it for a random
    while and give it back. Returns the most held at once (counted as each take returns, and before each give-back
    is sent, so never more than Redis holds), how many takes succeeded, and the slots left at the end."""
    chance = random.Random(seed)
    clients = [redis.asyncio.Redis.from_url(url) for _ in range(2)]
    gateways = [GenerationSlots(r, limit) for r in clients]
    held = peak = successes = 0

    async def taker(slots: GenerationSlots, pause: list[float]) -> None:
        nonlocal held, peak, successes
        for seconds in pause:
            slot_id = await slots.take(tenant)
            if slot_id is None:
                await asyncio.sleep(seconds / 4)
                continue
            held, successes = held + 1, successes + 1
            peak = max(peak, held)
            await asyncio.sleep(seconds)
            held -= 1
            await slots.give_back(tenant, slot_id)

    try:
        await asyncio.gather(*(taker(gateways[number % 2], [chance.uniform(0, 0.004) for _ in range(rounds)])
                               for number in range(takers)))
        return peak, successes, await gateways[0].in_progress(tenant)
    finally:
        for r in clients:
            await r.aclose()


async def taken_at_once(url: str, tenant: str, limit: int, takers: int) -> list[Optional[str]]:
    clients = [redis.asyncio.Redis.from_url(url) for _ in range(2)]
    try:
        gateways = [GenerationSlots(r, limit) for r in clients]
        return await asyncio.gather(*(gateways[number % 2].take(tenant) for number in range(takers)))
    finally:
        for r in clients:
            await r.aclose()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 6), takers=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_slots_taken_concurrently_on_two_gateways_never_pass_the_limit(redis_server, limit, takers, seed):
    url = redis_server.role_url("gateway")
    taken = asyncio.run(taken_at_once(url, f"prop-{secrets.token_hex(4)}", limit, takers))
    assert sum(slot_id is not None for slot_id in taken) == min(limit, takers)
    peak, successes, left = asyncio.run(churn(url, f"prop-{secrets.token_hex(4)}", limit, takers, 5, seed))
    assert peak <= limit and left == 0
    assert successes >= min(limit, takers), "the takers did take slots"
