"""The admin CLI against the real Redis and worker: `--json` parses, tables render, mistakes give one error line."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest
from click.testing import CliRunner

from lorafleet.scheduler import keys, stack
from lorafleet.scheduler.cli import main
from lorafleet.scheduler.spec import parse_spec


@pytest.fixture
def lorafleet(worker_env, celery_app):
    """lorafleet(*args) -> (exit code, stdout, stderr), with the same configuration as the worker."""
    runner = CliRunner()

    def run(*args: str, columns: int = 200):
        env = {**worker_env, "COLUMNS": str(columns)}  # 200: wide enough that no table cell is folded
        result = runner.invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


def ok_json(result):
    code, out, err = result
    assert code == 0, err
    return json.loads(out)


def one_error_line(result, pattern: str) -> None:
    code, out, err = result
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in out + err


def test_tenant_commands_json(lorafleet, store):
    name = "cli-" + secrets.token_hex(4)
    created = ok_json(lorafleet("tenants", "create", name, "--weight", 2, "--max-queued", 3, "--json"))
    assert created["name"] == name and created["weight"] == 2.0 and store.authenticate(created["token"]) == name
    assert name in [t["name"] for t in ok_json(lorafleet("tenants", "list", "--json"))]
    updated = ok_json(lorafleet("tenants", "set-quota", name, "--max-running", 9, "--json"))
    assert updated[0]["max_running"] == 9 and updated[0]["max_queued"] == 3
    rotated = ok_json(lorafleet("tenants", "rotate-token", name, "--json"))
    assert store.authenticate(rotated["token"]) == name
    with pytest.raises(PermissionError):
        store.authenticate(created["token"])
    assert ok_json(lorafleet("tenants", "disable", name, "--json"))[0]["disabled"] is True
    with pytest.raises(PermissionError, match="disabled"):
        store.authenticate(rotated["token"])
    assert ok_json(lorafleet("tenants", "enable", name, "--json"))[0]["disabled"] is False
    assert store.authenticate(rotated["token"]) == name


def test_job_commands_json_and_tables(lorafleet, make_tenant, base_model_dir, tmp_path):
    alice = make_tenant("alice")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({"name": "from-cli", "base_model": str(base_model_dir), "dataset": alice.dataset}))
    job = ok_json(lorafleet("submit", spec_file, "--token", alice.token, "--json"))[0]
    job_id = job["job_id"]
    assert job["state"] == "queued" and job["name"] == "from-cli"

    tenant_view = ok_json(lorafleet("jobs", "list", "--token", alice.token, "--json"))
    assert [j["job_id"] for j in tenant_view] == [job_id]
    operator_view = ok_json(lorafleet("jobs", "list", "--tenant", alice.name, "--state", "queued", "--json"))
    assert [j["job_id"] for j in operator_view] == [job_id]
    assert ok_json(lorafleet("jobs", "show", job_id, "--token", alice.token, "--json"))["spec"]["name"] == "from-cli"
    assert ok_json(lorafleet("jobs", "cancel", job_id, "--token", alice.token, "--json"))["state"] == "cancelled"
    events = ok_json(lorafleet("jobs", "events", job_id, "--token", alice.token, "--json"))
    assert [e["to"] for e in events] == ["queued", "cancelled"]

    code, out, _ = lorafleet("jobs", "watch", job_id, "--token", alice.token, "--json")
    assert code == 0 and [json.loads(line)["to"] for line in out.splitlines()] == ["queued", "cancelled"]

    code, out, _ = lorafleet("jobs", "watch", job_id, "--token", alice.token)
    assert code == 0 and "cancelled" in out

    code, out, _ = lorafleet("jobs", "list", "--token", alice.token)
    assert code == 0 and job_id in out and "cancelled" in out
    code, out, _ = lorafleet("jobs", "show", job_id)
    assert code == 0 and alice.name in out


def test_user_mistakes_give_one_error_line(lorafleet, make_tenant, base_model_dir, tmp_path, worker_env):
    alice = make_tenant("alice")
    one_error_line(lorafleet("tenants", "set-quota", "nobody-" + secrets.token_hex(3), "--max-queued", 1), "no tenant")
    one_error_line(lorafleet("tenants", "create", "Not Valid"), "tenant name")
    one_error_line(lorafleet("jobs", "show", "job-0000000000000000", "--token", alice.token), "no job")
    one_error_line(lorafleet("jobs", "list", "--token", "lft_wrong"), "invalid token")
    non_utf8 = tmp_path / "latin1.json"
    non_utf8.write_bytes('{"base_model": "café", "dataset": "x"}'.encode("latin-1"))
    one_error_line(lorafleet("submit", non_utf8, "--token", alice.token), "not UTF-8")
    unknown_field = tmp_path / "unknown.json"
    unknown_field.write_text(json.dumps({"base_model": str(base_model_dir), "dataset": alice.dataset, "gpus": 8}))
    one_error_line(lorafleet("submit", unknown_field, "--token", alice.token), "gpus: unknown field")
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"base_model": str(base_model_dir), "dataset": "/etc/passwd"}))
    one_error_line(lorafleet("submit", outside, "--token", alice.token), "outside your data areas")
    one_error_line(lorafleet("submit", tmp_path / "missing.json", "--token", alice.token), "cannot read")
    one_error_line(lorafleet("submit", unknown_field), "needs a tenant token")

    runner = CliRunner()
    no_redis = {**worker_env, "REDIS_URL": "", "LORAFLEET_STATE_DIR": str(tmp_path / "empty-state")}
    result = runner.invoke(main, ["tenants", "list"], env=no_redis)
    one_error_line((result.exit_code, result.stdout, result.stderr), "no Redis configured")


def test_seed_demo_submits_through_the_public_api(worker_env, celery_app, store, monkeypatch):
    for name in ("LORAFLEET_STATE_DIR", "LORAFLEET_DATA_ROOT", "HF_HUB_CACHE"):
        monkeypatch.setenv(name, worker_env[name])
    running = stack.Stack(redis_url=worker_env["REDIS_URL"])
    jobs = stack.seed_demo(running)
    assert sorted(job["tenant"] for job in jobs) == ["demo-alice", "demo-alice", "demo-bob"]
    assert all(job["state"] == "queued" for job in jobs)
    again = stack.seed_demo(running)  # a second run reuses the tenants (with fresh tokens) and the model
    assert {job["spec"]["base_model"] for job in jobs + again} == {jobs[0]["spec"]["base_model"]}
    assert store.get_tenant("demo-bob")["counts"]["queued"] == 2


def test_control_plane_does_not_import_torch(worker_env):
    probe = (
        "import sys\n"
        "import lorafleet.scheduler.cli, lorafleet.scheduler.tasks, lorafleet.scheduler.client\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-P", "-c", probe], env=worker_env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_executors_list_and_drain(lorafleet, store):
    from lorafleet.scheduler import fleet
    from lorafleet.scheduler.records import ExecutorHeartbeat

    name = f"gpu-node-0042.cluster.internal-cuda7-{secrets.token_hex(3)}"  # a long id, as host-device ones are
    fleet.heartbeat(store.r, ExecutorHeartbeat(
        name, host="gpu-host", device="cuda:0", total_bytes=80 * 2**30, peak_bytes=20 * 2**30,
        compat_key="/models/llama|none|auto", jobs={"job-0000000000000001": 1, "job-0000000000000002": 1,
                                                     "job-0000000000000003": 2}, max_pass_tokens=8192))
    listed = {e["executor_id"]: e for e in ok_json(lorafleet("executors", "list", "--json"))}
    assert listed[name]["device"] == "cuda:0" and len(listed[name]["jobs"]) == 3
    assert listed[name]["max_pass_tokens"] == 8192
    code, table, _ = lorafleet("executors", "list")
    assert code == 0 and name in table and "/models/llama" in table and "8192" in table
    code, narrow, _ = lorafleet("executors", "list", columns=80)
    assert code == 0 and name in narrow, "on an 80-column terminal the id stays whole, to be copied"

    assert ok_json(lorafleet("executors", "drain", name, "--json")) == {"executor_id": name, "drain": True}
    assert store.executor_view(name).drain
    fleet.forget(store.r, name)
    one_error_line(lorafleet("executors", "drain", name), "no live executor")


def test_jobs_purge_removes_only_jobs_finished_before_the_cutoff(lorafleet, store, make_tenant):
    alice = make_tenant("alice")
    spec = parse_spec({"base_model": "/models/none", "dataset": alice.dataset})
    old, waiting = (store.submit(alice.name, spec)["job_id"] for _ in range(2))
    store.cancel(alice.name, old)
    store.r.zadd(keys.FINISHED, {old: 1000.0})
    store.r.hset(keys.job(old), "finished_at", "1000.0")

    dry = ok_json(lorafleet("jobs", "purge", "--older-than", "1d", "--dry-run", "--json"))
    assert old in [j["job_id"] for j in dry["jobs"]] and store.job(old) is not None
    done = ok_json(lorafleet("jobs", "purge", "--older-than", "1d", "--json"))
    assert old in [j["job_id"] for j in done["jobs"]] and waiting not in [j["job_id"] for j in done["jobs"]]
    assert store.job(old) is None and store.job(waiting).state == "queued"
    code, _, err = lorafleet("jobs", "purge", "--older-than", "soon")
    assert code != 0 and "90s, 30m, 12h, 7d" in err
