"""Generation requests in the store (scheduler/generation.py) on a real Valkey: model names resolve only to the
tenant's own adapters, checkpoints and bases; requests queue per base, are taken within a budget, and are answered
through their result key."""

from __future__ import annotations

import shutil
import time

import pytest

from lorafleet.scheduler import keys
from lorafleet.scheduler.generation import (
    ChoiceResult, GenerationResult, Generations, GenerationTimeout, Sampling, ServingBudget, checkpoint_model_name,
    fine_tuned_model_name, parse_sampling, queued_by_base,
)
from lorafleet.scheduler.metrics import scheduler_metrics
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.spec import parse_spec
from lorafleet.scheduler.submission import plan_for


@pytest.fixture
def generations(store, hf_cache, base_model_dir) -> Generations:
    return Generations(store, hf_cache, [base_model_dir.parent.parent])


def trained_job(store, tenant: str, base_model_dir, *, state: str = "succeeded", checkpoints: tuple[int, ...] = (),
                adapter_type: str = "lora", adapter_uri: str | None = None):
    """A job of `tenant` on the tiny base, moved through the store's verbs to `state` (with `checkpoints` kept)."""
    adapter = {"type": "galore", "target_modules": ["q_proj"]} if adapter_type == "galore" else {"r": 4}
    spec = parse_spec({"name": "bot", "base_model": str(base_model_dir), "dataset": f"{tenant}/train.jsonl",
                       "adapter": adapter})
    job_id = store.submit(tenant, spec, plan=plan_for(spec, base_model_dir, 1000))["job_id"]
    attempt = store.claim(job_id, "exec-test")
    assert store.start(job_id, attempt, "exec-test")
    for step in checkpoints:
        store.record_checkpoint(job_id, f"/artifacts/{tenant}/{job_id}/attempt-1/checkpoint-{step}-ab12", attempt,
                                "exec-test", step=step)
    if state == "succeeded":
        adapter_uri = adapter_uri or f"/artifacts/{tenant}/{job_id}/attempt-1/adapter-cd34"
        assert store.succeed(job_id, adapter_uri, attempt, "exec-test")
    return store.job(job_id)


def test_a_succeeded_jobs_fine_tuned_model_names_its_adapter_on_its_base(generations, store, make_tenant,
                                                                        base_model_dir):
    tenant = make_tenant()
    record = trained_job(store, tenant.name, base_model_dir)
    target = generations.resolve_model(tenant.name, fine_tuned_model_name(record))
    assert target.adapter_uri == record.adapter_uri and target.job_id == record.job_id
    assert target.base.compat_key == record.plan.compat_key and target.base.base_name == str(base_model_dir)


def test_a_model_of_another_tenant_is_answered_as_one_that_does_not_exist(generations, store, make_tenant,
                                                                         base_model_dir):
    owner, other = make_tenant(), make_tenant()
    name = fine_tuned_model_name(trained_job(store, owner.name, base_model_dir))
    with pytest.raises(LookupError) as foreign:
        generations.resolve_model(other.name, name)
    missing = name[:-4] + "0000"
    with pytest.raises(LookupError) as unknown:
        generations.resolve_model(other.name, missing)
    assert str(foreign.value) == str(unknown.value).replace(missing, name)
    assert "does not exist or you do not have access to it" in str(foreign.value)


def test_a_checkpoint_model_names_a_kept_checkpoint_of_a_running_job(generations, store, make_tenant, base_model_dir):
    tenant = make_tenant()
    record = trained_job(store, tenant.name, base_model_dir, state="running", checkpoints=(2, 4, 6))
    target = generations.resolve_model(tenant.name, checkpoint_model_name(record, 6))
    assert target.adapter_uri == record.checkpoints[-1] and "checkpoint-6-" in target.adapter_uri
    with pytest.raises(LookupError, match=r"keeps no checkpoint at step 2 \(kept: 4, 6\)"):
        generations.resolve_model(tenant.name, checkpoint_model_name(record, 2))
    with pytest.raises(LookupError, match="is not ready: job .* is running"):
        generations.resolve_model(tenant.name, fine_tuned_model_name(record))


def test_a_galore_jobs_model_and_checkpoint_are_bases_of_their_own_of_the_jobs_family(generations, store,
                                                                                       make_tenant, base_model_dir):
    tenant = make_tenant()
    record = trained_job(store, tenant.name, base_model_dir, adapter_type="galore", checkpoints=(10,))
    model = generations.resolve_model(tenant.name, fine_tuned_model_name(record))
    checkpoint = generations.resolve_model(tenant.name, checkpoint_model_name(record, 10))
    assert model.adapter_uri is None and model.base.model_uri == record.adapter_uri
    assert checkpoint.base.model_uri == record.checkpoints[0]
    assert model.base.base_snapshot == record.plan.base_snapshot  # its family is checked on the job's base
    keys_ = {model.base.compat_key, checkpoint.base.compat_key, record.plan.compat_key}
    assert len(keys_) == 3, "each whole model is loaded on its own, never taken for the base it was trained from"
    queued = generations.submit(tenant.name, fine_tuned_model_name(record), prompt="hi", timeout=5)
    assert queued.target.base.model_uri == record.adapter_uri
    generations.take_requests(model.base.compat_key, ServingBudget(max_requests=1, max_tokens=16))
    generations.bases_unserved()  # forgets the base (the store is shared with the other tests)


def test_a_base_model_resolves_as_a_job_spec_names_it_and_nothing_outside_the_roots(generations, make_tenant,
                                                                                   base_model_dir):
    tenant = make_tenant()
    by_id = generations.resolve_model(tenant.name, "test-org/tiny-model")
    assert by_id.adapter_uri is None and by_id.base.compat_key.endswith("|none|auto")
    assert generations.resolve_model(tenant.name, str(base_model_dir)).base.base_snapshot == str(
        base_model_dir.resolve())
    for name in ("/etc", "test-org/absent-model", "ft:nonsense"):
        with pytest.raises(LookupError, match="does not exist"):
            generations.resolve_model(tenant.name, name)


def test_requests_are_taken_oldest_first_within_the_budget_and_late_ones_dropped(generations, make_tenant):
    tenant = make_tenant()
    base = generations.resolve_model(tenant.name, "test-org/tiny-model").base
    generations.store.r.delete(keys.generation_queue(base.compat_key))  # other tests' requests still in their time
    late = generations.submit(tenant.name, "test-org/tiny-model", prompt="late", timeout=0.05)
    time.sleep(0.1)
    submitted = [generations.submit(tenant.name, "test-org/tiny-model", prompt=f"p{i}",
                                    sampling=Sampling(max_tokens=tokens))
                 for i, tokens in enumerate((600, 300, 200, 50))]
    key = submitted[0].target.base.compat_key
    budget = ServingBudget(max_requests=8, max_tokens=1000)
    assert [r.request_id for r in generations.take_requests(key, budget)] == [r.request_id for r in submitted[:2]]
    assert [r.prompt for r in generations.take_requests(key, ServingBudget(max_requests=1, max_tokens=1))] == ["p2"], \
        "one request is always taken, whatever its max_tokens"
    assert [r.prompt for r in generations.take_requests(key, budget)] == ["p3"]
    assert late.request_id not in {r.request_id for r in submitted}


def test_an_answer_reaches_its_waiter_and_a_silence_names_the_base_and_the_wait(generations, make_tenant):
    tenant = make_tenant()
    request = generations.submit(tenant.name, "test-org/tiny-model", prompt="hello", timeout=5)
    generations.answer(GenerationResult(request_id=request.request_id, prompt_tokens=2, choices=(
        ChoiceResult(text=" world", completion_tokens=1, finish_reason="length"),)))
    assert generations.wait_result(request).choices[0].text == " world"
    assert generations.store.r.ttl(keys.generation_result(request.request_id)) == -2, "popped by its waiter"
    unanswered = generations.submit(tenant.name, "test-org/tiny-model", prompt="hello", timeout=0.3)
    with pytest.raises(GenerationTimeout, match="no executor serving base 'test-org/tiny-model' answered within 0.3 s"):
        generations.wait_result(unanswered)


def test_unserved_bases_are_listed_until_an_executor_claims_one(generations, make_tenant):
    tenant = make_tenant()
    request = generations.submit(tenant.name, "test-org/tiny-model", prompt="x")
    key = request.target.base.compat_key
    generations.store.r.delete(keys.generation_server(key))
    assert key in [base.compat_key for _, base in generations.bases_unserved()]
    assert generations.claim_base(key, "exec-1") and not generations.claim_base(key, "exec-2")
    assert key not in [base.compat_key for _, base in generations.bases_unserved()]
    generations.store.r.delete(keys.generation_server(key), keys.generation_queue(key))
    assert generations.bases_unserved() == [] and not generations.store.r.hexists(keys.GENERATION_BASES, key), \
        "a base nothing waits for is forgotten"


@pytest.mark.parametrize("raw, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": [""]}, "stop"), ({"n": 9}, "n"),
    ({"logprobs": 21}, "logprobs"),
])
def test_bad_sampling_options_are_refused_naming_the_field(raw, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        parse_sampling(raw)


def test_bad_chat_messages_are_refused_naming_the_message(generations, make_tenant):
    tenant = make_tenant()
    with pytest.raises(ValueError, match=r"^messages.1: .*role"):
        generations.submit(tenant.name, "test-org/tiny-model",
                           messages=[{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}])
    with pytest.raises(ValueError, match="^prompt: give either"):
        generations.submit(tenant.name, "test-org/tiny-model", prompt="a", messages=[{"role": "user", "content": "b"}])


def test_a_full_queue_refuses_more_and_a_short_wait_never_shortens_a_long_ones_queue(generations, make_tenant,
                                                                                    monkeypatch):
    from lorafleet.scheduler import generation
    from lorafleet.scheduler.store import QuotaExceeded

    tenant = make_tenant()
    first = generations.submit(tenant.name, "test-org/tiny-model", prompt="a", timeout=300)
    queue = keys.generation_queue(first.target.base.compat_key)
    generations.submit(tenant.name, "test-org/tiny-model", prompt="b", timeout=1)
    assert generations.store.r.ttl(queue) > 300
    monkeypatch.setattr(generation, "MAX_WAITING_PER_BASE", generations.store.r.llen(queue))
    with pytest.raises(QuotaExceeded, match="too many generation requests are waiting for base 'test-org/tiny-model'"):
        generations.submit(tenant.name, "test-org/tiny-model", prompt="c")
    generations.store.r.delete(queue)


def test_the_leader_exports_the_requests_waiting_for_each_base_and_drops_a_base_gone(generations, store, make_tenant,
                                                                                    base_model_dir, tmp_path):
    base = tmp_path / "base"  # a base of this test alone (its own compat key): other tests' requests are not counted
    shutil.copytree(base_model_dir, base)
    tenant = make_tenant()
    requests = [generations.submit(tenant.name, str(base), prompt=f"p{i}", timeout=30) for i in range(3)]
    assert queued_by_base(store.r)[str(base)] == 3
    metrics = scheduler_metrics()
    leader = Scheduler(store, "sched-generation-export", metrics=metrics)
    leader._export_generation_queued()
    assert metrics.registry.get_sample_value("lorafleet_generation_queued", {"base": str(base)}) == 3
    compat = requests[0].target.base.compat_key
    assert len(generations.take_requests(compat, ServingBudget(max_requests=2, max_tokens=10_000))) == 2
    leader._export_generation_queued()
    assert metrics.registry.get_sample_value("lorafleet_generation_queued", {"base": str(base)}) == 1
    generations.take_requests(compat, ServingBudget(max_requests=2, max_tokens=10_000))
    generations.bases_unserved()  # forgets a base whose queue is empty
    leader._export_generation_queued()
    assert metrics.registry.get_sample_value("lorafleet_generation_queued", {"base": str(base)}) is None
