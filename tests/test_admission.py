"""A job that no live executor class could hold even alone is refused at submission, naming what to change; with
room somewhere, or no fleet yet to judge by, it is accepted. Against a real Valkey of its own (heartbeats of other
tests' executors must not be in the fleet)."""

from __future__ import annotations

import pytest

from lorafleet.scheduler import admission, fleet
from lorafleet.scheduler.memory import ModelShape, plan_job
from lorafleet.scheduler.records import ExecutorHeartbeat
from lorafleet.scheduler.redis_server import start_redis_server
from lorafleet.scheduler.spec import ALL_PROJECTIONS, SpecError, parse_spec

LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128256)
GIB = 2**30


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setattr(admission, "CLASSES_SECONDS", 0.0)  # every check reads the fleet as it is now
    server = start_redis_server(tmp_path / "redis")
    yield server.client()
    server.stop()


def job_8b(dtype="auto", batch_size=4):
    spec = parse_spec({"base_model": "/models/llama-8b", "dataset": "t/train.jsonl", "dtype": dtype,
                       "hyperparameters": {"batch_size": batch_size, "max_seq_len": 512, "max_steps": 10}})
    plan = plan_job(f"/models/llama-8b|none|{dtype}", "/models/llama-8b", LLAMA_8B, 16, ALL_PROJECTIONS,
                    batch_size=batch_size, max_seq_len=512, quantization="none", dtype=dtype, tokens=10_000)
    return spec, plan


def beat(client, name, gib, dtypes=("bfloat16", "float32"), auto="bfloat16"):
    fleet.heartbeat(client, ExecutorHeartbeat(name, total_bytes=gib * GIB, dtypes=dtypes, auto_dtype=auto), ttl=60)


def test_with_no_executor_alive_a_job_waits_instead_of_being_refused(client):
    admission.check_some_executor_holds(client, *job_8b())


def test_a_job_too_big_for_every_executor_is_refused_naming_batch_size_and_sizes(client):
    beat(client, "small-gpu", 24)
    with pytest.raises(SpecError, match=r"hyperparameters.batch_size: no executor of this deployment can hold this "
                                        r"job, even alone: it needs about [\d.]+ GiB .* offers 22.1 GiB"):
        admission.check_some_executor_holds(client, *job_8b())
    beat(client, "big-gpu", 141)
    admission.check_some_executor_holds(client, *job_8b())


def test_a_dtype_no_executor_computes_is_refused_naming_dtype(client):
    beat(client, "old-gpu", 80, dtypes=("float32",), auto="float32")
    with pytest.raises(SpecError, match="dtype: no executor of this deployment computes in bfloat16"):
        admission.check_some_executor_holds(client, *job_8b(dtype="bfloat16"))
    admission.check_some_executor_holds(client, *job_8b(dtype="auto"))  # fp32 there: 8B + LoRA fits 80 GiB
