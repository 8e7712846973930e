"""A GaLore job (issue 18) through the whole service on the CPU: submitted through the Celery task, planned alone,
trained by an executor process to the end with checkpoints and validation, and published as a full model that
`from_pretrained` loads and that the service's generation serves. The fleet (real Redis, Celery worker, schedulers, two executors) is test_fleet_e2e's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_models import single_torch_thread  # noqa: F401
from helpers_polling import wait_until
from lorafleet.scheduler import fleet
from lorafleet.scheduler.generation import fine_tuned_model_name
from test_fleet_e2e import fleet_env, make_tenant, spec_for  # noqa: F401  (the fleet fixture)
from test_generation_fleet import PROMPT, expected_completion, tokenizer_of

pytestmark = pytest.mark.slow

GALORE_TARGETS = ["q_proj", "v_proj", "gate_proj"]


def galore_spec_for(fleet, tenant: str, **hyperparameters) -> dict:
    spec = spec_for(fleet, tenant, **hyperparameters)
    spec["adapter"] = {"type": "galore", "galore": {"rank": 4, "update_proj_gap": 2}, "target_modules": GALORE_TARGETS}
    return spec


def weights(directory) -> dict[str, torch.Tensor]:
    return {name: tensor for path in Path(directory).glob("*.safetensors") for name, tensor in load_file(path).items()}


def test_a_galore_job_trains_alone_to_the_end_and_its_published_model_loads_and_is_served(fleet_env):
    from transformers import AutoModelForCausalLM

    tenant, token = make_tenant(fleet_env)
    spec = galore_spec_for(fleet_env, tenant, max_steps=6, checkpoint_every=3, learning_rate=1e-3)
    spec["validation_dataset"] = f"{tenant}/train.jsonl"
    galore_id = fleet_env.submit(token, spec)
    lora_id = fleet_env.submit(token, spec_for(fleet_env, tenant, max_steps=6))  # the same base
    galore = fleet_env.wait_state(token, galore_id, ("succeeded", "failed"), timeout=240)
    lora = fleet_env.wait_state(token, lora_id, ("succeeded", "failed"), timeout=240)
    assert (galore["state"], lora["state"]) == ("succeeded", "succeeded"), (galore["error"], lora["error"],
                                                                            fleet_env.logs())
    assert galore["progress"] == {"step": 6, "total_steps": 6}
    assert 0 < galore["metrics"]["eval_loss"] < 20, "the final step reports the validation loss"
    assert galore["checkpoint_uri"] and (Path(galore["checkpoint_uri"]) / "training_state.pt").is_file()
    if galore["executor_id"] == lora["executor_id"]:
        assert (galore["finished_at"] <= lora["started_at"] or lora["finished_at"] <= galore["started_at"]), \
            "a GaLore job never shares its executor's cohort with another job"

    published = Path(galore["adapter_uri"])
    assert not (published / "training_state.pt").exists(), "the result is the model, not the training state"
    model = AutoModelForCausalLM.from_pretrained(published)
    trained, base = weights(published), weights(fleet_env.models["llama"])
    assert trained.keys() == base.keys()
    changed = {name for name in base if not torch.equal(trained[name], base[name])}
    assert any(".q_proj." in name for name in changed), "the projected targets trained"
    assert any("embed_tokens" in name for name in changed), "the other parameters trained too (AdamW)"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()

    # its fine-tuned model answers completions (an idle executor loads it as a base of its own), as HF generates
    name = fine_tuned_model_name(fleet_env.store.job(galore_id))
    prompt_ids = tokenizer_of(published)(PROMPT)["input_ids"]
    text, reason, _ = expected_completion(published, None, prompt_ids, 6)
    base_text, _, _ = expected_completion(fleet_env.models["llama"], None, prompt_ids, 6)
    assert text != base_text, "training changed the answer (else this could not tell the model from its base)"
    answer = fleet_env.call("lorafleet.generate", token, {"model": name, "prompt": PROMPT, "max_tokens": 6,
                                                          "temperature": 0, "timeout": 25})
    assert (answer["text"], answer["finish_reason"]) == (text, reason)


def test_a_killed_galore_job_resumes_on_another_executor_with_the_weights_of_an_uninterrupted_run(fleet_env):
    from lorafleet.executor.galore_cohort import galore_settings
    from lorafleet.executor.galore_job import GaloreJob
    from lorafleet.scheduler.spec import parse_spec

    tenant, token = make_tenant(fleet_env)
    spec = galore_spec_for(fleet_env, tenant, max_steps=60, checkpoint_every=5)
    job_id = fleet_env.submit(token, spec)
    victim = fleet_env.kill_holder_after_a_checkpoint(token, job_id)
    try:
        done = fleet_env.wait_state(token, job_id, ("succeeded", "failed"), timeout=240)
    finally:
        fleet_env.start_executor(victim)  # back to two executors for the tests after this one
    assert done["state"] == "succeeded", done["error"]
    assert done["attempt"] == 2 and done["executor_id"] != victim

    parsed = parse_spec(spec)
    reference = GaloreJob(fleet_env.models["llama"], galore_settings(parsed), parsed.hyperparameters,
                          fleet_env.root / "data" / tenant / "train.jsonl")
    while reference.active:
        reference.step()
    want = {name: p.detach() for name, p in reference.model.state_dict().items()}
    got = weights(done["adapter_uri"])
    assert got and got.keys() <= want.keys()
    for name, tensor in got.items():
        rel = (tensor - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


def test_a_cancelled_galore_job_leaves_its_executor_with_nothing_loaded(fleet_env):
    tenant, token = make_tenant(fleet_env)
    job_id = fleet_env.submit(token, galore_spec_for(fleet_env, tenant, max_steps=100_000, checkpoint_every=1000))
    executor_id = fleet_env.wait_state(token, job_id, ("running",))["executor_id"]
    wait_until(lambda: fleet_env.get(token, job_id)["progress"]["step"] >= 1, "a first step")
    assert fleet_env.call("lorafleet.cancel_job", token, job_id)["state"] == "cancelled"

    def executor():
        return next(e for e in fleet.executors(fleet_env.store.r)[0] if e.executor_id == executor_id)

    wait_until(lambda: executor().jobs == {} and executor().compat_key is None,
               "the executor to drop the cancelled job and its model", timeout=30)
    assert fleet_env.get(token, job_id)["progress"]["step"] < 100_000
