"""Executor bookkeeping against a real Redis (no model needed): orphans of a restarted executor, stale leases."""

from __future__ import annotations

import pytest
import torch

from helpers_models import build_tiny_model, single_torch_thread, write_jsonl  # noqa: F401
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.executor.step_graph import StepGraphs
from lorafleet.executor.worker import Executor, Lease
from lorafleet.scheduler import fleet, keys
from lorafleet.scheduler.memory import ModelShape, plan_job
from lorafleet.scheduler.records import ExecutorHeartbeat
from lorafleet.scheduler.spec import parse_spec


SPEC = parse_spec({"base_model": "/models/none", "dataset": "train.jsonl"})


def plan_of(spec):
    """A plan as submission makes it, for a base that needs no files here."""
    hp = spec.hyperparameters
    return plan_job("|".join((spec.base_model, spec.quantization, spec.dtype)), spec.base_model,
                    ModelShape(64, 128, 2, 4, 2, 360), spec.adapter.r, spec.adapter.target_modules, hp.batch_size,
                    hp.max_seq_len, spec.quantization, spec.dtype, 1000)


PLAN = plan_of(SPEC)


def running_job(store, tenant, executor_id: str) -> tuple[str, int]:
    job_id = store.submit(tenant.name, SPEC, plan=PLAN)["job_id"]
    attempt = store.claim(job_id, executor_id)
    assert store.transition(job_id, "scheduled", "running", attempt=attempt)
    return job_id, attempt


def test_a_restarted_executor_hands_back_what_its_previous_process_held(store, make_tenant, tmp_path):
    tenant = make_tenant()
    mine, _ = running_job(store, tenant, "exec-restarted")
    other, _ = running_job(store, tenant, "exec-other")
    executor = Executor(store, "exec-restarted", "cpu", ArtifactStore(str(tmp_path)))

    executor.hand_back_orphans()

    assert store.get_job(mine)["state"] == "queued"
    assert store.get_job(other)["state"] == "running", "another executor's job is left alone"
    assert any(e["type"] == "requeued" and e["reason"] == "executor restarted" for e in store.events(mine))


def test_an_executor_drops_jobs_whose_lease_moved_on(store, make_tenant, tmp_path):
    tenant = make_tenant()
    job_id, attempt = running_job(store, tenant, "exec-stale")
    executor = Executor(store, "exec-stale", "cpu", ArtifactStore(str(tmp_path)))
    executor.leases[job_id] = Lease(job_id, tenant.name, attempt, SPEC, PLAN)

    assert store.transition(job_id, "running", "queued")  # the scheduler declared us dead meanwhile
    store.claim(job_id, "exec-new")
    executor.sync_assignments()

    assert job_id not in executor.leases
    assert not store.record_progress(job_id, 5, 10, {"loss": 1.0}, attempt=attempt), "stale writes are refused"
    assert store.record_checkpoint(job_id, "file:///stale", attempt) is None


def test_heartbeats_expire_and_drain_requests_need_a_live_executor(store):
    fleet.heartbeat(store.r, ExecutorHeartbeat("exec-beat", device="cpu", total_bytes=10), ttl=0.2)
    alive, _ = fleet.executors(store.r)
    assert any(e.executor_id == "exec-beat" and e.total_bytes == 10 for e in alive)
    assert fleet.request_drain(store.r, "exec-beat") and store.executor_view("exec-beat").drain
    store.r.delete(keys.executor("exec-beat"))  # what the TTL does 0.2 s later
    alive, dead = fleet.executors(store.r)
    assert "exec-beat" in dead and not any(e.executor_id == "exec-beat" for e in alive)
    assert not fleet.request_drain(store.r, "exec-beat")
    fleet.forget(store.r, "exec-beat")
    assert "exec-beat" not in fleet.executors(store.r)[1]


def test_a_job_for_another_base_is_handed_back_not_failed(store, make_tenant, tmp_path):
    tenant = make_tenant()
    running, attempt = running_job(store, tenant, "exec-busy")
    executor = Executor(store, "exec-busy", "cpu", ArtifactStore(str(tmp_path)))
    executor.compat_key = PLAN.compat_key
    executor.leases[running] = Lease(running, tenant.name, attempt, SPEC, PLAN)
    other = parse_spec({"base_model": "/models/other", "dataset": "train.jsonl"})
    job_id = store.submit(tenant.name, other, plan=plan_of(other))["job_id"]
    store.claim(job_id, "exec-busy")

    executor.admit(store.job(job_id))

    assert store.get_job(job_id)["state"] == "queued"
    assert job_id not in executor.leases


def test_out_of_memory_hands_every_job_back_from_its_checkpoint_and_offers_less(store, make_tenant, tmp_path):
    tenant = make_tenant()
    executor = Executor(store, "exec-oom", "cpu", ArtifactStore(str(tmp_path)), memory_bytes=100 * 2**30)
    jobs = []
    for _ in range(2):
        job_id, attempt = running_job(store, tenant, "exec-oom")
        assert store.record_checkpoint(job_id, f"file:///ckpt/{job_id}", attempt) is not None
        executor.leases[job_id] = Lease(job_id, tenant.name, attempt, SPEC, PLAN)
        jobs.append(job_id)

    class CohortOutOfMemory:  # stands in for a cohort whose step runs out of device memory
        graphs = StepGraphs(enabled=False)

        def step(self):
            raise torch.OutOfMemoryError("CUDA out of memory")

    executor.cohort = CohortOutOfMemory()
    executor.train_step()

    for job_id in jobs:
        job = store.get_job(job_id)
        assert job["state"] == "queued" and job["checkpoint_uri"] == f"file:///ckpt/{job_id}"
        assert any(e["type"] == "requeued" and e["reason"] == "out of memory" for e in store.events(job_id))
    assert executor.leases == {} and executor.cohort is None
    assert executor.total_bytes < 100 * 2**30
    heartbeat = next(e for e in fleet.executors(store.r)[0] if e.executor_id == "exec-oom")
    assert heartbeat.total_bytes == executor.total_bytes


def test_a_job_whose_validation_set_cannot_be_read_fails_alone(store, make_tenant, tmp_path, monkeypatch):
    """add_job succeeded, then the validation set failed: the job is failed and leaves nothing in the cohort."""
    tenant = make_tenant()
    spec = parse_spec({"base_model": "/models/none", "dataset": f"{tenant.name}/train.jsonl",
                       "validation_dataset": f"{tenant.name}/missing.jsonl"})
    job_id = store.submit(tenant.name, spec, plan=plan_of(spec))["job_id"]
    store.claim(job_id, "exec-val")

    class Cohort:  # stands in for a loaded cohort: records what joined
        tokenizer = None

        def __init__(self):
            self.jobs = {}

        def add_job(self, job_id, spec, dataset, resume_from=None, dataset_name=None):
            self.jobs[job_id] = spec

        def remove_job(self, job_id):
            del self.jobs[job_id]

    executor = Executor(store, "exec-val", "cpu", ArtifactStore(str(tmp_path)))
    executor.cohort, executor.compat_key = Cohort(), plan_of(spec).compat_key
    monkeypatch.setenv("LORAFLEET_DATA_ROOT", str(tenant.area.parent))
    executor.admit(store.job(job_id))

    job = store.get_job(job_id)
    assert job["state"] == "failed" and "validation_dataset" in job["error"]
    assert executor.cohort.jobs == {} and job_id not in executor.leases


def test_gpu_seconds_accumulate_and_decay_with_the_half_life(store, make_tenant):
    from lorafleet.scheduler.policy import USAGE_HALF_LIFE_SECONDS

    a, b = make_tenant(), make_tenant()
    store.add_gpu_seconds({a.name: 100.0, b.name: 10.0}, now=1000.0)
    store.add_gpu_seconds({a.name: 20.0}, now=1000.0)
    assert store.gpu_seconds(now=1000.0)[a.name] == pytest.approx(120.0)
    later = 1000.0 + USAGE_HALF_LIFE_SECONDS
    usage = store.gpu_seconds(now=later)
    assert usage[a.name] == pytest.approx(60.0) and usage[b.name] == pytest.approx(5.0)
    store.add_gpu_seconds({b.name: 5.0}, now=later)
    assert store.gpu_seconds(now=later)[b.name] == pytest.approx(10.0)


def test_the_heartbeat_says_whether_the_executor_runs_in_passes(store, tmp_path):
    Executor(store, "exec-passes", "cpu", ArtifactStore(str(tmp_path)), max_pass_tokens=4096).send_heartbeat()
    Executor(store, "exec-whole", "cpu", ArtifactStore(str(tmp_path))).send_heartbeat()
    alive = {e.executor_id: e for e in fleet.executors(store.r)[0]}
    assert alive["exec-passes"].max_pass_tokens == 4096
    assert alive["exec-whole"].max_pass_tokens is None, "no passes"


@pytest.mark.parametrize("native, dtypes, auto", [(True, ("bfloat16", "float32"), torch.bfloat16),
                                                  (False, ("float32",), torch.float32)])
def test_an_executor_offers_bf16_only_where_the_gpu_computes_it_natively(store, tmp_path, monkeypatch, native, dtypes,
                                                                          auto):
    from lorafleet.executor.model import compute_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    executor = Executor(store, "exec-gpu", "cuda:0", ArtifactStore(str(tmp_path)), memory_bytes=2**30)
    executor.send_heartbeat()
    beat = {e.executor_id: e for e in fleet.executors(store.r)[0]}["exec-gpu"]
    assert beat.dtypes == dtypes and beat.auto_dtype == ("bfloat16" if native else "float32")
    assert compute_dtype("auto", torch.device("cuda:0")) == auto
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_job_that_trains_on_no_target_token_fails_instead_of_succeeding(store, make_tenant, tmp_path, monkeypatch,
                                                                         single_torch_thread):
    """Every prompt is longer than max_seq_len, so no target token is left: the job must not 'succeed'."""
    tenant = make_tenant()
    model = build_tiny_model(tmp_path / "models" / "tiny", "llama")
    long_prompts = [{"instruction": "please " * 40, "output": "ok"} for _ in range(4)]
    write_jsonl(tenant.area / "long.jsonl", long_prompts)
    monkeypatch.setenv("LORAFLEET_DATA_ROOT", str(tenant.area.parent))
    monkeypatch.setenv("LORAFLEET_MODEL_ROOTS", str(tmp_path / "models"))
    spec = parse_spec({"base_model": str(model), "dataset": f"{tenant.name}/long.jsonl",  # 2 steps an epoch
                       "hyperparameters": {"max_steps": 1000, "batch_size": 2, "max_seq_len": 16}})
    job_id = store.submit(tenant.name, spec)["job_id"]
    store.claim(job_id, "exec-untrained")
    executor = Executor(store, "exec-untrained", "cpu", ArtifactStore(str(tmp_path / "artifacts")))
    executor.admit(store.job(job_id))
    steps = 0
    while job_id in executor.leases and steps < 10:
        executor.train_step()
        steps += 1
    job = store.get_job(job_id)
    assert steps == 2, "failed after the first epoch, not after its 1000 steps"
    assert job["state"] == "failed" and job["adapter_uri"] is None
    assert "nothing was trained" in job["error"] and f"{tenant.name}/long.jsonl" in job["error"]


def test_larger_passes_than_planned_are_sized_with_the_calibrated_memory_model(store, tmp_path):
    """A base the model underestimates (factor 2) gets passes half as large: they must fit what is really free."""
    executor = Executor(store, "exec-passes-gpu", "cuda:0", ArtifactStore(str(tmp_path)), memory_bytes=100 * 2**30,
                        max_pass_tokens=1024)
    executor.compat_key, executor.activation_bytes_per_token = "/models/under|none|auto", float(2**20)
    uncalibrated = executor.pass_size(allocated=10 * 2**30)
    assert uncalibrated > 1024, "free memory allows more than the planned pass"
    store.r.hset(keys.MEMORY_FACTORS, executor.compat_key, 2.0)
    executor.factor_read_at = -1e9  # as if the last read were long ago
    assert executor.pass_size(allocated=10 * 2**30) == uncalibrated // 2
    store.r.hset(keys.MEMORY_FACTORS, executor.compat_key, 0.5)
    executor.factor_read_at = -1e9
    assert executor.pass_size(allocated=10 * 2**30) == uncalibrated, "an overestimate never enlarges the pass"


def test_a_base_frozen_out_of_the_collector_is_freed_when_the_executor_unloads_it(store, tmp_path):
    """Loaded objects are frozen (full collections skip them); unloading gives them back, cycles included."""
    import gc
    import weakref

    from lorafleet.executor.worker import freeze_what_is_loaded

    class Base:  # a cohort whose objects hold each other, as modules and their hooks do
        graphs = StepGraphs(enabled=False)

    executor = Executor(store, "exec-gc", "cpu", ArtifactStore(str(tmp_path)), memory_bytes=2**30)
    executor.cohort = Base()
    executor.cohort.itself = executor.cohort
    base = weakref.ref(executor.cohort)
    try:
        freeze_what_is_loaded()
        assert gc.get_freeze_count() > 0
        executor.cohort = None
        gc.collect()
        assert base() is not None  # frozen: out of the collector's reach
        executor._unload()
        assert base() is None and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
