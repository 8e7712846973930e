"""The HTTP gateway, as a tenant meets it: a real `lorafleet gateway` process (uvicorn) on a real Valkey, called with
the real `openai` client (`base_url` = the gateway, `api_key` = the tenant's token). Errors are checked as the client
raises them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from helpers_models import alpaca_rows, build_tiny_model, write_jsonl
from helpers_polling import wait_until
from lorafleet.scheduler import keys
from lorafleet.scheduler.records import FailureReason
from lorafleet.scheduler.redis_server import free_port, start_redis_server
from lorafleet.scheduler.store import JobStore

# Small file limits, so that the file tests reach them quickly (test_gateway_files.py).
FILE_LIMITS = {"LORAFLEET_MAX_DATASET_BYTES": str(64 * 1024), "LORAFLEET_FILE_QUOTA_COUNT": "5"}
AUTO_METHOD = {"type": "supervised", "supervised": {"hyperparameters": {
    "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}}}
SMALL = {"max_seq_len": 256, "r": 4, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def gateway(redis_server, worker_env, tmp_path_factory):
    """The base URL of a `lorafleet gateway` subprocess using the gateway role's own Redis user."""
    with running_gateway(redis_server, worker_env, tmp_path_factory.mktemp("gateway")) as url:
        yield url


@contextlib.contextmanager
def running_gateway(redis_server, worker_env, log_dir: Path, **env: str):
    """A `lorafleet gateway` subprocess (its settings: the session's, and `env`) until the block ends; its URL."""
    port = free_port()
    log_path = log_dir / "gateway.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", "lorafleet.scheduler.cli", "gateway", "--port", str(port)],
            env={**worker_env, **FILE_LIMITS, "REDIS_URL": redis_server.role_url("gateway"), **env}, stdout=log,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited:\n{log_path.read_text()}")
        try:
            return urllib.request.urlopen(url + "/openapi.json", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(up, "the gateway to answer", timeout=60)
        yield url
    finally:
        process.terminate()
        process.wait(20)
        assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]


def client(gateway: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key=token, max_retries=0, timeout=60)


def create(api: openai.OpenAI, training_file: str, **fields):
    fields.setdefault("extra_body", {"lorafleet": SMALL})
    return api.fine_tuning.jobs.create(model="test-org/tiny-model", training_file=training_file, **fields)


def test_a_job_created_with_the_openai_client_shows_the_values_chosen_for_auto(gateway, make_tenant):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset, method=AUTO_METHOD, suffix="support-bot", seed=7,
                 metadata={"team": "search"})
    assert job.object == "fine_tuning.job" and job.id.startswith("job-")
    assert job.status == "queued" and job.organization_id == tenant.name and job.model == "test-org/tiny-model"
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (25, 1, 1.0), \
        "auto: two records get the most epochs (25), one record per step, the base learning rate"
    assert job.hyperparameters.n_epochs == 25 and job.seed == 7 and job.metadata == {"team": "search"}
    assert job.suffix == "support-bot" and job.fine_tuned_model is None and job.error is None
    assert api.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()


def test_a_learning_rate_multiplier_scales_the_adapter_types_base(gateway, make_tenant):
    tenant = make_tenant()
    job = create(client(gateway, tenant.token), tenant.dataset,
                 hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 0.5},
                 extra_body={"lorafleet": {**SMALL, "adapter_type": "nola"}})
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 2)
    assert job.hyperparameters.learning_rate_multiplier == 0.5
    assert job.lorafleet["adapter"]["type"] == "nola"  # type: ignore[attr-defined]


def test_jobs_are_listed_newest_first_a_page_at_a_time(gateway, make_tenant):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    created = [create(api, tenant.dataset).id for _ in range(3)]
    first = api.fine_tuning.jobs.list(limit=2)
    assert [job.id for job in first.data] == created[::-1][:2] and first.has_more
    second = api.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [job.id for job in second.data] == created[:1] and not second.has_more
    assert [job.id for job in api.fine_tuning.jobs.list(limit=2)] == created[::-1], "the client pages on its own"


def test_a_cancelled_job_says_so_and_its_events_follow_it(gateway, make_tenant):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset)
    assert api.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    assert api.fine_tuning.jobs.cancel(job.id).status == "cancelled", "cancelling twice changes nothing"
    events = api.fine_tuning.jobs.list_events(job.id, limit=1)
    assert events.has_more and events.data[0].message == "Job queued"
    rest = api.fine_tuning.jobs.list_events(job.id, after=events.data[0].id)
    assert [event.message for event in rest.data] == ["Job cancelled"] and not rest.has_more
    assert all(event.object == "fine_tuning.job.event" for event in events.data + rest.data)


def test_a_job_paused_and_resumed_with_the_openai_client_goes_back_to_the_queue(gateway, make_tenant):
    tenant, other = make_tenant(), make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset)
    assert api.fine_tuning.jobs.pause(job.id).status == "paused"
    assert api.fine_tuning.jobs.retrieve(job.id).status == "paused"
    with pytest.raises(openai.NotFoundError):
        client(gateway, other.token).fine_tuning.jobs.resume(job.id)
    assert api.fine_tuning.jobs.resume(job.id).status == "queued"
    with pytest.raises(openai.ConflictError) as refused:
        api.fine_tuning.jobs.resume(job.id)
    assert "not paused" in refused.value.message
    assert [e.message for e in api.fine_tuning.jobs.list_events(job.id).data] == [
        "Job queued", "Job paused", "Job queued"]


def test_a_finished_job_cannot_be_cancelled_and_shows_its_error(gateway, make_tenant, store):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    job = create(api, tenant.dataset)
    assert store.fail(job.id, "queued", "no executor can hold this job", reason=FailureReason.SIZING)
    failed = api.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed" and failed.error.message == "no executor can hold this job"
    assert failed.error.code == "job_failed" and failed.finished_at is not None
    with pytest.raises(openai.ConflictError) as refused:
        api.fine_tuning.jobs.cancel(job.id)
    assert "already failed" in refused.value.message


def test_a_bad_token_is_refused_as_openai_refuses_one(gateway):
    with pytest.raises(openai.AuthenticationError) as refused:
        client(gateway, "lft_not-a-token").fine_tuning.jobs.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


def test_a_job_of_another_tenant_is_not_found_like_an_unknown_one(gateway, make_tenant):
    owner, other = make_tenant(), make_tenant()
    job = create(client(gateway, owner.token), owner.dataset)
    unknown = "job-" + "0" * 16
    answers = {}
    for job_id in (job.id, unknown):
        for call in ("retrieve", "cancel", "list_events"):
            with pytest.raises(openai.NotFoundError) as refused:
                getattr(client(gateway, other.token).fine_tuning.jobs, call)(job_id)
            answers.setdefault(call, []).append(refused.value.body | {"message": refused.value.message.replace(
                job_id, "<id>")})
    assert all(foreign == missing for foreign, missing in answers.values()), answers
    assert client(gateway, owner.token).fine_tuning.jobs.retrieve(job.id).status == "queued", "untouched"


@pytest.mark.parametrize("fields, param", [
    ({"extra_body": {"lorafleet": {**SMALL, "r": 0}}}, "lorafleet.r"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
    ({"suffix": "no spaces allowed"}, "suffix"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"extra_body": {"lorafleet": {**SMALL, "target_modules": ["q_proj", "no_such_proj"]}}}, "lorafleet"),
    ({"extra_body": {"lorafleet": {**SMALL, "unknown_option": 1}}}, "lorafleet.unknown_option"),
    ({"model": "no-org/no-model"}, "model"),
    ({"training_file": "elsewhere/train.jsonl"}, "training_file"),
])
def test_a_bad_request_is_refused_naming_its_field(gateway, make_tenant, fields, param):
    tenant = make_tenant()
    fields = {"training_file": tenant.dataset, **fields}
    model = fields.pop("model", "test-org/tiny-model")
    with pytest.raises(openai.BadRequestError) as refused:
        client(gateway, tenant.token).fine_tuning.jobs.create(model=model, **fields)
    assert refused.value.param is not None and refused.value.param.startswith(param), refused.value.body
    assert refused.value.status_code == 400


def test_a_tenant_over_its_queue_quota_gets_429(gateway, make_tenant):
    tenant = make_tenant(max_queued=1)
    api = client(gateway, tenant.token)
    create(api, tenant.dataset)
    quota_refusals = refusals_counted(gateway, "quota")
    with pytest.raises(openai.RateLimitError) as refused:
        create(api, tenant.dataset)
    assert "max_queued is 1" in refused.value.message
    assert refused.value.response.headers["x-should-retry"] == "false", "the client does not retry a full quota"
    assert refusals_counted(gateway, "quota") == quota_refusals + 1, "the gateway's /metrics counts it as quota"


def refusals_counted(gateway: str, reason: str) -> float:
    text = urllib.request.urlopen(gateway + "/metrics", timeout=5).read().decode()
    line = f'lorafleet_submissions_refused_total{{api="http",reason="{reason}"}} '
    return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])


def test_the_openapi_schema_is_served_with_the_job_object(gateway):
    schema = json.loads(urllib.request.urlopen(gateway + "/openapi.json", timeout=5).read())
    assert {"/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}/checkpoints"} <= set(schema["paths"])
    assert "FineTuningJob" in schema["components"]["schemas"]


def test_the_gateway_answers_health_probes_without_a_token(gateway):
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(gateway + path, timeout=5) as answer:
            assert answer.status == 200 and answer.read() == b"ok\n"
    schema = json.loads(urllib.request.urlopen(gateway + "/openapi.json", timeout=5).read())
    assert "/healthz" not in schema["paths"], "probes are not part of the tenants' API"


@pytest.fixture(scope="module")
def fuzz_token(redis_url) -> str:
    """A tenant with room for every job the schema tests create."""
    store = JobStore.from_url(redis_url)
    return store.create_tenant(f"fuzz-{secrets.token_hex(4)}", max_queued=100_000)[1]


def test_no_request_the_schema_allows_or_breaks_makes_the_gateway_fail(gateway, fuzz_token):
    """Requests generated from the served schema for every operation, valid and invalid: never a 5xx. (schemathesis'
    Python API with hypothesis directly: its pytest plugin does not run under pytest 9.)"""
    schema = schemathesis.openapi.from_url(gateway + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    statuses: list[int] = []

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def never_a_server_error(case):
            response = case.call(headers={"Authorization": f"Bearer {fuzz_token}"}, timeout=30)
            statuses.append(response.status_code)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:2000])

        never_a_server_error()
    assert len(statuses) >= 5 * len(operations) and {200, 400} <= set(statuses), sorted(set(statuses))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A whole deployment on its own Valkey: scheduler, one CPU executor and the gateway, each a `lorafleet`
    process with its role's Redis user (no Celery worker: tenants come in over HTTP only)."""
    root = tmp_path_factory.mktemp("gateway-fleet")
    redis = start_redis_server(root / "redis")
    model = build_tiny_model(root / "models" / "tiny", "llama")
    env = {**os.environ, "LORAFLEET_STATE_DIR": str(root / "state"), "LORAFLEET_DATA_ROOT": str(root / "data"),
           "LORAFLEET_ARTIFACT_DIR": str(root / "artifacts"), "HF_HUB_CACHE": str(root / "hub"),
           "LORAFLEET_MODEL_ROOTS": str(root / "models"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    store = JobStore.from_url(redis.url)
    store.ensure_schema()
    port = free_port()
    processes = []
    for role, args in (("scheduler", ["--metrics-port", "0", "--interval", "0.2"]),
                       ("executor", ["--device", "cpu", "--id", "gw-exec", "--metrics-port", "0"]), ("gateway", ["--port", str(port)])):
        log = open(root / f"{role}.log", "ab")
        processes.append(subprocess.Popen([sys.executable, "-P", "-m", "lorafleet.scheduler.cli", role, *args],
                                          env={**env, "REDIS_URL": redis.role_url(role)}, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=root))
    url = f"http://127.0.0.1:{port}"

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(root.glob("*.log")))

    def gateway_up() -> bool:
        try:
            return urllib.request.urlopen(url + "/openapi.json", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_until(gateway_up, "the gateway", timeout=60, details=logs)
        wait_until(lambda: store.r.exists(keys.executor("gw-exec")), "the executor to register", details=logs)
        yield SimpleNamespace(url=url, store=store, root=root, model=model, logs=logs)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.stop()


@pytest.mark.slow
def test_a_job_created_over_http_trains_to_the_end(fleet):
    name = f"e2e-{secrets.token_hex(3)}"
    _, token = fleet.store.create_tenant(name)
    api = client(fleet.url, token)
    with open(write_jsonl(fleet.root / f"{name}-train.jsonl", alpaca_rows(24, seed=5)), "rb") as source:
        training_file = api.files.create(file=source, purpose="fine-tune")
    job = api.fine_tuning.jobs.create(
        model=str(fleet.model), training_file=training_file.id, suffix="e2e", seed=3,
        hyperparameters={"batch_size": 2, "learning_rate_multiplier": 5},
        extra_body={"lorafleet": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                  "max_seq_len": 256, "max_steps": 8, "checkpoint_every": 4}})
    done = wait_until(lambda: (found := api.fine_tuning.jobs.retrieve(job.id)).status in (
        "succeeded", "failed", "cancelled") and found, "the job to finish", timeout=240, details=fleet.logs)
    assert done.status == "succeeded", (done.error, fleet.logs())
    assert done.fine_tuned_model == f"ft:tiny:{name}:e2e:{job.id}" and done.finished_at >= done.created_at
    assert done.lorafleet["step"] == 8  # type: ignore[attr-defined]
    metrics = [event for event in api.fine_tuning.jobs.list_events(job.id, limit=100).data if event.type == "metrics"]
    assert [event.data["step"] for event in metrics] == list(range(1, 9))
    assert all(event.data["loss"] > 0 for event in metrics)
    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4], "checkpoint_every 4 of 8 steps: the end is the adapter"
    assert all(c.metrics.train_loss > 0 and c.metrics.step == 4 and c.fine_tuning_job_id == job.id
               for c in checkpoints)
    with tarfile.open(fileobj=io.BytesIO(api.files.content(checkpoints[0].file_id).content)) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())

    downloaded = fleet.root / f"{job.id}-downloaded"
    with tarfile.open(fileobj=io.BytesIO(api.files.content(done.result_files[0]).content)) as tar:
        tar.extractall(downloaded, filter="data")
    logits = adapter_logits(fleet.model, downloaded)
    assert logits.equal(adapter_logits(fleet.model, Path(fleet.store.job(job.id).adapter_uri))), "the published one"
    assert not logits.equal(adapter_logits(fleet.model, None)), "a trained adapter changes the base's logits"


def adapter_logits(base: Path, adapter: Optional[Path]):
    """The logits of the tiny base (with `adapter` loaded by PEFT) on a fixed input."""
    import torch  # here: only the slow test loads a model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(torch.arange(3, 19).unsqueeze(0)).logits


def test_lora_variants_are_lorafleet_options(gateway, make_tenant):
    tenant = make_tenant()
    api = client(gateway, tenant.token)
    variants = {"use_rslora": True, "loraplus_lr_ratio": 8.0, "use_dora": True}
    job = create(api, tenant.dataset, extra_body={"lorafleet": {**SMALL, **variants}})
    assert {key: job.lorafleet["adapter"][key] for key in variants} == variants  # type: ignore[attr-defined]
    vera = create(api, tenant.dataset, extra_body={"lorafleet": {**SMALL, "adapter_type": "vera"}})
    assert vera.lorafleet["adapter"]["type"] == "vera"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError, match="use_dora applies to type 'lora', not 'vera'"):
        create(api, tenant.dataset, extra_body={"lorafleet": {**SMALL, "adapter_type": "vera", "use_dora": True}})


def test_jobs_listed_by_metadata_are_exactly_those_with_every_pair_across_pages(gateway, make_tenant):
    tenant = make_tenant(max_queued=20)
    api = client(gateway, tenant.token)
    training = api.files.create(file=("train.jsonl", (tenant.area / "train.jsonl").read_bytes()), purpose="fine-tune")
    tags = [{"team": "search", "run": "a"}, {"team": "ads"}, {"team": "search", "run": "b"}, {},
            {"team": "search", "run": "a", "seed": "2"}]
    ids = [create(api, training.id, metadata=tag or None).id for tag in tags]
    newest_first = ids[::-1]
    search = [job.id for job in api.fine_tuning.jobs.list(metadata={"team": "search"}, limit=2)]  # auto-paged
    assert search == [i for i, tag in zip(ids, tags) if tag.get("team") == "search"][::-1]
    page = api.fine_tuning.jobs.list(metadata={"team": "search", "run": "a"}, limit=1)
    assert [job.id for job in page.data] == [newest_first[0]] and page.has_more
    assert [job.id for job in page.get_next_page().data] == [ids[0]]
    assert [job.id for job in api.fine_tuning.jobs.list(metadata={"team": "nobody"})] == []
    with pytest.raises(openai.BadRequestError) as refused:
        api.fine_tuning.jobs.list(extra_query={"metadata": "team"})
    assert refused.value.param == "metadata"
