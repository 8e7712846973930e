"""The tenant boundary, attacked the way a hostile tenant would: with its own broker URL, against the real server and
the real submission worker (which runs as the worker role's own user)."""

from __future__ import annotations

import base64
import json
import stat
import uuid

import pytest
import redis
from celery import Celery

from helpers_polling import wait_until
from lorafleet.scheduler import acl, keys
from lorafleet.scheduler.acl import TenantCredentials
from lorafleet.scheduler.broker import MAX_MESSAGE_BYTES, check_message
from lorafleet.scheduler.spec import parse_spec


@pytest.fixture
def tenant_pair(store, make_tenant):
    """Two tenants with their own broker users: (attacker, victim) credentials."""
    attacker, victim = make_tenant("mallory"), make_tenant("victim")
    return (store.issue_credentials(attacker.name, attacker.token), store.issue_credentials(victim.name, victim.token),
            attacker, victim)


def tenant_celery(credentials: TenantCredentials) -> Celery:
    """What the README tells a tenant to run: plain Celery, its broker URL, its two settings."""
    app = Celery(broker=credentials.broker_url, backend=credentials.broker_url)
    app.conf.update(credentials.to_json()["celery_config"])
    return app


def assert_refused(client: redis.Redis, command: tuple[str, ...]) -> None:
    """NOPERM; DEBUG is refused to everyone over the network before ACLs are even asked."""
    with pytest.raises(redis.exceptions.ResponseError) as excinfo:
        client.execute_command(*command)
    assert isinstance(excinfo.value, redis.exceptions.NoPermissionError) or (
        command[0] == "DEBUG" and "not allowed" in str(excinfo.value)), (command, excinfo.value)


def as_tenant(credentials: TenantCredentials) -> redis.Redis:
    return redis.Redis.from_url(credentials.broker_url)


def attacks(attacker: str, victim: str) -> list[tuple[str, ...]]:
    own_queue, their_queue = keys.tenant_queue(attacker), keys.tenant_queue(victim)
    return [
        ("MONITOR",), ("KEYS", "*"), ("SCAN", "0"), ("CLIENT", "LIST"), ("ACL", "LIST"),
        ("GET", keys.SCHEMA_VERSION_KEY), ("HGETALL", keys.TOKENS), ("HGETALL", keys.tenant(victim)),
        ("HSET", keys.TOKENS, "0" * 64, attacker), ("HSET", keys.tenant(attacker), "max_queued", "100000"),
        ("HSET", keys.tenant(attacker), "weight", "1000"), ("ZRANGE", keys.QUEUE, "0", "-1"),
        ("LRANGE", own_queue, "0", "-1"), ("RPOP", own_queue), ("BRPOP", their_queue, "1"),
        ("LPUSH", their_queue, "x"), ("LLEN", their_queue),
        ("GET", keys.tenant_result_prefix(victim) + "celery-task-meta-x"),
        ("SET", keys.tenant_result_prefix(attacker) + "celery-task-meta-x", "forged"),
        ("CONFIG", "SET", "dir", "/tmp"), ("CONFIG", "GET", "dir"), ("SAVE",), ("BGREWRITEAOF",), ("MODULE", "LIST"),
        ("DEBUG", "SLEEP", "0"), ("FLUSHALL",), ("FLUSHDB",), ("EVAL", "return 1", "0"), ("SUBSCRIBE", "x"),
        ("PSUBSCRIBE", "*"), ("PUBLISH", keys.tenant_result_prefix(victim) + "x", "forged"), ("SHUTDOWN",),
    ]


def test_a_tenant_broker_user_is_refused_everything_but_its_own_queue_and_results(tenant_pair):
    attacker_creds, _, attacker, victim = tenant_pair
    client = as_tenant(attacker_creds)
    for command in attacks(attacker.name, victim.name):
        assert_refused(client, command)
    assert client.execute_command("LLEN", keys.tenant_queue(attacker.name)) == 0  # the one thing it may read


def test_a_tenant_submits_gets_lists_cancels_and_reads_events_with_only_its_own_credentials(
        tenant_pair, celery_app, base_model_dir):
    credentials, _, tenant, _ = tenant_pair
    app = tenant_celery(credentials)
    try:
        def call(task, *args):
            return app.send_task(task, args=[credentials.token, *args]).get(timeout=30)

        spec = {"base_model": str(base_model_dir), "dataset": tenant.dataset}
        job = call("lorafleet.submit_job", spec)
        assert call("lorafleet.get_job", job["job_id"])["state"] == "queued"
        assert [j["job_id"] for j in call("lorafleet.list_jobs")] == [job["job_id"]]
        assert call("lorafleet.pause_job", job["job_id"])["state"] == "paused"
        assert call("lorafleet.resume_job", job["job_id"])["state"] == "queued"
        with pytest.raises(ValueError, match="not paused"):
            call("lorafleet.resume_job", job["job_id"])
        assert call("lorafleet.cancel_job", job["job_id"])["state"] == "cancelled"
        assert [e["to"] for e in call("lorafleet.job_events", job["job_id"])] == [
            "queued", "paused", "queued", "cancelled"]
    finally:
        app.close()


def test_a_stolen_token_is_useless_on_another_tenants_broker_user(tenant_pair, store, celery_app, base_model_dir):
    attacker_creds, _, attacker, victim = tenant_pair
    job = store.submit(victim.name, parse_spec({"base_model": str(base_model_dir), "dataset": victim.dataset}))
    app = tenant_celery(attacker_creds)
    try:
        for task, args in [("lorafleet.cancel_job", [job["job_id"]]), ("lorafleet.get_job", [job["job_id"]]),
                           ("lorafleet.list_jobs", [])]:
            with pytest.raises(PermissionError, match="invalid token for this broker user"):
                app.send_task(task, args=[victim.token, *args]).get(timeout=30)
    finally:
        app.close()
    assert store.get_job(job["job_id"])["state"] == "queued"


def test_rotating_replaces_the_broker_password_and_disabling_revokes_at_once(tenant_pair, store):
    credentials, _, tenant, _ = tenant_pair
    open_connection = as_tenant(credentials)
    assert open_connection.ping()
    rotated = store.issue_credentials(tenant.name, store.rotate_token(tenant.name))
    with pytest.raises(redis.exceptions.AuthenticationError):
        as_tenant(credentials).ping()
    with pytest.raises(redis.exceptions.ConnectionError):  # the open connection was closed with the old password
        open_connection.execute_command("LLEN", keys.tenant_queue(tenant.name), retry_on_error=False)
    live = as_tenant(rotated)
    assert live.ping()
    store.set_disabled(tenant.name)
    with pytest.raises(redis.exceptions.ConnectionError):
        live.execute_command("PING")
    with pytest.raises(redis.exceptions.AuthenticationError):
        as_tenant(rotated).ping()
    store.set_disabled(tenant.name, False)
    assert as_tenant(rotated).ping()


def test_the_default_user_is_off_and_the_data_dir_is_private(redis_server):
    port = redis_server.port
    with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError,
                        redis.exceptions.ResponseError)):
        redis.Redis(port=port).get("x")
    assert stat.S_IMODE(redis_server.data_dir.stat().st_mode) == 0o700
    files = [p for p in redis_server.data_dir.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files]
    config = redis_server.client().config_get("maxmemory*")
    assert int(config["maxmemory"]) > 0 and config["maxmemory-policy"] == "noeviction"


def test_no_service_role_may_run_admin_commands(redis_server):
    for role in ("worker", "scheduler", "executor"):
        client = redis.Redis.from_url(redis_server.role_url(role))
        for command in [("CONFIG", "GET", "dir"), ("MONITOR",), ("KEYS", "*"), ("SCAN", "0"), ("FLUSHALL",),
                        ("SAVE",), ("ACL", "LIST"), ("MODULE", "LIST"), ("DEBUG", "SLEEP", "0")]:
            assert_refused(client, command)
        assert client.hget(keys.tenant("nobody"), "name") is None  # the store is theirs to use


# ---- malformed messages: each refused with one log line, counted, dead-lettered, never redelivered ----


def envelope(task="lorafleet.list_jobs", body=None, **headers) -> dict:
    body = [["lft_x"], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}] if body is None else body
    return {
        "body": base64.b64encode(json.dumps(body).encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": str(uuid.uuid4()), **headers},
        "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()), "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0},
    }


def raw(message) -> bytes:
    return message if isinstance(message, bytes) else json.dumps(message).encode()


MALFORMED = {
    "not_json": b"this is not json {",
    "not_utf8": b"\xff\xfe\x00garbage",
    "a JSON number": 42,
    "no headers": {"body": "", "properties": {"delivery_tag": "x"}},
    "no task header (protocol 1)": {**envelope(), "headers": {}},
    "body 42 with a task header": {**envelope(), "body": base64.b64encode(b"42").decode()},
    "body not base64": {**envelope(), "body": "%%%not-base64%%%"},
    "unknown task": envelope(task="celery.backend_cleanup"),
    "pickle": {**envelope(), "content-type": "application/x-python-serialize"},
    "eta": envelope(eta="2999-01-01T00:00:00"),
    "callbacks": envelope(body=[["lft_x"], {}, {"callbacks": [{"task": "lorafleet.cancel_job"}]}]),
    "oversized": envelope(body=[["lft_x", "a" * MAX_MESSAGE_BYTES], {}, {}]),
    "bad task id": envelope(id="../../etc"),
}


def test_the_worker_survives_every_malformed_message_and_answers_the_next(store, call, make_tenant, celery_app):
    tenant = make_tenant("target")
    queue = keys.tenant_queue(tenant.name)
    assert call("lorafleet.list_jobs", tenant.token) == []  # the worker consumes this queue
    before = sum(int(n) for n in store.r.hvals(keys.REJECTED_MESSAGES))
    for message in MALFORMED.values():
        store.r.lpush(queue, raw(message))
    assert call("lorafleet.list_jobs", tenant.token) == []  # answered after all of them: the worker lives on
    wait_until(lambda: sum(int(n) for n in store.r.hvals(keys.REJECTED_MESSAGES)) - before >= len(MALFORMED),
               "every malformed message to be counted", timeout=10,
               details=lambda: str(store.r.hgetall(keys.REJECTED_MESSAGES)))
    assert store.r.llen(queue) == 0  # gone from the queue, and not waiting to be redelivered (the last good call
    wait_until(lambda: store.r.hlen("unacked") == 0, "no unacked message", timeout=10)  # is acked after its answer)
    notes = [json.loads(n) for n in store.r.lrange(keys.DEAD_LETTERS, 0, len(MALFORMED) - 1)]
    assert {n["queue"] for n in notes} <= {queue, "(a tenant queue)"}
    assert {"not_json", "protocol", "unknown_task", "content_type", "scheduling", "workflow", "size",
            "body", "envelope", "task_id"} <= {n["kind"] for n in notes}
    log = celery_app.worker_log.read_text()
    assert "Unrecoverable error" not in log


def test_a_wrong_call_is_answered_with_an_error_and_tokens_never_reach_the_log(call, make_tenant, celery_app):
    tenant = make_tenant("careless")
    with pytest.raises(TypeError):
        call("lorafleet.get_job", tenant.token, "job-0000000000000000", "extra", "args")
    with pytest.raises(LookupError) as excinfo:
        call("lorafleet.get_job", tenant.token, "x" * 100_000)
    assert len(str(excinfo.value)) < 200  # not echoed back
    logged = "raised expected: PermissionError('invalid token')"
    before = celery_app.worker_log.read_text().count(logged)
    with pytest.raises(PermissionError, match="invalid token"):
        call("lorafleet.list_jobs", "lft_" + "a" * 10_000)
    wait_until(lambda: celery_app.worker_log.read_text().count(logged) > before, "the worker to log the last call")
    assert tenant.token not in celery_app.worker_log.read_text()


def test_tenant_urls_name_their_tenant_and_patterns_do_not_overlap():
    assert acl.tenant_of_url(acl.url_for("redis://h:1/0", acl.tenant_username("ab"), "p")) == "ab"
    assert acl.tenant_of_url("redis://lorafleet-worker:p@h:1/0") is None
    ab = acl.tenant_rules("ab")
    assert f"~{keys.tenant_queue('ab')}*" in ab and not keys.tenant_queue("abc").startswith(keys.tenant_queue("ab"))
    assert keys.tenant_of_queue(keys.tenant_queue("a-b_c")) == "a-b_c" and keys.tenant_of_queue("celery") is None
    assert keys.tenant_result_prefix("ab").endswith(".")


def test_an_accepted_message_carries_its_queue_as_routing_and_no_token_in_its_reprs():
    message = envelope(argsrepr="('lft_secret',)", kwargsrepr="{}")
    message["properties"]["delivery_info"] = {"exchange": "x", "routing_key": keys.tenant_queue("victim")}  # forged
    checked = check_message(message, keys.tenant_queue("sender"))
    assert checked["properties"]["delivery_info"]["routing_key"] == keys.tenant_queue("sender")
    assert "lft_secret" not in json.dumps(checked["headers"])


def test_operator_commands_with_a_tenants_broker_url_are_refused_in_one_line(tenant_pair, worker_env):
    from click.testing import CliRunner

    from lorafleet.scheduler.cli import main

    credentials = tenant_pair[0]
    result = CliRunner().invoke(main, ["jobs", "list", "--json"], env={**worker_env, "REDIS_URL": credentials.broker_url})
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.stderr.strip().startswith("Error: this Redis user may not do that"), result.stderr


def test_lorafleet_roles_gives_each_service_a_new_user_of_its_own(tmp_path, worker_env):
    from click.testing import CliRunner

    from lorafleet.scheduler.cli import main
    from lorafleet.scheduler.redis_server import start_redis_server

    server = start_redis_server(tmp_path / "redis")  # its own: new passwords must not reach the suite's worker
    try:
        result = CliRunner().invoke(main, ["roles", "--json"], env={**worker_env, "REDIS_URL": server.url})
        assert result.exit_code == 0, result.output
        urls = json.loads(result.stdout)
        assert set(urls) == {"worker", "scheduler", "executor", "gateway"}
        for role, url in urls.items():
            client = redis.Redis.from_url(url)
            assert client.hget(keys.tenant("nobody"), "name") is None
            assert_refused(client, ("CONFIG", "GET", "dir"))
            with pytest.raises(redis.exceptions.AuthenticationError):  # the old password is gone
                redis.Redis.from_url(server.role_url(role)).ping()
    finally:
        server.stop()
