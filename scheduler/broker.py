"""The submission worker's side of the broker: every message is checked before Celery sees it.

A tenant's broker user can publish only to its own queue (`keys.tenant_queue`), so the queue a message was popped
from says whose it is. Three pieces make the worker rely on that, and on nothing the sender wrote about itself:

- `GuardedTransport` (kombu's Redis transport with a guarded channel): a message from a tenant queue that is not a
  well-formed Celery protocol-2 call of one of our tasks, of bounded size, with no ETA, callbacks or chords, is
  refused before Celery parses it: one log line, a count in `keys.REJECTED_MESSAGES`, an entry in
  `keys.DEAD_LETTERS`, the reason as a ValueError result where the message carries a usable task id, and it is
  never redelivered (it was popped and never entered kombu's unacked set). The tasks check their arguments
  themselves and answer with an error. An accepted message gets the queue stamped as its routing key, where the
  task reads its tenant, and its `argsrepr` and `kwargsrepr` replaced, so the token never reaches task events,
  Flower or logs.
- `TenantResultBackend`: results are written under the tenant's own prefix (`keys.tenant_result_prefix`), the only
  results its broker user may read.
- `TenantQueues`: a consumer step that follows the enabled tenants: it starts consuming a new tenant's queue within
  `SYNC_SECONDS` and stops consuming a disabled one's.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import logging
import re
import time
from typing import Any, Optional

import redis
from celery import bootsteps
from celery.backends.redis import RedisBackend
from kombu.transport import redis as kombu_redis

from lorafleet.scheduler import keys
from lorafleet.scheduler.client import TASK_NAMES

log = logging.getLogger("lorafleet.broker")

MAX_MESSAGE_BYTES = 2 << 20  # a spec is at most 64 KiB; an upload part (`files.MAX_PART_BYTES`) 1.4 MiB as base64
# Results kept shorter than Celery's `result_expires`: a downloaded chunk is fetched at once, and a tenant cannot
# delete its results (its broker user may only read them), so an hour of a large download would pile up in Redis.
SHORT_LIVED_RESULTS = {"lorafleet.read_file": 120}  # task -> seconds
SYNC_SECONDS = 1.0
REDACTED = "'(redacted)'"

_TASK_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_SCHEDULING_HEADERS = ("eta", "countdown")
_WORKFLOW_FIELDS = ("callbacks", "errbacks", "chain", "chord")


class Refused(ValueError):
    """A message the worker will not run: `kind` (a short, bounded label for the metric) and the reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def _field(container: Any, name: str, kind: type, what: str) -> Any:
    value = container.get(name) if isinstance(container, dict) else None
    if not isinstance(value, kind):
        raise Refused("envelope", f"{what}: '{name}' missing or not a {kind.__name__}")
    return value


def _decode_body(raw: dict) -> list:
    """The protocol-2 body: [args, kwargs, embed], base64 of UTF-8 JSON."""
    if raw.get("content-type") != "application/json":
        raise Refused("content_type", f"content type {str(raw.get('content-type'))[:40]!r} is not application/json")
    body = _field(raw, "body", str, "envelope")
    if len(body) > MAX_MESSAGE_BYTES * 4 // 3 + 4:
        raise Refused("size", f"the message is over the limit of {MAX_MESSAGE_BYTES} bytes")
    if raw["properties"].get("body_encoding") != "base64":
        raise Refused("body", "body encoding is not base64")
    try:
        decoded = json.loads(base64.b64decode(body, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Refused("body", "body is not base64 of UTF-8 JSON") from None
    if not (isinstance(decoded, list) and len(decoded) == 3 and isinstance(decoded[0], list)
            and isinstance(decoded[1], dict) and isinstance(decoded[2], (dict, type(None)))):
        raise Refused("protocol", "body is not a Celery protocol-2 call [args, kwargs, embed]")
    return decoded


def _check_workflow(task: str, embed: Optional[dict]) -> None:
    """Callbacks and chords would make the worker send further tasks on the sender's behalf."""
    if any((embed or {}).get(name) for name in _WORKFLOW_FIELDS):
        raise Refused("workflow", f"{task}: callbacks, errbacks, chains and chords are not accepted")


def check_message(raw: Any, queue: str) -> dict:
    """The message, made safe to hand to Celery (trusted routing, redacted reprs); Refused with the reason."""
    if not isinstance(raw, dict):
        raise Refused("envelope", f"envelope is a JSON {type(raw).__name__}, not an object")
    properties = _field(raw, "properties", dict, "envelope")
    headers = _field(raw, "headers", dict, "envelope")
    if not isinstance(properties.get("delivery_tag"), str):
        raise Refused("envelope", "envelope: no delivery tag")
    task = headers.get("task")
    if not isinstance(task, str):
        raise Refused("protocol", "no 'task' header: not a Celery protocol-2 message")
    if task not in TASK_NAMES:
        raise Refused("unknown_task", f"unknown task {task[:80]!r}")
    if not isinstance(headers.get("id"), str) or not _TASK_ID_RE.fullmatch(headers["id"]):
        raise Refused("task_id", "the task id must be 1-64 letters, digits or '-'")
    if any(headers.get(name) is not None for name in _SCHEDULING_HEADERS):
        raise Refused("scheduling", "ETA and countdown are not accepted")
    _, _, embed = _decode_body(raw)
    _check_workflow(task, embed)
    headers["argsrepr"], headers["kwargsrepr"] = REDACTED, REDACTED
    properties["delivery_info"] = {"exchange": queue, "routing_key": queue}
    properties.pop("priority", None)
    return raw


def dead_letter(client: redis.Redis, queue: str, refused: Refused, raw: Any = None) -> None:
    """Count, log and keep a note of a refused message (never its body, which may hold a token)."""
    headers = raw.get("headers") if isinstance(raw, dict) else None
    note = {"queue": queue, "kind": refused.kind, "reason": str(refused), "ts": time.time()}
    if isinstance(headers, dict):
        note.update(task=str(headers.get("task"))[:80], id=str(headers.get("id"))[:64])
    log.warning("refused a message on %s (%s): %s", queue, refused.kind, refused)
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(keys.DEAD_LETTERS, json.dumps(note))
        pipe.ltrim(keys.DEAD_LETTERS, 0, keys.DEAD_LETTERS_MAXLEN - 1)
        pipe.hincrby(keys.REJECTED_MESSAGES, refused.kind, 1)
        pipe.execute()


def answer_refused(raw: Any, queue: str, refused: Refused) -> None:
    """Where the message names a usable task id, its sender gets the reason as a ValueError result, under its own
    prefix, instead of waiting for an answer that never comes."""
    headers = raw.get("headers") if isinstance(raw, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    if not isinstance(task_id, str) or not _TASK_ID_RE.fullmatch(task_id):
        return
    from celery.app.task import Context

    from lorafleet.scheduler.tasks import app

    request = Context(id=task_id, delivery_info={"exchange": queue, "routing_key": queue})
    app.backend.mark_as_failure(task_id, ValueError(f"message refused: {refused}"), request=request)


def _store_client() -> redis.Redis:
    """The worker's job-store connection (not kombu's, whose connection may be parked in a BRPOP)."""
    from lorafleet.scheduler.tasks import store

    return store().r


class GuardedChannel(kombu_redis.Channel):
    _command_client: Optional[redis.Redis] = None

    def _create_client(self, asynchronous=False):
        """One client for the channel's plain commands (acks, unacked bookkeeping), where kombu builds a new one for
        each, ~0.1 ms apiece. It holds no connection of its own (each command takes one from the channel's pool);
        the asynchronous client, which keeps the BRPOP connection, is still made by kombu. A new pool (kombu makes
        one after closing the old) gets a new client."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        if self._command_client is None or self._command_client.connection_pool is not self.pool:
            self._command_client = super()._create_client()
        return self._command_client

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)
        if keys.tenant_of_queue(queue) is None:
            return  # remote control and other queues of Celery's own
        deliver = self.connection._callbacks[queue]

        def guarded(raw: Any) -> Any:
            try:
                checked = check_message(raw, queue)
            except Refused as exc:
                dead_letter(_store_client(), queue, exc, raw)
                answer_refused(raw, queue, exc)
                return None
            return deliver(checked)

        self.connection._callbacks[queue] = guarded

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except ValueError as exc:  # not UTF-8 or not JSON: kombu could not load what BRPOP popped, so it is gone
            dead_letter(_store_client(), "(a tenant queue)", Refused("not_json", f"not UTF-8 JSON: {str(exc)[:80]}"))
            return True


class GuardedTransport(kombu_redis.Transport):
    Channel = GuardedChannel


_result_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("lorafleet_result_prefix", default="")
_result_seconds: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("lorafleet_result_s", default=None)


def _prefix_for(request: Any) -> str:
    info = getattr(request, "delivery_info", None) or {}
    tenant = keys.tenant_of_queue(str(info.get("routing_key") or ""))
    return keys.tenant_result_prefix(tenant) if tenant else ""


class TenantResultBackend(RedisBackend):
    """Celery's Redis result backend, writing each result under the prefix of the tenant whose queue it came from."""

    def store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        reset = _result_prefix.set(_prefix_for(request))
        reset_seconds = _result_seconds.set(SHORT_LIVED_RESULTS.get(getattr(request, "task", None)))
        try:
            return super().store_result(task_id, result, state, traceback=traceback, request=request, **kwargs)
        finally:
            _result_prefix.reset(reset)
            _result_seconds.reset(reset_seconds)

    def get_key_for_task(self, task_id, key=""):
        return self.key_t(_result_prefix.get()) + super().get_key_for_task(task_id, key)

    def _set_with_state(self, key, value, state):
        return self.set(key, value, expires=_result_seconds.get())  # None: Celery's result_expires


class TenantQueues(bootsteps.StartStopStep):
    """Consume the queue of every enabled tenant, and only those."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.timer_ref = None

    def start(self, consumer):
        self.sync(consumer)
        self.timer_ref = consumer.timer.call_repeatedly(SYNC_SECONDS, self.sync, (consumer,), priority=10)

    def stop(self, consumer):
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    def sync(self, consumer) -> None:
        from lorafleet.scheduler.tasks import store

        try:
            wanted = {keys.tenant_queue(name) for name in store().enabled_tenants()}
        except redis.RedisError as exc:
            log.warning("cannot read the tenants (%s); consuming the same queues", exc)
            return
        current = {queue.name for queue in consumer.task_consumer.queues if keys.tenant_of_queue(queue.name)}
        for queue in sorted(wanted - current):
            consumer.add_task_queue(queue)
        for queue in sorted(current - wanted):
            consumer.cancel_task_queue(queue)
