"""The executor's serving loop (executor/serving.py) on a real cohort and a real Valkey, in this process: requests
served between training steps leave the training bitwise as it was, a gap takes at most its budget, and an adapter
for modules the cohort's jobs do not train is served too."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from helpers_models import alpaca_rows, single_torch_thread, write_jsonl  # noqa: F401
from lorafleet.executor.cohort import Cohort
from lorafleet.executor.serving import BETWEEN_STEPS, GenerationServer
from lorafleet.scheduler import keys
from lorafleet.scheduler.artifacts import ArtifactStore
from lorafleet.scheduler.generation import Generations, Sampling, ServedBase, fine_tuned_model_name
from lorafleet.scheduler.spec import parse_spec
from test_generation_store import trained_job


@pytest.fixture
def dataset(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", alpaca_rows(16, seed=3))


def spec(dataset, targets, max_steps: int):
    return parse_spec({"base_model": "unused", "dataset": str(dataset), "adapter": {
        "r": 4, "lora_alpha": 8, "target_modules": targets}, "hyperparameters": {
        "max_steps": max_steps, "batch_size": 2, "max_seq_len": 128, "learning_rate": 1e-3, "seed": 1}})


@pytest.fixture
def donor_adapter(tmp_path, dataset, base_model_dir):
    """A published adapter on every linear layer but the LM head: modules the trained job below does not touch."""
    cohort = Cohort(base_model_dir)
    cohort.add_job("donor", spec(dataset, "all-linear", 2), dataset)
    while cohort.active_jobs():
        cohort.step()
    return cohort.export("donor", tmp_path / "donor")


def train(cohort: Cohort, dataset, steps: int, between_steps=lambda: None) -> dict[str, torch.Tensor]:
    cohort.add_job("job", spec(dataset, ["q_proj", "v_proj"], steps), dataset)
    while cohort.active_jobs():
        cohort.step()
        between_steps()
    return {name: tensor.clone() for name, tensor in cohort.jobs["job"].adapter.state_dict().items()}


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
def test_serving_between_steps_leaves_training_bitwise_unchanged(store, make_tenant, tmp_path, dataset,
                                                                donor_adapter, base_model_dir, device):
    """Bitwise on the CPU. On a GPU the training steps replay a CUDA graph: the generator's forwards between them must
    not disturb it."""
    tenant = make_tenant()
    record = trained_job(store, tenant.name, base_model_dir, adapter_uri=str(donor_adapter))
    generations = Generations(store, tmp_path, [base_model_dir.parent.parent])
    served = Cohort(base_model_dir, device=device)
    server = GenerationServer(generations, "exec-serving", ArtifactStore(str(tmp_path)), tmp_path / "scratch")
    answers = []

    def serve() -> None:
        requests = [generations.submit(tenant.name, fine_tuned_model_name(record), prompt=f"count to {n}",
                                       sampling=Sampling(max_tokens=4, temperature=0)) for n in range(2)]
        assert server.serve(served, record.plan.compat_key, training=True) == 2
        answers.extend(generations.wait_result(request, timeout=5) for request in requests)

    alone = train(Cohort(base_model_dir, device=device), dataset, 6)
    with_serving = train(served, dataset, 6, serve)
    assert alone.keys() == with_serving.keys()
    for name in alone:  # on a GPU two runs may differ in the last bit (atomics in attention's backward)
        tolerance = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-5, "atol": 1e-7}
        torch.testing.assert_close(with_serving[name], alone[name], **tolerance)
    assert len(answers) == 12 and all(a.error is None and a.completion_tokens >= 1 for a in answers)
    assert len({a.choices[0].text for a in answers[0::2]}) == 1, \
        "the same greedy request gets the same answer at every gap"


def test_a_gap_between_steps_takes_at_most_its_budget(store, make_tenant, tmp_path, hf_cache, base_model_dir):
    tenant = make_tenant()
    generations = Generations(store, hf_cache, [base_model_dir.parent.parent])
    key = generations.resolve_model(tenant.name, "test-org/tiny-model").base.compat_key
    store.r.delete(keys.generation_queue(key))  # what other tests left waiting for this base
    requests = [generations.submit(tenant.name, "test-org/tiny-model", prompt=str(n), sampling=Sampling(max_tokens=2))
                for n in range(BETWEEN_STEPS.max_requests + 3)]
    server = GenerationServer(generations, "exec-budget", ArtifactStore(str(tmp_path)), tmp_path / "scratch")
    cohort = Cohort(base_model_dir)
    assert server.serve(cohort, key, training=True) == BETWEEN_STEPS.max_requests
    assert server.serve(cohort, key, training=True) == 3
    assert all(generations.wait_result(r, timeout=5).error is None for r in requests)
    assert store.gpu_seconds_total()[tenant.name] > 0, "the tenant is charged for the device time it used"
    model = weakref.ref(cohort.model)
    server.release()  # what the executor does as it unloads the base
    del cohort
    gc.collect()
    assert model() is None, "nothing of the server holds an unloaded base's model"


def test_an_idle_executor_leaves_its_base_only_for_requests_that_waited(store, make_tenant, tmp_path, hf_cache,
                                                                             base_model_dir, monkeypatch):
    from lorafleet.executor import serving

    tenant = make_tenant()
    generations = Generations(store, hf_cache, [base_model_dir.parent.parent])
    loaded = generations.resolve_model(tenant.name, "test-org/tiny-model").base.compat_key  # the cache's snapshot
    other = generations.resolve_model(tenant.name, str(base_model_dir)).base.compat_key  # the same files elsewhere
    assert loaded != other
    store.r.delete(*(keys.generation_queue(k) for k in (loaded, other)), *(keys.generation_server(k) for k in (
        loaded, other)))
    server = GenerationServer(generations, "exec-switch", ArtifactStore(str(tmp_path)), tmp_path / "scratch")
    assert generations.take_requests(loaded, BETWEEN_STEPS, server="exec-switch") == []  # its loop, on its base
    generations.submit(tenant.name, str(base_model_dir), prompt="x")
    assert server.base_to_load(loaded) is None, "a new request is left a moment to executors with no base loaded"
    monkeypatch.setattr(serving, "SWITCH_GRACE_SECONDS", 0.0)
    generations.submit(tenant.name, "test-org/tiny-model", prompt="y")
    assert server.base_to_load(loaded) is None, "its own base has requests: others' have not waited long enough"
    monkeypatch.setattr(serving, "SWITCH_AFTER_SECONDS", 0.0)
    assert server.base_to_load(loaded).compat_key == other
    assert server.base_to_load(None) is None, "claimed: no second executor loads it"
    store.r.delete(keys.generation_server(other))
    assert server.base_to_load(None).compat_key == other, "an executor with no base loaded takes it at once"
    store.r.delete(*(keys.generation_queue(k) for k in (loaded, other)), *(keys.generation_server(k) for k in (
        loaded, other)))


def test_a_whole_model_on_a_remote_store_is_loaded_from_a_copy_that_release_removes(store, tmp_path, base_model_dir):
    artifacts = ArtifactStore("memory://lorafleet-serving-" + tmp_path.name)
    uri = artifacts.publish(base_model_dir, "t", "job-0123456789abcdef", 1, "model")
    server = GenerationServer(Generations(store, tmp_path, []), "exec-1", artifacts, tmp_path / "scratch")
    base = ServedBase(compat_key=uri + "|none|auto", base_snapshot=str(base_model_dir), base_name="ft:x",
                      model_uri=uri)
    local = Path(server.weights_of(base))
    assert (local / "config.json").read_bytes() == (base_model_dir / "config.json").read_bytes()
    assert (tmp_path / "scratch") in local.parents
    cohort = Cohort(local)  # what the executor loads
    assert cohort.tokenizer is not None
    server.release()
    assert not local.exists() and list(server.scratch.iterdir()) == [], "no copy or empty folder left"
    assert server.weights_of(ServedBase(compat_key="k", base_snapshot=str(base_model_dir), base_name="b")) == str(
        base_model_dir), "a base is loaded from its snapshot, never copied"
